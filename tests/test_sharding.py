"""FSDP2 across processes on CPU (gloo, torchrun): the same run as one process, exact resume from
sharded (DCP) checkpoints, a consolidated final/, LoRA, and state that halves per rank."""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "examples" / "toy_preferences.jsonl")


def train(out: Path, cache: Path, *args: str, procs: int = 1, timeout: float = 600,
          entry: tuple[str, ...] = ("-m", "workbench"), nodes: int = 1) -> subprocess.CompletedProcess:
    """One run; a run that outlives `timeout` (a hang in a collective) fails, and the launcher and every worker
    (torchrun starts each in a session of its own) are killed, so no orphan keeps a core busy. `entry`: what
    python runs (a module or a script taking the workbench's command line). `nodes` > 1: that many torchrun
    launchers on this machine, each a node of `procs` processes (`--nnodes`, `--node_rank`, one master address),
    as a multi-node job is started by hand; the result is node 0's."""
    import tempfile

    common = ["--model", "tiny", "--data", TOY, "--max_length", "96", "--val_size", "8", "--cache_dir", str(cache),
              "--tiny_hidden", "32", "--output_dir", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = str(free_port())
    if nodes > 1:
        launches = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(r),
                     "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1", "--master_port", port, *entry,
                     "train"] for r in range(nodes)]
    elif procs > 1:
        launches = [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                     port, *entry, "train"]]
    else:
        launches = [[sys.executable, *entry, "train"]]
    results = []
    with contextlib.ExitStack() as files:  # files: an orphan cannot block a read
        streams = [(files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+")))
                   for _ in launches]
        started = [subprocess.Popen(cmd + common, cwd=ROOT, env=env, stdout=o, stderr=e, text=True,
                                    start_new_session=True) for cmd, (o, e) in zip(launches, streams)]
        deadline = time.monotonic() + timeout
        for proc in started:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in started:
                    for pid in [*_descendants(p.pid), p.pid]:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                    p.wait()
        for proc, (o, e) in zip(started, streams):
            o.seek(0), e.seek(0)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, o.read(), e.read()))
    for res in results:
        if res.returncode == -signal.SIGKILL:
            pytest.fail(f"the run did not finish in {timeout:.0f} s (a hang?); its last output:\n{res.stdout[-1500:]}\n"
                        f"{res.stderr[-1500:]}")
        assert res.returncode == 0, res.stderr[-3000:]
    return results[0]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # a child belongs to the thread that started it
        with contextlib.suppress(OSError):
            kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _descendants(pid: int) -> list[int]:
    kids = _children(pid)
    return kids + [d for k in kids for d in _descendants(k)]


def rows(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Full fine-tuning, 4 steps, accumulation 2, a clipping limit below every gradient norm:
    one process without sharding, and two FSDP2 processes with checkpoints every 2 steps."""
    root = tmp_path_factory.mktemp("fsdp")
    cache = root / "cache"
    kw = ["--lr", "1e-3", "--max_steps", "4", "--grad_accum", "2", "--max_grad_norm", "0.05"]
    train(root / "one", cache, *kw, "--batch_size", "4")
    two = train(root / "two", cache, *kw, "--batch_size", "2", "--sharding", "fsdp2", "--save_every", "2", procs=2)
    return root, cache, kw, two


def test_fsdp2_two_processes_train_like_one(runs):
    root, _, _, two = runs
    assert "2 process(es)" in two.stdout
    assert_close(torch.tensor(rows(root / "two", "loss")), torch.tensor(rows(root / "one", "loss")), atol=1e-5, rtol=0)
    assert_close(torch.tensor(rows(root / "two", "eval/loss")), torch.tensor(rows(root / "one", "eval/loss")),
                 atol=1e-5, rtol=0)
    norms_two, norms_one = rows(root / "two", "grad_norm"), rows(root / "one", "grad_norm")
    assert all(n > 0.05 for n in norms_two)  # the limit binds at every step
    assert_close(torch.tensor(norms_two), torch.tensor(norms_one), atol=1e-5, rtol=1e-5)
    # parameters + gradients + Adam state per rank: half of one process's
    one_mb, two_mb = rows(root / "one", "state_mb")[-1], rows(root / "two", "state_mb")[-1]
    assert 0.45 < two_mb / one_mb < 0.55


def test_fsdp2_loads_into_shards_and_scores_the_reference_with_them(runs, tmp_path):
    """No rank builds the whole model: it is built on the meta device, each rank reads its shards, and with an
    empty reference cache the sharded policy scores the reference on every rank in lockstep. Its log-probs equal
    the single-process run's (the same cache key, so one cache serves both)."""
    root, cache, kw, two = runs
    assert "weights loaded into the shards" in two.stdout and "whole weights" not in two.stdout
    fresh = tmp_path / "cache"
    shutil.copytree(cache, fresh, ignore=shutil.ignore_patterns("refcache"))  # the same tiny model, no reference
    res = train(tmp_path / "fresh", fresh, *kw, "--batch_size", "2", "--sharding", "fsdp2", "--max_steps", "2",
                "--save_every", "2", procs=2)
    assert "computed" in res.stdout and "the sharded policy on every rank" in res.stdout
    # the reference forwards left the root unsharded; the optimizer must still step the sharded parameters (the
    # checkpoint maps its state to them by name) and training equals the run whose reference came from the cache
    assert (tmp_path / "fresh" / "checkpoints" / "step-2" / "dcp" / ".metadata").is_file()
    assert rows(tmp_path / "fresh", "loss") == pytest.approx(rows(root / "two", "loss")[:2], abs=1e-6)
    ours = {p.name: p for p in (fresh / "refcache").glob("*.safetensors")}
    theirs = {p.name: p for p in (cache / "refcache").glob("*.safetensors")}
    assert ours and set(ours) <= set(theirs)
    for name, path in ours.items():
        a, b = load_file(str(path)), load_file(str(theirs[name]))
        assert sorted(a) == sorted(b)
        for k in a:
            assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=f"{name} {k}")


def test_fsdp2_clipping_changes_the_update(runs, tmp_path):
    """The stale-parameter bug made clipping a no-op under FSDP2: without the limit the run differs."""
    root, cache, kw, _ = runs
    free = [a if a != "0.05" else "0" for a in kw]
    train(tmp_path / "noclip", cache, *free, "--batch_size", "2", "--sharding", "fsdp2", procs=2)
    assert rows(tmp_path / "noclip", "loss")[1:] != pytest.approx(rows(root / "two", "loss")[1:], abs=1e-6)


def test_fsdp2_final_is_one_plain_checkpoint(runs):
    """final/ is consolidated (no shards) and loads in a single process with the weights of the
    single-process run."""
    from transformers import AutoModelForCausalLM

    root = runs[0]
    a, b = load_file(str(root / "one" / "final" / "model.safetensors")), load_file(str(root / "two" / "final" /
                                                                                        "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    AutoModelForCausalLM.from_pretrained(root / "two" / "final")
    ckpt = root / "two" / "checkpoints" / "step-2"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one file of shards per rank, nothing gathered


def test_fsdp2_resume_from_sharded_checkpoints(runs, tmp_path):
    """As if killed after the step-2 checkpoint: the resumed run reproduces the uninterrupted one."""
    root, cache, kw, _ = runs
    run = tmp_path / "two"
    shutil.copytree(root / "two", run)
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "final")
    res = train(run, cache, *kw, "--batch_size", "2", "--sharding", "fsdp2", "--save_every", "2", "--resume", procs=2)
    assert "resumed from" in res.stdout and "step-2 at step 2" in res.stdout
    assert rows(run, "loss") == rows(root / "two", "loss")
    a, b = load_file(str(root / "two" / "final" / "model.safetensors")), load_file(str(run / "final" /
                                                                                     "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_with_fsdp2(runs, tmp_path):
    """LoRA adapters trained under FSDP2 (base sharded, frozen) give the single process's model: FSDP2's final/ is
    the adapter alone (gathered, peft's format), opened over its base by peft; the single process merges on
    request (--merge_final) into one plain checkpoint."""
    from peft import AutoPeftModelForCausalLM

    _, cache, _, _ = runs
    kw = ["--lr", "1e-2", "--max_steps", "3", "--lora", "4"]
    train(tmp_path / "one", cache, *kw, "--batch_size", "4", "--merge_final", "true")
    train(tmp_path / "two", cache, *kw, "--batch_size", "2", "--sharding", "fsdp2", procs=2)
    assert_close(torch.tensor(rows(tmp_path / "two", "loss")), torch.tensor(rows(tmp_path / "one", "loss")),
                 atol=1e-5, rtol=0)
    adapter = tmp_path / "two" / "final"
    assert not (adapter / "model.safetensors").exists()
    assert all("lora_" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload().state_dict()
    assert not any("lora" in k for k in a)
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


# ---- every rank runs the same collectives; a dead launcher takes its workers -----------------------------

# DeepSpeed keeps a small model's parameters whole (each under stage3_param_persistence_threshold) or gathered
# between forwards (stage3_max_reuse_distance): then no forward of the tiny model is a collective. This entry point
# makes ZeRO-3 gather every parameter for every forward, as it does for a model too large to keep.
ZERO3_GATHER_ALWAYS = """
import sys
from inspo_core.engines import Zero3
prepare = Zero3.prepare
def gather_always(self, acc, scorer, optimizer, plan):
    acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"].update(
        stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0, stage3_max_live_parameters=0,
        stage3_prefetch_bucket_size=0)
    return prepare(self, acc, scorer, optimizer, plan)
Zero3.prepare = gather_always
from workbench.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def odd_val(tmp_path_factory):
    """One process with 9 validation pairs: with 2 processes and batch 2, rank 0 scores 5 of them in 3 batches and
    rank 1 scores 4 in 2, while under FSDP2 and ZeRO-3 every forward is a collective (the even remainder, 8 pairs,
    is the runs above)."""
    root = tmp_path_factory.mktemp("oddval")
    cache = root / "cache"
    kw = ["--max_steps", "2", "--val_size", "9"]
    train(root / "one", cache, *kw, "--batch_size", "4")
    (root / "zero3_gather_always.py").write_text(ZERO3_GATHER_ALWAYS)
    return root, cache, kw


@pytest.mark.parametrize("sharding", ["fsdp2", "zero3"])
def test_sharded_validation_with_uneven_shares(odd_val, sharding):
    """The final evaluation used to hang: the rank with one pair more ran one forward more. Every rank now runs the
    same number of forwards (a dummy that counts for nothing), and the loss is the single process's."""
    if sharding == "zero3":
        pytest.importorskip("deepspeed")
    root, cache, kw = odd_val
    entry = (str(root / "zero3_gather_always.py"),) if sharding == "zero3" else ("-m", "workbench")
    res = train(root / sharding, cache, *kw, "--batch_size", "2", "--sharding", sharding, procs=2, timeout=180,
                entry=entry)
    assert "9 validation pairs" in res.stdout
    assert_close(torch.tensor(rows(root / sharding, "loss")), torch.tensor(rows(root / "one", "loss")), atol=1e-5,
                 rtol=0)
    assert len(rows(root / sharding, "eval/loss")) == 1
    assert_close(torch.tensor(rows(root / sharding, "eval/loss")), torch.tensor(rows(root / "one", "eval/loss")),
                 atol=1e-5, rtol=0)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_launcher_takes_its_workers(tmp_path):
    """SIGKILL to torchrun (it cannot forward anything) used to leave both workers training as orphans."""
    import time

    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "workbench", "train", "--model", "tiny", "--data", TOY, "--max_length", "96", "--val_size", "0",
           "--cache_dir", str(tmp_path / "cache"), "--tiny_hidden", "32", "--output_dir", str(tmp_path / "run"),
           "--max_steps", "100000", "--batch_size", "2"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while "process(es)" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # both workers are past start-up: the line follows barriers on every rank
        assert proc.poll() is None, log.read_text()[-3000:]
        workers = _children(proc.pid)
        assert len(workers) == 2, (workers, log.read_text()[-2000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "workers outlived their launcher"
    finally:
        for pid in [proc.pid, *workers]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# ---- DeepSpeed ZeRO-3 ---------------------------------------------------------------------------------

deepspeed = pytest.importorskip("deepspeed", reason="ZeRO-3 tests need `pip install deepspeed`")


def test_zero3_two_processes_train_like_one(runs, tmp_path):
    """DeepSpeed ZeRO-3 over 2 CPU processes (its CPU accelerator): the single process's losses, gradient
    norms (DeepSpeed clips inside its step) and validation loss; final/ is one plain checkpoint, written one
    gathered parameter at a time. The model is partitioned as it is built, and with an empty reference cache the
    partitioned policy scores the reference (the losses equal the run whose reference came from whole weights)."""
    root, cache, kw, _ = runs
    fresh = tmp_path / "cache"
    shutil.copytree(cache, fresh, ignore=shutil.ignore_patterns("refcache"))
    res = train(tmp_path / "z", fresh, *kw, "--batch_size", "2", "--sharding", "zero3", procs=2)
    assert "weights partitioned as the model was built" in res.stdout and "whole weights" not in res.stdout
    assert "computed" in res.stdout and "the sharded policy on every rank" in res.stdout
    assert_close(torch.tensor(rows(tmp_path / "z", "loss")), torch.tensor(rows(root / "one", "loss")), atol=1e-5,
                 rtol=0)
    assert_close(torch.tensor(rows(tmp_path / "z", "grad_norm")), torch.tensor(rows(root / "one", "grad_norm")),
                 atol=1e-5, rtol=1e-5)
    assert_close(torch.tensor(rows(tmp_path / "z", "eval/loss")), torch.tensor(rows(root / "one", "eval/loss")),
                 atol=1e-5, rtol=0)
    a, b = load_file(str(root / "one" / "final" / "model.safetensors")), load_file(str(tmp_path / "z" / "final" /
                                                                                     "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("sharding", ["fsdp2", "zero3"])
def test_two_nodes_train_like_one_process(runs, tmp_path, sharding):
    """Two nodes started by hand (a torchrun launcher per node, `--nnodes 2 --node_rank r`, one process each):
    the single process's losses and gradient norms, and one complete final/."""
    root, cache, kw, _ = runs
    res = train(tmp_path / "nodes", cache, *kw, "--batch_size", "2", "--sharding", sharding, nodes=2)
    assert "2 process(es)" in res.stdout
    assert_close(torch.tensor(rows(tmp_path / "nodes", "loss")), torch.tensor(rows(root / "one", "loss")), atol=1e-5,
                 rtol=0)
    assert_close(torch.tensor(rows(tmp_path / "nodes", "grad_norm")), torch.tensor(rows(root / "one", "grad_norm")),
                 atol=1e-5, rtol=1e-5)
    a = load_file(str(root / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "nodes" / "final" / "model.safetensors"))
    assert sorted(a) == sorted(b)


@pytest.mark.parametrize("sharding", ["fsdp2", "zero3"])
def test_activation_checkpointing_with_tree_packing_under_each_engine(runs, tmp_path, sharding):
    """Activation checkpointing (recompute in the backward) with tree packing, the default, under each sharded
    engine: the losses and gradient norms of the single process without it. (Its memory saving is not asserted
    here: at this size activations are a rounding error of the process's memory.)"""
    root, cache, kw, _ = runs
    train(tmp_path / "ac", cache, *kw, "--batch_size", "2", "--sharding", sharding, "--packing", "tree",
          "--gradient_checkpointing", "true",
          procs=2)
    assert_close(torch.tensor(rows(tmp_path / "ac", "loss")), torch.tensor(rows(root / "one", "loss")), atol=1e-5,
                 rtol=0)
    assert_close(torch.tensor(rows(tmp_path / "ac", "grad_norm")), torch.tensor(rows(root / "one", "grad_norm")),
                 atol=1e-5, rtol=1e-5)


def test_fsdp2_bf16_mixed_precision_stays_close_to_fp32(runs, tmp_path):
    """`--bf16 true` under FSDP2 uses its mixed-precision policy (weights gathered and computed in bf16, gradients
    reduced in fp32 into fp32 shards, the optimizer's master weights) and trains on CPU over gloo. Its losses differ
    from the fp32 single process's (bf16 is in use) by less than 0.01 over 4 steps, gradient norms by under 5%, and
    final/ holds fp32 master weights within bf16 rounding of the fp32 run's."""
    root, cache, kw, _ = runs
    train(tmp_path / "bf16", cache, *kw, "--batch_size", "2", "--sharding", "fsdp2", "--bf16", "true", procs=2)
    ours, fp32 = torch.tensor(rows(tmp_path / "bf16", "loss")), torch.tensor(rows(root / "one", "loss"))
    gap = (ours - fp32).abs().max().item()
    assert 1e-6 < gap < 0.01, gap
    assert_close(torch.tensor(rows(tmp_path / "bf16", "grad_norm")), torch.tensor(rows(root / "one", "grad_norm")),
                 atol=0, rtol=0.05)
    a = load_file(str(root / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in b.values())
    # Adam moves a weight at most ~lr per step whatever its gradient's size, so bf16 noise in a small gradient can
    # move it the other way: 4 steps of lr 1e-3 apart at most 8e-3
    gaps = {k: (b[k] - a[k]).abs().max().item() for k in a}
    assert max(gaps.values()) < 8.5e-3, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]


def test_zero3_kill_9_then_resume_matches(runs, tmp_path):
    """ZeRO-3 checkpoints (each rank its partitions, nothing gathered): kill -9 the whole job after the
    step-2 checkpoint, resume, and the run equals the uninterrupted one."""
    import signal
    import time

    _, cache, _, _ = runs
    kw = ["--lr", "1e-3", "--max_steps", "12", "--grad_accum", "2", "--batch_size", "2", "--sharding", "zero3",
          "--save_every", "2", "--val_size", "0"]
    train(tmp_path / "ref", cache, *kw, procs=2)
    out = tmp_path / "killed"
    common = ["--model", "tiny", "--data", TOY, "--max_length", "96", "--cache_dir", str(cache), "--tiny_hidden", "32",
              "--output_dir", str(out), *kw]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "-m", "workbench", "train", *common], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-2" / "manifest.json").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = out / "checkpoints" / "step-2"
    assert (ckpt / "accelerate_state" / "latest").is_file() and not (ckpt / "model.safetensors").exists()
    assert not (out / "final").exists(), "the run finished before it was killed"
    res = train(out, cache, *kw, "--resume", procs=2)
    assert "resumed from" in res.stdout
    assert rows(out, "loss") == rows(tmp_path / "ref", "loss")


def test_zero3_one_process_without_a_launcher(odd_val, tmp_path):
    """`--sharding zero3` in one plain process used to fail after the reference pass (DeepSpeed looked for MPI:
    ModuleNotFoundError mpi4py); it now runs in a process group of one, like fsdp2, and trains like no sharding.
    On CPU it says before DeepSpeed starts that its shared-memory comm op is not built (gloo carries ZeRO-3)."""
    root, cache, kw = odd_val
    res = train(tmp_path / "z1", cache, *kw, "--batch_size", "4", "--sharding", "zero3", timeout=300)
    assert_close(torch.tensor(rows(tmp_path / "z1", "loss")), torch.tensor(rows(root / "one", "loss")), atol=1e-5,
                 rtol=0)
    assert_close(torch.tensor(rows(tmp_path / "z1", "eval/loss")), torch.tensor(rows(root / "one", "eval/loss")),
                 atol=1e-5, rtol=0)
    assert "deepspeed_shm_comm" in res.stdout
    assert "Building extension module" not in res.stdout + res.stderr


def test_fsdp2_resume_skips_a_shard_damaged_at_the_same_size(runs, tmp_path):
    """A DCP shard overwritten at the same size stopped --resume with a PytorchStreamReader traceback.
    The manifest (written by rank 0 after every rank's shards are on disk) names every rank's shard
    with its sha256, so the damaged checkpoint is skipped with the reason and the resume from the one
    before reproduces the uninterrupted run."""
    root, cache, kw, _ = runs
    run = tmp_path / "two"
    shutil.copytree(root / "two", run)
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"step-{step}"
        listed = json.loads((ckpt / "manifest.json").read_text())["files"]
        on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"}
        assert set(listed) == on_disk
        assert len([k for k in listed if k.endswith(".distcp")]) == 2  # both ranks' shards
    shard = sorted((run / "checkpoints" / "step-4" / "dcp").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    n = min(64 << 10, len(data) - mid)
    data[mid : mid + n] = bytes(n)
    shard.write_bytes(bytes(data))
    shutil.rmtree(run / "final")
    res = train(run, cache, *kw, "--batch_size", "2", "--sharding", "fsdp2", "--save_every", "2", "--resume", procs=2)
    assert f"skipping damaged checkpoint {run / 'checkpoints' / 'step-4'}: dcp/{shard.name} does not hold" in res.stdout
    assert "resumed from" in res.stdout and "step-2 at step 2" in res.stdout
    assert rows(run, "loss") == rows(root / "two", "loss")
    a, b = load_file(str(root / "two" / "final" / "model.safetensors")), load_file(str(run / "final" /
                                                                                     "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_memory_command_at_tiny_scale(tmp_path):
    """`workbench memory` end to end on a tiny Llama: the plain row and fsdp2 on 1 and 2 processes, a record per
    rank, the table's ratios computed from the records, the weights removed once measured, and a run that fails
    (here a ZeRO-3 run given a timeout it cannot meet) kept as a row that says so while the others go on."""
    from inspo_core.config import load_config
    from workbench.memory import MemoryConfig, run_memory

    out = tmp_path / "memory"
    cfg = load_config(MemoryConfig, None, dict(hidden=32, layers=2, intermediate=64, heads=4, vocab=1000, engines=["fsdp2"],
                                               procs=[1, 2], steps=1, rows=4, output_dir=str(out),
                                               cache_dir=str(tmp_path / "cache")))
    rows = run_memory(cfg)
    assert [(r["engine"], r["processes"]) for r in rows] == [("none", 1), ("fsdp2", 1), ("fsdp2", 2)]
    for r in rows:
        rec = json.loads((out / f"{r['engine']}-{r['processes']}" / "memory.json").read_text())
        assert len(rec["ranks"]) == r["processes"] and rec["phases"] == ["load", "reference", "setup", "train", "save"]
        assert r["peak_mb"] == max(rank["save"] for rank in rec["ranks"]) > 100
        assert not (out / f"{r['engine']}-{r['processes']}" / "final").exists()  # measured, then removed
        assert rec["cpu_malloc"] == ("trim" if r["engine"] == "none" else "mmap")  # auto
    table = (out / "memory.md").read_text()
    base = rows[0]["peak_mb"]
    assert f"| fsdp2 | 2 | {rows[2]['peak_mb']:.0f} | {rows[2]['peak_mb'] / base:.2f} |" in table
    failing = load_config(MemoryConfig, None, {**dataclasses.asdict(cfg), "engines": ["zero3"], "procs": [1],
                                               "timeout_s": 1, "resume": True})
    rows = run_memory(failing)
    assert rows[0]["peak_mb"] == base  # reused
    assert rows[1] == {"engine": "zero3", "processes": 1, "failed": "the run did not finish within 1 s"}
