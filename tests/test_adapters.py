"""LoRA runs write the adapter alone (peft's format) to final/ and best/; the merged model only when asked
(--merge_final, `workbench merge`); the tools that open checkpoints open both kinds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from inspo_core.rundir import RunDir, model_dir
from inspo_core.trainer import Trainer
from test_trainer import cfg

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """The same LoRA run twice (2 steps, validation so best/ is written): adapters only, and --merge_final."""
    from inspo_core.trainer import reset_accelerate_state

    root = tmp_path_factory.mktemp("lora")
    cache = str(root / "cache")
    kw = dict(lora=4, lr=1e-2, max_steps=2, batch_size=4)
    reset_accelerate_state()
    Trainer(cfg(root / "a", cache, **kw)).run()
    reset_accelerate_state()
    Trainer(cfg(root / "m", cache, **kw, merge_final=True)).run()
    return root / "a" / "run", root / "m" / "run"


def test_lora_final_and_best_hold_the_adapter_alone(lora_runs):
    adapter, merged = lora_runs
    for d in (adapter / "final", adapter / "best"):
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file(), d
        assert not (d / "model.safetensors").exists() and not (d / "config.json").exists(), d
        assert all("lora_" in k for k in load_file(str(d / "adapter_model.safetensors")))
    size = lambda p: p.stat().st_size  # noqa: E731
    assert size(adapter / "final" / "adapter_model.safetensors") * 5 < size(merged / "final" / "model.safetensors")
    # --merge_final only changes what is written: the same run, the same config hash
    assert RunDir(adapter).config_hash() == RunDir(merged).config_hash()


def test_peft_opens_the_adapter_and_it_equals_the_merged_run(lora_runs):
    """Merged by peft itself (AutoPeftModelForCausalLM over the base the adapter names, from another working
    directory), the adapter equals the weights the --merge_final run wrote."""
    adapter, merged = lora_runs
    code = ("import sys, torch; from peft import AutoPeftModelForCausalLM; "
            "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).merge_and_unload(); "
            "torch.save({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[2])")
    out = adapter.parent / "peft_merged.pt"
    res = subprocess.run([sys.executable, "-c", code, str(adapter / "final"), str(out)], cwd="/",
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    got, want = torch.load(out), load_file(str(merged / "final" / "model.safetensors"))
    assert set(want) <= set(got)
    for k in want:
        assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)


def test_workbench_tools_open_the_adapter(lora_runs):
    """model_dir (eval's and serve's run-directory rule), load_model, the model cache behind eval and the app,
    and checkpoint fingerprints (judgement keys, the reference cache) take an adapter directory."""
    from inspo_core.evaluate import describe_checkpoint
    from inspo_core.fingerprint import model_fingerprint
    from inspo_core.generation import ModelCache
    from inspo_core.models import load_model
    from inspo_core.plan import check_model_source

    adapter, merged = lora_runs
    assert model_dir(adapter) == adapter / "final"
    check_model_source(str(adapter / "final"))
    want = load_file(str(merged / "final" / "model.safetensors"))
    got = load_model(str(adapter / "final"), dtype=torch.float32).state_dict()
    for k in want:
        assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    (model, tok, _), fp = ModelCache().get_with_fingerprint(adapter / "final")
    assert fp == model_fingerprint(str(adapter / "final")) and tok is not None
    base = RunDir(adapter).read_config()["resolved_model"]
    # best/ is the step-2 model too (validation only at the last step): the same identity; the base differs
    assert model_fingerprint(str(adapter / "final")) == model_fingerprint(str(adapter / "best"))
    assert model_fingerprint(str(adapter / "final")) != model_fingerprint(base)
    assert describe_checkpoint(adapter / "final")["objective"] == "dpo"


def test_workbench_merge_writes_the_merged_model(lora_runs, tmp_path):
    adapter, merged = lora_runs
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-m", "workbench", "merge", "--adapter", str(adapter), "--output_dir",
                          str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in load_file(str(merged / "final" / "model.safetensors")).items():
        assert_close(got[k], v, atol=1e-6, rtol=1e-6, msg=k)
    res = subprocess.run([sys.executable, "-m", "workbench", "merge", "--adapter", str(merged)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "holds a whole model, not a LoRA adapter" in res.stderr
    res = subprocess.run([sys.executable, "-m", "workbench", "merge", "--adapter", str(adapter), "--output_dir",
                          str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "--overwrite" in res.stderr
