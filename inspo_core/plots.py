"""Figures shared by the reports, the notebooks and the app (plotly), and the self-contained HTML
page they are written into. Below every front-end, so none of them imports another."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from inspo_core.rundir import MetricsLog

COLORS = {"none": "#636efa", "symmetric": "#ef553b", "one_sided": "#00cc96", "one_sided_paper": "#ab63fa",
          "averaged": "#ffa15a"}
CURVES = [("loss", "training loss"), ("rewards/accuracies", "preference accuracy"), ("rewards/margins", "reward margin")]


def line_style(strategy: str) -> dict:
    """INS variants solid, the plain baseline dashed (as the paper's Figure 2)."""
    return {"color": COLORS.get(strategy, "#333"), "dash": "dash" if strategy == "none" else "solid"}


def training_curves(runs: list[dict]) -> go.Figure:
    """runs: dicts with name, strategy, run_dir."""
    fig = make_subplots(rows=1, cols=len(CURVES), subplot_titles=[t for _, t in CURVES])
    shown = set()
    for run in (r for r in runs if r.get("run_dir")):  # pi_ref's rows have no training run
        rows = [r for r in MetricsLog(Path(run["run_dir"]) / "metrics.jsonl").rows() if "loss" in r]
        for col, (key, _) in enumerate(CURVES, 1):
            fig.add_trace(go.Scatter(
                x=[r["step"] for r in rows], y=[r[key] for r in rows], mode="lines", name=run["strategy"],
                legendgroup=run["strategy"], showlegend=run["strategy"] not in shown and col == 1,
                line=line_style(run["strategy"]), opacity=0.8, hovertext=run["name"]), row=1, col=col)
        shown.add(run["strategy"])
    fig.update_layout(height=360, margin=dict(t=40, b=30), legend_title="strategy")
    fig.update_xaxes(title_text="step")
    return fig


def eval_curves(runs: list[dict], key: str = "eval/reflection/gain", title: str = "reflection gain") -> go.Figure:
    fig = go.Figure()
    shown = set()
    for run in (r for r in runs if r.get("run_dir")):
        rows = [r for r in MetricsLog(Path(run["run_dir"]) / "metrics.jsonl").rows() if key in r]
        if rows:
            fig.add_trace(go.Scatter(x=[r["step"] for r in rows], y=[r[key] for r in rows], mode="lines+markers",
                                     name=run["strategy"], legendgroup=run["strategy"],
                                     showlegend=run["strategy"] not in shown, line=line_style(run["strategy"]),
                                     hovertext=run["name"]))
            shown.add(run["strategy"])
    fig.update_layout(height=320, title=f"{title} on the validation pairs: mean of log pi(y|x,y_alt) - log pi(y|x)",
                      xaxis_title="step", yaxis_title="nats", margin=dict(t=50, b=30))
    return fig


def value_bars(summary: dict, psi: str = "identity") -> go.Figure:
    fig = go.Figure()
    for policy, pattern in (("deployed", ""), ("reflective", "/")):
        xs, ys, lo, hi = [], [], [], []
        for r in summary["table"]:
            key = f"{policy}/V_{psi}"
            if key in r:
                m, a, b = r[key]
                xs.append("pi_ref" if r["objective"] == "pi_ref" else f"{r['objective']} {r['strategy']}")
                ys.append(m)
                lo.append(m - a if a == a else 0)
                hi.append(b - m if b == b else 0)
        if xs:
            fig.add_trace(go.Bar(x=xs, y=ys, name=f"{policy}" + (" (prompt only)" if policy == "deployed" else
                                                                  " pi(.|x,y')"),
                                 error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo),
                                 marker_pattern_shape=pattern))
    c = summary.get("ceilings", {}).get(psi, {})  # exact ceilings exist in the finite worlds only
    for name, dash in (("pi_ref", "dot"), ("pi_bar", "dash"), ("pi_star", "solid")):
        if name in c:
            fig.add_hline(y=c[name], line_dash=dash, annotation_text=f"V({name}, theory) = {c[name]:.3f}",
                          annotation_position="top left")
    fig.update_layout(barmode="group", height=380, title=f"V(pi) against pi_ref, Psi = {psi} "
                      "(mean over seeds, 95% t-interval)", yaxis_title="V", margin=dict(t=50, b=30))
    return fig


def frontier(points: list[dict]) -> go.Figure:
    """Reward against KL(pi || pi_ref), one curve per strategy (the DPO paper's Figure 2, left).

    points: dicts with strategy, kl, reward, name, and `order` (position along training, e.g. the
    step), optionally kl_ci and reward_ci (drawn as error bars); each run's points are joined in that
    order, starting from pi_ref at (0, its reward). Runs at several betas are separate lines."""
    fig = go.Figure()
    shown = set()
    origin = next((p for p in points if p["strategy"] == "pi_ref"), None)
    by_run: dict[str, list[dict]] = {}
    for p in points:
        if p["strategy"] != "pi_ref":
            by_run.setdefault(p["run"], []).append(p)
    for run, pts in by_run.items():
        pts = sorted(pts, key=lambda p: p["order"])
        if origin:
            pts = [origin] + pts
        s = pts[-1]["strategy"]
        err = {}
        if all("kl_ci" in p and "reward_ci" in p for p in pts):  # 95% intervals over prompts, where measured
            err = dict(error_x=dict(type="data", symmetric=False, array=[p["kl_ci"][1] - p["kl"] for p in pts],
                                    arrayminus=[p["kl"] - p["kl_ci"][0] for p in pts], thickness=1),
                       error_y=dict(type="data", symmetric=False, array=[p["reward_ci"][1] - p["reward"] for p in pts],
                                    arrayminus=[p["reward"] - p["reward_ci"][0] for p in pts], thickness=1))
        fig.add_trace(go.Scatter(x=[p["kl"] for p in pts], y=[p["reward"] for p in pts], mode="lines+markers",
                                 name=s, legendgroup=s, showlegend=s not in shown, line=line_style(s),
                                 hovertext=[p["name"] for p in pts], opacity=0.85, **err))
        shown.add(s)
    if origin:
        fig.add_trace(go.Scatter(x=[origin["kl"]], y=[origin["reward"]], mode="markers", name="pi_ref",
                                 marker=dict(size=11, color="#333", symbol="diamond")))
    fig.update_layout(height=380, title="reward vs KL(pi || pi_ref): samples at T = 1, along training",
                      xaxis_title="KL(pi || pi_ref) estimate (nats per answer)", yaxis_title="mean oracle reward",
                      margin=dict(t=50, b=30))
    return fig


def page(title: str, parts: list[str]) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>" + "\n".join(parts) + "</body></html>")


def figures_html(figs: list[go.Figure]) -> list[str]:
    return [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
