"""torch's threads follow the cores other processes leave free (inspo_core.threads): the rule, the
governor against a simulated machine, the user's own choice, the real counters, and a training run
whose thread count changes every step staying within float noise of one that never changes."""

import json
import time
from pathlib import Path

import pytest
import torch

from inspo_core import threads as th


def test_the_rule_by_hand():
    assert th.threads_for(2, 0.0) == 2
    assert th.threads_for(2, 0.3) == 2  # a light job (an editor, a notebook at rest) costs nothing
    assert th.threads_for(2, 1.0) == 1
    assert th.threads_for(2, 1.9) == 1  # never fewer than one
    assert th.threads_for(8, 2.6) == 5
    assert th.threads_for(8, 0.0, most=4) == 4  # never more than torch's own default


class _Machine:
    """A 2-core machine: `others` and `own` are the cores other processes and this one keep busy."""

    def __init__(self):
        self.t, self.busy, self.mine = 0.0, 0.0, 0.0
        self.others, self.own = 0.0, 2.0

    def advance(self, dt):
        self.t += dt
        self.busy += (self.others + self.own) * dt
        self.mine += self.own * dt


def _governor(m, calls, interval_s=10.0):
    g = th.ThreadGovernor(interval_s=interval_s, cores=2, machine=lambda: m.busy, own=lambda: m.mine,
                          clock=lambda: m.t, set_threads=calls.append)
    g.most = g.threads = 2  # torch's default on a 2-core machine, whatever this one's is
    return g


def test_the_governor_follows_other_processes_and_comes_back():
    m, calls = _Machine(), []
    g = _governor(m, calls)
    m.advance(12.0)
    assert g.tick() == 2 and calls == []  # alone, its own two busy cores are not "others"
    m.others = 1.0  # a second job starts
    m.advance(5.0)
    assert g.tick() == 2 and calls == []  # within the interval: not looked at
    m.advance(6.0)
    m.own = 1.0
    assert g.tick() == 1 and calls == [1]
    m.advance(11.0)
    assert g.tick() == 1 and calls == [1]
    m.others = 0.0  # the other job ended
    m.advance(11.0)
    assert g.tick() == 2 and calls == [1, 2] and g.changes == 2


def test_the_governor_logs_each_change_with_its_reason():
    m, calls, said = _Machine(), [], []
    g = _governor(m, calls)
    g.log = said.append
    m.others = 1.2
    m.advance(20.0)
    g.tick()
    assert len(said) == 1 and "2 -> 1" in said[0] and "1.2 of 2 cores" in said[0] and "INSPO_THREADS" in said[0]


def test_the_users_count_wins(monkeypatch):
    assert th.fixed_threads({"INSPO_THREADS": "3"}) == 3
    assert th.fixed_threads({"INSPO_THREADS": "auto", "OMP_NUM_THREADS": "1"}) == 1
    assert th.fixed_threads({}) is None
    assert th.fixed_threads({"OMP_NUM_THREADS": ""}) is None
    with pytest.raises(ValueError, match="INSPO_THREADS='many'"):
        th.fixed_threads({"INSPO_THREADS": "many"})
    with pytest.raises(ValueError, match="INSPO_THREADS='0'"):
        th.fixed_threads({"INSPO_THREADS": "0"})
    before = torch.get_num_threads()
    monkeypatch.setattr(th, "_GOVERNOR", None)
    monkeypatch.setenv("INSPO_THREADS", "1")
    try:
        g = th.governor()
        assert g.tick() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(th.machine_busy_s() is None, reason="no /proc/stat")
def test_the_real_counters_see_this_process_work():
    m0, o0 = th.machine_busy_s(), th.own_cpu_s()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    dm, do = th.machine_busy_s() - m0, th.own_cpu_s() - o0
    assert do >= 0.29
    assert dm >= 0.5 * do  # the machine's busy time includes this process's (tick granularity: 1/100 s)


class _Alternating:
    """A governor that changes torch's thread count at every tick: 1, 2, 1, 2, ..."""

    def __init__(self):
        self.n, self.seen = 0, []

    def tick(self):
        self.n += 1
        torch.set_num_threads(1 + self.n % 2)
        self.seen.append(torch.get_num_threads())
        return self.seen[-1]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_run_whose_threads_change_every_step_stays_within_float_noise(tmp_path, cache_dir, monkeypatch):
    """The governor changes the count only between steps, and each step records it. A parallel sum adds in
    another order at another thread count, so the last bits may differ (they do here: the final weights);
    the run is the same within float32 noise, and runs compared bit for bit fix INSPO_THREADS."""
    from inspo_core.config import TrainConfig, load_config
    from inspo_core.trainer import Trainer

    toy = str(Path(__file__).resolve().parents[1] / "examples" / "toy_preferences.jsonl")

    def run(name):
        cfg = load_config(TrainConfig, None, dict(model="tiny", data=toy, lr=1e-3, max_length=96, batch_size=4,
                                                  max_steps=4, val_size=8, output_dir=str(tmp_path / name),
                                                  cache_dir=cache_dir, tiny_hidden=32, strategy="symmetric"))
        return Trainer(cfg).run().run_dir

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(th, "_GOVERNOR", th._Fixed(2))
        fixed = run("fixed")
        alt = _Alternating()
        monkeypatch.setattr(th, "_GOVERNOR", alt)
        changing = run("changing")
    finally:
        torch.set_num_threads(before)
    assert alt.seen == [2, 1, 2, 1]

    def rows(d):
        return [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    a, b = rows(fixed), rows(changing)
    assert [r["threads"] for r in a] == [2, 2, 2, 2] and [r["threads"] for r in b] == [2, 1, 2, 1]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    wa, wb = load_file(str(Path(fixed) / "final" / "model.safetensors")), load_file(
        str(Path(changing) / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
