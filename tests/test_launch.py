"""Real `accelerate launch --config_file configs/accelerate/<x>.yaml --num_processes 2` runs on CPU (gloo): the
launcher's config chooses the engine and precision, a contradicting flag stops before any work, and ranks that
do not share the run directory stop at setup."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import free_port
from test_sharding import _descendants

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "examples" / "toy_preferences.jsonl")


def common(out: Path, cache: Path) -> list[str]:
    return ["--model", "tiny", "--data", TOY, "--max_length", "96", "--val_size", "8", "--cache_dir", str(cache),
            "--tiny_hidden", "32", "--max_steps", "2", "--batch_size", "2", "--output_dir", str(out)]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`cmd` in its own session; on a timeout every process under it is killed and the test fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:
        env.pop(key)  # what this test's own process inherited must not reach the launch
    with tempfile.TemporaryFile("w+") as o, tempfile.TemporaryFile("w+") as e:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{cmd[:6]} did not finish in {timeout:.0f} s")
        o.seek(0), e.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, o.read(), e.read())


def accelerate(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2", "--main_process_port",
            str(free_port()), "-m", "workbench", "train", *args]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("config, engine, final_dtype", [
    ("fsdp2.yaml", "fsdp2", "F32"),  # FSDP2: bf16 autocast over fp32 weights; final/ gathered in fp32
    ("zero3.yaml", "zero3", "BF16"),  # DeepSpeed's bf16 mode holds bf16 weights; final/ is its 16-bit gather
])
def test_the_launchers_config_chooses_engine_and_precision(tmp_path, config, engine, final_dtype):
    """The README's cluster command without --sharding: the yaml's distributed_type picks the engine and its
    mixed_precision (bf16) the precision, both recorded in config.yaml; two steps train on CPU in bf16."""
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    out = tmp_path / engine
    res = run(accelerate(config, *common(out, tmp_path / "cache")))
    assert res.returncode == 0, res.stderr[-3000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["sharding"], recorded["bf16"]) == (engine, True)
    assert recorded["_launch"]["processes"] == 2 and "mixed_precision bf16" in recorded["_launch"]["launcher"]
    assert f"engine {engine}, bf16" in res.stdout
    assert len(losses(out)) == 2 and all(0 < x < 2 for x in losses(out))
    with open(out / "final" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {final_dtype}
    assert load_file(str(out / "final" / "model.safetensors"))  # one plain HF checkpoint


def test_an_explicit_bf16_false_wins_over_the_launcher(tmp_path):
    out = tmp_path / "ddp"
    res = run(accelerate("ddp.yaml", *common(out, tmp_path / "cache"), "--bf16", "false"))
    assert res.returncode == 0, res.stderr[-3000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["sharding"], recorded["bf16"]) == ("none", False)
    assert "bf16=false (the workbench's config) wins over the launcher's mixed_precision bf16" in res.stdout


def test_a_sharding_flag_contradicting_the_launcher_stops_naming_both(tmp_path):
    res = run(accelerate("zero3.yaml", *common(tmp_path / "bad", tmp_path / "cache"), "--sharding", "fsdp2"),
              timeout=120)
    assert res.returncode != 0
    assert ("error: sharding='fsdp2' contradicts the accelerate launcher config (distributed_type DEEPSPEED, zero_stage 3), "
            "which selects 'zero3'") in res.stderr
    # each worker prints the error (the CLI's ValueError line, exit 2); the tracebacks are the launchers' own
    assert not (tmp_path / "bad").exists()  # stopped before anything was written


# every rank gets its own output_dir, as node-local disks would give it
OWN_DIR_PER_RANK = """
import os, sys
from workbench.cli import main
i = sys.argv.index("--output_dir")
sys.argv[i + 1] += f"-rank{os.environ['RANK']}"
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_that_do_not_share_the_run_directory_stop(tmp_path):
    script = tmp_path / "own_dir_per_rank.py"
    script.write_text(OWN_DIR_PER_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), "train", *common(tmp_path / "run", tmp_path / "cache")]
    res = run(cmd, timeout=180)
    assert res.returncode != 0
    assert "1 of 2 processes do not see the main process's run directory" in res.stderr
    assert "rank 1 on" in res.stderr and "shared by all nodes" in res.stderr
    assert not (tmp_path / "run-rank0" / "final").exists()
    # the same two processes sharing one directory train
    i = cmd.index(str(script))
    cmd[i : i + 1] = ["-m", "workbench"]
    res = run(cmd, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
