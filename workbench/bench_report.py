"""The bench's table: ratios between configurations, the printed rows and the targets they are held to."""

from __future__ import annotations

TRL_ROW = ("trl-dpo", "trl", "cached")  # (strategy, packing, reference) of TRL's peer row


def add_ratios(rows: list[dict]) -> None:
    base = {(row["strategy"], row["packing"], row["reference"]): row for row in rows}
    ref, trl = base.get(("none", "padded", "cached")), base.get(TRL_ROW)
    for row in rows:
        same = base.get(("none", row["packing"], row["reference"]))
        if ref:
            row["time_ratio_vs_none_padded_cached"] = row["sec_per_step"] / ref["sec_per_step"]
        if trl:
            row["time_ratio_vs_trl"] = row["sec_per_step"] / trl["sec_per_step"]
        if same and row["tokens_processed"]:
            row["time_ratio_vs_none"] = row["sec_per_step"] / same["sec_per_step"]
            row["tokens_ratio_vs_none"] = row["tokens_processed"] / same["tokens_processed"]
            if row["peak_mem_mb"] is not None and same["peak_mem_mb"]:
                row["mem_ratio_vs_none"] = row["peak_mem_mb"] / same["peak_mem_mb"]


def format_rows(rows: list[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    head = f"{'strategy':<10}{'packing':<8}{'reference':<10}{'s/step':>8}{'pairs/s':>9}{'tokens':>8}{'MFU':>7}" \
           f"{'MFU ex':>7}{'ex/model':>9}" \
           f"{'peak MB':>9}{'time/none':>10}{'tokens/none':>12}{'vs none-padded':>15}{'vs TRL':>8}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['strategy']:<10}{r['packing']:<8}{r['reference']:<10}{r['sec_per_step']:>8.3f}"
                     f"{r['pairs_per_s']:>9.2f}{f(r['tokens_processed'], '.0f'):>8}{r['mfu']:>7.1%}"
                     f"{r['mfu_executed']:>7.1%}{r['executed_flops'] / r['model_flops']:>9.2f}"
                     f"{f(r['peak_mem_mb'], '.0f'):>9}{f(r.get('time_ratio_vs_none'), '.2f'):>10}"
                     f"{f(r.get('tokens_ratio_vs_none'), '.2f'):>12}"
                     f"{f(r.get('time_ratio_vs_none_padded_cached'), '.2f'):>15}"
                     f"{f(r.get('time_ratio_vs_trl'), '.2f'):>8}")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> str:
    """DESIGN section 7 targets, each stated with the measured numbers."""
    by = {(r["strategy"], r["packing"], r["reference"]): r for r in rows}
    out = ["targets:"]
    for packing in ("padded", "tree"):
        s, n = by.get(("symmetric", packing, "cached")), by.get(("none", packing, "cached"))
        if s and n:
            bound = 1.1 * s["tokens_ratio_vs_none"]
            out.append(f"  symmetric/none time ({packing}) {s['time_ratio_vs_none']:.2f} <= 1.1 x tokens ratio "
                       f"{bound:.2f}: {'met' if s['time_ratio_vs_none'] <= bound else 'NOT met'}")
            if s.get("mem_ratio_vs_none"):
                out.append(f"  symmetric/none peak memory ({packing}) {s['mem_ratio_vs_none']:.2f} <= 1.15: "
                           f"{'met' if s['mem_ratio_vs_none'] <= 1.15 else 'NOT met'}")
        a, s2 = by.get(("averaged", packing, "cached")), by.get(("symmetric", packing, "cached"))
        if a and s2:
            ratio = a["sec_per_step"] / s2["sec_per_step"]
            out.append(f"  averaged/symmetric time ({packing}) {ratio:.2f} <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'}")
    trl = by.get(TRL_ROW)
    if trl:
        for strategy, bound in (("none", 1.0), ("symmetric", 1.3)):
            mine = [r for r in rows if r["strategy"] == strategy and r["reference"] == "cached"]
            if mine:
                best = min(mine, key=lambda r: r["sec_per_step"])
                ratio = best["sec_per_step"] / trl["sec_per_step"]
                out.append(f"  {strategy} ({best['packing']}) vs TRL DPO time {ratio:.2f} <= {bound}: "
                           f"{'met' if ratio <= bound else 'NOT met'}")
    s_tree, n_pad = by.get(("symmetric", "tree", "cached")), by.get(("none", "padded", "cached"))
    if s_tree and n_pad:
        out.append(f"  symmetric with tree packing vs plain DPO padded: {s_tree['time_ratio_vs_none_padded_cached']:.2f}x "
                   "time (the paper reports 1.18-1.25x)")
    return "\n".join(out)
