"""`workbench bench`'s settings and model presets, apart from the benchmark so that `bench --help` and a
config's errors come without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from inspo_core.config import opt

PRESETS = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": (64, 2, 4, 4, 128, 1000),
    "cpu-small": (256, 4, 4, 4, 688, 32000),
    "0.5b": (1024, 24, 16, 16, 2816, 32000),
    "smollm2": (576, 30, 9, 3, 1536, 49152),  # SmolLM2-135M's architecture (random weights, no download)
}
TIED = {"smollm2"}  # presets whose LM head is the embedding matrix


@dataclass
class BenchConfig:
    preset: str = opt("cpu-small", "model size: tiny (tests), cpu-small (~20M params), smollm2 (SmolLM2-135M's "
                      "architecture, tied embeddings) or 0.5b (~0.5B, for GPUs)", choices=list(PRESETS))
    lora_r: int = opt(0, "LoRA rank on every linear layer of the body (0: full fine-tuning)")
    vocab: int | None = opt(None, "override the preset's vocabulary (e.g. 128256 for a Llama-3 vocabulary)")
    lengths: str = opt("fixed", "fixed: every prompt prompt_len and every response response_len tokens; realistic: "
                       "prompts 16-256 and responses 20-400 tokens (log-uniform, chosen and rejected apart) within "
                       "max_length, with TRL's DPOTrainer as a peer row", choices=["fixed", "realistic"])
    prompt_len: int = opt(128, "fixed lengths: prompt tokens")
    response_len: int = opt(64, "fixed lengths: tokens of each response")
    max_length: int = opt(512, "realistic lengths: the builder's (and TRL's) max_length")
    n_batches: int = opt(4, "realistic lengths: distinct batches, each step takes the next")
    trl: bool = opt(True, "realistic lengths: add TRL's DPOTrainer (precomputed reference) when trl is installed")
    context_format: str = opt("sep", "layout of the alternative (raw lets tree packing share it)",
                              choices=["sep", "raw"])
    batch_size: int = opt(8, "pairs per step")
    steps: int = opt(3, "timed steps per configuration per round")
    rounds: int = opt(2, "rounds; configurations are interleaved within a round")
    warmup: int = opt(1, "untimed steps per configuration first")
    strategies: list = opt(["none", "symmetric", "averaged"], "strategies to run")
    packings: list = opt(["padded", "tree"], "packings to run")
    references: list = opt(["cached", "live"], "reference: cached log-probs, or a frozen model run every step")
    tree_attention: str = opt("segments", "tree packing's attention: per tree segment (the trainer's), or a dense "
                              "[N, N] mask over each packed row", choices=["segments", "dense"])
    gradient_checkpointing: bool = opt(False, "recompute each layer's activations in the backward (the trainer's "
                                       "--gradient_checkpointing)")
    device: str = opt("auto", "auto, cpu or cuda")
    bf16: bool = opt(False, "bf16 weights and compute (CUDA)")
    memory: bool = opt(True, "measure peak memory (CPU: one child process per configuration)")
    seed: int = opt(0, "seed of the model and the data")
    profile: bool = opt(False, "print where one step of each configuration spends its time (torch profiler)")
    json: str | None = opt(None, "also write the rows to this JSON file")
    sweep: list = opt([], "a length sweep: these response lengths (prompts half as long, fixed lengths, the "
                      "batch as given), one bench per length; rows keep their length, and with --json a plotly "
                      "figure is written beside it (.html): executed-FLOP MFU and peak memory against tokens")
    only: str | None = opt(None, "internal: run one configuration strategy/packing/reference and print its peak memory")
