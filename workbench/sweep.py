"""`python -m workbench sweep` (a grid of training runs sharing the reference cache) and
`python -m workbench compare` (a table and plots over runs)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from inspo_core.config import TrainConfig, coerce, load_config, opt
from inspo_core.evaluate import write_json
from inspo_core.rundir import RunDir


@dataclass
class SweepConfig:
    base: str | None = opt(None, "TrainConfig YAML every run starts from")
    grid: str = opt("", "keys and values: 'strategy=none,symmetric;seed=0,1' (every combination is run)")
    output_dir: str = opt("runs/sweep", "runs go to <output_dir>/<key=value,...>/")
    dry_run: bool = opt(False, "print the runs without training")

    def axes(self) -> dict[str, list]:
        axes = {}
        for part in filter(None, (p.strip() for p in self.grid.split(";"))):
            if "=" not in part:
                raise ValueError(f"grid entry {part!r} must look like key=v1,v2")
            key, values = part.split("=", 1)
            axes[key.strip()] = [coerce(TrainConfig, key.strip(), v.strip()) for v in values.split(",")]
        if not axes:
            raise ValueError("sweep needs --grid, e.g. 'strategy=none,symmetric;seed=0,1'")
        return axes

    def __post_init__(self):
        self.axes()  # report grid problems before any training


def run_sweep(cfg: SweepConfig, log=print) -> list[dict]:
    from inspo_core.trainer import Trainer, reset_accelerate_state

    axes = cfg.axes()
    combos = [dict(zip(axes, vals)) for vals in itertools.product(*axes.values())]
    plans = []
    for combo in combos:
        name = ",".join(f"{k}={v}" for k, v in combo.items())
        tcfg = load_config(TrainConfig, cfg.base, {**combo, "output_dir": str(Path(cfg.output_dir) / name)})
        plans.append((name, tcfg))  # every config validated before the first run starts
    results = []
    for i, (name, tcfg) in enumerate(plans, 1):
        log(f"[{i}/{len(plans)}] {name}")
        if cfg.dry_run:
            continue
        reset_accelerate_state()
        res = Trainer(tcfg).run()
        results.append({"name": name, "run_dir": str(res.run_dir), "final_loss": res.final_loss,
                        "best_eval_loss": res.best_eval_loss, "reference_forwards": res.ref_stats.forwards})
        write_json(Path(cfg.output_dir) / "sweep.json", {"grid": {k: list(v) for k, v in axes.items()},
                                                          "runs": results})
    return results


@dataclass
class CompareConfig:
    runs: list = opt([], "run directories, or a directory whose sub-directories are runs")
    output: str | None = opt(None, "write report.html here (default: beside the first run)")


def find_runs(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if RunDir(p).metrics.path.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(d for d in p.iterdir() if RunDir(d).metrics.path.is_file())
        else:
            raise ValueError(f"{p}: not a run directory")
    if not out:
        raise ValueError(f"no runs (directories with metrics.jsonl) under {paths}")
    return out


def compare_table(run_dirs: list[Path]) -> list[dict]:
    rows = []
    for d in run_dirs:
        run = RunDir(d)
        conf, metrics = run.read_config(), run.metrics.rows()
        train = [r for r in metrics if "loss" in r]
        ev = [r for r in metrics if "eval/loss" in r]
        row = {"run": d.name, "objective": conf.get("objective"), "strategy": conf.get("strategy"),
               "steps": train[-1]["step"] if train else 0, "loss": train[-1]["loss"] if train else None,
               "eval/loss": ev[-1]["eval/loss"] if ev else None,
               "eval/accuracy": ev[-1].get("eval/rewards/accuracies") if ev else None,
               "eval/reflection_gain": ev[-1].get("eval/reflection/gain") if ev else None}
        if run.eval_json.is_file():
            doc = json.loads(run.eval_json.read_text())
            if "deployed" in doc:
                row["V"] = doc["deployed"]["V_identity"]
            elif doc.get("results"):
                row["win_rate"] = next(iter(doc["results"].values()))["win_rate"]
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(fmt(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def run_compare(cfg: CompareConfig, log=print) -> list[dict]:
    from workbench.report import write_runs_report

    dirs = find_runs(cfg.runs)
    rows = compare_table(dirs)
    log(format_rows(rows))
    out = Path(cfg.output) if cfg.output else dirs[0].parent / "report.html"
    write_runs_report(out, dirs)
    log(f"report: {out}")
    return rows
