"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`): one code path for CPU (gloo)
and GPU (nccl).

accelerate's FSDP plugin does not initialise distributed training on CPU, so the workbench shards
the policy itself: every decoder layer is its own FSDP unit and the `TokenLogps` wrapper is the root
(embeddings, final norm and LM head). Parameters, gradients and optimizer state live as shards on
each rank; a layer is gathered for its forward and backward only.

Checkpoints are written with torch distributed checkpoint (DCP): every rank writes its own shards of
the model and optimizer state, nothing is gathered on one rank, and a resume reads them back into
the same layout. `final/` and `best/` are consolidated: the full state dict is gathered (to CPU,
rank 0) and saved as one HF checkpoint loadable with `AutoModelForCausalLM`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: those whose class is in the model's `_no_split_modules`
    (for a peft model, the underlying transformers model's)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules); FSDP2 needs one "
                         "to shard per layer")
    return layers


def init_process_group(device_type: str) -> None:
    """FSDP2 and DeepSpeed need a process group; a single process (no launcher) gets a group of one.
    `device_type`: "cuda" (nccl) or anything else (gloo)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch, deepspeed) started this process as one of a world."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


SHM_COMM_OP = "deepspeed_shm_comm"


def before_deepspeed(on_cpu: bool, say=print) -> None:
    """What ZeRO-3 needs before accelerate or DeepSpeed touch distributed state, called before the Accelerator.

    One process without a launcher gets a process group of one: DeepSpeed would otherwise look for an MPI
    world (and fail: no mpi4py). On CPU, DeepSpeed's communication backend JIT-compiles a C++ extension
    (`deepspeed_shm_comm`, shared-memory all-reduce) the first time it starts, minutes on a small machine;
    only its inference all-reduce (tensor-parallel inference) uses it, ZeRO-3's collectives go through
    torch.distributed (gloo) either way, so it is marked as not buildable and never built."""
    import torch.distributed as dist

    if on_cpu:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            # DeepSpeed asks this dict (probed once per process, kept in the module) before building the op
            deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
            say(f"DeepSpeed on CPU: its shared-memory communication extension ({SHM_COMM_OP}, a C++ JIT build of "
                "minutes the first time) is not built; ZeRO-3's collectives run over gloo")
    if not dist.is_initialized() and not launched():
        init_process_group("cuda" if torch.cuda.is_available() else "cpu")
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine asserts that a launcher set it


def shard(scorer: nn.Module, bf16: bool = False) -> nn.Module:
    """FSDP2 over `scorer` (a TokenLogps): per decoder layer, then the root. In place; returns it. `bf16`: FSDP2's
    mixed precision, weights gathered and computed in bf16, gradients reduced in fp32 into the fp32 shards the
    optimizer steps (the master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    for layer in decoder_layers(scorer.lm):
        fully_shard(layer, **kw)
    fully_shard(scorer, **kw)
    return scorer


def local_state_mb(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> float:
    """MB of this rank's parameters, gradients and optimizer state (local shards only; DeepSpeed's
    fp32 master partitions included): what sharding divides across ranks."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = 0
    for p in module.parameters():
        total += nbytes(p)
        if p.grad is not None:
            total += nbytes(p.grad)
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        # DeepSpeed ZeRO-3 keeps the fp32 master partitions inside its optimizer, not in the module
        total += sum(nbytes(t) for t in getattr(inner, "fp32_partitioned_groups_flat", None) or [])
        for state in inner.state.values():
            total += sum(nbytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total / 2**20


def full_state_dict(scorer: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state gathered to CPU on rank 0 ({} on the others). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(scorer: nn.Module, optimizer, path: Path) -> None:
    """Every rank writes its shards of model and optimizer state to `path` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(scorer), "optim": get_optimizer_state_dict(scorer, optimizer)},
             checkpoint_id=str(path))


def load_sharded(scorer: nn.Module, optimizer, path: Path) -> None:
    """Model and optimizer shards from `path` into the same sharded layout (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(scorer), "optim": get_optimizer_state_dict(scorer, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(scorer, state["model"])
    set_optimizer_state_dict(scorer, optimizer, state["optim"])
