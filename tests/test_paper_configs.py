"""The paper's 20 configurations train as written, with only the model, the data and the lengths made tiny.

Each `configs/paper/*.yaml` runs 2 optimizer steps in one process on the toy pairs with a tiny Llama; the
run's own record (`config.yaml`) must show the objective, strategy, hyperparameters, batch layout and
precision the file asks for. The engine comes from the launcher (`docs/cluster.md`); with none it is `none`,
and the launcher's choice is tested in tests/test_launch.py and tests/test_docs_commands.py.
"""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
TOY = str(ROOT / "examples" / "toy_preferences.jsonl")
# what is made tiny: the model, the data (the hub's UltraFeedback and its length filters) and the lengths
TINY = dict(model="tiny", tiny_hidden=32, tiny_layers=2, data=TOY, eval_data=None, val_size=8, max_length=64,
            max_response_tokens=None, min_response_tokens=None, max_steps=2)


def test_the_paper_ships_twenty_configurations():
    names = {p.stem for p in CONFIGS}
    assert names == {f"{m}-{o}-{s}" for m in ("mistral-7b", "llama3-8b") for o in ("dpo", "ipo", "rdpo", "orpo", "simpo")
                     for s in ("none", "symmetric")}


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_config_trains_as_the_file_asks(path, tmp_path, fresh_accelerate_state):
    from inspo_core.config import TrainConfig, load_config
    from inspo_core.trainer import Trainer

    asked = yaml.safe_load(path.read_text())
    cfg = load_config(TrainConfig, str(path), {**TINY, "output_dir": str(tmp_path / "run"),
                                               "cache_dir": str(tmp_path / "cache")})
    res = Trainer(cfg).run()
    assert res.steps == 2
    ran = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for key, value in asked.items():
        if key not in TINY and key not in ("output_dir", "data_split", "eval_split", "epochs"):
            assert ran[key] == value, (key, ran[key], value)
    assert ran["bf16"] is True and ran["sharding"] == "none"  # bf16 as the paper; no launcher: one process
    assert ran["objective"] == asked.get("objective", "dpo") and ran["strategy"] == asked.get("strategy", "symmetric")
