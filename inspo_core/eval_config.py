"""`workbench eval`'s settings (also the app's Batch tab's), apart from the pipeline so that `eval --help`
and a config's errors come without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from inspo_core.config import opt
from inspo_core.names import JUDGE_NAMES


@dataclass
class EvalConfig:
    checkpoints: list = opt([], "checkpoint directories (a run directory means its final/)")
    baseline: str = opt("ref", "'ref' (the run's starting model, pi_ref in worlds) or a checkpoint directory")
    prompts: str = opt("world", "'world' (a world's prompts), or a .jsonl with 'prompt' or a .txt, one per line")
    judge: str = opt("oracle", "who decides", choices=list(JUDGE_NAMES))
    judge_model: str | None = opt(None, "reward model or judge LM directory (judge=reward_model or llm)")
    judge_url: str | None = opt(None, "OpenAI-compatible base URL (judge=http; default INSPO_JUDGE_BASE_URL)")
    n_samples: int = opt(20, "responses per prompt from each model")
    temperature: float = opt(0.7, "sampling temperature (paper: 0.7)")
    top_p: float = opt(0.95, "nucleus sampling (paper: 0.95)")
    max_new_tokens: int = opt(64, "generation length cap")
    seed: int = opt(0, "sampling seed (the same for every model)")
    n_boot: int = opt(1000, "bootstrap resamples for the confidence intervals")
    output: str | None = opt(None, "output JSON path (default: win_rates.json in the first checkpoint's run "
                                   "directory; its judgements go next to it in <stem>.judgements.jsonl)")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")
    cache_dir: str = opt(".cache/inspo", "where named models (smollm2) are materialised")

    def __post_init__(self):
        if not self.checkpoints:
            raise ValueError("eval needs at least one checkpoint: --checkpoints runs/a,runs/b")
