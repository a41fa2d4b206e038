"""One plotly figure of a report.html as a PNG (how the README's frontier picture is made; kaleido is not needed).

    python docs/screenshots/figure.py runs/frontier/report.html docs/screenshots/frontier.png [--index 0]

Opens the report (plotly's JavaScript is inside it: no network) in Debian's chromium with Playwright and
screenshots its `--index`-th figure.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a report.html written by the workbench")
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--index", type=int, default=0, help="which figure of the page (0: the first)")
    ap.add_argument("--width", type=int, default=1100)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    report = Path(args.report).resolve()
    if not report.is_file():
        raise SystemExit(f"{report}: no such report")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        page.goto(report.as_uri())
        figs = page.locator(".js-plotly-plot")
        figs.first.wait_for(timeout=120_000)
        if args.index >= figs.count():
            raise SystemExit(f"{report} has {figs.count()} figures; --index {args.index} is not one of them")
        figs.nth(args.index).screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
