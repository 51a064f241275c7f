#!/usr/bin/env python3
"""The GPU check (docs/cuda.md, "The GPU check"): one call on a lent GPU machine that brings back what matters most
first, whatever happens to the call.

    tools/gpu_check.sh [--call 1|2]      run the plan (python3 -u tools/gpu_check.py run ...)
    tools/gpu_check.sh --dry-run         print both calls' plans, each step's command and budget; needs no GPU

Each step runs under its own time limit, its output streamed unbuffered to the console and to its log; after every
step the whole record (logs, steps.tsv, summary.md, benchmark tables) is packed into ONE archive,
$OUT/gpu-check.tar.gz, next to a copy of summary.md: two files, so that the lent machine's limit on files that come
back (8) is never reached and a call killed half-way still returns every finished step. The first call holds the
steps that answer most per second of GPU time; BicKD at 128k, the compiled provider and NCCL go in the second.

Environment: OUT (default gpu-check-results), GPU_CHECK_WORK (the step records before packing, default
build/gpu-check), GPU_CHECK_BUDGET_S (the whole call, default 540), PYTHON (the steps' Python, default this one),
CKD_EXT_PREBUILT (a carried build, default build/prebuilt-gpu: tools/build_prebuilt.py writes it).

The steps' own commands (run from the repository root, so that the in-tree ckd_ext is imported):
    preflight | build | extension | arch | pytest PART | bench NAME | peaks --json F | sanitize TOOL | ddp
    ops --check run|sync|graph [--device cpu]   the public calls the sanitizers run (ckd_ext.testing.op_cases)
    bench-check DIR | summary --work DIR
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOTAL_BUDGET_S = 540   # the lent machine allows 600 s a command; the rest is the machine's own slack
PACK_MARGIN_S = 10     # kept back from the steps for the last summary and archive
ARCHIVE = "gpu-check.tar.gz"
ARCHIVE_FILE_CAP = 4 << 20  # bytes of one file in the archive (its tail); 16 MiB is the limit of a file that returns
DEFAULT_PREBUILT = ROOT / "build" / "prebuilt-gpu"


def _torch():
    try:
        import torch
    except ImportError as e:
        raise SystemExit(f"gpu_check: torch is not importable with {sys.executable} ({e}); the check installs "
                         "nothing (the GPU machine has no network): use a Python that has torch (PYTHON=...)")
    return torch


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Step:
    name: str
    budget: int            # seconds; an elastic step also gets what earlier steps left unused
    sizing: str            # how the budget was sized
    command: List[str]     # after "python3 -u tools/gpu_check.py"
    shows: str             # what the command runs, for the plan
    elastic: bool = False


def _bench_args(shape: str, providers: str, case_timeout: int, loss: str = "") -> str:
    only = f"--only shape={shape} --only provider={providers} --only mode=full" + (f" --only loss={loss}" if loss
                                                                                   else "")
    return (f"benchmarks/run.py --device cuda {only} --isolate batch --timeout {case_timeout} --deadline <budget - 5> "
            "--warmup 1 --min-reps 2 --reps 5 --max-seconds 2 --no-plots")


# name -> (shape filter, providers, loss filter, seconds a case may take)
BENCHES: Dict[str, Tuple[str, str, str, int]] = {
    "headline": ("gpu-tokens-16k-v128k", "ckd_ext,eager,floor", "ckd,kd", 25),
    "shapes_32k": ("gpu-tokens-4k-v32k,gpu-tokens-16k-v32k", "ckd_ext,eager,floor", "", 20),
    "fused_linear": ("gpu-lm-16k-v128k-h2048-4096", "fused_linear,ckd_ext", "", 25),
    "bickd_128k": ("gpu-tokens-16k-v128k", "ckd_ext,eager,floor", "bickd", 90),
    "compiled": ("gpu-tokens", "compiled", "", 60),
}

PYTEST_PARTS = {
    # test_cuda.py but its graph and sync-debug tests, on several workers
    "main": ("not host_synchronisation and not cuda_graph", 8),
    "graph_sync": ("host_synchronisation or cuda_graph", 4),
}


def _pytest_shows(part: str) -> str:
    expr, workers = PYTEST_PARTS[part]
    return (f"python3 -m pytest tests/test_cuda.py -k '{expr}' -n {workers} --timeout 60 -q -rfE -p no:cacheprovider "
            "(-n / --timeout left out where pytest-xdist / pytest-timeout are missing); fails unless a test passed")


def _bench_step(name: str, budget: int, sizing: str) -> Step:
    shape, providers, loss, case_timeout = BENCHES[name]
    return Step(name, budget, sizing, ["bench", name],
                _bench_args(shape, providers, case_timeout, loss) + f" --out $WORK/bench_{name}", elastic=True)


TOPK_ARGS = ["--device", "cuda", "--tokens", "16384", "--vocab", "128256", "--hidden", "2048", "--k", "64", "--reps",
             "3", "--dtypes", "bfloat16"]
TOPK_SHOWS = "benchmarks/topk_lm.py " + " ".join(TOPK_ARGS)

SANITIZE_SHOWS = ("PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool {tool} --kernel-name kns=ckd "
                  "--error-exitcode 1 python3 tools/gpu_check.py ops --check run --dtypes float32,bfloat16,float16")

COMMON_STEPS = [
    Step("preflight", 15, "imports torch, queries the GPU, looks for Python.h, nvcc, compute-sanitizer, pytest-xdist: "
         "~5 s", ["preflight"], "python3 tools/gpu_check.py preflight"),
    Step("build", 150, "a carried prebuilt _C (tools/build_prebuilt.py) is copied in and checked: ~10 s; else the tree's "
         "build is reused if it runs here; else setup.py with CKD_EXT_QUICK_BUILD=1 for this GPU's architecture only, "
         "MAX_JOBS = cores: on one core like ours the slowest file (the CPU backend) ~45 s, ops.cpp ~29 s, "
         "cuda_backend.cu ~28 s, all in parallel on 16 cores, + link ~10 s",
         ["build"], "copy $CKD_EXT_PREBUILT/ckd_ext/* into ckd_ext/ | reuse | TORCH_CUDA_ARCH_LIST=<this GPU> "
         "CKD_EXT_CUDA=on CKD_EXT_EMULATED=0 CKD_EXT_QUICK_BUILD=1 MAX_JOBS=$(nproc) python3 setup.py build_ext "
         "--inplace; then one fused op must run on the GPU"),
]

FIRST_CALL = COMMON_STEPS + [
    Step("test_cuda", 75, "tests/test_cuda.py but the next step's tests: 560 small cases (N <= 300, C <= 4099) "
         "against float64 oracles on the CPU, ~0.1 s each, on 8 workers (~15 s each to start torch and CUDA); a test "
         "is cut at 60 s",
         ["pytest", "main"], _pytest_shows("main")),
    Step("graph_sync", 30, "the CUDA-graph capture (8 cases) and sync-debug (96 cases) tests of tests/test_cuda.py, "
         "tiny shapes, on 4 workers", ["pytest", "graph_sync"], _pytest_shows("graph_sync")),
    _bench_step("headline", 60, "the bf16 headline 16384 x 128256, CKD and KD x ckd_ext / eager (bf16 autocast) / "
                "floor: 6 cases in one worker, each 1 warm-up + 2-5 timed calls (2 s cap), cut at 25 s"),
    Step("peaks", 15, "one 8192^3 bf16 GEMM and a 1 GiB copy, 13 runs each: < 1 s of GPU time + start-up",
         ["peaks", "--json", "$WORK/peaks.json"], "python3 tools/gpu_check.py peaks --json $WORK/peaks.json"),
    _bench_step("shapes_32k", 50, "4096 x 32000 and 16384 x 32000 bf16, CKD, BicKD and KD x ckd_ext / eager / floor: "
                "18 cases, each cut at 20 s, the rest recorded as 'deadline'"),
    _bench_step("fused_linear", 40, "the lm GPU shape (16384 tokens, V = 128256, H = 2048 / 4096, bf16), CKD and KD "
                "x fused_linear / ckd_ext on materialised logits: 4 cases, each cut at 25 s"),
    Step("memcheck", 45, "compute-sanitizer memcheck on our kernels only (cuBLAS and torch's run uninstrumented): "
         "48 tiny forward+backward calls; start-up with torch ~20-30 s", ["sanitize", "memcheck"],
         SANITIZE_SHOWS.format(tool="memcheck")),
    Step("racecheck", 45, "the same calls under racecheck (shared-memory hazards), our kernels only",
         ["sanitize", "racecheck"], SANITIZE_SHOWS.format(tool="racecheck")),
]

SECOND_CALL = COMMON_STEPS + [
    _bench_step("bickd_128k", 120, "BicKD at 16384 x 128256 bf16 x ckd_ext / eager / floor: ckd_ext ~1.2 s a call by "
                "the cost model (bf16 operand blocks on tensor cores; eager's C x C matrices do not fit), 1 warm-up + "
                "2 timed calls, cut at 90 s"),
    Step("topk", 40, "top-k KD at the GPU shape (16384 tokens, V = 128256, H = 2048, k = 64, bf16): "
         "fused_linear_topk_kd_loss against materialised logits + topk_kd_loss and an eager top-k KD, time and peak "
         "memory, 3 interleaved calls each after the producer teacher_topk; start-up ~10 s",
         ["topk", "--out", "$WORK/topk_lm.md"], "python3 " + TOPK_SHOWS + " | tee $WORK/topk_lm.md"),
    _bench_step("compiled", 155, "the compiled provider (torch.compile of the bf16 autocast reference, inductor; "
                "compiles single-threaded in the worker, ~20-40 s per loss and shape) on the gpu-tokens shapes, "
                "each case cut at 60 s, the rest recorded as 'deadline'"),
    Step("ddp_nccl", 45, "the distributed losses on NCCL when the machine has 2 GPUs (torchrun, digits demo, "
         "--global-negatives gather and ring, ~20 s each); with one GPU it records that NCCL needs two and passes",
         ["ddp"], "for mode in gather ring: python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m "
         "ckd_ext.demos.classify --ddp --device cuda --global-negatives $mode --methods ckd,bickd --epochs 1 "
         "--teacher-epochs 1 --seeds 0 --quiet"),
]

PLANS = {1: FIRST_CALL, 2: SECOND_CALL}


def print_plan(total: int) -> None:
    for call, steps in PLANS.items():
        fixed = sum(s.budget for s in steps)
        print(f"GPU check, call {call} (tools/gpu_check.sh --call {call}): {len(steps)} steps, fixed budgets {fixed} s "
              f"+ {PACK_MARGIN_S} s for the summary and archive, within {total} s")
        for i, s in enumerate(steps, 1):
            print(f"{i:2d}. step {s.name:<13} budget {s.budget:4d}{'+' if s.elastic else ''} s\n"
                  f"    command: {s.shows}\n    sizing:  {s.sizing}")
        print()
    print("A budget marked + is elastic: what earlier steps leave unused (a carried build leaves ~140 s) goes to the "
          "elastic steps, half to each, all that is left to the last. Results: $OUT/gpu-check.tar.gz (every step's "
          "log, steps.tsv, summary.md, the benchmark tables; rewritten after every step) and $OUT/summary.md.")
    print("Nothing is installed (the GPU machine has no network); the preflight step says what is missing.")


# ------------------------------------------------------------------------------------------------------- running
def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(argv: Sequence[str], budget: float, log_path: Path, env: Optional[Dict[str, str]] = None,
                echo=sys.stdout) -> Tuple[int, bool]:
    """Runs argv in its own process group, its output (stdout and stderr) streamed line by line to `echo` and to
    log_path as it comes; after `budget` seconds the whole group is stopped. Returns (exit status, timed out)."""
    run_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(argv), cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        _RUNNING[:] = [proc]

        def pump():
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                echo.write("    | " + line.decode(errors="replace"))
                echo.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(budget, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        reader.join(timeout=5)
        if timed_out:
            log.write(f"\n[gpu_check: stopped after its budget of {budget:.0f} s]\n".encode())
    return proc.returncode if proc.returncode is not None else -9, timed_out


def pack(work: Path, out: Path) -> Path:
    """Everything under `work` into out/gpu-check.tar.gz (a file over ARCHIVE_FILE_CAP keeps its tail), replaced
    atomically, so that a call killed while packing still leaves the previous archive; and summary.md beside it."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / (ARCHIVE + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(p for p in work.rglob("*") if p.is_file()):
            arcname = str(Path("gpu-check") / path.relative_to(work))
            size = path.stat().st_size
            if size <= ARCHIVE_FILE_CAP:
                tar.add(path, arcname=arcname)
                continue
            with open(path, "rb") as f:
                f.seek(size - ARCHIVE_FILE_CAP)
                data = b"[gpu_check: the first %d bytes were left out]\n" % (size - ARCHIVE_FILE_CAP) + f.read()
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    os.replace(partial, out / ARCHIVE)
    summary = work / "summary.md"
    if summary.exists():
        shutil.copyfile(summary, out / "summary.md.partial")
        os.replace(out / "summary.md.partial", out / "summary.md")
    return out / ARCHIVE


_RUNNING: List[subprocess.Popen] = []  # the step running now
_STOPPED: List[str] = []               # the signal that stopped the call


def _stop(signum, _frame):
    """SIGTERM or SIGINT reached the runner (the call's own limit): the running step's processes are stopped; the
    runner records the step, writes the archive and exits."""
    _STOPPED.append(signal.Signals(signum).name)
    for proc in _RUNNING:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def step_budgets(steps: Sequence[Step], index: int, left: float) -> int:
    """The budget of steps[index] with `left` seconds to go: its own, plus for an elastic step half the slack that
    the later steps' fixed budgets leave (all of it for the last elastic step), never more than `left`."""
    step = steps[index]
    budget = step.budget
    if step.elastic:
        slack = left - sum(s.budget for s in steps[index:])
        if slack > 0:
            budget += int(slack) if not any(s.elastic for s in steps[index + 1:]) else int(slack) // 2
    return int(max(0, min(budget, left)))


def run_plan(call: int, out: Path, work: Path, total: int, python: str, only: Optional[Sequence[str]] = None) -> int:
    steps = [s for s in PLANS[call] if not only or s.name in only]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.monotonic()
    with open(work / "steps.tsv", "w") as f:
        f.write("step\tstatus\tseconds\tbudget\tlog\n")
    (work / "plan.json").write_text(json.dumps({"call": call, "total_budget_s": total, "steps": [
        dataclasses.asdict(s) for s in steps]}, indent=1))
    failed = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    for i, step in enumerate(steps):
        left = total - PACK_MARGIN_S - (time.monotonic() - started)
        budget = step_budgets(steps, i, left)
        log = work / f"{step.name}.log"
        print(f"=== {step.name} (budget {budget} s): {step.shows}", flush=True)
        t0 = time.monotonic()
        if _STOPPED:
            log.write_text("not started: the call was stopped\n")
            status = ""
        elif budget < 1:
            log.write_text("no time left in the call\n")
            status = "failed (no time left)"
        else:
            command = [c.replace("$WORK", str(work)) for c in step.command]
            rc, timed_out = run_command([python, "-u", str(ROOT / "tools" / "gpu_check.py"), *command], budget, log,
                                        env={"GPU_CHECK_STEP_BUDGET_S": str(budget), "GPU_CHECK_WORK": str(work),
                                             "PYTHON": python})
            status = ("passed" if rc == 0 else f"failed (timeout after {budget} s)" if timed_out
                      else f"failed (exit {rc})")
        if _STOPPED:
            status = f"failed (the call was stopped: {_STOPPED[0]})"
        seconds = time.monotonic() - t0
        failed += status != "passed"
        with open(work / "steps.tsv", "a") as f:
            f.write(f"{step.name}\t{status}\t{seconds:.0f}\t{budget}\t{log.name}\n")
        print(f"    {step.name}: {status} in {seconds:.0f} s", flush=True)
        try:
            write_summary(work)
        except Exception:  # noqa: BLE001  (the archive must still be written)
            (work / "summary_error.log").write_text(traceback.format_exc())
        pack(work, out)
        if _STOPPED:
            print(f"gpu_check: stopped by {_STOPPED[0]}; {out / ARCHIVE} has every step until {step.name}", flush=True)
            return 1
    print(f"gpu_check: {len(steps) - failed} of {len(steps)} steps passed in {time.monotonic() - started:.0f} s; "
          f"{out / ARCHIVE}, {out / 'summary.md'}", flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------ preflight
def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, else in the CUDA toolkit's folders."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    homes += sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for home in filter(None, homes):
        for sub in ("bin", "compute-sanitizer"):
            p = Path(home) / sub / "compute-sanitizer"
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def python_header() -> Optional[str]:
    """This Python's Python.h, which building the extension needs (a carried prebuilt _C does not)."""
    path = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return str(path) if path.exists() else None


def prebuilt_dir() -> Path:
    return Path(os.environ.get("CKD_EXT_PREBUILT", DEFAULT_PREBUILT))


def cmd_preflight(_a) -> int:
    torch = _torch()
    info: Dict[str, object] = {
        "python": f"{sys.executable} {sys.version.split()[0]}", "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "python_h": python_header() or "MISSING (a build here is impossible; carry a prebuilt _C)",
        "prebuilt": ", ".join(p.name for p in sorted((prebuilt_dir() / "ckd_ext").glob("*"))) or "none",
        "nvcc": shutil.which("nvcc"), "ninja": shutil.which("ninja"), "compute_sanitizer": find_sanitizer(),
        "cpu_count": os.cpu_count()}
    for mod in ("pytest", "xdist", "pytest_timeout", "hypothesis", "numpy", "setuptools", "triton", "transformers"):
        info[mod] = "yes" if _has_module(mod) else "MISSING"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability="%d.%d" % (p.major, p.minor), sms=p.multi_processor_count,
                    gpu_mem_gib=round(p.total_memory / 2 ** 30, 1), gpus=torch.cuda.device_count())
    for k, v in info.items():
        print(f"{k}: {v}")
    if torch.version.cuda is None:
        print("gpu_check: torch is a CPU-only build", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 1
    return 0


def cmd_arch(_a) -> int:
    torch = _torch()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 1
    print("%d.%d" % torch.cuda.get_device_capability(0))
    return 0


def extension_runs() -> Tuple[bool, str]:
    """Whether ckd_ext._C loads against this torch and runs a fused op on this GPU, in a fresh process (a failed
    load is remembered by the process that tried)."""
    proc = subprocess.run([sys.executable, str(Path(__file__)), "extension"], cwd=ROOT, capture_output=True,
                          text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def cmd_extension(_a) -> int:
    torch = _torch()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 1
    import ckd_ext
    from ckd_ext import _extension
    if not ckd_ext.is_available():
        print(f"not usable: {_extension.unavailable_reason()}")
        return 1
    try:
        s = torch.randn(8, 16, device="cuda", requires_grad=True)
        ckd_ext.kd_loss(s, torch.randn(8, 16, device="cuda")).backward()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001  (no kernel image for this GPU, a CPU-only _C, ...)
        print(f"not usable: a fused op failed on CUDA: {type(e).__name__}: {str(e)[:300]}")
        return 1
    print(f"usable: {Path(_extension.require_extension().__file__).name} runs on {torch.cuda.get_device_name(0)}")
    return 0


def cmd_build(_a) -> int:
    """The carried prebuilt, else the tree's build, else a quick build for this GPU only."""
    carried = prebuilt_dir() / "ckd_ext"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    files = sorted(carried.glob(f"_C{suffix}")) + sorted(carried.glob("_build_info.py"))
    if files and not (carried / f"_C{suffix}").exists():
        # A build for another Python (say a cp312 one carried for the GPU machine, found by a cp311 run here) would
        # load nowhere, and copying its _build_info.py would disown the tree's own build.
        print(f"ignoring the carried prebuilt in {carried}: it has no _C{suffix} for this Python")
        files = []
    if files:
        manifest = prebuilt_dir() / "manifest.json"
        if manifest.exists():
            print("prebuilt manifest: " + manifest.read_text().strip())
        for f in files:
            shutil.copy2(f, ROOT / "ckd_ext" / f.name)
            print(f"copied the carried {f} into ckd_ext/")
        ok, why = extension_runs()
        print(why)
        return 0 if ok else 1
    ok, why = extension_runs()
    print(why)
    if ok:
        print("reusing the build in the tree")
        return 0
    if python_header() is None:
        print(f"gpu_check: cannot build here: no Python.h for {sys.executable} ({sysconfig.get_paths()['include']}); "
              "carry a build made elsewhere: tools/build_prebuilt.py, then carry build/prebuilt-gpu")
        return 1
    torch = _torch()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device to build for", file=sys.stderr)
        return 1
    arch = "%d.%d" % torch.cuda.get_device_capability(0)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, CKD_EXT_CUDA="on", CKD_EXT_EMULATED="0",
               CKD_EXT_QUICK_BUILD="1", MAX_JOBS=str(os.cpu_count() or 2))
    print(f"building for TORCH_CUDA_ARCH_LIST={arch} with CKD_EXT_QUICK_BUILD=1, MAX_JOBS={env['MAX_JOBS']}",
          flush=True)
    t0 = time.monotonic()
    rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env).returncode
    print(f"setup.py exited {rc} after {time.monotonic() - t0:.0f} s", flush=True)
    if rc:
        return 1
    ok, why = extension_runs()
    print(why)
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------- tests and sanitizers
def stream(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> Tuple[int, str]:
    """Runs argv with its output passed on line by line as it comes (so that a step cut at its budget keeps what
    it printed) and also returned."""
    print(shlex.join(argv), flush=True)
    proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines)


def cmd_pytest(a) -> int:
    expr, workers = PYTEST_PARTS[a.part]
    argv = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-k", expr, "-q", "-rfE", "-p", "no:cacheprovider"]
    if _has_module("xdist"):
        argv += ["-n", str(workers)]
    else:
        print("pytest-xdist is missing: one worker")
    if _has_module("pytest_timeout"):
        argv += ["--timeout", "60"]
    else:
        print("pytest-timeout is missing: no per-test limit (the step's budget still holds)")
    rc, text = stream(argv)
    last = ([line for line in text.splitlines() if line.strip()] or [""])[-1]
    if rc == 0 and " passed" not in last:
        print("gpu_check: no test passed (all skipped?)")
        return 1
    return rc


def cmd_sanitize(a) -> int:
    sanitizer = find_sanitizer()
    if sanitizer is None:
        print(f"compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*): the {a.tool} step cannot run")
        return 1
    driver = [sys.executable, str(Path(__file__)), "ops", "--check", "run", "--dtypes", "float32,bfloat16,float16"]
    # Without the caching allocator every tensor is its own allocation, so an access past a tensor's end is outside
    # any allocation, which memcheck reports (inside a cached block it would not).
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    # Only our kernels (namespace ckd::gpu: "ckd" is in their mangled and demangled names) are instrumented; cuBLAS
    # and torch's kernels run at full speed.
    rc, text = stream([sanitizer, "--tool", a.tool, "--kernel-name", "kns=ckd", "--error-exitcode", "1", *driver],
                      env)
    if rc != 0 and "ERROR SUMMARY" not in text and "kernel-name" in text:
        print("this compute-sanitizer rejected the kernel filter: every kernel instrumented", flush=True)
        rc, text = stream([sanitizer, "--tool", a.tool, "--error-exitcode", "1", *driver], env)
    return rc


def cmd_ddp(_a) -> int:
    """Both global modes on 2 GPUs over NCCL (the same code path as gloo's, tested on every commit)."""
    torch = _torch()
    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("torch sees no CUDA device")
        return 1
    if gpus < 2:
        print(f"skipped: {gpus} GPU, NCCL across ranks needs 2")
        return 0
    work = Path(os.environ.get("GPU_CHECK_WORK", ROOT / "build" / "gpu-check"))
    for mode in ("gather", "ring"):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "ckd_ext.demos.classify", "--ddp", "--device", "cuda", "--global-negatives", mode, "--methods", "ckd,bickd",
                "--epochs", "1", "--teacher-epochs", "1", "--seeds", "0", "--quiet", "--out", str(work / f"ddp_{mode}")]
        rc, text = stream(argv)
        if rc != 0:
            return 1
        if "(nccl)" not in text:
            print(f"the {mode} run did not use NCCL")
            return 1
    return 0


def cmd_topk(a) -> int:
    """benchmarks/topk_lm.py at the GPU shape; its table also written to --out."""
    rc, text = stream([sys.executable, "-u", str(ROOT / "benchmarks" / "topk_lm.py"), *TOPK_ARGS])
    if a.out:
        Path(a.out).write_text(text)
    return rc


def cmd_bench(a) -> int:
    shape, providers, loss, case_timeout = BENCHES[a.name]
    budget = int(os.environ.get("GPU_CHECK_STEP_BUDGET_S", "60"))
    deadline = budget - 5
    if deadline < 5:
        print(f"no time left for this step ({budget} s)")
        return 1
    work = Path(os.environ.get("GPU_CHECK_WORK", ROOT / "build" / "gpu-check"))
    out = work / f"bench_{a.name}"
    argv = [sys.executable, "benchmarks/run.py", "--device", "cuda", "--only", f"shape={shape}", "--only",
            f"provider={providers}", "--only", "mode=full", *(["--only", f"loss={loss}"] if loss else []),
            "--isolate", "batch", "--timeout", str(case_timeout), "--deadline", str(deadline), "--warmup", "1",
            "--min-reps", "2", "--reps", "5", "--max-seconds", "2", "--no-plots", "--out", str(out)]
    print(shlex.join(argv), flush=True)
    if subprocess.run(argv, cwd=ROOT).returncode != 0:
        return 1
    return cmd_bench_check(argparse.Namespace(dir=str(out)))


# ------------------------------------------------------------------------------------------------------------ ops
def cmd_ops(a) -> int:
    from ckd_ext import testing
    torch = _torch()
    device = a.device
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 1
    cases = testing.op_cases(a.check, a.dtypes.split(","))
    fn: Callable[[testing.OpCase, str], str] = {
        "sync": testing.check_no_sync, "graph": testing.check_graph_replay,
        "run": lambda c, d: (testing.run_case(c, d), "")[1]}[a.check]
    failures: List[Tuple[str, str]] = []
    t0 = time.perf_counter()
    for case in cases:
        try:
            why = fn(case, device)
        except Exception as e:  # noqa: BLE001  (recorded per case; the check goes on)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            traceback.print_exc()
        if why:
            failures.append((case.name, why))
            print(f"FAIL {case.name}: {why}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{a.check}: {len(cases) - len(failures)} of {len(cases)} cases passed on {device} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------- peaks
def cmd_peaks(a) -> int:
    """What this GPU reaches on the two resources the losses use: a bf16 GEMM (8192^3, tensor cores) and a device
    copy (1 GiB read + 1 GiB written), the mean of 10 timed runs after 3 warm-ups each."""
    torch = _torch()
    from benchmarks.costs import device_peak
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 1

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / 10

    n = 8192
    x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm_s = timed(lambda: x @ y)
    src = torch.empty(1 << 29, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    name = torch.cuda.get_device_name(0)
    peak = device_peak(name)
    out = {"gpu": name, "measured_bf16_gemm_tflops": round(2 * n ** 3 / gemm_s / 1e12, 1),
           "measured_copy_gbs": round(2 * src.numel() * 2 / copy_s / 1e9, 1),
           "datasheet": None if peak is None else {"name": peak.name, "tensor_tflops": peak.tensor_tflops,
                                                   "fp32_tflops": peak.fp32_tflops, "hbm_tbs": peak.hbm_tbs}}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


# --------------------------------------------------------------------------------------------- summary
def _read_steps(out: Path) -> List[Dict[str, str]]:
    path = out / "steps.tsv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _tail(path: Path, lines: int = 6) -> List[str]:
    if not path.exists():
        return []
    text = path.read_text(errors="replace").strip().splitlines()
    return [l[:200] for l in text[-lines:]]


def bench_lines(work: Path) -> List[str]:
    """Per benchmark step, in the plan's order (the headline first): per case and provider, the full fwd+bwd time,
    its ratio to eager's, peak memory and the rate the cost model implies (benchmarks/costs.py), against the
    datasheet peak."""
    from benchmarks.costs import achieved, device_peak, peak_fraction
    order = {name: i for i, name in enumerate(BENCHES)}
    dirs = sorted(work.glob("bench*/"), key=lambda d: (order.get(d.name[len("bench_"):], len(order)), d.name))
    L: List[str] = []
    for d in dirs:
        csv_path = d / "results.csv"
        if not csv_path.exists():
            L += [f"### {d.name}", "", "No results.csv (the step did not get to write it).", ""]
            continue
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["mode"] == "full"]
        gpu = ""
        if (d / "machine.json").exists():
            gpu = json.loads((d / "machine.json").read_text()).get("gpu", "") or ""
        peak = device_peak(gpu)
        idx = {(r["loss"], r["shape"], r["provider"], r["metric"]): r for r in rows}

        def ms_of(key) -> Optional[float]:
            tr = idx.get(key + ("time",))
            return float(tr["p50"]) if tr and tr["p50"] else None

        L += [f"### {d.name}", "",
              f"GPU {gpu or '?'}; rates from benchmarks/costs.py loss_work (the floor's GEMMs / bytes) over the "
              f"measured time; peak = datasheet "
              + (f"{peak.name} {peak.tensor_tflops} TFLOPS, {peak.hbm_tbs} TB/s." if peak else "unknown."),
              "", "| loss | shape | provider | full fwd+bwd | / eager | peak memory | rate | of peak |",
              "|---|---|---|---|---|---|---|---|"]
        seen = []
        for r in rows:
            key = (r["loss"], r["shape"], r["provider"])
            if key in seen:
                continue
            seen.append(key)
            tr, mr = idx.get(key + ("time",)), idx.get(key + ("peak_mem",))
            ms, eager_ms = ms_of(key), ms_of((r["loss"], r["shape"], "eager"))
            n, c = (int(x) for x in r["shape"].split("x"))
            rate = achieved(r["loss"], n, c, r["dtype"], "full", ms)
            frac = peak_fraction(rate, peak) if rate else None
            time_cell = f"{ms:.2f} ms" if ms is not None else (tr["note"] if tr else "missing")
            ratio = f"{ms / eager_ms:.2f}x" if ms is not None and eager_ms else ""
            mem_cell = f"{float(mr['p50']):.0f} MiB" if mr and mr["p50"] else (mr["note"] if mr else "")
            L.append(f"| {r['loss']} | {r['shape']} {r['dtype']} | {r['provider']} | {time_cell} | {ratio} | "
                     f"{mem_cell} | {'' if rate is None else f'{rate[0]:.1f} {rate[1]}'} | "
                     f"{'' if frac is None else f'{frac:.0%}'} |")
        L.append("")
    return L or ["No benchmark results."]


def cmd_bench_check(a) -> int:
    path = Path(a.dir) / "results.csv"
    if not path.exists():
        print(f"gpu_check: {path} was not written")
        return 1
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    timed = [r for r in rows if r["metric"] == "time" and r["p50"]]
    print(f"{len(timed)} of {sum(r['metric'] == 'time' for r in rows)} cases have a time")
    return 0 if timed else 1


def write_summary(work: Path) -> str:
    """work/summary.md from the steps' records: the GPU, the steps' status, the failed steps' last lines, the
    measured peaks and the benchmark tables."""
    steps = _read_steps(work)
    failed = [s for s in steps if s["status"] != "passed"]
    L = ["# GPU check summary", ""]
    plan = work / "plan.json"
    if plan.exists():
        p = json.loads(plan.read_text())
        done = {s["step"] for s in steps}
        pending = [s["name"] for s in p["steps"] if s["name"] not in done]
        L.append(f"- call {p['call']}, budget {p['total_budget_s']} s"
                 + (f"; not run (yet): {', '.join(pending)}" if pending else ""))
    pre = work / "preflight.log"
    if pre.exists():
        facts = dict(l.split(": ", 1) for l in pre.read_text().splitlines() if ": " in l)
        L.append(f"- GPU: {facts.get('gpu', '?')} (sm {facts.get('capability', '?')}, {facts.get('sms', '?')} SMs, "
                 f"{facts.get('gpu_mem_gib', '?')} GiB); torch {facts.get('torch', '?')} (CUDA "
                 f"{facts.get('cuda_runtime', '?')}); Python {facts.get('python', '?')}; Python.h: "
                 f"{facts.get('python_h', '?')}; compute-sanitizer: {facts.get('compute_sanitizer', '?')}")
    peaks = work / "peaks.json"
    if peaks.exists():
        p = json.loads(peaks.read_text())
        L.append(f"- measured: bf16 GEMM 8192^3 {p['measured_bf16_gemm_tflops']} TFLOPS, device copy "
                 f"{p['measured_copy_gbs']} GB/s")
    total = sum(float(s["seconds"]) for s in steps)
    L.append(f"- {len(steps) - len(failed)} of {len(steps)} steps passed in {total:.0f} s; "
             + ("**failed: " + ", ".join(s["step"] for s in failed) + "**" if failed else "none failed"))
    L += ["", "| step | status | seconds | budget | log |", "|---|---|---|---|---|"]
    for s in steps:
        status = s["status"] if s["status"] == "passed" else f"**{s['status']}**"
        L.append(f"| {s['step']} | {status} | {float(s['seconds']):.0f} | {s['budget']} | {s['log']} |")
    for s in failed:
        L += ["", f"`{s['step']}` ({s['status']}), last lines of {s['log']}:", "```"]
        L += _tail(work / s["log"]) or ["(empty)"]
        L.append("```")
    L += ["", "## Benchmarks (bf16, full forward + backward, p50)", ""] + bench_lines(work)
    text = "\n".join(L) + "\n"
    (work / "summary.md").write_text(text)
    return text


def cmd_summary(a) -> int:
    print(write_summary(Path(a.work)))
    return 0


def cmd_run(a) -> int:
    total = int(os.environ.get("GPU_CHECK_BUDGET_S", TOTAL_BUDGET_S))
    if a.dry_run:
        print_plan(total)
        return 0
    python = os.environ.get("PYTHON") or sys.executable
    proc = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"gpu_check: '{python} -c \"import torch\"' failed: torch must already be installed (the check "
              "installs nothing; set PYTHON=...)", file=sys.stderr)
        return 1
    out = Path(os.environ.get("OUT") or "gpu-check-results")
    work = Path(os.environ.get("GPU_CHECK_WORK") or ROOT / "build" / "gpu-check")
    return run_plan(a.call, out.resolve(), work.resolve(), total, python, a.steps.split(",") if a.steps else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run a call's plan (what tools/gpu_check.sh does)")
    p.add_argument("--call", type=int, choices=sorted(PLANS), default=1)
    p.add_argument("--dry-run", action="store_true", help="print both calls' plans and exit")
    p.add_argument("--steps", default=None, help="only these steps of the call, comma-separated")
    for name in ("preflight", "arch", "extension", "build", "ddp"):
        sub.add_parser(name)
    p = sub.add_parser("pytest")
    p.add_argument("part", choices=sorted(PYTEST_PARTS))
    p = sub.add_parser("bench")
    p.add_argument("name", choices=sorted(BENCHES))
    p = sub.add_parser("sanitize")
    p.add_argument("tool", choices=("memcheck", "racecheck"))
    p = sub.add_parser("ops")
    p.add_argument("--check", choices=("run", "sync", "graph"), required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p = sub.add_parser("peaks")
    p.add_argument("--json", default=None)
    p = sub.add_parser("topk")
    p.add_argument("--out", default=None)
    p = sub.add_parser("bench-check")
    p.add_argument("dir")
    p = sub.add_parser("summary")
    p.add_argument("--work", required=True)
    a = ap.parse_args(argv)
    return {"run": cmd_run, "preflight": cmd_preflight, "arch": cmd_arch, "extension": cmd_extension,
            "build": cmd_build, "ddp": cmd_ddp, "pytest": cmd_pytest, "bench": cmd_bench, "sanitize": cmd_sanitize,
            "ops": cmd_ops, "peaks": cmd_peaks, "topk": cmd_topk, "bench-check": cmd_bench_check,
            "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
