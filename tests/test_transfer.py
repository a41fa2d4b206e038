"""The transfer study's arithmetic and grid (the runs themselves are exercised by notebook 06 in fast mode)."""

import math

import pytest

from workbench.transfer import TransferConfig, analyse_point, findings, format_table, points, world_settings


def _summary(tmp_path, values: dict) -> dict:
    """A demo summary with given V's: values[(strategy, seed)] = (deployed, reflective)."""
    import torch
    from safetensors.torch import save_file

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(final / "model.safetensors"))
    runs = [{"objective": "pi_ref", "strategy": "-", "seed": s, "run_dir": None,
             "deployed": {"V_identity": v}} for s, v in ((0, 0.50), (1, 0.52))]
    runs += [{"objective": "dpo", "strategy": st, "seed": s, "run_dir": str(tmp_path / "run"),
              "deployed": {"V_identity": d}, "reflective": {"V_identity": r}} for (st, s), (d, r) in values.items()]
    return {"runs": runs, "ceilings": {"identity": {"pi_ref": 0.5, "pi_bar": 0.71, "pi_star": 0.9}}}


def test_gap_and_gain_are_paired_by_seed(tmp_path):
    from scipy.stats import t

    vals = {("none", 0): (0.60, 0.62), ("none", 1): (0.64, 0.65), ("none", 2): (0.62, 0.60),
            ("symmetric", 0): (0.56, 0.70), ("symmetric", 1): (0.59, 0.74), ("symmetric", 2): (0.56, 0.72)}
    rows = {r["strategy"]: r for r in analyse_point(_summary(tmp_path, vals))}
    assert rows["none"]["parameters"] == 17 and rows["none"]["gap_vs_dpo"] is None
    gaps = [-0.04, -0.05, -0.06]  # symmetric minus none, seed by seed
    m, lo, hi = rows["symmetric"]["gap_vs_dpo"]
    half = t.ppf(0.975, 2) * 0.01 / math.sqrt(3)  # stdev of the gaps is 0.01
    assert m == pytest.approx(sum(gaps) / 3) and lo == pytest.approx(m - half) and hi == pytest.approx(m + half)
    assert rows["symmetric"]["reflection_gain"][0] == pytest.approx((0.14 + 0.15 + 0.16) / 3)
    # toward pi_bar: (V - V(pi_ref)) / (V(pi_bar) - V(pi_ref)) with V(pi_ref) the mean of its sampled rows
    assert rows["none"]["toward_pi_bar"] == pytest.approx((0.62 - 0.51) / (0.71 - 0.51))
    held = findings({"points": [{"name": "p", "rows": list(rows.values())}]})
    assert any("symmetric: deployed V vs DPO below 0" in f for f in held)
    assert any("symmetric: reflective - deployed V above 0" in f for f in held)
    assert not any(f.startswith("p none: deployed") for f in held)
    table = format_table({"points": [{"name": "p", "rows": list(rows.values())}]}).splitlines()
    assert table[0].split()[:6] == ["point", "params", "pi_ref", "pi_bar", "V", "none"]
    # the gap -0.050 with its half-width, starred (the interval excludes 0); DPO's own gain, +0.003 from
    # the per-seed gains 0.02, 0.01, -0.02 (sample sd 0.0208), is not: its interval holds 0
    dpo_gains = [0.02, 0.01, -0.02]
    mean = sum(dpo_gains) / 3
    sd = math.sqrt(sum((g - mean) ** 2 for g in dpo_gains) / 2)
    dpo_half = t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert mean - dpo_half < 0 < mean + dpo_half
    cells = [c.strip() for c in table[1].split("  ") if c.strip()]
    assert cells[-3:] == [f"-0.050 ± {half:.3f}*", f"+0.003 ± {dpo_half:.3f}", f"+0.150 ± {half:.3f}*"]  # sd 0.01, as the gap's
    assert table[1].split()[:6] == ["p", "0k", "0.510", "0.710", "0.620", "0.570"]


def test_grid_and_side_axes():
    cfg = TransferConfig(sizes=["xs", "m"], worlds=["cyclic:0", "salience"], vary="beta=0.1,2;pretrain_context_frac=0,1")
    ps = points(cfg)
    assert [p["name"] for p in ps[:4]] == ["xs-cyclic0", "xs-salience", "m-cyclic0", "m-salience"]
    side = ps[4:]
    assert [(p["axis"], p["setting"]) for p in side] == [("beta", {"beta": 0.1}), ("beta", {"beta": 2.0}),
                                                         ("pretrain_context_frac", {"pretrain_context_frac": 0}),
                                                         ("pretrain_context_frac", {"pretrain_context_frac": 1})]
    assert all(p["size"] == "l" and p["world"] == "cyclic:0" for p in side)  # the default reference point
    assert world_settings("cyclic:0.25") == {"family": "cyclic", "bt": 0.25}


@pytest.mark.parametrize("bad, message", [
    (dict(sizes=["huge"]), "size 'huge' unknown"),
    (dict(worlds=["salience:0.5"]), "only the cyclic family"),
    (dict(worlds=["cyclic:-1"]), "must be a number >= 0"),
    (dict(reference_point="huge:cyclic:0"), "reference_point 'huge:cyclic:0'"),
    (dict(reference_point="l:tournament"), "family must be cyclic"),
    (dict(strategies=["symmetric"]), "must include none"),
    (dict(seeds=[0]), "at least 2 seeds"),
    (dict(vary="nonsense=1"), "vary entry"),
    (dict(seeds=[0, 1, 0]), r"seeds \[0, 1, 0\]: 0 appears twice"),  # failed only after a point had trained
    (dict(worlds=["cyclic:abc"]), r"world 'cyclic:abc'.*cyclic:<bt> with bt a number >= 0"),
    (dict(worlds=["cyclic:inf"]), r"world 'cyclic:inf'.*cyclic:<bt> with bt a number >= 0"),
    (dict(reference_point="l:cyclic:x1"), r"world 'cyclic:x1'.*cyclic:<bt>"),
])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        TransferConfig(**bad)


def test_bad_settings_are_reported_together():
    with pytest.raises(ValueError) as e:
        TransferConfig(seeds=[2, 2], worlds=["cyclic:abc"], sizes=["huge"])
    msg = str(e.value)
    assert "2 appears twice" in msg and "'cyclic:abc'" in msg and "size 'huge'" in msg
    assert "could not convert" not in msg  # not the bare float error


def test_a_smaller_grid_keeps_the_points_the_directory_holds(tmp_path, monkeypatch):
    """A smaller grid run into a finished study's directory replaced its transfer.json, losing every
    point it did not rerun. Points are merged by name: the rerun ones replaced, the others kept."""
    import json

    import workbench.transfer as tr

    def fake_run_point(cfg, point, log=print):
        return {"name": point["name"], "max_steps": cfg.max_steps}

    monkeypatch.setattr(tr, "run_point", fake_run_point)
    monkeypatch.setattr(tr, "analyse_point", lambda s: [{"strategy": "none", "from": s}])
    monkeypatch.setattr(tr, "format_point", lambda p: "")
    monkeypatch.setattr(tr, "format_table", lambda doc: "")
    monkeypatch.setattr(tr, "findings", lambda doc: [])
    out = tmp_path / "study"
    tr.run_transfer(TransferConfig(sizes=["xs", "s"], worlds=["cyclic:0", "salience"], max_steps=10,
                                   output_dir=str(out)), log=lambda m: None)
    first = json.loads((out / "transfer.json").read_text())
    assert [p["name"] for p in first["points"]] == ["xs-cyclic0", "xs-salience", "s-cyclic0", "s-salience"]
    tr.run_transfer(TransferConfig(sizes=["s"], worlds=["salience", "bradley_terry"], max_steps=20,
                                   output_dir=str(out)), log=lambda m: None)
    doc = json.loads((out / "transfer.json").read_text())
    names = [p["name"] for p in doc["points"]]
    assert names == ["xs-cyclic0", "xs-salience", "s-cyclic0", "s-salience", "s-bradley_terry"]
    steps = {p["name"]: p["rows"][0]["from"]["max_steps"] for p in doc["points"]}
    assert steps == {"xs-cyclic0": 10, "xs-salience": 10, "s-cyclic0": 10, "s-salience": 20, "s-bradley_terry": 20}
    kept = {p["name"]: p for p in first["points"]}
    assert all(p == kept[p["name"]] for p in doc["points"] if steps[p["name"]] == 10)  # kept as they were
    # each point says which study settings measured it
    assert {p["name"]: p["config"]["max_steps"] for p in doc["points"]} == steps
