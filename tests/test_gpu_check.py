"""tools/gpu_check.sh and its Python side, without a GPU: the dry run prints a complete plan within the 8-minute
budget; the cases it would run are valid calls of the public API (run here on the CPU); the summary records
failed steps and derives the benchmark's rates from benchmarks/costs.py; without a GPU the full run records every
step as failed, goes on to the next and exits non-zero."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import gpu_check  # noqa: E402
from benchmarks import costs  # noqa: E402

REQUIRED_STEPS = ("preflight", "build", "test_cuda", "memcheck", "racecheck", "sync_debug", "cuda_graph", "bench")


def dry_run() -> str:
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_dry_run_names_every_step_command_and_shape():
    plan = dry_run()
    steps = re.findall(r"^\s*\d+\. step (\S+)\s+budget\s+(\d+)\+? s$", plan, flags=re.M)
    names = [n for n, _ in steps]
    for step in REQUIRED_STEPS:
        assert step in names, f"the plan has no step {step}: {names}"
    for needle in ("TORCH_CUDA_ARCH_LIST=$($PYTHON tools/gpu_check.py arch)", "tests/test_cuda.py",
                   "compute-sanitizer --tool memcheck", "compute-sanitizer --tool racecheck",
                   'set_sync_debug_mode("error")', "--check graph", "--only shape=gpu-tokens",
                   "--only provider=ckd_ext,eager,floor", "--only provider=compiled"):
        assert needle in plan, needle
    for shape in ("4096 x 32000 bfloat16", "16384 x 32000 bfloat16", "16384 x 128256 bfloat16"):
        assert shape in plan, shape
    assert "pip install" not in plan  # the GPU machine may have no network
    # every step says how its budget was sized, and the fixed budgets fit the 8 minutes
    assert plan.count("    sizing:  ") == len(steps)
    assert sum(int(b) for _, b in steps) <= 480


def test_cli_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(SCRIPT), "--wet-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.parametrize("check,dtypes", [("run", "float32,bfloat16,float16"), ("sync", "float32,bfloat16"),
                                          ("graph", "float32,bfloat16")])
def test_op_cases_are_valid_calls(check, dtypes, capsys):
    """Every case the GPU steps run is a valid public call (on the CPU, without the CUDA-only part): a typo in a
    configuration or a changed signature fails here, not on the day a GPU is lent."""
    if not gpu_check_ops_available():
        pytest.skip("ckd_ext's extension is not built")
    assert gpu_check.main(["ops", "--check", check, "--device", "cpu", "--dtypes", dtypes]) == 0
    out = capsys.readouterr().out
    n = len(gpu_check.op_cases(check, dtypes.split(",")))
    assert f"{n} of {n} cases passed on cpu" in out


def gpu_check_ops_available() -> bool:
    import ckd_ext
    return ckd_ext.is_available()


def test_sync_cases_cover_every_configuration_reduction_and_mask():
    from inputs import CONFIGS
    cases = gpu_check.op_cases("sync", ["float32", "bfloat16"])
    assert {(c.config, c.dtype, c.masked, c.reduction) for c in cases} == {
        (cfg, dt, m, r) for cfg in CONFIGS for dt in ("float32", "bfloat16") for m in (False, True)
        for r in ("mean", "sum", "none")}
    assert {c.config for c in gpu_check.op_cases("graph", ["float32"])} == {"ckd_student", "ckd_teacher", "bickd",
                                                                            "kd"}


def write_results(out: Path):
    (out / "bench").mkdir(parents=True)
    with open(out / "steps.tsv", "w") as f:
        f.write("step\tstatus\tseconds\tbudget\tlog\n")
        f.write("build\tpassed\t12\t150\tbuild.log\n")
        f.write("sync_debug\tfailed (exit 1)\t4\t20\tsync_debug.log\n")
    (out / "sync_debug.log").write_text("FAIL ckd_student/float32/mask/mean/37x100: RuntimeError: called a "
                                        "synchronizing CUDA operation\nsync: 95 of 96 cases passed on cuda\n")
    (out / "bench" / "machine.json").write_text('{"gpu": "NVIDIA H100 80GB HBM3", "device": "cuda"}')
    rows = [dict(loss="ckd", provider="ckd_ext", mode="full", metric="time", shape="4096x32000", dtype="bfloat16",
                 p20="9", p50="10", p80="11", note=""),
            dict(loss="kd", provider="ckd_ext", mode="full", metric="time", shape="4096x32000", dtype="bfloat16",
                 p20="", p50="", p80="", note="timeout")]
    with open(out / "bench" / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_summary_records_failures_and_rates(tmp_path):
    write_results(tmp_path)
    assert gpu_check.main(["summary", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "1 of 2 steps passed" in md and "**failed: sync_debug**" in md
    assert "called a synchronizing CUDA operation" in md  # the failing step's log tail
    # 2 N^2 C forward + 2 N^2 C backward GEMM FLOPs in 10 ms, against the H100's 989 TFLOPS
    tflops = 4 * 4096 ** 2 * 32000 / 10e-3 / 1e12
    assert f"{tflops:.1f} TFLOPS | {tflops / 989:.0%}" in md
    assert "| kd | 4096x32000 bfloat16 | ckd_ext | timeout |" in md
    assert gpu_check.main(["bench-check", str(tmp_path / "bench")]) == 0
    assert gpu_check.main(["bench-check", str(tmp_path)]) == 1  # no results.csv there


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would be the real 8-minute check")
def test_full_run_without_a_gpu_records_each_failure_and_exits_nonzero(tmp_path):
    """Every step fails fast here (no GPU, no compute-sanitizer); each is recorded and the next one runs."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_BUDGET_S="300")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    with open(tmp_path / "out" / "steps.tsv", newline="") as f:
        steps = list(csv.DictReader(f, delimiter="\t"))
    assert [s["step"] for s in steps if s["step"] in REQUIRED_STEPS] == list(REQUIRED_STEPS)
    assert all(s["status"].startswith("failed") for s in steps), steps
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "0 of %d steps passed" % len(steps) in summary
    assert "torch sees no CUDA device" in summary


def test_costs_floor_work_and_fused_plan_counts():
    """The floor's work, the numerator of the benchmark's rates, is 2 N^2 C per CKD GEMM (+ 2 C^2 N for BicKD) and
    KD's bytes are S and T read and the gradient written once; the fused op's model takes the extension's strip plan,
    a few hundred GEMMs and launches at most for CKD at 16384 x 128256 bf16."""
    N, C = 16384, 128256
    assert costs.loss_work("ckd", N, C, "bfloat16").flops == 4 * N * N * C
    assert costs.loss_work("bickd", N, C, "bfloat16", "forward").flops == 2 * N * N * C + 2 * C * C * N
    assert costs.loss_work("kd", N, C, "bfloat16").bytes == 3 * N * C * 2
    # (BicKD's fp32 class side, C^2 N, still takes ~900 GEMMs at this vocabulary: docs/cuda.md, "Strip plans".)
    for anchor in ("student", "teacher"):
        fused = sum(costs.fused_op("ckd", N, C, anchor=anchor), costs.Work())
        assert fused.launches <= 500 and fused.gemms <= 100, (anchor, fused)


@pytest.mark.parametrize("name,expected", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                           ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                           ("NVIDIA GeForce RTX 4090", None)])
def test_device_peaks_by_name(name, expected):
    peak = costs.device_peak(name)
    assert (peak.name if peak else None) == expected


def test_floor_gemms_run_in_the_input_dtype():
    """The GPU ratios compare with eager's 16-bit tensor-core GEMMs, so the floor's GEMMs must take and produce the
    input dtype (here bf16 on the CPU, where torch.mm supports it), not a float32 copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.cases import make_inputs
    from benchmarks.providers import Floor

    class GemmDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                tensors = list(args) + list((kwargs or {}).values())
                self.seen.add(tuple(a.dtype for a in tensors if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    for loss in ("ckd", "bickd"):
        s, t = make_inputs(64, 48, "bfloat16", "cpu")
        floor = Floor(loss, s, t)
        with GemmDtypes() as mode:
            floor.forward()
            floor.backward()
        assert mode.seen == {(torch.bfloat16,) * 3}, (loss, mode.seen)  # mm(a, b, out=c): all bf16


def test_eager_and_compiled_autocast_only_16_bit_cuda():
    from benchmarks.providers import autocast_dtype
    assert autocast_dtype("cuda", "bfloat16") == "bfloat16" and autocast_dtype("cuda", "float16") == "float16"
    assert autocast_dtype("cuda", "float32") is None and autocast_dtype("cpu", "bfloat16") is None


def test_runner_deadline_records_unfinished_cases(tmp_path):
    """A run past its deadline still writes its tables, every unfinished case noted 'deadline'."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device", "cpu", "--only",
                           "shape=smoke-8x16", "--only", "mode=full", "--deadline", "0", "--no-plots", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["note"] == "deadline" and r["p50"] == "" for r in rows)
    assert (out / "results.md").exists() and not (out / "plots").exists()
