"""Evaluating checkpoints inside a token world with its exact oracle.

V(pi) = E_x E_{y ~ pi(.|x), y' ~ pi_ref(.|x)} Psi(P(y > y' | x)), estimated from samples: y from
the checkpoint given the prompt alone (deployment), y' from pi_ref, judged by the oracle.
Optionally the reflective policy pi(. | x, y') is measured too: the checkpoint sees y' rendered as
in training and answers; that estimates V over the alternative-conditioned class of Theorem 3.2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inspo_core import theory as th
from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.evaluate import bootstrap_ci
from inspo_core.generation import sample_from_ids, sample_responses
from inspo_core.models import load_model, load_tokenizer
from inspo_core.strategies import View

LOG_ODDS_CLIP = 0.01  # log-odds of P clipped to [logit 0.01, logit 0.99] so unparseable texts stay finite


def psi_values(p: np.ndarray) -> dict[str, np.ndarray]:
    q = np.clip(p, LOG_ODDS_CLIP, 1 - LOG_ODDS_CLIP)
    return {"identity": p, "log_odds": np.log(q / (1 - q))}


def item_distribution(world, texts_by_context: list[list[str]]) -> tuple[np.ndarray, float]:
    """Empirical pi(item | x) over parseable samples [X, Y], and the unparseable fraction."""
    counts = np.zeros((len(world.prompts), len(world.items)))
    bad = total = 0
    for x, texts in enumerate(texts_by_context):
        for t in texts:
            y = world.parse(t)
            total += 1
            if y is None:
                bad += 1
            else:
                counts[x, y] += 1
    dist = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    return dist, bad / max(total, 1)


def reference_samples(world, ref_dir: str | Path, n: int, seed: int) -> list[list[str]]:
    model, tok = load_model(str(ref_dir), dtype=torch.float32).eval(), load_tokenizer(str(ref_dir))
    return [sample_responses(model, tok, p, n, seed=seed * 7919 + x) for x, p in enumerate(world.prompts)]


def world_value(world, model_dir: str | Path, ref_texts: list[list[str]], *, temperature: float = 0.7,
                top_p: float = 0.95, seed: int = 0, reflective: bool = False, builder: BuilderConfig | None = None,
                n_boot: int = 1000) -> dict:
    """V under identity and log-odds with bootstrap CIs, for the deployed policy (prompt only) and,
    with `reflective`, for pi(. | x, y') on the same y'."""
    model, tok = load_model(str(model_dir), dtype=torch.float32).eval(), load_tokenizer(str(model_dir))
    out = {}
    deployed = [sample_responses(model, tok, p, len(ref_texts[x]), temperature=temperature, top_p=top_p,
                                 seed=seed * 104729 + x) for x, p in enumerate(world.prompts)]
    out["deployed"] = _score(world, deployed, ref_texts, n_boot, seed)
    out["deployed"]["item_distribution"] = item_distribution(world, deployed)[0].tolist()
    if reflective:
        b = ConditioningBuilder(tok, builder or BuilderConfig(), [View("chosen", "rejected")])
        texts = []
        for x, p in enumerate(world.prompts):
            # one batched generate per distinct alternative text, in the order of ref_texts[x]
            groups: dict[str, list[int]] = {}
            for i, alt in enumerate(ref_texts[x]):
                groups.setdefault(alt, []).append(i)
            row = [""] * len(ref_texts[x])
            for g, (alt, where) in enumerate(groups.items()):
                got = sample_from_ids(model, tok, b.generation_ids(p, alt if alt.strip() else None),
                                      seed=seed * 15485863 + x * 1009 + g, temperature=temperature, top_p=top_p,
                                      max_new_tokens=16, n=len(where))
                for i, text in zip(where, got):
                    row[i] = text
            texts.append(row)
        out["reflective"] = _score(world, texts, ref_texts, n_boot, seed)
    return out


def _score(world, texts, ref_texts, n_boot, seed) -> dict:
    probs = np.array([world.preference(world.prompts[x], a, b)
                      for x in range(len(world.prompts)) for a, b in zip(texts[x], ref_texts[x])])
    res = {"n": int(len(probs)), "unparseable": item_distribution(world, texts)[1],
           "mean_chars": float(np.mean([len(t) for row in texts for t in row])), "cells": {}}
    bounds = np.cumsum([0] + [len(texts[x]) for x in range(len(world.prompts))])
    for name, vals in psi_values(probs).items():
        res["cells"][f"V_{name}"] = [float(vals[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])]
        res[f"V_{name}"] = float(vals.mean())
        res[f"V_{name}_ci"] = list(bootstrap_ci(lambda i, v=vals: float(v[i].mean()), len(vals), n_boot=n_boot,
                                                seed=seed))
    return res


def theory_ceilings(world, ref_texts: list[list[str]]) -> dict:
    """V of pi_ref, pi_bar and pi_star computed exactly against the opponent distribution the
    measured V uses: pi_ref's item distribution estimated from `ref_texts`, *including* its
    unparseable samples, which lose to any parseable answer exactly as the oracle scores them.

    With u the unparseable fraction of the opponents and V_p the value against the parseable part:
    a parseable policy (pi_bar, pi_star) gets (1 - u) V_p + u Psi(1); pi_ref itself, unparseable as
    often as its opponent, gets (1-u)^2 V_p + u (1-u) (Psi(1) + Psi(0)) + u^2 Psi(1/2)."""
    ref, u = item_distribution(world, ref_texts)
    out = {"opponent_unparseable": u}
    for name in ("identity", "log_odds"):
        psi = lambda q, name=name: psi_values(np.asarray(q, dtype=float))[name]  # noqa: E731  the measured V's Psi
        win, lose, tie = (float(psi(v)) for v in (1.0, 0.0, 0.5))
        parseable = lambda v_p: (1 - u) * v_p + u * win  # noqa: E731
        v_ref = th.value(ref, world.P, ref, psi)
        out[name] = {"pi_ref": (1 - u) ** 2 * v_ref + u * (1 - u) * (win + lose) + u * u * tie,
                     "pi_bar": parseable(th.value(th.pi_bar(world.P, ref, psi), world.P, ref, psi)),
                     "pi_star": parseable(th.value(th.pi_star(world.P, psi), world.P, ref, psi))}
    return out
