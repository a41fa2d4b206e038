"""Checkpoints: HF-loadable weights plus the trainer state for exact resume, written atomically.

`checkpoints/step-N/` holds the model (`save_pretrained`, safetensors; LoRA runs hold the adapter),
the tokenizer, `optimizer.pt`, `scheduler.pt`, `trainer_state.json` (step, RNG, the run's resolved
config) and, written last, `manifest.json` (every file, every rank's shards included, with its size
and sha256). Sharded runs hold their engine's
checkpoint instead of the model and optimizer files, each rank writing its own shards, nothing
gathered: FSDP2 `dcp/` (torch distributed checkpoint; `torch.distributed.checkpoint.format_utils.
dcp_to_torch_save` makes one file of it), ZeRO-3 `accelerate_state/` (DeepSpeed's; its
`zero_to_fp32.py` consolidates it). A checkpoint is built in a
hidden temporary directory and renamed into place, so an interrupted save leaves the previous
checkpoint as the latest complete one; `verify_checkpoint` checks a checkpoint against its manifest
so a damaged one (truncated weights, bytes changed at the same size, a missing optimizer state, an
empty trainer state, a damaged DCP shard) is skipped with a reason instead of crashing a resume or
being resumed from silently.

`final/` and `best/` are written the same way (temporary directory, then rename); a failure raises.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from inspo_core.fingerprint import file_sha256  # the one streaming file hash (no memo here: read in full)
from typing import Any

import torch

from inspo_core.atomic import atomic_path
from inspo_core.rundir import RunDir

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
DIVERGED = "diverged.txt"  # written into checkpoints whose weights led to a non-finite loss


class CheckpointError(RuntimeError):
    pass


# ---- verification ----------------------------------------------------------------------------------

MANIFEST_FORMAT = 2  # {"format": 2, "files": {name: {"bytes": n, "sha256": hex}}}; format 1 was {name: n}


def _files(path: Path) -> dict[str, Path]:
    return {str(p.relative_to(path)): p for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, DIVERGED)}


def _manifest(path: Path) -> dict[str, Any]:
    """Every file under `path` (every rank's shards included), its size and sha256."""
    return {"format": MANIFEST_FORMAT,
            "files": {k: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for k, p in _files(path).items()}}


def _read_manifest(path: Path) -> tuple[dict[str, dict], bool] | str:
    """({name: {"bytes", ["sha256"]}}, whether it has content hashes), or why it cannot be read."""
    man = path / MANIFEST
    if not man.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        doc = json.loads(man.read_text())
        if isinstance(doc.get("files"), dict):
            files = {k: dict(v) for k, v in doc["files"].items()}
            assert all(isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) for v in files.values())
            return files, True
        assert all(isinstance(v, int) for v in doc.values())  # format 1: sizes only
        return {k: {"bytes": v} for k, v in doc.items()}, False
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError, AssertionError):
        return "manifest.json is unreadable"


def verify_checkpoint(path: Path, *, content: bool = True) -> str | None:
    """None when the checkpoint at `path` is intact, else why it is not. Every file the manifest
    names must be there with its size and (with `content`, when the manifest has hashes) its sha256:
    weights zeroed or a DCP shard overwritten at the same size are caught here, before loading."""
    if (path / DIVERGED).is_file():
        return f"the run diverged from it ({(path / DIVERGED).read_text().strip()})"
    got = _read_manifest(path)
    if isinstance(got, str):
        return got
    want, _ = got
    have = _files(path)
    for name, entry in want.items():
        if name not in have:
            return f"{name} is missing"
        size = have[name].stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, {entry['bytes']} were written"
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is empty or unreadable"
    weights = [p for p in ("model.safetensors", "adapter_model.safetensors", "dcp/.metadata", "accelerate_state/latest")
               if (path / p).is_file()]
    weights += [p.name for p in path.glob("model-*.safetensors")]
    if not weights:
        return "no model weights"
    if content:
        for name, entry in want.items():
            if "sha256" in entry and file_sha256(have[name]) != entry["sha256"]:
                return f"{name} does not hold what was written (sha256 differs from the manifest's; same size)"
    return None


def intact_checkpoints(run: RunDir, say=print) -> list[tuple[int, Path]]:
    """(step, path) of the intact checkpoints, oldest first; damaged ones are named with the reason.

    Every checkpoint is checked for its files and sizes; contents (sha256 against the manifest) are
    read newest first until one passes - the one a resume takes - so older ones, which are only
    used once every newer one failed, are not read in full. A manifest from before content hashes
    (format 1, sizes only) is accepted, and said once."""
    out, content, unhashed = [], True, []
    for step, path in reversed(run.checkpoints()):
        why = verify_checkpoint(path, content=content)
        if why is None:
            out.append((step, path))
            content = False
            got = _read_manifest(path)
            if not got[1]:
                unhashed.append(path.name)
        else:
            say(f"skipping damaged checkpoint {path}: {why}")
    if unhashed:
        say(f"checkpoints {', '.join(reversed(unhashed))} have a manifest without content hashes (written before "
            "they were recorded): checked by file size only")
    return out[::-1]


def latest_checkpoint(run_dir: str | Path, say=print) -> Path | None:
    found = intact_checkpoints(RunDir(run_dir), say)
    return found[-1][1] if found else None


def mark_diverged(path: Path, why: str) -> None:
    (path / DIVERGED).write_text(why + "\n")


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def prune_checkpoints(run: RunDir, keep: int) -> list[Path]:
    """Remove the oldest checkpoints beyond the newest `keep` (0: keep all). Returns what was removed."""
    if keep <= 0:
        return []
    found = run.checkpoints()
    gone = [p for _, p in found[:-keep]] if len(found) > keep else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ---- saving ----------------------------------------------------------------------------------------

def write_model(lm, tokenizer, path: Path, state, *, merge_lora: bool) -> None:
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


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft LoRA model's full state dict (keys `base_model.model.<path>...`) as the plain model's,
    with W + scaling * B @ A folded into every adapted weight."""
    out, lora = {}, {}
    for k, v in state.items():
        k = k.removeprefix("base_model.model.")
        if ".lora_A." in k or ".lora_B." in k:
            mod, kind = k.split(".lora_")[0], k.split(".lora_")[1][0]
            lora.setdefault(mod, {})[kind] = v
        elif ".lora_" in k:
            continue  # dropout or embedding adapters we never create
        else:
            out[k.replace(".base_layer.", ".")] = v
    for mod, ab in lora.items():
        w = out[f"{mod}.weight"]
        out[f"{mod}.weight"] = (w.float() + scaling * ab["B"].float() @ ab["A"].float()).to(w.dtype)
    return out


def save_gathered(lm, tokenizer, path: Path, state: dict[str, torch.Tensor]) -> None:
    """Save a gathered full state dict as a plain HF model: the model is rebuilt from its config on the
    meta device and the tensors are assigned (no second load of the weights)."""
    from transformers import AutoModelForCausalLM

    state = {k.removeprefix("lm."): v for k, v in state.items()}
    config = lm.get_base_model().config if hasattr(lm, "get_base_model") else lm.config
    if hasattr(lm, "peft_config"):
        lcfg = lm.peft_config["default"]
        state = merge_lora_state(state, lcfg.lora_alpha / lcfg.r)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"gathered state does not match the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def save_model(accelerator, engine, scorer, lm, tokenizer, path: Path, *, merge_lora: bool = False) -> None:
    """HF-loadable weights of `lm` into `path`, atomically: every rank takes part in the engine's gather (or,
    when the engine `streams_final`, in its gathers of one tensor at a time), the main process writes. Raises
    CheckpointError when the directory cannot be written."""
    streamed = engine.streams_final(lm, merge_lora)
    state = None if streamed else engine.gathered_state(accelerator, scorer)
    if accelerator.is_main_process:
        try:
            with atomic_path(path, directory=True) as tmp:
                if streamed:
                    engine.write_streamed(scorer, lm, tokenizer, tmp, is_main=True)
                else:
                    engine.write_model(lm, tokenizer, tmp, state, merge_lora=merge_lora)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"could not save the model to {path}: {e}") from e
    elif streamed:
        engine.write_streamed(scorer, lm, tokenizer, None, is_main=False)  # the gathers the main process writes
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, engine, scorer, lm, tokenizer, optimizer, scheduler, run: RunDir,
                    step: int, trainer_state: dict[str, Any]) -> Path:
    final = run.checkpoint(step)
    tmp = final.with_name(f".step-{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    engine.save_state(accelerator, scorer, lm, tokenizer, optimizer, tmp)
    # every rank's shards are on disk before the main process lists and hashes them into the manifest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from inspo_core.atomic import fsync_tree, replace

        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        doc = dict(trainer_state, step=step, torch_rng=torch.get_rng_state().tolist())
        (tmp / STATE_FILE).write_text(json.dumps(doc))
        # last: its presence means complete. Hashed from the temporary directory before the rename (the
        # files were just written, so this reads them from the page cache)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp)))
        fsync_tree(tmp)
        replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(accelerator, engine, ckpt: Path, optimizer, scheduler, scorer) -> dict[str, Any]:
    """Optimizer, scheduler and RNG from `ckpt`, and the weights where the engine's checkpoint holds shards
    (otherwise they were loaded when the model was built)."""
    engine.load_state(accelerator, scorer, optimizer, ckpt)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    state = read_state(ckpt)
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    return state
