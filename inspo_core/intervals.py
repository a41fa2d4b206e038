"""Intervals that respect how an evaluation was designed.

A world's measurement of one trained model is a mean over prompts of per-prompt cells (each cell
itself a mean over samples x opponents of that prompt); a demo row is that measurement repeated over
training seeds, on the same prompts. Three intervals follow from that design:

- `cluster_interval(cells)`: one model, prompts resampled (a cluster bootstrap: the comparisons of a
  prompt are not independent of each other, the prompts are).
- `crossed_interval(cells[S, X])`: seeds x prompts as a crossed two-way random-effects design,
  y_sx = mu + a_s + b_x + e_sx. The grand mean's variance is sigma_a^2 / S + sigma_b^2 / X +
  sigma_e^2 / (S X), estimated without bias by (MS_seed + MS_prompt - MS_error) / (S X) from the
  ANOVA mean squares, with Satterthwaite's degrees of freedom for the Student-t quantile. It combines
  the variation between training seeds and between prompts, so it is the interval for "this method
  on prompts like these", and for a paired difference (cells d_sx = V_A(s, x) - V_B(s, x)).
- `seed_interval(values)`: the plain Student-t interval over per-seed means (what the demo's tables
  showed before; kept to compare widths).
"""

from __future__ import annotations

import math

import numpy as np


def seed_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t interval over seeds (nan bounds for one seed)."""
    from scipy.stats import t

    v = np.asarray(list(values), dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def cluster_means(cells, clusters=None) -> np.ndarray:
    """Per-cluster means of per-prompt cells [..., X] (the last axis), clusters in order of first
    appearance; `clusters` None: every prompt is its own cluster."""
    c = np.asarray(cells, dtype=float)
    if clusters is None:
        return c
    if len(clusters) != c.shape[-1]:
        raise ValueError(f"{len(clusters)} cluster labels for {c.shape[-1]} prompts")
    keys = list(dict.fromkeys(clusters))
    lab = np.asarray(clusters)
    return np.stack([c[..., lab == k].mean(-1) for k in keys], axis=-1)


def cluster_interval(cells, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of per-prompt `cells` [X], a percentile bootstrap over prompts."""
    c = np.asarray(cells, dtype=float)
    m = float(c.mean())
    if len(c) < 2:
        return m, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(c), size=(n_boot, len(c)))
    lo, hi = np.percentile(c[idx].mean(1), [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return m, float(lo), float(hi)


def crossed_interval(cells, level: float = 0.95) -> dict:
    """The grand mean of `cells` [S seeds, X prompts] with a t-interval from the crossed two-way
    random-effects model (see the module docstring). With one seed it is the prompt-only interval
    (a one-way design over prompts).

    Returns {mean, low, high, half, df, sd_seed, sd_prompt, sd_error}; the `sd_*` are the estimated
    standard deviations of each component (0 when the estimate is negative)."""
    from scipy.stats import t

    y = np.asarray(cells, dtype=float)
    if y.ndim != 2 or y.size == 0:
        raise ValueError(f"crossed_interval needs a [seeds, prompts] array, got shape {y.shape}")
    S, X = y.shape
    m = float(y.mean())
    if X < 2:
        lo, hi = (seed_interval(y[:, 0], level)[1:] if S > 1 else (float("nan"), float("nan")))
        return {"mean": m, "low": lo, "high": hi, "half": (hi - lo) / 2, "df": float(S - 1),
                "sd_seed": float("nan"), "sd_prompt": float("nan"), "sd_error": float("nan")}
    if S == 1:
        ms_x = float(y[0].var(ddof=1))
        var, df, ms_s, ms_e = ms_x / X, float(X - 1), 0.0, 0.0
        comps = {"sd_seed": float("nan"), "sd_prompt": math.sqrt(ms_x), "sd_error": float("nan")}
    else:
        seed_means, prompt_means = y.mean(1), y.mean(0)
        ms_s = X * float(((seed_means - m) ** 2).sum()) / (S - 1)
        ms_x = S * float(((prompt_means - m) ** 2).sum()) / (X - 1)
        resid = y - seed_means[:, None] - prompt_means[None, :] + m
        ms_e = float((resid ** 2).sum()) / ((S - 1) * (X - 1))
        # each term's share of the variance, as a multiple of a mean square with known degrees of freedom;
        # a negative (seed or prompt) component is set to 0 (a boundary estimate), the rest stays unbiased
        terms = [(max(ms_s - ms_e, 0.0), S - 1, ms_s), (max(ms_x - ms_e, 0.0), X - 1, ms_x),
                 (ms_e, (S - 1) * (X - 1), ms_e)]
        var = sum(v for v, _, _ in terms) / (S * X)
        # Satterthwaite: var as a combination of mean squares; the subtracted MS_e enters with its sign
        coef = {"s": 1.0 if ms_s > ms_e else 0.0, "x": 1.0 if ms_x > ms_e else 0.0}
        ce = 1.0 - coef["s"] - coef["x"]
        num = (coef["s"] * ms_s + coef["x"] * ms_x + ce * ms_e) ** 2
        den = ((coef["s"] * ms_s) ** 2 / (S - 1) + (coef["x"] * ms_x) ** 2 / (X - 1)
               + (ce * ms_e) ** 2 / ((S - 1) * (X - 1)))
        df = num / den if den > 0 else float((S - 1) * (X - 1))
        comps = {"sd_seed": math.sqrt(max(ms_s - ms_e, 0.0) / X), "sd_prompt": math.sqrt(max(ms_x - ms_e, 0.0) / S),
                 "sd_error": math.sqrt(ms_e)}
    half = float(t.ppf((1 + level) / 2, max(df, 1.0)) * math.sqrt(max(var, 0.0)))
    return {"mean": m, "low": m - half, "high": m + half, "half": half, "df": float(df), **comps}
