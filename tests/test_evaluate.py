import numpy as np
import pytest

from inspo_core.evaluate import JudgementLog, bootstrap_ci, judge_all, lc_win_rate, summarize, win_rate


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.0, 0.5, 0.5]) == 0.5
    assert win_rate([1, 1, 1, 0.5]) == pytest.approx(0.875)


def test_lc_equals_wr_when_length_does_not_matter():
    rng = np.random.default_rng(0)
    n = 4000
    la, lb = rng.integers(10, 200, n), rng.integers(10, 200, n)
    probs = (rng.random(n) < 0.7).astype(float)  # wins independent of length
    assert lc_win_rate(probs, la, lb) == pytest.approx(win_rate(probs), abs=0.02)


def test_lc_removes_a_pure_length_advantage():
    """80% of pairs the candidate is longer and wins (p = 0.9); 20% it is shorter and loses (p = 0.1):
    WR = 0.8*0.9 + 0.2*0.1 = 0.74, but at equal length the model is even: LC ~ 0.5."""
    n = 5000
    longer = np.arange(n) < 0.8 * n
    la = np.where(longer, 300, 100)
    lb = np.full(n, 200)
    probs = np.where(longer, 0.9, 0.1)
    assert win_rate(probs) == pytest.approx(0.74)
    assert lc_win_rate(probs, la, lb) == pytest.approx(0.5, abs=0.02)


def test_bootstrap_interval_covers_and_narrows():
    rng = np.random.default_rng(1)
    small, big = rng.random(50), rng.random(5000)
    lo1, hi1 = bootstrap_ci(lambda i: small[i].mean(), 50, n_boot=500)
    lo2, hi2 = bootstrap_ci(lambda i: big[i].mean(), 5000, n_boot=500)
    assert lo1 < small.mean() < hi1 and lo2 < big.mean() < hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 5


class FlakyJudge:
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def compare(self, prompt, a, b):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("judge down")
        return (1.0 if len(a) > len(b) else 0.0), "longer wins"


def test_judgements_are_kept_when_the_judge_fails_and_a_rerun_resumes(tmp_path):
    items = [(str(i), "p", "x" * (i % 3 + 1), "xx") for i in range(10)]
    log = JudgementLog(tmp_path / "j.jsonl")
    with pytest.raises(RuntimeError, match="judge down"):
        judge_all(FlakyJudge(fail_at=6), items, log)
    assert len(JudgementLog(tmp_path / "j.jsonl").done) == 5  # the five finished ones are on disk
    judge = FlakyJudge()
    resumed, calls = judge_all(judge, items, JudgementLog(tmp_path / "j.jsonl"))
    assert judge.calls == calls == 5 and len(resumed) == 10  # only the missing ones were judged again
    s = summarize(resumed, n_boot=100)
    assert s["n"] == 10 and s["wins"] + s["losses"] + s["ties"] == 10
    # a line cut by a crash is judged again rather than breaking the rerun
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"key": "10", "prom')
    assert len(JudgementLog(tmp_path / "j.jsonl").done) == 10


@pytest.mark.parametrize("line", ['[1, 2]', '{"x": 1}', '"text"', '3', 'null',
                                  '{"key": "k", "prompt": "p", "a": "x", "b": "y"}',
                                  '{"key": "k", "prompt": "p", "a": "x", "b": "y", "prob": "high"}',
                                  '{"key": ["k"], "prompt": "p", "a": "x", "b": "y", "prob": 0.5}',
                                  '{"key": "k", "prompt": "p", "a": "x", "b": "y", "prob": 0.5, "extra": 1}'])
def test_a_line_that_is_not_a_judgement_is_skipped_and_counted(tmp_path, line):
    """Valid JSON that is not a judgement crashed the log's reading (TypeError / KeyError); it is
    skipped, counted like a line cut by a crash, and that item is judged again."""
    items = [(str(i), "p", "x" * (i + 1), "xx") for i in range(3)]
    path = tmp_path / "j.jsonl"
    judge_all(FlakyJudge(), items[:2], JudgementLog(path))
    with open(path, "a") as f:
        f.write(line + "\n" + '{"key": "2", "prom\n')
    log = JudgementLog(path)
    assert sorted(log.done) == ["0", "1"] and log.skipped == 2
    judge = FlakyJudge()
    out, calls = judge_all(judge, items, log)
    assert calls == judge.calls == 1 and [j.key for j in out] == ["0", "1", "2"]


class _LengthJudge:
    name = "length"

    def check(self):
        pass

    def identity(self):
        return {"judge": "length"}

    def compare(self, prompt, a, b):
        return (1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5), "longer wins"


def test_eval_leaves_a_demo_runs_eval_json_untouched(tmp_path, tokenizer, monkeypatch):
    """`eval --checkpoints <a demo run>` wrote its win rates over the run's eval.json, which the demo
    owns (its fingerprint, settings and measured V). Eval's default output is a file of its own."""
    import json

    import yaml

    import inspo_core.eval_pipeline as ev
    from inspo_core.models import tiny_llama
    from inspo_core.rundir import RunDir

    run = tmp_path / "runs" / "dpo-none-s0"
    for d, seed in ((run / "final", 0), (tmp_path / "base", 1)):
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(d)
        tokenizer.save_pretrained(d)
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": "dpo", "strategy": "none",
                                                     "resolved_model": str(tmp_path / "base")}))
    demo_doc = json.dumps({"fingerprint": "f" * 32, "sampling": {"temperature": 0.7}, "deployed": {"V_identity": 0.6}})
    (run / "eval.json").write_text(demo_doc)
    (tmp_path / "prompts.txt").write_text("the cat sat\nthe sea is\n")
    monkeypatch.setattr(ev, "make_judge", lambda *a, **k: _LengthJudge())
    doc = ev.run_eval(ev.EvalConfig(checkpoints=[str(run)], prompts=str(tmp_path / "prompts.txt"), judge="oracle",
                                    n_samples=2, max_new_tokens=4, n_boot=20), log=lambda m: None)
    assert (run / "eval.json").read_text() == demo_doc
    out = RunDir(run).win_rates_json
    assert out.parent == run and out.name != "eval.json"
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["results"][str(run / "final")]["n"] == 4
    assert out.with_name(out.stem + ".judgements.jsonl").is_file()
    # an explicit --output naming another command's file is refused before any sampling
    with pytest.raises(ValueError, match="not an eval's output"):
        ev.run_eval(ev.EvalConfig(checkpoints=[str(run)], prompts=str(tmp_path / "prompts.txt"),
                                  output=str(run / "eval.json")), log=lambda m: None)
    assert (run / "eval.json").read_text() == demo_doc
    # a rerun onto eval's own output is fine, and reuses every judgement
    again = ev.run_eval(ev.EvalConfig(checkpoints=[str(run)], prompts=str(tmp_path / "prompts.txt"), n_samples=2,
                                      max_new_tokens=4, n_boot=20, output=str(out)), log=lambda m: None)
    assert again["results"][str(run / "final")]["judge_calls"] == 0


def test_generate_responses_is_batched_and_does_not_depend_on_the_batching(tmp_path, tokenizer, monkeypatch):
    """`eval` and the app's Batch tab sample through `generate_responses`: several prompts per `generate`
    call (it used to sample one prompt at a time), each answer from its own seed, so the texts are the
    same whatever the batch size, and equal to `sample_sequences` on the prompts' rendered ids."""
    import transformers

    from inspo_core.evaluate import generate_responses
    from inspo_core.generation import ModelCache, prompt_ids, sample_sequences
    from inspo_core.models import tiny_llama

    d = tmp_path / "model"
    tiny_llama(len(tokenizer), seed=4).save_pretrained(d)
    tokenizer.save_pretrained(d)
    prompts = ["the cat sat", "a dog ran to the", "the sea", "one two three four five six"]
    calls = []
    real = transformers.GenerationMixin.generate
    monkeypatch.setattr(transformers.GenerationMixin, "generate",
                        lambda self, *a, **k: calls.append(k["input_ids"].shape[0]) or real(self, *a, **k))
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=5, seed=3)
    together = generate_responses(d, prompts, 3, batch_size=96, **kw)
    assert calls == [len(prompts) * 3]  # every prompt's answers in one call
    calls.clear()
    alone = generate_responses(d, prompts, 3, batch_size=3, **kw)
    assert calls == [3] * len(prompts)
    assert together == alone and len(together) == len(prompts) and all(len(r) == 3 for r in together)
    assert len({t for r in together for t in r}) > 3  # the answers vary: the comparison is not vacuous
    model, tok, builder = ModelCache(size=1).get(d)
    direct = sample_sequences(model, tok, [prompt_ids(builder, p, 5) for p in prompts], n=3, seed=3,
                              temperature=1.0, top_p=0.95, max_new_tokens=5)
    assert together == [[s.text for s in r] for r in direct]
    assert generate_responses(d, prompts, 3, batch_size=96, **{**kw, "seed": 4}) != together
