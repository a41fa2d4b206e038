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
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed")


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
                        cache_dir=str(root / "cache"), eval_every=2)).train()
    return runs


@pytest.fixture(scope="module")
def app_url(runs_dir):
    with workbench_server("app", "--runs_dir", str(runs_dir), env={"GRADIO_ANALYTICS_ENABLED": "False"}) as base:
        yield base + "/"


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

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
