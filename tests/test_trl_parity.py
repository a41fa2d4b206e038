"""The DPO family against TRL's DPOTrainer: the first step's loss and gradient on the same tiny model and batch.

Our side is independent of TRL's code: our builder tokenises the pairs (and the test checks the token ids
equal TRL's), our log-prob engine scores them, `preference_loss` computes the loss. TRL's side is its own
trainer, its own dataset preparation and its `compute_loss`. The policy and the reference are different
models (seeds 0 and 1, a wide initialisation), so the log-ratios are of order one and every loss is away
from its value at policy = reference.

Conventions, as this test measures them (docs/trl-migration.md states them for users):
- `sigmoid`, `hinge`, `robust` equal ours (`dpo`, `hinge`, `robust`) at TRL's `beta`.
- TRL's `ipo` averages the log-ratios per token; ours sums them as the paper's Table 1 writes IPO.
  `--length_normalize true` is TRL's convention, with our `tau` = TRL's `beta`.
- TRL 1.16's `sigmoid` ignores `label_smoothing` (conservative DPO is not applied); our `dpo` applies it.
"""

import copy

import pytest
import torch
from torch.testing import assert_close

from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
from inspo_core.logps import as_scorer
from inspo_core.models import tiny_llama
from inspo_core.objectives import preference_loss
from inspo_core.scoring import score_views
from inspo_core.strategies import L_PLAIN, W_PLAIN

ROWS = [
    {"prompt": "Name a fruit.", "chosen": " An apple, crisp and sweet.", "rejected": " A cat."},
    {"prompt": "Describe the sea.", "chosen": " Blue and wide.", "rejected": " The sea is salt water."},
    {"prompt": "Write a haiku.", "chosen": " the sea is blue", "rejected": " a dog"},
]
BETA = 0.5


@pytest.fixture(scope="module")
def models(tokenizer):
    policy = tiny_llama(len(tokenizer), seed=0, initializer_range=0.3)
    ref = tiny_llama(len(tokenizer), seed=1, initializer_range=0.3).eval()
    return policy, ref


def _trl(tokenizer, policy, ref, tmp_path, loss_type: str, label_smoothing: float = 0.0):
    import datasets
    from huggingface_hub import constants
    from trl import DPOConfig, DPOTrainer

    constants.HF_HUB_DISABLE_TELEMETRY = True
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(ROWS), beta=BETA,
                     loss_type=[loss_type], label_smoothing=label_smoothing, use_cpu=True, report_to=[],
                     logging_strategy="no", save_strategy="no", max_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0, bf16=False, max_length=None)  # TRL's configs default to bf16
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(ROWS))
    rows = list(trainer.train_dataset)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    return rows, loss.detach(), grads


def _ours(tokenizer, policy, ref, objective: str, **hparams):
    views = [W_PLAIN, L_PLAIN]
    builder = ConditioningBuilder(tokenizer, BuilderConfig(prompt_format="plain", context_format="raw"), views)
    pairs = [builder.layout(builder.encode(r, i)) for i, r in enumerate(ROWS)]
    pad = tokenizer.pad_token_id or 0
    s = score_views(as_scorer(policy), pairs, views, pad_id=pad)
    with torch.no_grad():
        r = score_views(as_scorer(ref), pairs, views, pad_id=pad)
    lengths = {v: torch.tensor([float(len(p.targets["chosen" if v == W_PLAIN else "rejected"])) for p in pairs])
               for v in views}
    out = preference_loss(objective, chosen_logps=s.logps[W_PLAIN], rejected_logps=s.logps[L_PLAIN],
                          ref_chosen_logps=r.logps[W_PLAIN], ref_rejected_logps=r.logps[L_PLAIN],
                          chosen_lengths=lengths[W_PLAIN], rejected_lengths=lengths[L_PLAIN], **hparams)
    loss = out.losses.mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}
    return pairs, loss.detach(), grads


def _both(tokenizer, models, tmp_path, trl_kw, ours_kw):
    policy, ref = models
    rows, trl_loss, trl_grads = _trl(tokenizer, copy.deepcopy(policy), copy.deepcopy(ref), tmp_path, **trl_kw)
    pairs, loss, grads = _ours(tokenizer, copy.deepcopy(policy), copy.deepcopy(ref), **ours_kw)
    for pair, row in zip(pairs, rows):  # the same tokens: prompt, and each completion with its EOS
        assert pair.prompt_ids == row["prompt_ids"]
        assert pair.targets["chosen"] == row["chosen_ids"]
        assert pair.targets["rejected"] == row["rejected_ids"]
    assert set(grads) == set(trl_grads)
    return loss, trl_loss, grads, trl_grads


CASES = {  # TRL's loss_type and settings -> ours
    "sigmoid": (dict(loss_type="sigmoid"), dict(objective="dpo", beta=BETA)),
    "hinge": (dict(loss_type="hinge"), dict(objective="hinge", beta=BETA)),
    "robust": (dict(loss_type="robust", label_smoothing=0.2), dict(objective="robust", beta=BETA, label_smoothing=0.2)),
    "ipo per token": (dict(loss_type="ipo"), dict(objective="ipo", tau=BETA, length_normalize=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_loss_and_gradient_equal_trl(case, tokenizer, models, tmp_path, fresh_accelerate_state):
    pytest.importorskip("trl")
    trl_kw, ours_kw = CASES[case]
    loss, trl_loss, grads, trl_grads = _both(tokenizer, models, tmp_path, trl_kw, ours_kw)
    assert_close(loss, trl_loss, atol=1e-6, rtol=1e-5)
    for k in grads:
        assert_close(grads[k], trl_grads[k], atol=1e-6, rtol=1e-4, msg=k)


def test_ipo_sums_where_trl_averages_per_token(tokenizer, models, tmp_path, fresh_accelerate_state):
    """Our default IPO is Table 1's (summed log-ratios); TRL's is per token: different losses, each its own
    formula (ours computed here from the summed log-ratios by hand)."""
    pytest.importorskip("trl")
    loss, trl_loss, _, _ = _both(tokenizer, models, tmp_path, dict(loss_type="ipo"), dict(objective="ipo", tau=BETA))
    policy, ref = models
    pairs, _, _ = _ours(tokenizer, copy.deepcopy(policy), copy.deepcopy(ref), "ipo", tau=BETA)
    views = [W_PLAIN, L_PLAIN]
    with torch.no_grad():
        s = score_views(as_scorer(policy), pairs, views, pad_id=tokenizer.pad_token_id or 0)
        r = score_views(as_scorer(ref), pairs, views, pad_id=tokenizer.pad_token_id or 0)
    margin = (s.logps[W_PLAIN] - r.logps[W_PLAIN]) - (s.logps[L_PLAIN] - r.logps[L_PLAIN])
    assert_close(loss, ((margin - 1 / (2 * BETA)) ** 2).mean(), atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - trl_loss.item()) > 1e-2


def test_trl_sigmoid_ignores_label_smoothing(tokenizer, models, tmp_path, fresh_accelerate_state):
    """TRL 1.16's sigmoid loss with label_smoothing 0.2 is plain DPO's; ours is conservative DPO's."""
    pytest.importorskip("trl")
    cdpo, trl_loss, _, _ = _both(tokenizer, models, tmp_path, dict(loss_type="sigmoid", label_smoothing=0.2),
                                 dict(objective="dpo", beta=BETA, label_smoothing=0.2))
    policy, ref = models
    _, plain, _ = _ours(tokenizer, copy.deepcopy(policy), copy.deepcopy(ref), "dpo", beta=BETA)
    assert_close(trl_loss, plain, atol=1e-6, rtol=1e-5)
    assert abs(cdpo.item() - plain.item()) > 1e-3
