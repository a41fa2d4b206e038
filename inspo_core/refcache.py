"""Reference log-probs computed once and reused across runs and sweeps.

The key hashes the reference model's identity and the exact token sequences scored (so the data,
the builder settings and the views are all covered), and the compute dtype. Values are [N] fp32
tensors per reference view in pair order, stored as safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from inspo_core.conditioning import BuiltPair, collate_views
from inspo_core.logps import view_logps
from inspo_core.strategies import View

SMALL_MODEL_PARAMS = 50_000_000  # below this the fingerprint hashes every weight


@dataclass
class RefStats:
    forwards: int = 0  # reference forward passes run (0 when served from the cache)
    cache_hit: bool = False
    path: str = ""


def files_fingerprint(path: str | Path) -> str:
    """Identity of a saved model from its weight files: names, sizes, first and last MiB."""
    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    if not files:
        raise ValueError(f"no weight files (*.safetensors, *.bin) in {path}")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(2**20))
            fh.seek(max(0, size - 2**20))
            h.update(fh.read(2**20))
    return h.hexdigest()[:24]


def model_fingerprint(lm: torch.nn.Module) -> str:
    """Identity of a model's weights: a hash of every parameter for small models, otherwise of its
    source (a local directory's weight files, or the hub id and commit)."""
    params = list(lm.state_dict().items())
    if sum(t.numel() for _, t in params) <= SMALL_MODEL_PARAMS:
        h = hashlib.sha256()
        for name, t in params:
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:24]
    cfg = getattr(lm, "config", None)
    src = str(getattr(cfg, "_name_or_path", "") or "")
    if Path(src).is_dir():
        return files_fingerprint(src)
    if not src:
        raise ValueError("cannot fingerprint a large in-memory model without a source path; save it first")
    return f"{src}@{getattr(cfg, '_commit_hash', None) or 'unknown-revision'}"


def sequences_fingerprint(pairs: list[BuiltPair], views: list[View]) -> str:
    h = hashlib.sha256()
    for pair in pairs:
        for v in views:
            ids, start = pair.sequence(v)
            h.update(json.dumps([v.key, ids, start, pair.loss_lengths[v.target]]).encode())
    return h.hexdigest()[:24]


def compute_ref_logps(
    model, pairs: list[BuiltPair], views: list[View], *, batch_size: int = 8, pad_id: int = 0, chunk_mb: float = 256,
    packing: str = "padded",
) -> tuple[dict[View, torch.Tensor], int]:
    """({view: [N] fp32}, number of forward passes) with gradients off and the model in eval mode.

    With packing="tree" each pair's reference views share one prefix tree ([x | y_l | y_w])."""
    from inspo_core.logps import TokenLogps
    from inspo_core.packing import pack_pairs, packed_view_logps, to_device

    was_training = model.training
    model.eval()
    out: dict[View, list[torch.Tensor]] = {v: [] for v in views}
    forwards = 0
    with torch.no_grad():
        dev = next(model.parameters()).device
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            if packing == "tree":
                got = packed_view_logps(TokenLogps(model, chunk_mb=chunk_mb), to_device(pack_pairs(chunk, views, pad_id=pad_id), dev),
                                        views, len(chunk))
            else:
                got = view_logps(model, collate_views(chunk, views, pad_id), chunk_mb=chunk_mb)
            for v, t in got.items():
                out[v].append(t.float().cpu())
            forwards += 1
    model.train(was_training)
    return {v: torch.cat(ts) if ts else torch.zeros(0) for v, ts in out.items()}, forwards


class RefCache:
    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir) / "refcache"

    def key(self, model_id: str, pairs: list[BuiltPair], views: list[View], dtype: str) -> str:
        h = hashlib.sha256(json.dumps([model_id, sequences_fingerprint(pairs, views), dtype]).encode())
        return h.hexdigest()[:32]

    def get_or_compute(self, key: str, views: list[View], compute) -> tuple[dict[View, torch.Tensor], RefStats]:
        """Cached tensors for `key`, or `compute() -> (tensors, forwards)` stored under it."""
        path = self.dir / f"{key}.safetensors"
        if path.is_file():
            stored = load_file(str(path))
            if all(v.key in stored for v in views):
                return {v: stored[v.key] for v in views}, RefStats(0, True, str(path))
        tensors, forwards = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({v.key: t.contiguous() for v, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        return tensors, RefStats(forwards, False, str(path))
