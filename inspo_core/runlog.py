"""Run directory bookkeeping: resolved config with provenance, metrics.jsonl, atomic writes."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

import inspo_core


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file and rename, so readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git_sha() -> str | None:
    root = Path(inspo_core.__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    import torch
    import transformers

    return {"inspo_workbench": inspo_core.__version__, "git_sha": git_sha(),
            "torch": str(torch.__version__), "transformers": str(transformers.__version__)}


def write_config(run_dir: str | Path, config: dict[str, Any]) -> None:
    doc = dict(config)
    doc["_provenance"] = provenance()
    atomic_write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible
    return v


class MetricsLog:
    """Appends one JSON object per line; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            f.flush()

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
