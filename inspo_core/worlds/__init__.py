"""Synthetic preference worlds with exact oracles: tabular (finite X, Y), token worlds (a tiny LM
pi_ref on short texts) and the sentiment world (SmolLM2 as pi_ref, VADER behind the preference)."""

from __future__ import annotations

import json
from pathlib import Path


def load_world(doc: dict):
    """A world from its world.json contents."""
    doc = dict(doc)
    if doc.pop("kind", "token") == "sentiment":
        from inspo_core.worlds.sentiment import SentimentWorld, SentimentWorldConfig

        return SentimentWorld(SentimentWorldConfig(**doc))
    from inspo_core.worlds.token import TokenWorld, TokenWorldConfig

    return TokenWorld(TokenWorldConfig(**doc))


def world_of(model_dir: str | Path):
    """(world, pi_ref dir) when `model_dir` is a world's pi_ref (a token world's, with world.json) or a
    checkpoint trained in a world (a run's final/, best/, checkpoints/step-N/ or the run itself, whose
    starting model or training data sits beside a world.json); else None."""
    from inspo_core.rundir import RunDir

    p = Path(model_dir)
    if (p / "world.json").is_file():
        return load_world(json.loads((p / "world.json").read_text())), p
    run = RunDir.of_model(p)
    if run is None:
        return None
    conf = run.read_config()
    ref = Path(str(conf.get("resolved_model", "")))
    for cand in (ref, Path(str(conf.get("data", ""))).parent):
        if str(cand) not in ("", ".") and (cand / "world.json").is_file():
            return load_world(json.loads((cand / "world.json").read_text())), ref
    return None
