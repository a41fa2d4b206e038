"""Sharded load and streamed save (inspo_core.shard_io): each rank reads only its slices of the checkpoint, the
sharded model equals the whole one, and the tensor-by-tensor file is the safetensors that transformers reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import free_port
from inspo_core import shard_io
from inspo_core.models import load_model, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tied Llama whose sizes do not divide by 2 or 4 (vocab 101, intermediate 80 rows, 3 layers)."""
    path = tmp_path_factory.mktemp("sio") / "model"
    tiny_llama(101, hidden_size=40, num_layers=3, num_heads=4, tie_word_embeddings=True).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 3])
def test_shards_read_from_the_files_equal_the_whole_model(saved, tmp_path, procs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                          str(free_port()), str(ROOT / "tests" / "shard_io_probe.py"), str(saved), str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(procs)]
    whole = got[0]["whole_bytes"]
    assert all(g["max_abs_diff"] == 0 and g["logits_diff"] == 0 and g["tied"] for g in got)
    # every byte of the checkpoint read once, by the rank whose shard holds it, and no rank more than its share
    # (dim 0 of every tensor splits in chunks of ceil(rows / procs))
    assert sum(g["bytes_read"] for g in got) == whole
    assert max(g["bytes_read"] for g in got) <= whole / procs * 1.15
    # the streamed file is the model transformers saved: same names, same values, tie restored on load
    a, b = load_model(str(saved), dtype=torch.float32), load_model(str(tmp_path / "streamed"), dtype=torch.float32)
    assert b.lm_head.weight is b.model.embed_tokens.weight
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sorted(load_file(str(tmp_path / "streamed" / "model.safetensors"))) == sorted(load_file(str(saved /
                                                                                              "model.safetensors")))


def test_streamed_writer_matches_safetensors_own(tmp_path):
    """One process, mixed dtypes and a 0-d tensor: the hand-laid file reads back with safetensors' reader as
    the tensors it was given, with the `format: pt` metadata transformers checks."""
    lm = tiny_llama(64, hidden_size=16, num_layers=1, num_heads=2)
    lm.model.norm.weight.data = lm.model.norm.weight.data.to(torch.bfloat16)
    lm.register_buffer("step", torch.tensor(7, dtype=torch.int64))
    shard_io.write_streamed(lm, tmp_path, is_main=True)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    want = {k: v for k, v in lm.state_dict().items()}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert (tmp_path / "config.json").is_file()


def test_fill_shards_without_sharding_is_a_plain_load(saved):
    lm = shard_io.empty_model(saved)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied again after the meta build
    shard_io.materialize(lm, "cpu")
    assert shard_io.fill_shards(lm, saved) == sum(t.numel() * 4 for t in shard_io.unique_tensors(lm).values())
    whole = load_model(str(saved), dtype=torch.float32)
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, whole(ids).logits)  # rotary tables kept through materialize


def test_a_checkpoint_with_other_names_is_not_streamed(saved, tmp_path):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((saved / "config.json").read_text())
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["transformer.wte.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(renamed / "model.safetensors"))
    why = shard_io.streamable(renamed, shard_io.empty_model(renamed))
    assert "missing ['model.embed_tokens.weight']" in why and "extra ['transformer.wte.weight']" in why
    assert shard_io.streamable(saved, shard_io.empty_model(saved)) == ""
    assert "no safetensors" in shard_io.streamable(tmp_path, shard_io.empty_model(saved))
