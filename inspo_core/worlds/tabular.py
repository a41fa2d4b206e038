"""Tabular worlds: a policy that is a table of logits, trained by any objective x strategy.

theta: [X, 1 + Y, Y]; row 0 is the context-only policy pi(y | x), row 1 + y' is the
alternative-conditioned policy pi(y | x, y'). Pairs are sampled from pi_ref and labelled by a
Bernoulli draw from the true preference P, as in Section 2's data model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inspo_core import theory
from inspo_core.strategies import View, strategy_loss, strategy_views
from inspo_core.worlds.preferences import make_preferences


@dataclass
class TabularPolicy:
    theta: torch.Tensor  # [X, 1 + Y, Y]

    def plain(self) -> np.ndarray:
        """pi(y | x): [X, Y]."""
        return torch.softmax(self.theta[:, 0], -1).detach().double().numpy()

    def conditioned(self) -> np.ndarray:
        """pi(y | x, y'): [X, Y', Y]."""
        return torch.softmax(self.theta[:, 1:], -1).detach().double().numpy()

    def marginal(self, pi_ref: np.ndarray) -> np.ndarray:
        """m(y | x) = sum_y' pi_ref(y'|x) pi(y | x, y'): the conditioned policy distilled perfectly into a
        prompt-only one. [X, Y]"""
        return theory.marginalize(self.conditioned(), pi_ref)


def sample_pairs(P: np.ndarray, pi_ref: np.ndarray, n: int, rng: np.random.Generator, rho=None):
    """(x, y_w, y_l) index arrays [n]: y, y' ~ pi_ref(.|x), y_w the winner of a Bernoulli(P) draw."""
    X, Y = pi_ref.shape
    x = rng.choice(X, size=n, p=rho)
    u = rng.random((n, 2))
    cdf = np.cumsum(pi_ref[x], -1)
    y1 = np.minimum((u[:, :1] > cdf).sum(-1), Y - 1)
    y2 = np.minimum((u[:, 1:] > cdf).sum(-1), Y - 1)
    first_wins = rng.random(n) < P[x, y1, y2]
    return x, np.where(first_wins, y1, y2), np.where(first_wins, y2, y1)


def _view_logps(logp: torch.Tensor, x, yw, yl) -> dict[View, torch.Tensor]:
    """logp = log_softmax(theta): [X, 1 + Y, Y]."""
    target = {"chosen": yw, "rejected": yl}
    out = {}
    for v in [View("chosen"), View("rejected"), View("chosen", "rejected"), View("rejected", "chosen"),
              View("rejected", "rejected")]:
        row = 0 if v.context is None else 1 + target[v.context]
        out[v] = logp[x, row, target[v.target]]
    return out


def train_tabular(P: np.ndarray, pi_ref: np.ndarray, objective: str = "dpo", strategy: str = "symmetric", *,
                  steps: int = 2000, batch_size: int = 1024, lr: float = 0.05, seed: int = 0, w: float = 0.5,
                  ref_conditioning: str = "plain", rho=None, init_from_ref: bool = True, **hparams) -> TabularPolicy:
    """Adam (lr decaying linearly to 5%) on the objective's mean loss over freshly sampled pairs
    each step. Starts at pi_ref
    (Algorithm 1, line 2) unless `init_from_ref` is False (uniform start)."""
    X, Y = pi_ref.shape
    rng = np.random.default_rng(seed)
    log_ref = torch.log(torch.as_tensor(pi_ref, dtype=torch.float64).clamp_min(1e-12))
    init = log_ref[:, None, :].expand(X, 1 + Y, Y).clone() if init_from_ref else torch.zeros(X, 1 + Y, Y, dtype=torch.float64)
    theta = init.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    # linear decay to 5% so the final iterate averages out the sampling noise of the pairs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - 0.95 * s / steps)
    views = strategy_views(strategy, w)
    ones = torch.ones(batch_size, dtype=torch.float64)
    for _ in range(steps):
        x, yw, yl = (torch.as_tensor(a) for a in sample_pairs(P, pi_ref, batch_size, rng, rho))
        logp = torch.log_softmax(theta, -1)
        pol = {v: t for v, t in _view_logps(logp, x, yw, yl).items() if v in views}
        ref = {View("chosen"): log_ref[x, yw], View("rejected"): log_ref[x, yl]}
        ref.update({View("chosen", "rejected"): ref[View("chosen")], View("rejected", "chosen"): ref[View("rejected")],
                    View("rejected", "rejected"): ref[View("rejected")]})  # the tabular reference ignores context
        out = strategy_loss(objective, strategy, policy_logps=pol, ref_logps=ref,
                            lengths={"chosen": ones, "rejected": ones}, ref_conditioning=ref_conditioning, w=w,
                            **hparams)
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
        sched.step()
    return TabularPolicy(theta.detach())


def dpo_target(P: np.ndarray, pi_ref: np.ndarray, beta: float, iters: int = 500) -> np.ndarray:
    """The population optimum of plain DPO in a tabular world: pi_ref(y|x) exp(c(x,y)/beta) / Z with
    c the Bradley-Terry utilities that best fit P on pairs drawn from pi_ref (maximum likelihood).
    [X, Y]. With separable P this recovers the RLHF optimum; otherwise it is DPO's projection."""
    Pt = torch.as_tensor(P, dtype=torch.float64)
    ref = torch.as_tensor(pi_ref, dtype=torch.float64)
    weight = ref[:, :, None] * ref[:, None, :]
    c = torch.zeros(pi_ref.shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([c], max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        d = c[:, :, None] - c[:, None, :]
        nll = -(weight * (Pt * torch.nn.functional.logsigmoid(d))).sum() + 1e-9 * (c ** 2).sum()
        nll.backward()
        return nll

    opt.step(closure)
    logits = torch.log(ref.clamp_min(1e-12)) + c.detach() / beta
    return torch.softmax(logits, -1).numpy()


def tabular_world(family: str, n_contexts: int = 4, n_items: int = 6, *, seed: int = 0, strength: float = 3.0,
                  delta: float = 0.3, bt: float = 0.0, ref_concentration: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(P [X, Y, Y], pi_ref [X, Y]) for a preference family, drawn in the token world's order: the same seed
    and settings give TokenWorld's P and its pi_gen (which the token world's pre-trained pi_ref imitates)."""
    rng = np.random.default_rng(seed)
    P = make_preferences(family, n_contexts, n_items, rng, strength=strength, delta=delta, bt=bt)["P"]
    return P, rng.dirichlet(np.full(n_items, ref_concentration), size=n_contexts)


def reflection_distillation(P: np.ndarray, pi_ref: np.ndarray, objective: str = "dpo", *, psi: theory.Psi = "identity",
                            rho=None, **train) -> dict[str, float]:
    """Train INS (strategy symmetric) and plain DPO-family (strategy none) tabular policies on the same pairs
    (one seed, so one stream of sampled pairs) and return `theory.distillation_values` for them: every value
    exact given the trained tables. `train` goes to `train_tabular` (beta, steps, batch_size, lr, seed, ...).

    In this world the INS policy's deployed head is pi_ref exactly: the symmetric strategy reads only the
    conditioned rows, so row 0 keeps its initial logits (log pi_ref unless init_from_ref=False)."""
    ins = train_tabular(P, pi_ref, objective, "symmetric", rho=rho, **train)
    dpo = train_tabular(P, pi_ref, objective, "none", rho=rho, **train)
    return theory.distillation_values(P, pi_ref, ins_conditioned=ins.conditioned(), ins_plain=ins.plain(),
                                      dpo_plain=dpo.plain(), psi=psi, rho=rho)
