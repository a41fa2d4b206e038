"""The World interface and its registry: what the demo runner, the transfer study, the judges and
the app need of a preference world with an exact oracle.

A world is a class registered under a name (`WORLDS`). The runner never asks which world it holds;
everything that differs between worlds is one of these members:

- `name`, `families`, `demo_defaults` (the demo settings whose default depends on the world),
  `from_demo(cfg)` (the world a demo config describes) and `fast(cfg)` (what `--fast` shrinks);
- `cfg` (a frozen dataclass with `key()`), `prompts` (the evaluation prompts), `preference(prompt, a,
  b)` -> P(a > b | prompt) and `explain(prompt, a, b)` (the oracle), `save(directory)` (world.json);
- `reference(cache_dir, log)` -> pi_ref's directory, `pairs(cache_dir, ref_dir, seed, n_pairs, log)`
  -> a labelled pairs file, `opponents(cache_dir, ref_dir, n, log)` -> the y' ~ pi_ref every policy is
  measured against (sampled once per world and cached under its key, shared by runs and seeds);
- `ceilings(opponents)` (what the header of the table states: exact ceilings, or the opponents'
  own reward), `measure(model_dir, ref_dir, opponents, settings, seed, log)` -> one row of
  measurements with per-prompt `cells` (so the runner can pair runs by prompt and seed),
  `frontier_point(...)` (KL and reward at T = 1, or None where the world has no reward);
- `run_settings(cfg)` (the training settings the world needs besides the demo's own),
  `reference_seeds(seeds)` (the seeds at which pi_ref's own row is measured), `table_columns`
  (extra columns of the printed table) and `describe(summary)` (the report's first paragraph).

A third world is one new module that defines such a class, registered with `register(cls)` (or named in
`BUILTIN` by its module path, as the built-in ones are).
"""

from __future__ import annotations

import json
from pathlib import Path

# the built-in worlds, by module path (imported when first asked for, so no world module imports this one)
BUILTIN = {"token": "inspo_core.worlds.token:TokenWorld", "sentiment": "inspo_core.worlds.sentiment:SentimentWorld"}
WORLDS: dict[str, type] = {}


def register(cls: type) -> type:
    """`cls` becomes available as world `cls.name` (usable as a class decorator)."""
    assert cls.name not in WORLDS and cls.name not in BUILTIN, f"world {cls.name!r} registered twice"
    WORLDS[cls.name] = cls
    return cls


def world_names() -> list[str]:
    return [*BUILTIN, *WORLDS]


def world_class(name: str) -> type:
    if name in WORLDS:
        return WORLDS[name]
    if name not in BUILTIN:
        raise ValueError(f"unknown world {name!r}; valid: {', '.join(world_names())}")
    import importlib

    module, _, attr = BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_world(doc: dict):
    """A world from its world.json contents ({"kind": name, **config}; no kind: a token world)."""
    doc = dict(doc)
    cls = world_class(doc.pop("kind", "token"))
    return cls(cls.config_class(**doc))


def read_world(directory: str | Path):
    """The world whose world.json sits in `directory`, or None."""
    p = Path(directory) / "world.json"
    return load_world(json.loads(p.read_text())) if p.is_file() else None
