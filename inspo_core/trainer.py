"""One explicit accelerate training loop for every objective x strategy.

`Trainer.run()` is `setup()` (inspo_core.plan's frozen plan, the engine chosen once by the launcher's
accelerate config or `--sharding`: inspo_core.launch, inspo_core.engines; resume; config.yaml), then
`train()`, the loop, which only trains: score the micro-batch's views (`inspo_core.scoring`), apply
the resolved method, step, log, evaluate, checkpoint; then `finish()`, the final saves. The loop asks
the engine, never which engine it is.

Batching is ours, not a DataLoader's: the global batch of step s is a slice of a seeded per-epoch
permutation, split into `grad_accum` micro-batches per process. That makes exact resume a matter
of restoring weights, optimizer and scheduler, and makes batch 8 x accumulation 1, batch 1 x
accumulation 8 and 2 processes x batch 4 all see the same global batches.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inspo_core.atomic import atomic_write_text
from inspo_core.checkpoint import (
    intact_checkpoints, load_trainer_state, mark_diverged, prune_checkpoints, save_checkpoint, save_model,
)
from inspo_core.config import TrainConfig
from inspo_core.distributed import Processes
from inspo_core.plan import TrainPlan, prepare, score_pending_reference
from inspo_core.refcache import RefStats
from inspo_core.scoring import score_views
from inspo_core.engines import get_engine
from inspo_core.launch import resolve_launch
from inspo_core.sharding import local_state_mb
from inspo_core.strategies import L_PLAIN, W_PLAIN, reflection_gain
from inspo_core.threads import governor


class TrainingError(RuntimeError):
    """An expected stop of a run (divergence): the message says what happened and what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    ref_stats: RefStats
    best_eval_loss: float | None


def lr_lambda(total: int, warmup_ratio: float, min_ratio: float):
    """Appendix D.1: linear warmup over warmup_ratio * total steps, cosine decay to min_ratio."""
    warm = math.ceil(warmup_ratio * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in MB; None where /proc is not there."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM belongs to the current program image;
    ru_maxrss would carry over the parent's peak across fork + exec."""
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    """This process's resident memory now (VmRSS; 0 where /proc is not there)."""
    return _proc_status_mb("VmRSS") or 0.0


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _glibc():
    """glibc's C library, or None (another libc, another OS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Give the heap pages freed so far back to the OS (glibc's malloc_trim). glibc keeps freed blocks in its
    heaps for reuse, so a process that gathered a whole layer, or scored the reference once, keeps that memory
    resident although no tensor holds it. Called at the end of each phase on CPU; False where not glibc."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Serve every allocation above `threshold` bytes by its own mapping, so a freed tensor leaves the resident
    set at once (glibc raises its threshold after the first large free, then keeps such blocks in the heap).
    Costs a fresh, zeroed mapping per large allocation. Not done where the environment already sets
    MALLOC_MMAP_THRESHOLD_ (the user's choice)."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def heap_mode(setting: str, engine) -> str:
    """What `cpu_malloc` means for `engine`: auto is mmap under an engine that shards the model (memory per rank
    is why one shards; its steps were about 11% slower on a 535M model), trim otherwise."""
    if setting != "auto":
        return setting
    return "mmap" if engine.loads_into_shards else "trim"


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


@dataclass
class Session:
    """What `Trainer.setup` builds and the loop trains: the wrapped scorer, its optimizer and schedule, and
    where the run starts (0, or the resumed checkpoint's step and best validation loss)."""

    scorer: torch.nn.Module
    optimizer: Any
    scheduler: Any
    start: int
    best: float | None


class Trainer:
    """`run()` = `setup()` (guard, seed, plan, engine, resume, config.yaml, trackers), `train()` (the loop
    only), `finish()` (the last checks and saves)."""

    def __init__(self, cfg: TrainConfig, accelerator=None):
        # the launcher's accelerate config and the workbench's flags decide engine and precision, once
        self.cfg, self.launcher, notes = resolve_launch(cfg)
        self.engine = get_engine(self.cfg.sharding)
        on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        # rank, world, barriers and sums come from the process group (DeepSpeed on CPU misreports them)
        self.acc = Processes(accelerator or self.engine.accelerator(self.cfg, on_cpu, _say_on_rank0))
        self.plan: TrainPlan | None = None
        self.memory: dict[str, float] = {}  # phase -> this process's peak memory by its end (MB)
        self.memory_now: dict[str, float] = {}  # phase -> its resident memory at that moment (MB)
        self.session: Session | None = None
        self.malloc = heap_mode(self.cfg.cpu_malloc, self.engine)
        for note in notes:
            self.say(note)
        self.say(f"engine {self.engine.name}, {'bf16' if self.cfg.bf16 else 'fp32'} ({self.launcher.describe()})")

    def say(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(f"[inspo] {msg}", flush=True)

    # ---- batching -----------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[list[int]]:
        """Indices of this process's micro-batches for optimizer step `step`."""
        plan, cfg = self.plan, self.cfg
        epoch, offset = divmod(step, plan.per_epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(plan.train_pairs), generator=gen)
        g, bs, world, rank = plan.global_batch, cfg.batch_size, self.acc.num_processes, self.acc.process_index
        idx = perm[offset * g : (offset + 1) * g].tolist()
        return [idx[(m * world + rank) * bs : (m * world + rank + 1) * bs] for m in range(cfg.grad_accum)]

    # ---- loss ---------------------------------------------------------------------------------------
    def loss_terms(self, scorer, pairs, idx: list[int], views, ref: dict) -> dict[str, Any]:
        """Loss and per-example statistics of one micro-batch (`pairs` are the pairs at `idx`)."""
        plan, cfg, dev = self.plan, self.cfg, self.acc.device
        with self.acc.autocast():
            scored = score_views(scorer, pairs, list(views), packing=cfg.packing, pad_id=plan.pad_id,
                                 pack_tokens=cfg.pack_tokens, device=dev,
                                 mask_dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        logps = scored.logps
        ref_logps = {v: t[idx].to(dev) for v, t in ref.items()} if plan.method.objective.needs_reference else None
        res = plan.method.loss(logps, ref_logps, scored.lengths)
        main_c, main_r = plan.method.main_views
        stats = {
            "loss": res.losses.detach(),
            "rewards/chosen": res.chosen_rewards,
            "rewards/rejected": res.rejected_rewards,
            "rewards/margins": res.chosen_rewards - res.rejected_rewards,
            "rewards/accuracies": (res.chosen_rewards > res.rejected_rewards).float(),
            "logps/chosen": logps[main_c].detach(),
            "logps/rejected": logps[main_r].detach(),
        }
        if main_c.context and W_PLAIN in logps and L_PLAIN in logps:
            stats["logps/chosen_plain"] = logps[W_PLAIN].detach()
            stats["logps/rejected_plain"] = logps[L_PLAIN].detach()
        gain = reflection_gain({k: v.detach() for k, v in logps.items()})
        if gain is not None:
            stats["reflection/gain"] = gain
        return {"loss": res.losses.mean(), "stats": stats, "tokens": scored.tokens}

    def reduce_stats(self, parts: list[dict[str, torch.Tensor]], count: int | None = None) -> dict[str, float]:
        """Means over every example of the global batch (all micro-batches, all processes).

        `count` overrides this process's example count (0 for a process that only joins the reduction)."""
        keys = parts[0].keys()
        sums = torch.stack([torch.stack([p[k].float().sum() for p in parts]).sum() for k in keys])
        if count == 0:
            sums = torch.zeros_like(sums)
        count = torch.tensor(float(sum(len(p["loss"]) for p in parts) if count is None else count), device=sums.device)
        sums = self.acc.reduce(sums, "sum")
        count = self.acc.reduce(count, "sum")
        return {k: (s / count).item() for k, s in zip(keys, sums)}

    @torch.no_grad()
    def evaluate(self, scorer) -> dict[str, float]:
        """Validation metrics; each process scores its share of the pairs and the sums are reduced."""
        plan = self.plan
        if not plan.val_pairs:
            return {}
        model = self.acc.unwrap_model(scorer)
        was = model.training
        model.eval()
        n, world, bs = len(plan.val_pairs), self.acc.num_processes, self.cfg.batch_size
        mine = list(range(self.acc.process_index, n, world))
        batches = [mine[s : s + bs] for s in range(0, len(mine), bs)]
        # Under FSDP2 and ZeRO-3 every forward is a collective, so every process runs as many as the busiest one
        # (ceil(ceil(n / world) / bs), at least one): the missing ones score pair 0 as dummies that count for
        # nothing. A process without pairs keeps one dummy's statistics with count 0 for the reduction's shape.
        steps = max(1, math.ceil(math.ceil(n / world) / bs))
        score = lambda idx: self.loss_terms(model, [plan.val_pairs[i] for i in idx], idx,  # noqa: E731
                                            plan.eval_views, plan.ref_val)["stats"]
        parts = [score(idx) for idx in batches]
        dummies = [score([0]) for _ in range(steps - len(batches))]
        model.train(was)
        return {f"eval/{k}": v for k, v in self.reduce_stats(parts or dummies[:1], None if parts else 0).items()}

    # ---- setup, loop, finish -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """One whole run: setup, the loop, the final saves."""
        self.setup()
        return self.finish(self.train())

    def _mark(self, phase: str) -> None:
        """This process's peak resident memory (and CUDA's peak allocation) at the end of `phase`; a high-water
        mark, so each phase's value includes the ones before it."""
        self.memory[phase] = peak_mem_mb(self.acc.device)
        if self.acc.device.type == "cpu" and self.malloc != "default":
            return_freed_memory()
        self.memory_now[phase] = resident_mb()

    def _write_memory(self) -> None:
        """memory.json: every rank's marks (one collective), written by the main process."""
        phases, world = list(self.memory), self.acc.num_processes
        table = torch.zeros(2, world, len(phases), dtype=torch.float64, device=self.acc.device)
        table[0, self.acc.process_index] = torch.tensor([self.memory[p] for p in phases], dtype=torch.float64)
        table[1, self.acc.process_index] = torch.tensor([self.memory_now[p] for p in phases], dtype=torch.float64)
        table = self.acc.reduce(table, "sum").cpu()
        if self.acc.is_main_process:
            per_rank = [dict(zip(phases, map(float, row))) for row in table[0].tolist()]
            held = [dict(zip(phases, map(float, row))) for row in table[1].tolist()]
            peak = max(r[phases[-1]] for r in per_rank)
            first = next(p for p in phases if max(r[p] for r in per_rank) >= peak - 1)
            doc = {"unit": "MB", "measure": ("CUDA max_memory_allocated" if self.acc.device.type == "cuda" else
                                              "peak resident set (VmHWM)") + " of each rank at the end of each phase",
                   "engine": self.engine.name, "processes": world, "phases": phases, "ranks": per_rank,
                   "cpu_malloc": self.malloc if self.acc.device.type == "cpu" else None,
                   "resident_mb": held,  # resident set (VmRSS) at the end of each phase: what the phase left held
                   "peak_mb": peak, "peak_phase": first}
            atomic_write_text(self.plan.run.memory_json, json.dumps(doc, indent=1))
            self.say(f"peak memory per rank: {', '.join(f'{r[phases[-1]]:.0f}' for r in per_rank)} MB "
                     f"(highest first reached by the end of: {first}) -> {self.plan.run.memory_json}")

    def setup(self) -> TrainPlan:
        """Everything before the first step: the plan (inspo_core.plan.prepare), the engine's scorer and
        optimizer, a resume's state, config.yaml and the trackers. Trains nothing."""
        cfg, acc, engine = self.cfg, self.acc, self.engine
        if acc.distributed_type.name == "FSDP":
            raise ValueError("this Accelerator carries accelerate's FSDP plugin; the workbench shards the model itself "
                             "(sharding fsdp2, the same code on CPU and GPU): build it without one")
        if acc.device.type == "cpu" and self.malloc == "mmap":
            map_large_allocations()
        torch.manual_seed(cfg.seed)
        self.plan, scorer = prepare(cfg, acc, engine, self.say, launcher=self.launcher.describe(), mark=self._mark)
        plan, run = self.plan, self.plan.run
        optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=cfg.lr,
                                      betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(plan.total_steps, cfg.warmup_ratio,
                                                                           cfg.min_lr_ratio))
        scorer, optimizer = engine.prepare(acc, scorer, optimizer, plan)
        if plan.reference_pending:  # scored by the wrapped, sharded policy before a resume's state is read into it
            self.plan = plan = score_pending_reference(plan, scorer, acc, self.say)
            self._mark("reference")
        start, best = 0, None
        if plan.resume_from is not None:
            state = load_trainer_state(acc, engine, plan.resume_from, optimizer, scheduler, scorer)
            start, best = state["step"], state.get("best_eval_loss")
            if acc.is_main_process:
                run.metrics.truncate_after(start)
            self.say(f"resumed from {plan.resume_from} at step {start}")
        if acc.is_main_process:
            run.write_config(plan.config_record)
        if cfg.report_to:
            acc.init_trackers("inspo", config={k: v for k, v in plan.config_record.items()
                                               if isinstance(v, (int, float, str, bool))})
        self.say(f"{cfg.objective} x {cfg.strategy}: {len(plan.train_pairs)} train / {len(plan.val_pairs)} "
                 f"validation pairs, {plan.total_steps} steps of {plan.global_batch} pairs, "
                 f"{acc.num_processes} process(es), engine {engine.name}")
        self.session = Session(scorer, optimizer, scheduler, start, best)
        self._mark("setup")
        return plan

    def train(self) -> float:
        """The loop, from the session's start to the plan's last step (after `setup`): score, step, log,
        evaluate (keeping `best/`), checkpoint. Returns the last step's loss."""
        assert self.session is not None, "Trainer.setup() first (or Trainer.run())"
        cfg, acc, plan, engine, run = self.cfg, self.acc, self.plan, self.plan.engine, self.plan.run
        sess = self.session
        scorer, optimizer, scheduler = sess.scorer, sess.optimizer, sess.scheduler
        progress = _progress(plan.total_steps, sess.start, acc.is_main_process)
        last_loss = float("nan")
        scorer.train()
        threads = governor(self.say) if acc.device.type == "cpu" else None
        for step in range(sess.start, plan.total_steps):
            if threads is not None:
                threads.tick()  # between steps: torch's threads follow the cores other processes leave
            t0 = time.perf_counter()
            parts, tokens, grad_norm = [], 0, None
            for idx in self.micro_batches(step):
                with acc.accumulate(scorer):
                    terms = self.loss_terms(scorer, [plan.train_pairs[i] for i in idx], idx,
                                            plan.method.policy_views, plan.ref_train)
                    if not torch.isfinite(terms["loss"]):
                        self._fail_nonfinite(step)
                    acc.backward(terms["loss"])
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = engine.clip_grad_norm(acc, scorer, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                parts.append(terms["stats"])
                tokens += terms["tokens"]
            grad_norm = engine.step_grad_norm(scorer, grad_norm)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            row = self.reduce_stats(parts)
            last_loss = row["loss"]
            if not math.isfinite(last_loss):
                self._fail_nonfinite(step)
            dt = time.perf_counter() - t0
            tokens = int(acc.reduce(torch.tensor(float(tokens), device=acc.device), "sum").item())
            row = {"step": step + 1, "epoch": (step + 1) / plan.per_epoch, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None, **row,
                   "tokens_per_s": tokens / dt, "pairs_per_s": plan.global_batch / dt,
                   "peak_mem_mb": peak_mem_mb(acc.device), "state_mb": local_state_mb(scorer, optimizer),
                   "threads": torch.get_num_threads()}
            progress.update(row)
            done = step + 1
            if acc.is_main_process and (done % cfg.log_every == 0 or done == plan.total_steps):
                run.metrics.write(row)
                if cfg.report_to:
                    acc.log({k: v for k, v in row.items() if v is not None}, step=done)
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == plan.total_steps:
                ev = self.evaluate(scorer)
                if ev:
                    ev = {"step": done, "epoch": done / plan.per_epoch, **ev}
                    if acc.is_main_process:
                        run.metrics.write(ev)
                    if not math.isfinite(ev["eval/loss"]):
                        self._stop_diverged(f"non-finite validation loss after step {done}", below=done)
                    if sess.best is None or ev["eval/loss"] < sess.best:
                        sess.best = ev["eval/loss"]
                        save_model(acc, engine, scorer, acc.unwrap_model(scorer).lm, plan.tokenizer, run.best,
                                   merge_lora=cfg.merge_final)
            if cfg.save_every and done % cfg.save_every == 0 and done < plan.total_steps:
                self._checkpoint(scorer, optimizer, scheduler, done, sess.best)
        progress.close()
        self._mark("train")
        return last_loss

    def finish(self, last_loss: float) -> TrainResult:
        """After the loop: weights checked finite, `final/` (and the last checkpoint) written, trackers closed."""
        cfg, acc, plan, run, sess = self.cfg, self.acc, self.plan, self.plan.run, self.session
        self._check_finite_weights(sess.scorer, plan.total_steps)
        save_model(acc, plan.engine, sess.scorer, acc.unwrap_model(sess.scorer).lm, plan.tokenizer, run.final,
                   merge_lora=cfg.merge_final)
        if cfg.save_every:
            self._checkpoint(sess.scorer, sess.optimizer, sess.scheduler, plan.total_steps, sess.best)
        self._mark("save")
        self._write_memory()
        if cfg.report_to:
            acc.end_training()
        self.say(f"done: {plan.total_steps} steps, final loss {last_loss:.4f}; model in {run.final}")
        return TrainResult(run.path, plan.total_steps, last_loss, plan.ref_stats, sess.best)

    def _checkpoint(self, scorer, optimizer, scheduler, step: int, best) -> None:
        plan, acc = self.plan, self.acc
        self._check_finite_weights(scorer, step)
        save_checkpoint(acc, plan.engine, scorer, acc.unwrap_model(scorer).lm, plan.tokenizer, optimizer, scheduler,
                        plan.run,
                        step, {"best_eval_loss": best, "epoch": step / plan.per_epoch, "config": plan.config_record})
        if acc.is_main_process:
            for gone in prune_checkpoints(plan.run, self.cfg.save_total_limit):
                self.say(f"removed {gone} (save_total_limit {self.cfg.save_total_limit})")

    def _check_finite_weights(self, scorer, step: int) -> None:
        """Stop before saving weights that are not finite (after `step` optimizer steps)."""
        local = self.plan.engine.local_tensors(scorer)
        bad = torch.tensor(float(any(not torch.isfinite(p).all() for p in local)), device=self.acc.device)
        if self.acc.reduce(bad, "sum").item() > 0:
            self._stop_diverged(f"non-finite weights after step {step}", below=step)

    def _fail_nonfinite(self, step: int, where: str = "loss"):
        """Optimizer step `step` (0-based) has a non-finite `where`. Its weights came from the update
        before it, so the checkpoint holding them (step-`step`) is not good either."""
        self._stop_diverged(f"non-finite {where} at step {step + 1}", below=step)

    def _stop_diverged(self, what: str, below: int):
        """Mark checkpoints from step `below` on as diverged (so --resume skips them), name the newest
        good one, stop with a TrainingError (the CLI prints it without a traceback)."""
        run = self.plan.run
        found = intact_checkpoints(run, lambda _m: None)
        if self.acc.is_main_process:
            for s, p in found:
                if s >= below:
                    mark_diverged(p, what)
        good = [p for s, p in found if s < below]
        raise TrainingError(
            f"{what}; stopped without saving. Last good checkpoint: {good[-1] if good else 'none'}"
            + (" (--resume continues from it; the newer ones are marked as diverged)" if good else "")
            + ". Lower lr, check the data, or disable bf16 (a resume must keep the config: with another lr, "
            "start a new run from that checkpoint's weights with --model)."
        )


def _say_on_rank0(msg: str) -> None:
    """Print on the launcher's rank 0 (before any process group exists; RANK unset without a launcher)."""
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[inspo] {msg}", flush=True)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so another run in the same process (demo, sweep,
    notebooks, tests) starts from its own settings (accumulation steps, precision)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(cfg: TrainConfig) -> TrainResult:
    """One run in this process, after any earlier one."""
    reset_accelerate_state()
    return Trainer(cfg).run()


class _progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=2.0)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                                 pairs_s=f"{row['pairs_per_s']:.1f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
