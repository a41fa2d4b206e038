"""What a model *is*, as a short hash: its config and the full content of its weight files.

Used wherever reuse must be exact: the reference cache key, and the identity of a checkpoint in
evaluation (a judgement is reused only for the same weights). A hub name is resolved to its
downloaded snapshot directory first, which names the commit. Full-file hashes are memoised by
(real path, size, mtime, inode) when a memo directory is given, so a large checkpoint is read once.
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


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, memoised under `memo_dir` by (real path, size, mtime, inode)."""
    real = path.resolve()
    st = real.stat()
    memo_key = hashlib.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()[:32]
    memo = memo_dir / f"{memo_key}.sha256" if memo_dir is not None else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        atomic_write_text(memo, digest)
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
    memo = Path(memo_dir) if memo_dir is not None else None
    for f in files:
        h.update(f"{f.name}:{file_sha256(f, memo)}".encode())
    return h.hexdigest()[:32]
