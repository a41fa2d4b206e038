"""Intervals that follow the evaluation's design (inspo_core.intervals), checked by hand and by
simulation from the model they assume."""

import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from inspo_core.intervals import cluster_interval, cluster_means, crossed_interval, seed_interval


def test_crossed_interval_by_hand():
    """y = [[1, 2, 3], [3, 4, 8]]: S = 2, X = 3, grand mean 3.5. Seed means 2, 5; prompt means 2, 3, 5.5.
    MS_seed = 3 * ((2-3.5)^2 + (5-3.5)^2) / 1 = 13.5; MS_prompt = 2 * (1.5^2 + 0.5^2 + 2^2) / 2 = 6.5;
    residuals y - seed - prompt + mean: [[0.5, 0.5, -1], [-0.5, -0.5, 1]] -> MS_error = 3 / 2 = 1.5.
    Var = (13.5 + 6.5 - 1.5) / 6 = 18.5 / 6. Satterthwaite df = 18.5^2 / (13.5^2/1 + 6.5^2/2 + 1.5^2/2)."""
    got = crossed_interval([[1, 2, 3], [3, 4, 8]])
    df = 18.5 ** 2 / (13.5 ** 2 + 6.5 ** 2 / 2 + 1.5 ** 2 / 2)
    half = student_t.ppf(0.975, df) * math.sqrt(18.5 / 6)
    assert got["mean"] == pytest.approx(3.5)
    assert got["df"] == pytest.approx(df)
    assert got["half"] == pytest.approx(half)
    assert (got["low"], got["high"]) == pytest.approx((3.5 - half, 3.5 + half))
    assert got["sd_error"] == pytest.approx(math.sqrt(1.5))


def test_crossed_interval_one_seed_is_the_prompt_interval():
    y = np.array([[0.2, 0.5, 0.9, 0.4]])
    got = crossed_interval(y)
    half = student_t.ppf(0.975, 3) * y[0].std(ddof=1) / 2
    assert got["half"] == pytest.approx(half)


def test_negative_components_are_clipped():
    """Identical seeds: MS_seed = 0 < MS_error; the variance keeps MS_prompt / (S X) only."""
    rng = np.random.default_rng(0)
    row = rng.normal(size=8)
    got = crossed_interval(np.stack([row, row, row]))
    S, X = 3, 8
    ms_x = S * row.var(ddof=1)
    assert got["half"] == pytest.approx(student_t.ppf(0.975, X - 1) * math.sqrt(ms_x / (S * X)))


@pytest.mark.parametrize("sd_seed,sd_prompt", [(0.05, 0.1), (0.0, 0.1), (0.1, 0.0)])
def test_crossed_interval_covers_at_its_level(sd_seed, sd_prompt):
    """Data drawn from y_sx = mu + a_s + b_x + e_sx (3 seeds, 30 prompts): the 95% interval covers mu in
    about 95% of 1500 draws (binomial sd 0.6%); the seed-only t-interval, which ignores the prompts'
    variation, covers far less when that variation is all there is."""
    rng = np.random.default_rng(1)
    S, X, mu, n = 3, 30, 0.6, 1500
    hit = hit_seed = 0
    for _ in range(n):
        y = (mu + sd_seed * rng.normal(size=(S, 1)) + sd_prompt * rng.normal(size=(1, X))
             + 0.08 * rng.normal(size=(S, X)))
        c = crossed_interval(y)
        hit += c["low"] <= mu <= c["high"]
        _, lo, hi = seed_interval(y.mean(1))
        hit_seed += lo <= mu <= hi
    assert 0.92 <= hit / n <= 0.99
    if sd_seed == 0:
        assert hit_seed / n < 0.85


def test_cluster_means_and_interval():
    cells = np.array([1.0, 3.0, 2.0, 6.0])
    assert cluster_means(cells, [7, 7, 2, 2]).tolist() == [2.0, 4.0]
    assert cluster_means(np.array([[1.0, 3.0], [5.0, 7.0]]), ["a", "a"]).tolist() == [[2.0], [6.0]]
    with pytest.raises(ValueError, match="3 cluster labels for 4 prompts"):
        cluster_means(cells, [1, 1, 2])
    m, lo, hi = cluster_interval(cells, n_boot=4000)
    assert m == 3.0 and 1.0 <= lo < 3.0 < hi <= 6.0
