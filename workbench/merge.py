"""`python -m workbench merge`: a LoRA run's adapter folded into its base model, as one plain HF checkpoint.

LoRA runs write only the adapter to `final/` and `best/` (peft's format; every workbench tool opens it
over its base). This writes the merged model when one is wanted elsewhere (another framework, a hub upload).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inspo_core.config import opt


@dataclass
class MergeConfig:
    adapter: str = opt("", "a LoRA adapter directory: a run's final/ or best/, a checkpoint, or a run directory")
    output_dir: str = opt("", "where the merged model is written (default: <adapter>-merged beside it)")
    overwrite: bool = opt(False, "replace an existing output_dir")


def run_merge(cfg: MergeConfig, log=print) -> Path:
    import torch

    from inspo_core.atomic import atomic_path
    from inspo_core.models import adapter_base, is_adapter_dir, load_model, load_tokenizer
    from inspo_core.rundir import model_dir

    if not cfg.adapter:
        raise ValueError("merge needs --adapter DIR (a LoRA run's final/, best/ or the run directory)")
    src = model_dir(cfg.adapter)
    if not is_adapter_dir(src):
        raise ValueError(f"{src} holds a whole model, not a LoRA adapter (adapter_config.json): nothing to merge")
    out = Path(cfg.output_dir) if cfg.output_dir else src.with_name(src.name + "-merged")
    if out.exists() and not cfg.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it, or choose another --output_dir")
    log(f"merging the adapter {src} into its base {adapter_base(src)}")
    model = load_model(str(src), dtype=torch.float32)
    tok = load_tokenizer(str(src))
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    log(f"merged model: {out}")
    return out
