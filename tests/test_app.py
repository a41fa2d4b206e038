"""The Gradio app in a real browser (Debian's chromium through Playwright), on 127.0.0.1.

Set INSPO_SCREENSHOTS=DIR to save a screenshot of each tab (how docs/screenshots/ was made).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import workbench_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A small world's pi_ref and a short INS-DPO run trained from it."""
    from inspo_core.trainer import reset_accelerate_state
    from inspo_core.config import TrainConfig
    from inspo_core.trainer import Trainer
    from inspo_core.worlds.token import TokenWorld, TokenWorldConfig, build_reference, sample_pairs

    root = tmp_path_factory.mktemp("app")
    runs = root / "runs"
    w = TokenWorld(TokenWorldConfig(hidden_size=32, pretrain_steps=80, pretrain_samples=600, n_contexts=2, n_items=4))
    ref = build_reference(w, root / "cache", log=lambda m: None)
    shutil.copytree(ref, runs / "pi_ref")
    pairs = sample_pairs(w, ref, 64, root / "pairs.jsonl", log=lambda m: None)
    reset_accelerate_state()
    Trainer(TrainConfig(model=str(runs / "pi_ref"), data=str(pairs), max_steps=4, batch_size=4, lr=1e-3, beta=0.5,
                        val_size=8, dedup=False, max_length=96, output_dir=str(runs / "ins-dpo"),
                        cache_dir=str(root / "cache"), eval_every=2)).run()
    return runs


@pytest.fixture(scope="module")
def app_url(runs_dir):
    with workbench_server("app", "--runs_dir", str(runs_dir), env={"GRADIO_ANALYTICS_ENABLED": "False"}) as base:
        yield base + "/"


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("chromium not installed")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        pg = browser.new_page(viewport={"width": 1300, "height": 1000})
        pg.goto(app_url)
        pg.get_by_role("button", name="Compare").wait_for(timeout=60_000)
        yield pg
        browser.close()


def shot(page, name):
    d = os.environ.get("INSPO_SCREENSHOTS")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(d) / f"{name}.png"), full_page=True)


def test_compare_shows_both_answers_and_the_verdict(page):
    page.get_by_label("Prompt", exact=True).fill("Ana is shopping today. Which single item should Ana buy?")
    page.get_by_role("button", name="Compare").click()
    verdict = page.get_by_text("P(A better) =")
    verdict.wait_for(timeout=60_000)
    a = page.get_by_label("Answer A").input_value()
    b = page.get_by_label("Answer B").input_value()
    assert a.strip() and b.strip()
    assert "oracle judge" in page.inner_text("body")
    shot(page, "arena")


def test_vote_is_logged(page, runs_dir):
    page.get_by_role("button", name="A better").click()
    page.get_by_text("Vote recorded").wait_for(timeout=30_000)
    rows = [json.loads(x) for x in (runs_dir / "votes.jsonl").read_text().splitlines()]
    assert rows[-1]["vote"] == "A better" and rows[-1]["answer_a"] == page.get_by_label("Answer A").input_value()
    assert rows[-1]["a"] and rows[-1]["b"] and "P(A better)" in rows[-1]["verdict"]
    page.get_by_role("button", name="Tie").click()  # one vote per comparison
    page.get_by_text("already has a vote").first.wait_for(timeout=30_000)
    assert len((runs_dir / "votes.jsonl").read_text().splitlines()) == len(rows)


def test_votes_take_nothing_from_the_browser(app_url):
    """The vote handler used to trust names, labels and answers sent by the client, so votes could be
    forged through the queue API. Its only input now is the session's server-side state."""
    import urllib.request

    config = json.loads(urllib.request.urlopen(app_url + "config", timeout=30).read())
    comps = {c["id"]: c for c in config["components"]}
    vote_buttons = {c["id"] for c in config["components"] if c.get("props", {}).get("value") in
                    ("A better", "B better", "Tie", "Both bad") and c["type"] == "button"}
    deps = [d for d in config["dependencies"] if any(t[0] in vote_buttons for t in d["targets"])]
    assert len(deps) == 4
    for d in deps:
        assert [comps[i]["type"] for i in d["inputs"]] == ["state"]


def test_anonymous_mode_sends_no_identities_before_the_vote(app_url, runs_dir):
    """The compare endpoint's outputs (what reaches the browser) carry the answers and the verdict,
    never which checkpoint produced which side."""
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    outputs = client.predict("ins-dpo/final", "pi_ref", "Ana is shopping today. Which single item should Ana buy?",
                             0.7, 0.95, 8, 0, "oracle", "", True, api_name="/compare")
    text = json.dumps(outputs)
    assert "P(A better)" in text
    assert "ins-dpo" not in text and "pi_ref" not in text


def test_dashboard_plots_the_run(page):
    page.get_by_role("tab", name="Dashboard").click()
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    assert "ins-dpo" in page.inner_text("body")
    shot(page, "dashboard")


def test_batch_tab_runs_a_prompt_set(page):
    page.get_by_role("tab", name="Batch").click()
    page.get_by_role("button", name="Run batch").click()
    page.get_by_text("win rate of A").wait_for(timeout=120_000)
    assert "length-controlled" in page.inner_text("body")
    shot(page, "batch")


def test_a_failing_judge_keeps_the_answers(page):
    """A judge that cannot run reports in the verdict; the streamed answers stay on the page."""
    page.get_by_role("tab", name="Arena").click()
    page.get_by_label("Judge model (reward model or judge LM)").fill("no-such-judge")
    page.get_by_label("Judge model (reward model or judge LM)").press("Tab")
    judge = page.get_by_label("Judge", exact=True).first
    judge.click()
    page.get_by_role("option", name="llm").click()
    page.get_by_label("Prompt", exact=True).fill("Ana is shopping today. Which single item should Ana buy?")
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("The llm judge failed").wait_for(timeout=60_000)
    assert page.get_by_label("Answer A").input_value().strip() and page.get_by_label("Answer B").input_value().strip()


def test_bad_path_shows_an_error_and_the_app_keeps_running(page):
    page.get_by_role("tab", name="Arena").click()
    box = page.get_by_label("Checkpoint A").first
    box.click()
    box.fill("/etc")
    box.press("Enter")
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("outside the runs directory").first.wait_for(timeout=30_000)
    assert page.get_by_role("button", name="Compare").is_enabled()


# ---- function level: the model cache, seeded streaming, votes, path and host rules ------------------

def _save_tiny(tokenizer, path, seed):
    from inspo_core.models import tiny_llama

    tiny_llama(len(tokenizer), seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _logits(model, ids=(5, 6, 7)):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def test_model_cache_loads_a_checkpoint_retrained_in_place(tmp_path, tokenizer):
    """The cache was keyed by path: weights rewritten in the same directory were never loaded again."""
    import torch

    from inspo_core.fingerprint import model_fingerprint
    from inspo_core.generation import ModelCache
    from inspo_core.models import load_model

    ck = _save_tiny(tokenizer, tmp_path / "ck", seed=0)
    cache = ModelCache()
    (m0, _, _), fp0 = cache.get_with_fingerprint(ck)
    assert fp0 == model_fingerprint(str(ck))
    assert cache.get(ck)[0] is m0  # unchanged: served from the cache
    _save_tiny(tokenizer, ck, seed=1)  # retrained in place
    expected = _logits(load_model(str(ck), dtype=torch.float32).eval())
    (m1, _, _), fp1 = cache.get_with_fingerprint(ck)
    assert fp1 == model_fingerprint(str(ck)) != fp0
    torch.testing.assert_close(_logits(m1), expected)
    assert not torch.allclose(_logits(m0), expected)  # the two seeds do differ


def test_stream_seed_reproduces_while_another_thread_uses_the_global_rng(tmp_path, tokenizer):
    """Both Arena sides seeded the process-wide RNG from their threads, so a seed gave other answers
    whenever the other side (here: a thread reseeding it in a loop) drew from it too."""
    import threading

    import torch

    from inspo_core.generation import ModelCache, stream_generate

    model, tok, builder = ModelCache().get(_save_tiny(tokenizer, tmp_path / "ck", seed=0))
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=24, seed=3)

    def answer():
        text = ""
        for text in stream_generate(model, tok, builder, "the cat sat", **kw):
            pass
        return text

    alone = answer()
    assert alone.strip()
    done = threading.Event()

    def noise():
        k = 0
        while not done.is_set():
            torch.manual_seed(k)
            torch.rand(8)
            k += 1

    t = threading.Thread(target=noise, daemon=True)
    t.start()
    try:
        with_noise = [answer() for _ in range(3)]
    finally:
        done.set()
        t.join()
    assert with_noise == [alone] * 3
    kw["seed"] = 4  # and the seed is what decides the sample
    assert answer() != alone


@pytest.fixture
def arena(tmp_path, tokenizer):
    from apps.arena import Workbench
    from apps.config import AppConfig

    runs = tmp_path / "runs"
    _save_tiny(tokenizer, runs / "a", seed=0)
    _save_tiny(tokenizer, runs / "b", seed=1)
    return Workbench(AppConfig(runs_dir=str(runs), cache_dir=str(tmp_path / "cache")))


def _compare_and_vote(wb, a="a", b="b"):
    from apps.arena import NO_JUDGE

    *_, state = list(wb.compare(a, b, "the cat sat", 1.0, 1.0, 8, 0, NO_JUDGE, "", False, None))[-1]
    wb.vote("A better", state)
    return json.loads(wb.votes.read_text().splitlines()[-1])


def test_vote_rows_carry_the_fingerprints_of_the_weights_that_answered(arena, tokenizer):
    """Vote rows held only the path: votes for old and new weights of one checkpoint were mixed."""
    from inspo_core.fingerprint import model_fingerprint

    before = {s: model_fingerprint(str(arena.root / s)) for s in "ab"}
    row = _compare_and_vote(arena)
    assert (row["a"], row["a_fingerprint"], row["b"], row["b_fingerprint"]) == ("a", before["a"], "b", before["b"])
    _save_tiny(tokenizer, arena.root / "a", seed=2)  # retrained in place
    after = model_fingerprint(str(arena.root / "a"))
    assert after != before["a"]
    row = _compare_and_vote(arena)
    assert (row["a"], row["a_fingerprint"], row["b_fingerprint"]) == ("a", after, before["b"])


def test_a_nul_byte_in_a_path_is_a_clear_error(arena):
    import gradio as gr

    for field in ("a\x00b", "/etc\x00"):
        with pytest.raises(gr.Error, match="NUL"):
            arena.resolve(field)
    # the checkpoint-change handlers (judges, example prompts) keep working
    assert arena.example_prompts("a\x00b") == []
    assert arena.judge_choices("a\x00b")[1] == "none (vote only)"


@pytest.mark.parametrize("host, remote", [
    ("127.0.0.1", False), ("127.0.0.2", False), ("127.1.2.3", False), ("::1", False), ("[::1]", False),
    ("localhost", False), ("LOCALHOST", False), ("0:0:0:0:0:0:0:1", False),
    ("0.0.0.0", True), ("::", True), ("192.168.1.4", True), ("10.0.0.1", True), ("example.org", True),
])
def test_host_warning_only_for_addresses_others_can_reach(host, remote):
    from apps.arena import host_warning

    assert (host_warning(host) is not None) == remote


def test_batch_is_the_eval_and_gives_its_numbers(runs_dir, tmp_path):
    """The Batch tab runs `workbench eval`'s pipeline: on the same checkpoints and settings it gives eval's win
    rate, interval and length-controlled win rate from the same judgements, into its own file, and a second
    batch judges nothing again."""
    from apps.arena import Workbench
    from apps.config import AppConfig
    from workbench.evaluation import EvalConfig, run_eval

    wb = Workbench(AppConfig(runs_dir=str(runs_dir), cache_dir=str(tmp_path / "cache")))
    a, b = "ins-dpo/final", "pi_ref"
    settings = dict(n_samples=2, temperature=0.7, top_p=0.95, max_new_tokens=16, seed=3)
    md, rows, csv_path = wb.batch(a, b, "oracle", "", 2, 0.7, 0.95, 16, 3, progress=lambda *x, **k: None)
    out = wb.batch_path(runs_dir / a, runs_dir / b)
    assert out.is_file() and out.parent == runs_dir / "batch" and Path(csv_path).is_file()
    batch = next(iter(json.loads(out.read_text())["results"].values()))
    doc = run_eval(EvalConfig(checkpoints=[str(runs_dir / a)], baseline=str(runs_dir / b), judge="oracle",
                              output=str(tmp_path / "eval.json"), **settings), log=lambda m: None)
    ev = next(iter(doc["results"].values()))
    assert ev["judge_calls"] == ev["n"] == len(rows) == 2 * len(wb.example_prompts(a))  # judged afresh
    for k in ("win_rate", "win_rate_ci", "lc_win_rate", "wins", "ties", "losses", "n", "fingerprint"):
        assert batch[k] == ev[k], k
    logged = [json.loads(line) for line in (tmp_path / "eval.judgements.jsonl").read_text().splitlines()]
    assert sorted(round(r["prob"], 4) for r in logged) == sorted(r[3] for r in rows)
    assert f"{ev['win_rate']:.3f}" in md
    md2, _, _ = wb.batch(a, b, "oracle", "", 2, 0.7, 0.95, 16, 3, progress=lambda *x, **k: None)
    assert "(0 judged now, " in md2
