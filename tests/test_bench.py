"""The benchmark's contract (rows and keys) on a tiny model; speed itself is not asserted here."""

import json

from workbench.bench import BenchConfig, check_targets, synthetic_pairs
from workbench.cli import main

CONTRACT = {"strategy", "packing", "reference", "pairs_per_s", "tokens_per_s", "tokens_processed", "peak_mem_mb"}


def test_bench_rows_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--prompt_len", "16", "--response_len", "8", "--batch_size", "2",
                 "--steps", "1", "--rounds", "1", "--warmup", "0", "--memory", "false", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert len(rows) == 12 and {(r["strategy"], r["packing"], r["reference"]) for r in rows} == {
        (s, p, r) for s in ("none", "symmetric", "averaged") for p in ("padded", "tree") for r in ("cached", "live")}
    for r in rows:
        assert CONTRACT <= set(r) and r["pairs_per_s"] > 0
    by = {(r["strategy"], r["packing"], r["reference"]): r for r in rows}
    # tokens processed follow from the layout: none padded = 2 rows of prompt + response per pair
    P, W, C = 16, 8, 8 + 1  # sep context: [SEP] + response without EOS + [SEP]
    assert by[("none", "padded", "cached")]["tokens_processed"] == 2 * 2 * (P + W)
    assert by[("none", "tree", "cached")]["tokens_processed"] == 2 * (P + 2 * W)
    assert by[("symmetric", "tree", "cached")]["tokens_processed"] == 2 * (P + 2 * C + 2 * W)
    assert "targets:" in capsys.readouterr().out and "symmetric/none time (tree)" in check_targets(rows)
    # peak memory, measured in a child process per configuration on CPU
    assert main(["bench", "--preset", "tiny", "--prompt_len", "16", "--response_len", "8", "--batch_size", "2",
                 "--steps", "1", "--rounds", "1", "--strategies", "symmetric", "--packings", "tree",
                 "--references", "cached", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["peak_mem_mb"] > 0


def test_raw_layout_lets_averaged_share_contexts():
    """With raw contexts the averaged tree is no bigger than the symmetric one (plain targets are the contexts)."""
    from inspo_core.packing import build_tree
    from inspo_core.strategies import required_views

    cfg = BenchConfig(preset="tiny", context_format="raw", batch_size=1)
    pair = synthetic_pairs(cfg, 1000)[0]
    size = lambda s: sum(len(x.tokens) for x in build_tree(pair, required_views(s, "dpo")[0]))  # noqa: E731
    assert size("averaged") == size("symmetric") == cfg.prompt_len + 4 * cfg.response_len
