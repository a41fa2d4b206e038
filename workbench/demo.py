"""`python -m workbench demo`: DPO vs INS-DPO end to end in a world with an exact oracle.

One runner for every world (`inspo_core.worlds.base`): it builds (or reuses) the world's pi_ref and
its opponents, measures pi_ref itself, trains every objective x strategy x beta x seed on the
world's labelled pairs, measures each final model (and, where the world has a reward, one checkpoint
along the way for the frontier) against the same opponents, and writes `<output_dir>/summary.json`,
`report.html` and a printed table with paired differences to the `none` baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from inspo_core.atomic import atomic_write_text
from inspo_core.evaluate import write_json
from workbench.demo_config import DemoConfig, output_check, run_config, run_name, train_and_evaluate


def make_world(cfg: DemoConfig, **overrides):
    """The world a demo config describes (through the world registry), with `overrides` replacing keys
    of the world's own config (e.g. a token world's hidden_size)."""
    from inspo_core.worlds.base import world_class

    world = world_class(cfg.world).from_demo(cfg)
    return type(world)(dataclasses.replace(world.cfg, **overrides)) if overrides else world


def _reference_row(world, cfg: DemoConfig, ref_dir: Path, opp, settings: dict, seed: int, log) -> dict:
    """pi_ref measured like every trained model; cached in the world's directory under the settings
    and opponents it was measured with, so other demos and frontiers of the same world reuse it."""
    key = hashlib.sha256(json.dumps({"world": world.name, "settings": settings, "opponents": opp, "seed": seed},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = world.directory(cfg.cache_dir) / f"pi_ref-measure-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    log(f"measuring pi_ref (seed {seed})")
    ev = world.measure(ref_dir, ref_dir, opp, settings, seed, log)
    atomic_write_text(path, json.dumps(ev))
    return ev


def run_demo(cfg: DemoConfig, log=print, world=None) -> dict:
    """Run (or, with cfg.resume, continue) the demo; `world` replaces the world the config describes
    (the transfer study passes its own)."""
    from workbench.report import aggregate, format_table, write_demo_report

    t0 = time.time()
    out = Path(cfg.output_dir)
    output_check(cfg)
    world = world or make_world(cfg)
    ref_dir = world.reference(cfg.cache_dir, log=log)
    opp = world.opponents(cfg.cache_dir, ref_dir, cfg.n_eval, log=log)
    ceilings = world.ceilings(opp)
    log(ceilings["header"])
    settings = world.measure_settings(cfg)
    runs, points, timing = [], [], {"pi_ref": 0.0, "train": 0.0, "measure": 0.0}
    t = time.time()
    for seed in world.reference_seeds(cfg.seeds):
        ev = _reference_row(world, cfg, ref_dir, opp, settings, seed, log)
        runs.append({"name": f"pi_ref-s{seed}", "objective": "pi_ref", "strategy": "-", "beta": None, "seed": seed,
                     "run_dir": None, **ev})
        if "reward_t1" in ev["deployed"]:
            points.append({"strategy": "pi_ref", "beta": None, "kl": 0.0, "reward": ev["deployed"]["reward_t1"],
                           "reward_ci": ev["deployed"]["reward_t1_ci"], "kl_ci": [0.0, 0.0], "name": "pi_ref",
                           "run": "pi_ref", "order": 0})
        log(f"pi_ref (seed {seed}) at T={cfg.temperature}, top-p {cfg.top_p}: V = {ev['deployed']['V_identity']:.3f}")
    timing["pi_ref"] = time.time() - t
    combos = [(o, s, b, seed) for seed in cfg.seeds for b in cfg.betas for o in cfg.objectives for s in cfg.strategies]
    extra = world.run_settings(cfg)
    mid = extra.get("save_every") or None
    for i, (objective, strategy, beta, seed) in enumerate(combos, 1):
        pairs = world.pairs(cfg.cache_dir, ref_dir, seed, cfg.n_pairs, log=log)
        name = run_name(cfg, objective, strategy, seed, beta)
        log(f"[{i}/{len(combos)}] training {name} ({cfg.max_steps} steps)")
        run_settings = {"judge": "oracle", "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p},
                        "seed": seed, "opponent": "pi_ref samples at T=1, top-p 1",
                        "world": {"kind": world.name, **dataclasses.asdict(world.cfg)},
                        "measure": {**settings, "frontier_step": mid}}
        clock = {}

        def evaluate(run_dir: Path, seed=seed, clock=clock) -> dict:
            clock["trained"] = time.time()
            ev = world.measure(run_dir / "final", ref_dir, opp, settings, seed, log)
            if mid is not None and (run_dir / "checkpoints" / f"step-{mid}").is_dir():
                ev["frontier_mid"] = world.measure(run_dir / "checkpoints" / f"step-{mid}", ref_dir, opp, settings,
                                                   seed, log, frontier_only=True)["deployed"]
            return ev

        t = time.time()
        run_dir, ev = train_and_evaluate(cfg, run_config(cfg, objective, strategy, seed, ref_dir, pairs, beta=beta,
                                                         **extra), run_settings, evaluate, log)
        done = time.time()
        timing["train"] += clock.get("trained", t) - t
        timing["measure"] += done - clock.get("trained", t)
        at_mid = ev.pop("frontier_mid", None)
        runs.append({"name": name, "objective": objective, "strategy": strategy, "beta": beta, "seed": seed,
                     "run_dir": str(run_dir), **ev})
        d = ev["deployed"]
        if "kl" in d:
            points.append({"strategy": strategy, "beta": beta, "kl": d["kl"], "reward": d["reward_t1"],
                           "kl_ci": d["kl_ci"], "reward_ci": d["reward_t1_ci"], "name": f"{name} final", "run": name,
                           "order": cfg.max_steps})
            if at_mid is not None:
                points.append({"strategy": strategy, "beta": beta, "kl": at_mid["kl"], "reward": at_mid["reward_t1"],
                               "kl_ci": at_mid["kl_ci"], "reward_ci": at_mid["reward_t1_ci"],
                               "name": f"{name} step {mid}", "run": name, "order": mid})
        lo, hi = d["V_identity_ci"]
        log(f"    V = {d['V_identity']:.3f} [{lo:.3f}, {hi:.3f}]"
            + (f", reward {d['reward']:.3f}, KL {d['kl']:.2f}" if "kl" in d else "")
            + (f"; reflective {ev['reflective']['V_identity']:.3f}" if "reflective" in ev else "")
            + f"  ({(done - t) / 60:.1f} min)")
    table, diffs = aggregate(runs, world.clusters, world.prompts_sampled)
    summary = {"config": dataclasses.asdict(cfg), "world": {"kind": world.name, **dataclasses.asdict(world.cfg)},
               "ceilings": ceilings, "table": table, "differences": diffs, "runs": runs, "frontier": points,
               "timing_minutes": {k: v / 60 for k, v in timing.items()}, "minutes": (time.time() - t0) / 60}
    write_json(out / "summary.json", summary)
    write_demo_report(out / "report.html", summary, world)
    log(format_table(summary, world))
    log(f"report: {out / 'report.html'}  ({summary['minutes']:.1f} min: pi_ref {timing['pi_ref'] / 60:.1f}, "
        f"training {timing['train'] / 60:.1f}, measuring {timing['measure'] / 60:.1f})")
    return summary


def load_summary(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
