"""Atomic writes: a file or a directory is built under a temporary name beside its destination and
renamed into place, so a reader (or a resumed run) sees the old version or the new one, never half.

Every writer in the project that replaces something on disk goes through here: run configs,
metrics rewrites, eval.json, reports, checkpoints, final/ and best/, reference caches, tiny models
and world caches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (or `path` itself) to disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _check_parent(path: Path) -> None:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"cannot write {path}: {parent} is a file, not a directory")
    parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path` (a file, or with `directory`
    a whole directory, an older one removed). On error the temporary is removed and `path` is left
    as it was; the error propagates."""
    path = Path(path)
    _check_parent(path)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"nothing was written for {path}")
        fsync_tree(tmp)
        replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def replace(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`. A directory in the way is moved aside first and removed after, so
    at every instant one complete version exists under `dst` or its aside name."""
    if dst.is_dir() and not dst.is_symlink():
        aside = dst.with_name(f".{dst.name}.old{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
