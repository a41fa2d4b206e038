"""How much of INS-DPO's reflection could reach the deployed policy in a text world (the sentiment demo's runs).

In a text world the marginal m(y | x) = sum_y' pi_ref(y' | x) pi(y | x, y') cannot be enumerated, but its value is
measured already: the reflective policy answers after a draft y' ~ pi_ref (an opponent) and `V_others` compares
that answer with the *other* opponents, which are independent of the draft. Pooled over drafts and opponents that
is an unbiased estimate of V(m), what a perfect distillation of the reflection into a prompt-only policy would
score. This prints V(m) of each strategy beside the deployed values, and the paired differences, with the demo's
intervals (seeds x prompt subjects, `workbench.report`).

    PYTHONPATH=. python scripts/text_marginal.py runs/sentiment
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    from inspo_core.worlds.base import load_world
    from workbench.report import _interval

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs_dir", help="a sentiment demo's output directory (its summary.json)")
    args = ap.parse_args()
    doc = json.loads((Path(args.runs_dir) / "summary.json").read_text())
    world = load_world(doc["world"])
    runs = [r for r in doc["runs"] if r["objective"] != "pi_ref"]

    def cells(strategy: str, policy: str, key: str) -> np.ndarray:
        rs = sorted((r for r in runs if r["strategy"] == strategy), key=lambda r: r["seed"])
        return np.array([r[policy]["cells"][key] for r in rs])

    def show(label: str, m: np.ndarray) -> None:
        mean, lo, hi = _interval(m, world.clusters, world.prompts_sampled)
        print(f"{label:<44} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")

    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    base = "none" if "none" in strategies else strategies[0]
    dpo = cells(base, "deployed", "V_identity")
    for s in strategies:
        vm, dep = cells(s, "reflective", "V_others_identity"), cells(s, "deployed", "V_identity")
        show(f"{s}: V(m), the reflection's marginal", vm)
        show(f"{s}: V, deployed", dep)
        show(f"{s}: V(m) - its deployed V", vm - dep)
        if s != base:
            show(f"{s}: V(m) - {base}'s deployed V", vm - dpo)
            show(f"{s}: deployed V - {base}'s deployed V", dep - dpo)


if __name__ == "__main__":
    main()
