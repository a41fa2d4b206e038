"""Results as people read them: the demo's table (means and intervals over seeds, and over prompts
where a world's prompts are a sample; paired differences to the plain baseline) and the
self-contained HTML reports (plotly inlined, so they open offline)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from inspo_core.atomic import atomic_write_text
from inspo_core.intervals import cluster_means, crossed_interval, seed_interval
from inspo_core.rundir import RunDir
from inspo_core.plots import eval_curves, figures_html, frontier, page, training_curves, value_bars


def _label(r: dict, betas: bool) -> str:
    return (r["objective"] if r["objective"] == "pi_ref" else f"{r['objective']} {r['strategy']}"
            + (f" b{r['beta']:g}" if betas and r.get("beta") is not None else ""))


def _interval(mat: np.ndarray, clusters, prompts_sampled: bool) -> tuple[float, float, float]:
    """(mean, low, high) over a [seeds, prompts] matrix of cells: seeds x prompt clusters as a crossed
    design where the world's prompts are a sample (text worlds); a t-interval over the seeds' means where
    the prompts are the whole population (token worlds: their V is defined on exactly those prompts)."""
    if prompts_sampled:
        c = crossed_interval(cluster_means(mat, clusters))
        return float(mat.mean()), c["low"], c["high"]
    return seed_interval(mat.mean(1))


def aggregate(runs: list[dict], clusters=None, prompts_sampled: bool = False) -> tuple[list[dict], list[dict]]:
    """(rows, differences). One row per (objective, strategy, beta) in order of appearance (pi_ref's row
    first): means and 95% intervals (see `_interval`) of every per-prompt measurement the runs carry,
    plus `*/seed_t` (a t-interval over per-seed means, the interval older versions printed). One
    difference per strategy other than `none` against `none` of the same objective and beta, paired
    by seed and prompt (only seeds both have)."""
    rows, groups = [], {}
    for r in runs:
        groups.setdefault((r["objective"], r["strategy"], r.get("beta")), []).append(r)
    for (o, s, b), mine in groups.items():
        row = {"objective": o, "strategy": s, "beta": b, "seeds": len(mine)}
        for policy in ("deployed", "reflective"):
            have = [r[policy] for r in mine if policy in r]
            if not have:
                continue
            for key in have[0].get("cells", {}):
                mat = np.array([h["cells"][key] for h in have])
                row[f"{policy}/{key}"] = _interval(mat, clusters, prompts_sampled)
                row[f"{policy}/{key}/seed_t"] = seed_interval(mat.mean(1))
            row[f"{policy}/unparseable"] = float(np.mean([h["unparseable"] for h in have]))
        rows.append(row)
    diffs = []
    for (o, s, b), mine in groups.items():
        base = groups.get((o, "none", b))
        if o == "pi_ref" or s == "none" or not base:
            continue
        by_seed = {r["seed"]: r for r in base}
        pairs = [(r, by_seed[r["seed"]]) for r in mine if r["seed"] in by_seed]
        if not pairs:
            continue
        d = {"objective": o, "strategy": s, "beta": b, "against": "none", "seeds": len(pairs)}
        for policy in ("deployed", "reflective"):
            if not all(policy in a and policy in z for a, z in pairs):
                continue
            for key in pairs[0][0][policy].get("cells", {}):
                if key in pairs[0][1][policy].get("cells", {}):
                    mat = np.array([np.subtract(a[policy]["cells"][key], z[policy]["cells"][key]) for a, z in pairs])
                    d[f"{policy}/{key}"] = _interval(mat, clusters, prompts_sampled)
        diffs.append(d)
    return rows, diffs


REFLECTIVE = "reflective pi(.|x,y')"


def _world_of(summary: dict, world):
    from inspo_core.worlds.base import world_class

    return world or world_class(summary.get("world", {}).get("kind", "token"))


def format_table(summary: dict, world=None) -> str:
    """The demo's table: one line per row, then the paired differences to `none`."""
    world = _world_of(summary, world)
    conf = summary["config"]
    betas = len(conf.get("betas") or [None]) > 1
    sampled = getattr(world, "prompts_sampled", False)
    how = ("mean [95% interval over seeds x prompt clusters]" if sampled else "mean over seeds [95% t-interval]")
    header = summary.get("ceilings", {}).get("header", "")
    lines = [f"V(pi): win rate under the oracle (Psi = identity) against y' ~ pi_ref (T=1); every row, pi_ref's own "
             f"included, sampled at T={conf.get('temperature', 0.7)}, top-p {conf.get('top_p', 0.95)}. {header} {how}",
             f"{'objective':<10}{'strategy':<17}" + (f"{'beta':>6}" if betas else "") + f"{'seeds':>5}  "
             f"{'deployed (prompt only)':<26}{REFLECTIVE:<26}" + "".join(f"{n:>{w}}" for n, _, w, _ in world.table_columns)]

    def cell(r, key):
        if key not in r:
            return "-"
        m, lo, hi = r[key]
        return f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if lo == lo else f"{m:.3f}"

    def extra(r, key, w, f):
        v = r.get(key)
        return f"{'-':>{w}}" if v is None else f"{(v[0] if isinstance(v, (list, tuple)) else v):>{w}{f}}"

    for r in summary["table"]:
        beta = f"{r['beta']:>6g}" if betas and r.get("beta") is not None else (f"{'-':>6}" if betas else "")
        lines.append(f"{r['objective']:<10}{r['strategy']:<17}{beta}{r['seeds']:>5}  "
                     f"{cell(r, 'deployed/V_identity'):<26}{cell(r, 'reflective/V_identity'):<26}"
                     + "".join(extra(r, k, w, f) for _, k, w, f in world.table_columns))
    diffs = [d for d in summary.get("differences", []) if "deployed/V_identity" in d]
    if diffs:
        lines.append("paired difference to `none` (same objective" + (", beta" if betas else "")
                     + ", seeds and prompts), V (Psi = identity)")
        for d in diffs:
            beta = f"{d['beta']:>6g}" if betas and d.get("beta") is not None else (f"{'-':>6}" if betas else "")
            lines.append(f"{d['objective']:<10}{d['strategy'] + ' - none':<17}{beta}{d['seeds']:>5}  "
                         f"{_signed(d, 'deployed/V_identity'):<26}{_signed(d, 'reflective/V_identity'):<26}")
    return "\n".join(lines)


def _signed(d: dict, key: str) -> str:
    if key not in d:
        return "-"
    m, lo, hi = d[key]
    star = "*" if lo == lo and (lo > 0 or hi < 0) else ""
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}" if lo == lo else f"{m:+.3f}"


def write_demo_report(path: str | Path, summary: dict, world=None) -> None:
    """report.html: the world's description, the table, curves and bars; the frontier and answers side
    by side where the world has a reward and texts."""
    world = _world_of(summary, world)
    runs = summary["runs"]
    figs = [training_curves(runs), value_bars(summary, "identity"), value_bars(summary, "log_odds"), eval_curves(runs)]
    if summary.get("frontier"):
        figs.insert(0, frontier(summary["frontier"]))
    parts = [world.describe(summary) if not isinstance(world, type) else "<h1>InSPO Workbench demo</h1>"]
    html_figs = figures_html(figs)
    parts += [html_figs[0], "<h2>Table</h2><pre>" + html.escape(format_table(summary, world)) + "</pre>", *html_figs[1:]]
    parts.append("<h2>Runs</h2><table><tr><th>run</th><th>V deployed</th><th>95% CI (prompts)</th><th>V reflective</th>"
                 "<th>unparseable</th></tr>" + "".join(_run_row(r) for r in runs) + "</table>")
    parts += _answers(runs, getattr(world, "prompts", None))
    atomic_write_text(path, page("InSPO Workbench demo", parts))


def _answers(runs: list[dict], prompts: list[str] | None, k: int = 4) -> list[str]:
    """The first answer of each row's first run for the first k prompts, side by side (text worlds)."""
    first: dict[str, dict] = {}
    for r in runs:
        if "answers" in r["deployed"]:
            first.setdefault(_label(r, True), r)
    if not first:
        return []
    out = ["<h2>Answers side by side</h2>"]
    n = min(k, min(len(r["deployed"]["answers"]) for r in first.values()))
    for x in range(n):
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(label)}</th><td style='text-align:left'>"
                        f"{html.escape(r['deployed']['answers'][x][0])}</td></tr>" for label, r in first.items())
        out.append(f"<h3>{html.escape(prompts[x] if prompts else f'prompt {x + 1}')}</h3><table>{cells}</table>")
    return out


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
