"""The benchmark runner cannot rot: `benchmarks/run.py --smoke` (tiny shapes, one repetition) must produce a
CSV with a value for every available provider / mode / metric, the markdown table and the plots.
Not a timed test: timings are only checked to be numbers. Takes ~30 s on 2 busy cores."""
from __future__ import annotations

import csv
import json
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
    machine = json.loads((out / "machine.json").read_text())
    section = _machine_section(md)
    assert machine["cpu"] and f"- {machine['cpu']}, {machine['cpu_count']} cores," in section
    assert "None" not in section and "not recorded" not in section, section
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


def _machine_section(md: str) -> str:
    return md.split("### Machine", 1)[1].split("###", 1)[0]


def _rerender(tmp_path, csv_name, machine=None):
    """Re-renders a few rows of the committed CPU run from a copy named `csv_name`, with `machine` as its
    `<stem>.machine.json` (none when None); returns the Machine section of results.md."""
    from benchmarks import run
    src = sorted((ROOT / "docs").glob("benchmarks-cpu-*.csv"))[-1]
    lines = src.read_text().splitlines()[:13]
    data = tmp_path / "data"
    data.mkdir()
    csv_path = data / csv_name
    csv_path.write_text("\n".join(lines) + "\n")
    if machine is not None:
        (data / (csv_path.stem + ".machine.json")).write_text(json.dumps(machine))
    out = tmp_path / "out"
    assert run.main(["--from-csv", str(csv_path), "--out", str(out), "--device", "cpu", "--no-plots"]) == 0
    return _machine_section((out / "results.md").read_text())


def test_rerender_from_csv_keeps_its_machine_file(tmp_path):
    machine = {"platform": "Linux-test", "python": "3.11.7", "torch": "2.14.1+cu130", "cuda_runtime": "13.0",
               "cpu": "Test CPU 9000", "cpu_count": 2, "threads": 2, "mem_total_gib": 24.0, "device": "cpu",
               "package_version": "0.1.0", "skipped": {"compiled": "no compiler"}}
    section = _rerender(tmp_path, "benchmarks-cpu-test.csv", machine)
    assert "- Test CPU 9000, 2 cores, 24.0 GiB RAM" in section
    assert ("- device `cpu`, threads 2 (torch.set_num_threads), torch 2.14.1+cu130 (CUDA 13.0), python 3.11.7, "
            "ckd_ext 0.1.0, Linux-test") in section
    assert "provider `compiled` skipped: no compiler" in section


def test_rerender_without_machine_file_uses_what_the_rows_record(tmp_path):
    section = _rerender(tmp_path, "results.csv")
    assert "None" not in section and "?" not in section
    assert "CPU not recorded, not recorded cores, not recorded GiB RAM" in section
    # device, threads, torch and ckd_ext versions are columns of every row of that CSV
    assert "- device `cpu`, threads 2 (torch.set_num_threads), torch 2.14.1+cu130 (CUDA not recorded)" in section


@pytest.mark.skipif(not provider_status("ckd_ext", "kd")[0], reason="compares ckd_ext's KD with the references")
def test_divergences_side_by_side_prints_a_row_per_divergence(tmp_path):
    """benchmarks/divergences.py at the smoke shapes: a logits row and an lm row per divergence, each provider
    checked against the float64 oracle first; Liger only where it computes the same loss."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "divergences.py"), "--shapes", "smoke-8x16",
                           "--lm-shape", "smoke-lm-16x32", "--reps", "1", "--warmup", "1", "--threads", "1",
                           "--compile-backend", "aot_eager"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| smoke-8x16")]
    assert [r[1] for r in rows] == ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]
    lm_rows = {r[0].strip("| "): r for r in (line.split(" | ") for line in proc.stdout.splitlines())
               if r[0].strip("| ") in ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")}
    assert list(lm_rows) == ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]
    liger = provider_status("liger")[0]
    for divergence, row in lm_rows.items():
        computes_it = liger and divergence in ("forward_kl", "reverse_kl", "jsd")
        assert (row[4] == "- (not the same loss)") == (liger and not computes_it), row
        if computes_it:
            assert float(row[4]) > 0, row


def test_divergences_refuses_a_provider_that_disagrees_with_the_oracle():
    import torch
    from benchmarks.divergences import check_agreement
    oracle = [torch.tensor(1.0, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    assert check_agreement("close", [torch.tensor(1.0), torch.ones(3)], oracle, 1e-4) == 0.0
    with pytest.raises(SystemExit, match="wrong disagrees with the float64 oracle by 1.00e-02"):
        check_agreement("wrong", [torch.tensor(1.0), torch.tensor([1.0, 1.01, 1.0])], oracle, 1e-4)
    # tvd: a gradient element at a tie of p and q is left out (either side is a subgradient), the others are not
    tie = torch.tensor([False, True, False])
    assert check_agreement("tie", [torch.tensor(1.0), torch.tensor([1.0, 0.5, 1.0])], oracle, 1e-4, ignore=tie) == 0
    with pytest.raises(SystemExit, match="off-tie disagrees"):
        check_agreement("off-tie", [torch.tensor(1.0), torch.tensor([0.5, 1.0, 1.0])], oracle, 1e-4, ignore=tie)


@pytest.mark.skipif(not provider_status("ckd_ext", "ckd")[0], reason="runs ckd_ext's fused-linear CKD")
def test_teacher_gram_benchmark_prints_its_three_providers():
    """benchmarks/teacher_gram.py at a tiny shape: the three providers agree on the loss (it stops otherwise) and get a
    row each."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "teacher_gram.py"), "--tokens", "64", "--vocab",
                           "300", "--student-width", "8", "--teacher-width", "16", "--reps", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ")[0].strip("| ") for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["provider", "fused_linear", "fused_linear + teacher_gram", "materialise + ckd_loss"], proc.stdout


@pytest.mark.skipif(not provider_status("ckd_ext", "kd")[0], reason="runs ckd_ext's top-k KD")
def test_topk_lm_benchmark_runs_its_three_providers():
    """benchmarks/topk_lm.py at a tiny shape on the CPU (the GPU check runs it with --device cuda): a row per
    provider, all with the same loss."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "topk_lm.py"), "--device", "cpu", "--tokens", "64",
                           "--vocab", "500", "--hidden", "16", "--reps", "1", "--dtypes", "float32"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| float32")]
    assert [r[1] for r in rows] == ["fused_linear", "logits", "eager"], proc.stdout
    assert len({r[-1] for r in rows}) == 1, rows  # the same loss from every provider
