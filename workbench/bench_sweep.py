"""`workbench bench --sweep`: cost against work. The fixed-length bench (workbench.bench) at each response
length, its rows summarised per configuration (executed-FLOP MFU's spread, memory per processed token) and
drawn as one plotly figure."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def run_sweep(cfg, run_one, versions: dict, log=print) -> list[dict]:
    """Cost against work: the fixed-length bench at each response length of `cfg.sweep` (prompts half as
    long), every configuration's row tagged with its `response_len`; then, per strategy x packing, how much the
    executed-FLOP MFU moves across lengths (the target: within +-20% of its mean for tree packing) and how
    close peak memory is to a line through the origin in the tokens a step processes. `cfg` is the bench's
    BenchConfig, `run_one(cfg, log)` the bench at one length (workbench.bench.run_bench), `versions` what the
    JSON records of the libraries."""
    lengths = [int(x) for x in cfg.sweep]
    if any(n < 2 for n in lengths):
        raise ValueError(f"sweep={cfg.sweep}: response lengths must be at least 2 tokens")
    rows = []
    for n in lengths:
        sub = dataclasses.replace(cfg, sweep=[], json=None, lengths="fixed", response_len=n, prompt_len=max(2, n // 2))
        log(f"sweep: responses {n} tokens, prompts {sub.prompt_len}")
        rows += [{**r, "response_len": n, "prompt_len": sub.prompt_len} for r in run_one(sub, log)]
    summary = sweep_summary(rows)
    log(format_sweep(summary))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"config": dataclasses.asdict(cfg), "rows": rows, "summary": summary,
                                              "versions": versions}, indent=1))
        sweep_figure(rows).write_html(str(Path(cfg.json).with_suffix(".html")), include_plotlyjs="cdn")
    return rows


def sweep_summary(rows: list[dict]) -> list[dict]:
    """Per (strategy, packing, reference): the executed-FLOP MFU's spread across lengths (max and min over
    the mean, minus 1) and, where memory was measured, MB per thousand processed tokens at each length."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["packing"], r["reference"]), []).append(r)
    out = []
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["response_len"])
        mfu = [r["mfu_executed"] for r in rs]
        mean = statistics.mean(mfu)
        mem = [r["peak_mem_mb"] / (r["tokens_processed"] / 1000) if r.get("peak_mem_mb") and r["tokens_processed"]
               else None for r in rs]
        out.append({"strategy": key[0], "packing": key[1], "reference": key[2],
                    "lengths": [r["response_len"] for r in rs], "mfu_executed": mfu,
                    "mfu_spread": (max(mfu) / mean - 1, min(mfu) / mean - 1), "mb_per_k_tokens": mem})
    return out


def format_sweep(summary: list[dict]) -> str:
    lines = ["length sweep: executed-FLOP MFU per length, its spread around the mean (target for tree packing: "
             "within +-20%), and peak MB per 1000 processed tokens (flat: memory linear in tokens)"]
    for g in summary:
        mfu = " ".join(f"{m:.1%}" for m in g["mfu_executed"])
        hi, lo = g["mfu_spread"]
        mem = " ".join("-" if m is None else f"{m:.0f}" for m in g["mb_per_k_tokens"])
        ok = "" if g["packing"] != "tree" else ("  target met" if hi <= 0.2 and lo >= -0.2 else "  target missed")
        lines.append(f"{g['strategy']:9s} {g['packing']:6s} {g['reference']:6s} lengths {g['lengths']}: MFU {mfu} "
                     f"(spread {lo:+.0%}/{hi:+.0%}{ok}); MB per 1k tokens {mem}")
    return "\n".join(lines)


def sweep_figure(rows: list[dict]):
    """Two panels: executed-FLOP MFU against response length, and peak memory against processed tokens."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("executed-FLOP MFU", "peak memory"))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(f"{r['strategy']} {r['packing']} {r['reference']}", []).append(r)
    for i, (name, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["response_len"])
        color = f"hsl({(i * 67) % 360}, 60%, 45%)"
        fig.add_trace(go.Scatter(x=[r["response_len"] for r in rs], y=[r["mfu_executed"] for r in rs], name=name,
                                 legendgroup=name, mode="lines+markers", line={"color": color}), 1, 1)
        if all(r.get("peak_mem_mb") for r in rs):
            fig.add_trace(go.Scatter(x=[r["tokens_processed"] for r in rs], y=[r["peak_mem_mb"] for r in rs], name=name,
                                     legendgroup=name, showlegend=False, mode="lines+markers", line={"color": color}),
                          1, 2)
    fig.update_xaxes(type="log", title_text="response tokens", row=1, col=1)
    fig.update_xaxes(type="log", title_text="tokens processed per step", row=1, col=2)
    fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(type="log", title_text="MB", row=1, col=2)
    fig.update_layout(title="Cost against work (workbench bench --sweep)", template="plotly_white", height=420)
    return fig
