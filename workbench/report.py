"""Results as people read them: the demo's table (means and t-intervals over seeds) and the
self-contained HTML reports (plotly inlined, so they open offline)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from inspo_core.atomic import atomic_write_text
from inspo_core.rundir import RunDir
from inspo_core.plots import eval_curves, figures_html, page, training_curves, value_bars


def seed_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a Student-t interval over seeds, the width that seed-to-seed variation gives."""
    from statistics import mean, stdev

    from scipy.stats import t

    m = mean(values)
    if len(values) < 2:
        return m, float("nan"), float("nan")
    half = t.ppf((1 + level) / 2, len(values) - 1) * stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (objective, strategy) in order of appearance (pi_ref's row first): means and
    t-intervals over seeds."""
    rows = []
    for o, s in dict.fromkeys((r["objective"], r["strategy"]) for r in runs):
        mine = [r for r in runs if r["objective"] == o and r["strategy"] == s]
        row = {"objective": o, "strategy": s, "seeds": len(mine)}
        for policy in ("deployed", "reflective"):
            for psi in ("identity", "log_odds"):
                vals = [r[policy][f"V_{psi}"] for r in mine if policy in r]
                if vals:
                    row[f"{policy}/V_{psi}"] = seed_interval(vals)
            vals = [r[policy]["unparseable"] for r in mine if policy in r]
            if vals:
                row[f"{policy}/unparseable"] = float(np.mean(vals))
            for key in ("reward", "kl", "reward_t1"):  # the text worlds' extra measurements
                vals = [r[policy][key] for r in mine if policy in r and key in r[policy]]
                if vals:
                    row[f"{policy}/{key}"] = seed_interval(vals)
        rows.append(row)
    return rows


REFLECTIVE = "reflective pi(.|x,y')"


def format_table(summary: dict) -> str:
    conf = summary["config"]
    c = summary.get("ceilings", {}).get("identity", {})
    text_world = "deployed/reward" in (summary["table"][0] if summary["table"] else {})
    ceil = (f" Ceilings against the same opponents: pi_bar {c['pi_bar']:.3f}, pi_star {c['pi_star']:.3f}."
            if "pi_bar" in c else "")
    lines = [f"V(pi): win rate under the oracle (Psi = identity) against y' ~ pi_ref (T=1); every row, pi_ref's own "
             f"included, sampled at T={conf.get('temperature', 0.7)}, top-p {conf.get('top_p', 0.95)}.{ceil} "
             "Mean over seeds [95% t-interval]",
             f"{'objective':<10}{'strategy':<17}{'seeds':>5}  {'deployed (prompt only)':<26}{REFLECTIVE:<26}"
             + (f"{'reward':>8}{'KL':>8}" if text_world else f"{'unparseable':>11}")]

    def cell(r, key):
        if key not in r:
            return "-"
        m, lo, hi = r[key]
        return f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if lo == lo else f"{m:.3f}"

    for r in summary["table"]:
        tail = (f"{r['deployed/reward'][0]:>8.3f}{r['deployed/kl'][0]:>8.2f}" if text_world else
                f"{r.get('deployed/unparseable', float('nan')):>11.3f}")
        lines.append(f"{r['objective']:<10}{r['strategy']:<17}{r['seeds']:>5}  {cell(r, 'deployed/V_identity'):<26}"
                     f"{cell(r, 'reflective/V_identity'):<26}" + tail)
    return "\n".join(lines)


def write_demo_report(path: str | Path, summary: dict) -> None:
    cfg, c = summary["config"], summary["ceilings"]["identity"]
    intro = (f"<h1>InSPO Workbench demo: {html.escape(cfg['family'])} world</h1>"
             f"<p>{summary['world']['n_contexts']} prompts, {summary['world']['n_items']} items, "
             f"{len(cfg['seeds'])} seed(s), {cfg['n_pairs']} pairs and {cfg['max_steps']} steps per run, "
             f"beta {cfg['beta']}, lr {cfg['lr']}, context format {cfg['context_format']}; "
             f"{summary['minutes']:.1f} minutes. V is the win rate against pi_ref samples under the world's exact "
             f"preference; the best context-only policy reaches V(pi_bar) = {c['pi_bar']:.3f} and the best "
             f"alternative-conditioned one V(pi_star) = {c['pi_star']:.3f}. The deployed model answers from the "
             "prompt alone; 'reflective' lets the same model see a pi_ref sample y' first (not how it is "
             "deployed: it shows what the conditioned views learned).</p>")
    runs = summary["runs"]
    figs = figures_html([training_curves(runs), value_bars(summary, "identity"), value_bars(summary, "log_odds"),
                  eval_curves(runs)])
    table = "<h2>Table</h2><pre>" + html.escape(format_table(summary)) + "</pre>"
    per_run = ("<h2>Runs</h2><table><tr><th>run</th><th>V deployed</th><th>95% CI</th><th>V reflective</th>"
               "<th>unparseable</th></tr>" + "".join(_run_row(r) for r in runs) + "</table>")
    atomic_write_text(path, page("InSPO Workbench demo", [intro, figs[0], table, figs[1], figs[2], figs[3], per_run]))


def _run_row(r: dict) -> str:
    d = r["deployed"]
    refl = f"{r['reflective']['V_identity']:.3f}" if "reflective" in r else "-"
    return (f"<tr><td>{html.escape(r['name'])}</td><td>{d['V_identity']:.3f}</td>"
            f"<td>[{d['V_identity_ci'][0]:.3f}, {d['V_identity_ci'][1]:.3f}]</td><td>{refl}</td>"
            f"<td>{d['unparseable']:.3f}</td></tr>")


def write_runs_report(path: str | Path, run_dirs: list[Path]) -> None:
    """Training curves and evaluation numbers of any runs (used by `workbench compare`)."""
    runs = [{"name": d.name, "strategy": RunDir(d).read_config().get("strategy", "?"), "run_dir": str(d)}
            for d in run_dirs]
    parts = ["<h1>Runs</h1>"] + figures_html([training_curves(runs), eval_curves(runs)])
    evals = {d.name: json.loads(RunDir(d).eval_json.read_text()) for d in run_dirs if RunDir(d).eval_json.exists()}
    if evals:
        parts.append("<h2>eval.json</h2><pre>" + html.escape(json.dumps(evals, indent=1)[:20000]) + "</pre>")
    atomic_write_text(path, page("InSPO Workbench runs", parts))
