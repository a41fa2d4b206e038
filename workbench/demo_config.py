"""Settings of `python -m workbench demo`, shared by the token-world and the sentiment-world demos,
and the training config every demo run is built from."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from inspo_core.config import TrainConfig, opt
from inspo_core.rundir import RunDir
from inspo_core.objectives import OBJECTIVES
from inspo_core.strategies import STRATEGIES
from inspo_core.worlds.preferences import FAMILIES
from inspo_core.worlds.sentiment import FAMILIES as SENTIMENT_FAMILIES

WORLDS = ("token", "sentiment")
# settings whose default depends on the world (None in DemoConfig means "the world's default")
WORLD_DEFAULTS = {
    "token": dict(seeds=[0, 1, 2, 3, 4], family="cyclic", strength=3.0, max_steps=375, batch_size=16, lr=3e-4, beta=0.5, max_length=96,
                  n_eval=300, lora=0, context_format="sep"),
    # a chat model: the alternative goes inside the assistant turn as text (template); `sep` would fall back
    # to the end-of-turn token as separator, after which the model ends its turn
    "sentiment": dict(seeds=[0, 1, 2], family="bradley_terry", strength=4.0, max_steps=30, batch_size=8, lr=1e-3, beta=0.1,
                      max_length=192, n_eval=2, lora=16, context_format="template"),
}


@dataclass
class DemoConfig:
    world: str = opt("token", "token: a synthetic world with a tiny LM (minutes); sentiment: SmolLM2-135M-Instruct "
                     "with a VADER oracle (about 52 min on 2 CPU cores with the default none, symmetric x 3 seeds)", choices=list(WORLDS))
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
    lora: int | None = opt(None, "LoRA rank, 0 for full fine-tuning (default 0 / 16)")
    packing: str = opt("padded", "padded or tree", choices=["padded", "tree"])
    context_format: str | None = opt(None, "how the alternative is shown (default sep / template)",
                                     choices=["sep", "raw", "template"])
    max_length: int | None = opt(None, "maximum tokens of one training sequence (default 96 / 192)")
    alpha_draft: float | None = opt(0.4, "cap on the context response as a fraction of max_length (null: none)")
    pretrain_steps: int = opt(300, "token world: steps of pre-training that make pi_ref")
    n_eval: int | None = opt(None, "opponent samples per prompt when estimating V (default 300 / 2)")
    n_train_prompts: int = opt(180, "sentiment world: training prompts (the rest are held out)")
    n_eval_prompts: int = opt(32, "sentiment world: held-out prompts evaluated")
    pairs_per_prompt: int = opt(2, "sentiment world: labelled pairs per training prompt")
    max_new_tokens: int = opt(48, "sentiment world: answer length cap (tokens)")
    kl_samples: int = opt(1, "sentiment world: samples per prompt at T = 1 for the KL / frontier estimate")
    val_pairs: int = opt(24, "sentiment world: pairs held out for the validation loss")
    frontier_checkpoint: bool = opt(True, "sentiment world: also measure the mid-training checkpoint (frontier)")
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
        if self.world not in WORLDS:
            raise ValueError(f"invalid DemoConfig: world={self.world!r}; valid: {', '.join(WORLDS)}")
        for k, v in WORLD_DEFAULTS[self.world].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        bad = sorted(set(self.objectives) - set(OBJECTIVES))
        if bad:
            problems.append(f"objectives {bad} unknown; valid: {', '.join(OBJECTIVES)}")
        bad = sorted(set(self.strategies) - set(STRATEGIES))
        if bad:
            problems.append(f"strategies {bad} unknown; valid: {', '.join(STRATEGIES)}")
        families = FAMILIES if self.world == "token" else SENTIMENT_FAMILIES
        if self.family not in families:
            problems.append(f"family={self.family!r} in the {self.world} world; valid: {', '.join(families)}")
        if not self.seeds:
            problems.append("seeds must name at least one seed")
        self.seeds = [int(s) for s in self.seeds]
        if problems:
            raise ValueError("invalid DemoConfig:\n  - " + "\n  - ".join(problems))
        if self.fast:
            self.seeds = self.seeds[:2]
            if self.world == "token":
                self.n_pairs = min(self.n_pairs, 800)
                self.max_steps = min(self.max_steps, 120)
                self.n_eval = min(self.n_eval, 150)
            else:
                self.strategies = self.strategies[:2]
                self.seeds = self.seeds[:1]
                self.n_train_prompts = min(self.n_train_prompts, 24)
                self.n_eval_prompts = min(self.n_eval_prompts, 8)
                self.max_steps = min(self.max_steps, 6)
                self.max_new_tokens = min(self.max_new_tokens, 24)
                self.val_pairs = min(self.val_pairs, 4)
                self.frontier_checkpoint = False


def run_config(cfg: DemoConfig, objective: str, strategy: str, seed: int, model: str | Path, data: str | Path,
               **extra) -> TrainConfig:
    """The TrainConfig of one demo run, `<output_dir>/<objective>-<strategy>-s<seed>`; `extra` holds
    the world's own settings (validation, evaluation and checkpoint cadence)."""
    return TrainConfig(model=str(model), data=str(data), objective=objective, strategy=strategy, seed=seed, w=cfg.w,
                       beta=cfg.beta, lr=cfg.lr, batch_size=cfg.batch_size, max_steps=cfg.max_steps, lora=cfg.lora,
                       packing=cfg.packing, context_format=cfg.context_format, max_length=cfg.max_length,
                       alpha_draft=cfg.alpha_draft, dedup=False,
                       output_dir=str(Path(cfg.output_dir) / f"{objective}-{strategy}-s{seed}"),
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
    from inspo_core.plan import check_resume_config
    from inspo_core.trainer import train

    rd = RunDir(run.output_dir)
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from eval.json
    trained = False
    if cfg.resume and rd.artifacts():
        check_resume_config(run, rd.read_config() or None, rd.config_path)
        if (rd.final / "config.json").is_file():
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
