"""The Table 2 protocol command, offline, on a tiny token world whose exact oracle stands in for the judge
and the grader; plus its prompt-set loading and the oracle grader by hand."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inspo_core.grading import OracleGrader, summarize_grades

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "workbench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world_models(tmp_path_factory):
    """pi_ref of a 4-prompt token world (30 pre-training steps: seconds), and a perturbed copy of it
    with the world beside it, as a second checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inspo_core.worlds.token import TokenWorld, TokenWorldConfig

    cache = tmp_path_factory.mktemp("proto-cache")
    world = TokenWorld(TokenWorldConfig(pretrain_steps=30, pretrain_samples=400, hidden_size=32, n_contexts=4))
    ref = world.reference(cache, log=lambda m: None)
    other = cache / "other"
    m, tok = AutoModelForCausalLM.from_pretrained(ref), AutoTokenizer.from_pretrained(ref)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.save_pretrained(other)
    tok.save_pretrained(other)
    shutil.copy(ref / "world.json", other / "world.json")
    return world, ref, other, cache


def test_protocol_writes_the_table_offline_and_reuses_its_work(world_models, tmp_path):
    world, ref, other, cache = world_models
    out = tmp_path / "protocol.json"
    args = ["protocol", "--checkpoints", f"{ref},{other}", "--n_samples", "4", "--mt_samples", "2", "--n_boot", "100",
            "--output", str(out), "--cache_dir", str(cache)]
    res = cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    assert "| model | AE2 LC | AE2 WR | AH WR | AH SC | MT |" in md and str(other) in md
    r_ref, r_other = doc["results"][str(ref)], doc["results"][str(other)]
    # pi_ref against itself: the same seeds give the same answers, every judgement is a tie
    for k in ("ae_wr", "ae_lc", "ah_wr", "ah_sc"):
        assert r_ref[k] == pytest.approx(0.5, abs=1e-6), k
    # the other checkpoint's AlpacaEval win rate, recomputed from its answers with the oracle itself
    judged = [json.loads(line) for line in out.with_name("protocol.judgements.jsonl").read_text().splitlines()]
    mine = [j for j in judged if j["a"] != j["b"]]
    assert mine, "the perturbed model should answer differently somewhere"
    for j in judged:
        assert j["prob"] == pytest.approx(world.preference(j["prompt"], j["a"], j["b"]))
    for r in (r_ref, r_other):
        assert 1 <= r["mt"] <= 10 and r["mt_unparsed"] == 0
        lo, hi = r["ah_sc_ci"]
        assert lo <= r["ah_sc"] <= hi
    assert doc["prompt_sets"]["mt_bench"] == {"source": "world", "n": 4}
    assert doc["grader_identity"]["grader"] == "oracle"
    # a rerun reuses every judgement and grade (the same identities), and gives the same table
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    doc2 = json.loads(out.read_text())
    assert all(r["ae_judge_calls"] == r["ah_judge_calls"] == r["mt_grader_calls"] == 0 for r in doc2["results"].values())
    assert doc2["table"] == doc["table"]


def test_protocol_against_fixed_baseline_answers(world_models, tmp_path):
    """--baseline answers: each prompt row carries the baseline's answer (AlpacaEval's `output`); every
    sample is judged against it, the win rate is the mean oracle probability against it, and MT-Bench
    has no baseline row. A row without an answer is refused, naming it."""
    world, ref, other, cache = world_models
    rows = tmp_path / "ae.jsonl"
    rows.write_text("".join(json.dumps({"instruction": p, "output": f"Take the {world.items[i % 2]}."}) + "\n"
                            for i, p in enumerate(world.prompts)))
    out = tmp_path / "protocol.json"
    args = ["protocol", "--checkpoints", str(other), "--baseline", "answers", "--alpaca_eval", str(rows),
            "--arena_hard", str(rows), "--n_samples", "3", "--n_boot", "50", "--output", str(out), "--cache_dir",
            str(cache)]
    res = cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    judged = [json.loads(line) for line in out.with_name("protocol.judgements.jsonl").read_text().splitlines()]
    fixed = {p: f"Take the {world.items[i % 2]}." for i, p in enumerate(world.prompts)}
    assert len(judged) == 3 * len(world.prompts) and all(j["b"] == fixed[j["prompt"]] for j in judged)
    want = sum(world.preference(j["prompt"], j["a"], j["b"]) for j in judged) / len(judged)
    assert doc["results"][str(other)]["ae_wr"] == pytest.approx(want)
    assert doc["baseline_mt"] is None and "fixed baseline answers" in doc["baseline"]
    rows.write_text(json.dumps({"instruction": world.prompts[0]}) + "\n")
    res = cli(*args[:-4], "--output", str(tmp_path / "p2.json"), "--cache_dir", str(cache))
    assert res.returncode != 0 and "row 0 (and 0 more) carries no baseline answer" in res.stderr


def test_protocol_names_what_is_missing(world_models, tmp_path):
    world, ref, other, cache = world_models
    res = cli("protocol", "--checkpoints", str(ref), "--alpaca_eval", "alpaca_eval", "--output",
              str(tmp_path / "p.json"), "--cache_dir", str(cache))
    assert res.returncode != 0 and "offline, give the prompts as a .jsonl file instead" in res.stderr
    res = cli("protocol", "--checkpoints", str(ref), "--judge", "reward_model", "--output", str(tmp_path / "p.json"))
    assert res.returncode != 0 and "has no single-answer grader: set --grader" in res.stderr


def test_prompt_set_files(tmp_path):
    from workbench.protocol import load_prompt_set

    f = tmp_path / "mt.jsonl"
    f.write_text(json.dumps({"question_id": 81, "turns": ["Q1?", "Q2?"], "reference": ["R1", "R2"]}) + "\n"
                 + json.dumps({"instruction": "Say hi."}) + "\n"
                 + json.dumps({"turns": [{"content": "Arena-style turn"}]}) + "\n")
    assert load_prompt_set(str(f), None, "mt_bench") == [
        {"id": "81", "turns": ["Q1?", "Q2?"], "reference": ["R1", "R2"]},
        {"id": "1", "turns": ["Say hi."], "reference": None},
        {"id": "2", "turns": ["Arena-style turn"], "reference": None}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no known field"}) + "\n")
    with pytest.raises(ValueError, match="row 0 has none of 'turns', 'prompt', 'instruction'"):
        load_prompt_set(str(bad), None, "arena_hard")
    with pytest.raises(ValueError, match="--alpaca_eval world needs world checkpoints"):
        load_prompt_set("world", None, "alpaca_eval")
    with pytest.raises(ValueError, match="not 'world', a hub name"):
        load_prompt_set(str(tmp_path / "missing.jsonl"), None, "mt_bench")


class FakeWorld:
    class cfg:
        @staticmethod
        def key():
            return "fake"

    def preference(self, prompt, a, b):
        return {"o1": 0.2, "o2": 1.0}[b] if a == "good" else 0.0


def test_oracle_grader_by_hand():
    """'good' wins 0.2 and 1.0 against the two opponents: V = 0.6, score 1 + 9 * 0.6 = 6.4; 'bad' wins
    nothing: score 1. Mean over the two questions' single turns: 3.7."""
    grader = OracleGrader(FakeWorld(), {"x?": ["o1", "o2"], "y?": ["o1", "o2"]})
    (g1,) = grader.grade("x?", "good")
    (g2,) = grader.grade("y?", "bad")
    assert (g1.score, g2.score) == (pytest.approx(6.4), 1.0)
    assert summarize_grades([g1, g2]).mean == pytest.approx(3.7)
    with pytest.raises(ValueError, match="single-turn answers only"):
        grader.grade(["x?", "z?"], ["good", "bad"])
    with pytest.raises(ValueError, match="no reference opponents"):
        grader.grade("unknown?", "good")


@pytest.mark.slow
def test_protocol_with_smollm2_as_local_judge_and_grader(world_models, tmp_path):
    """SmolLM2-135M-Instruct (the project's offline instruct model) judges pairwise and grades, on one
    prompt from a file: the command completes, and the grader's replies, which at this size rarely state
    a rating, are counted as unparsed rather than scored."""
    from inspo_core.catalog import resolve_model

    cache_tests = Path(os.environ.get("INSPO_TEST_CACHE", Path.home() / ".cache" / "inspo-tests"))  # as test_smollm2
    smol = resolve_model("smollm2", cache_tests, log=print)
    world, ref, other, cache = world_models
    prompts = tmp_path / "one.txt"
    prompts.write_text(world.prompts[0] + "\n")
    out = tmp_path / "protocol.json"
    res = cli("protocol", "--checkpoints", f"{ref},{other}", "--judge", "llm", "--grader", "llm", "--judge_model",
              str(smol), "--alpaca_eval", str(prompts), "--arena_hard", str(prompts), "--mt_bench", str(prompts),
              "--grader_max_tokens", "8", "--max_new_tokens", "16", "--n_boot", "20", "--output", str(out),
              "--cache_dir", str(cache), timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    for r in doc["results"].values():
        assert 0 <= r["ae_wr"] <= 1 and 0 <= r["ah_sc"] <= 1
        assert r["mt_unparsed"] + (0 if r["mt"] != r["mt"] else 1) == 1  # one turn: rated or counted as unparsed
    assert doc["judge_identity"]["judge"] == "llm" and doc["grader_identity"]["kind"] == "llm"
