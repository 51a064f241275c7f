"""tools/gpu_check.sh and its Python side, without a GPU: the dry run prints both calls' plans, the first within the
540 s of one call with the headline steps first; the cases the steps run are valid calls of the public API (run here
on the CPU); a step is cut at its budget with its output kept; after every step one archive in $OUT holds every
record, so a killed call still returns what finished; the summary records failures and derives the benchmark's
rates from benchmarks/costs.py; without a GPU the full run records every step as failed and exits non-zero."""
from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import gpu_check  # noqa: E402
from benchmarks import costs  # noqa: E402
from ckd_ext import testing  # noqa: E402

FIRST_CALL_ORDER = ("preflight", "build", "test_cuda", "graph_sync", "headline", "peaks", "shapes_32k", "fused_linear",
                    "memcheck", "racecheck")
SECOND_CALL = ("bickd_128k", "topk", "compiled", "ddp_nccl")


def dry_run() -> str:
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def plan_steps(plan: str):
    """[(call, [(step, budget)])] as the dry run prints them."""
    calls = []
    for block in re.split(r"^GPU check, call ", plan, flags=re.M)[1:]:
        steps = re.findall(r"^\s*\d+\. step (\S+)\s+budget\s+(\d+)\+? s$", block, flags=re.M)
        calls.append((int(block.split(" ", 1)[0]), [(n, int(b)) for n, b in steps]))
    return calls


def test_dry_run_plans_fit_one_call_each_with_the_headline_first():
    plan = dry_run()
    calls = dict(plan_steps(plan))
    assert sorted(calls) == [1, 2]
    first = [n for n, _ in calls[1]]
    assert first == list(FIRST_CALL_ORDER), first
    assert not set(SECOND_CALL) & set(first)
    assert [n for n, _ in calls[2]] == ["preflight", "build", *SECOND_CALL]
    for call, steps in calls.items():  # the fixed budgets and the packing margin fit the 540 s of one call
        assert sum(b for _, b in steps) + gpu_check.PACK_MARGIN_S <= 540, (call, steps)
    assert plan.count("    sizing:  ") == len(calls[1]) + len(calls[2])  # every budget says how it was sized
    for needle in ("CKD_EXT_QUICK_BUILD=1", "tests/test_cuda.py -k 'not host_synchronisation and not cuda_graph' -n 8 "
                   "--timeout 60", "--only shape=gpu-tokens-16k-v128k --only provider=ckd_ext,eager,floor "
                   "--only mode=full --only loss=ckd,kd", "compute-sanitizer --tool memcheck --kernel-name kns=ckd",
                   "compute-sanitizer --tool racecheck", "--only shape=gpu-lm-16k-v128k-h2048-4096",
                   "--only provider=compiled", "$OUT/gpu-check.tar.gz",
                   "benchmarks/topk_lm.py --device cuda --tokens 16384 --vocab 128256 --hidden 2048 --k 64"):
        assert needle in plan, needle
    assert "pip install" not in plan  # the GPU machine has no network


def test_graph_and_sync_checks_are_the_test_cuda_tests():
    """One place for them: the graph_sync step selects test_cuda.py's two tests, test_cuda step leaves them out."""
    source = (ROOT / "tests" / "test_cuda.py").read_text()
    for name in ("def test_no_host_synchronisation(", "def test_captured_in_a_cuda_graph("):
        assert name in source
    assert "testing.check_no_sync(case)" in source and "testing.check_graph_replay(case)" in source
    main, graph_sync = gpu_check.PYTEST_PARTS["main"][0], gpu_check.PYTEST_PARTS["graph_sync"][0]
    assert main == "not host_synchronisation and not cuda_graph" and graph_sync == "host_synchronisation or cuda_graph"


def test_elastic_budgets_take_the_slack_and_never_the_later_steps_time():
    steps = [gpu_check.Step("a", 10, "", [], ""), gpu_check.Step("b", 20, "", [], "", elastic=True),
             gpu_check.Step("c", 20, "", [], "", elastic=True), gpu_check.Step("d", 30, "", [], "")]
    assert gpu_check.step_budgets(steps, 1, 70) == 20          # no slack: its own
    assert gpu_check.step_budgets(steps, 1, 110) == 20 + 20     # half of the 40 s slack, one elastic step follows
    assert gpu_check.step_budgets(steps, 2, 90) == 20 + 40      # the last elastic step: all of it
    assert gpu_check.step_budgets(steps, 3, 12) == 12           # never past what is left
    assert gpu_check.step_budgets(steps, 0, 0) == 0


def test_cli_rejects_unknown_arguments():
    for args in (["--wet-run"], ["--call", "3"], ["--dry-run", "x"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "usage" in proc.stderr, args


def test_a_step_past_its_budget_is_stopped_with_its_output_kept(tmp_path):
    """The step's process group is stopped at its budget (a child it started too); what it printed is in its log."""
    log = tmp_path / "slow.log"
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('started', flush=True); time.sleep(60)")
    echo = io.StringIO()
    t0 = time.monotonic()
    rc, timed_out = gpu_check.run_command([sys.executable, "-c", code], 2, log, echo=echo)
    assert timed_out and rc != 0 and time.monotonic() - t0 < 20
    assert "started" in log.read_text() and "stopped after its budget of 2 s" in log.read_text()
    assert "started" in echo.getvalue()


def test_pack_writes_one_archive_with_every_record_and_caps_big_files(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "bench_headline").mkdir(parents=True)
    (work / "preflight.log").write_text("torch: 2.11.0\n")
    (work / "summary.md").write_text("# GPU check summary\n")
    (work / "bench_headline" / "results.csv").write_text("loss,provider\n")
    monkeypatch.setattr(gpu_check, "ARCHIVE_FILE_CAP", 1000)
    (work / "memcheck.log").write_bytes(b"x" * 5000 + b"END")
    gpu_check.pack(work, out)
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.md"]
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
        memcheck = tar.extractfile("gpu-check/memcheck.log").read()
    assert {"gpu-check/preflight.log", "gpu-check/summary.md", "gpu-check/bench_headline/results.csv"} <= set(names)
    assert memcheck.endswith(b"END") and b"were left out" in memcheck and len(memcheck) < 1100


@pytest.mark.parametrize("check,dtypes", [("run", "float32,bfloat16,float16"), ("sync", "float32,bfloat16"),
                                          ("graph", "float32,bfloat16")])
def test_op_cases_are_valid_calls(check, dtypes, capsys):
    """Every case the GPU steps run is a valid public call (on the CPU, without the CUDA-only part): a typo in a
    configuration or a changed signature fails here, not on the day a GPU is lent."""
    if not gpu_check_ops_available():
        pytest.skip("ckd_ext's extension is not built")
    assert gpu_check.main(["ops", "--check", check, "--device", "cpu", "--dtypes", dtypes]) == 0
    out = capsys.readouterr().out
    n = len(testing.op_cases(check, dtypes.split(",")))
    assert f"{n} of {n} cases passed on cpu" in out


def gpu_check_ops_available() -> bool:
    import ckd_ext
    return ckd_ext.is_available()


def test_graph_check_compares_against_eager_on_the_cpu():
    """check_graph_replay's comparison itself: on the CPU the "replay" is an eager run of the same case, which must
    agree; a case whose replay would differ is reported with both errors."""
    if not gpu_check_ops_available():
        pytest.skip("ckd_ext's extension is not built")
    case = testing.op_cases("graph", ["float32"])[0]
    assert testing.check_graph_replay(case, "cpu") == ""
    assert testing.check_no_sync(case, "cpu") == ""


def test_sync_cases_cover_every_configuration_reduction_and_mask():
    cases = testing.op_cases("sync", ["float32", "bfloat16"])
    assert {(c.config, c.dtype, c.masked, c.reduction) for c in cases} == {
        (cfg, dt, m, r) for cfg in testing.CONFIGS for dt in ("float32", "bfloat16") for m in (False, True)
        for r in ("mean", "sum", "none")}
    assert {c.config for c in testing.op_cases("graph", ["float32"])} == {"ckd_student", "ckd_teacher", "bickd", "kd"}
    with pytest.raises(ValueError, match="check must be"):
        testing.op_cases("graphs")


def write_results(work: Path):
    (work / "bench_headline").mkdir(parents=True)
    with open(work / "steps.tsv", "w") as f:
        f.write("step\tstatus\tseconds\tbudget\tlog\n")
        f.write("build\tpassed\t12\t150\tbuild.log\n")
        f.write("graph_sync\tfailed (exit 1)\t4\t30\tgraph_sync.log\n")
    (work / "graph_sync.log").write_text("FAILED tests/test_cuda.py::test_no_host_synchronisation: called a "
                                         "synchronizing CUDA operation\n1 failed, 103 passed\n")
    (work / "bench_headline" / "machine.json").write_text('{"gpu": "NVIDIA H100 80GB HBM3", "device": "cuda"}')
    rows = [dict(loss="ckd", provider="ckd_ext", mode="full", metric="time", shape="4096x32000", dtype="bfloat16",
                 p20="9", p50="10", p80="11", note=""),
            dict(loss="ckd", provider="eager", mode="full", metric="time", shape="4096x32000", dtype="bfloat16",
                 p20="39", p50="40", p80="41", note=""),
            dict(loss="kd", provider="ckd_ext", mode="full", metric="time", shape="4096x32000", dtype="bfloat16",
                 p20="", p50="", p80="", note="timeout")]
    with open(work / "bench_headline" / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_summary_records_failures_and_rates(tmp_path):
    write_results(tmp_path)
    assert gpu_check.main(["summary", "--work", str(tmp_path)]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "1 of 2 steps passed" in md and "**failed: graph_sync**" in md
    assert "called a synchronizing CUDA operation" in md  # the failing step's log tail
    # 2 N^2 C forward + 2 N^2 C backward GEMM FLOPs in 10 ms, against the H100's 989 TFLOPS; 10 ms of eager's 40
    tflops = 4 * 4096 ** 2 * 32000 / 10e-3 / 1e12
    assert "| ckd | 4096x32000 bfloat16 | ckd_ext | 10.00 ms | 0.25x |" in md
    assert f"{tflops:.1f} TFLOPS | {tflops / 989:.0%}" in md
    assert "| kd | 4096x32000 bfloat16 | ckd_ext | timeout |" in md
    assert gpu_check.main(["bench-check", str(tmp_path / "bench_headline")]) == 0
    assert gpu_check.main(["bench-check", str(tmp_path)]) == 1  # no results.csv there


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would be the real check")
def test_full_run_without_a_gpu_records_each_failure_in_the_archive(tmp_path):
    """Every step fails fast here (no GPU, no compute-sanitizer); each is recorded, the next one runs, and after
    each the archive in $OUT is rewritten: $OUT ends with the archive and summary.md, nothing else."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_BUDGET_S="300",
               CKD_EXT_PREBUILT=str(tmp_path / "none"))
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.tar.gz", "summary.md"]
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = set(tar.getnames())
        steps = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("gpu-check/steps.tsv")), delimiter="\t"))
    assert [s["step"] for s in steps] == list(FIRST_CALL_ORDER)
    assert all(s["status"].startswith("failed") for s in steps), steps
    assert {f"gpu-check/{s}.log" for s in FIRST_CALL_ORDER} <= names
    summary = (out / "summary.md").read_text()
    assert f"0 of {len(FIRST_CALL_ORDER)} steps passed" in summary and "torch sees no CUDA device" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would be the real check")
def test_a_killed_run_leaves_the_archive_of_the_steps_it_finished(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"))
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "gpu-check.tar.gz").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = set(tar.getnames())
        steps = tar.extractfile("gpu-check/steps.tsv").read().decode()
    assert "gpu-check/preflight.log" in names and "gpu-check/summary.md" in names
    assert steps.splitlines()[1].startswith("preflight\tfailed")
    assert "not run (yet): build" in tar_text(out / "gpu-check.tar.gz", "gpu-check/summary.md")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would be the real check")
def test_a_terminated_run_records_the_running_step_and_packs(tmp_path):
    """SIGTERM (what a command's time limit sends first) stops the running step's processes; the runner records
    that step as stopped, rewrites the archive and exits 1."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"))
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "gpu-check.tar.gz").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output[-2000:]
    steps = tar_text(out / "gpu-check.tar.gz", "gpu-check/steps.tsv").splitlines()[1:]
    assert steps[0].startswith("preflight\tfailed") and "the call was stopped: SIGTERM" in steps[-1], steps
    assert "stopped by SIGTERM" in output


def tar_text(path: Path, member: str) -> str:
    with tarfile.open(path) as tar:
        return tar.extractfile(member).read().decode()


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
