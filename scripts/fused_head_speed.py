"""The frozen LM head with and without recomputation, side by side in one process (docs/performance.md).

    PYTHONPATH=. python scripts/fused_head_speed.py [--strategy symmetric] [--rounds 3] [--steps 2] [--preset smollm2]

The bench's SmolLM2-architecture model (random weights, tied embeddings) with LoRA r16 on every linear layer,
realistic lengths within 192 tokens, 4 pairs per step, tree packing, cached reference: one runner whose head
forms its gradient in the forward (`fused_head=True`, the default) and one that checkpoints it, stepped in
alternating rounds; seconds per step and the FLOPs each executes (FlopCounterMode).
"""

from __future__ import annotations

import argparse
import statistics

from workbench.bench import BenchConfig, Runner, _setup, executed_flops
from workbench.bench_data import Data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="symmetric")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--preset", default="smollm2")
    args = ap.parse_args()
    cfg = BenchConfig(preset=args.preset, lora_r=16, lengths="realistic", max_length=192, batch_size=4, n_batches=2,
                      strategies=[args.strategy], packings=["tree"], references=["cached"], memory=False, trl=False)
    dev, policy, ref = _setup(cfg, live_reference=False)
    batches = Data(cfg, policy.config.vocab_size).batches(args.strategy)
    runners = {}
    for fused in (True, False):
        r = Runner(cfg, args.strategy, "tree", "cached", policy, ref, batches, dev)
        r.scorer.fused_head = fused
        runners[fused] = r
    for r in runners.values():
        r.step()  # warmup
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for fused, r in runners.items():
            times[fused] += r.run(args.steps)
    for fused, r in runners.items():
        name = "fused (no recompute)" if fused else "checkpointed"
        print(f"{name:22s} s/step {statistics.mean(times[fused]):.2f} (min {min(times[fused]):.2f}, "
              f"max {max(times[fused]):.2f}, n {len(times[fused])})  executed {executed_flops(r) / 1e9:.1f} GFLOP")
    print(f"ratio fused / checkpointed: {statistics.mean(times[True]) / statistics.mean(times[False]):.3f}")


if __name__ == "__main__":
    main()
