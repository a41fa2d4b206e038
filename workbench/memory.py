"""`python -m workbench memory`: peak memory per process over a whole training run, by engine and process count.

A Llama is built from a config (random weights, saved once as safetensors with a tokenizer trained on the
data), then trained for a few steps as a user would run it: `python -m workbench train` for one process
without sharding (the baseline), and `torchrun --nproc_per_node N -m workbench train --sharding E` for each
engine and N. Every run has a reference cache of its own, so each one loads, scores the reference, trains,
checkpoints and writes `final/`. The trainer records each rank's peak memory at the end of every phase
(`memory.json` in the run directory); this command collects them into one table (`memory.md`, `memory.json`).

Memory, not time, is measured: four processes on two cores are slow but their peaks are what they are.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from inspo_core.config import opt

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy_preferences.jsonl"


@dataclass
class MemoryConfig:
    hidden: int = opt(1024, "hidden size of the Llama built from a config")
    layers: int = opt(28, "decoder layers")
    intermediate: int = opt(4096, "MLP width")
    heads: int = opt(16, "attention heads (as many key/value heads)")
    vocab: int = opt(32000, "vocabulary of the model (the tokenizer trained on the data uses its first ids)")
    engines: list = opt(["fsdp2", "zero3"], "sharded engines to measure (each with every process count)")
    procs: list = opt([1, 2, 4], "process counts")
    steps: int = opt(2, "optimizer steps per run (one checkpoint at the end, then final/)")
    rows: int = opt(8, "training pairs (the reference pass scores them all)")
    max_length: int = opt(64, "maximum tokens of one sequence")
    data: str = opt(str(TOY), "preference data")
    output_dir: str = opt("runs/memory", "runs, memory.json and memory.md")
    cache_dir: str = opt(".cache/inspo", "where the model is built once")
    timeout_s: int = opt(3600, "limit per run (a hang in a collective fails it)")
    cpu_malloc: str = opt("auto", "the runs' --cpu_malloc (glibc's heap on CPU: auto, trim, mmap or default)",
                          choices=["auto", "trim", "mmap", "default"])
    resume: bool = opt(False, "reuse the runs whose memory.json is already there")
    keep_weights: bool = opt(False, "keep each run's checkpoint, final/ and reference cache (several GB per run) "
                             "after it is measured")


def build_model(cfg: MemoryConfig) -> Path:
    """The model directory (built once per size): random weights, fp32 safetensors, a tokenizer."""

    from inspo_core.atomic import atomic_path
    from inspo_core.data import load_rows
    from inspo_core.models import tiny_llama, train_tokenizer

    spec = json.dumps([cfg.hidden, cfg.layers, cfg.intermediate, cfg.heads, cfg.vocab, Path(cfg.data).name])
    path = Path(cfg.cache_dir) / "memory-model" / hashlib.sha256(spec.encode()).hexdigest()[:16]
    if (path / "config.json").is_file():
        return path
    texts = [r[k] for r in load_rows(cfg.data) for k in ("prompt", "chosen", "rejected") if isinstance(r.get(k), str)]
    tok = train_tokenizer(texts)
    if len(tok) > cfg.vocab:
        raise ValueError(f"vocab {cfg.vocab} is smaller than the tokenizer's {len(tok)} tokens; raise --vocab")
    model = tiny_llama(cfg.vocab, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads,
                       num_key_value_heads=cfg.heads, intermediate_size=cfg.intermediate, max_positions=1024)
    with atomic_path(path, directory=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    del model
    gc.collect()
    return path


def _launch(cfg: MemoryConfig, model: Path, engine: str, procs: int, out: Path) -> list[str]:
    common = ["--model", str(model), "--data", cfg.data, "--max_rows", str(cfg.rows), "--val_size", "0",
              "--max_length", str(cfg.max_length), "--batch_size", "1", "--grad_accum", "1",
              "--max_steps", str(cfg.steps), "--save_every", str(cfg.steps), "--output_dir", str(out),
              "--cache_dir", str(out / "cache"), "--sharding", engine, "--cpu_malloc", cfg.cpu_malloc, "--overwrite"]
    if engine == "none" and procs == 1:
        return [sys.executable, "-m", "workbench", "train", *common]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            "-m", "workbench", "train", *common]


def measure(cfg: MemoryConfig, model: Path, engine: str, procs: int) -> dict:
    out = Path(cfg.output_dir) / f"{engine}-{procs}"
    record, failed = out / "memory.json", out / "failed.json"
    if not (cfg.resume and (record.is_file() or failed.is_file())):
        out.mkdir(parents=True, exist_ok=True)
        failed.unlink(missing_ok=True)
        log = out / "log.txt"
        print(f"memory: {engine} x {procs} process(es) ... (log {log})", flush=True)
        with open(log, "w") as f:  # a session of its own: a run over its time is killed with all its workers
            proc = subprocess.Popen(_launch(cfg, model, engine, procs, out), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
            try:
                code, late = proc.wait(timeout=cfg.timeout_s), False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code, late = proc.wait(), True
        if code != 0:  # a row that says so (a worker killed for memory is an answer too); the rest go on
            tail = log.read_text(errors="replace")[-4000:]
            why = (f"the run did not finish within {cfg.timeout_s} s" if late else
                   "a worker was killed (SIGKILL: out of memory?)" if "SIGKILL" in tail else
                   "the disk was full" if "No space left on device" in tail else "the run failed")
            failed.write_text(json.dumps({"returncode": code, "why": why, "log": str(log)}))
            print(f"memory: {engine} x {procs}: {why} (exit {code}); see {log}", flush=True)
        if not cfg.keep_weights:  # measured: the run's weights (a checkpoint, final/, the cache) are not needed
            for part in ("checkpoints", "final", "best", "cache"):
                shutil.rmtree(out / part, ignore_errors=True)
    if not record.is_file():
        doc = json.loads(failed.read_text())
        return {"engine": engine, "processes": procs, "failed": doc["why"]}
    doc = json.loads(record.read_text())
    phases = doc["phases"]
    return {"engine": engine, "processes": procs, "peak_mb": doc["peak_mb"], "peak_phase": doc["peak_phase"],
            "per_phase_mb": {p: max(r[p] for r in doc["ranks"]) for p in phases},
            "per_rank_mb": [r[phases[-1]] for r in doc["ranks"]], "measure": doc["measure"],
            "held_before_training_mb": max(r["setup"] for r in doc.get("resident_mb", [{"setup": float("nan")}]))}


def format_table(rows: list[dict], params: int) -> str:
    base = next(r["peak_mb"] for r in rows if r["engine"] == "none" and "failed" not in r)
    head = ["engine", "processes", "peak per process (MB)", "x one process", "reached in", "load", "reference",
            "train", "save", "held before training"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['engine']} | {r['processes']} | {r['failed']} |" + " |" * (len(head) - 3))
            continue
        ph = r["per_phase_mb"]
        lines.append(f"| {r['engine']} | {r['processes']} | {r['peak_mb']:.0f} | {r['peak_mb'] / base:.2f} | "
                     f"{r['peak_phase']} | " + " | ".join(f"{ph.get(p, float('nan')):.0f}"
                                                           for p in ("load", "reference", "train", "save"))
                     + f" | {r['held_before_training_mb']:.0f} |")
    return (f"Peak memory per process (the highest rank), {params / 1e6:.1f}M parameters, fp32 weights and Adam; "
            "phase columns: the peak by the end of that phase (a high-water mark); held before training: the resident set "
            "once the model is loaded, the reference scored and the optimizer built.\n\n" + "\n".join(lines) + "\n")


def run_memory(cfg: MemoryConfig) -> list[dict]:
    model = build_model(cfg)
    n = _param_count(model)
    rows = [measure(cfg, model, "none", 1)]
    for engine in cfg.engines:
        for procs in cfg.procs:
            rows.append(measure(cfg, model, engine, int(procs)))
    table = format_table(rows, n)
    out = Path(cfg.output_dir)
    from inspo_core.atomic import atomic_write_text

    atomic_write_text(out / "memory.json", json.dumps({"config": dataclasses.asdict(cfg), "parameters": n,
                                                       "rows": rows}, indent=1))
    atomic_write_text(out / "memory.md", table)
    print(table)
    return rows


def _param_count(model: Path) -> int:
    """Parameters stored in the model's safetensors (read from the file headers)."""
    import math

    from safetensors import safe_open

    from inspo_core.shard_io import checkpoint_files

    total = 0
    for file in sorted(set(checkpoint_files(model).values())):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total
