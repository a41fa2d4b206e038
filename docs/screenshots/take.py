"""Screenshots of the app on real runs (how the README's pictures are made).

    python docs/screenshots/take.py --runs_dir runs/sentiment --cache_dir .cache/inspo \
        --prompt "Write a one-sentence review of a roadside diner."

Starts `python -m workbench app` on 127.0.0.1, drives Debian's chromium with Playwright: one Arena
comparison with the oracle judge, the Dashboard of the runs, one Batch. Writes arena.png,
dashboard.png and batch.png beside this file (or --out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs_dir", required=True)
    ap.add_argument("--cache_dir", default=".cache/inspo")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--batch_samples", default="2")
    ap.add_argument("--a", help="checkpoint A (default: the app's)")
    ap.add_argument("--b", help="checkpoint B (default: the app's)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "app", "--runs_dir", args.runs_dir, "--cache_dir",
                             args.cache_dir, "--port", str(port)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        out = Path(args.out)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(url)
            page.get_by_role("button", name="Compare").wait_for(timeout=120_000)
            for label, value in (("Checkpoint A", args.a), ("Checkpoint B", args.b)):
                if value:
                    box = page.get_by_label(label).first
                    box.click()
                    box.fill(value)
                    box.press("Enter")
                    time.sleep(1)
            page.get_by_label("Prompt", exact=True).fill(args.prompt)
            page.get_by_role("button", name="Compare").click()
            page.get_by_text("P(A better) =").wait_for(timeout=600_000)
            page.screenshot(path=str(out / "arena.png"), full_page=True)
            page.get_by_role("tab", name="Dashboard").click()
            page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
            time.sleep(2)
            page.screenshot(path=str(out / "dashboard.png"), full_page=True)
            page.get_by_role("tab", name="Batch").click()
            for label, value in (("Checkpoint A", args.a), ("Checkpoint B", args.b)):
                if value:
                    box = page.get_by_label(label).nth(1)
                    box.click()
                    box.fill(value)
                    box.press("Enter")
                    time.sleep(1)
            samples = page.get_by_label("Samples per prompt").first  # the number box (the slider is second)
            samples.fill(args.batch_samples)
            samples.press("Enter")
            page.get_by_role("button", name="Run batch").click()
            page.get_by_text("win rate of A").wait_for(timeout=1_800_000)
            page.screenshot(path=str(out / "batch.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
