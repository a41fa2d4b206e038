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


SHARED_PROBE = ".shared-dir-probe"


def check_shared_directory(procs: Processes, path, what: str = "run directory") -> None:
    """Every process must see the main process's `path` (a directory): a file the main process writes there is
    read back by all of them after a barrier. With node-local disks a rank would otherwise write its checkpoint
    shards where no other node sees them, and node 0's checkpoint would look complete holding part of the state.
    Raises ValueError on every rank when any rank does not see it. A no-op in one process."""
    import os
    import secrets
    from pathlib import Path

    if procs.num_processes == 1:
        return
    probe = Path(path) / SHARED_PROBE
    nonce = secrets.token_hex(16)
    if procs.is_main_process:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(nonce)
    # the nonce travels over the process group, not the disk, so every rank knows what it should read
    sent = [nonce if procs.is_main_process else None]
    dist.broadcast_object_list(sent, src=0)
    try:
        seen = probe.read_text() == sent[0]
    except OSError:
        seen = False
    views = [None] * procs.num_processes
    dist.all_gather_object(views, (procs.process_index, os.uname().nodename, str(Path(path).resolve()), seen))
    procs.wait_for_everyone()
    if procs.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [v for v in views if not v[3]]
    if blind:
        who = ", ".join(f"rank {r} on {host} ({p})" for r, host, p, _ in blind)
        raise ValueError(
            f"{len(blind)} of {procs.num_processes} processes do not see the main process's {what} {path}: a file "
            f"rank 0 wrote there is missing or different for {who}. Every node must see the same {what} (each "
            "rank writes its own checkpoint shards into it): put output_dir on a filesystem shared by all nodes "
            "(NFS, Lustre, the cluster's shared scratch)")
