"""The main job and the run-level commands, through the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "workbench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = cli("demo", "--fast", "--output_dir", str(out / "runs"), "--cache_dir", str(out / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.mark.slow
def test_demo_fast_end_to_end(demo):
    out, res = demo
    summary = json.loads((out / "runs" / "summary.json").read_text())
    trained = [r for r in summary["runs"] if r["run_dir"]]
    assert {r["strategy"] for r in trained} == {"none", "symmetric"} and len(trained) == 4
    # pi_ref is a measured row, sampled like the trained models (one per seed), not a printed 0.5
    refs = [r for r in summary["runs"] if r["objective"] == "pi_ref"]
    assert len(refs) == 2 and [row["objective"] for row in summary["table"]][0] == "pi_ref"
    for r in summary["runs"]:
        lo, hi = r["deployed"]["V_identity_ci"]
        assert 0 <= lo <= r["deployed"]["V_identity"] <= hi <= 1
    for r in trained:
        assert (Path(r["run_dir"]) / "final" / "config.json").is_file()
        ev = json.loads((Path(r["run_dir"]) / "eval.json").read_text())
        assert ev["strategy"] == r["strategy"] and ev["config_hash"] and ev["sampling"] == {"temperature": 0.7,
                                                                                           "top_p": 0.95}
    c = summary["ceilings"]["identity"]
    assert c["pi_ref"] == pytest.approx(0.5) and c["pi_star"] >= c["pi_bar"] >= 0.5
    html = (out / "runs" / "report.html").read_text()
    assert html.count("plotly-graph-div") >= 4 and "V(pi_star)" in html
    assert "deployed (prompt only)" in res.stdout and "report:" in res.stdout


@pytest.mark.slow
def test_eval_and_compare_on_demo_runs(demo, tmp_path):
    out, _ = demo
    runs = sorted((out / "runs").glob("dpo-*-s0"))
    res = cli("eval", "--checkpoints", ",".join(map(str, runs)), "--n_samples", "10", "--n_boot", "100",
              "--output", str(tmp_path / "eval.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["judge"] == "oracle" and len(doc["results"]) == 2
    for r in doc["results"].values():
        assert r["n"] == 10 * 4 and 0 <= r["win_rate"] <= 1 and 0 <= r["lc_win_rate"] <= 1
    assert (tmp_path / "eval.judgements.jsonl").is_file()  # written as they land
    for r in doc["results"].values():
        assert r["judge_calls"] == 40 and r["strategy"] in ("none", "symmetric") and r["fingerprint"]
    res = cli("compare", "--runs", str(out / "runs"), "--output", str(tmp_path / "cmp.html"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dpo-symmetric-s0" in res.stdout and "eval/reflection_gain" in res.stdout
    assert (tmp_path / "cmp.html").read_text().count("plotly-graph-div") >= 1


@pytest.mark.slow
def test_eval_reuses_exactly_its_own_judgements(demo, tmp_path):
    """Judgements were keyed by prompt and sample index in a file named after the run folder's last
    parts: a rerun at another temperature made 0 judge calls, and expA/seed0 and expB/seed0 shared one
    file. Now a judgement is reused only for the same models, prompt, answers, sampling and judge."""
    import shutil

    out, _ = demo
    for exp, run in (("expA", "dpo-none-s0"), ("expB", "dpo-symmetric-s0")):
        shutil.copytree(out / "runs" / run, tmp_path / exp / "seed0")
    ckpts = f"{tmp_path / 'expA' / 'seed0'},{tmp_path / 'expB' / 'seed0'}"
    common = ["--checkpoints", ckpts, "--n_samples", "3", "--n_boot", "50", "--output", str(tmp_path / "eval.json")]

    def calls(*extra):
        res = cli("eval", *common, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        doc = json.loads((tmp_path / "eval.json").read_text())
        return [r["judge_calls"] for r in doc["results"].values()]

    assert calls() == [12, 12]  # 4 prompts x 3 samples each, nothing shared between the two experiments
    assert calls() == [0, 0]  # the same evaluation again: all reused
    assert calls("--temperature", "1.0") == [12, 12]  # other sampling: judged afresh
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["sampling"]["temperature"] == 1.0 and doc["judge_identity"]["judge"] == "oracle"


def test_sweep_shares_the_reference_cache(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(f"max_steps: 2\nbatch_size: 2\nmax_length: 96\nval_size: 4\nmax_rows: 8\nlr: 0.001\n"
                    f"cache_dir: {tmp_path / 'cache'}\ntiny_hidden: 32\n")
    res = cli("sweep", "--base", str(base), "--grid", "strategy=none,symmetric;beta=0.1,0.2",
              "--output_dir", str(tmp_path / "sweep"))
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["strategy=none,beta=0.1", "strategy=none,beta=0.2",
                                                "strategy=symmetric,beta=0.1", "strategy=symmetric,beta=0.2"]
    forwards = [r["reference_forwards"] for r in doc["runs"]]
    assert forwards[0] > 0 and forwards[1:] == [0, 0, 0]  # the plain reference is computed once
    bad = cli("sweep", "--base", str(base), "--grid", "strategy=none,sideways")
    assert bad.returncode == 2 and "sideways" in bad.stderr


def test_every_command_has_help(capsys):
    """Each command prints its help, and each field's help text as written: a "%" in it (train's cpu_malloc says
    "about 11% slower") was read by argparse as a format and printed the parser's internals."""
    import dataclasses

    from workbench.cli import COMMANDS, main, resolve

    for name, (_, config, _) in COMMANDS.items():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "--config" in out, name
        assert "option_strings" not in out, name
        flat = " ".join(out.split())
        for f in dataclasses.fields(resolve(config)):
            if "%" in f.metadata.get("help", ""):  # argparse wraps lines: compare without line breaks
                assert " ".join(f.metadata["help"].split()) in flat, (name, f.name)


# commands whose help needs torch: none (each config lives apart from its command's code)
HELP_LOADS_TORCH: set[str] = set()


def test_help_of_the_training_commands_loads_no_torch():
    """`<command> --help` builds its parser from the config alone: the registries' names and rules come from
    inspo_core.names, so torch (seconds to import) is not loaded. The list of exceptions is checked too: a
    command that stops needing torch for its help leaves it."""
    from workbench.cli import COMMANDS

    probe = ("import runpy, sys\nsys.argv = ['workbench', sys.argv[1], '--help']\ntry:\n"
             "    runpy.run_module('workbench', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('TORCH', 'torch' in sys.modules, file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    loaded = {}
    for name in COMMANDS:
        res = subprocess.run([sys.executable, "-c", probe, name], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0 and "--config" in res.stdout, (name, res.stderr[-2000:])
        loaded[name] = "TORCH True" in res.stderr
    assert {n for n, yes in loaded.items() if yes} == HELP_LOADS_TORCH


def test_the_registries_are_built_from_the_names():
    """Every objective, strategy and engine the config offers has its code, with the spec's rules."""
    from inspo_core import names
    from inspo_core.engines import ENGINES
    from inspo_core.objectives import OBJECTIVES
    from inspo_core.strategies import STRATEGIES

    assert list(OBJECTIVES) == list(names.OBJECTIVE_SPECS) and all(o.fn is not None for o in OBJECTIVES.values())
    for n, o in OBJECTIVES.items():
        spec = names.OBJECTIVE_SPECS[n]
        assert (o.hparams, o.needs_reference, o.normalizes_itself, o.batch_reference_point) == \
            (spec.hparams, spec.needs_reference, spec.normalizes_itself, spec.batch_reference_point)
    assert list(STRATEGIES) == list(names.STRATEGY_SPECS) and all(s.terms() for s in STRATEGIES.values())
    assert {n: e.summary for n, e in ENGINES.items()} == names.ENGINE_SUMMARIES
    from inspo_core.judges import JUDGES

    assert list(JUDGES) == list(names.JUDGE_NAMES)  # eval's and protocol's --judge choices


def test_demo_resume_reuses_finished_runs_and_redoes_the_rest(tmp_path):
    """An interrupted demo continues with --resume: a run evaluated with the same settings is reused
    as it is, a run without its final model is trained again (to the same weights), and a changed
    setting is refused naming the key; without --resume the demo refuses to write over the runs."""
    from inspo_core.fingerprint import model_fingerprint
    from workbench.demo import run_demo
    from workbench.demo_config import DemoConfig

    common = dict(fast=True, seeds=[0], max_steps=3, n_eval=16, n_pairs=160, pretrain_steps=20,
                  output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    first = run_demo(DemoConfig(**common), log=lambda m: None)
    runs = {r["name"]: r for r in first["runs"] if r["run_dir"]}
    none_dir, sym_dir = Path(runs["dpo-none-s0"]["run_dir"]), Path(runs["dpo-symmetric-s0"]["run_dir"])
    eval_before = (none_dir / "eval.json").read_text()
    sym_weights = model_fingerprint(str(sym_dir / "final"))

    with pytest.raises(ValueError, match="--resume"):
        run_demo(DemoConfig(**common), log=lambda m: None)
    # interrupted while training the second run: its final model and evaluation are gone
    import shutil
    shutil.rmtree(sym_dir / "final")
    (sym_dir / "eval.json").unlink()
    lines = []
    second = run_demo(DemoConfig(**common, resume=True), log=lines.append)
    assert any("reused" in m and "dpo-none-s0" in m for m in lines)
    assert not any("reused" in m and "dpo-symmetric-s0" in m for m in lines)
    assert (none_dir / "eval.json").read_text() == eval_before  # untouched
    assert model_fingerprint(str(sym_dir / "final")) == sym_weights  # trained again, same weights
    for a, b in zip(first["runs"], second["runs"]):
        assert a["name"] == b["name"] and a["deployed"]["V_identity"] == b["deployed"]["V_identity"]
    with pytest.raises(ValueError, match="max_steps: 3 in the checkpoint, 4 now"):
        run_demo(DemoConfig(**{**common, "max_steps": 4}, resume=True), log=lambda m: None)
