"""The CUDA path, on one GPU: skipped where there is none. `scripts/gpu_check.sh` runs this module, then the
0.5b bench with TRL, as the prepared check of a GPU machine.

Every expected value is computed here, independently: the padded path against tree packing on the GPU, the GPU
against the CPU in fp32, bf16 against fp32 within bf16's precision, and the sharded engines on one GPU (NCCL)
against the plain process.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from conftest import PLAIN_EXAMPLES
from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.scoring import score_views
from inspo_core.strategies import L_GIVEN_L, L_GIVEN_W, L_PLAIN, W_GIVEN_L, W_PLAIN

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]
ALL = [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W, L_GIVEN_L]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 comparisons in true fp32 (no TF32 matmuls)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def pairs_of(tokenizer, fmt="template"):
    b = ConditioningBuilder(tokenizer, BuilderConfig(fmt, max_length=256, alpha_draft=0.5), ALL)
    return b.build_all(PLAIN_EXAMPLES * 2)[0]


def on(model, device, tree: bool):
    from inspo_core.tree_attention import use_tree_attention

    m = copy.deepcopy(model).to(device)
    if tree:
        assert use_tree_attention(m)
    return m


@pytest.mark.parametrize("fmt", ["sep", "raw", "template"])
def test_tree_equals_padded_and_the_cpu(tokenizer, tiny_model, fmt):
    pairs = pairs_of(tokenizer, fmt)
    with torch.no_grad():
        cpu = score_views(tiny_model, pairs, ALL, packing="padded", pad_id=tokenizer.pad_token_id).logps
        padded = score_views(on(tiny_model, "cuda", False), pairs, ALL, packing="padded",
                             pad_id=tokenizer.pad_token_id).logps
        tree = score_views(on(tiny_model, "cuda", True), pairs, ALL, packing="tree", pad_id=tokenizer.pad_token_id).logps
    for v in ALL:
        assert padded[v].device.type == "cuda"
        assert_close(tree[v], padded[v], atol=1e-4, rtol=1e-5, msg=str(v))
        assert_close(padded[v].cpu(), cpu[v], atol=1e-4, rtol=1e-5, msg=str(v))


def test_tree_gradients_equal_padded(tokenizer, tiny_model):
    pairs = pairs_of(tokenizer)
    grads = []
    for tree in (False, True):
        m = on(tiny_model, "cuda", tree).train()
        out = score_views(m, pairs, [W_GIVEN_L, L_GIVEN_W], packing="tree" if tree else "padded").logps
        (out[W_GIVEN_L] - 0.5 * out[L_GIVEN_W]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], atol=1e-4, rtol=1e-4, msg=n)


def test_bf16_autocast_within_its_precision(tokenizer, tiny_model):
    """Summed log-probs under bf16 autocast against fp32: bf16 keeps 8 bits of mantissa, so each token's
    log-prob is off by ~1e-2 relative; a sequence's sum within 3% of its size."""
    pairs = pairs_of(tokenizer)
    m = on(tiny_model, "cuda", True)
    with torch.no_grad():
        fp32 = score_views(m, pairs, ALL, packing="tree").logps
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = score_views(m, pairs, ALL, packing="tree", mask_dtype=torch.bfloat16).logps
    for v in ALL:
        assert torch.isfinite(bf16[v]).all()
        assert ((bf16[v].float() - fp32[v]).abs() <= 0.03 * fp32[v].abs() + 0.05).all(), (v, bf16[v], fp32[v])


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_trainer_on_the_gpu_fp32_and_bf16(tmp_path, cache_dir):
    from inspo_core.config import TrainConfig, load_config
    from inspo_core.trainer import train

    toy = str(ROOT / "examples" / "toy_preferences.jsonl")
    runs = {}
    for bf16 in (False, True):
        out = tmp_path / f"bf16-{bf16}"
        cfg = load_config(TrainConfig, None, dict(model="tiny", data=toy, lr=1e-3, max_length=96, batch_size=4,
                                                  max_steps=4, val_size=8, output_dir=str(out), cache_dir=cache_dir,
                                                  tiny_hidden=32, bf16=bf16, packing="tree"))
        train(cfg)
        runs[bf16] = _losses(out)
        memory = json.loads((out / "memory.json").read_text())
        assert memory["measure"].startswith("CUDA max_memory_allocated"), memory["measure"]
        assert 0 < memory["peak_mb"] < 2048
    assert len(runs[False]) == len(runs[True]) == 4
    assert all(abs(a - b) < 0.02 for a, b in zip(runs[False], runs[True])), runs


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_engines_on_one_gpu_equal_the_plain_process(tmp_path, cache_dir, engine):
    """One process per GPU over NCCL (torchrun, world size 1 here): the engine's wrap, clipping, checkpoint and
    final/ on CUDA, with the losses of the plain process."""
    from test_sharding import train as launch

    plain = launch(tmp_path / "none", Path(cache_dir), "--max_steps", "3", "--sharding", "none")
    sharded = launch(tmp_path / engine, Path(cache_dir), "--max_steps", "3", "--sharding", engine, "--save_every", "3",
                     procs=1, entry=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "workbench"))
    assert plain.returncode == 0 and sharded.returncode == 0, sharded.stderr[-3000:]
    assert_close(torch.tensor(_losses(tmp_path / engine)), torch.tensor(_losses(tmp_path / "none")), atol=1e-4,
                 rtol=1e-4)
    assert (tmp_path / engine / "final" / "model.safetensors").exists()
