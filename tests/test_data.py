import json

import pytest

from inspo_core.data import load_rows, normalize_row, prepare_rows, split_rows

UF_ROW = {  # UltraFeedback-binarized layout
    "prompt": "Name a fruit.",
    "chosen": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}],
    "rejected": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A cat."}],
    "score_chosen": 8.0, "score_rejected": 3.0,
}


def test_formats_normalise_to_prompt_chosen_rejected():
    assert normalize_row({"prompt": "p", "chosen": "a", "rejected": "b"}, 0) == {"prompt": "p", "chosen": "a", "rejected": "b"}
    uf = normalize_row(UF_ROW, 0)
    assert uf["prompt"] == [{"role": "user", "content": "Name a fruit."}]
    assert (uf["chosen"], uf["rejected"], uf["score_chosen"]) == ("An apple.", "A cat.", 8.0)
    conv = normalize_row({"prompt": [{"role": "user", "content": "q"}],
                          "chosen": [{"role": "assistant", "content": "a"}],
                          "rejected": {"role": "assistant", "content": "b"}}, 0)
    assert conv == {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, r"row 7: missing field 'rejected'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, r"row 7: field 'chosen' is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, r"row 7: field 'chosen' must be a string"),
    ({"chosen": "a", "rejected": "b"}, r"row 7: missing field 'prompt'"),
    ({**UF_ROW, "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]},
     r"row 7: 'chosen' and 'rejected' conversations differ"),
])
def test_bad_rows_name_row_and_field(row, message):
    with pytest.raises(ValueError, match=message):
        normalize_row(row, 7)


def test_skipping_counts_instead_of_dropping_silently():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "", "rejected": "b"}]
    with pytest.raises(ValueError, match="row 1: field 'chosen' is empty.*skip_bad_rows"):
        prepare_rows(rows)
    kept, report = prepare_rows(rows, skip_bad_rows=True)
    assert len(kept) == 1 and report.dropped["malformed"] == 1 and report.bad_rows[0][0] == 1
    assert "1 dropped (malformed)" in report.summary()


def test_paper_filters_dedup_length_margin():
    rows = [
        {"prompt": "p", "chosen": "a b c", "rejected": "d", "score_chosen": 5, "score_rejected": 1},
        {"prompt": "p", "chosen": "a b c", "rejected": "d", "score_chosen": 5, "score_rejected": 1},  # duplicate
        {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 5, "score_rejected": 4.9},  # small margin
        {"prompt": "r", "chosen": "a b c d e f", "rejected": "b", "score_chosen": 9, "score_rejected": 1},  # too long
        {"prompt": "s", "chosen": "same", "rejected": "same", "score_chosen": 9, "score_rejected": 1},  # tie
    ]
    kept, report = prepare_rows(rows, min_margin=0.5, token_count=lambda t: len(t.split()), max_response_tokens=4)
    assert [r["prompt"] for r in kept] == ["p"]
    assert report.dropped == {"duplicate": 1, "margin below min_margin": 1,
                              "response longer than max_response_tokens": 1, "chosen equals rejected": 1}
    kept, _ = prepare_rows(rows[:1], token_count=lambda t: len(t.split()), min_response_tokens=4)
    assert kept == []  # both responses shorter than 4 tokens


def test_split_is_seeded_and_disjoint():
    rows = list(range(100))
    tr, va = split_rows(rows, 0.1, seed=3)
    assert len(va) == 10 and set(tr) | set(va) == set(rows) and not set(tr) & set(va)
    assert split_rows(rows, 0.1, seed=3) == (tr, va) and split_rows(rows, 0.1, seed=4) != (tr, va)
    assert len(split_rows(rows, 25, seed=0)[1]) == 25
    with pytest.raises(ValueError, match="leaves no training rows"):
        split_rows(rows[:3], 3, seed=0)


def test_local_files(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n\n")
    assert load_rows(str(p)) == [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_rows(str(bad))
    import pandas as pd

    pq = tmp_path / "d.parquet"
    pd.DataFrame([{"prompt": "p", "chosen": "a", "rejected": "b"}]).to_parquet(pq)
    assert load_rows(str(pq))[0]["chosen"] == "a"
    with pytest.raises(ValueError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_rows(str(tmp_path / "d.csv"))


def test_errors_name_the_file_line(tmp_path):
    """Row numbers in data errors were post-split and 0-based; now they are the file's line numbers,
    through the split and into the conditioning builder."""
    p = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    p.write_text(good + "\n\n" + good.replace('"p"', '"q"') + "\n" + json.dumps({"prompt": "r", "chosen": ""}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl line 4: missing field 'rejected'"):
        prepare_rows(load_rows(str(p)))
    p.write_text(good + "\n\n" + json.dumps({"prompt": "r", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl line 3: field 'chosen' is empty"):
        prepare_rows(load_rows(str(p)))
    kept, _ = prepare_rows(load_rows(str(p)), skip_bad_rows=True)
    assert kept[0]["_source"].endswith("d.jsonl line 1")


def test_empty_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl' holds no rows"):
        load_rows(str(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl: line 2 is not valid UTF-8"):
        load_rows(str(latin))
