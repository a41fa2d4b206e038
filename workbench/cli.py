"""`python -m workbench <command>`: each command is one config dataclass and one function.

Flags are generated from the dataclass fields (`--max_steps 4`), applied over `--config FILE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from inspo_core.config import TrainConfig, field_types, load_config
from apps.config import AppConfig
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


def cmd_train(args) -> int:
    from inspo_core.trainer import train

    cfg = config_from_args(TrainConfig, args)
    train(cfg)
    return 0


def cmd_demo(args) -> int:
    from workbench.demo import run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0


def cmd_eval(args) -> int:
    from workbench.evaluation import run_eval

    run_eval(config_from_args(EvalConfig, args))
    return 0


def cmd_sweep(args) -> int:
    from workbench.sweep import run_sweep

    run_sweep(config_from_args(SweepConfig, args))
    return 0


def cmd_compare(args) -> int:
    from workbench.sweep import run_compare

    run_compare(config_from_args(CompareConfig, args))
    return 0


def cmd_serve(args) -> int:
    from workbench.serve import serve

    serve(config_from_args(ServeConfig, args))
    return 0


def cmd_bench(args) -> int:
    from workbench.bench import run_bench

    run_bench(config_from_args(BenchConfig, args))
    return 0


def cmd_app(args) -> int:
    from apps.arena import launch

    launch(config_from_args(AppConfig, args))
    return 0


COMMANDS: dict[str, tuple[str, Any, Callable]] = {
    "demo": ("the main job: DPO vs INS-DPO end to end in a synthetic world with an exact oracle (CPU, minutes)",
             DemoConfig, cmd_demo),
    "train": ("one training run (also under `accelerate launch -m workbench train ...`)", TrainConfig, cmd_train),
    "eval": ("sample from checkpoints and a baseline, judge them, write eval.json", EvalConfig, cmd_eval),
    "sweep": ("a grid of training runs sharing the reference cache", SweepConfig, cmd_sweep),
    "compare": ("a table and plots over runs", CompareConfig, cmd_compare),
    "bench": ("the performance benchmark: strategies x packing x reference, side by side", BenchConfig, cmd_bench),
    "app": ("the Gradio app: arena, batch comparison, training dashboard (127.0.0.1 by default)", AppConfig, cmd_app),
    "serve": ("an OpenAI-compatible chat-completions endpoint for a checkpoint", ServeConfig, cmd_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="InSPO Workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, cls, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if cls is not None:
            add_config_args(p, cls)
        p.set_defaults(func=func, cls=cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    parser = build_parser()
    args = parser.parse_args(argv)
    func = args.func
    del args.func, args.cls
    try:
        return func(args)
    except ValueError as e:  # configuration and data problems: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
