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


# ---- How much of the reflection can reach the deployed policy (issue 21) ----------------------------------

def _enumerated(pi_cond, P, ref, psi, rho=None):
    """Slow, obvious loops over x, y, y': the reflective value, the marginal's value and pi_bar's value."""
    f = th.psi_fn(psi)
    X, Y = ref.shape
    rho = np.full(X, 1.0 / X) if rho is None else rho
    refl = marg = best = 0.0
    for x in range(X):
        m = [sum(ref[x, z] * pi_cond[x, z, y] for z in range(Y)) for y in range(Y)]
        score = [sum(ref[x, z] * f(P[x, y, z]) for z in range(Y)) for y in range(Y)]
        for z in range(Y):  # the alternative y' ~ pi_ref that the conditioned policy sees
            for y in range(Y):
                refl += rho[x] * ref[x, z] * pi_cond[x, z, y] * f(P[x, y, z])
        for y in range(Y):  # the marginal, answering without an alternative, against a fresh y' ~ pi_ref
            for z in range(Y):
                marg += rho[x] * m[y] * ref[x, z] * f(P[x, y, z])
        best += rho[x] * max(score)  # pi_bar: the best deterministic prompt-only answer per prompt
    return refl, marg, best


CUBE = lambda q: (q - 0.5) ** 3  # noqa: E731  a strictly increasing Psi that is neither identity nor log-odds


def test_the_marginal_of_a_policy_that_ignores_the_alternative_is_that_policy():
    rng = np.random.default_rng(10)
    P, ref = th.random_world(rng, X=3, Y=5)
    q = rng.dirichlet(np.ones(5), size=3)  # [X, Y]
    blind = np.repeat(q[:, None, :], 5, axis=1)  # [X, Y', Y], the same row whatever y'
    np.testing.assert_allclose(th.marginalize(blind, ref), q, atol=1e-15)
    d = th.reflection_decomposition(blind, P, ref, "log_odds")
    assert d["reflective"] == pytest.approx(d["marginal"], abs=1e-12)
    assert th.adaptivity(blind, P, ref, "log_odds") == pytest.approx(0.0, abs=1e-12)


def test_reflective_and_marginal_values_match_an_enumeration():
    rng = np.random.default_rng(11)
    rho = np.array([0.2, 0.5, 0.3])
    for psi in ("identity", "log_odds", CUBE):
        P, ref = th.random_world(rng, X=3, Y=4)
        pi = rng.dirichlet(np.ones(4), size=(3, 4))  # [X, Y', Y]
        refl, marg, best = _enumerated(pi, P, ref, psi, rho)
        d = th.reflection_decomposition(pi, P, ref, psi, rho)
        assert d["reflective"] == pytest.approx(refl, abs=1e-12)
        assert d["marginal"] == pytest.approx(marg, abs=1e-12)
        assert d["pi_bar"] == pytest.approx(best, abs=1e-12)
        assert th.adaptivity(pi, P, ref, psi, rho) == pytest.approx(refl - marg, abs=1e-12)


def test_no_marginal_beats_pi_bar_on_random_worlds():
    """V(m) <= V(pi_bar) for the marginal of any conditioned policy, pi_star's included: pi_bar is the best
    prompt-only policy. pi_bar's value is checked against the best of the Y deterministic answers (enumerated)."""
    rng = np.random.default_rng(12)
    for i in range(150):
        P, ref = th.random_world(rng, X=1, Y=4, kind="general" if i % 3 else "separable")
        psi = ("identity", "log_odds", CUBE)[i % 3]
        pi = rng.dirichlet(np.full(4, 0.3), size=(1, 4))
        star = th.pi_star(P, psi)
        best = max(th.value(np.eye(4)[[y]], P, ref, psi) for y in range(4))
        v_bar = th.value(th.pi_bar(P, ref, psi), P, ref, psi)
        assert v_bar == pytest.approx(best, abs=1e-12)
        for cond in (pi, star):
            assert _enumerated(cond, P, ref, psi)[1] <= best + 1e-12
        assert th.value(star, P, ref, psi) >= v_bar - 1e-12


def test_rock_paper_scissors_by_hand():
    """Items R, P, S; the winner of each pair wins with probability 0.9; pi_ref = (0.6, 0.3, 0.1); Psi = identity.
    pi_star answers R with P, P with S, S with R, always winning: V(pi_star) = 0.9.
    S(R) = 0.6*0.5 + 0.3*0.1 + 0.1*0.9 = 0.42, S(P) = 0.6*0.9 + 0.3*0.5 + 0.1*0.1 = 0.70,
    S(S) = 0.6*0.1 + 0.3*0.9 + 0.1*0.5 = 0.38, so V(pi_bar) = 0.70 (always P).
    m* = (pi_ref(S), pi_ref(R), pi_ref(P)) = (0.1, 0.6, 0.3): V(m*) = 0.1*0.42 + 0.6*0.70 + 0.3*0.38 = 0.576.
    V(pi_ref) = 0.5 (identity: P - 1/2 is antisymmetric). Adaptivity of pi_star 0.9 - 0.576 = 0.324, regret
    0.70 - 0.576 = 0.124 (0.324 - 0.124 = 0.2 = V(pi_star) - V(pi_bar)); shares 0.076/0.4 = 0.19 and 0.2/0.4 = 0.5.
    With a uniform pi_ref every score is 1/3 (0.5 + 0.9 + 0.1) = 0.5: every prompt-only policy is worth 0.5."""
    beats = np.array([[0.5, 0.1, 0.9], [0.9, 0.5, 0.1], [0.1, 0.9, 0.5]])[None]  # P[x, y, y']
    ref = np.array([[0.6, 0.3, 0.1]])
    star = th.pi_star(beats)
    np.testing.assert_allclose(star[0], np.eye(3)[[1, 2, 0]])
    np.testing.assert_allclose(th.marginalize(star, ref), [[0.1, 0.6, 0.3]])
    assert th.dominant_response(beats)[0] == -1
    d = th.reflection_decomposition(star, beats, ref)
    assert d["reflective"] == pytest.approx(0.9) and d["pi_bar"] == pytest.approx(0.70)
    assert d["marginal"] == pytest.approx(0.576) and d["adaptivity"] == pytest.approx(0.324)
    assert d["marginal_regret"] == pytest.approx(0.124)
    t = th.distillation_values(beats, ref, ins_conditioned=star, ins_plain=ref, dpo_plain=np.array([[0, 1.0, 0]]))
    assert t["pi_ref"] == pytest.approx(0.5) and t["ins_deployed"] == pytest.approx(0.5)
    assert t["dpo_deployed"] == pytest.approx(0.70) and t["ins_reflective"] == pytest.approx(0.9)
    assert t["ins_marginal"] == pytest.approx(0.576) and t["pi_star_marginal"] == pytest.approx(0.576)
    assert t["bar_minus_star_marginal"] == pytest.approx(0.124)
    assert t["reachable_share"] == pytest.approx(0.19) and t["bar_share"] == pytest.approx(0.5)
    uniform = np.full((1, 3), 1 / 3)
    for q in (uniform, th.pi_bar(beats, uniform), th.marginalize(star, uniform), np.array([[0.2, 0.7, 0.1]])):
        assert th.value(q, beats, uniform) == pytest.approx(0.5)
    assert th.value(star, beats, uniform) == pytest.approx(0.9)


def test_proposition_3_1_world_what_distilling_pi_star_keeps():
    """Appendix B's world: pi_star answers y_a' with y1 (0.9 > 0.56 > 0.5) and y_b' with y2 (0.56 > 0.5 > 0.2),
    under any increasing Psi, so m* = pi_ref(y_a') y1 + pi_ref(y_b') y2 and V(m*) = sum_y' pi_ref(y') S(br(y')).
    Uniform, identity: V(pi_bar) = S(y2) = 0.56 (paper), V(pi_star) = 0.5*0.9 + 0.5*0.56 = 0.73,
    V(m*) = 0.5*0.55 + 0.5*0.56 = 0.555. Uniform, log-odds: V(pi_bar) = S(y1) = 0.5 log 9 + 0.5 log 0.25 ~ 0.41
    (paper), V(pi_star) = 0.5 log 9 + 0.5 log(0.56/0.44), V(m*) = 0.5 S(y1) + 0.5 log(0.56/0.44) ~ 0.5*0.41 +
    0.5*0.24. Skewed (0.9, 0.1), identity: V(pi_bar) = 0.83 (paper), V(pi_star) = 0.81 + 0.056 = 0.866,
    V(m*) = 0.9*0.83 + 0.1*0.56 = 0.803."""
    w = th.proposition_3_1()
    P = w["P"]
    lo = lambda q: np.log(q / (1 - q))  # noqa: E731
    s1 = 0.5 * np.log(9) + 0.5 * np.log(0.25)
    cases = [("identity", w["pi_ref_uniform"], 0.56, 0.73, 0.555),
             ("log_odds", w["pi_ref_uniform"], s1, 0.5 * np.log(9) + 0.5 * lo(0.56), 0.5 * s1 + 0.5 * lo(0.56)),
             ("identity", w["pi_ref_skewed"], 0.83, 0.866, 0.803)]
    for psi, ref, v_bar, v_star, v_marg in cases:
        star = th.pi_star(P, psi)
        np.testing.assert_allclose(star[0, 2:], np.eye(4)[[0, 1]])  # rows y_a', y_b'
        t = th.distillation_values(P, ref, ins_conditioned=star, ins_plain=ref, dpo_plain=ref, psi=psi)
        assert t["pi_bar"] == pytest.approx(v_bar) and t["pi_star"] == pytest.approx(v_star)
        assert t["pi_star_marginal"] == pytest.approx(v_marg)
        assert t["bar_minus_star_marginal"] == pytest.approx(v_bar - v_marg)
    assert round(cases[1][2], 2) == 0.41 and round(cases[1][4], 3) == round(0.5 * 0.4055 + 0.5 * 0.2412, 3)


def test_bradley_terry_the_marginal_of_pi_star_is_pi_bar():
    """Separable P = sigma(s (u(y) - u(y'))): for every y' the best answer is argmax u (P(y > y') grows with u(y)),
    under every increasing Psi and every pi_ref; so pi_star ignores y', m* = pi_bar = onehot(argmax u) and
    V(m*) = V(pi_bar) = V(pi_star) exactly, even where Psi(P) is not c(y) - c(y') (identity, a cube)."""
    from inspo_core.worlds.preferences import make_preferences

    for seed in range(6):
        rng = np.random.default_rng(seed)
        world = make_preferences("bradley_terry", 3, 6, rng, strength=(0.5, 3.0)[seed % 2])
        P, u = world["P"], world["utilities"]
        ref = rng.dirichlet(np.full(6, 0.5), size=3)
        onehot = np.eye(6)[u.argmax(1)]
        for psi in ("identity", "log_odds", CUBE):
            assert np.array_equal(th.dominant_response(P, psi), u.argmax(1))
            star = th.pi_star(P, psi)
            np.testing.assert_allclose(th.marginalize(star, ref), onehot, atol=1e-12)
            np.testing.assert_allclose(th.pi_bar(P, ref, psi), onehot, atol=1e-12)
            refl, marg, best = _enumerated(star, P, ref, psi)
            assert marg == pytest.approx(best, abs=1e-12) and refl == pytest.approx(best, abs=1e-12)
            t = th.distillation_values(P, ref, ins_conditioned=star, ins_plain=ref, dpo_plain=ref, psi=psi)
            assert t["bar_minus_star_marginal"] == pytest.approx(0.0, abs=1e-12)
            assert t["reachable_share"] == pytest.approx(1.0) and t["bar_share"] == pytest.approx(1.0)


def test_cyclic_worlds_no_dominant_response_and_nothing_reaches_a_uniform_reference():
    """The cyclic family at bt = 0 is a regular tournament (each item beats (Y-1)//2 items and loses to as many;
    with Y even the opposite item ties at 1/2). So with a uniform pi_ref every score is the same:
    identity S = [reach (sigma(s) + sigma(-s)) + (Y - 2 reach) / 2] / Y = 1/2, log-odds S = 0; every prompt-only
    policy, pi_bar and m* included, is worth V(pi_ref). No item best-answers itself, so m* is never a point mass
    and, with a Dirichlet pi_ref (no ties in S), V(m*) < V(pi_bar)."""
    from inspo_core.worlds.tabular import tabular_world

    for seed in range(3):
        for Y in (5, 6):
            P, ref = tabular_world("cyclic", n_contexts=3, n_items=Y, seed=seed, bt=0.0)
            uniform = np.full((3, Y), 1.0 / Y)
            star = th.pi_star(P)
            assert (th.dominant_response(P) == -1).all()
            assert th.marginalize(star, ref).max() < 1 - 1e-9
            for psi, level in (("identity", 0.5), ("log_odds", 0.0)):
                for q in (uniform, th.pi_bar(P, uniform, psi), th.marginalize(th.pi_star(P, psi), uniform)):
                    assert _enumerated(np.repeat(q[:, None], Y, 1), P, uniform, psi)[1] == pytest.approx(level, abs=1e-9)
            t = th.distillation_values(P, uniform, ins_conditioned=star, ins_plain=uniform, dpo_plain=uniform)
            assert t["pi_star"] > 0.9 and t["reachable_share"] == pytest.approx(0, abs=1e-9)
            assert t["bar_share"] == pytest.approx(0, abs=1e-9)
            t = th.distillation_values(P, ref, ins_conditioned=star, ins_plain=ref, dpo_plain=ref)
            assert t["bar_minus_star_marginal"] > 1e-3


def test_context_distillation_is_minimised_by_the_marginal():
    """E_{y'~pi_ref} KL(pi(.|x,y') || q) over q is smallest at q = m: the deployed policy that context
    distillation converges to is the marginal, whose value reflection_decomposition reports."""
    rng = np.random.default_rng(13)
    Y = 5
    ref = rng.dirichlet(np.ones(Y), size=1)
    pi = rng.dirichlet(np.full(Y, 0.5), size=(1, Y))
    m = th.marginalize(pi, ref)[0]

    def cd_loss(q):
        return sum(ref[0, z] * sum(pi[0, z, y] * np.log(pi[0, z, y] / q[y]) for y in range(Y)) for z in range(Y))

    for _ in range(200):
        q = rng.dirichlet(np.ones(Y))
        assert cd_loss(m) <= cd_loss(q) + 1e-12
    assert cd_loss(m) < cd_loss(0.99 * m + 0.01 * rng.dirichlet(np.ones(Y)))


def test_tabular_world_draws_the_token_worlds_preferences():
    from inspo_core.worlds.tabular import tabular_world
    from inspo_core.worlds.token import TokenWorld, TokenWorldConfig

    for family, kw in (("cyclic", {"bt": 1.0}), ("salience", {}), ("bradley_terry", {})):
        w = TokenWorld(TokenWorldConfig(family=family, seed=3, **kw))
        P, ref = tabular_world(family, seed=3, **kw)
        assert np.array_equal(w.P, P) and np.array_equal(w.pi_gen, ref)


def test_reflection_distillation_trains_both_policies_on_the_same_pairs():
    """The INS policy's plain head is never touched (deployed value = V(pi_ref)); its marginal and DPO's
    deployed policy are prompt-only, so neither beats pi_bar; the reflective value is below pi_star's."""
    from inspo_core.worlds.tabular import reflection_distillation, tabular_world

    P, ref = tabular_world("cyclic", n_contexts=2, n_items=5, seed=4)
    train = dict(beta=0.5, steps=120, batch_size=512, lr=0.05, seed=7)
    t = reflection_distillation(P, ref, **train)
    ins = train_tabular(P, ref, "dpo", "symmetric", **train)
    dpo = train_tabular(P, ref, "dpo", "none", **train)
    refl, marg, best = _enumerated(ins.conditioned(), P, ref, "identity")
    assert t["ins_reflective"] == pytest.approx(refl, abs=1e-12) and t["ins_marginal"] == pytest.approx(marg, abs=1e-12)
    assert t["pi_bar"] == pytest.approx(best, abs=1e-12)
    assert t["dpo_deployed"] == pytest.approx(_enumerated(np.repeat(dpo.plain()[:, None], 5, 1), P, ref, "identity")[1])
    assert t["ins_deployed"] == pytest.approx(t["pi_ref"], abs=1e-12) == 0.5  # identity: V(pi_ref) = 1/2
    np.testing.assert_allclose(ins.marginal(ref), th.marginalize(ins.conditioned(), ref))
    assert t["ins_marginal"] <= t["pi_bar"] and t["dpo_deployed"] <= t["pi_bar"] and t["pi_bar"] <= t["pi_star"]
    assert t["ins_reflective"] <= t["pi_star"] and t["ins_reflective"] > t["pi_ref"]
