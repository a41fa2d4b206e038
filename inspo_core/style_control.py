"""Style-controlled win rate (Arena-Hard's "SC"): a Bradley-Terry fit with style covariates.

Each judgement compares a candidate answer a with the baseline's answer b and gives the probability
that a is better (the records `inspo_core.evaluate` writes, the same ones the length-controlled win
rate reads). Following Arena-Hard-Auto's style control (after Chatbot Arena's, Li et al. 2024):

- per answer, with fenced code blocks removed first: its length in tokens, and the counts of
  markdown headers (`#`..`######` at a line start), list items (`1.`, `-`, `*`, `+` at a line start)
  and bold spans (`**x**`, `__x__`);
- per judgement, the style differences: length (|a| - |b|) / (|a| + |b|); for each markdown count
  the difference of densities (count / length), (d_a - d_b) / (d_a + d_b + 1);
- the model: logit P(a better) = theta_system + sum_k gamma_k x_k / sd_k, one theta per candidate
  system (the baseline is the reference, theta 0) and style coefficients shared by all systems,
  fitted by maximum likelihood on the judge's probabilities (soft labels; a tie is 0.5);
- the style-controlled win rate of a system is sigma(theta_system): its win rate against the baseline
  with style held equal (every difference 0).

One deliberate difference from Arena-Hard-Auto v2's script: it also subtracts each feature's mean
over the battles before the fit, which puts the reference point at the *average* style gap of the
systems in the fit rather than at equal style (with a single candidate that undoes the control
altogether). We only divide by the standard deviation, which moves no zero, so sigma(theta) is the
win rate at equal style whatever the scaling. Arena-Hard's intervals resample battles; ours resample
prompts (every judgement of a drawn prompt comes along), since the answers to one prompt are not
independent of each other. A feature without spread in the data (no markdown anywhere, as in the
synthetic worlds) carries no information and is left out of the fit; the result names the features
it used.

Lengths are counted in whitespace-separated words unless a `length` function is given (Arena-Hard
counts GPT-4o tokens); the length term is a ratio, so the unit matters only through the densities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

STYLE_FEATURES = ("length", "headers", "lists", "bold")

_CODE_BLOCK = re.compile(r"```[^`]*```")
_HEADER = re.compile(r"^#{1,6}\s", re.MULTILINE)
_LIST = re.compile(r"^\s*(?:\d+\.|[-*+])\s", re.MULTILINE)
_BOLD = (re.compile(r"\*\*[^*\n]+\*\*"), re.compile(r"__[^_\n]+__"))
_RIDGE = 1e-6  # keeps a separable fit finite; negligible otherwise


def word_length(text: str) -> int:
    return len(text.split())


def style_counts(text: str, length: Callable[[str], int] = word_length) -> dict[str, int]:
    """{length, headers, lists, bold} of one answer, fenced code blocks removed first."""
    if not isinstance(text, str):
        raise ValueError(f"style_counts needs an answer string, got {type(text).__name__}")
    body = _CODE_BLOCK.sub("", text)
    return {"length": int(length(text)), "headers": len(_HEADER.findall(body)), "lists": len(_LIST.findall(body)),
            "bold": sum(len(p.findall(body)) for p in _BOLD)}


def style_differences(a: dict[str, int], b: dict[str, int]) -> np.ndarray:
    """[4] style differences of answer a over answer b (module docstring), in STYLE_FEATURES order."""
    la, lb = a["length"], b["length"]
    out = np.zeros(len(STYLE_FEATURES))
    out[0] = (la - lb) / (la + lb) if la + lb > 0 else 0.0
    for k, name in enumerate(STYLE_FEATURES[1:], start=1):
        da = a[name] / la if la > 0 else 0.0
        db = b[name] / lb if lb > 0 else 0.0
        out[k] = (da - db) / (da + db + 1)
    return out


@dataclass(frozen=True)
class StyleFit:
    win_rates: dict[str, float]  # system -> sigma(theta): win rate against the baseline at equal style
    coefs: dict[str, float]  # style feature -> gamma, per standard deviation of the feature
    features: tuple[str, ...]  # the features fitted (those with spread in the data)
    n: int


def fit_style_control(probs: Sequence[float], diffs: np.ndarray, systems: Sequence[str] | None = None,
                      features: Sequence[str] = STYLE_FEATURES) -> StyleFit:
    """The Bradley-Terry fit with style covariates. probs [N] in [0, 1] (P(a better)); diffs [N, F]
    style differences (`style_differences`); systems [N] the candidate each judgement is about (None:
    one candidate, named "candidate")."""
    from scipy.optimize import minimize

    p = np.asarray(probs, dtype=float)
    if len(p) == 0:
        raise ValueError("style control needs at least one judgement")
    X = np.asarray(diffs, dtype=float).reshape(len(p), -1)
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("judge probabilities must lie in [0, 1]; got values outside it (or NaN)")
    if X.shape[1] != len(features):
        raise ValueError(f"{X.shape[1]} style columns for features {list(features)}")
    names = ["candidate"] * len(p) if systems is None else [str(s) for s in systems]
    if len(names) != len(p):
        raise ValueError(f"{len(names)} system labels for {len(p)} judgements")
    labels = list(dict.fromkeys(names))
    onehot = (np.asarray(names)[:, None] == np.asarray(labels)[None, :]).astype(float)
    sd = X.std(0)
    keep = sd > 1e-12
    Z = np.hstack([onehot, X[:, keep] / sd[keep]])

    def nll(w):
        z = Z @ w
        # -[p log sigma(z) + (1 - p) log sigma(-z)] = log(1 + e^z) - p z
        loss = np.logaddexp(0.0, z) - p * z
        q = 0.5 * (1 + np.tanh(z / 2))  # sigma(z), stable
        return loss.sum() + 0.5 * _RIDGE * w @ w, Z.T @ (q - p) + _RIDGE * w

    res = minimize(nll, np.zeros(Z.shape[1]), jac=True, method="L-BFGS-B",
                   options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15})
    w = res.x
    theta, gamma = w[: len(labels)], w[len(labels):]
    used = tuple(f for f, k in zip(features, keep) if k)
    return StyleFit({s: float(1 / (1 + np.exp(-t))) for s, t in zip(labels, theta)},
                    dict(zip(used, map(float, gamma))), used, len(p))


def judgement_style(judgements, length: Callable[[str], int] = word_length) -> tuple[np.ndarray, np.ndarray, list]:
    """(probs [N], style differences [N, 4], prompts [N]) of `inspo_core.evaluate.Judgement`s."""
    probs = np.array([j.prob for j in judgements], dtype=float)
    diffs = np.array([style_differences(style_counts(j.a, length), style_counts(j.b, length)) for j in judgements])
    return probs, diffs.reshape(len(probs), len(STYLE_FEATURES)), [j.prompt for j in judgements]


def style_controlled_win_rate(judgements, *, systems: Sequence[str] | None = None, n_boot: int = 200,
                              level: float = 0.95, seed: int = 0, length: Callable[[str], int] = word_length) -> dict:
    """SC win rate of each system with a percentile bootstrap over prompts (all judgements of a drawn
    prompt are kept together; a resample missing a system gives it no value for that draw).

    Returns {"sc_win_rate": {system: value}, "sc_win_rate_ci": {system: [low, high]}, "style_coefs",
    "features", "n"}; with `systems` None the single system is "candidate"."""
    probs, diffs, prompts = judgement_style(judgements, length)
    fit = fit_style_control(probs, diffs, systems)
    names = np.asarray(["candidate"] * len(probs) if systems is None else [str(s) for s in systems])
    groups: dict[str, list[int]] = {}
    for i, pr in enumerate(prompts):
        groups.setdefault(str(pr), []).append(i)
    members = list(groups.values())
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {s: [] for s in fit.win_rates}
    for _ in range(n_boot if len(members) > 1 else 0):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(members), size=len(members))])
        b = fit_style_control(probs[idx], diffs[idx], names[idx].tolist())
        for s, v in b.win_rates.items():
            draws[s].append(v)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = {s: [float(x) for x in np.percentile(v, q)] if v else [float("nan")] * 2 for s, v in draws.items()}
    return {"sc_win_rate": fit.win_rates, "sc_win_rate_ci": ci, "style_coefs": fit.coefs,
            "features": list(fit.features), "n": fit.n}
