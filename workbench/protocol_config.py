"""`workbench protocol`'s settings, apart from the protocol's code so that `protocol --help` and a config's
errors come without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from inspo_core.config import opt
from inspo_core.names import GRADER_NAMES as GRADERS
from inspo_core.names import JUDGE_NAMES


@dataclass
class ProtocolConfig:
    checkpoints: list = opt([], "checkpoint directories (a run directory means its final/)")
    baseline: str = opt("ref", "'ref' (the run's starting model, pi_ref in worlds), a checkpoint directory, or "
                               "'answers': the fixed baseline answers the prompt rows carry ('output', as AlpacaEval's "
                               "GPT-4 answers, or 'baseline'); MT-Bench then has no baseline row")
    alpaca_eval: str = opt("world", "AlpacaEval prompts: 'world', a file, or the hub name 'alpaca_eval' (online)")
    arena_hard: str = opt("world", "Arena-Hard prompts: 'world', a file, or 'arena_hard' (online)")
    mt_bench: str = opt("world", "MT-Bench questions: 'world', a .jsonl with 'turns' (and optional 'reference'), "
                                 "or 'mt_bench' (online)")
    judge: str = opt("oracle", "pairwise judge (AlpacaEval, Arena-Hard)", choices=list(JUDGE_NAMES))
    grader: str | None = opt(None, "MT-Bench grader: oracle, llm or http (default: the judge's kind; reward_model "
                                   "has no grader)")
    judge_model: str | None = opt(None, "judge LM directory (judge or grader llm)")
    judge_url: str | None = opt(None, "OpenAI-compatible base URL (judge or grader http; default INSPO_JUDGE_BASE_URL)")
    judge_name: str | None = opt(None, "the judge server's model name (default INSPO_JUDGE_MODEL)")
    n_samples: int = opt(1, "answers per prompt from each model for AlpacaEval and Arena-Hard (the benchmarks: 1)")
    mt_samples: int = opt(1, "answers per MT-Bench question (the benchmark: 1)")
    mt_opponents: int = opt(16, "grader oracle: pi_ref opponents each answer is scored against")
    temperature: float = opt(0.7, "sampling temperature (paper: 0.7)")
    top_p: float = opt(0.95, "nucleus sampling (paper: 0.95)")
    max_new_tokens: int = opt(64, "generation length cap (the benchmarks' models answer at up to 2048+)")
    grader_max_tokens: int = opt(2048, "grader http/llm: tokens of the grader's reply")
    seed: int = opt(0, "sampling seed (the same for every model)")
    n_boot: int = opt(500, "bootstrap resamples for every interval")
    output: str = opt("runs/protocol.json", "output JSON; the table goes beside it as .md, judgements and grades "
                                            "as <stem>.judgements.jsonl and <stem>.grades.jsonl")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code")
    cache_dir: str = opt(".cache/inspo", "where named models and world opponents are kept")

    def __post_init__(self):
        problems = []
        if not self.checkpoints:
            problems.append("protocol needs at least one checkpoint: --checkpoints runs/a,runs/b")
        if self.grader is not None and self.grader not in GRADERS:
            problems.append(f"grader={self.grader!r} is not one of: {', '.join(GRADERS)}")
        if self.grader is None and self.judge not in GRADERS:
            problems.append(f"judge={self.judge} has no single-answer grader: set --grader to one of {', '.join(GRADERS)}")
        for k in ("n_samples", "mt_samples", "mt_opponents", "n_boot"):
            if getattr(self, k) < 1:
                problems.append(f"{k}={getattr(self, k)} must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))
