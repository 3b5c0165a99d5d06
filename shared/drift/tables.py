"""Tables from files: CSV with a header row (numbers where every value parses as one,
strings otherwise) or `.npz` (one array per column)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from shared.drift.job import DriftInputError, Table


def load_table(path: Path) -> Table:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if path.suffix == ".csv":
            return _csv(path)
    except OSError as exc:
        raise DriftInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise DriftInputError(f"{path}: not a readable table ({exc})") from exc
    raise DriftInputError(f"{path}: unknown table format (use .csv with a header row, or .npz)")


def _csv(path: Path) -> Table:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise DriftInputError(f"{path}: empty file (a header row is needed)")
        columns: list[list[str]] = [[] for _ in header]
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DriftInputError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            for col, value in zip(columns, row, strict=True):
                col.append(value)
    table: Table = {}
    for name, values in zip(header, columns, strict=True):
        table[name] = _typed(values)
    return table


def _typed(values: list[str]) -> np.ndarray[Any, Any]:
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError:
        return np.asarray(values, dtype=str)
