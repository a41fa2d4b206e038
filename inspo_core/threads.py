"""torch's CPU threads follow the cores other processes leave free (issue 25, "robust to a busy machine").

Measured on this project's 2-core machine (docs/performance.md, "Training beside another job"): two jobs
that each run torch's default 2 threads slow down more than 12x, because OpenMP's threads spin while
they wait for a partner that the other job has taken the core from; with one thread each, both run at
about 1.5x their time alone. So a CPU job here re-reads, between steps, how much of the machine other
processes use and runs with the rest:

    threads = clamp(round(cores - others), 1, cores)

`others` is the busy time of the whole machine (/proc/stat) minus this process's own CPU time
(getrusage, every thread of it) over the last interval, in cores. Two jobs that both do this settle on
one thread each; the one left alone goes back to all cores at its next check.

The choice is the user's when they made one: `INSPO_THREADS=N`, or
OMP_NUM_THREADS in the environment (which launchers such as torchrun set per process), fixes the count.
`INSPO_THREADS=auto` (the default) follows the machine on Linux CPUs; elsewhere nothing changes.

What a change costs: a parallel sum adds in another order at another thread count, so the last bits of
a run can differ from the same run at a fixed count (within float32 noise: `tests/test_threads.py`
trains with the count alternating every step). A run that must repeat bit for bit (an exact resume
compared with an uninterrupted run, as the test suite does) fixes the count with INSPO_THREADS=N; each
step's count is in metrics.jsonl (`threads`).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Callable

INTERVAL_S = 15.0  # between two looks at the machine: long against a training step's own noise


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def machine_busy_s() -> float | None:
    """Seconds of CPU time all processes have used since boot (/proc/stat: every state but idle and
    iowait), or None where /proc/stat is not readable (not Linux)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU time of this process, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def threads_for(cores: int, others: float, most: int | None = None) -> int:
    """The thread count for a machine of `cores` where other processes keep `others` cores busy, at most
    `most` (torch's own default: it counts physical cores where `cores` counts hardware threads)."""
    return int(min(most or cores, cores, max(1, round(cores - others))))


def fixed_threads(environ=os.environ) -> int | None:
    """The user's own thread count (INSPO_THREADS=N, else OMP_NUM_THREADS), None for auto. A bad value
    is an error naming the variable."""
    raw = environ.get("INSPO_THREADS", "auto").strip().lower()
    if raw not in ("", "auto"):
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"INSPO_THREADS={raw!r}: give a positive number of threads, or 'auto'")
        return int(raw)
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) >= 1 else None


class ThreadGovernor:
    """Sets torch's intra-op threads at `tick()` (call it where a change is safe: between training steps
    or generate calls) from the cores other processes left free over the last `interval_s`. The readers
    are arguments so that tests can stand in for the machine."""

    def __init__(self, *, interval_s: float = INTERVAL_S, cores: int | None = None,
                 machine: Callable[[], float | None] = machine_busy_s, own: Callable[[], float] = own_cpu_s,
                 clock: Callable[[], float] = time.monotonic, set_threads: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None):
        import torch

        self.interval_s, self.cores = interval_s, cores or usable_cores()
        self.machine, self.own, self.clock = machine, own, clock
        self.set_threads = set_threads or torch.set_num_threads
        self.log = log
        self.most = torch.get_num_threads()  # torch's default, never exceeded
        self.threads = self.most
        self.changes = 0
        self._last = self._read()

    def _read(self):
        busy = self.machine()
        return None if busy is None else (self.clock(), busy, self.own())

    def tick(self) -> int:
        """The thread count now (changed when the interval has passed and the machine asks for another)."""
        if self._last is None:
            return self.threads
        t, busy, own = self._last
        if self.clock() - t < self.interval_s:
            return self.threads
        now = self._read()
        if now is None:
            return self.threads
        dt = now[0] - t
        others = max(0.0, (now[1] - busy) - (now[2] - own)) / dt if dt > 0 else 0.0
        self._last = now
        want = threads_for(self.cores, others, self.most)
        if want != self.threads:
            self.set_threads(want)
            if self.log is not None:
                self.log(f"torch threads {self.threads} -> {want}: other processes kept {others:.1f} of "
                         f"{self.cores} cores busy over the last {dt:.0f} s (INSPO_THREADS=N fixes the count)")
            self.threads, self.changes = want, self.changes + 1
        return self.threads


class _Fixed:
    """What `governor()` returns when the count is the user's (or the machine cannot be read)."""

    def __init__(self, threads: int | None):
        self.threads = threads

    def tick(self) -> int | None:
        return self.threads


_GOVERNOR = None


def governor(log: Callable[[str], None] | None = None):
    """The process's governor, made at the first call: fixed (and applied to torch once) when the user
    chose a count, following the machine otherwise (Linux), inert where /proc/stat is unreadable."""
    global _GOVERNOR
    if _GOVERNOR is None:
        import torch

        n = fixed_threads()
        if n is not None:
            torch.set_num_threads(n)
            _GOVERNOR = _Fixed(n)
        elif machine_busy_s() is None:
            _GOVERNOR = _Fixed(None)
        else:
            _GOVERNOR = ThreadGovernor(log=log)
    return _GOVERNOR
