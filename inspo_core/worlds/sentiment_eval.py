"""Evaluating checkpoints in the sentiment world, exactly (the oracle scores any text).

For each held-out prompt x the opponents y' are samples of pi_ref itself (T = 1). A policy is
sampled with the same settings for every row (pi_ref's own row included) and measured by
- V: the oracle's P(y > y' | x) averaged (Psi = identity, and log-odds), with a bootstrap CI;
- the mean oracle reward (VADER sentiment) of its answers;
- KL(pi || pi_ref), estimated from samples of pi at T = 1: the mean over y ~ pi of
  log pi(y|x) - log pi_ref(y|x) (summed over the answer's tokens, end of turn excluded), and the mean
  reward of the same samples: one point of the reward-vs-KL frontier (the DPO paper's Figure 2, left);
- optionally V of the reflective policy pi(. | x, y'), the same checkpoint shown y' first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.evaluate import bootstrap_ci
from inspo_core.generation import sample_batch
from inspo_core.models import load_model, load_tokenizer
from inspo_core.scoring import score_views
from inspo_core.strategies import W_PLAIN
from inspo_core.worlds.evaluation import psi_values
from inspo_core.worlds.sentiment import SentimentWorld, sentiment


def opponents(world: SentimentWorld, ref_dir: str | Path, n: int, seed: int) -> list[list[str]]:
    """n samples of pi_ref (T = 1) per evaluation prompt: the y' every policy is compared with."""
    tok, model = load_tokenizer(str(ref_dir)), load_model(str(ref_dir), dtype=torch.float32).eval()
    b = ConditioningBuilder(tok, BuilderConfig(), [W_PLAIN])
    return sample_batch(model, tok, [b.generation_ids(p) for p in world.prompts], n=n, seed=seed, temperature=1.0,
                        top_p=1.0, max_new_tokens=world.cfg.max_new_tokens)


@torch.no_grad()
def answer_logps(model, tok, prompts: list[str], answers: list[list[str]], batch: int = 16) -> np.ndarray:
    """[sum over prompts of len(answers[i])] log pi(answer | prompt), end of turn left out."""
    b = ConditioningBuilder(tok, BuilderConfig(max_length=4096, exclude_eos=True), [W_PLAIN])
    pairs = [b.build({"prompt": p, "chosen": a or " ", "rejected": a or " "}) for p, ans in zip(prompts, answers)
             for a in ans]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = [score_views(model, pairs[s : s + batch], [W_PLAIN], pad_id=pad).logps[W_PLAIN].double().cpu()
           for s in range(0, len(pairs), batch)]
    return torch.cat(out).numpy()


def _value(world, texts, opp, n_boot, seed) -> dict:
    probs = np.array([world.preference(world.prompts[x], a, b) for x in range(len(world.prompts))
                      for a, b in zip(texts[x], opp[x])])
    flat = [t for row in texts for t in row]
    rewards = np.array([sentiment(t) for t in flat])
    res = {"n": int(len(probs)), "unparseable": float(np.mean([not t.strip() for t in flat])),
           "mean_chars": float(np.mean([len(t) for t in flat])), "mean_words": float(np.mean([len(t.split()) for t in flat])),
           "reward": float(rewards.mean()),
           "reward_ci": list(bootstrap_ci(lambda i: float(rewards[i].mean()), len(rewards), n_boot=n_boot, seed=seed))}
    for name, vals in psi_values(probs).items():
        res[f"V_{name}"] = float(vals.mean())
        res[f"V_{name}_ci"] = list(bootstrap_ci(lambda i, v=vals: float(v[i].mean()), len(vals), n_boot=n_boot,
                                                seed=seed))
    return res


def sentiment_value(world: SentimentWorld, model_dir: str | Path, ref_dir: str | Path, opp: list[list[str]], *,
                    temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, reflective: bool = False,
                    builder: BuilderConfig | None = None, kl_samples: int = 1, n_boot: int = 1000,
                    frontier_only: bool = False) -> dict:
    """{"deployed": V, reward, KL and the frontier point; "reflective": V of pi(.|x, y')} for one model.
    With `frontier_only`, just the frontier point (KL and reward of samples at T = 1)."""
    from inspo_core.generation import rendering_of
    from inspo_core.strategies import W_GIVEN_L

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype=torch.float32).eval()
    render = builder or rendering_of(model_dir, model)
    plain = ConditioningBuilder(tok, render, [W_PLAIN])
    ids = [plain.generation_ids(p) for p in world.prompts]
    gen = dict(max_new_tokens=world.cfg.max_new_tokens)
    n = len(opp[0])
    if frontier_only:
        out = {"deployed": {}}
    else:
        deployed = sample_batch(model, tok, ids, n=n, seed=seed * 104_729 + 1, temperature=temperature, top_p=top_p,
                                **gen)
        out = {"deployed": {**_value(world, deployed, opp, n_boot, seed), "answers": deployed}}
    # the frontier point: samples of the policy itself (T = 1), their reward and log-ratio to pi_ref
    pure = sample_batch(model, tok, ids, n=kl_samples, seed=seed * 15_485_863 + 2, temperature=1.0, top_p=1.0, **gen)
    lp = answer_logps(model, tok, world.prompts, pure)
    ref_tok = load_tokenizer(str(ref_dir))
    ref_model = model if Path(ref_dir).resolve() == Path(model_dir).resolve() else \
        load_model(str(ref_dir), dtype=torch.float32).eval()
    lr = answer_logps(ref_model, ref_tok, world.prompts, pure)
    ratio = lp - lr
    r1 = np.array([sentiment(t) for row in pure for t in row])
    out["deployed"].update({
        "kl": float(ratio.mean()),
        "kl_ci": list(bootstrap_ci(lambda i: float(ratio[i].mean()), len(ratio), n_boot=n_boot, seed=seed)),
        "reward_t1": float(r1.mean()), "kl_samples": int(len(ratio))})
    if reflective and not frontier_only:  # every (prompt, alternative) as its own row, batched across prompts
        cond = ConditioningBuilder(tok, render, [W_GIVEN_L])
        rows = [cond.generation_ids(p, alt if alt.strip() else None) for p, alts in zip(world.prompts, opp)
                for alt in alts]
        got = sample_batch(model, tok, rows, n=1, seed=seed * 7_777 + 3, batch_prompts=16, temperature=temperature,
                           top_p=top_p, **gen)
        texts = [[g[0] for g in got[x * n : (x + 1) * n]] for x in range(len(world.prompts))]
        out["reflective"] = _value(world, texts, opp, n_boot, seed)
    return out


def reference_ceiling(world: SentimentWorld, opp: list[list[str]]) -> dict:
    """What the opponents themselves score: their mean reward and their value against each other
    (Psi = identity: 0.5 by symmetry when estimated on independent pairs)."""
    flat = [t for row in opp for t in row]
    return {"opponent_reward": float(np.mean([sentiment(t) for t in flat])),
            "opponent_words": float(np.mean([len(t.split()) for t in flat]))}
