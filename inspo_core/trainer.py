"""One explicit accelerate training loop for every objective x strategy (setup / train / save).

Batching is ours, not a DataLoader's: the global batch of step s is a slice of a seeded per-epoch
permutation, split into `grad_accum` micro-batches per process. That makes exact resume a matter
of restoring weights, optimizer and scheduler, and makes batch 8 x accumulation 1, batch 1 x
accumulation 8 and 2 processes x batch 4 all see the same global batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inspo_core.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, save_model
from inspo_core.conditioning import BuilderConfig, BuiltPair, ConditioningBuilder, collate_views
from inspo_core.config import TrainConfig
from inspo_core.data import load_rows, prepare_rows, split_rows
from inspo_core.logps import TokenLogps, sequence_logps
from inspo_core.models import build_tiny, load_model, load_tokenizer
from inspo_core.objectives import get_objective
from inspo_core.packing import pack_pairs, packed_view_logps, to_device
from inspo_core.refcache import RefCache, RefStats, compute_ref_logps, files_fingerprint, model_fingerprint
from inspo_core.runlog import MetricsLog, write_config
from inspo_core.strategies import View, get_strategy, reflection_gain, required_views, strategy_loss

PLAIN_VIEWS = [View("chosen"), View("rejected")]


class TrainingError(RuntimeError):
    pass


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
        self.acc = accelerator or Accelerator(
            # on CPU-only machines this makes torchrun-launched processes form a gloo group
            cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision="bf16" if cfg.bf16 else "no",
            log_with=cfg.report_to or None,
            project_dir=cfg.output_dir,
        )
        self.run_dir = Path(cfg.output_dir)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.log_lines: list[str] = []

    def say(self, msg: str) -> None:
        self.log_lines.append(msg)
        if self.acc.is_main_process:
            print(f"[inspo] {msg}", flush=True)

    # ---- setup ------------------------------------------------------------------------------------
    def setup_data(self) -> None:
        cfg = self.cfg
        rows = load_rows(cfg.data, cfg.data_split)
        self.train_rows, report = prepare_rows(rows, skip_bad_rows=cfg.skip_bad_rows, dedup=cfg.dedup,
                                               min_margin=cfg.min_margin)
        self.say(f"data {cfg.data}: {report.summary()}")
        if cfg.eval_data:
            val, vrep = prepare_rows(load_rows(cfg.eval_data, cfg.eval_split), skip_bad_rows=cfg.skip_bad_rows,
                                     dedup=cfg.dedup, min_margin=cfg.min_margin)
            self.say(f"eval data {cfg.eval_data}: {vrep.summary()}")
            self.val_rows = val
        elif cfg.val_size > 0:
            self.train_rows, self.val_rows = split_rows(self.train_rows, cfg.val_size, cfg.seed)
        else:
            self.val_rows = []

    def setup_model(self) -> None:
        cfg = self.cfg
        source = cfg.model
        if source == "tiny":
            texts = [t for r in self.train_rows + self.val_rows for t in _row_texts(r)]
            with self.acc.main_process_first():
                source = str(build_tiny(cfg.cache_dir, texts, vocab_size=cfg.tiny_vocab, hidden_size=cfg.tiny_hidden,
                                        num_layers=cfg.tiny_layers, max_positions=max(1024, cfg.max_length),
                                        seed=cfg.seed))
        self.model_source = source
        self.tokenizer = load_tokenizer(cfg.tokenizer or source, trust_remote_code=cfg.trust_remote_code,
                                        chat_template=cfg.chat_template)
        if cfg.max_response_tokens or cfg.min_response_tokens:
            count = lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
            self.train_rows, rep = prepare_rows(self.train_rows, dedup=False, token_count=count,
                                                max_response_tokens=cfg.max_response_tokens,
                                                min_response_tokens=cfg.min_response_tokens)
            self.say(f"length filter: {rep.summary()}")
        if cfg.max_rows:
            self.train_rows = self.train_rows[: cfg.max_rows]

    def load_policy(self, resume_from: Path | None):
        cfg = self.cfg
        dtype = torch.float32  # master weights in fp32; bf16 runs use autocast
        if cfg.lora:
            from peft import LoraConfig, PeftModel, get_peft_model

            base = load_model(self.model_source, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
            if resume_from is not None:
                return PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
            torch.manual_seed(cfg.seed)
            lcfg = LoraConfig(r=cfg.lora, lora_alpha=cfg.lora_alpha or 2 * cfg.lora, lora_dropout=0.0,
                              target_modules="all-linear", task_type="CAUSAL_LM")
            return get_peft_model(base, lcfg)
        return load_model(str(resume_from or self.model_source), dtype=dtype, trust_remote_code=cfg.trust_remote_code)

    def build_pairs(self) -> None:
        cfg = self.cfg
        self.objective = get_objective(cfg.objective)
        self.policy_views, self.ref_views = required_views(cfg.strategy, cfg.objective, cfg.ref_conditioning, cfg.w)
        conditioned = any(v.context for v in self.policy_views)
        # evaluation always scores the plain views too, for the reflection metrics
        self.eval_views = sorted(set(self.policy_views) | (set(PLAIN_VIEWS) if conditioned else set()))
        all_views = sorted(set(self.eval_views) | set(self.ref_views))
        bcfg = BuilderConfig(context_format=cfg.context_format, max_length=cfg.max_length,
                             alpha_draft=cfg.alpha_draft, sep_token=cfg.sep_token, exclude_eos=cfg.exclude_eos,
                             **({"template": cfg.template} if cfg.template else {}))
        builder = ConditioningBuilder(self.tokenizer, bcfg, all_views)
        self.train_pairs, rep = builder.build_all(self.train_rows, skip_bad=cfg.skip_bad_rows)
        self.say(f"builder (train): {rep.summary()}")
        self.val_pairs, vrep = builder.build_all(self.val_rows, skip_bad=cfg.skip_bad_rows)
        if self.val_pairs:
            self.say(f"builder (validation): {vrep.summary()}")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def reference_logps(self, policy) -> None:
        """Reference log-probs for train and validation pairs, from the cache when possible."""
        cfg = self.cfg
        self.ref_stats = RefStats(cache_hit=True)
        self.ref_train = self.ref_val = {}
        if not self.objective.needs_reference:
            return
        cache = RefCache(cfg.cache_dir)
        ref_model = None
        views = self.ref_views

        def get_ref():
            nonlocal ref_model
            if ref_model is None:
                if cfg.lora:  # the base model with adapters disabled: no second copy of the weights
                    ref_model = policy
                else:
                    ref_model = load_model(cfg.ref_model or self.model_source, dtype=torch.float32,
                                           trust_remote_code=cfg.trust_remote_code).to(self.acc.device)
            return ref_model

        ref_id = self._ref_identity(policy)
        results = []
        with self.acc.main_process_first():
            for pairs in (self.train_pairs, self.val_pairs):
                key = cache.key(ref_id, pairs, views, "bf16" if cfg.bf16 else "fp32")

                def compute(pairs=pairs):
                    model = get_ref()
                    ctx = model.disable_adapter() if cfg.lora else contextlib.nullcontext()
                    with ctx, self.acc.autocast():
                        return compute_ref_logps(model, pairs, views, batch_size=cfg.batch_size,
                                                 pad_id=self.pad_id, chunk_mb=cfg.logps_chunk_mb,
                                                 packing=cfg.packing)

                results.append(cache.get_or_compute(key, views, compute))
        (self.ref_train, s1), (self.ref_val, s2) = results
        self.ref_stats = RefStats(s1.forwards + s2.forwards, s1.cache_hit and s2.cache_hit, s1.path)
        self.say(f"reference log-probs: {'cache hit' if self.ref_stats.cache_hit else 'computed'} "
                 f"({self.ref_stats.forwards} reference forwards) {s1.path}")
        del ref_model

    def _ref_identity(self, policy) -> str:
        cfg = self.cfg
        if cfg.lora:
            with policy.disable_adapter():
                return "base:" + model_fingerprint(policy.get_base_model())
        src = cfg.ref_model or self.model_source
        if Path(src).is_dir():  # cheap: hash the files, no load
            return files_fingerprint(src)
        return src  # a hub name (its revision is not known before loading)

    # ---- batching -----------------------------------------------------------------------------------
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.acc.num_processes

    def schedule(self) -> tuple[int, int]:
        n, g = len(self.train_pairs), self.global_batch()
        if n < g:
            raise ValueError(
                f"the training set has {n} pairs, fewer than one global batch of {g} "
                f"(batch_size x grad_accum x processes); lower batch_size/grad_accum or add data"
            )
        per_epoch = n // g
        total = self.cfg.max_steps or max(1, int(self.cfg.epochs * per_epoch))
        return per_epoch, total

    def micro_batches(self, step: int, per_epoch: int) -> list[list[int]]:
        """Indices of this process's micro-batches for optimizer step `step`."""
        epoch, offset = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_pairs), generator=gen)
        g, bs, world, rank = self.global_batch(), self.cfg.batch_size, self.acc.num_processes, self.acc.process_index
        idx = perm[offset * g : (offset + 1) * g].tolist()
        return [idx[(m * world + rank) * bs : (m * world + rank + 1) * bs] for m in range(self.cfg.grad_accum)]

    # ---- loss ---------------------------------------------------------------------------------------
    def loss_terms(self, scorer, pairs: list[BuiltPair], idx: list[int], views, ref: dict) -> dict[str, Any]:
        cfg = self.cfg
        dev = self.acc.device
        if cfg.packing == "tree":
            batch = to_device(pack_pairs(pairs, views, pad_id=self.pad_id, row_tokens=cfg.pack_tokens), dev,
                              torch.bfloat16 if cfg.bf16 else torch.float32)
            with self.acc.autocast():
                logps = packed_view_logps(scorer, batch, views, len(pairs))
            if cfg.length_normalize:
                logps = {v: t / batch.lengths[v.target].to(dev) for v, t in logps.items()}
            tokens = batch.tokens
        else:
            batch = collate_views(pairs, views, self.pad_id)
            with self.acc.autocast():
                out = sequence_logps(scorer, batch.input_ids.to(dev), batch.attention_mask.to(dev),
                                     batch.target_mask.to(dev))
            logps = batch.split(out.mean if cfg.length_normalize else out.sum)
            tokens = int(batch.attention_mask.sum())
        ref_logps = None
        if self.objective.needs_reference:
            ref_logps = {v: t[idx].to(dev) for v, t in ref.items()}
            if cfg.length_normalize:
                ref_logps = {v: t / batch.lengths[v.target].to(dev) for v, t in ref_logps.items()}
        lengths = {k: t.to(dev) for k, t in batch.lengths.items()}
        res = strategy_loss(cfg.objective, cfg.strategy, policy_logps=logps, ref_logps=ref_logps, lengths=lengths,
                            ref_conditioning=cfg.ref_conditioning, w=cfg.w, **cfg.objective_hparams())
        _, main_c, main_r = get_strategy(cfg.strategy).terms(cfg.w)[-1]
        stats = {
            "loss": res.losses.detach(),
            "rewards/chosen": res.chosen_rewards,
            "rewards/rejected": res.rejected_rewards,
            "rewards/margins": res.chosen_rewards - res.rejected_rewards,
            "rewards/accuracies": (res.chosen_rewards > res.rejected_rewards).float(),
            "logps/chosen": logps[main_c].detach(),
            "logps/rejected": logps[main_r].detach(),
        }
        if main_c.context and View("chosen") in logps and View("rejected") in logps:
            stats["logps/chosen_plain"] = logps[View("chosen")].detach()
            stats["logps/rejected_plain"] = logps[View("rejected")].detach()
        gain = reflection_gain({k: v.detach() for k, v in logps.items()})
        if gain is not None:
            stats["reflection/gain"] = gain
        return {"loss": res.losses.mean(), "stats": stats, "tokens": tokens}

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
        if not self.val_pairs:
            return {}
        model = self.acc.unwrap_model(scorer)
        was = model.training
        model.eval()
        mine = list(range(self.acc.process_index, len(self.val_pairs), self.acc.num_processes))
        bs = self.cfg.batch_size
        # more processes than pairs: an idle process scores pair 0 with count 0, so the reduction has its shape
        batches = [mine[s : s + bs] for s in range(0, len(mine), bs)] or [[0]]
        parts = [self.loss_terms(model, [self.val_pairs[i] for i in idx], idx, self.eval_views, self.ref_val)["stats"]
                 for idx in batches]
        model.train(was)
        return {f"eval/{k}": v for k, v in self.reduce_stats(parts, None if mine else 0).items()}

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        torch.manual_seed(cfg.seed)
        resume_from = latest_checkpoint(self.run_dir) if cfg.resume else None
        if cfg.resume and resume_from is None:
            self.say(f"resume: no complete checkpoint in {self.run_dir}/checkpoints, starting fresh")
        if not cfg.resume and latest_checkpoint(self.run_dir) is not None:
            if not cfg.overwrite:
                raise ValueError(f"{self.run_dir} holds checkpoints of an earlier run; pass --resume to continue it, "
                                 "--overwrite to start afresh there (deletes them), or choose another output_dir")
            if self.acc.is_main_process:
                shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        self.setup_data()
        self.setup_model()
        self.build_pairs()
        per_epoch, total = self.schedule()
        policy = self.load_policy(resume_from)
        if cfg.gradient_checkpointing:
            enable = getattr(policy, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.to(acc.device)
        self.reference_logps(policy)

        scorer = TokenLogps(policy, chunk_mb=cfg.logps_chunk_mb)
        params = [p for p in scorer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, cfg.warmup_ratio, cfg.min_lr_ratio))
        scorer, optimizer = acc.prepare(scorer, optimizer)

        start, best = 0, None
        if resume_from is not None:
            state = load_trainer_state(acc, resume_from, optimizer, scheduler)
            start, best = state["step"], state.get("best_eval_loss")
            if acc.is_main_process:
                self.metrics.truncate_after(start)
            self.say(f"resumed from {resume_from} at step {start}")
        elif acc.is_main_process:  # a fresh run does not append to an older run's metrics
            self.metrics.path.unlink(missing_ok=True)
        if acc.is_main_process:
            write_config(self.run_dir, dataclasses.asdict(cfg) | {"resolved_model": self.model_source})
        if cfg.report_to:
            acc.init_trackers("inspo", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                               if isinstance(v, (int, float, str, bool))})
        self.say(f"{cfg.objective} x {cfg.strategy}: {len(self.train_pairs)} train / {len(self.val_pairs)} "
                 f"validation pairs, {total} steps of {self.global_batch()} pairs, {acc.num_processes} process(es)")

        progress = _progress(total, start, acc.is_main_process)
        last_loss = float("nan")
        scorer.train()
        for step in range(start, total):
            t0 = time.perf_counter()
            parts, tokens, grad_norm = [], 0, None
            for idx in self.micro_batches(step, per_epoch):
                with acc.accumulate(scorer):
                    terms = self.loss_terms(scorer, [self.train_pairs[i] for i in idx], idx, self.policy_views,
                                            self.ref_train)
                    if not torch.isfinite(terms["loss"]):
                        self._fail_nonfinite(step)
                    acc.backward(terms["loss"])
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                parts.append(terms["stats"])
                tokens += terms["tokens"]
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            row = self.reduce_stats(parts)
            last_loss = row["loss"]
            if not math.isfinite(last_loss):
                self._fail_nonfinite(step)
            dt = time.perf_counter() - t0
            tokens = int(acc.reduce(torch.tensor(float(tokens), device=acc.device), "sum").item())
            row = {"step": step + 1, "epoch": (step + 1) / per_epoch, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None, **row,
                   "tokens_per_s": tokens / dt, "pairs_per_s": self.global_batch() / dt,
                   "peak_mem_mb": peak_mem_mb(acc.device)}
            progress.update(row)
            done = step + 1
            if acc.is_main_process and (done % cfg.log_every == 0 or done == total):
                self.metrics.write(row)
                if cfg.report_to:
                    acc.log({k: v for k, v in row.items() if v is not None}, step=done)
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == total:
                ev = self.evaluate(scorer)
                if ev:
                    ev = {"step": done, "epoch": done / per_epoch, **ev}
                    if acc.is_main_process:
                        self.metrics.write(ev)
                    if best is None or ev["eval/loss"] < best:
                        best = ev["eval/loss"]
                        save_model(acc, scorer, acc.unwrap_model(scorer).lm, self.tokenizer, self.run_dir / "best",
                                   merge_lora=True)
            if cfg.save_every and done % cfg.save_every == 0 and done < total:
                save_checkpoint(acc, scorer, acc.unwrap_model(scorer).lm, self.tokenizer, optimizer, scheduler,
                                self.run_dir, done, {"best_eval_loss": best, "epoch": done / per_epoch})
        progress.close()
        lm = acc.unwrap_model(scorer).lm
        save_model(acc, scorer, lm, self.tokenizer, self.run_dir / "final", merge_lora=True)
        if cfg.save_every:
            save_checkpoint(acc, scorer, lm, self.tokenizer, optimizer, scheduler, self.run_dir, total,
                            {"best_eval_loss": best, "epoch": total / per_epoch})
        if cfg.report_to:
            acc.end_training()
        self.say(f"done: {total} steps, final loss {last_loss:.4f}; model in {self.run_dir / 'final'}")
        return TrainResult(self.run_dir, total, last_loss, self.ref_stats, best)

    def _fail_nonfinite(self, step: int):
        last = latest_checkpoint(self.run_dir)
        raise TrainingError(
            f"non-finite loss at step {step + 1}; stopped without saving. Last good checkpoint: "
            f"{last or 'none'}. Lower lr, check the data, or disable bf16."
        )


def train(cfg: TrainConfig) -> TrainResult:
    return Trainer(cfg).train()


# ---- small helpers ----------------------------------------------------------------------------------

def _row_texts(row: dict) -> list[str]:
    p = row["prompt"]
    prompt = p if isinstance(p, str) else " ".join(m["content"] for m in p)
    return [prompt, row["chosen"], row["rejected"]]


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
