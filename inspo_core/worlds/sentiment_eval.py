"""Measuring checkpoints in a text world whose oracle scores any text (the sentiment world), the way
a careful evaluator would.

For each evaluation prompt x there is a pool of opponents y'_1..y'_n ~ pi_ref(. | x) at T = 1 (sampled
once per world, cached, shared by every run and seed). A policy is measured by
- V (deployed): k samples y_1..y_k ~ pi(. | x) at the evaluation settings (T = 0.7, top-p 0.95 for
  every row, pi_ref's own included); the prompt's cell is the mean of Psi(P(y_i > y'_j | x)) over all
  k x n pairs; V is the mean of the cells over prompts, its interval a bootstrap over the world's
  clusters of prompts (`world.clusters`: in the sentiment world a subject, whose three templated
  prompts are not independent evidence);
- the mean oracle reward of those samples (per-prompt cells likewise);
- KL(pi || pi_ref) as a sequence-level estimate: m samples of pi at T = 1, top-p 1, each scored as
  the token ids that were sampled (not re-tokenised text), the end-of-turn token included when the
  answer ended by itself; the cell is the mean of log pi(y|x) - log pi_ref(y|x) over the prompt's
  samples. The same samples' mean reward is the frontier point (the DPO paper's Figure 2, left);
- the reflective policy pi(. | x, y'): for i < k the checkpoint is shown opponent y'_i (rendered as in
  training) and answers; `V` compares that answer with the y'_i it saw (the class of Theorem 3.2: the
  conditioned policy plays against the alternative it is shown), `V_others` with the remaining n - 1
  opponents (does seeing one answer help against pi_ref in general).

An empty answer is an answer: it is scored by the oracle (it has no sentiment and no words) and by
its token ids (the end token alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.generation import answer_logps, sample_sequences
from inspo_core.intervals import cluster_interval, cluster_means
from inspo_core.models import load_model, load_tokenizer
from inspo_core.strategies import W_GIVEN_L, W_PLAIN
from inspo_core.worlds.evaluation import psi_values


@dataclass(frozen=True)
class TextMeasure:
    """How a text world measures a checkpoint (part of what eval.json records)."""

    temperature: float = 0.7
    top_p: float = 0.95
    samples: int = 4  # k deployed (and reflective) samples per prompt
    kl_samples: int = 4  # samples per prompt at T = 1 for KL and the frontier
    reflective: bool = True
    batch_size: int = 96  # sequences per generate call (the answers do not depend on it)
    sampler: str = "per-answer seeds"  # each answer's draws from its own seed (generation.answer_seed)
    n_boot: int = 2000


def opponents(world, ref_dir: str | Path, n: int, seed: int, log=print) -> list[list[str]]:
    """n samples of pi_ref (T = 1) per evaluation prompt: the y' every policy is compared with."""
    tok, model = load_tokenizer(str(ref_dir)), load_model(str(ref_dir), dtype=torch.float32).eval()
    b = ConditioningBuilder(tok, BuilderConfig(), [W_PLAIN])
    got = sample_sequences(model, tok, [b.generation_ids(p) for p in world.prompts], n=n, seed=seed,
                           temperature=1.0, top_p=1.0, max_new_tokens=world.cfg.max_new_tokens,
                           progress=progress_logger(log, "opponents y' ~ pi_ref"))
    return [[s.text for s in row] for row in got]


def progress_logger(log, what: str):
    """A `progress(done, total)` callback that logs every fifth of the way (and the end)."""
    state = {"last": -1}

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth != state["last"] and (tenth % 2 == 0 or done == total):
            state["last"] = tenth
            log(f"      {what}: {done}/{total}")
    return report


def _values(world, texts: list[list[str]], opp: list[list[str]], pair_with) -> dict[str, np.ndarray]:
    """Per-prompt cells [X] of V under each Psi: the mean over the (answer, opponent) pairs that
    `pair_with(i, n)` names for answer i of a prompt with n opponents."""
    cells: dict[str, list[float]] = {}
    for x, (ans, ops) in enumerate(zip(texts, opp)):
        probs = np.array([world.preference(world.prompts[x], a, ops[j]) for i, a in enumerate(ans)
                          for j in pair_with(i, len(ops))])
        for name, vals in psi_values(probs).items():
            cells.setdefault(f"V_{name}", []).append(float(vals.mean()))
    return {k: np.array(v) for k, v in cells.items()}


def _summary(world, cells: dict[str, np.ndarray], texts: list[list[str]], n_boot: int, seed: int) -> dict:
    flat = [t for row in texts for t in row]
    res = {"prompts": len(texts), "unparseable": float(np.mean([not t.strip() for t in flat])),
           "mean_words": float(np.mean([len(t.split()) for t in flat])),
           "cells": {k: [float(v) for v in c] for k, c in cells.items()}}
    for k, c in cells.items():
        _, lo, hi = cluster_interval(cluster_means(c, world.clusters), n_boot=n_boot, seed=seed)
        res[k], res[f"{k}_ci"] = float(np.mean(c)), [lo, hi]
    return res


def frontier_point(world, model, tok, plain: ConditioningBuilder, ref_model, ref_tok, m: TextMeasure, seed: int,
                   log=print) -> dict:
    """KL(pi || pi_ref) (sequence level, nats per answer) and the mean reward of m.kl_samples samples per
    prompt at T = 1, with per-prompt cells and intervals over prompts. With `ref_model` None the model is
    pi_ref itself: the KL is 0 exactly and is not estimated."""
    rows = [plain.generation_ids(p) for p in world.prompts]
    got = sample_sequences(model, tok, rows, n=m.kl_samples, seed=seed * 15_485_863 + 2, batch_size=m.batch_size,
                           temperature=1.0, top_p=1.0, max_new_tokens=world.cfg.max_new_tokens, score=ref_model is not None,
                           progress=progress_logger(log, "samples at T = 1 for KL"))
    reward = np.array([np.mean([world.reward(s.text) for s in row]) for row in got])
    res = {"kl_samples": m.kl_samples, "ended": float(np.mean([s.ended for row in got for s in row]))}
    if ref_model is None:
        kl = np.zeros(len(rows))
    else:
        flat_rows = [r for r, row in zip(rows, got) for _ in row]
        flat_ans = [s.ids for row in got for s in row]
        ref_plain = ConditioningBuilder(ref_tok, plain.cfg, [W_PLAIN])
        ref_rows = [ref_plain.generation_ids(p) for p, row in zip(world.prompts, got) for _ in row]
        assert ref_rows == flat_rows, "pi and pi_ref must render prompts to the same token ids to compare them"
        log(f"      scoring {len(flat_ans)} sampled answers under pi_ref (KL; pi's log-probs came with the samples)")
        mine = np.array([s.logp for row in got for s in row])
        ratio = mine - np.array(answer_logps(ref_model, flat_rows, flat_ans))
        kl = ratio.reshape(len(rows), m.kl_samples).mean(1)
    for key, cells in (("kl", kl), ("reward_t1", reward)):
        _, lo, hi = cluster_interval(cluster_means(cells, world.clusters), n_boot=m.n_boot, seed=seed)
        res[key], res[f"{key}_ci"] = float(np.mean(cells)), [lo, hi]
        res.setdefault("cells", {})[key] = [float(v) for v in cells]
    return res


def measure_text(world, model_dir: str | Path, ref_dir: str | Path, opp: list[list[str]], m: TextMeasure, *,
                 builder: BuilderConfig | None = None, seed: int = 0, log=print, frontier_only: bool = False) -> dict:
    """{"deployed": V, reward, KL, the frontier point and per-prompt cells; "reflective": V of pi(.|x, y')}
    for the checkpoint in `model_dir`. With `frontier_only`, just {"deployed": the frontier point}."""
    from inspo_core.generation import rendering_of

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype=torch.float32).eval()
    render = builder or rendering_of(model_dir, model)
    plain = ConditioningBuilder(tok, render, [W_PLAIN])
    is_ref = Path(ref_dir).resolve() == Path(model_dir).resolve()
    ref_model = None if is_ref else load_model(str(ref_dir), dtype=torch.float32).eval()
    ref_tok = tok if is_ref else load_tokenizer(str(ref_dir))
    point = frontier_point(world, model, tok, plain, ref_model, ref_tok, m, seed, log)
    del ref_model
    if frontier_only:
        return {"deployed": point}
    gen = dict(max_new_tokens=world.cfg.max_new_tokens, temperature=m.temperature, top_p=m.top_p,
               batch_size=m.batch_size)
    n = len(opp[0])
    if m.samples > n:
        raise ValueError(f"samples={m.samples} needs at least as many opponents per prompt (n_eval={n})")
    got = sample_sequences(model, tok, [plain.generation_ids(p) for p in world.prompts], n=m.samples,
                           seed=seed * 104_729 + 1, progress=progress_logger(log, "deployed answers"), **gen)
    texts = [[s.text for s in row] for row in got]
    cells = _values(world, texts, opp, lambda i, n_: range(n_))
    cells["reward"] = np.array([np.mean([world.reward(t) for t in row]) for row in texts])
    deployed = {**_summary(world, cells, texts, m.n_boot, seed), "answers": texts,
                "ended": float(np.mean([s.ended for row in got for s in row]))}
    for k in ("kl", "kl_ci", "reward_t1", "reward_t1_ci", "kl_samples"):
        deployed[k] = point[k]
    deployed["cells"].update(point["cells"])
    out = {"deployed": deployed}
    if m.reflective:  # answer i of a prompt is conditioned on opponent i
        cond = ConditioningBuilder(tok, render, [W_GIVEN_L])
        rows = [cond.generation_ids(p, alt if alt.strip() else None) for p, alts in zip(world.prompts, opp)
                for alt in alts[: m.samples]]
        flat = sample_sequences(model, tok, rows, n=1, seed=seed * 7_777 + 3,
                                progress=progress_logger(log, "reflective answers"), **gen)
        refl = [[flat[x * m.samples + i][0].text for i in range(m.samples)] for x in range(len(world.prompts))]
        cells = _values(world, refl, opp, lambda i, n_: [i])
        others = _values(world, refl, opp, lambda i, n_: [j for j in range(n_) if j != i])
        cells["V_others_identity"] = others["V_identity"]
        cells["reward"] = np.array([np.mean([world.reward(t) for t in row]) for row in refl])
        out["reflective"] = {**_summary(world, cells, refl, m.n_boot, seed), "answers": refl}
    return out
