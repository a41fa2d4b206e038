"""`python -m workbench demo`: DPO vs INS-DPO end to end in a token world with an exact oracle.

Builds (or reuses) the world's pi_ref, samples and labels pairs, trains every objective x strategy
x seed, evaluates each final model against pi_ref samples with the oracle, and writes
`<output_dir>/summary.json`, `report.html` and a printed table. Numbers are whatever the world
gives; the report shows the theory's ceilings (pi_bar, pi_star) beside them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from inspo_core.conditioning import BuilderConfig
from inspo_core.evaluate import write_json
from workbench.demo_config import DemoConfig, output_check, run_config, train_and_evaluate



def run_demo(cfg: DemoConfig, log=print, world_overrides: dict | None = None) -> dict:
    if cfg.world == "sentiment":
        from workbench.sentiment_demo import run_sentiment_demo

        output_check(cfg)
        return run_sentiment_demo(cfg, log)
    from inspo_core.worlds.evaluation import reference_samples, theory_ceilings, world_value
    from inspo_core.worlds.token import TokenWorld, TokenWorldConfig, build_reference, sample_pairs
    from workbench.report import aggregate, format_table, write_demo_report

    t0 = time.time()
    out = Path(cfg.output_dir)
    output_check(cfg)
    wcfg = TokenWorldConfig(**(world_overrides or {}), family=cfg.family, n_contexts=cfg.n_contexts,
                            n_items=cfg.n_items, strength=cfg.strength,
                            seed=cfg.world_seed, pretrain_steps=min(cfg.pretrain_steps, 200) if cfg.fast else cfg.pretrain_steps)
    world = TokenWorld(wcfg)
    ref_dir = build_reference(world, cfg.cache_dir, log=log)
    wdir = ref_dir.parent
    ref_texts = reference_samples(world, ref_dir, cfg.n_eval, seed=12345)  # the opponents: pi_ref itself (T=1)
    ceilings = theory_ceilings(world, ref_texts)
    log(f"world {cfg.family}: V(pi_bar) = {ceilings['identity']['pi_bar']:.3f}, "
        f"V(pi_star) = {ceilings['identity']['pi_star']:.3f} (identity, against pi_ref samples of which "
        f"{ceilings['opponent_unparseable']:.1%} are unparseable)")
    builder = BuilderConfig(context_format=cfg.context_format, max_length=cfg.max_length, alpha_draft=cfg.alpha_draft)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p)
    runs = []
    for seed in cfg.seeds:  # pi_ref sampled like every trained model: the baseline the others must beat
        ev = world_value(world, ref_dir, ref_texts, seed=seed, reflective=cfg.reflective, builder=builder, **sampling)
        runs.append({"name": f"pi_ref-s{seed}", "objective": "pi_ref", "strategy": "-", "seed": seed,
                     "run_dir": None, **ev})
    log(f"pi_ref sampled at T={cfg.temperature}, top-p {cfg.top_p}: V = "
        f"{np.mean([r['deployed']['V_identity'] for r in runs]):.3f} (mean over {len(runs)} seeds)")
    combos = [(o, s, seed) for seed in cfg.seeds for o in cfg.objectives for s in cfg.strategies]
    for i, (objective, strategy, seed) in enumerate(combos, 1):
        pairs = sample_pairs(world, ref_dir, cfg.n_pairs, wdir / f"pairs-{cfg.n_pairs}-s{seed}.jsonl", seed=seed, log=log)
        name = f"{objective}-{strategy}-s{seed}"
        log(f"[{i}/{len(combos)}] training {name}")
        settings = {"judge": "oracle", "sampling": sampling, "seed": seed, "opponent": "pi_ref samples at T=1, top-p 1",
                    "world": dataclasses.asdict(wcfg), "measure": {"n_eval": cfg.n_eval, "reflective": cfg.reflective,
                                                                   "builder": dataclasses.asdict(builder)}}

        def evaluate(run_dir: Path, seed=seed) -> dict:
            return world_value(world, run_dir / "final", ref_texts, seed=seed, reflective=cfg.reflective,
                               builder=builder, **sampling)

        run_dir, ev = train_and_evaluate(cfg, run_config(cfg, objective, strategy, seed, ref_dir, pairs, val_size=100,
                                                         eval_every=max(1, cfg.max_steps // 5), log_every=5),
                                         settings, evaluate, log)
        runs.append({"name": name, "objective": objective, "strategy": strategy, "seed": seed,
                     "run_dir": str(run_dir), **ev})
        d = ev["deployed"]
        log(f"    V = {d['V_identity']:.3f} [{d['V_identity_ci'][0]:.3f}, {d['V_identity_ci'][1]:.3f}]"
            + (f"; reflective {ev['reflective']['V_identity']:.3f}" if "reflective" in ev else ""))
    table = aggregate(runs)
    summary = {"config": dataclasses.asdict(cfg), "world": dataclasses.asdict(wcfg), "ceilings": ceilings,
               "table": table, "runs": runs, "minutes": (time.time() - t0) / 60}
    write_json(out / "summary.json", summary)
    write_demo_report(out / "report.html", summary)
    log(format_table(summary))
    log(f"report: {out / 'report.html'}  ({summary['minutes']:.1f} min)")
    return summary


def load_summary(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
