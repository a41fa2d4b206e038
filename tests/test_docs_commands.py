"""Every shell command the README and docs/ show runs as written.

Each command in a fenced block of README.md or docs/*.md (and each command in a code span of the README's
table) is checked against the project: `python -m workbench ...` parses with the real command line and its
config loads and validates (flags exist, values are accepted, `--config` files load), an `accelerate launch`
config file is read by accelerate itself, files named by `pip install -r`, `jupyter lab` and pytest exist.
Commands that run in seconds or a minute at tiny scale are then executed, with only a tiny model, few steps
and a scratch directory substituted. The others must say in the text why they are not run here (a trailing
comment naming a GPU, hours, minutes or a server), so a renamed flag or a moved file fails CI either way.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("python -m ", "accelerate launch", "torchrun", "pip install", "jupyter ")
# a command not executed here carries a comment saying why (GPU, hours, minutes, server)
TOY = str(ROOT / "examples" / "toy_preferences.jsonl")
REASON = re.compile(r"#.*\b(GPU|GPUs|hours?|minutes?|min|server|browser)\b", re.I)


FENCED: list[tuple[str, str, str]] = []  # every command in a fenced block, repeats included


def _commands() -> list[tuple[str, str, str]]:
    """(page, command, trailing comment) for every command shown."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").split("\n"):
                line = line.strip()
                if line.startswith(STARTS):
                    cmd, _, comment = line.partition("  #") if "  #" in line else (line, "", "")
                    cmd = re.sub(r"\s+", " ", cmd).strip()
                    FENCED.append((page.name, cmd, comment.strip()))
                    if not any(cmd == c for _, c, _ in found):  # shown twice, checked once
                        found.append((page.name, cmd, comment.strip()))
        if page.name == "README.md":  # the table of uses: commands in code spans
            for span in re.findall(r"`([^`\n]+)`", text):
                if span.startswith(STARTS) and len(span.split()) > 2 and not any(span in c for _, c, _ in found):
                    found.append((page.name, span, "table"))
    return found


COMMANDS = _commands()


def _parts(cmd: str) -> list[list[str]]:
    return [shlex.split(p) for p in cmd.split("&&")]


def _workbench_argv(argv: list[str]) -> list[str] | None:
    """The workbench's own arguments of `python -m workbench ...`, `torchrun ... -m workbench ...` or
    `accelerate launch ... -m workbench ...`; None for other programs."""
    if argv[:3] == ["python", "-m", "workbench"]:
        return argv[3:]
    if argv[0] in ("torchrun", "accelerate") and "-m" in argv:
        i = argv.index("-m")
        return argv[i + 2:] if argv[i + 1] == "workbench" else None
    return None


def _parse_workbench(argv: list[str]):
    """The command's config as the CLI would build it (flags, --config file and validation included)."""
    from workbench.cli import COMMANDS as CLI, build_parser, config_from_args, resolve

    if "--help" in argv or "-h" in argv:
        return None
    args = build_parser().parse_args(argv)
    return config_from_args(resolve(CLI[args.command][1]), args)


def test_the_docs_show_commands_and_the_readme_starts_with_the_two():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert blocks[:2] == ["pip install -r requirements.txt && python -m workbench demo\n",
                          "pip install -r requirements-dev.txt && python -m pytest -q tests\n"]
    assert len(COMMANDS) >= 15, [c for _, c, _ in COMMANDS]


@pytest.mark.parametrize("page,cmd,comment", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c, _ in COMMANDS])
def test_every_command_shown_parses_against_the_project(page, cmd, comment, capsys):
    assert "..." not in cmd, f"{page}: a placeholder in a command users copy: {cmd!r}; name a real file"
    for argv in _parts(cmd):
        if argv[:2] == ["pip", "install"]:
            for i, a in enumerate(argv):
                if a == "-r":
                    assert (ROOT / argv[i + 1]).is_file(), f"{page}: {argv[i + 1]} does not exist"
                if a == "-e":
                    assert (ROOT / argv[i + 1] / "pyproject.toml").is_file()
            continue
        if argv[:2] == ["jupyter", "lab"]:
            assert list((ROOT / argv[2]).glob("*.ipynb")), f"{page}: no notebooks in {argv[2]}"
            continue
        if argv[:3] == ["python", "-m", "pytest"]:
            assert all((ROOT / a).exists() for a in argv[3:] if not a.startswith("-")), cmd
            continue
        if argv[:2] == ["accelerate", "launch"]:
            from accelerate.commands.config.config_args import load_config_from_file

            cfg_file = argv[argv.index("--config_file") + 1]
            assert (ROOT / cfg_file).is_file(), f"{page}: {cfg_file} does not exist"
            load_config_from_file(str(ROOT / cfg_file))  # accelerate's own reader
        wb = _workbench_argv(argv)
        assert wb is not None, f"{page}: a command this test has no rule for: {cmd!r}; add one"
        _parse_workbench(wb)
    capsys.readouterr()


# ---- executed at tiny scale -------------------------------------------------------------------------
def _tiny(argv: list[str], scratch: Path) -> list[str] | None:
    """The workbench arguments with a tiny model, few steps and a scratch directory substituted, or None
    when the command is not one this test runs (it then needs a stated reason in the text)."""
    if "--help" in argv:
        return argv
    command, rest = argv[0], argv[1:]
    out = ["--output_dir", str(scratch / "out")]
    if command == "train":  # a tiny model on the toy pairs at a short length: the rest is the command's own
        return [command, *rest, *out, "--model", "tiny", "--data", TOY, "--eval_data", "null", "--val_size", "8",
                "--max_response_tokens", "null", "--min_response_tokens", "null", "--max_length", "64", "--tiny_hidden", "32",
                "--tiny_layers", "2", "--max_steps", "2", "--eval_every", "1", "--save_every", "2",
                "--cache_dir", str(scratch / "cache")]
    if command == "demo":
        cfg = _parse_workbench(argv)
        if cfg.world != "token":
            return None
        return [command, *rest, "--fast", *out, "--cache_dir", str(scratch / "cache")]
    if command == "bench":
        cfg = _parse_workbench(argv)
        if cfg.preset == "0.5b":
            return None
        extra = ["--preset", "tiny", "--steps", "1", "--rounds", "1", "--warmup", "0", "--n_batches", "1",
                 "--memory", "false", "--trl", "false", "--strategies", "none,symmetric"]
        if cfg.json:
            extra += ["--json", str(scratch / "bench.json")]
        return [command, *[a for a in rest if a not in ("--json", cfg.json)], *extra]
    return None


def _plan(page: str, cmd: str, comment: str, scratch: Path):
    """[argv to execute] for the command, or the reason it is not executed."""
    runs = []
    for argv in _parts(cmd):
        wb = _workbench_argv(argv)
        if wb is None:
            continue  # pip, jupyter, pytest: checked above, and the suite itself is the pytest command
        tiny = _tiny(wb, scratch)
        if tiny is None:
            return None
        if argv[0] == "accelerate":  # the launcher's own config, on 2 CPU processes
            from conftest import free_port

            launcher = argv[2: argv.index("-m")]
            runs.append([sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
                         "--main_process_port", str(free_port()), "-m", "workbench", *tiny])
        elif argv[0] == "torchrun":
            launcher = argv[: argv.index("-m")]
            runs.append([sys.executable, "-m", "torch.distributed.run", *launcher[1:], "-m", "workbench", *tiny])
        else:
            runs.append([sys.executable, "-m", "workbench", *tiny])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("page,cmd,comment", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c, _ in COMMANDS])
def test_every_command_shown_runs_at_tiny_scale_or_says_why_not(page, cmd, comment, tmp_path):
    runs = _plan(page, cmd, comment, tmp_path)
    if runs is None and comment == "table":  # a table cannot carry a comment: the docs show it with its reason
        shown = [c for p, c, why in FENCED if p != "README.md" and REASON.search("#" + why)]
        assert any(cmd in c for c in shown), f"README's table: {cmd!r} is not run by the tests and no docs page shows it with a reason"
        pytest.skip("not run here: shown in docs/ with its reason")
    if runs is None:
        assert REASON.search("#" + comment), (
            f"{page}: {cmd!r} is not run by the tests; say why in the text (a trailing comment naming a GPU, "
            f"hours, minutes or a server) or give this test a tiny-scale rule for it")
        pytest.skip(f"not run here: {comment}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for argv in runs:
        res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, f"{page}: {' '.join(argv)}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        if "accelerate.commands.launch" in argv:  # the engine and precision are the launcher config's
            import yaml

            launch_cfg = yaml.safe_load((ROOT / argv[argv.index("--config_file") + 1]).read_text())
            want = {"DEEPSPEED": "zero3", "FSDP": "fsdp2"}.get(launch_cfg["distributed_type"], "none")
            run_cfg = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
            assert run_cfg["sharding"] == want, (cmd, run_cfg["sharding"])
            asked = _parse_workbench(_workbench_argv(shlex.split(cmd))).bf16  # the command's own, else the launcher's
            assert run_cfg["bf16"] == (asked if asked is not None else launch_cfg.get("mixed_precision") == "bf16")


def _script_commands() -> list[tuple[str, list[str]]]:
    """(script, argv) of each `python -m workbench` or `python -m pytest` line of scripts/*.sh (after a `timeout N`),
    with the shell's $VARIABLES as placeholders."""
    found = []
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        for line in script.read_text().replace("\\\n", " ").splitlines():
            line = re.sub(r"\$\{?\w+\}?", "VAR", line.split("|")[0]).replace("2>&1", "").strip()
            argv = shlex.split(line) if line.startswith(("python -m", "timeout")) else []
            if argv[:1] == ["timeout"]:
                argv = argv[2:]
            if argv[:3] in (["python", "-m", "workbench"], ["python", "-m", "pytest"]):
                found.append((script.name, argv))
    return found


def test_the_scripts_commands_parse_against_the_project(capsys):
    """scripts/gpu_check.sh runs only on a GPU machine; its commands still parse here, so a renamed flag or a
    moved test file fails CI."""
    found = _script_commands()
    assert {s for s, _ in found} >= {"gpu_check.sh"} and len(found) >= 2, found
    for script, argv in found:
        if argv[2] == "pytest":
            files = [a for a in argv[3:] if a.endswith(".py")]
            assert files and all((ROOT / f).is_file() for f in files), (script, argv)
        else:
            _parse_workbench(argv[3:])
    capsys.readouterr()


SCRIPTS = sorted({m for page in PAGES for m in re.findall(r"\bscripts/[\w-]+\.(?:py|sh)\b", page.read_text())})


def test_the_docs_name_scripts():
    assert "scripts/memory_by_tokens.py" in SCRIPTS and "scripts/threads_beside.sh" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_the_docs_name_exists_and_a_python_one_answers_help(script):
    """Measurement scripts are run as `PYTHONPATH=. python scripts/X.py ...` (not the commands above): each one a
    page names exists, and a Python one's command line loads (its imports and arguments) with `--help`."""
    path = ROOT / script
    assert path.is_file(), f"{script} is named in the docs but does not exist"
    if path.suffix == ".py":
        res = subprocess.run([sys.executable, str(path), "--help"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert res.returncode == 0 and "usage" in res.stdout, (script, res.stderr[-2000:])
