"""Trainer invariants on a tiny model: resume, accumulation, processes, LoRA, reference cache."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from inspo_core.config import TrainConfig, load_config
from inspo_core.objectives import OBJECTIVES
from inspo_core.strategies import STRATEGIES
from inspo_core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "examples" / "toy_preferences.jsonl")
CONTRACT_METRICS = ["step", "epoch", "loss", "lr", "grad_norm", "rewards/chosen", "rewards/rejected",
                    "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "tokens_per_s",
                    "pairs_per_s", "peak_mem_mb"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def cfg(tmp_path, cache_dir, **kw):
    base = dict(model="tiny", data=TOY, lr=1e-3, max_length=96, batch_size=4, max_steps=3, val_size=8,
                output_dir=str(tmp_path / "run"), cache_dir=cache_dir, tiny_hidden=32)
    base.update(kw)
    return load_config(TrainConfig, None, base)


def losses(run_dir, prefix="loss"):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[prefix] for r in rows if prefix in r]


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def run_cli(*args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "workbench", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def test_cli_train_writes_run_directory_and_loadable_model(tmp_path, cache_dir):
    out = tmp_path / "run"
    res = run_cli("--config", str(ROOT / "configs" / "tiny.yaml"), "--max_steps", "4", "--save_every", "2",
                  "--eval_every", "2", "--output_dir", str(out), "--cache_dir", cache_dir, "--max_length", "96")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "report.html", "final/config.json", "final/model.safetensors",
                 "checkpoints/step-2/trainer_state.json", "checkpoints/step-4/optimizer.pt", "best/config.json"):
        assert (out / name).exists(), name
    import yaml

    conf = yaml.safe_load((out / "config.yaml").read_text())
    assert conf["strategy"] == "symmetric" and conf["_provenance"]["inspo_workbench"]
    assert "git_sha" in conf["_provenance"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and len(eval_rows) == 2
    for name in CONTRACT_METRICS:
        assert all(name in r for r in train_rows), name
    for name in ("eval/logps/chosen_plain", "eval/logps/rejected_plain", "eval/reflection/gain"):
        assert name in eval_rows[-1], name
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(conf["resolved_model"])
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    assert changed, "training did not change the weights"
    ids = tok("What color is the sky?", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]  # generates from the prompt alone


def test_resume_equals_uninterrupted(tmp_path, cache_dir, monkeypatch):
    full = Trainer(cfg(tmp_path / "a", cache_dir, max_steps=6, save_every=2)).run()
    # interrupted at step 5 (after the step-4 checkpoint), then resumed
    calls = {"n": 0}
    orig = Trainer.loss_terms

    def crash_on_fifth_step(self, scorer, pairs, idx, views, ref):
        if self.cfg.resume is False and views == self.plan.method.policy_views:
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
        return orig(self, scorer, pairs, idx, views, ref)

    monkeypatch.setattr(Trainer, "loss_terms", crash_on_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path / "b", cache_dir, max_steps=6, save_every=2)).run()
    monkeypatch.setattr(Trainer, "loss_terms", orig)
    run_b = tmp_path / "b" / "run"
    assert losses(run_b) == losses(full.run_dir)[:4]
    Trainer(cfg(tmp_path / "b", cache_dir, max_steps=6, save_every=2, resume=True)).run()
    assert losses(run_b) == losses(full.run_dir)  # exactly, step by step
    for k, v in weights(full.run_dir / "final").items():
        assert torch.equal(v, weights(run_b / "final")[k]), k


@pytest.mark.slow
def test_kill_9_then_resume_matches(tmp_path, cache_dir):
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--max_steps", "40", "--save_every", "5",
            "--eval_every", "0", "--cache_dir", cache_dir, "--max_length", "96", "--val_size", "0"]
    ref = run_cli(*args, "--output_dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "train", *args, "--output_dir", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-10").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "step-10").exists(), "the run ended before its step-10 checkpoint"
    res = run_cli(*args, "--output_dir", str(out), "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    assert losses(out) == losses(tmp_path / "ref")


def test_batch8_accum1_equals_batch1_accum8(tmp_path, cache_dir):
    a = Trainer(cfg(tmp_path / "a", cache_dir, batch_size=8, grad_accum=1, max_steps=3)).run()
    b = Trainer(cfg(tmp_path / "b", cache_dir, batch_size=1, grad_accum=8, max_steps=3)).run()
    assert_close(torch.tensor(losses(a.run_dir)), torch.tensor(losses(b.run_dir)), atol=1e-5, rtol=1e-5)
    wa, wb = weights(a.run_dir / "final"), weights(b.run_dir / "final")
    for k in wa:
        assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, cache_dir):
    """torchrun, 2 CPU processes over gloo, batch 2 each vs 1 process with batch 4: same global batches;
    losses agree to 1e-5 (only the all-reduce summation order differs)."""
    common = ["--model", "tiny", "--data", TOY, "--lr", "1e-3", "--max_length", "96", "--max_steps", "4",
              "--val_size", "8", "--cache_dir", cache_dir, "--tiny_hidden", "32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = run_cli(*common, "--batch_size", "4", "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "workbench", "train", *common, "--batch_size", "2", "--output_dir",
                          str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")), atol=1e-5, rtol=0)
    assert_close(torch.tensor(losses(tmp_path / "two", "eval/loss")),
                 torch.tensor(losses(tmp_path / "one", "eval/loss")), atol=1e-5, rtol=0)


def test_second_run_does_zero_reference_forwards(tmp_path):
    cache = str(tmp_path / "own-cache")
    first = Trainer(cfg(tmp_path / "a", cache, max_steps=2)).run()
    assert first.ref_stats.forwards > 0 and not first.ref_stats.cache_hit
    second = Trainer(cfg(tmp_path / "b", cache, max_steps=2, lr=5e-4)).run()
    assert second.ref_stats.forwards == 0 and second.ref_stats.cache_hit
    # the key is the scored sequences themselves: a context rendering the plain reference never sees
    # still hits; a change to the scored tokens misses
    raw = Trainer(cfg(tmp_path / "c", cache, max_steps=2, context_format="raw")).run()
    assert raw.ref_stats.cache_hit
    other = Trainer(cfg(tmp_path / "d", cache, max_steps=2, exclude_eos=True)).run()
    assert other.ref_stats.forwards > 0


def test_reference_free_objective_skips_the_reference(tmp_path):
    res = Trainer(cfg(tmp_path, str(tmp_path / "c"), objective="simpo", max_steps=2)).run()
    assert res.ref_stats.forwards == 0 and not (tmp_path / "c" / "refcache").exists()


def test_lora_keeps_one_copy_of_the_base_weights(tmp_path, cache_dir, monkeypatch):
    import inspo_core.plan as trainer_mod

    loads = []
    orig = trainer_mod.load_model
    monkeypatch.setattr(trainer_mod, "load_model", lambda *a, **k: loads.append(a) or orig(*a, **k))
    t = Trainer(cfg(tmp_path, str(tmp_path / "lcache"), lora=4, max_steps=2, lr=1e-2))
    res = t.run()
    assert len(loads) == 1, "the reference must be the base model with adapters disabled, not a second load"
    assert res.ref_stats.forwards > 0
    # the cached reference equals the base model's own log-probs
    from inspo_core.refcache import compute_ref_logps

    base = orig(t.plan.model_source)
    want, _ = compute_ref_logps(base, t.plan.train_pairs, t.plan.method.ref_views, batch_size=4, pad_id=t.plan.pad_id)
    for v in t.plan.method.ref_views:
        assert_close(t.plan.ref_train[v], want[v], atol=1e-5, rtol=1e-6)
    from peft import AutoPeftModelForCausalLM

    final = res.run_dir / "final"  # the adapter alone (peft's format), opened over its base by peft itself
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    merged = AutoPeftModelForCausalLM.from_pretrained(final).merge_and_unload()
    assert not any("lora" in k for k in merged.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_objective_and_strategy_trains_two_steps(tmp_path, cache_dir, objective, strategy):
    res = Trainer(cfg(tmp_path, cache_dir, objective=objective, strategy=strategy, max_steps=2, batch_size=2,
                      val_size=4, max_rows=12)).run()
    assert res.steps == 2 and torch.isfinite(torch.tensor(res.final_loss))


def test_too_little_data_for_a_batch(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(cfg(tmp_path, cache_dir, max_rows=3, batch_size=4)).run()


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    from inspo_core.trainer import lr_lambda

    f = lr_lambda(100, 0.1, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55, abs=1e-2)
    assert f(99) == pytest.approx(0.1, abs=1e-3)


def test_cli_reports_bad_config_without_traceback(tmp_path):
    res = run_cli("--objective", "dpoo", "--output_dir", str(tmp_path))
    assert res.returncode == 2 and "invalid choice: 'dpoo'" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 3\n")
    res = run_cli("--config", str(bad))
    assert res.returncode == 2 and "unknown TrainConfig key(s) ['learning_rate']" in res.stderr
    assert "Traceback" not in res.stderr


def test_tree_packing_trains_like_padding(tmp_path, cache_dir):
    """Same losses step by step (1e-5) whether the views are padded rows or one prefix tree."""
    a = Trainer(cfg(tmp_path / "a", cache_dir, strategy="averaged", max_steps=3)).run()
    b = Trainer(cfg(tmp_path / "b", cache_dir, strategy="averaged", max_steps=3, packing="tree")).run()
    assert_close(torch.tensor(losses(b.run_dir)), torch.tensor(losses(a.run_dir)), atol=1e-5, rtol=1e-5)
    assert_close(torch.tensor(losses(b.run_dir, "eval/reflection/gain")),
                 torch.tensor(losses(a.run_dir, "eval/reflection/gain")), atol=1e-4, rtol=1e-5)


def test_lora_resume_equals_uninterrupted(tmp_path, cache_dir):
    import shutil

    full = Trainer(cfg(tmp_path / "a", cache_dir, lora=4, lr=1e-2, max_steps=4, save_every=2)).run()
    b = cfg(tmp_path / "b", cache_dir, lora=4, lr=1e-2, max_steps=4, save_every=2)
    Trainer(b).run()
    run_b = Path(b.output_dir)
    shutil.rmtree(run_b / "checkpoints" / "step-4")  # as if killed after the step-2 checkpoint
    shutil.rmtree(run_b / "final")
    Trainer(cfg(tmp_path / "b", cache_dir, lora=4, lr=1e-2, max_steps=4, save_every=2, resume=True)).run()
    assert losses(run_b) == losses(full.run_dir)
    assert (run_b / "checkpoints" / "step-2" / "adapter_config.json").exists()  # checkpoints hold the adapter


def test_fresh_run_refuses_to_mix_with_old_checkpoints(tmp_path, cache_dir):
    Trainer(cfg(tmp_path, cache_dir, max_steps=2, save_every=1)).run()
    with pytest.raises(ValueError, match=r"holds an earlier run \(.*checkpoints.*\); pass --resume"):
        Trainer(cfg(tmp_path, cache_dir, max_steps=2, save_every=1)).run()
    Trainer(cfg(tmp_path, cache_dir, max_steps=2, save_every=1, overwrite=True)).run()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-1", "step-2"]


HEAP_PROBE = """
import json, os, sys, torch
from inspo_core.trainer import map_large_allocations, resident_mb, return_freed_memory
if sys.argv[1] == "mmap":
    print(json.dumps({"mmap": map_large_allocations(), "env": os.environ.get("MALLOC_MMAP_THRESHOLD_")}))
    raise SystemExit
base = resident_mb()
blocks = [torch.ones(16384) for _ in range(6000)]  # 64 KiB each, 375 MiB: served from the heap, not by mmap
keep = torch.ones(16384)  # allocated last, so the heap cannot shrink from its top
del blocks
freed = resident_mb()
trimmed = return_freed_memory()
print(json.dumps({"base": base, "freed": freed, "after": resident_mb(), "trimmed": trimmed}))
"""


def test_freed_heap_memory_goes_back_to_the_os():
    """glibc keeps freed blocks below the top of its heap resident; `return_freed_memory` (malloc_trim, called at
    the end of each phase on CPU) gives them back. Measured in a fresh process from /proc's VmRSS."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = json.loads(subprocess.run([sys.executable, "-c", HEAP_PROBE, "trim"], capture_output=True, text=True,
                                    check=True, env=env, cwd=ROOT).stdout)
    assert out["trimmed"] is True
    assert out["freed"] - out["base"] > 300, out  # freed, still resident: glibc's heap keeps it
    assert out["after"] - out["base"] < 50, out  # handed back
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # the user's own setting wins over the trainer's
    out = json.loads(subprocess.run([sys.executable, "-c", HEAP_PROBE, "mmap"], capture_output=True, text=True,
                                    check=True, env=env, cwd=ROOT).stdout)
    assert out == {"mmap": False, "env": "65536"}


def test_auto_heap_mode_follows_the_engine():
    """--cpu_malloc auto: every large allocation its own mapping under the engines that shard (memory per rank is
    the point there), the phase-end trim otherwise; an explicit choice is kept."""
    from inspo_core.engines import get_engine
    from inspo_core.trainer import heap_mode

    assert [heap_mode("auto", get_engine(e)) for e in ("none", "fsdp2", "zero3")] == ["trim", "mmap", "mmap"]
    assert [heap_mode(m, get_engine("fsdp2")) for m in ("trim", "mmap", "default")] == ["trim", "mmap", "default"]
