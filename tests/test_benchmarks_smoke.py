"""The benchmark runner cannot rot: `benchmarks/run.py --smoke` (tiny shapes, one repetition) must produce a
CSV with a value for every available provider / mode / metric, the markdown table and the plots.
Not a timed test: timings are only checked to be numbers. Takes ~30 s on 2 busy cores."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))
from benchmarks import cases  # noqa: E402
from benchmarks.measure import quantiles  # noqa: E402
from benchmarks.providers import provider_status  # noqa: E402


def test_smoke_run_produces_csv_table_and_plots(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--device", "cpu",
                           "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == cases.CSV_COLUMNS
        rows = list(reader)
    assert rows, "empty CSV"

    available = [p for p in cases.PROVIDERS if provider_status(p)[0]]
    assert "floor" in available
    have = {(r["loss"], r["provider"], r["mode"], r["metric"], r["shape_name"]): r for r in rows}
    missing, empty = [], []
    for s in cases.SMOKE_SHAPES:
        for p in (p for p in available if p in s.providers):
            for mode in cases.MODES:
                for metric in cases.expected_metrics(p, mode):
                    r = have.get((s.loss, p, mode, metric, s.name))
                    if r is None:
                        missing.append((s.loss, p, mode, metric, s.name))
                    elif r["p50"] == "" or float(r["p50"]) < 0:
                        empty.append((s.loss, p, mode, metric, s.name, r["note"]))
    assert not missing, f"rows missing from the CSV: {missing[:10]}"
    assert not empty, f"rows without a value: {empty[:10]}"
    for r in rows:
        assert r["unit"] == cases.UNITS[r["metric"]]
        assert r["device"] == "cpu" and r["threads"] == "1" and r["torch_version"] and r["timestamp"]
        if r["metric"] == "time":
            assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])

    md = (out / "results.md").read_text()
    for heading in ("### Machine", "### Fused-linear losses", "### Headline", "### Peak memory",
                    "### Bytes kept for backward", "### Targets"):
        assert heading in md
    for loss in cases.LOSSES:
        png = out / "plots" / f"{loss}_float32.png"
        assert png.exists() and png.stat().st_size > 1000, png
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("item,expected", [("loss=ckd,kd", {"loss": ["ckd", "kd"]}),
                                           ("shape=tokens", {"shape": ["tokens"]})])
def test_parse_only(item, expected):
    assert cases.parse_only([item]) == expected


def test_parse_only_rejects_unknown_key():
    with pytest.raises(ValueError):
        cases.parse_only(["colour=red"])


def test_quantiles_and_shapes():
    assert quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [1.8, 3.0, 4.2]
    names = {s.name for s in cases.SHAPES}
    for n in ("cifar100-b64", "imagenet-b512", "contrastive-b4096", "tokens-2k-v8k", "tokens-8k-v1k",
              "tokens-1k-v8k", "scale-rows-64k", "scale-classes-32k", "gpu-tokens-16k-v128k"):
        assert n in names
    assert not any(s.cuda_only for s in cases.select_shapes("cpu"))
