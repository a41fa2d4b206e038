"""Attention that follows the prefix tree: each segment attends to its ancestors and causally to
itself, computed per segment, so the cost is per tree (sum over segments of |segment| x |path|),
not (packed row)^2 as with a dense [N, N] mask.

Registered with transformers as the attention implementation "inspo_tree". When a forward carries
`tree_segments` (from `inspo_core.packing`), every layer's attention runs segment by segment with
SDPA on the gathered keys and values of the segment's root path; without it (padded batches,
generation) it is exactly transformers' SDPA attention with the usual mask. Rotary position
embeddings were applied before this function, from the tree's explicit position ids, so each path
sees the positions its padded sequence would have.
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


def tree_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           tree_segments: list[Segment] | None = None, **kwargs):
    """query [R, Hq, N, D], key / value [R, Hkv, N, D] -> ([R, N, Hq, D], None), as transformers'
    attention functions return."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if tree_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    out = query.new_zeros(query.shape)
    for seg in tree_segments:
        cols = torch.cat([seg.path.to(query.device),
                          torch.arange(seg.start, seg.end, device=query.device)])
        q = query[seg.row : seg.row + 1, :, seg.start : seg.end]
        k = key[seg.row : seg.row + 1, :, cols]
        v = value[seg.row : seg.row + 1, :, cols]
        n, a = seg.end - seg.start, len(seg.path)
        # ancestors in full, own segment causally: [n, a + n]
        mask = torch.ones(n, a + n, dtype=torch.bool, device=query.device)
        mask[:, a:] = torch.tril(mask[:, a:])
        out[seg.row : seg.row + 1, :, seg.start : seg.end] = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


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
