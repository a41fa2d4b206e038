"""Per-sequence log-probs from a causal LM without materialising [B, T, V] logits.

The decoder body runs once; only the hidden states at positions that predict a scored token are
kept ([N, H]); the LM head and log-softmax then run over chunks of those N positions, each chunk
under activation checkpointing, so the fp32 logits alive at any time are [chunk, V] in the forward
and in the backward. A head that is not trained (LoRA) is not checkpointed: its input gradient is formed
in the forward while the chunk's logits exist (`_FrozenHeadLogps`), so its backward runs no head.
`method="full"` is the obvious implementation, kept as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


Tensor = torch.Tensor
DEFAULT_CHUNK_MB = 256


@dataclass
class SequenceLogps:
    sum: Tensor  # [R] summed log-probs of the scored tokens
    count: Tensor  # [R] number of scored tokens

    @property
    def mean(self) -> Tensor:
        """Eq. 13: length-normalised log-prob."""
        return self.sum / self.count.clamp(min=1)


def split_model(lm):
    """(decoder body, LM head module, final logit softcap or None) of a transformers causal LM."""
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or head is None or body is lm:
        raise ValueError(
            f"{type(lm).__name__} does not expose its decoder and LM head (get_decoder / "
            "get_output_embeddings); use method='full'"
        )
    softcap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    return body, head, softcap


def chunk_size_for(vocab_size: int, budget_mb: float = DEFAULT_CHUNK_MB) -> int:
    """Positions per chunk so one fp32 [chunk, V] logits block fits in `budget_mb`."""
    return max(1, int(budget_mb * 2**20) // (4 * vocab_size))


def _head_logps(head, softcap, hidden: Tensor, targets: Tensor) -> Tensor:
    """[n, H], [n] -> [n] log-softmax of the head's logits at the targets, in fp32."""
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    # log_softmax is one fused kernel forward and backward; logsumexp is a chain of five (amax, sub, exp,
    # sum, log) whose backward recomputes exp: about twice as slow on CPU at a 32k vocabulary
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """log-softmax(h W^T + b)[t] for a head that is not trained, its gradient formed in the forward.

    d logp_i / d h_i = (onehot(t_i) - softmax_i) W: an [n, H] block computed while the [n, V] logits exist,
    so the backward is one multiply by the incoming gradient. Under checkpointing the backward would run the
    head again (logits, log-softmax) and then its input gradient: three [n, H] x [H, V] products per chunk
    where this does two, and no [n, V] tensor is kept."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor) -> Tensor:
        logits = torch.nn.functional.linear(h, weight, bias).float()
        logp = logits.log_softmax(-1)
        out = logp.gather(-1, t[:, None]).squeeze(-1)
        basis = logp.exp_().neg_()  # -softmax, in place of the log-softmax
        basis.scatter_add_(-1, t[:, None], torch.ones_like(out)[:, None])
        ctx.save_for_backward(basis.to(weight.dtype) @ weight)  # [n, H]
        ctx.h_dtype = h.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (basis,) = ctx.saved_tensors
        return (grad[:, None].to(basis.dtype) * basis).to(ctx.h_dtype), None, None, None


def _frozen_plain_head(head) -> bool:
    """A linear head whose weights are not trained, held whole (not a DTensor shard, not a ZeRO-3
    placeholder): the case `_FrozenHeadLogps` covers (LoRA, whose adapters leave the head alone)."""
    w = getattr(head, "weight", None)
    b = getattr(head, "bias", None)
    return (type(head) is nn.Linear and w is not None and not w.requires_grad
            and (b is None or not b.requires_grad) and type(w) in (torch.Tensor, nn.Parameter)
            and not hasattr(w, "ds_id") and w.dim() == 2 and w.numel() > 0)


def chunked_head_logps(head, hidden: Tensor, targets: Tensor, chunk: int, softcap=None, fused: bool = True) -> Tensor:
    """[N, H], [N] -> [N]; peak logits memory is one [chunk, V] block forward and backward. A frozen plain
    head (no softcap) forms its input gradient in the forward (`_FrozenHeadLogps`; `fused=False` keeps
    checkpointing, the reference); any other head is checkpointed and runs again in the backward."""
    outs = []
    use_fused = fused and softcap is None and _frozen_plain_head(head)
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled() and use_fused and h.requires_grad:
            outs.append(_FrozenHeadLogps.apply(h, head.weight, head.bias, t))
        elif torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            outs.append(checkpoint(_head_logps, head, softcap, h, t, use_reentrant=False))
        else:
            outs.append(_head_logps(head, softcap, h, t))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


class TokenLogps(nn.Module):
    """Wraps a causal LM; forward returns per-token log-probs of selected positions.

    This is the module the trainer hands to accelerate (DDP / FSDP2 / ZeRO-3), so gradient
    synchronisation and parameter gathering happen in its forward as for any model. `lm` is the
    transformers model (or peft model) itself: save it, not the wrapper.
    """

    def __init__(self, lm: nn.Module, method: str = "chunked", chunk_mb: float = DEFAULT_CHUNK_MB,
                 fused_head: bool = True):
        super().__init__()
        if method not in ("chunked", "full"):
            raise ValueError(f"unknown log-prob method {method!r}; valid: chunked, full")
        self.lm, self.method, self.chunk_mb, self.fused_head = lm, method, chunk_mb, fused_head
        # FSDP auto-wrapping reads the layer classes to shard from the top-level module
        self._no_split_modules = getattr(lm, "_no_split_modules", None)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        predict_rows: Tensor,
        predict_cols: Tensor,
        position_ids: Tensor | None = None,
        targets: Tensor | None = None,
        tree_segments: list | None = None,
    ) -> Tensor:
        """Log-prob of the token that follows position (r, c) for each (r, c): [N] fp32.

        input_ids: [R, T]; attention_mask: [R, T] (or a 4-D float mask [R, 1, T, T] for tree
        packing); predict_rows / predict_cols: [N] positions whose next token is scored;
        targets: [N] those tokens, default input_ids[r, c + 1] (tree packing passes its own, since
        in a tree the next token on a path need not be the next column); tree_segments: the packed
        trees' segments, for models on tree attention (`inspo_core.tree_attention`).
        """
        extra = {} if tree_segments is None else {"tree_segments": tree_segments}
        if targets is None:
            targets = input_ids[predict_rows, predict_cols + 1]
        if self.method == "full":
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra)
            logp = out.logits.float().log_softmax(-1)
            return logp[predict_rows, predict_cols].gather(-1, targets[:, None]).squeeze(-1)
        body, head, softcap = split_model(self.lm)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **extra)
        picked = hidden.last_hidden_state[predict_rows, predict_cols]  # [N, H]
        chunk = chunk_size_for(head.weight.shape[0], self.chunk_mb)
        return chunked_head_logps(head, picked, targets, chunk, softcap, fused=self.fused_head)


def as_scorer(model, **kw) -> nn.Module:
    """`model` if it is (a wrapper of) a TokenLogps, else a TokenLogps around it."""
    inner = getattr(model, "module", model)
    return model if isinstance(inner, TokenLogps) else TokenLogps(model, **kw)


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, **kw) -> SequenceLogps:
    """Summed log-probs of the tokens marked in `target_mask` ([R, T] bool), per row: [R].

    `model` is a causal LM or a (wrapped) TokenLogps; `kw` go to TokenLogps (method, chunk_mb).
    """
    assert not target_mask[:, 0].any(), "the first token has no prefix to be scored from"
    rows, cols = target_mask[:, 1:].nonzero(as_tuple=True)  # position c predicts token c + 1
    per_token = as_scorer(model, **kw)(input_ids, attention_mask, rows, cols)
    R = input_ids.shape[0]
    total = torch.zeros(R, dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
    count = target_mask.sum(1)
    return SequenceLogps(total, count)
