"""Run under torchrun: a model saved whole, loaded into FSDP2 shards by `inspo_core.shard_io` (meta build, each
rank reading its slices), checked against the whole model, then written back tensor by tensor.

usage: torchrun --nproc_per_node N tests/shard_io_probe.py SAVED_MODEL_DIR OUT_DIR
Writes OUT_DIR/rank{r}.json: {"max_abs_diff": ..., "logits_diff": ..., "bytes_read": ..., "whole_bytes": ...}
and OUT_DIR/streamed/ (config + model.safetensors) from the main process.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from inspo_core import shard_io
from inspo_core.models import load_model
from inspo_core.sharding import decoder_layers


def main(saved: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out_dir = Path(out)
    whole = load_model(saved, dtype=torch.float32).eval()
    lm = shard_io.empty_model(saved)
    assert shard_io.streamable(saved, lm) == "", shard_io.streamable(saved, lm)
    assert all(p.is_meta for p in lm.parameters())
    for layer in decoder_layers(lm):
        fully_shard(layer)
    fully_shard(lm)
    shard_io.materialize(lm, "cpu")
    read = shard_io.fill_shards(lm, saved)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    ref = shard_io.unique_tensors(whole)
    diffs = [float((shard_io._whole(t) - ref[n]).abs().max()) for n, t in shard_io.unique_tensors(lm).items()]
    ids = torch.randint(0, whole.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    lm.eval()
    with torch.no_grad():
        logits_diff = float((lm(ids).logits - whole(ids).logits).abs().max())
    streamed = out_dir / "streamed"
    if rank == 0:
        streamed.mkdir(parents=True)
    dist.barrier()
    shard_io.write_streamed(lm, streamed, rank == 0)
    whole_bytes = sum(t.numel() * t.element_size() for t in ref.values())
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "max_abs_diff": max(diffs), "logits_diff": logits_diff, "bytes_read": read, "whole_bytes": whole_bytes,
        "tied": tied}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
