"""Training engines: how the policy is held across processes, one registry entry per choice.

`ENGINES` is the single list of names (`TrainConfig.sharding`'s choices, help and errors read it):

- `none`: every process holds the whole model; one process, or DDP when launched on several.
- `fsdp2`: torch FSDP2 (`fully_shard`) per decoder layer, the same code on CPU (gloo) and GPU (nccl).
- `zero3`: DeepSpeed ZeRO-3 through accelerate (its CPU accelerator on CPU).

Each engine owns everything that differs between them: the Accelerator it needs, the context the
model loads in, how the scorer and optimizer are wrapped, gradient clipping (returning the norm),
this rank's share of the weights, the gathered state behind `final/` and `best/`, and the trainer
state a checkpoint holds. It is chosen once (`inspo_core.launch.resolve_launch`: the launcher's
accelerate config, or `--sharding`), carried in the plan, and the training loop calls it without
asking which one it is.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from inspo_core.names import ENGINE_SUMMARIES


class Engine:
    """`none`: the whole model in every process; accelerate wraps it (DDP across processes)."""

    name = "none"
    summary = ENGINE_SUMMARIES["none"]
    # a checkpoint's weights are a plain HF model: a resume builds the policy from the checkpoint directory
    checkpoint_holds_model = True
    # the model is built on the meta device, sharded, and each rank reads its shards from the files
    # (inspo_core.shard_io); the reference pass then runs on the sharded policy
    loads_into_shards = False

    def __repr__(self) -> str:
        return f"<engine {self.name}>"

    # ---- setup ----------------------------------------------------------------------------------
    def _accelerator_kwargs(self, cfg, on_cpu: bool, say) -> dict:
        return {"cpu": on_cpu}  # on CPU-only machines this makes launched processes form a gloo group

    def accelerator(self, cfg, on_cpu: bool, say=print):
        """The Accelerator for this engine (precision from the resolved `cfg.bf16`)."""
        from accelerate import Accelerator

        return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if cfg.bf16 else "no",
                           log_with=cfg.report_to or None, project_dir=cfg.output_dir,
                           **self._accelerator_kwargs(cfg, on_cpu, say))

    def load_context(self, acc):
        """The context models are loaded in (the policy and a separate reference)."""
        return contextlib.nullcontext()

    def reference_autocast(self, acc, bf16: bool):
        """The precision context of the reference pass (whole fp32 weights, before the engine wraps them), so its
        log-probs are computed as the policy's are and the cache's bf16/fp32 key means one thing."""
        return acc.autocast()

    def shard(self, acc, scorer):
        """The scorer before its optimizer is built (FSDP2 replaces the parameters here)."""
        return scorer

    def prepare(self, acc, scorer, optimizer, plan):
        """(scorer, optimizer) ready to train."""
        return acc.prepare(scorer, optimizer)

    def after_forward(self, scorer) -> None:
        """After forwards without a backward (the reference or validation pass): the scorer as training expects it."""

    # ---- loading into shards (engines with `loads_into_shards`) -----------------------------------------
    def cannot_load_into_shards(self, cfg, source: str) -> str:
        """Why this source cannot be loaded straight into this engine's shards ('' when it can)."""
        return f"engine {self.name} loads whole weights"

    def sharded_policy(self, cfg, source: str):
        """The policy whose parameters are this rank's shards (or placeholders `fill_shards` fills)."""
        raise NotImplementedError(self.name)

    def fill_shards(self, acc, scorer, source: str, say) -> None:
        """After `shard`: this rank's shards hold the source's weights."""

    # ---- the step -------------------------------------------------------------------------------
    def clip_grad_norm(self, acc, scorer, max_norm: float):
        """Clip the gradients of what the optimizer steps; the total norm before clipping, or None when the
        engine clips inside its optimizer step (read it with `step_grad_norm`)."""
        return acc.clip_grad_norm_([p for p in scorer.parameters() if p.requires_grad], max_norm)

    def step_grad_norm(self, scorer, clipped):
        """The gradient norm of the optimizer step just taken (`clipped`: what `clip_grad_norm` returned)."""
        return clipped

    def local_tensors(self, scorer) -> list[torch.Tensor]:
        """This rank's share of the trained weights."""
        return [p for p in scorer.parameters() if p.requires_grad]

    # ---- saving ---------------------------------------------------------------------------------
    def gathered_state(self, acc, scorer) -> dict[str, torch.Tensor] | None:
        """The whole model's state for `final/` and `best/` (every rank calls it; {} on ranks that do not
        write), or None when the module on the main process already holds the whole model."""
        return None

    def streams_final(self, lm, merge_lora: bool) -> bool:
        """Whether `final/` and `best/` are written by `write_streamed` (every rank, one tensor at a time)
        instead of `gathered_state` + `write_model`."""
        return False

    def write_streamed(self, scorer, lm, tokenizer, path: Path | None, is_main: bool) -> None:
        """`final/` or `best/`: every rank gathers one tensor at a time, the main process appends it to `path`."""
        from inspo_core.shard_io import write_streamed

        self.after_forward(scorer)
        write_streamed(lm, path, is_main)
        if is_main:
            tokenizer.save_pretrained(path)

    def write_model(self, lm, tokenizer, path: Path, state, *, merge_lora: bool) -> None:
        """`final/` or `best/` into the (temporary) directory `path` on the main process, from `gathered_state`."""
        from inspo_core.checkpoint import write_model

        write_model(lm, tokenizer, path, state, merge_lora=merge_lora)

    def save_state(self, acc, scorer, lm, tokenizer, optimizer, path: Path) -> None:
        """Weights and optimizer state of a checkpoint into the (temporary) directory `path`; every rank calls it."""
        from inspo_core.checkpoint import write_model

        if acc.is_main_process:
            write_model(lm, tokenizer, path, None, merge_lora=False)
            torch.save(optimizer.state_dict(), path / "optimizer.pt")

    def load_state(self, acc, scorer, optimizer, ckpt: Path) -> None:
        """What `save_state` wrote, back into the prepared scorer and optimizer (weights are already in the
        model when `checkpoint_holds_model`)."""
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))


class FSDP2(Engine):
    """Our FSDP2 (`inspo_core.sharding`); accelerate only steps the optimizer. An accelerate FSDP launcher
    config is read by the workbench, not by accelerate: its FSDP plugin does not initialise distributed
    training on CPU, and the same code then runs on CPU and GPU."""

    name = "fsdp2"
    summary = ENGINE_SUMMARIES["fsdp2"]
    checkpoint_holds_model = False  # DCP shards: the policy is built from the source, the shards read into it
    loads_into_shards = True

    def accelerator(self, cfg, on_cpu: bool, say=print):
        with _env_unset("ACCELERATE_USE_FSDP"):  # the workbench shards; accelerate must not add its FSDP plugin
            return super().accelerator(cfg, on_cpu, say)

    def shard(self, acc, scorer):
        from inspo_core.sharding import init_process_group, shard

        init_process_group(acc.device.type)
        return shard(scorer, bf16=acc.mixed_precision == "bf16")  # FSDP2's policy: bf16 compute, fp32 reduce

    def prepare(self, acc, scorer, optimizer, plan):
        return scorer, acc.prepare(optimizer)

    def clip_grad_norm(self, acc, scorer, max_norm: float):
        norm = super().clip_grad_norm(acc, scorer, max_norm)
        return norm.full_tensor()  # a DTensor over the shards

    def after_forward(self, scorer) -> None:
        """A forward without a backward (reference, validation) leaves the root's parameters unsharded (plain
        tensors until the next backward): shard them again, so each rank holds and reads its own shards and an
        optimizer built now steps the sharded parameters."""
        from torch.distributed.fsdp import FSDPModule

        for m in scorer.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def local_tensors(self, scorer) -> list[torch.Tensor]:
        self.after_forward(scorer)
        return [p.to_local() for p in scorer.parameters() if p.requires_grad]

    def streams_final(self, lm, merge_lora: bool) -> bool:
        return not hasattr(lm, "peft_config")  # LoRA: the adapter (small) or its merge, from the gathered state

    def cannot_load_into_shards(self, cfg, source: str) -> str:
        from inspo_core.shard_io import checkpoint_files, empty_model, streamable

        self._checked = None
        if not checkpoint_files(source):
            return f"{source} is not a directory of safetensors files"
        lm = empty_model(source, trust_remote_code=cfg.trust_remote_code)
        why = streamable(source, lm)
        if not why:  # the model just checked is the one `sharded_policy` hands out (built once, not twice)
            self._checked = ((str(source), bool(cfg.trust_remote_code)), lm)
        return why

    def sharded_policy(self, cfg, source: str):
        from inspo_core.shard_io import empty_model

        checked, self._checked = getattr(self, "_checked", None), None  # handed out once: the next run builds its own
        if checked is not None and checked[0] == (str(source), bool(cfg.trust_remote_code)):
            return checked[1]
        return empty_model(source, trust_remote_code=cfg.trust_remote_code)  # the meta device, filled once sharded

    def fill_shards(self, acc, scorer, source: str, say) -> None:
        from inspo_core.shard_io import fill_shards, materialize

        materialize(scorer, acc.device)
        read = fill_shards(scorer.lm, source)
        say(f"engine {self.name}: weights loaded into the shards ({read / 2**20:.0f} MB read by this rank)")

    def gathered_state(self, acc, scorer):
        from inspo_core.sharding import full_state_dict

        return full_state_dict(scorer)

    def write_model(self, lm, tokenizer, path: Path, state, *, merge_lora: bool) -> None:
        from inspo_core.checkpoint import save_gathered, write_model

        if hasattr(lm, "peft_config") and not merge_lora:  # the adapter alone, from the gathered state
            write_model(lm, tokenizer, path, state, merge_lora=False)
        else:
            save_gathered(lm, tokenizer, path, state)  # one plain checkpoint; LoRA folded into the weights

    def save_state(self, acc, scorer, lm, tokenizer, optimizer, path: Path) -> None:
        from inspo_core.sharding import save_sharded

        save_sharded(scorer, optimizer, path / "dcp")  # every rank its own shards, nothing gathered
        if acc.is_main_process:
            tokenizer.save_pretrained(path)

    def load_state(self, acc, scorer, optimizer, ckpt: Path) -> None:
        from inspo_core.sharding import load_sharded

        load_sharded(scorer, optimizer, ckpt / "dcp")


def zero3_buffers(model) -> dict[str, int]:
    """ZeRO-3's buffer and residency settings sized to `model`, so that what a rank holds falls with the number of
    ranks. DeepSpeed's defaults are sized for billions of parameters: a 5e8-element gradient-reduction bucket
    (2 GB in fp32), parameters under 1e5 elements kept whole on every rank, and up to 1e9 live parameters with
    a reuse distance of 1e9 (DeepSpeed does not release a parameter it will reuse within that many), which
    allows a model below a billion parameters to stay gathered between its forward and its backward. Here: the
    buckets as accelerate's "auto" sizes them (hidden^2; prefetch 0.9 hidden^2; parameters below 10 hidden stay
    whole), and at most two decoder layers' parameters live at once. Measured together (docs/cluster.md), not
    one by one."""
    hidden = int(getattr(model, "lm", model).config.hidden_size)  # a TokenLogps scorer holds its model as .lm
    full = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731  (a partitioned parameter's whole size)
    layers = [m for m in model.modules() if m.__class__.__name__.endswith("DecoderLayer")]
    layer = max((sum(full(p) for p in m.parameters()) for m in layers), default=hidden * hidden)
    return {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden, "stage3_max_live_parameters": 2 * layer,
            "stage3_max_reuse_distance": 2 * layer}


class Zero3(Engine):
    """DeepSpeed ZeRO-3 through accelerate. On CPU accelerate reports one process on every rank while
    DeepSpeed's world holds them all (FACTS): batch sizes are set from the real world size."""

    name = "zero3"
    summary = ENGINE_SUMMARIES["zero3"]
    checkpoint_holds_model = False  # DeepSpeed's partitions
    # transformers partitions the weights as it builds the model (deepspeed.zero.Init under the DeepSpeed config
    # accelerate registers) and copies the checkpoint into one gathered module at a time, from rank 0's read
    loads_into_shards = True

    def _accelerator_kwargs(self, cfg, on_cpu: bool, say) -> dict:
        from accelerate.utils import DeepSpeedPlugin

        from inspo_core.sharding import before_deepspeed

        before_deepspeed(on_cpu, say)
        # gradient_clipping 0 (not None: None would take the launcher's) is DeepSpeed's "off"; zero3_init_flag off:
        # accelerate's own zero.Init around the whole script is not needed (transformers partitions at load)
        return {"deepspeed_plugin": DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=cfg.grad_accum,
                                                    gradient_clipping=float(cfg.max_grad_norm), zero3_init_flag=False,
                                                    zero3_save_16bit_model=True)}

    def cannot_load_into_shards(self, cfg, source: str) -> str:
        return ""  # transformers' own ZeRO-3 load: hub names and converted checkpoints included

    def sharded_policy(self, cfg, source: str):
        from inspo_core.models import load_model

        return load_model(source, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)

    def fill_shards(self, acc, scorer, source: str, say) -> None:
        params = list(scorer.parameters())
        if not all(hasattr(p, "ds_id") for p in params):  # transformers did not see the DeepSpeed config
            raise RuntimeError("engine zero3: the model was loaded whole, not partitioned (transformers' ZeRO-3 load "
                               "needs accelerate's DeepSpeed config registered before the model is built)")
        mine = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
        say(f"engine {self.name}: weights partitioned as the model was built ({mine / 2**20:.0f} MB on this rank)")

    def streams_final(self, lm, merge_lora: bool) -> bool:
        return not hasattr(lm, "peft_config")  # LoRA: the adapter (small) or its merge, from the gathered state

    @contextlib.contextmanager
    def load_context(self, acc):
        """Models load with whole weights (LoRA, a separate ref_model): accelerate registers its DeepSpeed config
        with transformers, which then partitions weights at load time whatever zero3_init_flag says."""
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            acc.state.deepspeed_plugin.set_deepspeed_weakref()

    def reference_autocast(self, acc, bf16: bool):
        # under DeepSpeed accelerate's autocast is off (DeepSpeed's bf16 mode casts the weights instead), so the
        # reference pass over whole fp32 weights autocasts itself, as the other engines' bf16 passes do
        return torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=bf16)

    def prepare(self, acc, scorer, optimizer, plan):
        ds = acc.state.deepspeed_plugin.deepspeed_config  # DeepSpeed needs the real batch sizes (its world)
        ds["train_micro_batch_size_per_gpu"] = plan.cfg.batch_size
        ds["train_batch_size"] = plan.global_batch
        zero = ds.setdefault("zero_optimization", {})
        for key, value in zero3_buffers(scorer).items():
            zero.setdefault(key, value)  # a value the DeepSpeed config sets itself is kept
        return acc.prepare(scorer, optimizer)

    def after_forward(self, scorer) -> None:
        """Release every parameter a forward left gathered or in flight (DeepSpeed prefetches the next step's first
        parameters, the embedding among them): a gather outside a forward, such as saving `final/` one tensor at
        a time, cannot re-partition a parameter in flight."""
        if hasattr(scorer, "empty_partition_cache"):  # the DeepSpeedEngine accelerate's prepare returned
            scorer.empty_partition_cache()

    def clip_grad_norm(self, acc, scorer, max_norm: float):
        return None  # DeepSpeed clips inside its step

    def step_grad_norm(self, scorer, clipped):
        return scorer.get_global_grad_norm()

    def local_tensors(self, scorer) -> list[torch.Tensor]:
        return [p.ds_tensor for p in scorer.parameters() if p.requires_grad]  # this rank's partition

    def gathered_state(self, acc, scorer):
        return acc.get_state_dict(scorer)

    def save_state(self, acc, scorer, lm, tokenizer, optimizer, path: Path) -> None:
        acc.save_state(str(path / "accelerate_state"))  # DeepSpeed's checkpoint: each rank its partitions
        if acc.is_main_process:
            tokenizer.save_pretrained(path)

    def load_state(self, acc, scorer, optimizer, ckpt: Path) -> None:
        acc.load_state(str(ckpt / "accelerate_state"))


ENGINES: dict[str, Engine] = {e.name: e for e in (Engine(), FSDP2(), Zero3())}
assert list(ENGINES) == list(ENGINE_SUMMARIES), "inspo_core.names.ENGINE_SUMMARIES names every engine, in order"


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown sharding {name!r}; valid: {', '.join(ENGINES)}")
    return ENGINES[name]


@contextlib.contextmanager
def _env_unset(name: str):
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old
