"""Token worlds: preference families, the oracle, pi_ref caching, the data model, evaluation."""

import json

import numpy as np
import pytest

from inspo_core import theory as th
from inspo_core.worlds.preferences import make_preferences
from inspo_core.worlds import world_of
from inspo_core.worlds.token import TokenWorld, TokenWorldConfig, build_reference, sample_pairs


def intransitive_triples(P):
    """Count (x, a, b, c) with a > b > c > a (each with probability > 1/2)."""
    X, Y, _ = P.shape
    w = P > 0.5
    return sum(w[x, a, b] and w[x, b, c] and w[x, c, a]
               for x in range(X) for a in range(Y) for b in range(Y) for c in range(Y))


@pytest.mark.parametrize("family", ["bradley_terry", "cyclic", "salience"])
def test_families_are_valid_preferences(family):
    P = make_preferences(family, 3, 6, np.random.default_rng(0))["P"]
    th.check_preferences(P)


def test_separable_and_non_separable_families():
    rng = np.random.default_rng(1)
    bt = make_preferences("bradley_terry", 3, 6, rng, strength=2.0)
    assert intransitive_triples(bt["P"]) == 0
    logit = np.log(bt["P"] / (1 - bt["P"]))  # = strength (u(y) - u(y')), the separable form
    np.testing.assert_allclose(logit, 2.0 * (bt["utilities"][:, :, None] - bt["utilities"][:, None, :]), atol=1e-9)
    assert intransitive_triples(make_preferences("cyclic", 3, 6, rng)["P"]) > 0
    # salience: no distortion (delta = 1) is separable; a strong one makes preferences intransitive somewhere
    flat = make_preferences("salience", 4, 8, np.random.default_rng(2), delta=1.0, strength=10)["P"]
    assert intransitive_triples(flat) == 0
    cycles = sum(intransitive_triples(make_preferences("salience", 4, 8, np.random.default_rng(s), delta=0.1,
                                                       strength=10)["P"]) for s in range(5))
    assert cycles > 0


def test_oracle_parsing_and_unparseable_texts_lose():
    w = TokenWorld(TokenWorldConfig(n_items=4))
    x = w.prompts[0]
    assert w.parse("Take the apple.") == 0 and w.parse("I recommend the dates.") == 3
    assert w.parse("Take the apple or the bread.") is None and w.parse("hmm") is None
    assert w.parse("Take the pineapple.") is None  # whole words only
    assert w.preference(x, "Take the apple.", "Go with the bread.") == pytest.approx(w.P[0, 0, 1])
    assert w.preference(x, "nothing", "Take the apple.") == 0.0
    assert w.preference(x, "Take the apple.", "nothing") == 1.0
    assert w.preference(x, "nothing", "???") == 0.5
    with pytest.raises(ValueError, match="not one of this world's prompts"):
        w.preference("some other prompt", "a", "b")


SMALL = dict(hidden_size=32, pretrain_steps=60, pretrain_samples=600, n_contexts=2, n_items=4)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    w = TokenWorld(TokenWorldConfig(**SMALL))
    return w, build_reference(w, root, log=lambda m: None), root


def test_reference_is_cached_and_rebuilt_when_the_config_changes(small):
    w, p1, tmp_path = small
    stamp = (p1 / "model.safetensors").stat().st_mtime_ns
    assert build_reference(w, tmp_path, log=lambda m: None) == p1
    assert (p1 / "model.safetensors").stat().st_mtime_ns == stamp
    p2 = build_reference(TokenWorld(TokenWorldConfig(**{**SMALL, "strength": 2.0})), tmp_path, log=lambda m: None)
    assert p2 != p1 and (p2 / "config.json").exists()
    found, ref = world_of(p1)
    assert ref == p1 and found.cfg == w.cfg


def test_pairs_follow_the_oracle(small, tmp_path):
    """Each pair's winner is drawn with probability P: E[P(chosen > rejected)] = E[p^2 + (1-p)^2]."""
    w, ref, _ = small
    path = sample_pairs(w, ref, 1500, tmp_path / "pairs.jsonl", seed=0, log=lambda m: None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) >= 1400
    got, want = [], []
    for r in rows:
        p = w.preference(r["prompt"], r["chosen"], r["rejected"])
        got.append(p)
        want.append(p * p + (1 - p) * (1 - p))  # p is P(chosen > rejected); the pair was unordered before
    se = np.std(got) / np.sqrt(len(got))
    assert abs(np.mean(got) - np.mean(want)) < 4 * se + 0.01
    assert np.mean(got) > 0.55  # labels carry signal
    assert sample_pairs(w, ref, 1500, path, seed=0) == path  # cached


def test_reference_against_itself_has_value_one_half(small):
    from inspo_core.worlds.evaluation import reference_samples, theory_ceilings, world_value

    w, ref, _ = small
    ref_texts = reference_samples(w, ref, 200, seed=1)
    res = world_value(w, ref, ref_texts, temperature=1.0, top_p=1.0, seed=2, reflective=True, n_boot=300)
    lo, hi = res["deployed"]["V_identity_ci"]
    assert lo < 0.5 < hi, res["deployed"]
    ceil = theory_ceilings(w, ref_texts)["identity"]
    assert ceil["pi_ref"] == pytest.approx(0.5) and ceil["pi_bar"] >= 0.5 and ceil["pi_star"] >= ceil["pi_bar"]
    assert 0 <= res["reflective"]["V_identity"] <= 1


def test_sentiment_prompts_are_held_out_by_subject():
    """No held-out prompt shares its subject with a training prompt (only the template differed before),
    every subject's three prompts fall on one side, and the clusters are the subjects."""
    from inspo_core.worlds.sentiment import SUBJECTS, TEMPLATES, SentimentWorld, SentimentWorldConfig

    w = SentimentWorld(SentimentWorldConfig())
    subject = {t.format(s=s): s for s in SUBJECTS for t in TEMPLATES}
    train, held = {subject[p] for p in w.train_prompts}, {subject[p] for p in w.eval_prompts}
    assert not train & held and len(train) == 60 and len(train | held) == len(SUBJECTS)
    assert len(w.train_prompts) == 3 * len(train) and len(w.eval_prompts) == 3 * len(held) == len(w.prompts)
    assert [SUBJECTS[c] for c in w.clusters] == [subject[p] for p in w.prompts]
    assert SentimentWorld(SentimentWorldConfig(n_eval_prompts=5)).prompts == w.eval_prompts[:5]
    with pytest.raises(ValueError, match="n_train_subjects=82"):
        SentimentWorldConfig(n_train_subjects=82)


def test_a_third_world_is_one_class(tmp_path):
    """The runner asks nothing of a world beyond the interface (inspo_core.worlds.base): a world that
    reuses a token world's pi_ref but prefers later items (a reward, so the frontier is drawn) is one
    class registered by name, and `run_demo` trains, measures and reports it like the built-in ones."""
    from inspo_core.worlds.base import WORLDS, register, world_names
    from inspo_core.worlds.token import TokenWorld
    from workbench.demo import run_demo
    from workbench.demo_config import DemoConfig

    class LaterItems(TokenWorld):
        name = "later_items_test"
        demo_defaults = {**TokenWorld.demo_defaults, "family": "bradley_terry", "seeds": [0]}

        def preference(self, prompt, a, b):
            ya, yb = self.parse(a), self.parse(b)
            if ya is None or yb is None:
                return 0.5 if ya is None and yb is None else (0.0 if ya is None else 1.0)
            return 1 / (1 + np.exp(-(ya - yb)))

        def ceilings(self, opp):
            return {"header": "no ceilings in this world."}

    register(LaterItems)
    try:
        assert "later_items_test" in world_names()
        cfg = DemoConfig(world="later_items_test", strategies=["none", "symmetric"], n_pairs=200, max_steps=6,
                         n_eval=20, pretrain_steps=60, reflective=False, output_dir=str(tmp_path / "demo"),
                         cache_dir=str(tmp_path / "cache"))
        summary = run_demo(cfg, log=lambda m: None)
    finally:
        WORLDS.pop("later_items_test")
    assert summary["world"]["kind"] == "later_items_test"
    assert [r["strategy"] for r in summary["table"]] == ["-", "none", "symmetric"]
    run = next(r for r in summary["runs"] if r["strategy"] == "symmetric")
    w = LaterItems(TokenWorld.from_demo(cfg).cfg)
    texts = [t for row in [["I recommend the figs."]] for t in row]
    assert w.preference("", texts[0], "Take the apple.") > 0.9
    assert 0 <= run["deployed"]["V_identity"] <= 1 and len(run["deployed"]["cells"]["V_identity"]) == 4
    assert summary["differences"][0]["strategy"] == "symmetric"
    assert "no ceilings in this world." in (tmp_path / "demo" / "report.html").read_text()
