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
