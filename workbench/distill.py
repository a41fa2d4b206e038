"""Carrying the reflection into the deployed policy (issue 21): stages after INS training.

INS-DPO trains the conditioned views pi(y | x, y'); it is deployed from the prompt alone, pi(y | x).
The transfer study (workbench/transfer.py, docs/transfer.md) measures that what the conditioned view
learns does not reach the prompt-only one by itself. A *stage* is a second training run that starts
from a trained run of another strategy (`after`) and trains the prompt-only view on data that run's
conditioned policy generates — with the ordinary trainer and a registry strategy, no new labels:

- `revise` (self-revision pairs). For training prompts x, drafts y' ~ pi_ref(. | x) and revisions
  y ~ pi_INS(. | x, y'); pairs (chosen = y, rejected = y') trained by DPO on the plain view
  (strategy `none`), reference pi_ref, starting from the INS model.
  Is this reward hacking? It optimises a label nobody checked: that the conditioned policy's revision is
  better than the draft it saw. Nothing in the stage can detect when that label is wrong, so the
  stage amplifies whatever the conditioned policy believes, errors included — a self-generated reward,
  exactly the structure reward hacking exploits. It is *not* hacking an exploitable proxy (the
  labels come from the same policy whose views were fitted to the oracle's labelled pairs, and the
  reference keeps it near pi_ref), but whether it helps depends entirely on how often the revision
  really is better. So every stage run records, for its pairs only and never for training, the
  oracle's agreement: the mean of P(y > y' | x) and the fractions of pairs where the revision is
  better, tied (same item) and worse (`oracle_agreement`).
- `distill` (context distillation). The same samples as chosen responses, loss -log pi(y | x)
  (strategy `distill`): with y ~ pi_INS(. | x, y') and y' ~ pi_ref this is the sequence-level forward
  KL(sg pi_INS(. | x, y') || pi(. | x)) averaged over y', minimised by the marginal
  m(y | x) = sum_y' pi_ref(y' | x) pi_INS(y | x, y') (inspo_core.theory.distillation_values (f)). Its
  deployed value converges to V(m) from a fixed teacher; `marginal_value` estimates V(m) exactly for
  the teacher's sampled item distribution, the theory's prediction each stage is compared with.
- `dpo_long` (the compute baseline). DPO from pi_ref on the first stage's labelled pairs for the INS
  run's steps plus the stage's: the same oracle labels and the same optimizer steps as a stage.

Compute per stage run (recorded in `compute`): optimizer steps of both stages, sequences sampled
beyond DPO's (drafts and revisions) and the oracle labels used (the first stage's pairs; none more).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inspo_core.atomic import atomic_write_text


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    after: str | None  # the strategy whose trained run this stage continues (None: trained from pi_ref)
    strategy: str  # the registry strategy (inspo_core.strategies) the stage trains with
    data: str  # "revision_pairs", "teacher" or "labelled"


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("revise", "self-revision pairs: chosen = pi_INS(.|x, y'), rejected = the draft y' ~ pi_ref; DPO on "
              "pi(.|x) from the INS model, reference pi_ref", "symmetric", "none", "revision_pairs"),
        Stage("distill", "context distillation: -log pi(y|x) on y ~ pi_INS(.|x, y'), y' ~ pi_ref, from the INS "
              "model", "symmetric", "distill", "teacher"),
        Stage("dpo_long", "DPO at equal compute: the same labelled pairs, the INS run's steps plus a stage's",
              None, "none", "labelled"),
    ]
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return STAGES[name]


# ---- samples of the conditioned teacher ---------------------------------------------------------------
def sample_revisions(world, teacher_dir, ref_dir, n: int, seed: int, builder_cfg, *, temperature: float = 1.0,
                     top_p: float = 1.0) -> list[dict]:
    """n rows {prompt, context, draft, revision}: x spread over the world's prompts, the draft
    y' ~ pi_ref(. | x) at T = 1, the revision y ~ pi_teacher(. | x, y') at (temperature, top_p), y' rendered
    as in training (`builder_cfg`). Deterministic in `seed`; drafts that are empty (an immediate EOS)
    are kept with an empty revision slot left out by the row builders."""
    from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
    from inspo_core.generation import sample_from_ids, sample_responses
    from inspo_core.models import load_model, load_tokenizer
    from inspo_core.strategies import View

    ref = load_model(str(ref_dir), dtype=torch.float32).eval()
    teacher = load_model(str(teacher_dir), dtype=torch.float32).eval()
    tok = load_tokenizer(str(teacher_dir))
    builder = ConditioningBuilder(tok, builder_cfg if isinstance(builder_cfg, BuilderConfig)
                                  else BuilderConfig(**builder_cfg), [View("chosen", "rejected")])
    rng = np.random.default_rng(seed + 424_242)
    per_context = np.bincount(rng.integers(0, len(world.prompts), size=n), minlength=len(world.prompts))
    rows = []
    for x, k in enumerate(per_context):
        if k == 0:
            continue
        prompt = world.prompts[x]
        drafts = sample_responses(ref, tok, prompt, int(k), seed=777_000 + seed * 1000 + x)
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(drafts):
            groups.setdefault(d, []).append(i)
        revisions = [""] * len(drafts)
        for g, (draft, where) in enumerate(groups.items()):
            if not draft.strip():
                continue
            got = sample_from_ids(teacher, tok, builder.generation_ids(prompt, draft),
                                  seed=991_000 + seed * 100_003 + x * 1009 + g, temperature=temperature, top_p=top_p,
                                  max_new_tokens=16, n=len(where))
            for i, text in zip(where, got):
                revisions[i] = text
        rows += [{"prompt": prompt, "context": x, "draft": d, "revision": r} for d, r in zip(drafts, revisions)]
    return rows


def revision_pairs(rows: list[dict]) -> tuple[list[dict], dict]:
    """Training pairs (chosen = revision, rejected = draft) and what was left out: rows with an empty
    draft or revision (no text to train on) and rows whose revision repeats the draft verbatim (a
    pair with no difference: DPO's gradient on it is zero)."""
    out, left = [], {"empty": 0, "same_text": 0}
    for r in rows:
        if not r["draft"] or not r["revision"]:
            left["empty"] += 1
        elif r["revision"] == r["draft"]:
            left["same_text"] += 1
        else:
            out.append({"prompt": r["prompt"], "chosen": r["revision"], "rejected": r["draft"]})
    return out, left


def teacher_rows(rows: list[dict]) -> tuple[list[dict], dict]:
    """Distillation rows (chosen = the teacher's sample, rejected = the draft it saw, scored for the
    logs only). A revision equal to its draft is a genuine teacher sample and stays; since the data
    loader drops rows whose chosen equals their rejected, such a row's rejected is another draft of
    the same prompt (counted as `other_draft`; the loss never reads it)."""
    out, left = [], {"empty": 0, "other_draft": 0}
    for i, r in enumerate(rows):
        if not r["draft"] or not r["revision"]:
            left["empty"] += 1
            continue
        rejected = r["draft"]
        if rejected == r["revision"]:
            rejected = next((q["draft"] for q in rows[i + 1:] + rows[:i] if q["prompt"] == r["prompt"] and q["draft"]
                             and q["draft"] != r["revision"]), None)
            if rejected is None:
                left["empty"] += 1
                continue
            left["other_draft"] += 1
        out.append({"prompt": r["prompt"], "chosen": r["revision"], "rejected": rejected})
    return out, left


def oracle_agreement(world, rows: list[dict]) -> dict:
    """How often the oracle agrees with the label 'revision > draft' (reporting only, never training):
    mean P(revision > draft | x) and the fractions of rows where it is > 1/2, = 1/2, < 1/2."""
    p = np.array([world.preference(r["prompt"], r["revision"], r["draft"]) for r in rows
                  if r["draft"] and r["revision"]])
    if not len(p):
        return {"n": 0, "mean_p": float("nan"), "better": float("nan"), "tie": float("nan"), "worse": float("nan")}
    return {"n": int(len(p)), "mean_p": float(p.mean()), "better": float((p > 0.5).mean()),
            "tie": float((p == 0.5).mean()), "worse": float((p < 0.5).mean())}


def marginal_value(world, texts_by_context: list[list[str]], opp: list[list[str]]) -> float:
    """V (identity Psi) of the policy whose samples for prompt x are texts_by_context[x], against the
    opponents opp[x], computed exactly from both empirical item distributions and unparseable
    fractions (the oracle's rules: an unparseable text loses, two tie), prompts weighted equally.
    For revisions pooled over drafts y' ~ pi_ref this is V(m), the marginal's value."""
    vals = []
    for x in range(len(world.prompts)):
        m, u_m = _items(world, texts_by_context[x])
        o, u_o = _items(world, opp[x])
        v_p = float(m @ world.P[x] @ o)
        vals.append((1 - u_m) * (1 - u_o) * v_p + (1 - u_m) * u_o + u_m * u_o * 0.5)
    return float(np.mean(vals))


def theory_values(world, opp: list[list[str]]) -> dict[str, float]:
    """V (identity Psi) of pi_bar, pi_star and of pi_star's marginal m* = sum_y' pi_ref(y') pi_star(.|x, y')
    against the opponents `opp`, exactly, from their item distribution (inspo_core.theory; the
    `ins_marginal`-free part of `theory.distillation_values`). V(m*) is what distilling the *optimal*
    reflection into a prompt-only policy would give; V(pi_bar) bounds every distillation. The drafts
    pi_star answers are the opponents' parseable texts (an unparseable draft has no best answer); a
    parseable policy scores (1 - u) V_p + u against opponents unparseable with frequency u, as in
    `worlds.evaluation.theory_ceilings`."""
    from inspo_core import theory as th
    from inspo_core.worlds.evaluation import item_distribution

    ref, u = item_distribution(world, opp)
    star = th.pi_star(world.P, "identity")
    v = lambda pi: (1 - u) * th.value(pi, world.P, ref, "identity") + u  # noqa: E731
    return {"pi_bar": v(th.pi_bar(world.P, ref, "identity")), "pi_star": v(star),
            "pi_star_marginal": v(th.marginalize(star, ref))}


def _items(world, texts: list[str]) -> tuple[np.ndarray, float]:
    counts = np.zeros(len(world.items))
    bad = 0
    for t in texts:
        y = world.parse(t)
        if y is None:
            bad += 1
        else:
            counts[y] += 1
    return counts / max(counts.sum(), 1), bad / max(len(texts), 1)


def by_context(world, rows: list[dict], key: str = "revision") -> list[list[str]]:
    out: list[list[str]] = [[] for _ in world.prompts]
    for r in rows:
        out[r["context"]].append(r[key])
    return out


# ---- one stage run --------------------------------------------------------------------------------------
def teacher_samples(world, teacher_dir, ref_dir, n: int, seed: int, builder_cfg, path: Path, **sampling) -> list[dict]:
    """`sample_revisions` (default T = 1: the teacher itself), cached at `path` (the stages of one
    teacher share it)."""
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    rows = sample_revisions(world, teacher_dir, ref_dir, n, seed, builder_cfg, **sampling)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_stage(stage: Stage, world, demo_cfg, base_runs: dict, seed: int, *, steps: int, n_samples: int, ref_dir,
              opp, settings: dict, log=print) -> dict:
    """Train and measure one stage run for `seed`; returns a run record like the demo's (name, objective,
    strategy = the stage's name, seed, run_dir, deployed, reflective) plus `compute`, and for stages
    with a teacher `teacher_marginal` (V of the teacher's marginal at T = 1 and at the measurement's
    sampling settings) and, for `revise`, `oracle_agreement`. `base_runs` maps (strategy, seed) to the
    demo's run records."""
    from workbench.demo_config import run_config, train_and_evaluate

    out = Path(demo_cfg.output_dir)
    objective, beta = demo_cfg.objectives[0], demo_cfg.betas[0]
    extra = world.run_settings(demo_cfg)
    record: dict = {"name": f"{objective}-{stage.name}-s{seed}", "objective": objective, "strategy": stage.name,
                    "beta": beta, "seed": seed}
    n_pairs_first = demo_cfg.n_pairs
    if stage.after is None:  # the compute baseline: the first stage's data and labels, more steps
        data = world.pairs(demo_cfg.cache_dir, ref_dir, seed, demo_cfg.n_pairs, log=log)
        run = run_config(demo_cfg, objective, stage.strategy, seed, ref_dir, data, **extra)
        run = dataclasses.replace(run, max_steps=demo_cfg.max_steps + steps)
        record["compute"] = {"steps": demo_cfg.max_steps + steps, "extra_sequences": 0, "labels": n_pairs_first}
    else:
        base = base_runs[stage.after, seed]
        teacher = Path(base["run_dir"]) / "final"
        data_dir = out / "stage-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        rows = teacher_samples(world, teacher, ref_dir, n_samples, seed, settings["builder"],
                               data_dir / f"{stage.after}-samples-s{seed}.jsonl")
        train_rows, left = (revision_pairs if stage.data == "revision_pairs" else teacher_rows)(rows)
        data = data_dir / f"{stage.name}-s{seed}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in train_rows))
        run = run_config(demo_cfg, objective, stage.strategy, seed, teacher, data, **extra)
        run = dataclasses.replace(run, max_steps=steps, ref_model=str(ref_dir))
        measured = teacher_samples(world, teacher, ref_dir, len(opp[0]) * len(world.prompts), seed + 50_000,
                                   settings["builder"], data_dir / f"{stage.after}-measured-s{seed}.jsonl",
                                   temperature=settings["temperature"], top_p=settings["top_p"])
        record["teacher_marginal"] = {"T1": marginal_value(world, by_context(world, rows), opp),
                                      "measured": marginal_value(world, by_context(world, measured), opp)}
        record["compute"] = {"steps": demo_cfg.max_steps + steps, "extra_sequences": 2 * len(rows),
                             "labels": n_pairs_first, "stage_rows": len(train_rows), "left_out": left}
        if stage.name == "revise":
            record["oracle_agreement"] = oracle_agreement(world, rows)
    run = dataclasses.replace(run, output_dir=str(out / record["name"]))
    run_settings = {"judge": "oracle", "sampling": {"temperature": demo_cfg.temperature, "top_p": demo_cfg.top_p},
                    "seed": seed, "opponent": "pi_ref samples at T=1, top-p 1",
                    "world": {"kind": world.name, **dataclasses.asdict(world.cfg)},
                    "measure": settings, "stage": {"name": stage.name, "after": stage.after, "steps": steps,
                                                   "n_samples": n_samples}}
    log(f"  stage {record['name']} ({run.max_steps} steps on {run.data})")
    run_dir, ev = train_and_evaluate(demo_cfg, run, run_settings,
                                     lambda d: world.measure(d / "final", ref_dir, opp, settings, seed, log), log)
    return {**record, "run_dir": str(run_dir), **ev}


def run_stages(stages: list[str], world, demo_cfg, summary: dict, *, steps: int, n_samples: int, log=print) -> list[dict]:
    """Every stage x seed of one demo (whose `summary` holds the runs the stages continue)."""
    ref_dir = world.reference(demo_cfg.cache_dir, log=log)
    opp = world.opponents(demo_cfg.cache_dir, ref_dir, demo_cfg.n_eval, log=log)
    settings = world.measure_settings(demo_cfg)
    base = {(r["strategy"], r["seed"]): r for r in summary["runs"] if r["run_dir"]}
    return [run_stage(get_stage(s), world, demo_cfg, base, seed, steps=steps, n_samples=n_samples, ref_dir=ref_dir,
                      opp=opp, settings=settings, log=log)
            for seed in demo_cfg.seeds for s in stages]
