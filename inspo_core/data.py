"""Preference data: loading, normalising formats, the paper's filters, a held-out split.

Formats accepted per row (after loading with `datasets`):
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages, `chosen` / `rejected` one assistant message
  (a dict, a one-element list, or a string);
- UltraFeedback-binarized: `chosen` / `rejected` are whole conversations ending in the assistant
  reply (the prompt is everything before it; `prompt` may also be present as a string), with
  optional `score_chosen` / `score_rejected`.

A malformed row raises a ValueError naming the row and field, or, when the caller asks for
skipping, is counted in the `DataReport`. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class DataReport:
    rows_read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    bad_rows: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.rows_read} rows read, {self.kept} kept"]
        parts += [f"{n} dropped ({why})" for why, n in sorted(self.dropped.items())]
        if self.bad_rows:
            parts.append(f"first bad row: #{self.bad_rows[0][0]}: {self.bad_rows[0][1]}")
        return "; ".join(parts)


class LoadedRows(list):
    """Rows as loaded, with where each came from (`locations[i]`: "file.jsonl line 7", 1-based), so
    an error names the line a user can open, not a position after filtering or splitting."""

    def __init__(self, rows, locations: list[str]):
        super().__init__(rows)
        self.locations = locations


def load_rows(source: str, split: str = "train") -> LoadedRows:
    """Rows of a local json/jsonl/parquet file or a Hugging Face dataset `split`."""
    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise ValueError(f"data file {source!r} not found")
        if path.suffix == ".jsonl":  # read directly: keeps line numbers exact and nested fields as-is
            rows, where = [], []
            for i, raw in enumerate(path.read_bytes().splitlines()):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{source}: line {i + 1} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                     "re-encode the file as UTF-8") from None
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{source}: line {i + 1} is not valid JSON ({e})") from None
                    where.append(f"{source} line {i + 1}")
            out = LoadedRows(rows, where)
        else:
            from datasets import load_dataset

            try:
                rows = list(load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{source}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            except Exception as e:  # datasets wraps parse errors in its own types
                raise ValueError(f"{source}: could not be read as {LOCAL_FORMATS[path.suffix]} ({e})") from None
            out = LoadedRows(rows, [f"{source} row {i + 1}" for i in range(len(rows))])
        if not out:
            raise ValueError(f"data file {source!r} holds no rows")
        return out
    if path.exists():
        raise ValueError(f"data {source!r}: unsupported file type; use .json, .jsonl or .parquet")
    from datasets import load_dataset

    rows = list(load_dataset(source, split=split))
    if not rows:
        raise ValueError(f"dataset {source!r} split {split!r} holds no rows")
    return LoadedRows(rows, [f"{source}[{split}] row {i}" for i in range(len(rows))])


def _is_messages(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def normalize_row(row: dict[str, Any], index: int | str) -> dict[str, Any]:
    """One row in any accepted format -> {prompt, chosen, rejected[, score_chosen, score_rejected]}.

    `prompt` stays a string or becomes a message list; `chosen` / `rejected` become strings.
    `index` names the row in errors: a position, or a location such as "data.jsonl line 7".
    """
    return _normalize(row, f"row {index}" if isinstance(index, int) else index)


def _normalize(row: dict[str, Any], index: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"{index}: expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise ValueError(f"{index}: missing field {name!r}")
    out: dict[str, Any] = {k: row[k] for k in ("score_chosen", "score_rejected") if k in row}
    chosen, rejected = row["chosen"], row["rejected"]
    if _is_messages(chosen) and len(chosen) > 1:  # whole conversations (UltraFeedback-binarized)
        if not _is_messages(rejected) or len(rejected) < 2:
            raise ValueError(f"{index}: field 'rejected' must be a conversation like 'chosen'")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError(f"{index}: 'chosen' and 'rejected' conversations differ before the last reply")
        for name, conv in (("chosen", chosen), ("rejected", rejected)):
            if conv[-1]["role"] != "assistant":
                raise ValueError(f"{index}: field {name!r} must end with an assistant message")
        out["prompt"] = [dict(role=m["role"], content=m["content"]) for m in chosen[:-1]]
        out["chosen"], out["rejected"] = chosen[-1]["content"], rejected[-1]["content"]
    else:
        if "prompt" not in row or row["prompt"] is None:
            raise ValueError(f"{index}: missing field 'prompt'")
        prompt = row["prompt"]
        if not (isinstance(prompt, str) or _is_messages(prompt)):
            raise ValueError(f"{index}: field 'prompt' must be a string or a list of {{role, content}} messages")
        out["prompt"] = prompt
        for name, v in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(v, dict):
                v = [v]
            if _is_messages(v):
                if len(v) != 1 or v[0]["role"] != "assistant":
                    raise ValueError(f"{index}: field {name!r} must be one assistant message")
                v = v[0]["content"]
            if not isinstance(v, str):
                raise ValueError(f"{index}: field {name!r} must be a string, got {type(v).__name__}")
            out[name] = v
    for name in ("chosen", "rejected"):
        if not isinstance(out[name], str) or not out[name].strip():
            raise ValueError(f"{index}: field {name!r} is empty")
    if isinstance(out["prompt"], str) and not out["prompt"].strip():
        raise ValueError(f"{index}: field 'prompt' is empty")
    return out


def prepare_rows(
    rows: list[dict[str, Any]],
    *,
    skip_bad_rows: bool = False,
    dedup: bool = True,
    min_margin: float | None = None,
    token_count=None,
    max_response_tokens: int | None = None,
    min_response_tokens: int | None = None,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Normalise and filter (Appendix D.2: dedup, length, margin). `token_count(text) -> int` is
    needed for the length filters."""
    report = DataReport(rows_read=len(rows))
    seen: set[str] = set()
    out = []
    locations = getattr(rows, "locations", None)
    for i, row in enumerate(rows):
        where = row.get("_source") if isinstance(row, dict) and "_source" in row else (
            locations[i] if locations else i)
        try:
            ex = normalize_row(row, where)
            ex["_source"] = where if isinstance(where, str) else f"row {where}"  # for later errors (the builder's)
        except ValueError as e:
            if not skip_bad_rows:
                raise ValueError(f"{e} (pass skip_bad_rows to skip and count such rows)") from None
            report.bad_rows.append((i, str(e)))
            report.dropped["malformed"] += 1
            continue
        if ex["chosen"] == ex["rejected"]:
            report.dropped["chosen equals rejected"] += 1
            continue
        if dedup:
            key = json.dumps([ex["prompt"], ex["chosen"], ex["rejected"]], sort_keys=True)
            if key in seen:
                report.dropped["duplicate"] += 1
                continue
            seen.add(key)
        if min_margin is not None:
            if "score_chosen" not in ex or "score_rejected" not in ex:
                raise ValueError(f"{ex['_source']}: min_margin needs score_chosen and score_rejected")
            if ex["score_chosen"] - ex["score_rejected"] < min_margin:
                report.dropped["margin below min_margin"] += 1
                continue
        if max_response_tokens is not None or min_response_tokens is not None:
            assert token_count is not None, "length filters need token_count"
            n = [token_count(ex["chosen"]), token_count(ex["rejected"])]
            if max_response_tokens is not None and max(n) > max_response_tokens:
                report.dropped["response longer than max_response_tokens"] += 1
                continue
            if min_response_tokens is not None and max(n) < min_response_tokens:
                report.dropped["both responses shorter than min_response_tokens"] += 1
                continue
        out.append(ex)
    report.kept = len(out)
    return out, report


def split_rows(rows: list, val_size: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded shuffle, `val_size` a fraction (<1) or a count (>=1)."""
    n_val = int(round(val_size * len(rows))) if val_size < 1 else int(val_size)
    if n_val >= len(rows):
        raise ValueError(f"val_size={val_size} leaves no training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [rows[i] for i in train], [rows[i] for i in val]
