"""KTO against TRL's KTOTrainer: the first step's loss and gradient on the same tiny model and batch.

Our side is independent of TRL's code: our builder tokenises the pairs, our log-prob engine scores
them, and `preference_loss("kto", ...)` computes the loss. TRL's side is its own trainer with its own
dataset preparation (unpairing, EOS, KL completions) and its `compute_loss`.

Conventions that differ, and how this test lines them up:
- TRL's KTO is unpaired: a paired dataset is unpaired into all desirable rows, then all undesirable
  rows, and its loss is the mean over that concatenation. Ours keeps the pair and gives each pair the
  mean of its two terms: with as many desirable as undesirable rows (paired data) the batch means are
  equal.
- TRL estimates z_ref from mismatched pairs made by rotating completions by one *within its per-device
  batch of unpaired rows* (x_k paired with the completion of row k - 1), and averages that estimate
  over processes before clamping. Our trainer has no mismatched-pair pass: without `kl_logratios`,
  z_ref comes from the micro-batch's own 2B log-ratios. Here we pass the same mismatched pairs TRL
  builds, scored by our engine, so the two z_ref agree.
- TRL's configs default to `bf16=True`, and accelerate then wraps the reference's forward in bf16
  autocast (seen as ~1e-3 differences in its summed log-probs); this test sets `bf16=False`.
- The policy and the reference are different models here (seeds 0 and 1): with a copy of the policy
  as reference every log-ratio is ~0 and every KTO loss is (lambda_D + lambda_U) / 4, which would
  test nothing.
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
BETA, LAMBDA_D, LAMBDA_U = 0.5, 1.0, 1.5


def _trl_first_step(tokenizer, policy, ref, tmp_path):
    import datasets
    from huggingface_hub import constants
    from trl import KTOConfig, KTOTrainer

    constants.HF_HUB_DISABLE_TELEMETRY = True  # offline, TRL's telemetry thread slows everything (bench.py)
    n = 2 * len(ROWS)  # one per-device batch holds every unpaired row, so TRL's rotation spans the batch
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=n, beta=BETA, desirable_weight=LAMBDA_D,
                     undesirable_weight=LAMBDA_U, use_cpu=True, report_to=[], logging_strategy="no",
                     save_strategy="no", max_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                     train_sampling_strategy="sequential", bf16=False)  # TRL's configs default to bf16
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(ROWS))
    rows = list(trainer.train_dataset)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    return rows, loss.detach(), grads, trainer._metrics["train"]["kl"][-1]


def _ours(tokenizer, policy, ref, kl_completions):
    """Loss and gradients with our builder, engine and objective; the mismatched pairs are TRL's
    (prompt k with the completion TRL rotated into row k), given as text."""
    views = [W_PLAIN, L_PLAIN]
    builder = ConditioningBuilder(tokenizer, BuilderConfig(prompt_format="plain", context_format="raw"), views)
    pairs = [builder.layout(builder.encode(r, i)) for i, r in enumerate(ROWS)]
    kl_rows = [{"prompt": p, "chosen": c, "rejected": c} for p, c in kl_completions]
    kl_pairs = [builder.layout(builder.encode(r, i)) for i, r in enumerate(kl_rows)]
    pad = tokenizer.pad_token_id or 0
    pol, refs = as_scorer(policy), as_scorer(ref)
    s = score_views(pol, pairs, views, pad_id=pad)
    s_kl = score_views(pol, kl_pairs, [W_PLAIN], pad_id=pad)
    with torch.no_grad():
        r = score_views(refs, pairs, views, pad_id=pad)
        r_kl = score_views(refs, kl_pairs, [W_PLAIN], pad_id=pad)
    out = preference_loss("kto", chosen_logps=s.logps[W_PLAIN], rejected_logps=s.logps[L_PLAIN],
                          ref_chosen_logps=r.logps[W_PLAIN], ref_rejected_logps=r.logps[L_PLAIN],
                          kl_logratios=s_kl.logps[W_PLAIN] - r_kl.logps[W_PLAIN], beta=BETA, lambda_d=LAMBDA_D,
                          lambda_u=LAMBDA_U)
    loss = out.losses.mean()
    loss.backward()
    z = (s_kl.logps[W_PLAIN] - r_kl.logps[W_PLAIN]).mean().clamp(min=0).item()
    grads = {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}
    return pairs, loss.detach(), grads, z


def test_kto_first_step_matches_trl(tokenizer, tmp_path, fresh_accelerate_state):
    pytest.importorskip("trl")
    # a wide initialisation gives log-ratios of order one (at the default 0.02 every logit is ~0)
    policy = tiny_llama(len(tokenizer), seed=0, initializer_range=0.3)
    ref = tiny_llama(len(tokenizer), seed=1, initializer_range=0.3).eval()
    trl_rows, trl_loss, trl_grads, trl_z = _trl_first_step(tokenizer, copy.deepcopy(policy), copy.deepcopy(ref),
                                                          tmp_path)
    # TRL's layout, checked rather than assumed: desirable rows first, then undesirable, in pair order;
    # row k's KL completion is row k-1's completion (cyclically)
    n = len(ROWS)
    assert [r["label"] for r in trl_rows] == [True] * n + [False] * n
    completions = [r["completion_ids"] for r in trl_rows]
    assert [r["KL_completion_ids"] for r in trl_rows] == [completions[k - 1] for k in range(2 * n)]
    texts = [r["chosen"] for r in ROWS] + [r["rejected"] for r in ROWS]
    prompts = [r["prompt"] for r in ROWS] * 2
    kl_completions = [(prompts[k], texts[k - 1]) for k in range(2 * n)]

    pairs, loss, grads, z = _ours(tokenizer, policy, ref, kl_completions)
    for i, pair in enumerate(pairs):  # the same tokens: prompt, and each completion with its EOS
        assert pair.prompt_ids == trl_rows[i]["prompt_ids"]
        assert pair.targets["chosen"] == trl_rows[i]["completion_ids"]
        assert pair.targets["rejected"] == trl_rows[n + i]["completion_ids"]
    assert z > 0.01 or trl_z == 0  # a reference point that matters (seed-dependent; see the assert below)
    assert_close(z, trl_z, atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - (LAMBDA_D + LAMBDA_U) / 4) > 1e-3  # not the policy = reference value
    assert_close(loss, trl_loss, atol=1e-6, rtol=1e-5)
    assert set(grads) == set(trl_grads)
    for k in grads:
        assert_close(grads[k], trl_grads[k], atol=1e-6, rtol=1e-4, msg=k)
