"""A sharded model in and out of safetensors without a whole copy in any process (FSDP2; ZeRO-3 saves).

- `empty_model(source)`: the model's modules with every parameter on the meta device (buffers are real:
  rotary tables are computed from the config, not read from the checkpoint).
- `streamable(source, lm)`: whether the checkpoint's safetensors hold exactly the model's tensors under the
  same names (a checkpoint that transformers converts while loading does not).
- `materialize(module, device)`: after `fully_shard`, the (sharded) parameters get storage; buffers keep values.
- `fill_shards(lm, source)`: each rank reads from the files only the slice of every tensor its shard holds
  (`safe_open(...).get_slice`), so no rank ever holds a whole tensor of the checkpoint, let alone the model.
- `write_streamed(lm, path, is_main)`: `model.safetensors` written tensor by tensor (FSDP2 DTensors and
  DeepSpeed ZeRO-3 parameters alike). Every rank takes part in each tensor's gather and the main process
  appends its bytes to the file; safetensors' own writer
  (`save_file`) takes the whole state dict at once, which is the copy this module exists to avoid. The
  file is the format's documented layout (an 8-byte little-endian header length, a JSON header of dtype,
  shape and byte offsets, the bytes), read back by `safe_open` and `from_pretrained` in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from torch import nn

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def checkpoint_files(source: str | Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} of a model directory ({} when it has no safetensors)."""
    root = Path(source)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = root / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def empty_model(source: str | Path, *, trust_remote_code: bool = False, attn_implementation: str | None = "sdpa"):
    """The causal LM of `source`'s config, parameters on the meta device, fp32 (the master weights' dtype)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code, **kw)
    lm.tie_weights()  # accelerate's meta hook replaces each parameter as it is registered, which unties them
    return lm


def unique_tensors(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The state a checkpoint stores: parameters and persistent buffers, a tied tensor under its first name
    only (transformers' own files leave `lm_head.weight` out when it is the input embedding)."""
    seen: set[int] = set()
    out = {}
    for name, t in lm.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def streamable(source: str | Path, lm: nn.Module) -> str:
    """'' when `fill_shards` can fill `lm` from `source`, else why not (for the log)."""
    files = checkpoint_files(source)
    if not files:
        return f"{source} holds no safetensors files"
    want = set(unique_tensors(lm))
    missing, extra = sorted(want - set(files)), sorted(set(files) - want)
    if missing or extra:
        return (f"{source}'s tensor names differ from the model's (missing {missing[:2]}, extra {extra[:2]}: a "
                "checkpoint transformers converts while loading)")
    return ""


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Storage for the meta parameters of `module` (after `fully_shard`: this rank's shards only), buffers
    kept: `to_empty` would leave the rotary tables uninitialised."""
    buffers = {name: b for name, b in module.named_buffers()}
    shared: dict[int, list[str]] = {}  # tied parameters: one object under several names
    for name, p in module.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    module.to_empty(device=device)
    for name, b in buffers.items():
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._buffers[leaf] = b.to(device)
    for first, *others in (names for names in shared.values() if len(names) > 1):
        keep = module.get_parameter(first)
        for name in others:  # `to_empty` gives each name its own storage, untying them
            if module.get_parameter(name) is not keep:
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner)._parameters[leaf] = keep


def _local(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor, its index into the whole tensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return t, tuple(slice(0, s) for s in t.shape)


@torch.no_grad()
def fill_shards(lm: nn.Module, source: str | Path) -> int:
    """Every tensor of `lm` (sharded or not) from `source`'s safetensors, each rank reading only its slices.
    Returns the bytes this rank read."""
    from safetensors import safe_open

    files = checkpoint_files(source)
    targets = unique_tensors(lm)
    read = 0
    for name, file in files.items():
        local, index = _local(targets[name])
        if local.numel() == 0:
            continue
        # the file is mapped for one tensor at a time: pages read stay in the process's resident set while it is
        # mapped, and one mapping for the whole loop would add the rank's whole share of the file to its peak
        with safe_open(str(file), framework="pt") as f:
            piece = f.get_slice(name)[index if len(index) != 1 else index[0]] if index else f.get_tensor(name)
            local.copy_(piece.reshape(local.shape))
        read += piece.numel() * piece.element_size()
        del piece
    return read


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape (a DeepSpeed ZeRO-3 parameter is an empty placeholder holding it in ds_shape)."""
    return tuple(t.ds_shape) if hasattr(t, "ds_shape") else tuple(t.shape)


@torch.no_grad()
def _whole(t: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """The whole of `t` (an FSDP2 DTensor all-gathered, a ZeRO-3 parameter gathered; every rank must call it);
    None when not `keep` and the whole exists only inside the gather."""
    from torch.distributed.tensor import DTensor

    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.data.detach().clone() if keep else None
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def write_streamed(lm: nn.Module, path: Path, is_main: bool) -> None:
    """`lm`'s weights as `path/model.safetensors`, one tensor gathered at a time (every rank calls it, the main
    process writes), and its config and generation config beside them."""
    tensors = unique_tensors(lm)
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        shape = _shape(t)
        size = math.prod(shape) * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the byte buffer starts 8-aligned, as safetensors' writer does
    out = open(path / "model.safetensors", "wb") if is_main else None
    try:
        if out is not None:
            out.write(struct.pack("<Q", len(blob)) + blob)
        for name, t in tensors.items():
            whole = _whole(t, keep=out is not None)  # a collective on sharded tensors: every rank, same order
            if out is not None:
                out.write(whole.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            del whole
    finally:
        if out is not None:
            out.close()
    if is_main:
        lm.config.save_pretrained(path)
        if getattr(lm, "generation_config", None) is not None and lm.can_generate():
            lm.generation_config.save_pretrained(path)
