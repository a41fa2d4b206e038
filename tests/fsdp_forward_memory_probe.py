"""Resident memory of no-grad forwards through an FSDP2-sharded model (run under torchrun, CPU, gloo).

usage: torchrun --nproc_per_node 2 tests/fsdp_forward_memory_probe.py MODEL_DIR [MMAP_THRESHOLD_BYTES]

Loads MODEL_DIR into the shards as the trainer does (inspo_core.shard_io), then prints rank 0's (VmRSS, VmHWM)
in MB after loading, after each of 3 no-grad forwards, after resharding every FSDP module, and after
glibc's malloc_trim. With MMAP_THRESHOLD_BYTES, glibc serves every allocation above it by mmap (M_MMAP_THRESHOLD),
so freed buffers leave the resident set at once.
"""

import ctypes
import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

from inspo_core import shard_io
from inspo_core.logps import TokenLogps
from inspo_core.sharding import decoder_layers


def rss() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) // 1024, int(status["VmHWM"].split()[0]) // 1024


def main(model_dir: str, mmap_threshold: str | None = None) -> None:
    libc = ctypes.CDLL("libc.so.6")
    if mmap_threshold:
        libc.mallopt(-3, int(mmap_threshold))  # M_MMAP_THRESHOLD
    dist.init_process_group("gloo")
    say = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    lm = shard_io.empty_model(model_dir)
    scorer = TokenLogps(lm)
    layers = list(decoder_layers(lm))
    for layer in layers:
        fully_shard(layer)
    fully_shard(scorer)
    shard_io.materialize(scorer, "cpu")
    shard_io.fill_shards(lm, model_dir)
    say("loaded", rss(), flush=True)
    ids = torch.randint(0, lm.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(0))
    rows, cols = torch.arange(2).repeat_interleave(59), torch.arange(59).repeat(2)
    scorer.eval()
    first = {"on": True}
    def after(k):
        def hook(module, args, output):  # returns None: the output stays the layer's
            if first["on"] and k % 4 == 0:
                say(f"  after layer {k}", rss(), flush=True)
        return hook

    for k, layer in enumerate(layers):  # rank 0's resident set after each layer of the first forward
        layer.register_forward_hook(after(k))
    with torch.no_grad():
        for i in range(3):
            if i == 1:
                first["on"] = False
            scorer(ids, torch.ones_like(ids), rows, cols)
            say("forward", i, rss(), flush=True)
    for m in scorer.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    gc.collect()
    say("resharded", rss(), flush=True)
    libc.malloc_trim(0)
    say("trimmed", rss(), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
