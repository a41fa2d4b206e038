"""Finite-response calculus of the paper's Sections 3-4 (and Appendix B).

Shapes: X prompts, Y responses.
- `P`: [X, Y, Y], P[x, y, y'] = P(y > y' | x), with P[x, y, y'] + P[x, y', y] = 1.
- `pi_ref`, context-only policies: [X, Y], rows sum to 1.
- alternative-conditioned policies: [X, Y', Y], pi[x, y', y] = pi(y | x, y').
- `rho`: [X] prompt distribution (uniform when omitted).
Scalarisations Psi: "identity", "log_odds", or any non-decreasing callable on arrays.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Psi = str | Callable[[np.ndarray], np.ndarray]
EPS = 1e-12


def psi_fn(psi: Psi) -> Callable[[np.ndarray], np.ndarray]:
    if callable(psi):
        return psi
    if psi == "identity":
        return lambda q: q
    if psi == "log_odds":
        return lambda q: np.log(np.clip(q, EPS, 1 - EPS) / np.clip(1 - q, EPS, 1 - EPS))
    raise ValueError(f"unknown Psi {psi!r}; use 'identity', 'log_odds' or a non-decreasing callable")


def check_preferences(P: np.ndarray, atol: float = 1e-9) -> None:
    if P.ndim != 3 or P.shape[1] != P.shape[2]:
        raise ValueError(f"P must be [X, Y, Y], got shape {P.shape}")
    if not np.allclose(P + P.transpose(0, 2, 1), 1.0, atol=atol):
        raise ValueError("P must satisfy P[x, y, y'] + P[x, y', y] = 1")
    if (P < 0).any() or (P > 1).any():
        raise ValueError("P must lie in [0, 1]")


def _rho(rho, X):
    return np.full(X, 1.0 / X) if rho is None else np.asarray(rho, dtype=float)


def scores(P: np.ndarray, pi_ref: np.ndarray, psi: Psi = "identity") -> np.ndarray:
    """S(y; Psi, pi_ref) = sum_y' pi_ref(y'|x) Psi(P(y > y'|x))  (proof of Prop. 3.1). [X, Y]"""
    return np.einsum("xyz,xz->xy", psi_fn(psi)(P), pi_ref)


def _argmax_onehot(values: np.ndarray, atol: float = 1e-12) -> np.ndarray:
    """Uniform over the maximisers along the last axis (a tie-robust argmax)."""
    best = values.max(-1, keepdims=True)
    mask = (values >= best - atol).astype(float)
    return mask / mask.sum(-1, keepdims=True)


def pi_bar(P: np.ndarray, pi_ref: np.ndarray, psi: Psi = "identity") -> np.ndarray:
    """The context-only optimum: argmax_y S(y; Psi, pi_ref). [X, Y]"""
    return _argmax_onehot(scores(P, pi_ref, psi))


def pi_star(P: np.ndarray, psi: Psi = "identity") -> np.ndarray:
    """The alternative-conditioned optimum (Theorem 3.2): for each y', argmax_y Psi(P(y > y')).

    [X, Y', Y]. Invariant to pi_ref and, for strictly increasing Psi, to Psi.
    """
    return _argmax_onehot(psi_fn(psi)(P).transpose(0, 2, 1))  # [x, y', y]


def value(policy: np.ndarray, P: np.ndarray, pi_ref: np.ndarray, psi: Psi = "identity", rho=None) -> float:
    """V(pi) = E_x E_{y~pi, y'~pi_ref} Psi(P(y > y'|x)) for a [X, Y] or [X, Y', Y] policy."""
    G = psi_fn(psi)(P)  # [x, y, y']
    if policy.ndim == 2:
        per_x = np.einsum("xy,xz,xyz->x", policy, pi_ref, G)
    elif policy.ndim == 3:
        per_x = np.einsum("xzy,xz,xyz->x", policy, pi_ref, G)
    else:
        raise ValueError(f"policy must be [X, Y] or [X, Y', Y], got shape {policy.shape}")
    return float(per_x @ _rho(rho, P.shape[0]))


def gibbs_target(r: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """Theorem 4.1, eq. 11: pi_r(y|x,y') = pi_ref(y|x) exp(r(x,y,y')/beta) / Z(x,y').

    r: [X, Y, Y'] (r[x, y, y'] = r(x, y, y')); returns [X, Y', Y].
    """
    logits = np.log(np.clip(pi_ref, EPS, None))[:, None, :] + r.transpose(0, 2, 1) / beta
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(-1, keepdims=True)


def log_partition(r: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """log Z(x, y') = log sum_y pi_ref(y|x) exp(r(x,y,y')/beta). [X, Y']"""
    logits = np.log(np.clip(pi_ref, EPS, None))[:, :, None] + r / beta  # [x, y, y']
    m = logits.max(1, keepdims=True)
    return (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0, :]


def choice_model(r: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """Eq. 6: P(y > y'|x) = sigma(2 (r(x,y,y') - beta log Z(x,y'))), made consistent.

    Eq. 6 only defines a valid preference when r(x,y,y') - beta log Z(x,y') is antisymmetric;
    this returns sigma(u(y,y') - u(y',y)) with u = r - beta log Z, which equals eq. 6 exactly
    in that case and is a proper preference (P + P^T = 1) in every case. [X, Y, Y]
    """
    u = r - beta * log_partition(r, pi_ref, beta)[:, None, :]
    d = u - u.transpose(0, 2, 1)
    return 1.0 / (1.0 + np.exp(-d))


def implied_preference(pi_cond: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """The preference an alternative-conditioned policy encodes through eq. 9:
    sigma(beta [log pi(y|x,y')/pi_ref(y|x) - log pi(y'|x,y)/pi_ref(y'|x)]). [X, Y, Y]"""
    h = beta * (np.log(np.clip(pi_cond, EPS, None)) - np.log(np.clip(pi_ref, EPS, None))[:, None, :])  # [x, y', y]
    h = h.transpose(0, 2, 1)  # [x, y, y'] = beta log pi(y|x,y')/pi_ref(y|x)
    return 1.0 / (1.0 + np.exp(-(h - h.transpose(0, 2, 1))))


def bradley_terry(utilities: np.ndarray) -> np.ndarray:
    """Separable preferences P = sigma(c(y) - c(y')) from utilities [X, Y]."""
    d = utilities[:, :, None] - utilities[:, None, :]
    return 1.0 / (1.0 + np.exp(-d))


def proposition_3_1() -> dict[str, np.ndarray]:
    """Appendix B's counter-example. Responses: [y1_bar, y2_bar, y_a', y_b'] (one prompt).

    P(y1 > y_a') = 0.9, P(y1 > y_b') = 0.2, P(y2 > y_a') = P(y2 > y_b') = 0.56; comparisons the
    paper leaves open are 0.5. pi_ref is uniform (0.5, 0.5) or skewed (0.9, 0.1) on {y_a', y_b'}.
    """
    P = np.full((1, 4, 4), 0.5)
    for (i, j), p in {(0, 2): 0.9, (0, 3): 0.2, (1, 2): 0.56, (1, 3): 0.56}.items():
        P[0, i, j], P[0, j, i] = p, 1 - p
    return {
        "P": P,
        "pi_ref_uniform": np.array([[0.0, 0.0, 0.5, 0.5]]),
        "pi_ref_skewed": np.array([[0.0, 0.0, 0.9, 0.1]]),
        "names": np.array(["y1_bar", "y2_bar", "y_a'", "y_b'"]),
    }


def random_world(rng: np.random.Generator, X: int, Y: int, kind: str = "general", concentration: float = 1.0):
    """A random world (P, pi_ref): 'general' non-separable P, or 'separable' Bradley-Terry P."""
    pi_ref = rng.dirichlet(np.full(Y, concentration), size=X)
    if kind == "separable":
        return bradley_terry(rng.normal(size=(X, Y)) * 2), pi_ref
    if kind != "general":
        raise ValueError(f"unknown kind {kind!r}; use 'general' or 'separable'")
    upper = rng.uniform(size=(X, Y, Y))
    P = np.triu(upper, 1)
    P = P + np.transpose(1 - P, (0, 2, 1)) * np.tril(np.ones((Y, Y)), -1)
    idx = np.arange(Y)
    P[:, idx, idx] = 0.5
    return P, pi_ref


def psi_box_cox(lam: float) -> Callable[[np.ndarray], np.ndarray]:
    """Psi_lam(q) = ((q/(1-q))^lam - 1) / lam: a family of increasing scalarisations through the odds;
    lam -> 0 gives log-odds, lam = 1 gives odds - 1."""
    if abs(lam) < 1e-9:
        return psi_fn("log_odds")

    def f(q):
        odds = np.clip(q, EPS, 1 - EPS) / np.clip(1 - q, EPS, 1 - EPS)
        return (odds**lam - 1) / lam

    return f


def marginalize(pi_cond: np.ndarray, pi_ref: np.ndarray) -> np.ndarray:
    """The context-only policy sum_y' pi_ref(y'|x) pi(y|x,y'): what remains of an
    alternative-conditioned policy when it must answer without an alternative. [X, Y]"""
    return np.einsum("xz,xzy->xy", pi_ref, pi_cond)


def value_gaps(n_worlds: int, X: int, Y: int, *, kind: str = "general", psi: Psi = "identity",
               seed: int = 0) -> dict[str, np.ndarray]:
    """Over random worlds: V(pi_star), V(pi_bar), V(marginalised pi_star) and V(pi_ref), each [n]."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros(n_worlds) for k in ("pi_star", "pi_bar", "pi_star_marginal", "pi_ref")}
    for i in range(n_worlds):
        P, ref = random_world(rng, X, Y, kind)
        star = pi_star(P, psi)
        out["pi_star"][i] = value(star, P, ref, psi)
        out["pi_bar"][i] = value(pi_bar(P, ref, psi), P, ref, psi)
        out["pi_star_marginal"][i] = value(marginalize(star, ref), P, ref, psi)
        out["pi_ref"][i] = value(ref, P, ref, psi)
    return out


# ---- How much of the reflection can reach a prompt-only (deployed) policy (issue 21; derivations in
# `distillation_values`' docstring) ----------------------------------------------------------------------


def adaptivity(pi_cond: np.ndarray, P: np.ndarray, pi_ref: np.ndarray, psi: Psi = "identity", rho=None) -> float:
    """A(pi) = E_x E_{y'~pi_ref} E_{y~pi(.|x,y')} [Psi(P(y > y'|x)) - S(y; Psi, pi_ref)] = V(pi) - V(m).

    pi_cond: [X, Y', Y]. Zero for a policy whose rows do not depend on y'.
    """
    G = psi_fn(psi)(P)  # [x, y, y']
    excess = G - scores(P, pi_ref, psi)[:, :, None]  # [x, y, y']
    per_x = np.einsum("xzy,xz,xyz->x", pi_cond, pi_ref, excess)
    return float(per_x @ _rho(rho, P.shape[0]))


def dominant_response(P: np.ndarray, psi: Psi = "identity", atol: float = 1e-12) -> np.ndarray:
    """Per prompt, the response that is the unique maximiser of Psi(P(y > y'|x)) for every y', or -1. [X] int.

    Where it exists, pi_star, its marginal and pi_bar all put all their mass on it (`distillation_values`, (d)).
    """
    G = psi_fn(psi)(P)  # [x, y, y']
    best = G.max(1, keepdims=True)  # [x, 1, y']
    is_best = G >= best - atol  # [x, y, y']
    unique = is_best.sum(1) == 1  # [x, y']
    always = is_best.all(2)  # [x, y]: best against every alternative
    out = np.full(P.shape[0], -1)
    ok = unique.all(1) & always.any(1)
    out[ok] = always[ok].argmax(1)
    return out


def reflection_decomposition(pi_cond: np.ndarray, P: np.ndarray, pi_ref: np.ndarray, psi: Psi = "identity",
                             rho=None) -> dict[str, float]:
    """Exact values of a conditioned policy and of its distillation (the marginal). pi_cond: [X, Y', Y].

    reflective: V(pi(.|x,y')) with y' ~ pi_ref, the policy playing against the alternative it sees (Sec. 2's V
    over the class Pi of eq. 5); marginal: V(m) with m = sum_y' pi_ref(y'|x) pi(.|x,y') playing as a
    prompt-only policy against a fresh y' ~ pi_ref; adaptivity: reflective - marginal (`adaptivity`);
    pi_bar: V(pi_bar); marginal_regret: V(pi_bar) - V(m) >= 0.
    """
    v_bar = value(pi_bar(P, pi_ref, psi), P, pi_ref, psi, rho)
    v_refl = value(pi_cond, P, pi_ref, psi, rho)
    v_marg = value(marginalize(pi_cond, pi_ref), P, pi_ref, psi, rho)
    return {"reflective": v_refl, "marginal": v_marg, "adaptivity": v_refl - v_marg, "pi_bar": v_bar,
            "marginal_regret": v_bar - v_marg}


def distillation_values(P: np.ndarray, pi_ref: np.ndarray, *, ins_conditioned: np.ndarray, ins_plain: np.ndarray,
                        dpo_plain: np.ndarray, psi: Psi = "identity", rho=None) -> dict[str, float]:
    """The table of issue 21 for one world: every value exact (V of Sec. 2, one Psi).

    What the theory says. Write G = Psi(P) and S(y) = sum_y' pi_ref(y'|x) G(y, y') (the score of Prop. 3.1's
    proof). For any alternative-conditioned pi with marginal m = marginalize(pi, pi_ref):

    (a) V(m) = E_x sum_y m(y|x) S(y) <= E_x max_y S(y) = V(pi_bar): no distillation of any reflection into a
        prompt-only policy beats pi_bar, the best of that class (Sec. 2). The gap is the marginal regret
        E_x sum_y m(y|x) [max S - S(y)], zero iff m puts mass only on maximisers of S.
    (b) V(pi) = V(m) + A(pi) (`adaptivity`): what pi earns by answering the alternative it sees rather than
        the average one. A = 0 when pi ignores y' (then m = pi). A perfect distillation keeps V(m), loses A.
    (c) For pi_star, V(m*) = E_x E_{y'~pi_ref} S(br(y')) (the mean score of the best responses to the
        alternatives), and V(pi_star) - V(pi_bar) = A(pi_star) - [V(pi_bar) - V(m*)] >= 0 (Theorem 3.2 (ii)).
        V(m*) is what distilling the *optimal* reflection gives; it can be below V(pi_bar) and even below what
        a prompt-only method such as DPO reaches: only pi_bar bounds every distillation.
    (d) Separable worlds. If for a prompt one response y* is the unique maximiser of G(., y') for every y'
        (`dominant_response`), then pi_star(.|x,y') = delta_{y*} for every y', so m*(.|x) = delta_{y*}; and
        S(y*) - S(y) = sum_y' pi_ref(y') [G(y*,y') - G(y,y')] > 0 for y != y*, so pi_bar(.|x) = delta_{y*}:
        V(m*) = V(pi_bar) = V(pi_star), exactly. A Bradley-Terry P = sigma(c(y) - c(y')) with distinct c has
        the dominant response argmax c under *every* strictly increasing Psi and every pi_ref: stronger than
        Theorem 3.2 (iii), which asks Psi(P) = c(y) - c(y') of the Psi at hand.
    (e) Cyclic worlds. When every response has one preferred to it (always in the `cyclic` family at bt = 0),
        no response best-answers itself (P(y > y) = 1/2 < P(beater > y)), so there is no dominant response;
        with pi_ref of full support the row y' = y then moves m*'s mass off y, so m*(.|x) is never a point
        mass: it mixes >= 2 responses and V(m*) < V(pi_bar) unless all of them maximise S. With a
        regular tournament (the `cyclic` family at bt = 0: each item beats as many as it loses to) and a
        uniform pi_ref, S is constant, so every prompt-only policy (pi_bar, m*, DPO) is worth exactly
        V(pi_ref): none of V(pi_star) - V(pi_ref) can reach a deployed policy.
    (f) Context distillation, min_q E_{y'~pi_ref} KL(pi(.|x,y') || q), is minimised by q = m (the forward
        KL's minimiser over a mixture of targets is the mixture), so V(m) (ins_marginal) is exactly the
        deployed value that strategy converges to from a fixed conditioned policy.
    In the tabular world the INS policy's deployed head is untouched by the symmetric loss, so
    ins_deployed = V(pi_ref) there (`worlds.tabular.reflection_distillation`).

    P: [X, Y, Y]; pi_ref, ins_plain (the INS policy's deployed head pi(y|x)), dpo_plain: [X, Y];
    ins_conditioned: [X, Y', Y]. Keys: pi_ref, pi_bar, pi_star, dpo_deployed, ins_deployed, ins_reflective,
    ins_marginal, pi_star_marginal, and bar_minus_star_marginal = V(pi_bar) - V(m*) >= 0 (what even a
    perfect distillation of the optimal reflection leaves on the table), reachable_share =
    (V(m*) - V(pi_ref)) / (V(pi_star) - V(pi_ref)) (nan when pi_star gains nothing) and
    bar_share = (V(pi_bar) - V(pi_ref)) / (V(pi_star) - V(pi_ref)), the most any prompt-only policy keeps.
    """
    v = lambda pi: value(pi, P, pi_ref, psi, rho)  # noqa: E731
    star = pi_star(P, psi)
    out = {"pi_ref": v(pi_ref), "pi_bar": v(pi_bar(P, pi_ref, psi)), "pi_star": v(star),
           "dpo_deployed": v(dpo_plain), "ins_deployed": v(ins_plain), "ins_reflective": v(ins_conditioned),
           "ins_marginal": v(marginalize(ins_conditioned, pi_ref)), "pi_star_marginal": v(marginalize(star, pi_ref))}
    out["bar_minus_star_marginal"] = out["pi_bar"] - out["pi_star_marginal"]
    head = out["pi_star"] - out["pi_ref"]
    out["reachable_share"] = (out["pi_star_marginal"] - out["pi_ref"]) / head if head > 1e-12 else float("nan")
    out["bar_share"] = (out["pi_bar"] - out["pi_ref"]) / head if head > 1e-12 else float("nan")
    return out
