"""A notebook as a JupyterLab user sees it: `jupyter lab` on 127.0.0.1, the notebook opened in Debian's
chromium, Run All Cells, and plotly figures actually drawn on an offline machine (the renderer is
plotly's mime type, drawn by its JupyterLab extension; nothing is fetched from a CDN)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_for_http

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed")
def test_notebook_draws_plotly_figures_in_jupyterlab(tmp_path):
    from playwright.sync_api import sync_playwright

    shutil.copy(ROOT / "notebooks" / "01_invariance.ipynb", tmp_path / "01_invariance.ipynb")
    port, token = free_port(), "inspo-test-token"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "INSPO_NOTEBOOK_FAST": "1", "INSPO_NOTEBOOK_OUT": str(tmp_path / "out"),
           "INSPO_NOTEBOOK_CACHE": str(tmp_path / "cache"), "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(server, f"{base}/api/status?token={token}")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/01_invariance.ipynb?token={token}")
            page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
            time.sleep(5)  # the kernel comes up
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            page.locator(".js-plotly-plot").first.wait_for(timeout=300_000)
            # every code cell ran (an execution count in each prompt) and none raised
            deadline = time.time() + 300
            while time.time() < deadline:
                prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
                if prompts and all("[*]" not in t and t.strip() not in ("[ ]:", "") for t in prompts):
                    break
                time.sleep(1)
            assert prompts and all("[*]" not in t for t in prompts), prompts
            assert page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr'] .ansi-red-fg, "
                                ".jp-OutputArea-output .jp-RenderedText pre:has-text('Traceback')").count() == 0
            assert page.locator(".js-plotly-plot").count() >= 1
            assert page.locator(".js-plotly-plot .main-svg").count() >= 1  # drawn, not a placeholder
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
