"""Reading data files (jsonl, json, csv, parquet) with errors that name the file and the fix."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from vaa.errors import DataError, MissingFile


def read_rows(path: str | Path, start: int = 0, stop: int | None = None) -> list[dict]:
    """Rows of a data file, sliced [start:stop] (negative indices count from the end)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFile(f"data file not found: {p} (check the data / task config paths)")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}, line {i + 1}: not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        rows = json.loads(p.read_text(encoding="utf-8") or "[]")
        if not isinstance(rows, list):
            raise DataError(f"{p}: expected a JSON list of objects, got {type(rows).__name__}")
    elif suffix == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".parquet":
        import pandas as pd  # optional; only real datasets ship as parquet

        rows = pd.read_parquet(p).to_dict("records")
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{p}, row {i}: expected an object with named columns, got {row!r:.60}")
    if not rows:
        raise DataError(f"{p}: the file is empty; it needs at least one row")
    return rows[start:stop]
