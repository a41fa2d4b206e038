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
