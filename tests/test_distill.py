"""Reflection distillation (issue 21): the `distill` strategy's loss, the stage data builders, the
oracle-agreement and marginal-value arithmetic, and the transfer study's stage columns."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from workbench.distill import (
    STAGES, marginal_value, oracle_agreement, revision_pairs, teacher_rows,
)
from inspo_core.strategies import L_GIVEN_W, L_PLAIN, W_GIVEN_L, W_PLAIN, resolve_method, strategy_loss
from inspo_core.worlds.token import TokenWorld, TokenWorldConfig


def _logps(seed):
    g = torch.Generator().manual_seed(seed)
    return {v: -torch.rand(3, generator=g, dtype=torch.float64) * 10 for v in [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W]}


@pytest.mark.parametrize("objective", ["dpo", "simpo", "ipo"])
def test_distill_is_the_chosen_nll_whatever_the_objective(objective):
    """loss_i = -log pi(chosen | x)_i: with chosen log-probs (-1, -2.5, -7) the losses are (1, 2.5, 7);
    the objective, its hyperparameters and the reference do not enter; only the plain chosen view
    is in the graph (the draft's view is scored for the logs)."""
    pol = {v: t.clone().requires_grad_(True) for v, t in _logps(0).items()}
    pol[W_PLAIN] = torch.tensor([-1.0, -2.5, -7.0], dtype=torch.float64, requires_grad=True)
    lengths = {"chosen": torch.tensor([3, 5, 2]), "rejected": torch.tensor([4, 1, 6])}
    out = strategy_loss(objective, "distill", policy_logps=pol, ref_logps=None, lengths=lengths, beta=3.0)
    assert_close(out.losses, torch.tensor([1.0, 2.5, 7.0], dtype=torch.float64))
    assert_close(out.chosen_rewards, pol[W_PLAIN].detach())
    assert_close(out.rejected_rewards, pol[L_PLAIN].detach())
    out.losses.sum().backward()
    assert_close(pol[W_PLAIN].grad, -torch.ones(3, dtype=torch.float64))
    assert all(pol[v].grad is None for v in (L_PLAIN, W_GIVEN_L, L_GIVEN_W))
    m = resolve_method(objective, "distill")
    assert m.policy_views == [W_PLAIN, L_PLAIN] and not m.conditioned


def test_distill_differs_from_dpo_on_the_same_views():
    """A test of the test: the NLL is not DPO's loss on the same inputs."""
    pol, ref = _logps(0), _logps(1)
    lengths = {"chosen": torch.tensor([3, 5, 2]), "rejected": torch.tensor([4, 1, 6])}
    a = strategy_loss("dpo", "distill", policy_logps=pol, ref_logps=ref, lengths=lengths).losses
    b = strategy_loss("dpo", "none", policy_logps=pol, ref_logps=ref, lengths=lengths).losses
    assert not torch.allclose(a, b)


ROWS = [
    {"prompt": "p", "context": 0, "draft": "Take the apple.", "revision": "Take the bread."},
    {"prompt": "p", "context": 0, "draft": "Take the apple.", "revision": "Take the apple."},  # same text
    {"prompt": "p", "context": 0, "draft": "", "revision": ""},  # an empty draft
    {"prompt": "p", "context": 0, "draft": "Go with the figs.", "revision": ""},  # an empty revision
    {"prompt": "p", "context": 0, "draft": "Go with the figs.", "revision": "I recommend the apple."},
]


def test_revision_pairs_and_teacher_rows():
    pairs, left = revision_pairs(ROWS)
    assert pairs == [{"prompt": "p", "chosen": "Take the bread.", "rejected": "Take the apple."},
                     {"prompt": "p", "chosen": "I recommend the apple.", "rejected": "Go with the figs."}]
    assert left == {"empty": 2, "same_text": 1}
    rows, left = teacher_rows(ROWS)
    assert [r["chosen"] for r in rows] == ["Take the bread.", "Take the apple.", "I recommend the apple."]
    # the repeat keeps its sample; its rejected (for the logs) is the next other draft of the prompt
    assert [r["rejected"] for r in rows] == ["Take the apple.", "Go with the figs.", "Go with the figs."]
    assert left == {"empty": 2, "other_draft": 1}


def _world():
    return TokenWorld(TokenWorldConfig(family="cyclic", n_contexts=2, n_items=4, bt=0.0))


def test_oracle_agreement_by_hand():
    w = _world()
    p = w.prompts[0]
    a, b, c = (f"Take the {w.items[i]}." for i in range(3))
    rows = [{"prompt": p, "context": 0, "draft": a, "revision": b},
            {"prompt": p, "context": 0, "draft": b, "revision": a},
            {"prompt": p, "context": 0, "draft": a, "revision": f"Go with the {w.items[0]}."},  # same item: 1/2
            {"prompt": p, "context": 0, "draft": c, "revision": "nothing"},  # unparseable revision: loses
            {"prompt": p, "context": 0, "draft": "", "revision": ""}]  # not counted
    P = w.P[0]
    got = oracle_agreement(w, rows)
    probs = [P[1, 0], P[0, 1], 0.5, 0.0]
    assert got["n"] == 4 and got["mean_p"] == pytest.approx(sum(probs) / 4)
    assert got["tie"] == pytest.approx(0.25) and got["worse"] == pytest.approx(sum(q < 0.5 for q in probs) / 4)
    assert got["better"] + got["tie"] + got["worse"] == pytest.approx(1.0)


def test_marginal_value_equals_the_mean_over_all_pairs():
    """The closed form over item distributions equals the slow obvious estimate: the mean of the
    oracle's P over every (sample, opponent) pair of a prompt, prompts weighted equally — with
    unparseable texts on both sides."""
    w = _world()
    rng = np.random.default_rng(0)
    texts = [[f"Take the {w.items[i]}." if i < 4 else "no idea" for i in rng.integers(0, 5, size=n)] for n in (7, 11)]
    opp = [[f"Go with the {w.items[i]}." if i < 4 else "hmm" for i in rng.integers(0, 5, size=n)] for n in (9, 5)]
    slow = np.mean([np.mean([w.preference(w.prompts[x], a, b) for a in texts[x] for b in opp[x]]) for x in range(2)])
    assert marginal_value(w, texts, opp) == pytest.approx(float(slow), abs=1e-12)
    assert not math.isclose(marginal_value(w, texts, opp), marginal_value(w, opp, texts))  # not symmetric


def test_stages_name_registry_strategies():
    from inspo_core.strategies import STRATEGIES

    assert all(s.strategy in STRATEGIES for s in STAGES.values())
    assert STAGES["revise"].after == STAGES["distill"].after == "symmetric" and STAGES["dpo_long"].after is None


@pytest.mark.parametrize("bad, message", [
    (dict(strategies=["none", "revise"]), "stage 'revise' continues the 'symmetric' runs"),
    (dict(strategies=["none", "symmetric", "revize"]), "strategy 'revize' unknown"),
])
def test_transfer_config_checks_stages(bad, message):
    from workbench.transfer import TransferConfig

    with pytest.raises(ValueError, match=message):
        TransferConfig(**bad)


def test_stage_columns(tmp_path):
    """toward_marginal = (V stage - V DPO) / (V(m) - V DPO) with means over seeds; the gap to DPO at
    equal steps is paired by seed; compute and the oracle's agreement are means over seeds."""
    from workbench.transfer import _stage_columns

    def run(st, k, dep, **extra):
        return {"strategy": st, "seed": k, "deployed": {"V_identity": dep}, "run_dir": "x", **extra}

    by_seed = {}
    for k, (dpo, sym, dist, long_, marg) in enumerate([(0.60, 0.55, 0.58, 0.59, 0.65), (0.62, 0.57, 0.61, 0.63, 0.66)]):
        by_seed["none", k] = run("none", k, dpo)
        by_seed["symmetric", k] = run("symmetric", k, sym)
        by_seed["distill", k] = run("distill", k, dist, teacher_marginal={"measured": marg, "T1": 0.0},
                                    compute={"steps": 500, "extra_sequences": 4000 + 10 * k})
        by_seed["revise", k] = run("revise", k, dist - 0.01, oracle_agreement={"mean_p": 0.4 + 0.1 * k, "better": 0.5,
                                                                               "tie": 0.2, "worse": 0.3},
                                   compute={"steps": 500, "extra_sequences": 4000})
        by_seed["dpo_long", k] = run("dpo_long", k, long_, compute={"steps": 500, "extra_sequences": 0})
    rows = [{"strategy": s, "deployed": (float(np.mean([by_seed[s, k]["deployed"]["V_identity"] for k in (0, 1)])),)}
            for s in ("none", "symmetric", "distill", "revise", "dpo_long")]
    _stage_columns(rows, by_seed, {"max_steps": 375})
    r = {x["strategy"]: x for x in rows}
    assert r["distill"]["toward_marginal"] == pytest.approx((0.595 - 0.61) / (0.655 - 0.61))
    assert r["distill"]["marginal"][0] == pytest.approx(0.655) and r["symmetric"]["marginal"][0] == pytest.approx(0.655)
    assert r["distill"]["gap_vs_dpo_long"][0] == pytest.approx(((0.58 - 0.59) + (0.61 - 0.63)) / 2)
    assert r["symmetric"]["marginal_gap_vs_dpo"][0] == pytest.approx(((0.65 - 0.60) + (0.66 - 0.62)) / 2)
    assert "gap_vs_dpo_long" not in r["none"] and "toward_marginal" not in r["symmetric"]
    assert r["none"]["compute"] == {"steps": 375.0, "extra_sequences": 0.0}
    assert r["distill"]["compute"] == {"steps": 500.0, "extra_sequences": 4005.0}
    assert r["revise"]["oracle_agreement"]["mean_p"] == pytest.approx(0.45)
    from workbench.transfer import format_stage_table

    for x in rows:
        x.update(reflective=None, gap_vs_dpo=None if x["strategy"] == "none" else (-0.01, -0.03, 0.01))
    table = format_stage_table({"points": [{"name": "p", "rows": rows}]}).splitlines()
    assert len(table) == 7 and table[0].split()[:2] == ["point", "strategy"]
    assert table[1].startswith("p: pi_ref nan")  # the point's exact values (none in this synthetic point)
    table = table[:1] + table[2:]
    dist = table[3].split()
    assert dist[:6] == ["p", "distill", "0.595", "-", "-0.010", "±"] and dist[6] == "0.020"
    assert "0.655" in dist and "+0.045" in dist and "-0.33" in dist and "500" in dist and "4005" in dist  # V(m), toward, steps, extra
    assert table[4].split()[-1] == "0.450"  # revise: the oracle's mean P(revision > draft)
    assert format_stage_table({"points": [{"name": "p", "rows": rows[:2]}]}) == ""  # no stage: no table


def test_reanalyse_merges_the_stage_runs(tmp_path):
    """A point's stage runs (stages.json) join its demo's runs (summary.json) when the study is analysed
    again: the distill row appears with its gap to DPO (0.58 - 0.60, 0.60 - 0.62 seed by seed)."""
    import json

    import torch
    from safetensors.torch import save_file

    from workbench.transfer import reanalyse

    point = tmp_path / "p"
    (point / "run" / "final").mkdir(parents=True)
    save_file({"a": torch.zeros(2, 3)}, str(point / "run" / "final" / "model.safetensors"))

    def run(st, k, dep, **extra):
        return {"objective": "dpo", "strategy": st, "seed": k, "run_dir": str(point / "run"),
                "deployed": {"V_identity": dep}, "reflective": {"V_identity": dep + 0.05}, **extra}

    runs = [{"objective": "pi_ref", "strategy": "-", "seed": k, "run_dir": None, "deployed": {"V_identity": 0.5}}
            for k in (0, 1)]
    runs += [run("none", 0, 0.60), run("none", 1, 0.62), run("symmetric", 0, 0.55), run("symmetric", 1, 0.57)]
    stages = [run("distill", k, v, teacher_marginal={"T1": 0.5, "measured": 0.56}, compute={"steps": 500,
                                                                                           "extra_sequences": 4000})
              for k, v in ((0, 0.58), (1, 0.60))]
    (point / "summary.json").write_text(json.dumps({"runs": runs, "config": {"max_steps": 375}, "ceilings": {
        "identity": {"pi_ref": 0.5, "pi_bar": 0.7, "pi_star": 0.9}}}))
    (point / "stages.json").write_text(json.dumps({"stages": ["distill"], "runs": stages}))
    (tmp_path / "transfer.json").write_text(json.dumps({"points": [{"name": "p", "rows": []}]}))
    rows = {r["strategy"]: r for r in reanalyse(tmp_path)["points"][0]["rows"]}
    assert set(rows) == {"none", "symmetric", "distill"}
    assert rows["distill"]["gap_vs_dpo"][0] == pytest.approx(-0.02)
    assert rows["symmetric"]["marginal_gap_vs_dpo"][0] == pytest.approx(((0.56 - 0.60) + (0.56 - 0.62)) / 2)


def test_theory_values_by_hand():
    """A 3-item rock-paper-scissors prompt (P = 0.9 for the beater) against opponents 1/2 rock, 1/4 paper,
    1/4 scissors plus one unparseable text in five (u = 0.2): S(rock) = 0.5/2 + 0.1/4 + 0.9/4 = 0.5,
    S(paper) = 0.9/2 + 0.5/4 + 0.1/4 = 0.6, S(scissors) = 0.1/2 + 0.9/4 + 0.5/4 = 0.4, so V(pi_bar) =
    0.8 * 0.6 + 0.2; pi_star answers each draft with its beater (0.9): V(pi_star) = 0.8 * 0.9 + 0.2; m* =
    (1/4 rock [beats scissors], 1/2 paper [beats rock], 1/4 scissors [beats paper]) has V_p = 0.25 * 0.5 +
    0.5 * 0.6 + 0.25 * 0.4 = 0.525."""
    from workbench.distill import theory_values

    class RPS:
        items = ["rock", "paper", "scissors"]
        prompts = ["x"]
        P = np.array([[[0.5, 0.1, 0.9], [0.9, 0.5, 0.1], [0.1, 0.9, 0.5]]])

        def parse(self, t):
            return self.items.index(t) if t in self.items else None

    opp = [["rock", "rock", "paper", "scissors", "??"] * 2]
    got = theory_values(RPS(), opp)
    assert got["pi_bar"] == pytest.approx(0.8 * 0.6 + 0.2)
    assert got["pi_star"] == pytest.approx(0.8 * 0.9 + 0.2)
    assert got["pi_star_marginal"] == pytest.approx(0.8 * 0.525 + 0.2)


def test_stages_run_through_the_transfer_study(tmp_path):
    """End to end on a tiny world: each stage trains after the point's demo, from the seed's symmetric run
    (revise, distill) or from pi_ref (dpo_long), with pi_ref as the reference; stages.json holds their
    records with compute, V(m) and the exact theory values."""
    import json

    import yaml

    from workbench.transfer import TransferConfig, run_transfer

    out = tmp_path / "study"
    cfg = TransferConfig(sizes=["xs"], worlds=["cyclic:0"], strategies=["none", "symmetric", "revise", "distill",
                                                                        "dpo_long"], seeds=[0, 1], max_steps=3,
                         n_pairs=140, n_eval=8, pretrain_steps=10, stage_steps=2, stage_samples=140,
                         output_dir=str(out), cache_dir=str(tmp_path / "cache"))
    doc = run_transfer(cfg, log=lambda m: None)
    point = out / "xs-cyclic0"
    stages = json.loads((point / "stages.json").read_text())
    assert sorted((r["strategy"], r["seed"]) for r in stages["runs"]) == sorted(
        (s, k) for s in ("revise", "distill", "dpo_long") for k in (0, 1))
    assert set(stages["theory"]) == {"pi_bar", "pi_star", "pi_star_marginal"}
    run_cfg = {s: yaml.safe_load((point / f"dpo-{s}-s1" / "config.yaml").read_text()) for s in ("revise", "distill",
                                                                                                "dpo_long")}
    assert run_cfg["distill"]["strategy"] == "distill" and run_cfg["revise"]["strategy"] == "none"
    assert run_cfg["distill"]["model"].endswith("dpo-symmetric-s1/final") and run_cfg["distill"]["max_steps"] == 2
    assert run_cfg["revise"]["ref_model"].endswith("pi_ref") and run_cfg["dpo_long"]["max_steps"] == 5
    rows = {r["strategy"]: r for r in doc["points"][0]["rows"]}
    assert rows["distill"]["compute"]["steps"] == 5 and rows["distill"]["compute"]["extra_sequences"] == 280
    assert "marginal" in rows["symmetric"] and "oracle_agreement" in rows["revise"]
    revise_data = [json.loads(line) for line in (point / "stage-data" / "revise-s0.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (point / "stage-data" / "symmetric-samples-s0.jsonl").read_text().splitlines()]
    assert revise_data[0] == {"prompt": samples[0]["prompt"], "chosen": samples[0]["revision"],
                              "rejected": samples[0]["draft"]} or samples[0]["revision"] == samples[0]["draft"]
