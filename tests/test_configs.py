"""Every YAML in the repository loads into its dataclass; shipped configs state only non-defaults;
the paper configs train for 2 steps on a tiny local model with only the model and data swapped."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from inspo_core.config import TrainConfig, diff_from_defaults, load_config

ROOT = Path(__file__).resolve().parents[1]
# the repository's YAMLs: tracked, or new and not ignored (a run directory under logs/ or runs/ is not a config)
_LISTED = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
YAMLS = sorted(ROOT / p for p in _LISTED if (ROOT / p).is_file()
               and not any(part.startswith(".") for part in Path(p).parts))
ACCELERATE = [p for p in YAMLS if "accelerate" in p.parts]
TRAIN = [p for p in YAMLS if p not in ACCELERATE]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_yaml_files_found():
    assert len(TRAIN) >= 21 and len(ACCELERATE) >= 3
    tracked = subprocess.run(["git", "ls-files", "*.yaml", "*.yml"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert {str(p.relative_to(ROOT)) for p in YAMLS} >= set(tracked)


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: str(p.relative_to(ROOT)))
def test_train_config_loads_and_states_only_non_defaults(path):
    cfg = load_config(TrainConfig, path)
    written = yaml.safe_load(path.read_text())
    assert set(written) == set(diff_from_defaults(cfg)), "keys equal to the defaults belong out of the file"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.utils import DistributedType

    doc = yaml.safe_load(path.read_text())
    assert DistributedType(doc["distributed_type"]) in (DistributedType.MULTI_GPU, DistributedType.FSDP,
                                                         DistributedType.DEEPSPEED)
    if path.name == "fsdp2.yaml":  # selects the workbench's fsdp2 engine (inspo_core.launch)
        assert doc["distributed_type"] == "FSDP" and doc["fsdp_config"]["fsdp_version"] == 2
    if doc["distributed_type"] == "DEEPSPEED":
        assert doc["deepspeed_config"]["zero_stage"] == 3


PAPER = [p for p in TRAIN if "paper" in p.parts]


# What the tiny-model run swaps out of a paper config: the 7B model and its data, and the sizes a CPU
# can take. Everything else in the YAML (objective, strategy, hyperparameters, context layout...)
# runs as written.
SWAPPED = dict(model="tiny", data=str(ROOT / "examples" / "toy_preferences.jsonl"), eval_data=None, max_length=96,
               max_response_tokens=None, min_response_tokens=None, max_steps=2, batch_size=2, grad_accum=1,
               bf16=False, gradient_checkpointing=False, val_size=4, max_rows=8, eval_every=0, save_every=0,
               lr=1e-3)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_runs_two_steps_on_a_tiny_model(path, tmp_path_factory):
    """Checks: (1) every key of the YAML that is not swapped reaches the run as written (the run's
    config.yaml records it); (2) the method is the one the file names; (3) both steps have a finite
    loss and the weights moved away from the starting model."""
    from safetensors.torch import load_file

    from inspo_core.trainer import Trainer

    cache = tmp_path_factory.getbasetemp() / "paper-cache"
    out = tmp_path_factory.mktemp(path.stem)
    written = yaml.safe_load(path.read_text())
    cfg = load_config(TrainConfig, path, dict(SWAPPED, output_dir=str(out), cache_dir=str(cache)))
    t = Trainer(cfg)
    res = t.run()
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    kept = {k: v for k, v in written.items() if k not in SWAPPED and k not in ("output_dir", "cache_dir")}
    assert kept
    for k, v in kept.items():
        assert recorded[k] == pytest.approx(v) if isinstance(v, float) else recorded[k] == v, k
    objective, strategy = path.stem.split("-")[-2:]  # files are named <model>-<objective>-<strategy>.yaml
    assert (t.plan.method.objective.name, t.plan.method.strategy.name) == (objective, strategy)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert len(train_losses) == 2 and all(math.isfinite(x) for x in train_losses)
    start, final = load_file(str(Path(t.plan.model_source) / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert res.steps == 2 and any(not torch.equal(start[k], final[k]) for k in start)
