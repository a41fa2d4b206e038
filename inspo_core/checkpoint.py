"""Checkpoints: HF-loadable weights plus the trainer state for exact resume, written atomically.

`checkpoints/step-N/` holds the model (`save_pretrained`, safetensors; LoRA runs hold the adapter),
the tokenizer, `optimizer.pt`, `scheduler.pt` and `trainer_state.json`. A checkpoint is built in a
hidden temporary directory and renamed into place, so an interrupted save leaves the previous
checkpoint as the latest complete one. Sharded runs (FSDP2, ZeRO-3) add `accelerate_state/`
written by `Accelerator.save_state`, which every process takes part in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpts.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def save_model(accelerator, scorer, lm, tokenizer, path: Path, *, merge_lora: bool = False) -> None:
    """HF-loadable weights of `lm` (gathered across shards) into `path` (main process writes)."""
    state = accelerator.get_state_dict(scorer) if is_sharded(accelerator) else None
    if accelerator.is_main_process:
        model = lm
        if merge_lora and hasattr(lm, "merge_and_unload"):
            import copy

            model = copy.deepcopy(lm).merge_and_unload()
        if state is not None:  # keys of the TokenLogps wrapper: "lm.<name>"
            state = {k.removeprefix("lm."): v for k, v in state.items()}
            model.save_pretrained(path, state_dict=state, safe_serialization=True)
        else:
            model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)


def save_checkpoint(accelerator, scorer, lm, tokenizer, optimizer, scheduler, run_dir: Path,
                    step: int, trainer_state: dict[str, Any]) -> Path:
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    tmp = final.with_name(f".step-{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_model(accelerator, scorer, lm, tokenizer, tmp)
    if is_sharded(accelerator):
        accelerator.save_state(str(tmp / "accelerate_state"))
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = dict(trainer_state, step=step, torch_rng=torch.get_rng_state().tolist())
        (tmp / STATE_FILE).write_text(json.dumps(state))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(accelerator, ckpt: Path, optimizer, scheduler) -> dict[str, Any]:
    """Optimizer, scheduler and RNG from `ckpt` (weights are loaded when the model is built)."""
    if is_sharded(accelerator):
        accelerator.load_state(str(ckpt / "accelerate_state"))
    else:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = json.loads((ckpt / STATE_FILE).read_text())
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
