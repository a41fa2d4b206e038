"""Conditioning strategies: which log-probs feed the objective (paper Sec. 5.3, Table 4).

A *view* is one log-prob of a target response, either plain (log pi(y | x)) or conditioned on an
alternative (log pi(y | x, y_alt)). A strategy is a weighted sum of objective terms, each term
naming the view used for the chosen and for the rejected response.

One strategy is not a preference loss: `distill` (issue 21, context distillation) imitates its
`chosen` column, -log pi(y | x), on data whose chosen response is a sample of a conditioned teacher
pi_T(. | x, y') and whose rejected response is the draft y' the teacher saw (`workbench.distill`).
With y ~ pi_T that is the sequence-level forward KL(sg pi_T(.|x, y') || pi(.|x)) up to the teacher's
entropy, a constant; the draft is scored for the logs only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inspo_core.names import REF_CONDITIONING, STRATEGY_SPECS, StrategySpec  # noqa: F401  (REF_CONDITIONING re-exported)
from inspo_core.objectives import (
    LossOutput, Objective, apply_objective, check_length_normalize, get_objective, resolve_hparams,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class View:
    """log pi(target | x[, context]); target and context are "chosen" or "rejected"."""

    target: str
    context: str | None = None

    @property
    def key(self) -> str:
        return self.target if self.context is None else f"{self.target}|{self.context}"

    @property
    def plain(self) -> "View":
        return View(self.target)

    def __str__(self) -> str:
        return self.key

    def __lt__(self, other: "View") -> bool:  # a stable order for row layout and cache keys
        return self.key < other.key


W_PLAIN = View("chosen")  # log pi(y_w | x)
L_PLAIN = View("rejected")  # log pi(y_l | x)
W_GIVEN_L = View("chosen", "rejected")  # log pi(y_w | x, y_l)
L_GIVEN_W = View("rejected", "chosen")  # log pi(y_l | x, y_w)
L_GIVEN_L = View("rejected", "rejected")  # log pi(y_l | x, y_l), Table 4's literal one-sided formula


@dataclass(frozen=True)
class Strategy(StrategySpec):
    """An `inspo_core.names.StrategySpec` with the views its loss terms compare."""

    def terms(self, w: float = 0.5) -> list[tuple[float, View, View]]:
        """[(weight, chosen view, rejected view)] whose weighted losses are summed."""
        return _TERMS[self.name](w)


_TERMS = {
    "none": lambda w: [(1.0, W_PLAIN, L_PLAIN)],
    "symmetric": lambda w: [(1.0, W_GIVEN_L, L_GIVEN_W)],  # eq. 10 / eq. 16
    "one_sided": lambda w: [(1.0, W_GIVEN_L, L_PLAIN)],
    "one_sided_paper": lambda w: [(1.0, W_GIVEN_L, L_GIVEN_L)],  # Table 4 (ii) as printed
    "averaged": lambda w: [(1.0 - w, W_PLAIN, L_PLAIN), (w, W_GIVEN_L, L_GIVEN_W)],  # Table 4 (iv)
    "distill": lambda w: [(1.0, W_PLAIN, L_PLAIN)],  # -log pi(y_teacher | x); the draft's view for the logs
}

STRATEGIES: dict[str, Strategy] = {
    name: Strategy(**vars(spec))
    for name, spec in STRATEGY_SPECS.items()
}
assert set(STRATEGIES) == set(_TERMS), "every strategy needs its terms"


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def check_ref_conditioning(ref_conditioning: str) -> None:
    if ref_conditioning not in REF_CONDITIONING:
        raise ValueError(
            f"unknown ref_conditioning {ref_conditioning!r}; valid: {', '.join(REF_CONDITIONING)}"
        )


def ref_view(view: View, ref_conditioning: str) -> View:
    """The reference log-prob paired with policy `view`: plain pi_ref(y|x) unless 'conditioned'."""
    return view if ref_conditioning == "conditioned" else view.plain


def required_views(
    strategy: str, objective: str, ref_conditioning: str = "plain", w: float = 0.5
) -> tuple[list[View], list[View]]:
    """(policy views, reference views) a strategy x objective needs, sorted, without repeats."""
    m = resolve_method(objective, strategy, w=w, ref_conditioning=ref_conditioning)
    return m.policy_views, m.ref_views


def strategy_views(strategy: str, w: float = 0.5) -> set[View]:
    return {v for wt, c, r in get_strategy(strategy).terms(w) if wt != 0 for v in (c, r)}


@dataclass(frozen=True)
class Method:
    """An objective x strategy resolved once: validated hyperparameters, the weighted terms that
    count (zero weights dropped), the views the policy and the reference must score, and the term
    whose views are logged as `logps/chosen` / `logps/rejected`. Built by `resolve_method`; the
    training loop calls `loss` on every micro-batch without looking names up again."""

    objective: Objective
    strategy: Strategy
    hparams: dict[str, float]
    terms: tuple[tuple[float, View, View], ...]
    ref_conditioning: str = "plain"
    length_normalize: bool = False

    @property
    def policy_views(self) -> list[View]:
        return sorted({v for _, c, r in self.terms for v in (c, r)})

    @property
    def ref_views(self) -> list[View]:
        if not self.objective.needs_reference:  # `distill` keeps its objective's (unused, computed once, cached)
            return []
        return sorted({ref_view(v, self.ref_conditioning) for v in self.policy_views})

    @property
    def main_views(self) -> tuple[View, View]:
        """(chosen, rejected) views of the last term that counts: the strategy's own (conditioned
        where it conditions)."""
        _, c, r = self.terms[-1]
        return c, r

    @property
    def conditioned(self) -> bool:
        return any(v.context for v in self.policy_views)

    def loss(self, policy_logps: dict[View, Tensor], ref_logps: dict[View, Tensor] | None,
             lengths: dict[str, Tensor]) -> LossOutput:
        """Weighted sum over the terms of the objective. All [B]; log-probs are sums over the target."""
        total: LossOutput | None = None
        lc, lr = lengths["chosen"], lengths["rejected"]
        for weight, cv, rv in self.terms:
            if self.strategy.imitate:  # forward KL from the teacher that sampled the chosen, sequence level
                c = policy_logps[cv]
                out = LossOutput(-c, c.detach(), policy_logps[rv].detach())  # "rewards": the two log-probs
            else:
                rc = rr = None
                if self.objective.needs_reference:
                    assert ref_logps is not None, "reference log-probs missing"
                    rc = ref_logps[ref_view(cv, self.ref_conditioning)]
                    rr = ref_logps[ref_view(rv, self.ref_conditioning)]
                out = apply_objective(self.objective, self.hparams, policy_logps[cv], policy_logps[rv], rc, rr, lc,
                                      lr, length_normalize=self.length_normalize)
            scaled = LossOutput(weight * out.losses, weight * out.chosen_rewards, weight * out.rejected_rewards)
            total = scaled if total is None else LossOutput(
                total.losses + scaled.losses,
                total.chosen_rewards + scaled.chosen_rewards,
                total.rejected_rewards + scaled.rejected_rewards,
            )
        assert total is not None
        return total


def resolve_method(objective: str, strategy: str, *, w: float = 0.5, ref_conditioning: str = "plain",
                   length_normalize: bool = False, **hparams: float) -> Method:
    """Validate names and hyperparameters once; ValueError names what is wrong and the valid values."""
    obj = get_objective(objective)
    strat = get_strategy(strategy)
    check_ref_conditioning(ref_conditioning)
    check_length_normalize(objective, length_normalize)
    if not 0 <= w <= 1:
        raise ValueError(f"w={w} must be in [0, 1]")
    terms = tuple((float(wt), c, r) for wt, c, r in strat.terms(w) if wt != 0)
    assert terms, f"strategy {strategy!r} with w={w} has no term"
    return Method(obj, strat, resolve_hparams(objective, hparams), terms, ref_conditioning, length_normalize)


def strategy_loss(
    objective: str,
    strategy: str,
    *,
    policy_logps: dict[View, Tensor],
    ref_logps: dict[View, Tensor] | None,
    lengths: dict[str, Tensor],
    ref_conditioning: str = "plain",
    w: float = 0.5,
    length_normalize: bool = False,
    **hparams: float,
) -> LossOutput:
    """Weighted sum over the strategy's terms of `preference_loss(objective, ...)`. All [B].

    `policy_logps` / `ref_logps` map views to summed target log-probs; `lengths` maps
    "chosen"/"rejected" to target token counts (the same tokens in every view).
    """
    method = resolve_method(objective, strategy, w=w, ref_conditioning=ref_conditioning,
                            length_normalize=length_normalize, **hparams)
    return method.loss(policy_logps, ref_logps, lengths)


def reflection_gain(policy_logps: dict[View, Tensor]) -> Tensor | None:
    """[B] mean over both responses of log pi(y|x,y_alt) - log pi(y|x); None if not available."""
    pairs = [(W_GIVEN_L, W_PLAIN), (L_GIVEN_W, L_PLAIN)]
    if not all(a in policy_logps and b in policy_logps for a, b in pairs):
        return None
    return torch.stack([policy_logps[a] - policy_logps[b] for a, b in pairs]).mean(0)
