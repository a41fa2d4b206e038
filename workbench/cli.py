"""`python -m workbench <command>`: each command is one config dataclass and one function.

Flags are generated from the dataclass fields (`--max_steps 4`), applied over `--config FILE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any

from apps.config import AppConfig
from inspo_core.config import TrainConfig, field_types, load_config
from workbench.bench import BenchConfig
from workbench.demo import DemoConfig
from workbench.evaluation import EvalConfig
from workbench.serve import ServeConfig
from workbench.sweep import CompareConfig, SweepConfig


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", help="YAML file with keys of this command; flags override it")
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata.get('help', '')} (default: {default!r})"}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if types[f.name] is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(f"--{f.name}", **kw)


def config_from_args(cls, args: argparse.Namespace):
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    return load_config(cls, args.config, overrides)


# name -> (help, config dataclass, "module:function" run with the config; imported only when used)
COMMANDS: dict[str, tuple[str, Any, str]] = {
    "demo": ("the main job: DPO vs INS-DPO end to end in a synthetic world with an exact oracle (CPU, minutes)",
             DemoConfig, "workbench.demo:run_demo"),
    "train": ("one training run (also under `accelerate launch -m workbench train ...`)", TrainConfig,
              "workbench.train:run_train"),
    "eval": ("sample from checkpoints and a baseline, judge them, write eval.json", EvalConfig,
             "workbench.evaluation:run_eval"),
    "sweep": ("a grid of training runs sharing the reference cache", SweepConfig, "workbench.sweep:run_sweep"),
    "compare": ("a table and plots over runs", CompareConfig, "workbench.sweep:run_compare"),
    "bench": ("the performance benchmark: strategies x packing x reference, side by side", BenchConfig,
              "workbench.bench:run_bench"),
    "app": ("the Gradio app: arena, batch comparison, training dashboard (127.0.0.1 by default)", AppConfig,
            "apps.arena:launch"),
    "serve": ("an OpenAI-compatible chat-completions endpoint for a checkpoint", ServeConfig, "workbench.serve:serve"),
}


def run_command(target: str, cfg) -> None:
    module, func = target.split(":")
    getattr(importlib.import_module(module), func)(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="InSPO Workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, cls, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_args(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    parser = build_parser()
    args = parser.parse_args(argv)
    _, cls, target = COMMANDS[args.command]
    from inspo_core.checkpoint import CheckpointError
    from inspo_core.judges import JudgeError
    from inspo_core.trainer import TrainingError

    try:
        run_command(target, config_from_args(cls, args))
        return 0
    except ValueError as e:  # configuration and data problems: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, JudgeError) as e:  # expected stops: say what happened
        print(f"error: {e}", file=sys.stderr)
        return 1
