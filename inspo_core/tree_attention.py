"""Attention that follows the prefix tree: each segment attends to its ancestors and causally to
itself, computed per segment, so the cost is per tree (sum over segments of |segment| x |path|),
not (packed row)^2 as with a dense [N, N] mask.

Registered with transformers as the attention implementation "inspo_tree". When a forward carries
`tree_segments` (from `inspo_core.packing`), every layer's attention runs segment by segment with
SDPA on the keys and values of the segment's root path; without it (padded batches,
generation) it is exactly transformers' SDPA attention with the usual mask. Rotary position
embeddings were applied before this function, from the tree's explicit position ids, so each path
sees the positions its padded sequence would have.

Sliding-window layers (Mistral, Qwen2's upper layers, Gemma-3's local layers) pass their window as
the `sliding_window` keyword, as they do to every transformers attention function; the window is
over positions on the segment's root path (a query at path position p sees keys at p - W < q <= p,
as transformers' `sliding_window_overlay`), not over packed columns. A root path's positions are
consecutive from 0 (`inspo_core.packing`), so the path index is the position. The windows seen in a
forward are recorded on the layout, so the caller can check that every window in the model's config
was honoured (`inspo_core.scoring.check_windows_honoured`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "inspo_tree"


@dataclass(frozen=True)
class Segment:
    """Columns [start, end) of row `row`; `path` holds the columns of its ancestors (root first),
    which it attends to in full; its own columns it attends to causally."""

    row: int
    start: int
    end: int
    path: torch.Tensor  # [A] long


class TreeLayout:
    """The segments of one packed batch, arranged for attention once per forward (every layer reuses
    it): per row, the split of the N columns into segment pieces (and gaps: padding), each segment's
    ancestors as pieces of its row, and the [n, a + n] masks, built once per shape and device."""

    def __init__(self, segments: list[Segment], n_cols: int | None = None):
        self.segments = segments
        n_cols = n_cols or max(s.end for s in segments)
        self.rows: dict[int, tuple[list[int], list[tuple[int, list[int]]]]] = {}
        by_row: dict[int, list[Segment]] = {}
        for seg in segments:
            by_row.setdefault(seg.row, []).append(seg)
        for r, segs in by_row.items():
            segs.sort(key=lambda s: s.start)
            sizes, piece_at, at = [], {}, 0  # piece lengths covering [0, n_cols); segment start -> piece
            for seg in segs:
                if seg.start < at:
                    raise ValueError(f"tree segments overlap in row {r} at column {seg.start}")
                if seg.start > at:
                    sizes.append(seg.start - at)  # a gap (padding between or before trees)
                piece_at[seg.start] = len(sizes)
                sizes.append(seg.end - seg.start)
                at = seg.end
            if at < n_cols:
                sizes.append(n_cols - at)
            ends = {seg.start: seg.end for seg in segs}
            attn = []  # (piece of the segment, pieces of its ancestors root first)
            for seg in segs:
                anc, cols, c = [], seg.path.tolist(), 0
                while c < len(cols):  # a root path is whole ancestor segments, one after another
                    start = cols[c]
                    if start not in ends or cols[c : c + ends[start] - start] != list(range(start, ends[start])):
                        raise ValueError(f"the path of the segment at row {r}, columns {seg.start}-{seg.end} "
                                         "is not made of whole segments of its row")
                    anc.append(piece_at[start])
                    c += ends[start] - start
                attn.append((piece_at[seg.start], anc))
            self.rows[r] = (sizes, attn)
        self._masks: dict[tuple, torch.Tensor] = {}
        self.windows_seen: set[int | None] = set()  # the `sliding_window` of every layer that ran on this layout

    @staticmethod
    def first_key(a: int, window: int | None) -> int:
        """The first of the a + n path keys any query of the segment can see: with a window W, the
        segment's first query (path position a) sees positions > a - W only."""
        return 0 if window is None else max(0, a - window + 1)

    def mask(self, n: int, a: int, device, window: int | None = None) -> torch.Tensor:
        """[n, a + n - first_key(a, window)] bool: the a ancestor columns in full, the segment's own n
        causally; with a window W, only keys less than W positions back (query at path position a + i,
        key at j: a + i - W < j <= a + i), from `first_key` on."""
        key = (n, a, window, str(device))
        if key not in self._masks:
            m = torch.ones(n, a + n, dtype=torch.bool, device=device)
            m[:, a:] = torch.tril(m[:, a:])
            if window is not None:
                q = torch.arange(a, a + n, device=device)[:, None]
                m &= torch.arange(a + n, device=device)[None, :] > q - window
                m = m[:, self.first_key(a, window):]
            self._masks[key] = m
        return self._masks[key]


def tree_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           tree_segments: list[Segment] | TreeLayout | None = None, **kwargs):
    """query [R, Hq, N, D], key / value [R, Hkv, N, D] -> ([R, N, Hq, D], None), as transformers'
    attention functions return.

    Each row is split into its segments once (`split`, whose backward is one concatenation) and each
    segment's keys and values are its ancestors' pieces and its own, concatenated: nothing is indexed
    by column, so the backward pass writes every gradient once instead of a full-size scatter per
    segment."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if tree_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layout = tree_segments if isinstance(tree_segments, TreeLayout) else TreeLayout(tree_segments, query.shape[2])
    window = kwargs.get("sliding_window")
    layout.windows_seen.add(window)
    groups = getattr(module, "num_key_value_groups", 1)
    R, H, N, D = query.shape
    rows = []
    for r, (q_row, k_row, v_row) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        if r not in layout.rows:  # a row without segments: nothing attends there
            rows.append(query.new_zeros(H, N, D))
            continue
        sizes, attn = layout.rows[r]
        qs, ks, vs = q_row.split(sizes, dim=1), k_row.split(sizes, dim=1), v_row.split(sizes, dim=1)
        outs = [None] * len(sizes)
        for own, anc in attn:
            k = torch.cat([ks[i] for i in anc] + [ks[own]], dim=1) if anc else ks[own]
            v = torch.cat([vs[i] for i in anc] + [vs[own]], dim=1) if anc else vs[own]
            n = sizes[own]
            a = k.shape[1] - n
            lo = layout.first_key(a, window)  # keys before it are outside every query's window
            outs[own] = F.scaled_dot_product_attention(
                qs[own][None], k[None, :, lo:], v[None, :, lo:], attn_mask=layout.mask(n, a, query.device, window),
                dropout_p=dropout, scale=scaling, enable_gqa=groups > 1)[0]
        outs = [o if o is not None else query.new_zeros(H, sizes[i], D) for i, o in enumerate(outs)]
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make "inspo_tree" a transformers attention implementation (its masks: SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, tree_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_tree_attention(model) -> bool:
    """Switch `model` (a transformers model, or a peft model around one) to "inspo_tree" when its
    implementation is SDPA; returns whether it did. Models on another implementation keep it, and tree
    packing then uses a dense 4-D mask instead."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    base.set_attn_implementation(NAME)
    return True


def uses_tree_attention(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == NAME
