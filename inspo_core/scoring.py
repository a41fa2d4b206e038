"""The one scoring path: summed target log-probs of a list of views for a batch of pairs.

The trainer, the reference cache, evaluation of validation pairs and the benchmark all call
`score_views` (or its two halves, `prepare_batch` then `score_batch`, when a caller wants to build
the batch once and time only the forward). The packing decides the layout:

- `padded`: one row per (view, pair), right-padded; the attention mask comes from lengths;
- `tree`: every view of a pair in one prefix tree (`inspo_core.packing`), several trees per row.

Both give the same numbers (tests, to 1e-5), also for sliding-window attention (Mistral, Qwen2,
Gemma-3's local layers: `layer_windows`), whose window the tree honours over each path's positions.
Log-probs are always *sums* over the target tokens; length normalisation is the objective's business
(`preference_loss(length_normalize=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inspo_core.conditioning import BuiltPair, ViewBatch, collate_views
from inspo_core.logps import as_scorer
from inspo_core.names import PACKINGS  # noqa: F401  (re-exported)
from inspo_core.packing import PackedBatch, pack_pairs
from inspo_core.strategies import View
from inspo_core.tree_attention import TreeLayout, uses_tree_attention

Tensor = torch.Tensor


@dataclass
class Scores:
    logps: dict[View, Tensor]  # view -> [B] summed target log-probs (fp32)
    lengths: dict[str, Tensor]  # "chosen" / "rejected" -> [B] scored token counts
    tokens: int  # real (non-padding) tokens in the forward


@dataclass
class PreparedBatch:
    packing: str
    views: list[View]
    num_pairs: int
    batch: ViewBatch | PackedBatch

    @property
    def tokens(self) -> int:
        b = self.batch
        return b.tokens if isinstance(b, PackedBatch) else int(b.attention_mask.sum())

    @property
    def lengths(self) -> dict[str, Tensor]:
        return self.batch.lengths


def _language_model(scorer):
    """The causal LM inside a scorer, through DDP's and DeepSpeed's `.module` wrappers."""
    while not hasattr(scorer, "lm") and hasattr(scorer, "module"):
        scorer = scorer.module
    return scorer.lm


def _text_config(model_or_config):
    """The text (decoder) config of a model, a peft model around one, or a config."""
    cfg = model_or_config
    if hasattr(cfg, "get_base_model"):  # peft
        cfg = cfg.get_base_model()
    if isinstance(cfg, torch.nn.Module):
        cfg = cfg.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


TREE_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(config) -> list[int | None]:
    """Per decoder layer of `config` (a model or its config), its attention window W (a query sees
    keys less than W positions back) or None for full causal attention: Mistral's `sliding_window`
    on every layer; Qwen2's (when `use_sliding_window`) and Gemma-3's on the layers whose
    `layer_types` entry is "sliding_attention" (transformers 5 derives it from `max_window_layers`
    and `sliding_window_pattern`)."""
    cfg = _text_config(config)
    w = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        w = None
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types:
        return [w if t == "sliding_attention" else None for t in types]
    if w is not None and getattr(cfg, "max_window_layers", None) is not None:  # Qwen2 before layer_types
        return [w if i >= cfg.max_window_layers else None for i in range(n)]
    return [w] * n


def tree_supported(config) -> str | None:
    """Why tree packing cannot score this model exactly, or None when it can. Full and sliding-window
    attention are honoured (per segment and with dense masks); other layer kinds (chunked attention,
    linear attention, recurrent/state-space layers, ...) would see the packed row as one sequence or
    ignore their own restriction, so they are refused: use packing="padded"."""
    cfg = _text_config(config)
    other = sorted(set(getattr(cfg, "layer_types", None) or ()) - set(TREE_LAYER_TYPES))
    if other:
        return (f"{type(cfg).__name__} has layers of type {', '.join(other)}; tree packing honours "
                f"{' and '.join(TREE_LAYER_TYPES)} only")
    return None


def _effective_windows(windows: list[int | None], longest: int) -> list[int | None]:
    """A window no shorter than the longest path changes nothing: None."""
    return [w if w is not None and w < longest else None for w in windows]


def _dense_masks(batch: PackedBatch, cfg, dtype, device, windows: list[int | None]):
    """The 4-D mask, or {layer type: mask} for a model whose layers differ in window (Qwen2 and
    Gemma-3 take such a dict as `attention_mask`, one entry per `layer_types` value)."""
    if len(set(windows)) == 1:
        return batch.dense_mask(dtype, windows[0]).to(device)
    types = getattr(cfg, "layer_types", None)
    if not types:
        raise ValueError(f"{type(cfg).__name__}: layers differ in attention window but the config has no "
                         "layer_types to key their masks by; use packing='padded' or tree attention (SDPA)")
    by_type = dict(zip(types, windows))
    return {t: batch.dense_mask(dtype, w).to(device) for t, w in by_type.items()}


def check_windows_honoured(layout: TreeLayout, windows: list[int | None], model_name: str) -> None:
    """After a tree-attention forward: every window that matters must have reached the attention
    function as its `sliding_window` (an architecture that applies its window some other way would
    otherwise be scored without it, silently)."""
    missing = {w for w in windows if w is not None} - layout.windows_seen
    if missing:
        raise RuntimeError(f"{model_name} has sliding-window layers (window {sorted(missing)}) but its attention "
                           "did not pass `sliding_window` to tree attention, so the window would be ignored; "
                           "use packing='padded'")


def check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; valid: {', '.join(PACKINGS)}")


def prepare_batch(pairs: list[BuiltPair], views: list[View], *, packing: str = "padded", pad_id: int = 0,
                  pack_tokens: int | None = None) -> PreparedBatch:
    """Token layout of `views` x `pairs` on the CPU (no model needed)."""
    check_packing(packing)
    views = sorted(set(views))
    if packing == "tree":
        return PreparedBatch(packing, views, len(pairs), pack_pairs(pairs, views, pad_id=pad_id, row_tokens=pack_tokens))
    return PreparedBatch(packing, views, len(pairs), collate_views(pairs, views, pad_id))


def score_batch(scorer, prepared: PreparedBatch, *, device=None, mask_dtype: torch.dtype = torch.float32,
                chunk_mb: float | None = None) -> Scores:
    """One forward of `scorer` (a causal LM, or a possibly wrapped `TokenLogps`) over the batch.

    `mask_dtype` is the dtype of the 4-D tree mask (the compute dtype under bf16)."""
    kw = {} if chunk_mb is None else {"chunk_mb": chunk_mb}
    model = as_scorer(scorer, **kw)
    if device is None:
        device = next(model.parameters()).device
    b = prepared.batch
    if isinstance(b, PackedBatch):
        lm = _language_model(model)
        cfg = _text_config(lm)
        reason = tree_supported(cfg)
        if reason:
            raise ValueError(f"packing='tree' cannot score this model: {reason}; use packing='padded'")
        windows = _effective_windows(layer_windows(cfg), int(b.position_ids.max()) + 1)
        layout = None
        if uses_tree_attention(lm):  # attention per segment: no [N, N] mask at all
            layout = TreeLayout(b.segments, b.input_ids.shape[1])
            mask, extra = torch.zeros(b.input_ids.shape[0], 1, 1, 1, device=device, dtype=mask_dtype), {
                "tree_segments": layout}
        else:
            mask, extra = _dense_masks(b, cfg, mask_dtype, device, windows), {}
        per_token = model(b.input_ids.to(device), mask, b.pred_rows.to(device), b.pred_cols.to(device),
                          position_ids=b.position_ids.to(device), targets=b.pred_targets.to(device), **extra)
        if layout is not None:
            check_windows_honoured(layout, windows, type(cfg).__name__)
        per_seq = torch.zeros(len(b.seqs), dtype=per_token.dtype, device=device).index_add(
            0, b.pred_seq.to(device), per_token)
        logps = b.split(per_seq, prepared.views, prepared.num_pairs)
    else:
        assert not b.target_mask[:, 0].any(), "the first token has no prefix to be scored from"
        rows, cols = b.target_mask[:, 1:].nonzero(as_tuple=True)  # position c predicts token c + 1
        rows, cols = rows.to(device), cols.to(device)
        per_token = model(b.input_ids.to(device), b.attention_mask.to(device), rows, cols)
        per_row = torch.zeros(b.input_ids.shape[0], dtype=per_token.dtype, device=device).index_add(0, rows, per_token)
        logps = b.split(per_row)
    lengths = {k: t.to(device) for k, t in prepared.lengths.items()}
    return Scores(logps, lengths, prepared.tokens)


def score_views(scorer, pairs: list[BuiltPair], views: list[View], *, packing: str = "padded", pad_id: int = 0,
                pack_tokens: int | None = None, device=None, mask_dtype: torch.dtype = torch.float32,
                chunk_mb: float | None = None) -> Scores:
    """{view: [B] summed target log-probs}, lengths and token count for `pairs`, in one forward."""
    prepared = prepare_batch(pairs, views, packing=packing, pad_id=pad_id, pack_tokens=pack_tokens)
    return score_batch(scorer, prepared, device=device, mask_dtype=mask_dtype, chunk_mb=chunk_mb)
