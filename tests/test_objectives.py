"""Objective tests. Expected values come from scalar formulas written out with `math` below
(transcribed from Table 1 and the baselines' papers), independent of the torch code."""

import math

import pytest
import torch
from torch.testing import assert_close

from inspo_core.objectives import HPARAM_NAMES, OBJECTIVES, preference_loss, resolve_hparams
from inspo_core.strategies import (
    L_GIVEN_L, L_GIVEN_W, L_PLAIN, STRATEGIES, W_GIVEN_L, W_PLAIN, reflection_gain, strategy_loss,
)


def softplus(z):  # -log sigma(-z) = log(1 + e^z)
    return math.log1p(math.exp(z))


def nls(z):  # -log sigma(z)
    return softplus(-z)


def logit_of_logp(lp):  # logit(p) with p = exp(lp)
    p = math.exp(lp)
    return math.log(p / (1 - p))


# Two examples: (c, r, rc, rr, lc, lr) = policy chosen/rejected, ref chosen/rejected, lengths.
EX = [(-1.0, -3.0, -1.5, -1.0, 2, 4), (-3.0, -1.0, -2.0, -2.5, 3, 1)]


def scalar_loss(name, c, r, rc, rr, lc, lr, hp):
    """Obvious scalar transcription of each objective."""
    m = (c - rc) - (r - rr)
    b = hp.get("beta")
    if name == "dpo":
        e = hp["label_smoothing"]
        return (1 - e) * nls(b * m) + e * nls(-b * m)
    if name == "robust":
        e = hp["label_smoothing"]
        return ((1 - e) * nls(b * m) - e * nls(-b * m)) / (1 - 2 * e)
    if name == "ipo":
        return (m - 1 / (2 * hp["tau"])) ** 2
    if name == "rdpo":
        return nls(b * m + hp["alpha"] * (lc - lr))
    if name == "hinge":
        return max(0.0, 1 - b * m)
    if name == "orpo":
        return -c / lc + hp["lam"] * nls(logit_of_logp(c / lc) - logit_of_logp(r / lr))
    if name == "simpo":
        return nls(b * c / lc - b * r / lr - hp["gamma"])
    if name == "cpo":
        return nls(b * c - b * r) - hp["lam"] * c / lc
    if name == "slic":
        return max(0.0, hp["gamma"] - c + r) - hp["lam"] * c / lc
    if name == "rrhf":
        return max(0.0, r / lr - c / lc) - hp["lam"] * c / lc
    if name == "kto":  # z_ref is batch-level: see scalar_batch
        sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
        z = hp["z"]
        return 0.5 * (hp["lambda_d"] * (1 - sig(b * ((c - rc) - z))) + hp["lambda_u"] * (1 - sig(b * (z - (r - rr)))))
    raise AssertionError(name)


def scalar_batch(name, rows, hp, kl=None):
    """scalar_loss over a batch of rows (c, r, rc, rr, lc, lr). KTO's z_ref = max(0, mean log-ratio) over
    the mismatched log-ratios `kl` when given, else over the batch's 2B own log-ratios."""
    if name == "kto":
        own = [c - rc for c, r, rc, rr, *_ in rows] + [r - rr for c, r, rc, rr, *_ in rows]
        pool = own if kl is None else kl
        hp = {**hp, "z": max(0.0, sum(pool) / len(pool))}
    return [scalar_loss(name, *row, hp) for row in rows]


def tensors():
    cols = list(zip(*EX))
    return [torch.tensor(col, dtype=torch.float64) for col in cols]


def call(name, **hp):
    c, r, rc, rr, lc, lr = tensors()
    return preference_loss(name, chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc,
                           ref_rejected_logps=rr, chosen_lengths=lc, rejected_lengths=lr, **hp)


def test_dpo_by_hand():
    """Example 0: margin = (-1 + 1.5) - (-3 + 1) = 2.5; beta = 0.1 -> logits 0.25;
    loss = log(1 + e^-0.25) = 0.57593; rewards 0.1 * 0.5 = 0.05 and 0.1 * -2 = -0.2."""
    out = call("dpo", beta=0.1)
    assert_close(out.losses[0].item(), 0.5759394, atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards[0].item(), 0.05)
    assert_close(out.rejected_rewards[0].item(), -0.2)


def test_ipo_by_hand():
    """Example 0: (2.5 - 1/(2*0.1))^2 = (2.5 - 5)^2 = 6.25."""
    assert_close(call("ipo", tau=0.1).losses[0].item(), 6.25)


def test_rdpo_by_hand():
    """Example 0: 0.1 * 2.5 + 0.1 * (2 - 4) = 0.05; loss = log(1 + e^-0.05) = 0.66846."""
    assert_close(call("rdpo", beta=0.1, alpha=0.1).losses[0].item(), 0.6684596, atol=1e-6, rtol=0)


def test_simpo_by_hand():
    """Example 0: 2 * (-1/2) - 2 * (-3/4) - 1 = -0.5; loss = log(1 + e^0.5) = 0.97408."""
    assert_close(call("simpo", beta=2.0, gamma=1.0).losses[0].item(), 0.9740770, atol=1e-6, rtol=0)


def test_orpo_by_hand():
    """Example 0: mean log-probs -0.5 and -0.75; logit(e^-0.5) = 0.43275, logit(e^-0.75) =
    -0.11064; loss = 0.5 + 0.1 * log(1 + e^-(0.54340)) = 0.5 + 0.1 * 0.45791 = 0.54579."""
    assert_close(call("orpo", lam=0.1).losses[0].item(), 0.5457913, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_matches_scalar_formula(name):
    hp = resolve_hparams(name, {})
    out = call(name)
    want = scalar_batch(name, EX, hp)
    assert_close(out.losses, torch.tensor(want, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_label_smoothing_zero_is_dpo():
    assert_close(call("dpo", beta=0.3, label_smoothing=0.0).losses, call("dpo", beta=0.3).losses)
    assert_close(call("robust", beta=0.3, label_smoothing=0.0).losses, call("dpo", beta=0.3).losses)


@pytest.mark.parametrize("name", [n for n, o in OBJECTIVES.items() if not o.needs_reference])
def test_reference_free_objectives_ignore_reference(name):
    c, r, rc, rr, lc, lr = tensors()
    a = preference_loss(name, chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc * 7,
                        ref_rejected_logps=rr - 3, chosen_lengths=lc, rejected_lengths=lr)
    b = preference_loss(name, chosen_logps=c, rejected_logps=r, chosen_lengths=lc, rejected_lengths=lr)
    assert_close(a.losses, b.losses)


def test_reference_objective_without_reference_is_an_error():
    c, r, *_ = tensors()
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss("dpo", chosen_logps=c, rejected_logps=r)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid objectives: dpo, ipo"):
        call("dpoo")
    with pytest.raises(ValueError, match="valid names: " + ", ".join(HPARAM_NAMES)):
        call("dpo", betta=0.1)
    with pytest.raises(ValueError, match="beta=-1.0 must be > 0"):
        call("dpo", beta=-1)


def test_gradient_direction_dpo():
    """-d loss / d chosen_logps > 0: DPO raises the chosen log-prob and lowers the rejected."""
    c = torch.tensor([-1.0], requires_grad=True)
    r = torch.tensor([-1.0], requires_grad=True)
    z = torch.zeros(1)
    preference_loss("dpo", chosen_logps=c, rejected_logps=r, ref_chosen_logps=z, ref_rejected_logps=z).losses.sum().backward()
    assert c.grad.item() < 0 < r.grad.item()
    assert_close(c.grad.item(), -0.1 * 0.5)  # beta * sigma(-0) = 0.05


# ---- strategies ---------------------------------------------------------------------------------

def view_logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {v: -torch.rand(3, generator=g, dtype=torch.float64) * 10 for v in
            [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W, L_GIVEN_L]}


LENGTHS = {"chosen": torch.tensor([3, 5, 2]), "rejected": torch.tensor([4, 1, 6])}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_averaged_limits(objective):
    pol, ref = view_logps(0), view_logps(1)
    kw = dict(policy_logps=pol, ref_logps=ref, lengths=LENGTHS)
    none = strategy_loss(objective, "none", **kw).losses
    sym = strategy_loss(objective, "symmetric", **kw).losses
    assert_close(strategy_loss(objective, "averaged", w=0.0, **kw).losses, none)
    assert_close(strategy_loss(objective, "averaged", w=1.0, **kw).losses, sym)
    assert_close(strategy_loss(objective, "averaged", w=0.25, **kw).losses, 0.75 * none + 0.25 * sym)


def test_symmetric_is_eq_10():
    """INS-DPO = -log sigma(beta [log pi(w|x,l)/pi_ref(w|x) - log pi(l|x,w)/pi_ref(l|x)])."""
    pol, ref = view_logps(0), view_logps(1)
    out = strategy_loss("dpo", "symmetric", policy_logps=pol, ref_logps=ref, lengths=LENGTHS, beta=0.2)
    for i in range(3):
        m = (pol[W_GIVEN_L][i] - ref[W_PLAIN][i]) - (pol[L_GIVEN_W][i] - ref[L_PLAIN][i])
        assert_close(out.losses[i].item(), nls(0.2 * m.item()))
    cond = strategy_loss("dpo", "symmetric", policy_logps=pol, ref_logps=ref, lengths=LENGTHS, beta=0.2,
                         ref_conditioning="conditioned")
    m = (pol[W_GIVEN_L][0] - ref[W_GIVEN_L][0]) - (pol[L_GIVEN_W][0] - ref[L_GIVEN_W][0])
    assert_close(cond.losses[0].item(), nls(0.2 * m.item()))


def test_one_sided_variants():
    pol, ref = view_logps(0), view_logps(1)
    kw = dict(policy_logps=pol, ref_logps=ref, lengths=LENGTHS)
    one = strategy_loss("dpo", "one_sided", **kw).losses[0].item()
    paper = strategy_loss("dpo", "one_sided_paper", **kw).losses[0].item()
    m1 = (pol[W_GIVEN_L][0] - ref[W_PLAIN][0]) - (pol[L_PLAIN][0] - ref[L_PLAIN][0])
    m2 = (pol[W_GIVEN_L][0] - ref[W_PLAIN][0]) - (pol[L_GIVEN_L][0] - ref[L_PLAIN][0])
    assert_close(one, nls(0.1 * m1.item()))
    assert_close(paper, nls(0.1 * m2.item()))


# The views each strategy feeds the objective, written out from the paper (Sec. 5.3, Table 4),
# independently of inspo_core.strategies: (weight, chosen view, rejected view).
PAPER_TERMS = {
    "none": [(1.0, W_PLAIN, L_PLAIN)],
    "symmetric": [(1.0, W_GIVEN_L, L_GIVEN_W)],  # eq. 10 / 16
    "one_sided": [(1.0, W_GIVEN_L, L_PLAIN)],
    "one_sided_paper": [(1.0, W_GIVEN_L, L_GIVEN_L)],  # Table 4 (ii) as printed
    "averaged": [(0.5, W_PLAIN, L_PLAIN), (0.5, W_GIVEN_L, L_GIVEN_W)],  # Table 4 (iv), w = 0.5
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if not STRATEGIES[s].imitate])  # distill: test_distill
def test_every_objective_with_every_strategy(objective, strategy):
    """Values against the scalar formula on the views the paper names for the strategy, with the
    plain reference pi_ref(y|x) of each target: swapping W|L and L|W, or plain and conditioned
    views, fails. Exactly the views used are in the graph."""
    pol = {v: t.clone().requires_grad_(True) for v, t in view_logps(0).items()}
    ref = view_logps(1)
    out = strategy_loss(objective, strategy, policy_logps=pol, ref_logps=ref, lengths=LENGTHS)
    hp = resolve_hparams(objective, {})
    want = [0.0] * 3
    for wt, c, r in PAPER_TERMS[strategy]:
        rows = [(pol[c][i].item(), pol[r][i].item(), ref[c.plain][i].item(), ref[r.plain][i].item(),
                 LENGTHS["chosen"][i].item(), LENGTHS["rejected"][i].item()) for i in range(3)]
        want = [w + wt * x for w, x in zip(want, scalar_batch(objective, rows, hp))]
    for i in range(3):
        assert_close(out.losses[i].item(), want[i], atol=1e-9, rtol=1e-9)
    out.losses.sum().backward()
    used = {v for _, c, r in PAPER_TERMS[strategy] for v in (c, r)}
    for v, t in pol.items():
        assert (t.grad is not None) == (v in used), v  # in the graph exactly when used (a hinge may be flat)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_length_normalize_against_the_scalar_formulas(name):
    """With length_normalize, objectives whose formula is on sums see per-token means of policy and
    reference (eq. 12/13); objectives that divide by |y| themselves refuse the flag instead of
    dividing twice."""
    c, r, rc, rr, lc, lr = tensors()
    kw = dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc, ref_rejected_logps=rr, chosen_lengths=lc,
              rejected_lengths=lr, length_normalize=True)
    if OBJECTIVES[name].normalizes_itself:
        with pytest.raises(ValueError, match="already divides by \\|y\\|"):
            preference_loss(name, **kw)
        return
    hp = resolve_hparams(name, {})
    want = scalar_batch(name, [(c_ / l_c, r_ / l_r, rc_ / l_c, rr_ / l_r, l_c, l_r) for c_, r_, rc_, rr_, l_c, l_r in EX], hp)
    assert_close(preference_loss(name, **kw).losses, torch.tensor(want, dtype=torch.float64), atol=1e-9, rtol=1e-9)


def test_reflection_gain():
    pol = view_logps(0)
    want = ((pol[W_GIVEN_L] - pol[W_PLAIN]) + (pol[L_GIVEN_W] - pol[L_PLAIN])) / 2
    assert_close(reflection_gain(pol), want)
    assert reflection_gain({W_PLAIN: pol[W_PLAIN], L_PLAIN: pol[L_PLAIN]}) is None


# ---- KTO -----------------------------------------------------------------------------------------

def test_kto_by_hand_with_mismatched_log_ratios():
    """EX gives r_w = (0.5, -1.0), r_l = (-2.0, 1.5). Mismatched log-ratios (0.3, 0.9): z = 0.6.
    beta 0.5, lambda_D 1, lambda_U 2. Example 0: desirable 1 - sigma(0.5 (0.5 - 0.6)) = 1 - sigma(-0.05)
    = 0.512497; undesirable 2 (1 - sigma(0.5 (0.6 + 2.0))) = 2 (1 - sigma(1.3)) = 0.428330; the pair's
    loss is their mean 0.470414. Example 1: 1 - sigma(-0.8) = 0.689974, 2 (1 - sigma(-0.45)) = 1.221278,
    mean 0.955626. Rewards beta r: (0.25, -0.5) and (-1.0, 0.75)."""
    c, r, rc, rr, lc, lr = tensors()
    out = preference_loss("kto", chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc, ref_rejected_logps=rr,
                          kl_logratios=torch.tensor([0.3, 0.9], dtype=torch.float64), beta=0.5, lambda_d=1.0,
                          lambda_u=2.0)
    assert_close(out.losses, torch.tensor([0.470414, 0.955626], dtype=torch.float64), atol=1e-6, rtol=0)
    assert_close(out.chosen_rewards, torch.tensor([0.25, -0.5], dtype=torch.float64))
    assert_close(out.rejected_rewards, torch.tensor([-1.0, 0.75], dtype=torch.float64))


def test_kto_reference_point_is_clamped_detached_and_batch_level():
    """z = max(0, mean): a negative mean gives z = 0 (the loss then equals the z = 0 formula); no gradient
    flows through z, so d loss_i / d c_i = -0.5 lambda_D beta sigma'(beta (r_w,i - z)) exactly; without
    mismatched log-ratios, changing example 1 changes example 0's loss (through z) when z > 0."""
    c, r, rc, rr, lc, lr = tensors()
    kw = dict(rejected_logps=r, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.5)
    neg = preference_loss("kto", chosen_logps=c, kl_logratios=torch.tensor([-1.0, 0.2], dtype=torch.float64), **kw)
    zero = preference_loss("kto", chosen_logps=c, kl_logratios=torch.zeros(1, dtype=torch.float64), **kw)
    assert_close(neg.losses, zero.losses)
    rw = (c - rc)
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    for kl, z in [(torch.tensor([0.3, 0.9], dtype=torch.float64), 0.6), (None, 0.0)]:
        cg = c.clone().requires_grad_(True)
        extra = {} if kl is None else {"kl_logratios": kl.clone().requires_grad_(True)}
        preference_loss("kto", chosen_logps=cg, **kw, **extra).losses.sum().backward()
        want = [-0.5 * 0.5 * sig(0.5 * (x - z)) * (1 - sig(0.5 * (x - z))) for x in rw.tolist()]
        assert_close(cg.grad, torch.tensor(want, dtype=torch.float64))
        if kl is not None:
            assert extra["kl_logratios"].grad is None
    # batch coupling through the matched estimate: raise example 1's chosen so the mean log-ratio is > 0
    c2 = c.clone()
    c2[1] = 10.0
    a = preference_loss("kto", chosen_logps=c2, **kw).losses[0]
    c3 = c2.clone()
    c3[1] = 20.0
    b = preference_loss("kto", chosen_logps=c3, **kw).losses[0]
    assert a.item() != b.item()


def test_kto_symmetric_takes_z_from_the_conditioned_views():
    """At initialisation (policy = reference) with a reflection gain g > 0 on every conditioned view,
    symmetric INS-KTO has r_w = r_l = g; z from the same views is g, so each term is
    lambda (1 - sigma(0)) = lambda / 2, as for plain KTO at initialisation: the offset cancels."""
    plain = -torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5
    g = 0.8
    pol = {W_PLAIN: plain, L_PLAIN: plain - 1, W_GIVEN_L: plain + g, L_GIVEN_W: plain - 1 + g}
    ref = {W_PLAIN: plain, L_PLAIN: plain - 1}
    lengths = {"chosen": torch.ones(4), "rejected": torch.ones(4)}
    for strategy in ("none", "symmetric"):
        out = strategy_loss("kto", strategy, policy_logps=pol, ref_logps=ref, lengths=lengths, lambda_u=3.0)
        assert_close(out.losses, torch.full((4,), 0.5 * (0.5 + 1.5), dtype=torch.float64))


def test_kto_inputs_are_checked():
    c, r, rc, rr, lc, lr = tensors()
    kw = dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc, ref_rejected_logps=rr)
    with pytest.raises(ValueError, match="kl_logratios given to objective 'dpo'.*applies to: kto"):
        preference_loss("dpo", kl_logratios=torch.zeros(2), **kw)
    with pytest.raises(ValueError, match="lambda_u=-1.0 must be >= 0"):
        preference_loss("kto", lambda_u=-1, **kw)
    with pytest.raises(ValueError, match="kl_logratios with length_normalize"):
        preference_loss("kto", kl_logratios=torch.zeros(2), length_normalize=True, chosen_lengths=lc,
                        rejected_lengths=lr, **kw)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss("kto", chosen_logps=c, rejected_logps=r)


def test_kto_config_fields():
    from inspo_core.config import TrainConfig

    assert TrainConfig(objective="kto", lambda_d=1.3, beta=0.2).objective_hparams() == {"beta": 0.2, "lambda_d": 1.3}
    with pytest.raises(ValueError, match="batch_size=1.*batch_size >= 2"):
        TrainConfig(objective="kto", batch_size=1)
    with pytest.raises(ValueError, match="lambda_d=-2.0 must be >= 0"):
        TrainConfig(objective="kto", lambda_d=-2.0)
