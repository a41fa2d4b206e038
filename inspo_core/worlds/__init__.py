"""Synthetic preference worlds with exact oracles: tabular (finite X, Y), token worlds (a tiny LM
pi_ref on short texts) and the sentiment world (SmolLM2 as pi_ref, VADER behind the preference).
Token and sentiment worlds implement one interface (`inspo_core.worlds.base`), registered by name."""

from __future__ import annotations

from pathlib import Path

from inspo_core.worlds.base import WORLDS, load_world, read_world, world_class, world_names  # noqa: F401


def world_of(model_dir: str | Path):
    """(world, pi_ref dir) when `model_dir` is a world's pi_ref (a token world's, with world.json) or a
    checkpoint trained in a world (a run's final/, best/, checkpoints/step-N/ or the run itself, whose
    starting model or training data sits beside a world.json); else None."""
    from inspo_core.rundir import RunDir

    p = Path(model_dir)
    world = read_world(p)
    if world is not None:
        return world, p
    run = RunDir.of_model(p)
    if run is None:
        return None
    conf = run.read_config()
    ref = Path(str(conf.get("resolved_model", "")))
    for cand in (ref, Path(str(conf.get("data", ""))).parent):
        if str(cand) not in ("", ".") and (cand / "world.json").is_file():
            return read_world(cand), ref
    return None
