"""`python -m workbench <command>`: each command is one config dataclass and one function.

Flags are generated from the dataclass fields (`--max_steps 4`), applied over `--config FILE`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    from inspo_core.config import field_types

    parser.add_argument("--config", help="YAML file with keys of this command; flags override it")
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")  # argparse formats with %
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if types[f.name] is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(f"--{f.name}", **kw)


def config_from_args(cls, args: argparse.Namespace):
    from inspo_core.config import load_config

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    return load_config(cls, args.config, overrides)


# name -> (help, "module:ConfigDataclass", "module:function" run with the config). Both are imported
# by name, so the command line depends on no front-end (the app's modules load only for `app`).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("the main job: DPO vs INS-DPO end to end in a synthetic world with an exact oracle (CPU, minutes)",
             "workbench.demo_config:DemoConfig", "workbench.demo:run_demo"),
    "train": ("one training run (also under `accelerate launch -m workbench train ...`)",
              "inspo_core.config:TrainConfig", "workbench.train:run_train"),
    "eval": ("sample from checkpoints and a baseline, judge them, write eval.json", "inspo_core.eval_config:EvalConfig",
             "workbench.evaluation:run_eval"),
    "protocol": ("the paper's Table 2 protocol: AlpacaEval LC/WR, Arena-Hard WR/SC, MT-Bench, one table",
                 "workbench.protocol_config:ProtocolConfig", "workbench.protocol:run_protocol"),
    "sweep": ("a grid of training runs sharing the reference cache", "workbench.sweep:SweepConfig",
              "workbench.sweep:run_sweep"),
    "transfer": ("the transfer study: does INS-DPO's reflection reach the deployed policy? (capacity x world grid)",
                 "workbench.transfer:TransferConfig", "workbench.transfer:run_transfer"),
    "compare": ("a table and plots over runs", "workbench.sweep:CompareConfig", "workbench.sweep:run_compare"),
    "bench": ("the performance benchmark: strategies x packing x reference, side by side",
              "workbench.bench_config:BenchConfig", "workbench.bench:run_bench"),
    "memory": ("peak memory per process of whole training runs: one process, and each engine on 1, 2, 4 processes",
               "workbench.memory:MemoryConfig", "workbench.memory:run_memory"),
    "app": ("the Gradio app: arena, batch comparison, training dashboard (127.0.0.1 by default)",
            "apps.config:AppConfig", "apps.arena:launch"),
    "models": ("the models known by name (smollm2) and GGUF files, made into local checkpoints",
               "workbench.models:ModelsConfig", "workbench.models:run_models"),
    "serve": ("an OpenAI-compatible chat-completions endpoint for a checkpoint", "workbench.serve_config:ServeConfig",
              "workbench.serve:serve"),
    "merge": ("a LoRA run's adapter folded into its base model, written as one plain checkpoint",
              "workbench.merge:MergeConfig", "workbench.merge:run_merge"),
}


def resolve(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def run_command(target: str, cfg) -> None:
    resolve(target)(cfg)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `only`, the flags of that command alone (its config module is the only one
    imported, so `python -m workbench --help` and `<command> --help` do not load torch for every command)."""
    parser = argparse.ArgumentParser(prog="python -m workbench", description="InSPO Workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, cls, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            add_config_args(p, resolve(cls))
    return parser


def named_command(argv: list[str]) -> str:
    """The command argv names (its first word), or "" when it names none (`--help`, nothing)."""
    return argv[0] if argv and argv[0] in COMMANDS else ""


def die_with_launcher() -> None:
    """A worker started by a launcher (torchrun, accelerate launch, deepspeed: LOCAL_RANK or TORCHELASTIC_RUN_ID
    set) exits when the launcher dies. A launcher killed with SIGKILL forwards nothing, and its workers, each in
    a session of its own, used to keep training (or wait in a collective) as orphans. On Linux the kernel sends
    this process SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls the
    parent's pid."""
    import os

    if "LOCAL_RANK" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import signal

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) == 0:
                if os.getppid() != parent or parent == 1:  # the launcher died before the request took effect
                    os.kill(os.getpid(), signal.SIGTERM)
                return
        except (OSError, AttributeError):
            pass
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=named_command(argv))
    args = parser.parse_args(argv)  # --help exits here, before torch or transformers are imported
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    _, cls, target = COMMANDS[args.command]
    cls = resolve(cls)
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
