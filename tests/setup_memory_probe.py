"""Resident memory around the reference pass of a sharded run's setup (run under torchrun).

usage: [MALLOC_MMAP_THRESHOLD_=1048576] torchrun --standalone --nproc_per_node 2 tests/setup_memory_probe.py \
           MODEL_DIR SCRATCH_DIR
Builds `Trainer(...).setup()` for 2 steps of symmetric DPO under FSDP2 on MODEL_DIR (the `workbench memory`
settings) and prints each rank's (VmRSS, VmHWM) in MB after `prepare`, around every reference computation
and after setup. glibc's environment variable MALLOC_MMAP_THRESHOLD_ fixes its mmap threshold (it is dynamic
by default, and freed buffers below it stay in the process's heaps).
"""

import sys

import inspo_core.plan as plan
import inspo_core.trainer as trainer
from inspo_core.config import TrainConfig


def rss() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) // 1024, int(status["VmHWM"].split()[0]) // 1024


def traced(module, name: str):
    inner = getattr(module, name)

    def call(*a, **k):
        print(f"before {name}", rss(), flush=True)
        out = inner(*a, **k)
        print(f"after {name}", rss(), flush=True)
        return out

    setattr(module, name, call)


def main(model_dir: str, scratch: str) -> None:
    traced(plan, "compute_ref_logps")
    traced(trainer, "prepare")
    traced(trainer, "score_pending_reference")
    cfg = TrainConfig(model=model_dir, data="examples/toy_preferences.jsonl", max_rows=8, val_size=0, max_length=64,
                      batch_size=1, grad_accum=1, max_steps=2, output_dir=f"{scratch}/run", cache_dir=f"{scratch}/cache",
                      sharding="fsdp2", overwrite=True)
    trainer.Trainer(cfg).setup()
    print("after setup", rss(), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
