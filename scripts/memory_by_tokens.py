"""Where INS-DPO's memory goes with SmolLM2: the peak memory of short `workbench train` runs (LoRA r16, 8 pairs per
step, max length 192, the sentiment world's pairs: the sentiment demo's settings) against the tokens each step
computes, per strategy x packing x context layout, with and without activation checkpointing.

Each configuration is its own `workbench train` process of `--steps` steps; its peak is the process's peak
resident memory (`peak_mem_mb` in metrics.jsonl, the model and the reference's cached log-probs included) and its
tokens are the real tokens of its largest step (`tokens_per_s` x the step's time). A straight line
MB = a + b * tokens is fitted per checkpointing setting: if every configuration lies on it, memory is what the
tokens cost and nothing else (no per-view overhead), and INS-DPO's ratio to DPO is set by its token ratio.

    PYTHONPATH=. python scripts/memory_by_tokens.py PAIRS.jsonl MODEL_DIR --json logs/memory_by_tokens.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("none", "tree", "template"), ("none", "padded", "template"), ("symmetric", "tree", "template"),
           ("symmetric", "padded", "template"), ("symmetric", "tree", "raw")]


def run(pairs: str, model: str, strategy: str, packing: str, context: str, checkpointing: bool, steps: int,
        cache_dir: str, scratch: Path, cpu_malloc: str = "auto") -> dict:
    out = scratch / f"{strategy}-{packing}-{context}-{int(checkpointing)}"
    cmd = [sys.executable, "-m", "workbench", "train", "--model", model, "--data", pairs, "--lora", "16",
           "--batch_size", "8", "--max_length", "192", "--max_steps", str(steps), "--val_size", "0",
           "--eval_every", "0", "--save_every", "0", "--lr", "1e-3", "--objective", "dpo", "--beta", "0.1",
           "--strategy", strategy, "--packing", packing, "--context_format", context,
           "--gradient_checkpointing", str(checkpointing).lower(), "--cache_dir", cache_dir,
           "--output_dir", str(out), "--overwrite", "true", "--cpu_malloc", cpu_malloc]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"peak_mem_mb"' in line]
    tokens = max(r["tokens_per_s"] * 8 / r["pairs_per_s"] for r in rows)
    return dict(strategy=strategy, packing=packing, context=context, checkpointing=checkpointing, cpu_malloc=cpu_malloc,
                tokens=round(tokens), peak_mb=max(r["peak_mem_mb"] for r in rows), state_mb=rows[0]["state_mb"],
                s_per_step=[round(8 / r["pairs_per_s"], 1) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs")
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cache_dir", default=".cache/inspo")
    ap.add_argument("--cpu_malloc", default="auto", help="the trainer's --cpu_malloc (auto: trim for one process)")
    ap.add_argument("--checkpointing", default="false,true", help="activation checkpointing settings to run")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    settings = [v == "true" for v in args.checkpointing.split(",")]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="memory-by-tokens-"))
    try:
        for gc in settings:
            for strategy, packing, context in CONFIGS:
                rows.append(run(args.pairs, args.model, strategy, packing, context, gc, args.steps, args.cache_dir,
                                scratch, args.cpu_malloc))
                print(json.dumps(rows[-1]), flush=True)
                Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for gc in settings:
        sel = [r for r in rows if r["checkpointing"] == gc]
        x, y = np.array([r["tokens"] for r in sel], float), np.array([r["peak_mb"] for r in sel])
        b, a = np.polyfit(x, y, 1)
        res = y - (a + b * x)
        base = {(r["packing"]): r for r in sel if r["strategy"] == "none"}
        ratios = [f"{r['strategy']}/{r['packing']}/{r['context']} {r['peak_mb'] / base[r['packing']]['peak_mb']:.2f}x "
                  f"(tokens {r['tokens'] / base[r['packing']]['tokens']:.2f}x)" for r in sel if r["strategy"] != "none"]
        print(f"checkpointing={gc}: MB = {a:.0f} + {b * 1000:.0f} per 1k tokens; residuals "
              f"{', '.join(f'{v:+.0f}' for v in res)} (max |r|/y {np.max(np.abs(res) / y):.1%}); vs DPO, same packing: "
              + "; ".join(ratios))


if __name__ == "__main__":
    main()
