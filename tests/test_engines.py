"""The engine registry, what the launcher's accelerate config selects, and a plan built without training."""

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml

from inspo_core.config import TrainConfig, load_config
from inspo_core.engines import ENGINES
from inspo_core.launch import read_launcher, resolve_launch
from inspo_core.trainer import Trainer
from test_trainer import cfg

ROOT = Path(__file__).resolve().parents[1]

# what `accelerate launch` (1.15, accelerate/utils/launch.py) puts into the environment of the processes it starts
DEEPSPEED_ENV = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_DEEPSPEED": "true",
                 "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_GRADIENT_CLIPPING": "1.0"}
FSDP_ENV = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
DDP_ENV = {"ACCELERATE_MIXED_PRECISION": "bf16"}
TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def tcfg(**kw):
    return TrainConfig(model="tiny", data="x.jsonl", **kw)


def test_registry_names_are_the_config_choices():
    field = next(f for f in TrainConfig.__dataclass_fields__.values() if f.name == "sharding")
    assert field.metadata["choices"] == ["auto", *ENGINES]
    assert list(ENGINES) == ["none", "fsdp2", "zero3"]
    for name, engine in ENGINES.items():
        assert engine.name == name and name in field.metadata["help"]
    with pytest.raises(ValueError, match="sharding='fsdp3' is not one of: auto, none, fsdp2, zero3"):
        tcfg(sharding="fsdp3")


@pytest.mark.parametrize("env, engine, bf16", [
    (DEEPSPEED_ENV, "zero3", True),
    (FSDP_ENV, "fsdp2", False),
    (DDP_ENV, "none", True),
    (TORCHRUN_ENV, "none", False),
    ({}, "none", False),
])
def test_the_launcher_chooses_engine_and_precision(env, engine, bf16):
    resolved, launcher, _ = resolve_launch(tcfg(), env)
    assert (resolved.sharding, resolved.bf16) == (engine, bf16)
    assert launcher.engine == (None if engine == "none" else engine)


def test_a_flag_naming_the_launchers_engine_is_fine_and_without_a_launcher_it_chooses():
    assert resolve_launch(tcfg(sharding="zero3"), DEEPSPEED_ENV)[0].sharding == "zero3"
    assert resolve_launch(tcfg(sharding="fsdp2"), TORCHRUN_ENV)[0].sharding == "fsdp2"
    assert resolve_launch(tcfg(sharding="zero3"), DDP_ENV)[0].sharding == "zero3"  # DDP's launcher names no engine


@pytest.mark.parametrize("sharding, env, launcher_says", [
    ("fsdp2", DEEPSPEED_ENV, "'zero3'"), ("none", DEEPSPEED_ENV, "'zero3'"), ("zero3", FSDP_ENV, "'fsdp2'"),
])
def test_a_flag_contradicting_the_launcher_is_an_error_naming_both(sharding, env, launcher_says):
    with pytest.raises(ValueError) as err:
        resolve_launch(tcfg(sharding=sharding), env)
    msg = str(err.value)
    assert f"sharding='{sharding}'" in msg and f"selects {launcher_says}" in msg and "drop --sharding" in msg


def test_an_explicit_bf16_wins_over_the_launcher_and_says_so():
    resolved, _, notes = resolve_launch(tcfg(bf16=False), DEEPSPEED_ENV)
    assert resolved.bf16 is False and any("bf16=false" in n and "mixed_precision bf16" in n for n in notes)
    resolved, _, notes = resolve_launch(tcfg(bf16=True), FSDP_ENV)
    assert resolved.bf16 is True and any("mixed_precision no" in n for n in notes)
    assert resolve_launch(tcfg(bf16=True), DEEPSPEED_ENV)[2] == []  # agreeing: nothing to say


@pytest.mark.parametrize("env, words", [
    ({**DEEPSPEED_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, ["zero_stage 2", "zero_stage: 3"]),
    ({k: v for k, v in DEEPSPEED_ENV.items() if k != "ACCELERATE_DEEPSPEED_ZERO_STAGE"}, ["accelerate's default"]),
    ({**FSDP_ENV, "FSDP_VERSION": "1"}, ["fsdp_version 1", "fsdp_version: 2"]),
    ({**DDP_ENV, "ACCELERATE_MIXED_PRECISION": "fp16"}, ["mixed_precision fp16", "--bf16 true/false"]),
])
def test_launcher_configs_the_workbench_cannot_run_are_refused(env, words):
    with pytest.raises(ValueError) as err:
        resolve_launch(tcfg(), env)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_fp16_launcher_with_an_explicit_precision_runs_in_it():
    assert resolve_launch(tcfg(bf16=True), {**DDP_ENV, "ACCELERATE_MIXED_PRECISION": "fp16"})[0].bf16 is True


def test_deepspeed_settings_the_workbench_drives_are_named_when_they_differ():
    _, _, notes = resolve_launch(tcfg(max_grad_norm=0.5), DEEPSPEED_ENV)
    assert any("gradient_clipping 1.0 is not used" in n and "max_grad_norm=0.5" in n for n in notes)


def test_zero_stage_read_from_a_deepspeed_config_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    assert read_launcher(env).engine == "zero3"


def test_shipped_launcher_configs_select_their_engine():
    """The env accelerate derives from each shipped yaml (distributed_type, zero_stage, fsdp_version, precision)."""
    want = {"ddp.yaml": "none", "fsdp2.yaml": "fsdp2", "zero3.yaml": "zero3"}
    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        env = {"ACCELERATE_MIXED_PRECISION": doc.get("mixed_precision", "no")}
        if doc["distributed_type"] == "DEEPSPEED":
            env |= {"ACCELERATE_USE_DEEPSPEED": "true",
                    "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(doc["deepspeed_config"]["zero_stage"])}
        if doc["distributed_type"] == "FSDP":
            env |= {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(doc["fsdp_config"].get("fsdp_version", 1))}
        assert resolve_launch(tcfg(), env)[0].sharding == want[path.name], path.name


def test_the_loop_holds_no_engine_dispatch():
    src = inspect.getsource(Trainer.train)
    for banned in ("cfg.sharding", "isinstance", "hasattr", "zero3", "fsdp", "deepspeed"):
        assert banned not in src.lower(), banned


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_setup_builds_a_plan_without_training(tmp_path, cache_dir, monkeypatch):
    """setup() resolves the engine, builds the plan, the optimizer over exactly the trainable parameters and
    config.yaml, and trains nothing; train() then runs the steps and writes no final/; finish() writes it."""
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    t = Trainer(cfg(tmp_path, cache_dir, max_steps=2, batch_size=4, grad_accum=2))
    plan = t.setup()
    run = tmp_path / "run"
    assert plan.engine is ENGINES["none"] and t.session.start == 0 and t.session.best is None
    assert (plan.total_steps, plan.global_batch) == (2, 8)
    assert len(plan.train_pairs) >= 8 and set(plan.ref_train) == set(plan.method.ref_views)
    trainable = sum(p.numel() for p in t.session.scorer.parameters() if p.requires_grad)
    stepped = sum(p.numel() for g in t.session.optimizer.param_groups for p in g["params"])
    assert stepped == trainable > 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert (recorded["sharding"], recorded["bf16"]) == ("none", False)
    assert recorded["_launch"] == {"launcher": "no accelerate launcher config", "processes": 1}
    assert not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text() == ""
    before = {k: v.clone() for k, v in t.session.scorer.state_dict().items()}
    loss = t.train()
    assert torch.isfinite(torch.tensor(loss)) and not (run / "final").exists()
    assert len([1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 2
    assert any(not torch.equal(before[k], v) for k, v in t.session.scorer.state_dict().items())
    res = t.finish(loss)
    assert (run / "final" / "model.safetensors").is_file() and res.steps == 2


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_before_setup_is_refused(tmp_path, cache_dir):
    with pytest.raises(AssertionError, match="setup"):
        Trainer(load_config(TrainConfig, None, dict(model="tiny", data="x", output_dir=str(tmp_path)))).train()


def test_resume_check_compares_what_auto_resolves_to(monkeypatch, tmp_path):
    """A config with sharding auto / bf16 null (the defaults) continues a run recorded with what they resolved to
    (the demo checks its runs this way), and a recorded engine this launch would not choose is named."""
    import dataclasses

    from inspo_core.launch import resolve_launch
    from inspo_core.plan import check_resume_config

    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    now = tcfg()
    saved = dataclasses.asdict(now) | {"sharding": "none", "bf16": False}
    check_resume_config(resolve_launch(now)[0], saved, tmp_path)
    with pytest.raises(ValueError, match="sharding: 'zero3' in the checkpoint, 'none' now"):
        check_resume_config(resolve_launch(now)[0], saved | {"sharding": "zero3"}, tmp_path)
    with pytest.raises(ValueError, match="needs a resolved config"):
        check_resume_config(now, saved, tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="bf16: False in the checkpoint, True now"):
        check_resume_config(resolve_launch(now)[0], saved, tmp_path)


def test_the_readme_cluster_command_shards_with_zero3_in_bf16():
    """`accelerate launch --config_file configs/accelerate/zero3.yaml -m workbench train --config
    configs/paper/llama3-8b-dpo-symmetric.yaml` used to train as DDP (no --sharding given)."""
    doc = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": doc["mixed_precision"],
           "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(doc["deepspeed_config"]["zero_stage"])}
    paper = load_config(TrainConfig, ROOT / "configs" / "paper" / "llama3-8b-dpo-symmetric.yaml")
    assert paper.sharding == "auto"
    resolved, _, notes = resolve_launch(paper, env)
    assert (resolved.sharding, resolved.bf16) == ("zero3", True) and notes == []


def test_fsdp2_builds_the_meta_model_once_for_its_check_and_its_policy(tmp_path, monkeypatch):
    """The check that a source streams into shards builds the meta model; the sharded policy is that
    model, not a second build (the next run's policy is built afresh)."""
    from types import SimpleNamespace

    import inspo_core.shard_io as sio
    from inspo_core.engines import get_engine
    from inspo_core.models import tiny_llama

    tiny_llama(64, hidden_size=16, num_layers=1, num_heads=2, seed=0).save_pretrained(tmp_path / "m")
    built = []
    real = sio.empty_model
    monkeypatch.setattr(sio, "empty_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    engine, cfg = get_engine("fsdp2"), SimpleNamespace(trust_remote_code=False)
    assert engine.cannot_load_into_shards(cfg, str(tmp_path / "m")) == ""
    policy = engine.sharded_policy(cfg, str(tmp_path / "m"))
    assert len(built) == 1 and policy is built[0]
    assert all(p.is_meta for p in policy.parameters())
    again = engine.sharded_policy(cfg, str(tmp_path / "m"))
    assert len(built) == 2 and again is not policy
