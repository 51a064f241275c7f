"""A run's results: the rows of its CSV (`Table` indexes them by case), the CSV itself and the machine file
kept beside it. The targets and the report read the rows through these."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .cases import CSV_COLUMNS, SHAPES, SMOKE_SHAPES


def fnum(x) -> Optional[float]:
    if x is None or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


class Table:
    """Index of CSV rows by (loss, provider, mode, metric, shape, dtype)."""

    def __init__(self, rows: List[Dict]):
        self.rows = rows
        self.idx = {(r["loss"], r["provider"], r["mode"], r["metric"], r["shape"], r["dtype"]): r for r in rows}

    def get(self, loss, provider, mode, metric, shape, dtype) -> Optional[Dict]:
        return self.idx.get((loss, provider, mode, metric, shape, dtype))

    def val(self, *key) -> Optional[float]:
        r = self.get(*key)
        return fnum(r["p50"]) if r else None

    def note(self, *key) -> str:
        r = self.get(*key)
        return (r.get("note") or "") if r else ""

    def cases(self) -> List[Tuple[str, str, str, str, str]]:
        """(loss, shape_name, shape, dtype, group) in first-seen order."""
        seen, out = set(), []
        for r in self.rows:
            k = (r["loss"], r["shape_name"], r["shape"], r["dtype"])
            if k not in seen:
                seen.add(k)
                out.append(k)
        return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0.0) else None


def group_of(shape_name: str) -> str:
    for s in SHAPES + SMOKE_SHAPES:
        if s.name == shape_name:
            return s.group
    return ""


def parse_shape(shape: str) -> Tuple[int, int]:
    n, c = shape.split("x")
    return int(n), int(c)


def write_csv(rows: List[Dict], path: Path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def read_csv(path: Path) -> List[Dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# Machine keys that every CSV row also carries (as the column named here): what a CSV without its machine file
# still says about the run.
MACHINE_KEYS_IN_ROWS = {"device": "device", "threads": "threads", "torch": "torch_version",
                        "package_version": "package_version"}


def own_machine_file(csv_path: Path) -> Path:
    """Where a CSV kept under its own name (as in docs/) keeps its machine description."""
    return csv_path.with_name(csv_path.stem + ".machine.json")


def machine_file(csv_path: Path) -> Path:
    """The machine description of a results CSV: its own (above), else the `machine.json` the runner wrote beside
    its results.csv."""
    own = own_machine_file(csv_path)
    return own if own.exists() else csv_path.with_name("machine.json")


def load_machine(csv_path: Path, rows: List[Dict]) -> Tuple[Dict, Dict[str, str]]:
    """(machine info, skipped providers) for re-rendering `csv_path`: its machine file, with what the rows record
    filling the keys the file lacks (all of them when there is no file). A value the rows disagree on is left out."""
    path = machine_file(csv_path)
    info = json.loads(path.read_text()) if path.exists() else {}
    if not path.exists():
        print(f"NOTE: no machine file for {csv_path} ({path.name}): the Machine section has only what the rows record")
    skipped = info.pop("skipped", {})
    for key, column in MACHINE_KEYS_IN_ROWS.items():
        values = {r[column] for r in rows if r.get(column)}
        if info.get(key) in (None, "") and len(values) == 1:
            info[key] = values.pop()
    return info, skipped if isinstance(skipped, dict) else {}
