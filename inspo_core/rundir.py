"""A run directory in one place (DESIGN section 4).

    runs/<name>/config.yaml        resolved config + provenance (package version, git SHA)
                metrics.jsonl      one JSON object per optimizer step and per evaluation
                checkpoints/step-N HF-loadable weights + trainer state for exact resume
                final/, best/      HF-loadable models, written atomically
                eval.json          what was judged and the results (the demo's record of its run)
                win_rates.json     `workbench eval`'s win rates (its own file: eval.json belongs to the demo)
                report.html

Everything that reads or writes these paths goes through `RunDir`, so their names and rules live
here only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

import inspo_core
from inspo_core.atomic import atomic_write_text

_STEP_DIR = re.compile(r"^step-(\d+)$")
ARTIFACTS = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "best", "eval.json", "report.html",
             "win_rates.json", "memory.json")
# keys that may differ between a run and its resume: they change where and how often things are
# written, not the trajectory of the weights
RESUME_FREE_KEYS = frozenset({"resume", "overwrite", "output_dir", "cache_dir", "save_every", "save_total_limit",
                              "log_every", "eval_every", "report_to", "merge_final", "cpu_malloc"})


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> "MetricsLog":
        return MetricsLog(self.path / "metrics.jsonl")

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def eval_json(self) -> Path:
        return self.path / "eval.json"

    @property
    def win_rates_json(self) -> Path:
        """Where `workbench eval` writes by default (eval.json is another command's record)."""
        return self.path / "win_rates.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def memory_json(self) -> Path:
        """Each rank's peak memory after each phase of the run (the trainer writes it at the end)."""
        return self.path / "memory.json"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step}"

    # ---- what is there -----------------------------------------------------------------------------
    def check_usable(self) -> None:
        """A clear error when the directory cannot be a run directory (e.g. it is a file)."""
        for p in [self.path, *self.path.parents]:
            if p.exists():
                if not p.is_dir():
                    raise ValueError(f"output_dir {self.path}: {p} is a file, not a directory; "
                                     "choose another output_dir")
                break

    def artifacts(self) -> list[str]:
        """Names of an earlier run's artifacts present here."""
        return [name for name in ARTIFACTS if (self.path / name).exists()]

    def clear(self) -> None:
        for name in self.artifacts():
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete-looking checkpoint, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.checkpoints_dir.iterdir()
                      if (m := _STEP_DIR.match(p.name)) and p.is_dir())

    def read_config(self) -> dict[str, Any]:
        """The resolved config of this run ({} when there is none)."""
        if not self.config_path.is_file():
            return {}
        doc = yaml.safe_load(self.config_path.read_text()) or {}
        return doc if isinstance(doc, dict) else {}

    def write_config(self, config: dict[str, Any]) -> None:
        doc = dict(config)
        doc["_provenance"] = provenance()
        atomic_write_text(self.config_path, yaml.safe_dump(doc, sort_keys=False))

    def config_hash(self) -> str | None:
        conf = self.read_config()
        return config_hash(conf) if conf else None

    @staticmethod
    def of_model(model_dir: str | Path) -> "RunDir | None":
        """The run a model directory belongs to: a run's final/, best/ or checkpoints/step-N/ (or the
        run directory itself); None when it belongs to no run."""
        p = Path(model_dir)
        for cand in (p, p.parent, p.parent.parent):
            if (cand / "config.yaml").is_file():
                return RunDir(cand)
        return None


def config_hash(conf: dict[str, Any]) -> str:
    """A short hash of the keys that decide a run (bookkeeping keys and provenance left out)."""
    keep = {k: v for k, v in conf.items() if k not in RESUME_FREE_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_dir(path: str | Path) -> Path:
    """A model directory (a whole model, or a LoRA run's adapter) from a checkpoint path or a run directory
    (its final/)."""
    from inspo_core.models import is_model_dir

    p = Path(path)
    if is_model_dir(p / "final"):
        return p / "final"
    if not is_model_dir(p):
        raise ValueError(f"{path}: not a checkpoint (no config.json or adapter_config.json) and not a run directory "
                         "(no final/)")
    return p


# ---- provenance ------------------------------------------------------------------------------------

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


# ---- metrics.jsonl ---------------------------------------------------------------------------------

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
                if (row := _parse(line)) is not None and row.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            f.flush()

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row (a line cut by a crash is left out)."""
        if not self.path.exists():
            return []
        return [r for line in self.path.read_text().splitlines() if line.strip() and (r := _parse(line)) is not None]


def _parse(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
