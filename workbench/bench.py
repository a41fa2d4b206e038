"""`python -m workbench bench`: the cost of self-reflective conditioning, measured side by side.

A Llama-style model is built from a config (no download) and a seeded synthetic set of pairs is
laid out by the conditioning builder's rules: `--lengths fixed` (every prompt and response of one
length, the historical preset) or `--lengths realistic` (prompts 16-256 and responses 20-400 tokens,
log-uniform, chosen and rejected drawn apart, written as words of a word-level tokenizer and built by
the real `ConditioningBuilder` within `max_length`). Every configuration strategy {none, symmetric,
averaged} x packing {padded, tree} x reference {cached, live} runs full training steps (forward,
DPO loss, backward, AdamW) in one process, interleaved round by round so drift hits all alike; with
realistic lengths and `trl` installed, TRL's `DPOTrainer` with precomputed reference log-probs (its
fastest setting) runs as a peer row on the same model, text, batch size and max_length.

Reported per configuration: seconds and pairs per step, tokens processed per step (positions the
model computes, padding included), model FLOPs utilisation against this machine's own measured
matmul throughput, peak memory, and ratios. On CPU peak memory is measured per configuration in a
child process (peak RSS growth); on CUDA it is `max_memory_allocated` in the same process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from inspo_core.conditioning import BuiltPair
from inspo_core.logps import TokenLogps
from inspo_core.scoring import prepare_batch, score_batch
from inspo_core.strategies import resolve_method
from inspo_core.trainer import map_large_allocations, peak_rss_mb
from inspo_core.tree_attention import use_tree_attention
from workbench.bench_config import PRESETS, TIED, BenchConfig
from workbench.bench_data import Data, matmul_params, model_flops
from workbench.bench_report import TRL_ROW, add_ratios, check_targets, format_rows

def model_for(cfg: BenchConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, layers, heads, kv, inter, vocab = PRESETS[cfg.preset]
    torch.manual_seed(cfg.seed)
    mc = LlamaConfig(vocab_size=cfg.vocab or vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                     attn_implementation="sdpa", tie_word_embeddings=cfg.preset in TIED)
    return LlamaForCausalLM(mc)


def with_lora(model, r: int):
    """`model` with LoRA adapters of rank r (alpha 2r) on every linear layer of the body, as the workbench's
    SmolLM2 runs train (peft's "all-linear" leaves the LM head out); r = 0: the model itself."""
    if not r:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))


def gemm_flops_per_s(dev, dtype, n: int | None = None, reps: int = 5) -> float:
    """This machine's matmul throughput: the best of `reps` n x n x n products (FLOP/s)."""
    n = n or (4096 if dev.type == "cuda" else 1536)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(dev)
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class Runner:
    """One configuration: its step function and what it processes."""

    def __init__(self, cfg: BenchConfig, strategy: str, packing: str, reference: str, policy, ref_model,
                 batches: list[list[BuiltPair]], dev):
        self.name = (strategy, packing, reference)
        self.cfg, self.strategy, self.packing, self.reference = cfg, strategy, packing, reference
        self.method = resolve_method("dpo", strategy)
        self.dev = dev
        self.policy, self.ref_model = policy, ref_model
        self.scorer = TokenLogps(policy)
        self.opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
        self.mask_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        # batches are laid out once, outside the timed steps (as a data loader's workers would)
        self.batches = [prepare_batch(b, self.method.policy_views, packing=packing) for b in batches]
        self.ref_batches = [prepare_batch(b, self.method.ref_views, packing=packing) for b in batches]
        self.pairs = batches
        # positions computed per step, padding included (mean over the batches)
        self.tokens_processed = sum(b.batch.input_ids.numel() for b in self.batches) / len(self.batches)
        self.cached = [self.ref_logps(ref_model, i) for i in range(len(batches))]  # what the cache would hold
        self.i = 0

    def ref_logps(self, model, i: int):
        with torch.no_grad():
            return score_batch(TokenLogps(model), self.ref_batches[i], device=self.dev,
                               mask_dtype=self.mask_dtype).logps

    def flops_per_step(self, matmul: tuple[int, int], layers: int, hidden: int) -> float:
        """Mean model FLOPs of one step (policy forward + backward; the live reference's forward)."""
        total = 0.0
        for pairs in self.pairs:
            total += model_flops(pairs, self.method.policy_views, matmul, layers, hidden, train=True)
            if self.reference == "live":
                total += model_flops(pairs, self.method.ref_views, matmul, layers, hidden, train=False)
        return total / len(self.pairs)

    def step(self) -> None:
        i, self.i = self.i, (self.i + 1) % len(self.batches)
        ref = self.cached[i] if self.reference == "cached" else self.ref_logps(self.ref_model, i)
        scored = score_batch(self.scorer, self.batches[i], device=self.dev, mask_dtype=self.mask_dtype)
        loss = self.method.loss(scored.logps, ref, scored.lengths).losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, steps: int) -> list[float]:
        """Seconds of each of `steps` steps."""
        out = []
        for _ in range(steps):
            _sync(self.dev)
            t0 = time.perf_counter()
            self.step()
            _sync(self.dev)
            out.append(time.perf_counter() - t0)
        return out


class TrlRunner:
    """TRL's DPOTrainer on the same model (fresh weights of the same seed), text and batch size, with
    the reference log-probs precomputed; each round is one `train()` call of warmup + steps steps,
    timed from the first forward of a step to the end of its optimizer step (the batch's collation,
    which ours does outside the timed steps too, is not counted)."""

    name = TRL_ROW
    strategy, packing, reference = name

    def __init__(self, cfg: BenchConfig, rows: list[dict], tok, dev, flops: float):
        import datasets
        from huggingface_hub import constants
        from transformers import PrinterCallback, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        # TRL sends telemetry from a thread when a trainer is made; offline, that thread's retries hold
        # the GIL and slowed every configuration in this process ~25x (measured). HF_HUB_DISABLE_TELEMETRY=1
        # is the documented switch; huggingface_hub read it at import, so it is set on the loaded module.
        constants.HF_HUB_DISABLE_TELEMETRY = True

        self.cfg, self.dev, self.flops = cfg, dev, flops
        self.tmp = tempfile.TemporaryDirectory(prefix="inspo-bench-trl-")
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        model = model_for(cfg).to(dev, dtype)
        args = DPOConfig(output_dir=self.tmp.name, per_device_train_batch_size=cfg.batch_size,
                         max_length=cfg.max_length, precompute_ref_log_probs=True, gradient_checkpointing=False,
                         bf16=cfg.bf16, learning_rate=1e-6, optim="adamw_torch", lr_scheduler_type="constant",
                         report_to=[], logging_strategy="no", save_strategy="no", max_steps=cfg.warmup + cfg.steps,
                         use_cpu=dev.type == "cpu", dataloader_num_workers=0, seed=cfg.seed, disable_tqdm=True)
        # the same token ids as ours: TRL concatenates prompt + completion text, and adds EOS unless present
        data = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": f" {r['chosen']} </s>",
                                            "rejected": f" {r['rejected']} </s>"} for r in rows])
        self.times: list[float] = []
        times = self.times

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                _sync(dev)
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync(dev)
                times.append(time.perf_counter() - self.t0)

        lora = None
        if cfg.lora_r:  # the same adapters as ours (`with_lora`), given to TRL the way its users do
            from peft import LoraConfig

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules="all-linear")
        self.trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=data,
                                  callbacks=[StepTimer()], peft_config=lora)
        self.trainer.remove_callback(PrinterCallback)  # its end-of-training metrics would interleave the table
        self.tokens_processed = None

    def run(self, steps: int) -> list[float]:
        self.trainer.args.max_steps = self.cfg.warmup + steps
        before = len(self.times)
        self.trainer.train()
        return self.times[before + self.cfg.warmup:]

    def step(self) -> None:  # one step for the profiler
        self.trainer.args.max_steps = 1
        self.trainer.train()


def executed_flops(r) -> float:
    """FLOPs one step of `r` executes, as torch's FlopCounterMode counts them (the mean over the runner's
    batches; TRL's row: one step): every matmul the layout runs, padding, the LM head where it is computed and
    (a trained head: it is checkpointed) its recompute in the backward included. SDPA runs on its math kernel while counting, so attention counts as
    the full square that kernel computes (the fused CPU kernel skips blocks above the diagonal: for attention
    this count is an upper bound). The step trains as a timed one does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    steps = len(r.batches) if isinstance(r, Runner) else 1
    fc = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), fc:
        for _ in range(steps):
            r.step()
    return fc.get_total_flops() / steps


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _setup(cfg: BenchConfig, live_reference: bool = True):
    """Policy and a frozen reference, both the same seeded initial weights; without a live
    reference the policy itself fills the cache (identical values, one model in memory)."""
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       (cfg.device if cfg.device != "auto" else "cpu"))
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    policy = with_lora(model_for(cfg).to(dev, dtype), cfg.lora_r)
    ref_model = policy
    if live_reference:
        ref_model = model_for(cfg).to(dev, dtype).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    if cfg.tree_attention == "segments":
        for m in {id(policy): policy, id(ref_model): ref_model}.values():
            use_tree_attention(m)
    if cfg.gradient_checkpointing:
        from inspo_core.plan import enable_checkpointing

        enable_checkpointing(policy)
    return dev, policy, ref_model


def _trl_available(cfg: BenchConfig, log) -> bool:
    if not (cfg.trl and cfg.lengths == "realistic"):
        return False
    try:
        import trl  # noqa: F401
    except ImportError:
        log("trl is not installed: no TRL row (pip install trl)")
        return False
    return True


def measure_one_memory(cfg: BenchConfig) -> float:
    """Peak memory growth of warmup + 2 steps of the configuration named by cfg.only (MB)."""
    strategy, packing, reference = cfg.only.split("/")
    if torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu").type == "cpu":
        map_large_allocations()  # freed blocks leave the resident set at once
    if strategy == "trl-dpo":
        dev = torch.device("cpu")
        data = Data(cfg, model_for(cfg).config.vocab_size)
        r = TrlRunner(dataclasses.replace(cfg, warmup=0), data.rows, data.tok, dev, 0.0)
        base = peak_rss_mb()
        r.run(2)
        return peak_rss_mb() - base
    dev, policy, ref_model = _setup(cfg, live_reference=reference == "live")
    r = Runner(cfg, strategy, packing, reference, policy, ref_model, Data(cfg, policy.config.vocab_size)
               .batches(strategy), dev)
    base = peak_rss_mb()
    for _ in range(2):
        r.step()
    return peak_rss_mb() - base


def run_bench(cfg: BenchConfig, log=print) -> list[dict]:
    if cfg.only:
        print(f"{measure_one_memory(cfg):.1f}")
        return []
    if cfg.sweep:
        from workbench.bench_sweep import run_sweep

        return run_sweep(cfg, run_bench, versions(), log)
    dev, policy, ref_model = _setup(cfg)
    mc = policy.config
    n_params = sum(p.numel() for p in policy.parameters())
    matmul = matmul_params(policy)  # body and LM head matmul weights (the embedding lookup and norms are none)
    data = Data(cfg, mc.vocab_size)
    combos = [(s, p, r) for s in cfg.strategies for p in cfg.packings for r in cfg.references]
    batches = {s: data.batches(s) for s in cfg.strategies}
    runners = [Runner(cfg, s, p, r, policy, ref_model, batches[s], dev) for s, p, r in combos]
    if _trl_available(cfg, log):
        dpo_views = resolve_method("dpo", "none").policy_views
        dpo = sum(model_flops(b, dpo_views, matmul, mc.num_hidden_layers, mc.hidden_size, train=True)
                  for b in batches.get("none") or data.batches("none")) / cfg.n_batches
        runners.append(TrlRunner(cfg, data.rows, data.tok, dev, dpo))
    gemm = lambda: gemm_flops_per_s(dev, torch.bfloat16 if cfg.bf16 else torch.float32)  # noqa: E731
    peak = gemm()
    shape = (f"prompt {cfg.prompt_len}, responses {cfg.response_len}" if cfg.lengths == "fixed" else
             f"realistic lengths (prompts 16-256, responses 20-400 tokens) within max_length {cfg.max_length}, "
             f"{cfg.n_batches} batches")
    log(f"bench: {cfg.preset} ({n_params / 1e6:.1f}M parameters), {dev.type}, {'bf16' if cfg.bf16 else 'fp32'}, "
        f"{cfg.batch_size} pairs/step, {shape}, context {cfg.context_format}; {cfg.rounds} x {cfg.steps} timed "
        f"steps per configuration")
    for r in runners:
        if isinstance(r, Runner):
            for _ in range(cfg.warmup):
                r.step()
    times: dict = {r.name: [] for r in runners}
    for _ in range(cfg.rounds):
        for r in runners:
            times[r.name] += r.run(cfg.steps)
    peak = max(peak, gemm())  # the machine's best of before and after: MFU is not flattered by a slow moment
    executed = {r.name: executed_flops(r) for r in runners}  # after the timed steps: counting slows a step
    if cfg.profile:
        for r in runners:
            log(profile_step(r))
    rows = []
    for r in runners:
        t = sum(times[r.name]) / len(times[r.name])
        flops = r.flops if isinstance(r, TrlRunner) else r.flops_per_step(matmul, mc.num_hidden_layers,
                                                                           mc.hidden_size)
        rows.append({"strategy": r.strategy, "packing": r.packing, "reference": r.reference,
                     "pairs_per_s": cfg.batch_size / t, "sec_per_step": t,
                     "tokens_per_s": r.tokens_processed / t if r.tokens_processed else None,
                     "tokens_processed": r.tokens_processed, "model_flops": flops, "mfu": flops / t / peak,
                     "executed_flops": executed[r.name], "mfu_executed": executed[r.name] / t / peak,
                     "peak_mem_mb": None})
    if cfg.memory:
        for row in rows:
            row["peak_mem_mb"] = _memory(cfg, row, dev)
    add_ratios(rows)
    log(format_rows(rows))
    log(f"MFU over this machine's measured matmul throughput, {peak / 1e9:.1f} GFLOP/s "
        f"({'bf16' if cfg.bf16 else 'fp32'} GEMM, best of before and after), of two counts: model FLOPs (what the "
        "work needs: each view's sequence on its own, no padding, 6 per trained and 4 per frozen matmul weight per "
        "token, the LM head at scored tokens, causal attention) and executed FLOPs (what the step ran, counted by "
        "torch's FlopCounterMode: padding, a trained head's recompute, attention as full squares; tree packing's shared "
        "prompt once)")
    log(check_targets(rows))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"config": dataclasses.asdict(cfg), "device": dev.type,
                                              "parameters": n_params, "gemm_flops_per_s": peak, "rows": rows,
                                              "versions": versions()}, indent=1))
    return rows


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


def profile_step(r) -> str:
    """Where one step of `r` spends its time: the profiler's top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        r.step()
    key = "self_cuda_time_total" if r.dev.type == "cuda" else "self_cpu_time_total"
    name = "/".join(r.name)
    return f"profile of one step, {name}:\n" + prof.key_averages().table(sort_by=key, row_limit=14)


def _memory(cfg: BenchConfig, row: dict, dev) -> float:
    name = f"{row['strategy']}/{row['packing']}/{row['reference']}"
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        if row["strategy"] == "trl-dpo":
            data = Data(cfg, model_for(cfg).config.vocab_size)
            r = TrlRunner(dataclasses.replace(cfg, warmup=0), data.rows, data.tok, dev, 0.0)
        else:
            _, policy, ref_model = _setup(cfg, live_reference=row["reference"] == "live")
            r = Runner(cfg, row["strategy"], row["packing"], row["reference"], policy, ref_model,
                       Data(cfg, policy.config.vocab_size).batches(row["strategy"]), dev)
        torch.cuda.reset_peak_memory_stats(dev)
        r.run(2)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    args = [sys.executable, "-m", "workbench", "bench", "--only", name, "--memory", "false"]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("only", "memory", "json") or v is None:
            continue
        args += [f"--{f.name}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])
