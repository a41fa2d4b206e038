"""The transfer study (notebook 06): does what INS-DPO learns on conditioned views reach the deployed
policy pi(.|x), which never sees an alternative?

Every point of the grid — model capacity x world — is one token-world demo (`run_demo`) in
`<output_dir>/<size>-<world>/`: real run directories with eval.json that the app's dashboard opens,
and `--resume` continues an interrupted study where it stopped. A world is `cyclic:<bt>` (the cyclic
family: a tournament at strength 3 plus bt times a separable Bradley-Terry score on the logit scale, so bt
= 0 is a pure tournament and separability grows with bt), `bradley_terry` (separable) or `salience`. Side axes (beta, training
length, how much of pi_ref's pre-training saw the conditioned layout, ...) vary one key at a time around
a reference point, so their cost adds instead of multiplying.

Per point and strategy, over seeds with Student-t intervals: V of the deployed and of the reflective
policy, the transfer gap V(deployed INS) - V(deployed DPO) paired by seed, the reflection gain
V(reflective) - V(deployed) of the same runs, and where the deployed V lands between pi_ref (0) and
pi_bar (1), the best any prompt-only policy can do (pi_star is the conditioned optimum).

Strategies may also name stages (`workbench.distill.STAGES`: `revise`, `distill`, `dpo_long`), second
runs that carry the INS run's reflection into pi(.|x); each is trained after the point's demo, from the
same seed's `symmetric` run, and measured against the same opponents. Their rows add the compute they
spent, the theory's prediction V(m) (the INS teacher's marginal) and where the deployed V lands between
DPO (0) and V(m) (1); `dpo_long` is DPO at the stages' total steps, the equal-compute baseline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspo_core.config import opt
from workbench.report import seed_interval

# name: (hidden size, layers) of the world's LM (vocabulary 512, heads = hidden / 16)
SIZES = {"xs": (16, 1), "s": (32, 2), "m": (64, 2), "l": (128, 2), "xl": (256, 4)}
WORLD_KEYS = {"pretrain_context_frac", "pretrain_steps", "strength", "ref_concentration", "delta", "n_contexts",
              "n_items"}  # side-axis keys that change the world (the rest are demo settings)


@dataclass
class TransferConfig:
    sizes: list = opt(["xs", "s", "m", "l"], f"capacities of the world's LM: {', '.join(SIZES)}")
    worlds: list = opt(["cyclic:0", "cyclic:1", "bradley_terry", "salience"],
                       "worlds: cyclic:<bt> (tournament + bt x a separable score), bradley_terry, salience")
    strategies: list = opt(["none", "symmetric", "averaged"], "strategies (none is the DPO baseline of the gap) and "
                           "stages after them (workbench.distill: revise, distill, dpo_long)")
    stage_steps: int = opt(125, "optimizer steps of a stage (revise, distill); dpo_long trains max_steps + this")
    stage_samples: int = opt(2000, "drafts y' ~ pi_ref (each with one revision) a stage's teacher samples per seed")
    w: float = opt(0.5, "weight of the symmetric term of `averaged`")
    seeds: list = opt([0, 1, 2], "training seeds (pairs re-sampled per seed)")
    vary: str = opt("", "side axes at the reference point, one key at a time: 'beta=0.1,2;max_steps=125,1000;"
                        "pretrain_context_frac=0,1;w=0.25,0.75' (w: the weight of `averaged`)")
    reference_point: str = opt("l:cyclic:0", "size:world the side axes vary around")
    beta: float = opt(0.5, "objective beta")
    max_steps: int = opt(375, "optimizer steps per run")
    n_pairs: int = opt(2000, "labelled pairs per seed")
    n_eval: int = opt(300, "opponent samples per prompt for V")
    pretrain_steps: int = opt(300, "pre-training steps of each world's pi_ref")
    fast: bool = opt(False, "a 2 x 2 grid (sizes xs, s; cyclic:0 and cyclic:1), none and symmetric, 2 seeds, 20 steps")
    output_dir: str = opt("runs/transfer", "one demo directory per point")
    cache_dir: str = opt(".cache/inspo", "pi_ref, pairs and reference log-probs cache")
    resume: bool = opt(False, "continue an interrupted study (finished runs are reused)")

    def __post_init__(self):
        if self.fast:
            self.sizes, self.worlds = ["xs", "s"], ["cyclic:0", "cyclic:1"]
            self.strategies = [s for s in self.strategies if s in ("none", "symmetric")]
            self.seeds = self.seeds[:2]
            self.max_steps, self.n_pairs, self.n_eval, self.pretrain_steps = 20, 300, 40, 60
        problems = [f"size {s!r} unknown; valid: {', '.join(SIZES)}" for s in self.sizes if s not in SIZES]
        for w in self.worlds:
            try:
                world_settings(w)
            except ValueError as e:
                problems.append(str(e))
        from workbench.distill import STAGES
        from inspo_core.strategies import STRATEGIES

        for s in self.strategies:
            if s not in STRATEGIES and s not in STAGES:
                problems.append(f"strategy {s!r} unknown; valid: {', '.join(STRATEGIES)} and the stages "
                                f"{', '.join(STAGES)}")
            elif s in STAGES and STAGES[s].after and STAGES[s].after not in self.strategies:
                problems.append(f"stage {s!r} continues the {STAGES[s].after!r} runs: add {STAGES[s].after} to "
                                "strategies")
        if "none" not in self.strategies:
            problems.append("strategies must include none: the transfer gap is measured against DPO")
        if len(self.seeds) < 2:
            problems.append("at least 2 seeds: the study reports intervals over seeds")
        for key in ("seeds", "sizes", "worlds", "strategies"):  # a repeat would be trained or counted twice
            values = getattr(self, key)
            twice = list(dict.fromkeys(v for v in values if values.count(v) > 1))
            if twice:
                problems.append(f"{key} {values}: " + ", ".join(f"{v} appears twice" for v in twice)
                                + "; give each once")
        try:
            self.side_axes()
        except ValueError as e:
            problems.append(str(e))
        size, _, world = self.reference_point.partition(":")
        try:
            world_settings(world)
            if size not in SIZES:
                raise ValueError(f"its size {size!r} is not one of {', '.join(SIZES)}")
        except ValueError as e:
            problems.append(f"reference_point {self.reference_point!r} (size:world): {e}")
        if problems:
            raise ValueError("invalid TransferConfig:\n  - " + "\n  - ".join(problems))

    def side_axes(self) -> dict[str, list]:
        from inspo_core.config import coerce
        from workbench.demo_config import DemoConfig

        demo_keys = {f.name for f in dataclasses.fields(DemoConfig)}
        axes = {}
        for part in filter(None, (p.strip() for p in self.vary.split(";"))):
            key, _, values = part.partition("=")
            key = key.strip()
            if not values or (key not in WORLD_KEYS and key not in demo_keys):
                raise ValueError(f"vary entry {part!r}: want key=v1,v2 with key a demo setting or one of "
                                 f"{', '.join(sorted(WORLD_KEYS))}")
            if key in WORLD_KEYS:
                axes[key] = [float(v) if "." in v else int(v) for v in values.split(",")]
            else:
                axes[key] = [coerce(DemoConfig, key, v.strip()) for v in values.split(",")]
        return axes


def world_settings(name: str) -> dict:
    """`cyclic:0.3` -> {family: cyclic, bt: 0.3}; `salience` -> {family: salience}."""
    family, _, bt = name.partition(":")
    if family not in ("cyclic", "bradley_terry", "salience"):
        raise ValueError(f"world {name!r}: family must be cyclic, bradley_terry or salience")
    if bt and family != "cyclic":
        raise ValueError(f"world {name!r}: only the cyclic family takes a separable weight")
    if bt:
        try:
            value = float(bt)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"world {name!r}: the separable weight must be a number >= 0; want "
                             "cyclic:<bt> with bt a number >= 0, e.g. cyclic:0 or cyclic:0.5")
        return {"family": family, "bt": value}
    return {"family": family}


def points(cfg: TransferConfig) -> list[dict]:
    """Every point of the study: the grid, then the side axes around the reference point."""
    out = [{"size": s, "world": w, "axis": "grid", "setting": {}} for s in cfg.sizes for w in cfg.worlds]
    size, _, world = cfg.reference_point.partition(":")
    for key, values in cfg.side_axes().items():
        out += [{"size": size, "world": world, "axis": key, "setting": {key: v}} for v in values]
    for p in out:
        p["name"] = f"{p['size']}-{p['world'].replace(':', '')}" + "".join(f"-{k}={v}" for k, v in p["setting"].items())
    return out


def run_point(cfg: TransferConfig, point: dict, log=print) -> dict:
    from workbench.distill import STAGES, run_stages
    from inspo_core.evaluate import write_json
    from workbench.demo import make_world, run_demo
    from workbench.demo_config import DemoConfig

    hidden, layers = SIZES[point["size"]]
    world = {"hidden_size": hidden, "num_layers": layers, **world_settings(point["world"])}
    family = world.pop("family")
    stages = [s for s in cfg.strategies if s in STAGES]
    demo = dict(world="token", family=family, seeds=list(cfg.seeds),
                strategies=[s for s in cfg.strategies if s not in STAGES], w=cfg.w,
                beta=cfg.beta, max_steps=cfg.max_steps, n_pairs=cfg.n_pairs, n_eval=cfg.n_eval,
                pretrain_steps=cfg.pretrain_steps, output_dir=str(Path(cfg.output_dir) / point["name"]),
                cache_dir=cfg.cache_dir, resume=cfg.resume or (Path(cfg.output_dir) / point["name"]).is_dir())
    for k, v in point["setting"].items():
        (world if k in WORLD_KEYS else demo)[k] = v
    demo_cfg = DemoConfig(**demo)  # the demo's own world, with the point's capacity and preferences
    the_world = make_world(demo_cfg, **world)
    summary = run_demo(demo_cfg, log=log, world=the_world)
    if stages:  # after the demo: the stages continue its runs; their records sit beside summary.json
        extra = run_stages(stages, the_world, demo_cfg, summary, steps=cfg.stage_steps, n_samples=cfg.stage_samples,
                           log=log)
        from workbench.distill import theory_values

        opp = the_world.opponents(demo_cfg.cache_dir, the_world.reference(demo_cfg.cache_dir), demo_cfg.n_eval)
        theory = theory_values(the_world, opp)
        write_json(Path(demo_cfg.output_dir) / "stages.json", {"stages": stages, "runs": extra, "theory": theory})
        summary = {**summary, "runs": summary["runs"] + extra, "theory": theory}
    return summary


def run_transfer(cfg: TransferConfig, log=print) -> dict:
    """Run (or continue) every point; write <output_dir>/transfer.json with the analysis. The points an
    earlier study left in transfer.json are kept: a point run again replaces its entry (by name), the
    rest stay as they were, each with the study settings (`config`) that measured it."""
    from inspo_core.evaluate import write_json

    t0 = time.time()
    todo = points(cfg)
    path = Path(cfg.output_dir) / "transfer.json"
    earlier = _earlier_points(path)
    config = dataclasses.asdict(cfg)
    doc = {"config": config, "points": list(earlier.values()), "minutes": 0.0}
    minutes_before = sum(p.get("minutes", 0.0) for name, p in earlier.items() if name not in {q["name"] for q in todo})
    for i, p in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {p['name']}")
        t_point = time.time()
        summary = run_point(cfg, p, log=lambda m: None)
        entry = {**p, "summary": str(Path(cfg.output_dir) / p["name"] / "summary.json"),
                 "rows": analyse_point(summary), "minutes": (time.time() - t_point) / 60, "config": config}
        names = [q["name"] for q in doc["points"]]
        if p["name"] in names:
            doc["points"][names.index(p["name"])] = entry
        else:
            doc["points"].append(entry)
        doc["minutes"] = minutes_before + (time.time() - t0) / 60
        write_json(path, doc)  # after every point: an interrupted study shows what it measured
        log(format_point(entry))
    log(f"\n{format_table(doc)}\n(mean ± 95% t half-width over seeds; * = the interval excludes 0; "
        f"{doc['minutes']:.0f} min)")
    stages = format_stage_table(doc)
    if stages:
        log(f"\nstages (workbench.distill):\n{stages}")
    held = findings(doc)
    log("\n".join(["across seeds:"] + held) if held else "no gap or gain is separated from 0 across these seeds")
    return doc


def _earlier_points(path: Path) -> dict[str, dict]:
    """The points an earlier study wrote to `path`, by name ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
        pts = doc["points"]
        return {p["name"]: p for p in pts}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a transfer study's record ({e}); move it away or choose another "
                         "output_dir: its points would be lost") from None


def parameters(summary: dict) -> int:
    """Parameters of the point's LM (its pi_ref), read from the safetensors header."""
    from safetensors import safe_open

    run = next(r for r in summary["runs"] if r["run_dir"])
    model = Path(run["run_dir"]) / "final" / "model.safetensors"
    with safe_open(str(model), "pt") as f:
        total = 0
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
    return total


def analyse_point(summary: dict) -> list[dict]:
    """One row per strategy: deployed and reflective V, gap to DPO and reflection gain (paired by
    seed), and the deployed V's place between pi_ref (0) and pi_bar (1). Rows of stages
    (workbench.distill) and of the strategy they continue add `marginal` (the theory's prediction
    V(m) of the teacher's marginal, at the measurement's sampling) and `marginal_gap_vs_dpo` (V(m) - V DPO,
    paired by seed: the gap a perfect distillation would have), a stage's `toward_marginal`
    ((V - V DPO) / (V(m) - V DPO): 0 at DPO, 1 at the prediction), `gap_vs_dpo_long` (against DPO at
    equal steps, when measured), `oracle_agreement` (revise) and `compute` (steps, extra sampled
    sequences, oracle labels; means over seeds)."""
    runs = summary["runs"]
    c = summary.get("ceilings", {}).get("identity", {})  # the token worlds' exact ceilings (a text world has none)
    v_ref = seed_interval([r["deployed"]["V_identity"] for r in runs if r["objective"] == "pi_ref"])[0]
    by_seed = {(r["strategy"], r["seed"]): r for r in runs if r["run_dir"]}
    strategies = list(dict.fromkeys(r["strategy"] for r in runs if r["run_dir"]))
    n_params = parameters(summary)
    rows = []
    for s in strategies:
        seeds = sorted(seed for (st, seed) in by_seed if st == s)
        dep = [by_seed[s, k]["deployed"]["V_identity"] for k in seeds]
        ref = [by_seed[s, k]["reflective"]["V_identity"] for k in seeds if "reflective" in by_seed[s, k]]
        gap = [by_seed[s, k]["deployed"]["V_identity"] - by_seed["none", k]["deployed"]["V_identity"]
               for k in seeds if ("none", k) in by_seed]
        span = c["pi_bar"] - v_ref if c else float("nan")
        rows.append({"strategy": s, "seeds": len(seeds), "parameters": n_params, "deployed": seed_interval(dep),
                     "reflective": seed_interval(ref) if ref else None,
                     "gap_vs_dpo": seed_interval(gap) if s != "none" else None,
                     "reflection_gain": seed_interval([r - d for r, d in zip(ref, dep)]) if ref else None,
                     "toward_pi_bar": (seed_interval(dep)[0] - v_ref) / span if span > 1e-9 else float("nan"),
                     "pi_ref": v_ref, "pi_bar": c.get("pi_bar", float("nan")),
                     "pi_star": c.get("pi_star", float("nan"))})
    _stage_columns(rows, by_seed, summary.get("config", {}))
    for row in rows:  # V(m*): distilling the optimal reflection (workbench.distill.theory_values)
        if "theory" in summary:
            row["pi_star_marginal"] = summary["theory"]["pi_star_marginal"]
    return rows


def _stage_columns(rows: list[dict], by_seed: dict, demo_config: dict) -> None:
    """The stage columns of `analyse_point`, added in place."""
    from workbench.distill import STAGES

    steps = demo_config.get("max_steps")
    dpo = {k: r["deployed"]["V_identity"] for (st, k), r in by_seed.items() if st == "none"}
    marginal: dict[str, dict[int, float]] = {}  # teacher strategy -> seed -> V(m)
    for (st, k), r in by_seed.items():
        if "teacher_marginal" in r:
            marginal.setdefault(STAGES[st].after, {})[k] = r["teacher_marginal"]["measured"]
    for row in rows:
        s = row["strategy"]
        runs = {k: r for (st, k), r in by_seed.items() if st == s}
        comp = [r.get("compute", {"steps": steps, "extra_sequences": 0}) for r in runs.values()]
        row["compute"] = {key: float(np.mean([c[key] for c in comp])) for key in ("steps", "extra_sequences")
                          if all(c.get(key) is not None for c in comp)}
        teacher = STAGES[s].after if s in STAGES else s
        if teacher in marginal:
            row["marginal"] = seed_interval(list(marginal[teacher].values()))
            # the theory's gap: what a perfect distillation of each seed's INS run would gain over its DPO run
            row["marginal_gap_vs_dpo"] = seed_interval([v - dpo[k] for k, v in sorted(marginal[teacher].items())
                                                        if k in dpo])
        if s in STAGES and STAGES[s].after and "marginal" in row and dpo:
            span = row["marginal"][0] - float(np.mean(list(dpo.values())))
            row["toward_marginal"] = ((row["deployed"][0] - float(np.mean(list(dpo.values())))) / span
                                      if abs(span) > 1e-9 else float("nan"))
        longer = {k: r["deployed"]["V_identity"] for (st, k), r in by_seed.items() if st == "dpo_long"}
        if longer and s not in ("none", "dpo_long"):
            row["gap_vs_dpo_long"] = seed_interval([runs[k]["deployed"]["V_identity"] - longer[k]
                                                    for k in sorted(runs) if k in longer])
        agree = [r["oracle_agreement"] for r in runs.values() if "oracle_agreement" in r]
        if agree:
            row["oracle_agreement"] = {key: float(np.mean([a[key] for a in agree]))
                                       for key in ("mean_p", "better", "tie", "worse")}


def _ci(t) -> str:
    if t is None:
        return "-"
    m, lo, hi = t
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo == lo else f"{m:+.3f}"


def format_point(p: dict) -> str:
    lines = [f"  {p['name']} ({p['rows'][0]['parameters'] / 1e3:.0f}k parameters): pi_ref "
             f"{p['rows'][0]['pi_ref']:.3f}, pi_bar {p['rows'][0]['pi_bar']:.3f}, pi_star {p['rows'][0]['pi_star']:.3f}"]
    for r in p["rows"]:
        lines.append(f"    {r['strategy']:<10} deployed {r['deployed'][0]:.3f}  reflective "
                     f"{r['reflective'][0] if r['reflective'] else float('nan'):.3f}  gap vs DPO {_ci(r['gap_vs_dpo'])}"
                     f"  reflection gain {_ci(r['reflection_gain'])}  toward pi_bar {r['toward_pi_bar']:+.2f}")
        extra = []
        if "gap_vs_dpo_long" in r:
            extra.append(f"gap vs DPO at equal steps {_ci(r['gap_vs_dpo_long'])}")
        if "marginal" in r:
            extra.append(f"V(marginal) {r['marginal'][0]:.3f}")
        if "toward_marginal" in r:
            extra.append(f"DPO -> V(marginal) {r['toward_marginal']:+.2f}")
        if "oracle_agreement" in r:
            a = r["oracle_agreement"]
            extra.append(f"oracle on revision > draft: P {a['mean_p']:.3f}, better {a['better']:.2f} / tie "
                         f"{a['tie']:.2f} / worse {a['worse']:.2f}")
        if r.get("compute"):
            extra.append(", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in r["compute"].items()))
        if extra:
            lines.append("               " + "; ".join(extra))
    return "\n".join(lines)


def _pm(t) -> str:
    """mean ± half-width of a t-interval, starred when the interval excludes 0."""
    if t is None:
        return "-"
    m, lo, hi = t
    if lo != lo:
        return f"{m:+.3f}"
    return f"{m:+.3f} ± {(hi - lo) / 2:.3f}" + ("*" if lo > 0 or hi < 0 else " ")


def format_table(doc: dict) -> str:
    """One line per point: pi_ref and pi_bar, each strategy's deployed V, and per strategy beyond DPO
    its gap to DPO and its reflection gain (mean ± 95% half-width; * = the interval excludes 0)."""
    strategies = list(dict.fromkeys(r["strategy"] for p in doc["points"] for r in p["rows"]))
    others = [s for s in strategies if s != "none"]
    width = max([len(p["name"]) + 2 for p in doc["points"]] + [24])
    head = (f"{'point':<{width}}{'params':>7} {'pi_ref':>6} {'pi_bar':>6} " + " ".join(f"{'V ' + s[:4]:>7}" for s in strategies)
            + "".join(f"  {'gap ' + s[:4]:<16}" for s in others) + "".join(f"  {'gain ' + s[:4]:<16}" for s in strategies))
    lines = [head.rstrip()]
    for p in doc["points"]:
        rows = {r["strategy"]: r for r in p["rows"]}
        r0 = p["rows"][0]
        line = (f"{p['name']:<{width}}{r0['parameters'] / 1e3:>6.0f}k {r0['pi_ref']:>6.3f} {r0['pi_bar']:>6.3f} "
                + " ".join(f"{rows[s]['deployed'][0]:>7.3f}" if s in rows else f"{'-':>7}" for s in strategies)
                + "".join(f"  {_pm(rows[s]['gap_vs_dpo']) if s in rows else '-':<16}" for s in others)
                + "".join(f"  {_pm(rows[s]['reflection_gain']) if s in rows else '-':<16}" for s in strategies))
        lines.append(line.rstrip())
    return "\n".join(lines)


def format_stage_table(doc: dict) -> str:
    """Per point that ran stages, a line of its exact values (pi_ref's row, pi_bar, pi_star and V(m*), the
    marginal of pi_star: distilling the optimal reflection), then one line per strategy: deployed and
    reflective V, the gap to DPO and to DPO at equal steps (mean ± 95% half-width, * = excludes 0), V(m)
    of the INS teacher's marginal (the theory's prediction for distilling it) and its gap to DPO, where
    the deployed V lands from DPO (0) to V(m) (1), the compute (optimizer steps, sequences sampled beyond
    DPO's) and, for revise, the oracle's mean P(revision > draft). Empty when no point ran a stage."""
    from workbench.distill import STAGES

    pts = [p for p in doc["points"] if any(r["strategy"] in STAGES for r in p["rows"])]
    if not pts:
        return ""
    width = max([len(p["name"]) for p in pts] + [5]) + 2
    lines = [f"{'point':<{width}}{'strategy':<10} {'V dep':>6} {'V refl':>6}  {'gap vs DPO':<16}  "
             f"{'gap vs DPO@steps':<16}  {'V(m)':>6} {'V(m) - DPO':<16}  {'toward':>6} {'steps':>5} {'extra':>6} {'P(rev>draft)':>12}"]
    for p in pts:
        r0 = p["rows"][0]
        lines.append(f"{p['name']}: pi_ref {r0.get('pi_ref', float('nan')):.3f}, pi_bar {r0.get('pi_bar', float('nan')):.3f}"
                     f", pi_star {r0.get('pi_star', float('nan')):.3f}, V(m*) {r0.get('pi_star_marginal', float('nan')):.3f}")
        for r in p["rows"]:
            refl = f"{r['reflective'][0]:.3f}" if r.get("reflective") else "-"
            marg = f"{r['marginal'][0]:.3f}" if "marginal" in r else "-"
            toward = f"{r['toward_marginal']:+.2f}" if "toward_marginal" in r else "-"
            comp = r.get("compute", {})
            agree = f"{r['oracle_agreement']['mean_p']:.3f}" if "oracle_agreement" in r else "-"
            lines.append(f"{p['name']:<{width}}{r['strategy']:<10} {r['deployed'][0]:>6.3f} {refl:>6}  "
                         f"{_pm(r['gap_vs_dpo']):<16}  {_pm(r.get('gap_vs_dpo_long')):<16}  {marg:>6} "
                         f"{_pm(r.get('marginal_gap_vs_dpo')):<16}  {toward:>6} "
                         f"{comp.get('steps', float('nan')):>5.0f} {comp.get('extra_sequences', float('nan')):>6.0f} "
                         f"{agree:>12}")
    return "\n".join(lines)


def findings(doc: dict) -> list[str]:
    """Statements that hold across seeds: a gap or gain whose whole 95% interval is on one side of 0."""
    out = []
    for p in doc["points"]:
        for r in p["rows"]:
            for key, label in (("gap_vs_dpo", "deployed V vs DPO"), ("reflection_gain", "reflective - deployed V")):
                t = r.get(key)
                if t and t[1] == t[1] and (t[1] > 0 or t[2] < 0):
                    out.append(f"{p['name']} {r['strategy']}: {label} {'above' if t[1] > 0 else 'below'} 0 "
                               f"({_ci(t)})")
    return out


def reanalyse(output_dir: str | Path, cache_dir: str | None = None) -> dict:
    """The study in `output_dir` analysed again by this code from what its points recorded (each
    point's summary.json and, where it ran stages, stages.json): nothing is trained or measured. A
    stage point recorded without the exact V(m*) gets it when `cache_dir` holds its world's pi_ref: the
    world is rebuilt from summary.json and its opponents re-sampled (the same fixed seed as measured)."""
    from workbench.distill import theory_values
    from inspo_core.worlds.base import world_class

    doc = load_transfer(Path(output_dir) / "transfer.json")
    for p in doc["points"]:
        point_dir = Path(output_dir) / p["name"]
        summary = json.loads((point_dir / "summary.json").read_text())
        if (point_dir / "stages.json").is_file():
            stages = json.loads((point_dir / "stages.json").read_text())
            summary["runs"] = summary["runs"] + stages["runs"]
            if "theory" not in stages and cache_dir is not None:
                spec = dict(summary["world"])
                cls = world_class(spec.pop("kind"))
                world = cls(cls.config_class(**spec))
                opp = world.opponents(cache_dir, world.reference(cache_dir), summary["config"]["n_eval"])
                stages["theory"] = theory_values(world, opp)
            if "theory" in stages:
                summary["theory"] = stages["theory"]
        p["rows"] = analyse_point(summary)
    return doc


def load_transfer(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
