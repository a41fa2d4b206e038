"""`python -m workbench bench`: the cost of self-reflective conditioning, measured side by side.

A Llama-style model is built from a config (no download) and a fixed synthetic set of pairs (seeded
random tokens, fixed lengths) is laid out by the conditioning builder's rules. Every configuration
strategy {none, symmetric, averaged} x packing {padded, tree} x reference {cached, live} runs full
training steps (forward, DPO loss, backward, AdamW) in one process, interleaved round by round so
drift hits all alike. Reported per configuration: pairs/s, tokens/s, tokens processed per step
(positions the model computes, padding included), peak memory, and ratios to none/padded/cached.
On CPU peak memory is measured per configuration in a child process (peak RSS growth); on CUDA it is
`max_memory_allocated` in the same process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from inspo_core.conditioning import BuiltPair
from inspo_core.config import opt
from inspo_core.logps import TokenLogps
from inspo_core.scoring import prepare_batch, score_batch
from inspo_core.strategies import resolve_method
from inspo_core.trainer import peak_rss_mb
from inspo_core.tree_attention import use_tree_attention

PRESETS = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": (64, 2, 4, 4, 128, 1000),
    "cpu-small": (256, 4, 4, 4, 688, 32000),
    "0.5b": (1024, 24, 16, 16, 2816, 32000),
}


@dataclass
class BenchConfig:
    preset: str = opt("cpu-small", "model size: tiny (tests), cpu-small (~20M params) or 0.5b (~0.5B, for GPUs)",
                      choices=list(PRESETS))
    vocab: int | None = opt(None, "override the preset's vocabulary (e.g. 128256 for a Llama-3 vocabulary)")
    prompt_len: int = opt(128, "prompt tokens")
    response_len: int = opt(64, "tokens of each response")
    context_format: str = opt("sep", "layout of the alternative (raw lets tree packing share it)",
                              choices=["sep", "raw"])
    batch_size: int = opt(8, "pairs per step")
    steps: int = opt(3, "timed steps per configuration per round")
    rounds: int = opt(2, "rounds; configurations are interleaved within a round")
    warmup: int = opt(1, "untimed steps per configuration first")
    strategies: list = opt(["none", "symmetric", "averaged"], "strategies to run")
    packings: list = opt(["padded", "tree"], "packings to run")
    references: list = opt(["cached", "live"], "reference: cached log-probs, or a frozen model run every step")
    tree_attention: str = opt("segments", "tree packing's attention: per tree segment (the trainer's), or a dense "
                              "[N, N] mask over each packed row", choices=["segments", "dense"])
    device: str = opt("auto", "auto, cpu or cuda")
    bf16: bool = opt(False, "bf16 weights and compute (CUDA)")
    memory: bool = opt(True, "measure peak memory (CPU: one child process per configuration)")
    seed: int = opt(0, "seed of the model and the data")
    json: str | None = opt(None, "also write the rows to this JSON file")
    only: str | None = opt(None, "internal: run one configuration strategy/packing/reference and print its peak memory")


def model_for(cfg: BenchConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, layers, heads, kv, inter, vocab = PRESETS[cfg.preset]
    torch.manual_seed(cfg.seed)
    mc = LlamaConfig(vocab_size=cfg.vocab or vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                     attn_implementation="sdpa", tie_word_embeddings=False)
    return LlamaForCausalLM(mc)


def synthetic_pairs(cfg: BenchConfig, vocab: int) -> list[BuiltPair]:
    g = torch.Generator().manual_seed(cfg.seed)
    rand = lambda n: torch.randint(5, vocab, (n,), generator=g).tolist()  # noqa: E731
    sep, eos = 3, 2
    pairs = []
    for i in range(cfg.batch_size):
        prompt = [1] + rand(cfg.prompt_len - 1)
        targets = {r: rand(cfg.response_len - 1) + [eos] for r in ("chosen", "rejected")}
        if cfg.context_format == "raw":
            contexts = {r: list(t) for r, t in targets.items()}
        else:
            contexts = {r: [sep] + t[:-1] + [sep] for r, t in targets.items()}
        pairs.append(BuiltPair(i, prompt, targets, contexts, {r: len(t) for r, t in targets.items()}))
    return pairs


class Runner:
    """One configuration: its step function and what it processes."""

    def __init__(self, cfg: BenchConfig, strategy: str, packing: str, reference: str, policy, ref_model, pairs, dev):
        self.name = (strategy, packing, reference)
        self.cfg, self.strategy, self.packing, self.reference = cfg, strategy, packing, reference
        self.method = resolve_method("dpo", strategy)
        self.pairs, self.dev = pairs, dev
        self.policy, self.ref_model = policy, ref_model
        self.scorer = TokenLogps(policy)
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
        self.mask_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        # batches are laid out once, outside the timed steps (as a data loader's workers would)
        self.batch = prepare_batch(pairs, self.method.policy_views, packing=packing)
        self.ref_batch = prepare_batch(pairs, self.method.ref_views, packing=packing)
        self.tokens_processed = self.batch.batch.input_ids.numel()  # positions computed, padding included
        with torch.no_grad():
            self.cached = self.ref_logps(ref_model)  # what the cache would hold (computed once, not timed)

    def ref_logps(self, model):
        with torch.no_grad():
            return score_batch(TokenLogps(model), self.ref_batch, device=self.dev, mask_dtype=self.mask_dtype).logps

    def step(self) -> None:
        ref = self.cached if self.reference == "cached" else self.ref_logps(self.ref_model)
        scored = score_batch(self.scorer, self.batch, device=self.dev, mask_dtype=self.mask_dtype)
        loss = self.method.loss(scored.logps, ref, scored.lengths).losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _setup(cfg: BenchConfig, live_reference: bool = True):
    """Policy and a frozen reference, both the same seeded initial weights; without a live
    reference the policy itself fills the cache (identical values, one model in memory)."""
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       (cfg.device if cfg.device != "auto" else "cpu"))
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    policy = model_for(cfg).to(dev, dtype)
    ref_model = policy
    if live_reference:
        ref_model = model_for(cfg).to(dev, dtype).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    if cfg.tree_attention == "segments":
        for m in {id(policy): policy, id(ref_model): ref_model}.values():
            use_tree_attention(m)
    pairs = synthetic_pairs(cfg, policy.config.vocab_size)
    return dev, policy, ref_model, pairs


def measure_one_memory(cfg: BenchConfig) -> float:
    """Peak memory growth of warmup + 2 steps of the configuration named by cfg.only (MB)."""
    strategy, packing, reference = cfg.only.split("/")
    if torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu").type == "cpu":
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: freed blocks leave RSS at once
    dev, policy, ref_model, pairs = _setup(cfg, live_reference=reference == "live")
    r = Runner(cfg, strategy, packing, reference, policy, ref_model, pairs, dev)
    base = peak_rss_mb()
    for _ in range(2):
        r.step()
    return peak_rss_mb() - base


def run_bench(cfg: BenchConfig, log=print) -> list[dict]:
    if cfg.only:
        print(f"{measure_one_memory(cfg):.1f}")
        return []
    dev, policy, ref_model, pairs = _setup(cfg)
    n_params = sum(p.numel() for p in policy.parameters())
    combos = [(s, p, r) for s in cfg.strategies for p in cfg.packings for r in cfg.references]
    runners = [Runner(cfg, s, p, r, policy, ref_model, pairs, dev) for s, p, r in combos]
    log(f"bench: {cfg.preset} ({n_params / 1e6:.1f}M parameters), {dev.type}, {'bf16' if cfg.bf16 else 'fp32'}, "
        f"{cfg.batch_size} pairs/step, prompt {cfg.prompt_len}, responses {cfg.response_len}, "
        f"context {cfg.context_format}; {cfg.rounds} x {cfg.steps} timed steps per configuration")
    for r in runners:
        for _ in range(cfg.warmup):
            r.step()
    elapsed = {r.name: 0.0 for r in runners}
    for _ in range(cfg.rounds):
        for r in runners:
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                r.step()
            _sync(dev)
            elapsed[r.name] += time.perf_counter() - t0
    rows = []
    n_steps = cfg.rounds * cfg.steps
    for r in runners:
        t = elapsed[r.name] / n_steps
        rows.append({"strategy": r.strategy, "packing": r.packing, "reference": r.reference,
                     "pairs_per_s": cfg.batch_size / t, "tokens_per_s": r.tokens_processed / t,
                     "tokens_processed": r.tokens_processed, "sec_per_step": t, "peak_mem_mb": None})
    if cfg.memory:
        for row in rows:
            row["peak_mem_mb"] = _memory(cfg, row, dev)
    base = {(row["strategy"], row["packing"], row["reference"]): row for row in rows}
    for row in rows:
        ref = base.get(("none", "padded", "cached"))
        same = base.get(("none", row["packing"], row["reference"]))
        if ref:
            row["time_ratio_vs_none_padded_cached"] = ref["pairs_per_s"] / row["pairs_per_s"]
        if same:
            row["time_ratio_vs_none"] = same["pairs_per_s"] / row["pairs_per_s"]
            row["tokens_ratio_vs_none"] = row["tokens_processed"] / same["tokens_processed"]
            if row["peak_mem_mb"] is not None and same["peak_mem_mb"]:
                row["mem_ratio_vs_none"] = row["peak_mem_mb"] / same["peak_mem_mb"]
    log(format_rows(rows))
    log(check_targets(rows))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"config": dataclasses.asdict(cfg), "device": dev.type,
                                              "parameters": n_params, "rows": rows}, indent=1))
    return rows


def _memory(cfg: BenchConfig, row: dict, dev) -> float:
    name = f"{row['strategy']}/{row['packing']}/{row['reference']}"
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        _, policy, ref_model, pairs = _setup(cfg, live_reference=row["reference"] == "live")
        r = Runner(cfg, row["strategy"], row["packing"], row["reference"], policy, ref_model, pairs, dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(2):
            r.step()
        return torch.cuda.max_memory_allocated(dev) / 2**20
    args = [sys.executable, "-m", "workbench", "bench", "--only", name, "--memory", "false"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("only", "memory", "json") or v is None:
            continue
        args += [f"--{f.name}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


def format_rows(rows: list[dict]) -> str:
    head = f"{'strategy':<10}{'packing':<8}{'reference':<10}{'pairs/s':>9}{'tokens/s':>11}{'tokens':>8}" \
           f"{'peak MB':>9}{'time/none':>10}{'tokens/none':>12}{'vs none-padded-cached':>22}"
    lines = [head]
    for r in rows:
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        lines.append(f"{r['strategy']:<10}{r['packing']:<8}{r['reference']:<10}{r['pairs_per_s']:>9.2f}"
                     f"{r['tokens_per_s']:>11.0f}{r['tokens_processed']:>8}{mem:>9}"
                     f"{r.get('time_ratio_vs_none', float('nan')):>10.2f}{r.get('tokens_ratio_vs_none', float('nan')):>12.2f}"
                     f"{r.get('time_ratio_vs_none_padded_cached', float('nan')):>22.2f}")
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
            ratio = s2["pairs_per_s"] / a["pairs_per_s"]
            out.append(f"  averaged/symmetric time ({packing}) {ratio:.2f} <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'}")
    s_tree, n_pad = by.get(("symmetric", "tree", "cached")), by.get(("none", "padded", "cached"))
    if s_tree and n_pad:
        out.append(f"  symmetric with tree packing vs plain DPO padded: {s_tree['time_ratio_vs_none_padded_cached']:.2f}x "
                   "time (the paper reports 1.18-1.25x)")
    return "\n".join(out)

