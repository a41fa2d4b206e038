"""One explicit accelerate training loop for every objective x strategy.

`Trainer.train()` is `prepare` (inspo_core.plan: a frozen plan of the run) followed by the loop
below, which only trains: score the micro-batch's views (`inspo_core.scoring`), apply the resolved
method, step, log, evaluate, checkpoint.

Batching is ours, not a DataLoader's: the global batch of step s is a slice of a seeded per-epoch
permutation, split into `grad_accum` micro-batches per process. That makes exact resume a matter
of restoring weights, optimizer and scheduler, and makes batch 8 x accumulation 1, batch 1 x
accumulation 8 and 2 processes x batch 4 all see the same global batches.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inspo_core.checkpoint import (
    intact_checkpoints, load_trainer_state, mark_diverged, prune_checkpoints, save_checkpoint, save_model,
)
from inspo_core.config import TrainConfig
from inspo_core.distributed import Processes
from inspo_core.logps import TokenLogps
from inspo_core.plan import TrainPlan, prepare
from inspo_core.refcache import RefStats
from inspo_core.scoring import score_views
from inspo_core.sharding import before_deepspeed, init_process_group, local_state_mb, shard
from inspo_core.strategies import L_PLAIN, W_PLAIN, reflection_gain


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


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM belongs to the current program image;
    ru_maxrss would carry over the parent's peak across fork + exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator=None):
        from accelerate import Accelerator

        self.cfg = cfg
        on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        kw = {}
        if cfg.sharding == "zero3":  # DeepSpeed ZeRO-3 through accelerate, on CPU (its CPU accelerator) and GPU
            from accelerate.utils import DeepSpeedPlugin

            # a process group of one without a launcher; on CPU no JIT build of DeepSpeed's shm comm op
            before_deepspeed(on_cpu, lambda m: print(f"[inspo] {m}", flush=True) if _env_rank() == 0 else None)
            kw["deepspeed_plugin"] = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=cfg.grad_accum,
                                                     gradient_clipping=cfg.max_grad_norm or None, zero3_init_flag=False,
                                                     zero3_save_16bit_model=True)
        else:
            kw["cpu"] = on_cpu  # on CPU-only machines this makes torchrun-launched processes form a gloo group
        # rank, world, barriers and sums come from the process group (DeepSpeed on CPU misreports them)
        self.acc = Processes(accelerator or Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision="bf16" if cfg.bf16 else "no",
            log_with=cfg.report_to or None,
            project_dir=cfg.output_dir,
            **kw,
        ))
        self.plan: TrainPlan | None = None

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

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        if acc.distributed_type.name == "FSDP":
            raise ValueError("accelerate's FSDP plugin is not used: launch with configs/accelerate/fsdp2.yaml (a plain "
                             "multi-process launcher) and pass --sharding fsdp2; the workbench shards the model itself, "
                             "with the same code on CPU and GPU")
        torch.manual_seed(cfg.seed)
        self.plan, policy = prepare(cfg, acc, self.say)
        plan, run = self.plan, self.plan.run

        scorer, optimizer, scheduler, clip_params = self._engine(policy)

        start, best = 0, None
        if plan.resume_from is not None:
            state = load_trainer_state(acc, plan.resume_from, optimizer, scheduler, scorer)
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
                 f"{acc.num_processes} process(es)")

        progress = _progress(plan.total_steps, start, acc.is_main_process)
        last_loss = float("nan")
        scorer.train()
        for step in range(start, plan.total_steps):
            t0 = time.perf_counter()
            parts, tokens, grad_norm = [], 0, None
            for idx in self.micro_batches(step):
                with acc.accumulate(scorer):
                    terms = self.loss_terms(scorer, [plan.train_pairs[i] for i in idx], idx,
                                            plan.method.policy_views, plan.ref_train)
                    if not torch.isfinite(terms["loss"]):
                        self._fail_nonfinite(step)
                    acc.backward(terms["loss"])
                    if acc.sync_gradients and cfg.max_grad_norm > 0 and cfg.sharding != "zero3":
                        grad_norm = acc.clip_grad_norm_(clip_params, cfg.max_grad_norm)
                        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                parts.append(terms["stats"])
                tokens += terms["tokens"]
            if cfg.sharding == "zero3":  # DeepSpeed clips inside its step; read the norm it used
                grad_norm = scorer.get_global_grad_norm()
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
                   "peak_mem_mb": peak_mem_mb(acc.device), "state_mb": local_state_mb(scorer, optimizer)}
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
                    if best is None or ev["eval/loss"] < best:
                        best = ev["eval/loss"]
                        save_model(acc, scorer, acc.unwrap_model(scorer).lm, plan.tokenizer, run.best,
                                   merge_lora=True)
            if cfg.save_every and done % cfg.save_every == 0 and done < plan.total_steps:
                self._checkpoint(scorer, optimizer, scheduler, done, best)
        progress.close()
        self._check_finite_weights(scorer, plan.total_steps)
        lm = acc.unwrap_model(scorer).lm
        save_model(acc, scorer, lm, plan.tokenizer, run.final, merge_lora=True)
        if cfg.save_every:
            self._checkpoint(scorer, optimizer, scheduler, plan.total_steps, best)
        if cfg.report_to:
            acc.end_training()
        self.say(f"done: {plan.total_steps} steps, final loss {last_loss:.4f}; model in {run.final}")
        return TrainResult(run.path, plan.total_steps, last_loss, plan.ref_stats, best)

    def _engine(self, policy):
        """(scorer, optimizer, scheduler, parameters to clip) on the configured engine: accelerate for one
        process or DDP, our FSDP2 (the same code on CPU and GPU; accelerate only steps the optimizer), or
        DeepSpeed ZeRO-3 through accelerate."""
        cfg, acc, plan = self.cfg, self.acc, self.plan
        scorer = TokenLogps(policy, chunk_mb=cfg.logps_chunk_mb)
        if cfg.sharding == "fsdp2":
            init_process_group(acc.device.type)
            shard(scorer)
        optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=cfg.lr,
                                      betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(plan.total_steps, cfg.warmup_ratio,
                                                                           cfg.min_lr_ratio))
        if cfg.sharding == "fsdp2":
            optimizer = acc.prepare(optimizer)
        else:
            if cfg.sharding == "zero3":  # DeepSpeed needs the real batch sizes (its world, not accelerate's count)
                ds = acc.state.deepspeed_plugin.deepspeed_config
                ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
                ds["train_batch_size"] = plan.global_batch
            scorer, optimizer = acc.prepare(scorer, optimizer)
        # clip what the optimizer steps: the prepared module's parameters (FSDP2 replaces the originals)
        return scorer, optimizer, scheduler, [p for p in scorer.parameters() if p.requires_grad]

    def _checkpoint(self, scorer, optimizer, scheduler, step: int, best) -> None:
        plan, acc = self.plan, self.acc
        self._check_finite_weights(scorer, step)
        save_checkpoint(acc, scorer, acc.unwrap_model(scorer).lm, plan.tokenizer, optimizer, scheduler, plan.run,
                        step, {"best_eval_loss": best, "epoch": step / plan.per_epoch, "config": plan.config_record})
        if acc.is_main_process:
            for gone in prune_checkpoints(plan.run, self.cfg.save_total_limit):
                self.say(f"removed {gone} (save_total_limit {self.cfg.save_total_limit})")

    def _check_finite_weights(self, scorer, step: int) -> None:
        """Stop before saving weights that are not finite (after `step` optimizer steps)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in scorer.parameters() if p.requires_grad]
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


def _env_rank() -> int:
    """This process's rank before any process group exists (0 without a launcher)."""
    import os

    return int(os.environ.get("RANK", "0"))


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so another run in the same process (demo, sweep,
    notebooks, tests) starts from its own settings (accumulation steps, precision)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(cfg: TrainConfig) -> TrainResult:
    """One run in this process, after any earlier one."""
    reset_accelerate_state()
    return Trainer(cfg).train()


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
