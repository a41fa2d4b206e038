import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from inspo_core.logps import TokenLogps, chunked_head_logps, sequence_logps
from inspo_core.models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def random_batch(vocab, R=3, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (R, T), generator=g)
    lengths = torch.tensor([T, T - 5, T - 9])[:R]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    target = torch.zeros(R, T, dtype=torch.bool)
    for r, n in enumerate(lengths.tolist()):
        target[r, n // 2 : n] = True
    return ids, mask, target


def test_chunked_equals_full_per_token_and_in_gradients():
    """Per token to 1e-5 in fp32, with chunks far smaller than the number of scored positions."""
    model = tiny_llama(1000, hidden_size=32, seed=1)
    ids, mask, target = random_batch(1000)
    rows, cols = target[:, 1:].nonzero(as_tuple=True)
    tiny_chunk_mb = 7 * 4 * 1000 / 2**20  # 7 positions per chunk
    full = TokenLogps(model, method="full")(ids, mask, rows, cols)
    model.zero_grad()
    full.sum().backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = TokenLogps(model, method="chunked", chunk_mb=tiny_chunk_mb)(ids, mask, rows, cols)
    chunked.sum().backward()
    assert_close(chunked, full, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        assert_close(p.grad, g_full[n], atol=1e-5, rtol=1e-4, msg=n)


def test_sequence_sums_match_manual_sum():
    model = tiny_llama(500, seed=2).eval()
    ids, mask, target = random_batch(500, seed=3)
    with torch.no_grad():
        out = sequence_logps(model, ids, mask, target)
        logp = model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
    for r in range(ids.shape[0]):
        want = sum(logp[r, t - 1, ids[r, t]].item() for t in range(ids.shape[1]) if target[r, t])
        assert_close(out.sum[r].item(), want, atol=1e-5, rtol=1e-6)
        assert out.count[r].item() == target[r].sum().item()
        assert_close(out.mean[r].item(), want / target[r].sum().item(), atol=1e-6, rtol=1e-6)


def test_softcap_is_applied():
    head = torch.nn.Linear(8, 50, bias=False)
    h, t = torch.randn(5, 8) * 30, torch.randint(0, 50, (5,))
    capped = chunked_head_logps(head, h, t, chunk=2, softcap=3.0)
    logits = 3.0 * torch.tanh(head(h) / 3.0)
    assert_close(capped, logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1))


def test_lora_model_goes_through_the_chunked_path():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(300, seed=4)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask, target = random_batch(300)
    with torch.no_grad():
        a = sequence_logps(lora, ids, mask, target).sum
        b = sequence_logps(lora, ids, mask, target, method="full").sum
        with lora.disable_adapter():
            c = sequence_logps(lora, ids, mask, target).sum
    assert_close(a, b, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(a, c)  # adapters matter, and disabling them gives the base model


@pytest.mark.slow
def test_chunked_peak_memory_is_bounded_for_a_128k_vocabulary():
    """Measured in subprocesses (peak RSS growth over one forward + backward): the full path holds
    fp32 [T, 128k] logits (~0.5 GB at T=1024) several times over; the chunked path stays flat in T."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def probe(method, T):
        out = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), method, "128000", str(T), "32"],
                             capture_output=True, text=True, env=env, check=True)
        return float(out.stdout.strip())

    full = probe("full", 1024)
    short, long = probe("chunked", 256), probe("chunked", 1024)
    assert full > 1000, full  # the naive path really materialises the logits
    assert long < full / 4, (long, full)
    assert long - short < 64, (short, long)  # no growth with sequence length beyond hidden states


def _plain_head_logps(head, h, t):
    """The obvious way: whole logits, log-softmax, gather (autograd through all of it)."""
    return head(h).float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)


@pytest.mark.parametrize("bias", [False, True])
def test_a_frozen_head_forms_its_gradient_in_the_forward(bias):
    """Values and d/dh of the fused frozen-head path equal the plain head's (chunks smaller than N), and
    it runs two [n, H] x [H, V] products per chunk where checkpointing runs three (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=bias).requires_grad_(False)
    h0, t = torch.randn(23, 16), torch.randint(0, 300, (23,))
    w = torch.randn(23)  # a weighted sum: each row's incoming gradient differs
    h = h0.clone().requires_grad_()
    want = _plain_head_logps(head, h, t)
    (want * w).sum().backward()
    g_want = h.grad.clone()
    got_grads = {}
    flops = {}
    for fused in (True, False):
        h = h0.clone().requires_grad_()
        with FlopCounterMode(display=False) as fc:
            got = chunked_head_logps(head, h, t, chunk=5, fused=fused)
            (got * w).sum().backward()
        flops[fused] = fc.get_total_flops()
        assert_close(got, want, atol=1e-6, rtol=1e-6)
        got_grads[fused] = h.grad.clone()
    assert_close(got_grads[True], g_want, atol=1e-6, rtol=1e-5)
    assert_close(got_grads[False], g_want, atol=1e-6, rtol=1e-5)
    gemm = 2 * 23 * 16 * 300  # one [23, 16] x [16, 300] product, in FLOPs
    assert flops[True] == 2 * gemm and flops[False] == 3 * gemm


def test_a_trained_head_is_checkpointed_and_its_weight_gets_gradients():
    """The fused path is for frozen heads only: a trained head's weight gradient equals the plain head's."""
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 40, bias=False)
    h, t = torch.randn(9, 8, requires_grad=True), torch.randint(0, 40, (9,))
    _plain_head_logps(head, h, t).sum().backward()
    g_w, g_h = head.weight.grad.clone(), h.grad.clone()
    head.weight.grad, h.grad = None, None
    chunked_head_logps(head, h, t, chunk=4).sum().backward()
    assert_close(head.weight.grad, g_w, atol=1e-6, rtol=1e-5)
    assert_close(h.grad, g_h, atol=1e-6, rtol=1e-5)


def test_lora_on_a_tied_model_trains_through_the_fused_head_like_the_full_path():
    """LoRA on every linear layer leaves the (tied) head frozen: the chunked scorer takes the fused path,
    and the adapters' gradients equal the full-logits path's."""
    from peft import LoraConfig, get_peft_model

    import inspo_core.logps as lp

    base = tiny_llama(300, hidden_size=32, seed=5)
    base.config.tie_word_embeddings = True
    base.tie_weights()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    lora = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    _, head, _ = lp.split_model(lora)
    assert lp._frozen_plain_head(head)
    ids, mask, target = random_batch(300)
    rows, cols = target[:, 1:].nonzero(as_tuple=True)
    grads = {}
    for method in ("chunked", "full"):
        lora.zero_grad()
        TokenLogps(lora, method=method, chunk_mb=5 * 4 * 300 / 2**20)(ids, mask, rows, cols).sum().backward()
        grads[method] = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    assert grads["full"] and set(grads["full"]) == set(grads["chunked"])
    for n in grads["full"]:
        assert_close(grads["chunked"][n], grads["full"][n], atol=1e-5, rtol=1e-4, msg=n)
