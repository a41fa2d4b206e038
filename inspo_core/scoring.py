"""The one scoring path: summed target log-probs of a list of views for a batch of pairs.

The trainer, the reference cache, evaluation of validation pairs and the benchmark all call
`score_views` (or its two halves, `prepare_batch` then `score_batch`, when a caller wants to build
the batch once and time only the forward). The packing decides the layout:

- `padded`: one row per (view, pair), right-padded; the attention mask comes from lengths;
- `tree`: every view of a pair in one prefix tree (`inspo_core.packing`), several trees per row.

Both give the same numbers (tests, to 1e-5). Log-probs are always *sums* over the target tokens;
length normalisation is the objective's business (`preference_loss(length_normalize=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inspo_core.conditioning import BuiltPair, ViewBatch, collate_views
from inspo_core.logps import as_scorer
from inspo_core.packing import PackedBatch, pack_pairs
from inspo_core.strategies import View
from inspo_core.tree_attention import TreeLayout, uses_tree_attention

Tensor = torch.Tensor
PACKINGS = ("padded", "tree")


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
        if uses_tree_attention(_language_model(model)):  # attention per segment: no [N, N] mask at all
            mask, extra = torch.zeros(b.input_ids.shape[0], 1, 1, 1, device=device, dtype=mask_dtype), {
                "tree_segments": TreeLayout(b.segments, b.input_ids.shape[1])}
        else:
            mask, extra = b.dense_mask(mask_dtype).to(device), {}
        per_token = model(b.input_ids.to(device), mask, b.pred_rows.to(device), b.pred_cols.to(device),
                          position_ids=b.position_ids.to(device), targets=b.pred_targets.to(device), **extra)
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
