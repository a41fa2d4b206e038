import numpy as np
import pytest

from inspo_core import theory as th
from inspo_core.worlds.tabular import dpo_target, sample_pairs, train_tabular


def test_proposition_3_1_numbers():
    """Appendix B: identity 0.55 vs 0.56 (y2 wins); log-odds ~0.41 vs ~0.24 (y1 wins);
    skewed reference 0.83 vs 0.56 (y1 wins)."""
    w = th.proposition_3_1()
    s_id = th.scores(w["P"], w["pi_ref_uniform"], "identity")[0]
    s_lo = th.scores(w["P"], w["pi_ref_uniform"], "log_odds")[0]
    s_sk = th.scores(w["P"], w["pi_ref_skewed"], "identity")[0]
    assert s_id[:2] == pytest.approx([0.55, 0.56])
    assert s_lo[:2] == pytest.approx([0.5 * np.log(9) + 0.5 * np.log(0.25), np.log(0.56 / 0.44)])
    assert round(s_lo[0], 2) == 0.41 and round(s_lo[1], 2) == 0.24
    assert s_sk[:2] == pytest.approx([0.83, 0.56])
    argmax = lambda pi: int(np.argmax(pi[0]))  # noqa: E731
    assert argmax(th.pi_bar(w["P"], w["pi_ref_uniform"], "identity")) == 1  # y2_bar
    assert argmax(th.pi_bar(w["P"], w["pi_ref_uniform"], "log_odds")) == 0  # y1_bar: flips with Psi
    assert argmax(th.pi_bar(w["P"], w["pi_ref_skewed"], "identity")) == 0  # flips with pi_ref


def test_pi_star_is_invariant_and_never_worse():
    """Theorem 3.2 (i)-(ii) over random non-separable worlds."""
    rng = np.random.default_rng(0)
    cube = lambda q: (q - 0.5) ** 3  # noqa: E731  another strictly increasing Psi
    flips = 0
    for _ in range(200):
        P, ref = th.random_world(rng, X=2, Y=5)
        _, ref2 = th.random_world(rng, X=2, Y=5)
        star = th.pi_star(P, "identity")
        assert np.array_equal(star, th.pi_star(P, "log_odds")) and np.array_equal(star, th.pi_star(P, cube))
        for psi in ("identity", "log_odds", cube):
            for r in (ref, ref2):
                assert th.value(star, P, r, psi) >= th.value(th.pi_bar(P, r, psi), P, r, psi) - 1e-12
        flips += not np.array_equal(th.pi_bar(P, ref, "identity"), th.pi_bar(P, ref2, "identity"))
    assert flips > 0  # pi_bar does depend on pi_ref in these worlds


def test_separable_preferences_leave_no_gap_under_log_odds():
    """Theorem 3.2 (iii): Psi(P) = c(y) - c(y') makes pi_star and pi_bar equally good."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        P, ref = th.random_world(rng, X=3, Y=6, kind="separable")
        v_star = th.value(th.pi_star(P, "log_odds"), P, ref, "log_odds")
        v_bar = th.value(th.pi_bar(P, ref, "log_odds"), P, ref, "log_odds")
        assert v_star == pytest.approx(v_bar, abs=1e-9)


def test_gibbs_target_encodes_the_choice_model():
    """Theorem 4.1: pi_r plugged into eq. 9's margin gives back P of eq. 6."""
    rng = np.random.default_rng(2)
    X, Y, beta = 2, 4, 0.5
    ref = rng.dirichlet(np.ones(Y), size=X)
    r = rng.normal(size=(X, Y, Y))
    P = th.choice_model(r, ref, beta)
    th.check_preferences(P)
    np.testing.assert_allclose(th.implied_preference(th.gibbs_target(r, ref, beta), ref, beta), P, atol=1e-10)


def test_symmetric_dpo_on_a_tabular_world_reaches_the_target_preference():
    """SGD on sampled, Bernoulli-labelled pairs: the trained conditioned policy's implied
    preference matches P (what the loss identifies), as pi_r's does."""
    rng = np.random.default_rng(3)
    X, Y, beta = 2, 4, 0.5
    ref = np.full((X, Y), 1.0 / Y)
    r = rng.normal(size=(X, Y, Y))
    P = th.choice_model(r, ref, beta)
    policy = train_tabular(P, ref, "dpo", "symmetric", beta=beta, steps=600, batch_size=2048, lr=0.05, seed=0)
    implied = th.implied_preference(policy.conditioned(), ref, beta)
    off_diag = ~np.eye(Y, dtype=bool)[None].repeat(X, 0)
    assert np.abs(implied - P)[off_diag].max() < 0.05
    # the context-only table is never touched by the symmetric loss
    np.testing.assert_allclose(policy.plain(), ref, atol=1e-12)


def test_plain_dpo_on_a_separable_world_reaches_its_closed_form():
    rng = np.random.default_rng(4)
    X, Y, beta = 2, 4, 1.0
    P, ref = th.random_world(rng, X, Y, kind="separable")
    policy = train_tabular(P, ref, "dpo", "none", beta=beta, steps=600, batch_size=2048, lr=0.05, seed=1)
    np.testing.assert_allclose(policy.plain(), dpo_target(P, ref, beta), atol=0.03)


def test_sample_pairs_follow_the_data_model():
    P = np.array([[[0.5, 0.8], [0.2, 0.5]]])
    ref = np.array([[0.5, 0.5]])
    x, yw, yl = sample_pairs(P, ref, 40000, np.random.default_rng(5))
    distinct = yw != yl
    assert (yw[distinct] == 0).mean() == pytest.approx(0.8, abs=0.01)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown Psi"):
        th.scores(np.full((1, 2, 2), 0.5), np.full((1, 2), 0.5), "logit")
    with pytest.raises(ValueError, match=r"P\[x, y, y'\] \+ P\[x, y', y\] = 1"):
        th.check_preferences(np.full((1, 2, 2), 0.7))
