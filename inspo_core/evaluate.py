"""Win rates: plain, length-controlled (AlpacaEval 2 style), with bootstrap confidence intervals;
and judging runs that write each judgement as it lands so an interrupted run resumes."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from inspo_core.atomic import atomic_write_text


def win_rate(probs: Sequence[float]) -> float:
    """Mean probability that the candidate wins; a tie (0.5) counts half."""
    return float(np.mean(probs)) if len(probs) else float("nan")


def lc_win_rate(probs: Sequence[float], len_a: Sequence[int], len_b: Sequence[int], iters: int = 50) -> float:
    """Length-controlled win rate: fit logit p = w0 + w1 tanh((|a| - |b|) / sd) to the judge's
    probabilities (a logistic GLM with soft labels, as AlpacaEval 2's LC without the per-instruction
    term) and report sigma(w0), the win rate at equal length."""
    p = np.clip(np.asarray(probs, dtype=float), 0.0, 1.0)
    d = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
    sd = d.std()
    f = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    Xm = np.stack([np.ones_like(f), f], 1)
    w = np.zeros(2)
    for _ in range(iters):  # Newton-Raphson on the soft-label log-likelihood (+ a tiny ridge)
        q = 1 / (1 + np.exp(-Xm @ w))
        grad = Xm.T @ (p - q) - 1e-6 * w
        H = (Xm * (q * (1 - q))[:, None]).T @ Xm + 1e-6 * np.eye(2)
        step = np.linalg.solve(H, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + math.exp(-w[0])))


def bootstrap_ci(stat: Callable[[np.ndarray], float], n_items: int, *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of `stat(indices)` over resamples of the item indices."""
    if n_items == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = [stat(rng.integers(0, n_items, size=n_items)) for _ in range(n_boot)]
    lo, hi = np.nanpercentile(vals, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


@dataclass
class Judgement:
    key: str
    prompt: str
    a: str
    b: str
    prob: float  # probability that a is better
    explanation: str = ""


def summarize(judgements: list[Judgement], *, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    probs = np.array([j.prob for j in judgements])
    la = np.array([len(j.a) for j in judgements])
    lb = np.array([len(j.b) for j in judgements])
    wr_lo, wr_hi = bootstrap_ci(lambda i: win_rate(probs[i]), len(probs), n_boot=n_boot, seed=seed)
    lc = lc_win_rate(probs, la, lb) if len(probs) else float("nan")
    lc_lo, lc_hi = bootstrap_ci(lambda i: lc_win_rate(probs[i], la[i], lb[i]), len(probs), n_boot=min(n_boot, 300),
                                seed=seed)
    return {"n": len(probs), "win_rate": win_rate(probs), "win_rate_ci": [wr_lo, wr_hi],
            "lc_win_rate": lc, "lc_win_rate_ci": [lc_lo, lc_hi],
            "wins": int((probs > 0.5).sum()), "ties": int((probs == 0.5).sum()), "losses": int((probs < 0.5).sum())}


def describe_checkpoint(model_dir: str | Path) -> dict:
    """What a model directory is, for eval.json and judgement keys: its path, a fingerprint of its
    weights and config, and (when it belongs to a run) the run, objective, strategy and config hash."""
    from inspo_core.fingerprint import model_fingerprint
    from inspo_core.rundir import RunDir

    run = RunDir.of_model(model_dir)
    conf = run.read_config() if run else {}
    return {"checkpoint": str(Path(model_dir).resolve()), "fingerprint": model_fingerprint(str(model_dir)),
            "run": str(run.path.resolve()) if run else None, "objective": conf.get("objective"),
            "strategy": conf.get("strategy"), "config_hash": run.config_hash() if run else None}


def judgement_key(**what) -> str:
    """A judgement's identity: a hash of everything that determines it (checkpoint identities, prompt
    text, both answers, sampling settings, the judge and its settings)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


class JudgementLog:
    """Judgements appended to a JSONL file as they finish, keyed by `judgement_key`: a rerun reuses
    exactly the judgements of the same comparison and nothing else. A line that is not a judgement
    (cut by a crash, or valid JSON of another shape) is skipped and counted in `skipped`; its item is
    judged again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: dict[str, Judgement] = {}
        self.skipped = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                j = _judgement_of(line)
                if j is None:
                    self.skipped += 1
                else:
                    self.done[j.key] = j

    def add(self, j: Judgement) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(j.__dict__) + "\n")
        self.done[j.key] = j


_JUDGEMENT_FIELDS = {"key": str, "prompt": str, "a": str, "b": str, "prob": (int, float), "explanation": str}


def _judgement_of(line: str) -> Judgement | None:
    """The judgement a log line holds; None for a cut line or JSON of any other shape."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or not set(_JUDGEMENT_FIELDS) - {"explanation"} <= set(row) <= set(_JUDGEMENT_FIELDS):
        return None
    if any(not isinstance(row[k], t) or isinstance(row[k], bool) for k, t in _JUDGEMENT_FIELDS.items() if k in row):
        return None
    if not 0.0 <= row["prob"] <= 1.0:  # also refuses NaN
        return None
    return Judgement(**row)


def judge_all(judge, items: list[tuple[str, str, str, str]], log: JudgementLog, progress=None) -> tuple[list[Judgement], int]:
    """items: (key, prompt, a, b). Judges what `log` lacks; a judge error stops with the rest kept.
    Returns the judgements in item order and how many judge calls were made."""
    out, calls = [], 0
    for key, prompt, a, b in items:
        if key not in log.done:
            prob, why = judge.compare(prompt, a, b)
            calls += 1
            log.add(Judgement(key, prompt, a, b, float(prob), why))
        out.append(log.done[key])
        if progress:
            progress()
    return out, calls


def generate_responses(model_dir: str | Path, prompts: list, n: int, *, temperature: float = 0.7,
                       top_p: float = 0.95, max_new_tokens: int = 256, seed: int = 0,
                       trust_remote_code: bool = False, batch_size: int = 96,
                       progress=None) -> list[list[str]]:
    """n sampled responses per prompt (strings or chat message lists) from the prompt alone: the
    deployment setting. Batched (`sample_sequences`, about `batch_size` answers per call) and seeded per
    answer, answer k to prompt i by `answer_seed(seed, i, k)`: two checkpoints see the same random stream,
    and the answers do not depend on `batch_size`. `progress(done, total)` counts answers."""
    from inspo_core.generation import ModelCache, prompt_ids, sample_sequences

    model, tok, builder = ModelCache(size=1, trust_remote_code=trust_remote_code).get(model_dir)
    rows = [prompt_ids(builder, prompt, max_new_tokens) for prompt in prompts]
    got = sample_sequences(model, tok, rows, n=n, seed=seed, batch_size=batch_size, progress=progress,
                           temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    return [[s.text for s in answers] for answers in got]


def write_json(path: str | Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=1))
