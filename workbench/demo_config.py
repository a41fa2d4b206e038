"""Settings of `python -m workbench demo` (one dataclass for every world: a world's own defaults come
from its class in `inspo_core.worlds`), and the training config every demo run is built from."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from inspo_core.config import TrainConfig, opt
from inspo_core.rundir import RunDir
from inspo_core.names import OBJECTIVE_SPECS as OBJECTIVES, STRATEGY_SPECS as STRATEGIES
from inspo_core.worlds.base import world_class, world_names


@dataclass
class DemoConfig:
    world: str = opt("token", "token: a synthetic world with a tiny LM (minutes); sentiment: SmolLM2-135M-Instruct "
                     "with a VADER oracle (see docs/sentiment.md for its measured time)", choices=world_names())
    family: str | None = opt(None, "preference family (token: cyclic, bradley_terry, salience; sentiment: "
                             "bradley_terry, salience); default cyclic / bradley_terry")
    n_contexts: int = opt(4, "token world: prompts")
    n_items: int = opt(6, "token world: items a response can name")
    strength: float | None = opt(None, "sharpness of the preferences (default 3 / 4)")
    world_seed: int = opt(0, "seed of the world (token: preferences, pi_gen, pi_ref init; sentiment: prompt split)")
    seeds: list | None = opt(None, "training seeds, default 0-4 / 0-2 (token worlds re-sample pairs per seed)")
    objectives: list = opt(["dpo"], "objectives to train")
    strategies: list = opt(["none", "symmetric"], "strategies to compare")
    w: float = opt(0.5, "weight of the symmetric term of the `averaged` strategy")
    n_pairs: int = opt(2000, "token world: labelled pairs sampled from pi_ref per seed")
    max_steps: int | None = opt(None, "optimizer steps per run (default 375 / 30)")
    batch_size: int | None = opt(None, "pairs per step (default 16 / 8)")
    lr: float | None = opt(None, "peak learning rate (default 3e-4 / 1e-3 for LoRA)")
    beta: float | None = opt(None, "objective beta (default 0.5 / 0.1)")
    betas: list | None = opt(None, "several betas: every objective x strategy x seed is trained at each (the "
                             "reward-KL frontier); default: [beta]")
    lora: int | None = opt(None, "LoRA rank, 0 for full fine-tuning (default 0 / 16)")
    packing: str | None = opt(None, "padded or tree (default padded / tree)", choices=["padded", "tree"])
    context_format: str | None = opt(None, "how the alternative is shown (default sep / template)",
                                     choices=["sep", "raw", "template"])
    max_length: int | None = opt(None, "maximum tokens of one training sequence (default 96 / 192)")
    alpha_draft: float | None = opt(0.4, "cap on the context response as a fraction of max_length (null: none)")
    pretrain_steps: int = opt(300, "token world: steps of pre-training that make pi_ref")
    n_eval: int | None = opt(None, "opponents y' ~ pi_ref per prompt when estimating V (default 300 / 16)")
    samples: int = opt(4, "sentiment world: samples per prompt of each measured policy, each compared with every "
                       "opponent")
    n_train_subjects: int = opt(60, "sentiment world: subjects whose 3 prompts are for training (the other subjects' "
                                "prompts are held out)")
    n_eval_prompts: int | None = opt(None, "sentiment world: held-out prompts evaluated (default: all)")
    pairs_per_prompt: int = opt(2, "sentiment world: labelled pairs per training prompt")
    max_new_tokens: int = opt(48, "sentiment world: answer length cap (tokens)")
    kl_samples: int = opt(4, "sentiment world: samples per prompt at T = 1 for the KL / frontier estimate")
    val_pairs: int = opt(24, "sentiment world: pairs held out for the validation loss")
    frontier_checkpoint: bool | None = opt(None, "sentiment world: also measure the mid-training checkpoint (a second "
                                           "frontier point per run); default: when several betas are trained")
    temperature: float = opt(0.7, "sampling temperature of every evaluated policy, pi_ref's row included (paper: 0.7)")
    top_p: float = opt(0.95, "nucleus sampling of every evaluated policy (paper: 0.95)")
    reflective: bool = opt(True, "also measure pi(.|x, y') with y' from pi_ref (the conditioned class)")
    fast: bool = opt(False, "a small configuration for CI and a first look (minutes)")
    output_dir: str = opt("runs/demo", "where runs, summary.json and report.html go")
    overwrite: bool = opt(False, "replace an earlier demo's runs and report in output_dir")
    resume: bool = opt(False, "continue an interrupted demo in output_dir: finished and evaluated runs of the same "
                       "settings are reused, an interrupted run continues from its last checkpoint (or starts again)")
    cache_dir: str = opt(".cache/inspo", "pi_ref, pairs and reference log-probs cache")

    def __post_init__(self):
        problems = []
        world = world_class(self.world)
        for k, v in world.demo_defaults.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        bad = sorted(set(self.objectives) - set(OBJECTIVES))
        if bad:
            problems.append(f"objectives {bad} unknown; valid: {', '.join(OBJECTIVES)}")
        bad = sorted(set(self.strategies) - set(STRATEGIES))
        if bad:
            problems.append(f"strategies {bad} unknown; valid: {', '.join(STRATEGIES)}")
        if self.family not in world.families:
            problems.append(f"family={self.family!r} in the {self.world} world; valid: {', '.join(world.families)}")
        if not self.seeds:
            problems.append("seeds must name at least one seed")
        elif len(set(map(int, self.seeds))) != len(self.seeds):
            problems.append(f"seeds {self.seeds} repeat a seed")
        self.betas = [float(b) for b in (self.betas or [self.beta])]
        if self.frontier_checkpoint is None:
            self.frontier_checkpoint = len(self.betas) > 1
        if any(not b > 0 for b in self.betas) or len(set(self.betas)) != len(self.betas):
            problems.append(f"betas {self.betas} must be distinct numbers > 0")
        if self.samples < 1 or self.kl_samples < 1:
            problems.append("samples and kl_samples must be >= 1")
        if problems:
            raise ValueError("invalid DemoConfig:\n  - " + "\n  - ".join(problems))
        self.seeds = [int(s) for s in self.seeds]
        if self.fast:
            world.fast(self)


def run_name(cfg: DemoConfig, objective: str, strategy: str, seed: int, beta: float) -> str:
    """`<objective>-<strategy>-s<seed>`, with `-b<beta>` before the seed when the demo trains several betas."""
    return f"{objective}-{strategy}" + (f"-b{beta:g}" if len(cfg.betas) > 1 else "") + f"-s{seed}"


def run_config(cfg: DemoConfig, objective: str, strategy: str, seed: int, model: str | Path, data: str | Path,
               beta: float | None = None, **extra) -> TrainConfig:
    """The TrainConfig of one demo run, `<output_dir>/<run_name>`; `extra` holds the world's own
    settings (validation, evaluation and checkpoint cadence)."""
    beta = cfg.betas[0] if beta is None else beta
    return TrainConfig(model=str(model), data=str(data), objective=objective, strategy=strategy, seed=seed, w=cfg.w,
                       beta=beta, lr=cfg.lr, batch_size=cfg.batch_size, max_steps=cfg.max_steps, lora=cfg.lora,
                       packing=cfg.packing, context_format=cfg.context_format, max_length=cfg.max_length,
                       alpha_draft=cfg.alpha_draft, dedup=False,
                       output_dir=str(Path(cfg.output_dir) / run_name(cfg, objective, strategy, seed, beta)),
                       cache_dir=cfg.cache_dir, overwrite=cfg.overwrite, **extra)


def output_check(cfg: DemoConfig) -> None:
    """A demo writes into an empty output_dir, or replaces (--overwrite) or continues (--resume) one."""
    out = Path(cfg.output_dir)
    if cfg.overwrite and cfg.resume:
        raise ValueError("--overwrite and --resume contradict each other: --resume continues the demo in "
                         f"{out}, --overwrite deletes it; pass one")
    if cfg.resume or cfg.overwrite:
        return
    if (out / "summary.json").exists() or any(RunDir(d).artifacts() for d in out.glob("*") if d.is_dir()):
        raise ValueError(f"{out} holds an earlier demo; pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --output_dir")


def train_and_evaluate(cfg: DemoConfig, run: TrainConfig, settings: dict, evaluate: Callable[[Path], dict],
                       log=print) -> tuple[Path, dict]:
    """One demo run: train, evaluate `final/` with `evaluate(run_dir)` (a dict of results), record
    eval.json: the checkpoint's identity, `settings` (everything the numbers depend on besides the
    weights) and the results, side by side.

    With --resume, what an interrupted demo left is picked up: a run whose eval.json belongs to this
    `final/` and these settings is not touched; a finished run whose evaluation is missing or was made
    with other settings is evaluated again; an interrupted run continues from its last checkpoint
    or, with none saved, starts again. A run made with another config is refused, naming the keys."""
    from inspo_core.evaluate import describe_checkpoint, write_json
    from inspo_core.models import is_model_dir
    from inspo_core.launch import resolve_launch
    from inspo_core.plan import check_resume_config
    from inspo_core.trainer import train

    rd = RunDir(run.output_dir)
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from eval.json
    trained = False
    if cfg.resume and rd.artifacts():
        check_resume_config(resolve_launch(run)[0], rd.read_config() or None, rd.config_path)
        if is_model_dir(rd.final):  # a saved model, or a LoRA run's adapter
            identity = describe_checkpoint(rd.final)
            stored = json.loads(rd.eval_json.read_text()) if rd.eval_json.is_file() else {}
            if stored.get("fingerprint") == identity["fingerprint"] and all(
                    k in stored and stored[k] == v for k, v in settings.items()):
                log(f"    reused: {rd.path} (trained and evaluated with these settings)")
                return rd.path, {k: v for k, v in stored.items() if k not in identity and k not in settings}
            log(f"    {rd.path} is trained; evaluating it" + (" again (other settings)" if stored else ""))
            trained = True
        else:  # continue from the last checkpoint; with none saved, this run starts afresh
            run = dataclasses.replace(run, resume=True, overwrite=True)
    if not trained:
        rd = RunDir(train(run).run_dir)
    results = evaluate(rd.path)
    write_json(rd.eval_json, {**describe_checkpoint(rd.final), **settings, **results})
    return rd.path, results
