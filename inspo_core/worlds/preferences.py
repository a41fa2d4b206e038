"""Preference families for token worlds: P[x, y, y'] over a finite set of items.

- `bradley_terry` (separable): P = sigma(strength * (u(x,y) - u(x,y'))), u ~ N(0, 1).
- `cyclic` (non-separable): a tournament in which, for each prompt, item y beats the next
  floor((Y-1)/2) items around a random circle, P = sigma(strength * T(y, y') + bt * (u - u')).
- `salience` (non-separable; Bordalo, Gennaioli & Shleifer 2013): items have a quality and a price;
  in the comparison {y, y'} the attribute whose value differs most from the pair's average (relative
  to it) is salient and keeps weight 1, the other is discounted by `delta`; P = sigma(strength *
  (U(y | y, y') - U(y' | y, y'))). With delta = 1 it is Bradley-Terry on w_q q - w_p p.
"""

from __future__ import annotations

import numpy as np

FAMILIES = ("bradley_terry", "cyclic", "salience")


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def make_preferences(family: str, n_contexts: int, n_items: int, rng: np.random.Generator, *,
                     strength: float = 3.0, delta: float = 0.3, bt: float = 0.0) -> dict[str, np.ndarray]:
    """{"P": [X, Y, Y], and the family's parameters}."""
    X, Y = n_contexts, n_items
    if family == "bradley_terry":
        u = rng.normal(size=(X, Y))
        return {"P": _sigmoid(strength * (u[:, :, None] - u[:, None, :])), "utilities": u}
    if family == "cyclic":
        T = np.zeros((X, Y, Y))
        reach = (Y - 1) // 2
        for x in range(X):
            order = rng.permutation(Y)
            pos = np.empty(Y, dtype=int)
            pos[order] = np.arange(Y)
            for a in range(Y):
                for b in range(Y):
                    gap = (pos[b] - pos[a]) % Y
                    if 1 <= gap <= reach:
                        T[x, a, b], T[x, b, a] = 1.0, -1.0
        u = rng.normal(size=(X, Y))
        P = _sigmoid(strength * T + bt * (u[:, :, None] - u[:, None, :]))
        return {"P": P, "tournament": T, "utilities": u}
    if family == "salience":
        quality = rng.uniform(1.0, 10.0, size=Y)
        price = rng.uniform(1.0, 10.0, size=Y)
        w = rng.dirichlet([2.0, 2.0], size=X)  # per-prompt weights on quality and on price
        attrs = np.stack([quality, price])  # [2, Y]
        sign = np.array([1.0, -1.0])  # quality is good, price is bad
        pair_mean = (attrs[:, :, None] + attrs[:, None, :]) / 2  # [2, Y, Y]
        sal = np.abs(attrs[:, :, None] - pair_mean) / (attrs[:, :, None] + pair_mean)  # salience of y's value
        quality_salient = sal[0] >= sal[1]  # [Y, Y]: for y in {y, y'}
        weight = np.where(quality_salient[None], np.array([1.0, delta])[:, None, None],
                          np.array([delta, 1.0])[:, None, None])  # [2, Y, Y]
        U = np.einsum("xa,a,ayz,ay->xyz", w, sign, weight, attrs)  # U(y | {y, y'})
        P = _sigmoid(strength * (U - U.transpose(0, 2, 1)) / 10.0)
        return {"P": P, "quality": quality, "price": price, "weights": w}
    raise ValueError(f"unknown preference family {family!r}; valid: {', '.join(FAMILIES)}")
