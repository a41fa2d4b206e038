"""What a model *is*, as a short hash: its config and the full content of its weight files.

Used wherever reuse must be exact: the reference cache key, and the identity of a checkpoint in
evaluation (a judgement is reused only for the same weights). A hub name is resolved to its
downloaded snapshot directory first, which names the commit. Full-file hashes are memoised by
(real path, size, mtime, ctime, inode) when a memo directory is given, so a large checkpoint is read
once; every lookup also compares a hash of the file's header and sampled blocks (`content_probe`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from inspo_core.atomic import atomic_write_text

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# config.json keys that do not change what the model computes
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


def local_model_dir(name_or_path: str) -> Path:
    """The directory holding a model's files: the path itself, or for a hub name its downloaded
    snapshot (`<hf cache>/models--org--name/snapshots/<commit>`), which names the commit."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    from transformers.utils import cached_file

    try:
        config = cached_file(name_or_path, "config.json")
    except OSError as e:
        raise ValueError(f"cannot resolve {name_or_path!r} to local files to fingerprint it: {e}") from None
    return Path(config).parent


FULL_READ_BYTES = 4 << 20  # files up to this size are hashed in full on every call, never memoised
SAMPLE_BLOCKS, SAMPLE_BYTES = 33, 64 << 10  # the sampled-content check of a memoised hash: ~2 MiB read
MAX_HEADER_BYTES = 16 << 20


def _stat_key(st) -> tuple:
    """What the memo is keyed on. ctime is in it because os.utime can put back an mtime but not a
    ctime: an in-place write through the file system always moves it."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _sample_offsets(size: int) -> list[int]:
    """Start of each sampled block: evenly spaced from the first byte to the last block."""
    last = max(size - SAMPLE_BYTES, 0)
    return sorted({round(i * last / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)})


def content_probe(path: Path) -> str:
    """A cheap hash of a file's content, compared on every memo lookup: the safetensors header (all of
    it, up to 16 MiB; for other files the first block) and SAMPLE_BLOCKS blocks evenly spread."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            f.seek(0)
            h.update(f.read(8 + min(n, MAX_HEADER_BYTES)))
        for off in _sample_offsets(size):
            f.seek(off)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _full_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes. With `memo_dir`, a file above FULL_READ_BYTES is memoised by (real
    path, size, mtime, ctime, inode), and a memo entry is used only when the file's `content_probe`
    still equals the one stored with it. What this misses: an in-place edit on a file system that
    does not keep ctime (some FUSE mounts report ctime = mtime) that touches none of the sampled bytes."""
    real = path.resolve()
    st = real.stat()
    if memo_dir is None or st.st_size <= FULL_READ_BYTES:
        return _full_sha256(real)
    memo_key = hashlib.sha256(f"{real}|{'|'.join(map(str, _stat_key(st)))}".encode()).hexdigest()[:32]
    memo = memo_dir / f"{memo_key}.json"
    probe = content_probe(real)
    try:
        doc = json.loads(memo.read_text())
        if doc["probe"] == probe and isinstance(doc["sha256"], str):
            return doc["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no entry, or a damaged one: hash again
    digest = _full_sha256(real)
    atomic_write_text(memo, json.dumps({"sha256": digest, "probe": probe}))
    return digest


def model_fingerprint(name_or_path: str, memo_dir: str | Path | None = None) -> str:
    """Identity of a saved model: its config (volatile keys left out) and every weight file's full
    content. A hub name is resolved to its snapshot first, so the commit is covered."""
    d = local_model_dir(name_or_path)
    files = sorted({f for pat in WEIGHT_PATTERNS for f in d.glob(pat)})
    if not files:
        raise ValueError(f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {d}")
    h = hashlib.sha256()
    conf = d / "config.json"
    if conf.is_file():
        doc = json.loads(conf.read_text())
        for k in VOLATILE_CONFIG_KEYS:
            doc.pop(k, None)
        h.update(json.dumps(doc, sort_keys=True).encode())
    adapter = d / "adapter_config.json"
    if adapter.is_file() and not conf.is_file():  # a LoRA adapter: its settings, its weights (below) and its base
        doc = json.loads(adapter.read_text())
        base = doc.pop("base_model_name_or_path", None)
        h.update(json.dumps(doc, sort_keys=True).encode())
        if base:
            h.update(f"base:{model_fingerprint(base, memo_dir)}".encode())
    memo = Path(memo_dir) if memo_dir is not None else None
    for f in files:
        h.update(f"{f.name}:{file_sha256(f, memo)}".encode())
    return h.hexdigest()[:32]
