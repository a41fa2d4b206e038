"""Prefix-tree packing: every view of a pair from one forward over a tree of segments.

The tree of one pair has the prompt x at the root; its children are the plain targets (y_w, y_l)
and the rendered contexts (y_l as alternative, y_w as alternative); each context has the targets
that follow it as children. With `context_format=raw` and an uncut alternative the context *is*
the plain target, so the two merge: `[x | y_l | y_w | y_w after y_l | y_l after y_w]`. A token
attends to its own segment up to itself and to all ancestor segments (a 4-D mask); position ids
continue from the parent, so each root-to-leaf path reproduces the padded sequence exactly.
Several trees share a row (block-diagonal masks), so no compute is spent on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inspo_core.conditioning import BuiltPair
from inspo_core.strategies import View
from inspo_core.tree_attention import Segment

Tensor = torch.Tensor


@dataclass
class _Segment:
    tokens: list[int]
    parent: int | None  # index into the tree's segment list
    view: View | None = None  # set when this segment is a scored target
    n_scored: int = 0
    span: tuple[int, int] = (0, 0)  # its columns in the packed row, once packed


def build_tree(pair: BuiltPair, views: list[View]) -> list[_Segment]:
    """Segments in packing order (parents first)."""
    segs = [_Segment(pair.prompt_ids, None)]
    node: dict[tuple, int] = {}  # (kind, name) -> segment index

    def context_node(alt: str) -> int:
        ctx = pair.contexts[alt]
        if ("plain", alt) in node and segs[node[("plain", alt)]].tokens == ctx:
            return node[("plain", alt)]  # raw rendering: the plain target doubles as the context
        if ("ctx", alt) not in node:
            segs.append(_Segment(ctx, 0))
            node[("ctx", alt)] = len(segs) - 1
        return node[("ctx", alt)]

    for v in sorted(views, key=lambda v: v.context is not None):  # plain targets first, so contexts can reuse them
        parent = 0 if v.context is None else context_node(v.context)
        segs.append(_Segment(pair.targets[v.target], parent, v, pair.loss_lengths[v.target]))
        if v.context is None:
            node[("plain", v.target)] = len(segs) - 1
    return segs


@dataclass
class PackedBatch:
    """Rows of packed trees. input_ids, position_ids: [R, N]; pred_rows / pred_cols / pred_targets /
    pred_seq: [M] scored tokens: the position predicting each, the token, and the index of its (pair,
    view) in `seqs`; `segments`: every non-empty segment with the columns of its root path (what tree
    attention computes). `dense_mask()` is the equivalent [R, 1, N, N] mask for attention
    implementations that need one."""

    input_ids: Tensor
    position_ids: Tensor
    pred_rows: Tensor
    pred_cols: Tensor
    pred_targets: Tensor
    pred_seq: Tensor
    seqs: list[tuple[int, View]]  # (pair index in the batch, view)
    lengths: dict[str, Tensor]
    tokens: int  # real (non-padding) tokens
    segments: list[Segment]
    row_fill: list[int]  # real tokens at the start of each row; the rest is padding

    def split(self, per_seq: Tensor, views: list[View], num_pairs: int) -> dict[View, Tensor]:
        out = {v: per_seq.new_zeros(num_pairs) for v in views}
        for k, (i, v) in enumerate(self.seqs):
            out[v][i] = per_seq[k]
        return out

    def dense_mask(self, dtype: torch.dtype = torch.float32, window: int | None = None) -> Tensor:
        """[R, 1, N, N]: 0 where a token may attend, -inf elsewhere (each segment to its root path and
        causally to itself). Padding after the last tree attends to itself only: a query with every key
        masked gives NaN in some SDPA kernels (CUDA memory-efficient), which would poison gradients.

        With a sliding `window` W (the mask of a sliding-window layer), a query also sees only keys
        less than W *positions* back on its path (position ids, not columns: in a packed row the
        columns of a path are not contiguous), as transformers' `sliding_window_overlay`."""
        R, N = self.input_ids.shape
        allowed = torch.zeros((R, N, N), dtype=torch.bool)
        for seg in self.segments:
            a, b = seg.start, seg.end
            allowed[seg.row, a:b, seg.path] = True
            allowed[seg.row, a:b, a:b] = torch.tril(torch.ones(b - a, b - a, dtype=torch.bool))
        if window is not None:
            pos = self.position_ids
            allowed &= pos[:, None, :] > pos[:, :, None] - window  # [R, query, key]
        for r, used in enumerate(self.row_fill):
            pad = torch.arange(used, N)
            allowed[r, pad, pad] = True
        return torch.zeros((R, 1, N, N), dtype=dtype).masked_fill_(~allowed[:, None], float("-inf"))


def pack_pairs(pairs: list[BuiltPair], views: list[View], *, pad_id: int = 0, row_tokens: int | None = None) -> PackedBatch:
    """Pack the trees of `pairs` into rows of at most `row_tokens` tokens (first fit, in order).

    The default budget is the largest tree, so small trees share rows and padding stays small; a tree
    longer than `row_tokens` gets a row of its own. With tree attention the cost is per segment, so
    sharing a row costs nothing; with a dense mask a row costs (row length)^2."""
    trees = [build_tree(p, views) for p in pairs]
    sizes = [sum(len(s.tokens) for s in t) for t in trees]
    limit = row_tokens or max(sizes)
    rows: list[list[int]] = []
    fill: list[int] = []
    for i, n in enumerate(sizes):
        for r, used in enumerate(fill):
            if used + n <= limit:
                rows[r].append(i)
                fill[r] += n
                break
        else:
            rows.append([i])
            fill.append(n)
    N = max(fill)
    R = len(rows)
    input_ids = torch.full((R, N), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, N), dtype=torch.long)
    pr, pc, pt, ps, seqs, segments = [], [], [], [], [], []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            # per segment: its columns, the columns of its root path, the position after it, and the last
            # real column on its path (an empty segment, e.g. a raw context cut to nothing, has none)
            cols: list[list[int]] = []
            pos_end, last_col = [], []
            for s in trees[i]:
                a, b = at, at + len(s.tokens)
                p0 = 0 if s.parent is None else pos_end[s.parent]
                input_ids[r, a:b] = torch.tensor(s.tokens, dtype=torch.long)
                position_ids[r, a:b] = torch.arange(p0, p0 + len(s.tokens))
                path = [] if s.parent is None else cols[s.parent] + list(range(*trees[i][s.parent].span))
                cols.append(path)
                if b > a:
                    segments.append(Segment(r, a, b, torch.tensor(path, dtype=torch.long)))
                if s.view is not None:
                    k = len(seqs)
                    seqs.append((i, s.view))
                    for t in range(s.n_scored):
                        pr.append(r)
                        pc.append(a + t - 1 if t > 0 else last_col[s.parent])  # the previous token on the path
                        pt.append(s.tokens[t])
                        ps.append(k)
                pos_end.append(p0 + len(s.tokens))
                last_col.append(b - 1 if b > a else (last_col[s.parent] if s.parent is not None else -1))
                s.span = (a, b)
                at = b
    lengths = {r: torch.tensor([p.loss_lengths[r] for p in pairs], dtype=torch.long)
               for r in ("chosen", "rejected") if all(r in p.loss_lengths for p in pairs)}
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedBatch(input_ids, position_ids, as_long(pr), as_long(pc), as_long(pt), as_long(ps), seqs, lengths,
                       sum(sizes), segments, fill)

