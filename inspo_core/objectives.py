"""Preference objectives as pure functions of per-sequence log-probs (paper Table 1).

Every objective takes summed target log-probs of the policy (`chosen_logps`, `rejected_logps`,
[B]), the reference's (`ref_chosen_logps`, `ref_rejected_logps`, [B]; ignored by reference-free
objectives) and the target token counts (`chosen_lengths`, `rejected_lengths`, [B]). It returns
per-example losses and detached implicit rewards; the trainer reduces.

Which log-probs are passed decides plain vs InSPO training: with `chosen_logps = log pi(y_w|x, y_l)`
and `rejected_logps = log pi(y_l|x, y_w)` every formula below is its Table 1 "INS" row. The
strategies in `inspo_core.strategies` do that selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from inspo_core.names import (  # noqa: F401  (re-exported: the rules live with the names)
    HPARAM_NAMES, OBJECTIVE_SPECS, ObjectiveSpec, check_length_normalize, resolve_hparams,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossOutput:
    """Per-example results, each [B]. Rewards are detached (for logging and accuracy only)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass(frozen=True)
class Objective(ObjectiveSpec):
    """An `inspo_core.names.ObjectiveSpec` (name, hyperparameters, rules) with its loss function."""

    fn: Callable[..., LossOutput] | None = None


def _ratio_margin(c, r, rc, rr):
    """log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), [B]."""
    return (c - rc) - (r - rr)


def _dpo(c, r, rc, rr, lc, lr, *, beta, label_smoothing):
    # Table 1, DPO: -log sigma(beta * margin). label_smoothing eps > 0 is conservative DPO
    # (Mitchell 2023): the label is flipped with probability eps.
    logits = beta * _ratio_margin(c, r, rc, rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, (beta * (c - rc)).detach(), (beta * (r - rr)).detach())


def _robust(c, r, rc, rr, lc, lr, *, beta, label_smoothing):
    # Robust DPO (Chowdhury et al. 2024, eq. 8): unbiased under label-flip rate eps.
    assert label_smoothing < 0.5
    logits = beta * _ratio_margin(c, r, rc, rr)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossOutput(losses, (beta * (c - rc)).detach(), (beta * (r - rr)).detach())


def _ipo(c, r, rc, rr, lc, lr, *, beta, tau):
    # Table 1, IPO: (margin - 1/(2 tau))^2 on summed log-ratios. beta only scales the logged rewards.
    losses = (_ratio_margin(c, r, rc, rr) - 1 / (2 * tau)) ** 2
    return LossOutput(losses, (beta * (c - rc)).detach(), (beta * (r - rr)).detach())


def _rdpo(c, r, rc, rr, lc, lr, *, beta, alpha):
    # Table 1, R-DPO: -log sigma(beta * margin + alpha (|y_w| - |y_l|)).
    logits = beta * _ratio_margin(c, r, rc, rr) + alpha * (lc - lr)
    return LossOutput(-F.logsigmoid(logits), (beta * (c - rc)).detach(), (beta * (r - rr)).detach())


def _hinge(c, r, rc, rr, lc, lr, *, beta):
    # SLiC-style hinge on the DPO margin (Liu et al. 2024, RSO): max(0, 1 - beta * margin).
    losses = torch.relu(1 - beta * _ratio_margin(c, r, rc, rr))
    return LossOutput(losses, (beta * (c - rc)).detach(), (beta * (r - rr)).detach())


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (x is clamped below 0)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _orpo(c, r, rc, rr, lc, lr, *, beta, lam):
    # Table 1, ORPO: -log p(y_w) - lam * log sigma(logit p(y_w) - logit p(y_l)),
    # p(y) = exp(log pi(y) / |y|) (length-normalised likelihood).
    pc, pr = c / lc, r / lr
    log_odds = (pc - _log1mexp(pc)) - (pr - _log1mexp(pr))
    losses = -pc - lam * F.logsigmoid(log_odds)
    return LossOutput(losses, (beta * pc).detach(), (beta * pr).detach())


def _simpo(c, r, rc, rr, lc, lr, *, beta, gamma):
    # Table 1, SimPO: -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma).
    cw, cl = beta * c / lc, beta * r / lr
    return LossOutput(-F.logsigmoid(cw - cl - gamma), cw.detach(), cl.detach())


def _cpo(c, r, rc, rr, lc, lr, *, beta, lam):
    # CPO (Xu et al. 2024, eq. 6): -log sigma(beta log pi(y_w) - beta log pi(y_l)) + lam * NLL(y_w).
    # The NLL term is per token, as in the authors' implementation (mean cross-entropy).
    cw, cl = beta * c, beta * r
    losses = -F.logsigmoid(cw - cl) - lam * c / lc
    return LossOutput(losses, cw.detach(), cl.detach())


def _slic(c, r, rc, rr, lc, lr, *, beta, gamma, lam):
    # SLiC-HF (Zhao et al. 2023, eq. 3): max(0, gamma - log pi(y_w) + log pi(y_l)) - lam log pi(y_w),
    # with gamma the calibration margin (delta in the paper); NLL per token as in CPO.
    losses = torch.relu(gamma - c + r) - lam * c / lc
    return LossOutput(losses, (beta * c).detach(), (beta * r).detach())


def _rrhf(c, r, rc, rr, lc, lr, *, beta, lam):
    # RRHF (Yuan et al. 2023, eqs. 2-4) for two responses: ranking hinge on length-normalised
    # log-probs, max(0, p(y_l) - p(y_w)), plus lam * NLL(y_w) per token.
    pc, pr = c / lc, r / lr
    losses = torch.relu(pr - pc) - lam * pc
    return LossOutput(losses, (beta * pc).detach(), (beta * pr).detach())


# KTO with InSPO. The strategies feed KTO the same views as every other objective: under
# `symmetric` the desirable term's reward is r_w = log pi(y_w|x, y_l) - log pi_ref(y_w|x) and the
# undesirable term's r_l = log pi(y_l|x, y_w) - log pi_ref(y_l|x); `one_sided` conditions only y_w.
# z_ref is estimated from the *same* views the term compares against it (conditioned under INS),
# not from plain ones: z is the reference point of one implicit reward, and with a plain
# reference the conditioned log-ratios carry the reflection gain log pi(y|x,y_alt) - log pi(y|x)
# as an offset already at initialisation (pi = pi_ref). A z from plain views would sit near 0
# while r_w and r_l sit near that gain, so sigma(beta (r_w - z)) and sigma(beta (z - r_l)) would
# start unbalanced (one term saturated, the other not) for a reason unrelated to preference;
# from the same views the offset cancels, as it does in a DPO margin.


def kto_reference_point(logratios: Tensor) -> Tensor:
    """KTO's z_ref (Ethayarajh et al. 2024, sec. 4, its estimate of the KL term): max(0, mean of
    log pi/pi_ref), a detached scalar.

    `logratios` [M] are log pi(y'|x) - log pi_ref(y'|x) of the sequences the estimate uses: KTO's
    mismatched pairs (y' from another example of the batch, as TRL's KTOTrainer builds them by
    rotating completions by one), or, when the caller has no mismatched pass, the batch's own
    desirable and undesirable log-ratios."""
    assert logratios.numel() > 0, "KTO's reference point needs at least one log-ratio"
    return logratios.detach().mean().clamp(min=0)


def _kto(c, r, rc, rr, lc, lr, *, beta, lambda_d, lambda_u, kl_logratios=None):
    # KTO (Ethayarajh et al. 2024, the KTO loss of sec. 4; TRL cites it as eq. 7) on paired data: each
    # pair is one desirable (y_w) and one undesirable (y_l) example. r = log pi/pi_ref; z = max(0, KL
    # estimate), batch-level, detached; desirable loss lambda_D (1 - sigma(beta (r_w - z))), undesirable
    # lambda_U (1 - sigma(beta (z - r_l))).
    # The per-pair loss is the mean of its two examples, so the batch mean equals KTO's expectation
    # over all 2B examples (and TRL's mean over its concatenated desirable + undesirable losses).
    rw, rl = c - rc, r - rr
    z = kto_reference_point(torch.cat([rw, rl]) if kl_logratios is None else kl_logratios)
    desirable = lambda_d * (1 - torch.sigmoid(beta * (rw - z)))
    undesirable = lambda_u * (1 - torch.sigmoid(beta * (z - rl)))
    return LossOutput(0.5 * (desirable + undesirable), (beta * rw).detach(), (beta * rl).detach())


_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": _dpo, "ipo": _ipo, "rdpo": _rdpo, "orpo": _orpo, "simpo": _simpo, "cpo": _cpo, "slic": _slic,
    "rrhf": _rrhf, "hinge": _hinge, "robust": _robust, "kto": _kto,
}
OBJECTIVES: dict[str, Objective] = {
    name: Objective(**vars(spec), fn=_LOSSES[name])
    for name, spec in OBJECTIVE_SPECS.items()
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def preference_loss(
    name: str,
    *,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    length_normalize: bool = False,
    kl_logratios: Tensor | None = None,
    **hparams: float,
) -> LossOutput:
    """Per-example loss of objective `name`. All tensors [B]: *summed* target log-probs, and target
    token counts as lengths.

    `kl_logratios` [M] (KTO only): log pi(y'|x) - log pi_ref(y'|x) of mismatched pairs, from which
    z_ref is estimated as KTO does; without it KTO uses the batch's own 2B log-ratios.

    `length_normalize` feeds per-token mean log-probs (policy and reference, eq. 12/13) to an
    objective whose formula is on sums (dpo, ipo, rdpo, hinge, robust). Objectives that normalise
    by |y| themselves refuse it, so nothing is ever divided twice. Reference-free objectives
    ignore the reference inputs (they may be None).
    """
    obj = get_objective(name)
    hp = resolve_hparams(name, hparams)
    check_length_normalize(name, length_normalize)
    if kl_logratios is not None and length_normalize:
        raise ValueError("kl_logratios with length_normalize=true: the mismatched log-ratios are sums and the "
                         "rewards would be per-token means; pass one or the other")
    if obj.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"objective {name!r} needs ref_chosen_logps and ref_rejected_logps")
    else:
        ref_chosen_logps = ref_rejected_logps = None
    if chosen_lengths is None or rejected_lengths is None:
        if obj.needs_lengths or length_normalize:
            raise ValueError(f"objective {name!r} needs chosen_lengths and rejected_lengths")
        chosen_lengths = rejected_lengths = torch.ones_like(chosen_logps)
    if kl_logratios is not None and not obj.batch_reference_point:
        with_z = ", ".join(n for n, o in OBJECTIVES.items() if o.batch_reference_point)
        raise ValueError(f"kl_logratios given to objective {name!r}, which has no reference point z_ref; "
                         f"drop it (it applies to: {with_z})")
    return apply_objective(obj, hp, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                           chosen_lengths, rejected_lengths, length_normalize=length_normalize,
                           kl_logratios=kl_logratios)


def apply_objective(obj: Objective, hp: dict[str, float], c: Tensor, r: Tensor, rc: Tensor | None,
                    rr: Tensor | None, lc: Tensor, lr: Tensor, *, length_normalize: bool = False,
                    kl_logratios: Tensor | None = None) -> LossOutput:
    """`obj` on already validated inputs (see `preference_loss`): no name lookups, for hot loops.
    A None reference (reference-free objectives) is zeros. `kl_logratios` [M] reaches only objectives
    with a batch reference point (KTO), which then estimate z_ref from it."""
    if rc is None or rr is None:
        rc = rr = torch.zeros_like(c)
    lc, lr = lc.to(c.dtype), lr.to(c.dtype)
    if length_normalize:  # eq. 13: (1/|y|) log pi(y|.)
        c, r, rc, rr = c / lc, r / lr, rc / lc, rr / lr
    if obj.batch_reference_point and kl_logratios is not None:
        return obj.fn(c, r, rc, rr, lc, lr, kl_logratios=kl_logratios, **hp)
    return obj.fn(c, r, rc, rr, lc, lr, **hp)
