"""Reference log-probs computed once and reused across runs and sweeps.

The key hashes the reference model's identity, the exact token sequences scored (so the data,
the builder settings and the views are all covered) and the compute dtype. The identity of a model
is `inspo_core.fingerprint.model_fingerprint`: its config plus the full content of every weight
file (a hub model resolved to its downloaded snapshot, i.e. its commit), never a name or a sample of
the bytes, so a reference whose middle weights or whose config changed misses.

Values are [N] fp32 tensors per reference view in pair order, stored as safetensors with a checksum
of the values in the header; a damaged file (truncated, or values changed) is reported and
recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inspo_core.atomic import atomic_path
from inspo_core.conditioning import BuiltPair
from inspo_core.fingerprint import model_fingerprint
from inspo_core.strategies import View



@dataclass
class RefStats:
    forwards: int = 0  # reference forward passes run (0 when served from the cache)
    cache_hit: bool = False
    path: str = ""
    note: str = ""  # why a cache file was not used, when it existed


def sequences_fingerprint(pairs: list[BuiltPair], views: list[View]) -> str:
    h = hashlib.sha256()
    for pair in pairs:
        for v in views:
            ids, start = pair.sequence(v)
            h.update(json.dumps([v.key, ids, start, pair.loss_lengths[v.target]]).encode())
    return h.hexdigest()[:24]


# ---- computing -------------------------------------------------------------------------------------

def compute_ref_logps(
    model, pairs: list[BuiltPair], views: list[View], *, batch_size: int = 8, pad_id: int = 0, chunk_mb: float = 256,
    packing: str = "padded", mask_dtype: torch.dtype = torch.float32,
) -> tuple[dict[View, torch.Tensor], int]:
    """({view: [N] fp32}, number of forward passes) with gradients off and the model in eval mode."""
    from inspo_core.scoring import score_views

    was_training = model.training
    model.eval()
    out: dict[View, list[torch.Tensor]] = {v: [] for v in views}
    forwards = 0
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            got = score_views(model, pairs[s : s + batch_size], views, packing=packing, pad_id=pad_id,
                              chunk_mb=chunk_mb, mask_dtype=mask_dtype).logps
            for v, t in got.items():
                out[v].append(t.float().cpu())
            forwards += 1
    model.train(was_training)
    return {v: torch.cat(ts) if ts else torch.zeros(0) for v, ts in out.items()}, forwards


# ---- the cache -------------------------------------------------------------------------------------

def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class RefCache:
    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)
        self.dir = self.root / "refcache"

    def model_id(self, name_or_path: str) -> str:
        return model_fingerprint(name_or_path, memo_dir=self.root / "file-hashes")

    def key(self, model_id: str, pairs: list[BuiltPair], views: list[View], dtype: str) -> str:
        h = hashlib.sha256(json.dumps([model_id, sequences_fingerprint(pairs, views), dtype]).encode())
        return h.hexdigest()[:32]

    def load(self, key: str, views: list[View]) -> tuple[dict[View, torch.Tensor] | None, str]:
        """(tensors, "") from an intact cache file, else (None, why it was not usable)."""
        path = self.dir / f"{key}.safetensors"
        if not path.is_file():
            return None, ""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                stored = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or not a safetensors file at all
            return None, f"cache file {path} is damaged ({type(e).__name__}: {e}); recomputing"
        if meta.get("sha256") != _checksum(stored):
            return None, f"cache file {path} fails its checksum (values changed on disk); recomputing"
        missing = [v.key for v in views if v.key not in stored]
        if missing:
            return None, f"cache file {path} lacks views {missing}; recomputing"
        return {v: stored[v.key] for v in views}, ""

    def get_or_compute(self, key: str, views: list[View], compute) -> tuple[dict[View, torch.Tensor], RefStats]:
        """Cached tensors for `key`, or `compute() -> (tensors, forwards)` stored under it."""
        path = self.dir / f"{key}.safetensors"
        got, why = self.load(key, views)
        if got is not None:
            return got, RefStats(0, True, str(path))
        tensors, forwards = compute()
        self.store(key, tensors)
        return tensors, RefStats(forwards, False, str(path), why)

    def store(self, key: str, tensors: dict[View, torch.Tensor]) -> None:
        """`tensors` under `key`, atomically (a reader sees the old file or the whole new one)."""
        named = {v.key: t.float().contiguous().cpu() for v, t in tensors.items()}
        with atomic_path(self.dir / f"{key}.safetensors") as tmp:
            save_file(named, str(tmp), metadata={"sha256": _checksum(named), "key": key})
