"""Peak resident memory of one forward + backward of the log-prob engine (run as a subprocess).

usage: python tests/memory_probe.py METHOD VOCAB SEQ_LEN CHUNK_MB -> prints the peak RSS growth in MB
"""

import ctypes
import sys

import torch

from inspo_core.logps import sequence_logps
from inspo_core.models import tiny_llama
from inspo_core.trainer import peak_rss_mb


def fix_mmap_threshold() -> None:
    """Serve every allocation over 1 MiB by mmap so a freed tensor leaves RSS at once.

    glibc raises its mmap threshold after the first large free and then keeps freed blocks in the
    heap, so peak RSS would measure allocator hoarding rather than live tensors.
    """
    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)


def peak_mb() -> float:
    return peak_rss_mb()  # VmHWM: ru_maxrss would include the parent's peak across fork + exec


def main(method: str, vocab: int, seq_len: int, chunk_mb: float) -> None:
    fix_mmap_threshold()
    torch.manual_seed(0)
    model = tiny_llama(vocab, hidden_size=64, num_layers=1, num_heads=4, max_positions=seq_len)
    input_ids = torch.randint(0, vocab, (1, seq_len))
    mask = torch.ones_like(input_ids)
    target = torch.zeros_like(input_ids, dtype=torch.bool)
    target[:, 1:] = True
    # warm up allocator and kernels on a short sequence so the baseline includes them
    sequence_logps(model, input_ids[:, :8], mask[:, :8], target[:, :8], method=method, chunk_mb=chunk_mb).sum.sum().backward()
    model.zero_grad(set_to_none=False)
    base = peak_mb()
    out = sequence_logps(model, input_ids, mask, target, method=method, chunk_mb=chunk_mb)
    out.sum.sum().backward()
    print(f"{peak_mb() - base:.1f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
