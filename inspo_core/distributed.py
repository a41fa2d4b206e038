"""Who am I among the training processes: rank, world size, barrier and sums, from torch.distributed.

accelerate answers these for DDP, but with DeepSpeed on CPU its state reports one process and
process index 0 on every rank while DeepSpeed's own world holds them all (FACTS): every rank then
believed it was the main process. `Processes` wraps an Accelerator and answers from the process group
whenever one exists; everything else is the Accelerator's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Processes:
    def __init__(self, accelerator):
        self._acc = accelerator

    def __getattr__(self, name):
        return getattr(self._acc, name)

    @property
    def accelerator(self):
        return self._acc

    @property
    def num_processes(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else self._acc.num_processes

    @property
    def process_index(self) -> int:
        return dist.get_rank() if dist.is_initialized() else self._acc.process_index

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum", reduction
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    def main_process_first(self):
        return _MainFirst(self)


class _MainFirst:
    """The main process runs the block first (e.g. fills a cache), the others after it."""

    def __init__(self, procs: Processes):
        self.procs = procs

    def __enter__(self):
        if not self.procs.is_main_process:
            self.procs.wait_for_everyone()

    def __exit__(self, *exc):
        if self.procs.is_main_process:
            self.procs.wait_for_everyone()
        return False
