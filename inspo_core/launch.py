"""What the launcher asked for: the engine and precision an `accelerate launch --config_file` chose.

`accelerate launch` does not pass its config file to the processes it starts; it translates it into
environment variables (accelerate/utils/launch.py, 1.15):

- every launch: `ACCELERATE_MIXED_PRECISION` (`no`, `fp16`, `bf16`, `fp8`; `no` when the file names none);
- `distributed_type: DEEPSPEED`: `ACCELERATE_USE_DEEPSPEED=true`, `ACCELERATE_DEEPSPEED_ZERO_STAGE` (from
  `deepspeed_config.zero_stage`, or the JSON named by `ACCELERATE_DEEPSPEED_CONFIG_FILE`), and
  `ACCELERATE_GRADIENT_CLIPPING`, `ACCELERATE_GRADIENT_ACCUMULATION_STEPS`, `ACCELERATE_DEEPSPEED_ZERO3_INIT`
  when the file sets them;
- `distributed_type: FSDP`: `ACCELERATE_USE_FSDP=true` and `FSDP_VERSION` (`fsdp_config.fsdp_version`, "1"
  when absent);
- `MULTI_GPU` (DDP) sets neither; torchrun sets no `ACCELERATE_*` variable at all.

`resolve_launch(cfg)` turns `sharding: auto` and `bf16: null` into the launcher's choice, refuses a
`sharding` that contradicts it, and returns the notes worth a line in the log.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Launcher:
    engine: str | None  # the engine its config names; None: none named (DDP, torchrun, no launcher)
    mixed_precision: str | None  # its mixed_precision; None: not launched by accelerate
    source: str  # what it is, for messages
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.source + (f", mixed_precision {self.mixed_precision}" if self.mixed_precision else "")


def _true(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "false").strip().lower() in ("true", "1", "yes")


def read_launcher(env: Mapping[str, str] | None = None) -> Launcher:
    """The launcher's choices from the environment it gave this process (`os.environ` by default)."""
    env = os.environ if env is None else env
    mp = env.get("ACCELERATE_MIXED_PRECISION")
    mp = mp.strip().lower() if mp else None
    if _true(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if stage is None and file and file != "none":
            try:
                stage = json.loads(open(file).read()).get("zero_optimization", {}).get("stage")
            except (OSError, ValueError) as e:
                raise ValueError(f"the launcher's deepspeed_config_file {file} cannot be read: {e}") from None
        stage = str(stage) if stage is not None else "2 (accelerate's default: the config names no zero_stage)"
        source = f"accelerate launcher config (distributed_type DEEPSPEED, zero_stage {stage})"
        if stage != "3":
            raise ValueError(f"the {source}: the workbench's DeepSpeed engine is ZeRO-3; set deepspeed_config.zero_stage: "
                             "3 in the launcher's config (configs/accelerate/zero3.yaml), or launch with "
                             "configs/accelerate/ddp.yaml for no sharding")
        notes = []
        if _true(env, "ACCELERATE_DEEPSPEED_ZERO3_INIT"):
            notes.append("the launcher's zero3_init_flag true is not used: the reference pass runs on whole weights "
                         "before the policy is partitioned")
        return Launcher("zero3", mp, source, tuple(notes))
    if _true(env, "ACCELERATE_USE_FSDP"):
        version = env.get("FSDP_VERSION", "1")
        source = f"accelerate launcher config (distributed_type FSDP, fsdp_version {version})"
        if version != "2":
            raise ValueError(f"the {source}: the workbench shards with FSDP2 only; set fsdp_config.fsdp_version: 2 in "
                             "the launcher's config (configs/accelerate/fsdp2.yaml)")
        return Launcher("fsdp2", mp, source, ("the launcher's fsdp_config sets only the engine: the workbench shards "
                                              "per decoder layer itself (its other fsdp_* keys are not used)",))
    if mp is not None:
        return Launcher(None, mp, "accelerate launcher config (no sharding engine named)")
    return Launcher(None, None, "no accelerate launcher config")


def resolve_launch(cfg, env: Mapping[str, str] | None = None):
    """(cfg with `sharding` and `bf16` resolved, the launcher, notes for the log). A `sharding` that names another
    engine than the launcher's config, or a precision the workbench cannot train in, is a ValueError naming both."""
    launcher = read_launcher(env)
    notes = list(launcher.notes)
    sharding = cfg.sharding
    if sharding == "auto":
        sharding = launcher.engine or "none"
    elif launcher.engine is not None and sharding != launcher.engine:
        raise ValueError(f"sharding={sharding!r} contradicts the {launcher.source}, which selects {launcher.engine!r}: "
                         f"drop --sharding (the launcher's config chooses the engine), or launch with a config for "
                         f"{sharding!r} (configs/accelerate/{'ddp' if sharding == 'none' else sharding}.yaml)")
    env = os.environ if env is None else env
    if launcher.engine == "zero3":  # the workbench's own settings drive DeepSpeed's
        for key, mine, name in (("ACCELERATE_GRADIENT_CLIPPING", cfg.max_grad_norm, "max_grad_norm"),
                                ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", cfg.grad_accum, "grad_accum")):
            theirs = env.get(key)
            if theirs not in (None, "", "auto", "none") and float(theirs) != float(mine):
                notes.append(f"the launcher's {key.removeprefix('ACCELERATE_').lower()} {theirs} is not used: "
                             f"{name}={mine} (the workbench's config)")
    bf16 = cfg.bf16
    mp = launcher.mixed_precision
    if bf16 is None:
        if mp not in (None, "no", "bf16"):
            raise ValueError(f"the {launcher.source} asks mixed_precision {mp}; the workbench trains in bf16 or fp32: "
                             "set mixed_precision: bf16 or no in the launcher's config, or pass --bf16 true/false")
        bf16 = mp == "bf16"
    elif mp is not None and (mp == "bf16") != bf16:
        notes.append(f"bf16={str(bf16).lower()} (the workbench's config) wins over the launcher's mixed_precision {mp}")
    return dataclasses.replace(cfg, sharding=sharding, bf16=bf16), launcher, notes
