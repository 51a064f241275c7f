"""The worker: a subprocess that measures cases and streams their rows (JSON lines), and `run_cases`, which
starts workers under a memory limit and a timeout and records a case that dies or hangs ("OOM", "timeout",
"error: ...") instead of losing the run.

By hand: `python -m benchmarks.worker SPEC` (from the repository root) runs the worker of a spec file.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

from .cases import MODES, SAVED_METRICS, make_inputs, make_lm_inputs, missing_rows, result_row
from .measure import freeze_gc, measure_peak, measure_time, quantiles, saved_bytes, warm_up
from .providers import REPO_ROOT, Floor, autocast_dtype, lm_loss_fn, loss_fn, mode_callables, package_version

# Default address-space limits (GiB) for CPU worker processes: eager/compiled materialise N x N and C x C
# matrices and are expected to run out at the scale shapes; the fused ops and the floor get more room.
DEFAULT_MEM_LIMIT_GIB = 20.0
DEFAULT_FUSED_MEM_LIMIT_GIB = 23.0

_OOM_WORDS = ("out of memory", "can't allocate", "cannot allocate", "failed to allocate", "bad_alloc",
              "memoryerror")


def is_oom(evidence) -> bool:
    """Whether an exception, or the output of a worker that died, says that memory ran out."""
    if isinstance(evidence, MemoryError):
        return True
    text = str(evidence).lower()
    return any(k in text for k in _OOM_WORDS)


def failure_note(exc: BaseException) -> str:
    """The note of the rows an exception left without a value."""
    return "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:200]}"


def _modes(opts: Dict) -> List[str]:
    return [m for m in MODES if m in opts.get("modes", MODES)]


def machine_info(device: str) -> Dict[str, object]:
    import torch
    info: Dict[str, object] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "mem_total_gib": _mem_total_gib(), "device": device,
        "package_version": package_version(),
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_mem_gib"] = round(p.total_memory / 2 ** 30, 1)
        clk, bus = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
        if clk and bus:  # kHz * bits * 2 (DDR) / 8
            info["gpu_peak_bw_gbs"] = round(clk * 1e3 * bus * 2 / 8 / 1e9, 1)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return float("nan")


class _Emitter:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **event):
        self.f.write(json.dumps(event) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def run_case(case: Dict, opts: Dict, emit: Callable) -> None:
    """Measure one case in every requested mode; emit one row per (mode, metric). Errors (OOM included) are
    emitted as rows with a note, per mode, and the worker goes on."""
    import torch
    loss, provider, device = case["loss"], case["provider"], opts["device"]
    modes = _modes(opts)
    done = set()

    def row(mode, metric, vals, note):
        emit(**result_row(case, device, mode, metric, vals, note))
        done.add((mode, metric))

    def fail(exc, modes):
        if not is_oom(exc) and opts.get("verbose"):
            traceback.print_exc()
        for r in missing_rows(case, device, modes, failure_note(exc), have=done):
            emit(**r)

    autocast = autocast_dtype(device, case["dtype"])
    try:
        fn = floor = None
        backend = opts.get("compile_backend", "inductor")
        if case.get("hidden"):  # lm group: hidden states are the timed inputs, the heads are bound to the loss
            (student, student_weight), (teacher, teacher_weight) = make_lm_inputs(
                case["N"], case["C"], case["hidden"], case["dtype"], device)
            fn = lm_loss_fn(provider, loss, student_weight, teacher_weight, backend)
            autocast = None  # every lm provider runs in the inputs' dtype (F.linear as a model's head would)
        else:
            student, teacher = make_inputs(case["N"], case["C"], case["dtype"], device)
            if provider == "floor":
                floor = Floor(loss, student, teacher)
            else:
                fn = loss_fn(provider, loss, backend, autocast)
    except Exception as e:  # noqa: BLE001
        fail(e, modes)
        return

    notes = [f"backend={opts.get('compile_backend', 'inductor')}"] if provider == "compiled" else []
    if autocast and provider in ("eager", "compiled"):
        notes.append(f"autocast={autocast}")
    backend_note = " ".join(notes)
    for mode in modes:
        try:
            setup, run = mode_callables(provider, loss, student, teacher, mode, fn, floor)
            first = warm_up(setup, run, device, opts.get("warmup", 2), opts.get("warmup_seconds", 1.0))
            freeze_gc()
            if provider == "compiled" and mode in ("full", "no_grad"):
                row(mode, "compile_time", [first] * 3, backend_note)
            if mode == "forward" and provider != "floor":
                sb = saved_bytes(fn, student, teacher)
                for k in SAVED_METRICS:
                    row(mode, k, [sb[k]] * 3, backend_note)
            mib, note = measure_peak(setup, run, device)
            row(mode, "peak_mem", [mib] * 3, note or backend_note)
            times = measure_time(setup, run, device, opts.get("reps", 25), opts.get("min_reps", 3),
                                 opts.get("max_seconds", 5.0))
            row(mode, "time", quantiles(times), backend_note)
        except Exception as e:  # noqa: BLE001
            fail(e, [mode])
        finally:
            student.grad = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()


def worker_main(spec_path: str) -> int:
    """Entry point of a worker subprocess: `python -c "...worker_main(spec)"` (see `run_cases`)."""
    with open(spec_path) as f:
        spec = json.load(f)
    opts = spec["opts"]
    limit = spec.get("mem_limit_bytes")
    if limit and opts["device"] == "cpu":  # an address-space limit would break CUDA's virtual reservations
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    torch.set_num_threads(opts["threads"])
    try:
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    except Exception:  # noqa: BLE001
        pass
    emit = _Emitter(spec["results"])
    emit(event="info", **machine_info(opts["device"]))
    freeze_gc()
    for i, case in enumerate(spec["cases"]):
        emit(event="start", case=i)
        run_case(case, opts, emit)
        emit(event="done", case=i)
    return 0


def _worker_cmd(spec_path: str) -> List[str]:
    code = ("import sys; sys.path.append(%r); from benchmarks.worker import worker_main; "
            "sys.exit(worker_main(%r))" % (str(REPO_ROOT), spec_path))
    return [sys.executable, "-c", code]


def _read_events(path: str) -> List[Dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
    return out


def _classify_death(rc: Optional[int], stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if rc in (-signal.SIGKILL, 137) or is_oom(stderr):
        return "OOM"
    last = [l for l in stderr.strip().splitlines() if l.strip()][-1:] or [""]
    return f"error: worker exited with {rc}: {last[0][:200]}"


def run_cases(cases: List[Dict], opts: Dict, timeout: float, mem_limit_gib: Optional[float],
              fused_mem_limit_gib: Optional[float], isolate: str = "case",
              log: Callable[[str], None] = print, deadline: Optional[float] = None) -> Tuple[List[Dict], Dict]:
    """Run cases in worker subprocesses and return (rows, machine info).

    isolate="case": one fresh process per case (the default: clean peak-RSS numbers, a crash or OOM kill
    costs one case). isolate="batch": all cases share one process, under the smallest of their memory limits
    (smoke runs: one torch import); a process that dies or passes `timeout` on a case has that case marked,
    and the rest go on in a new process. Every expected (mode, metric) of a case that produced no row gets
    one with the note "timeout", "OOM" or "error: ...". `deadline` (a time.monotonic() value): the worker running
    then is killed, and its case and every case not yet started get the note "deadline", so that a run with a wall
    budget still writes its tables.
    """
    rows: List[Dict] = []
    info: Dict = {}

    def limit_for(c):
        gib = fused_mem_limit_gib if c["provider"] in ("ckd_ext", "floor", "fused_linear") else mem_limit_gib
        return int(gib * 2 ** 30) if gib else None

    batches: List[List[Dict]] = [[c] for c in cases] if isolate == "case" else [list(cases)] if cases else []

    tmpdir = tempfile.mkdtemp(prefix="ckd_bench_")
    env = dict(os.environ, OMP_NUM_THREADS=str(opts["threads"]), MKL_NUM_THREADS=str(opts["threads"]))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    k = 0
    while batches:
        if deadline is not None and time.monotonic() > deadline:
            for c in (c for b in batches for c in b):
                rows.extend(missing_rows(c, opts["device"], _modes(opts), "deadline"))
            log(f"    -> deadline: {sum(len(b) for b in batches)} cases not run")
            break
        batch = batches.pop(0)
        k += 1
        spec_path = os.path.join(tmpdir, f"spec{k}.json")
        res_path = os.path.join(tmpdir, f"res{k}.jsonl")
        err_path = os.path.join(tmpdir, f"err{k}.txt")
        limits = [limit_for(c) for c in batch if limit_for(c)]
        with open(spec_path, "w") as f:
            json.dump({"cases": batch, "opts": opts, "results": res_path,
                       "mem_limit_bytes": min(limits) if limits else None}, f)
        for c in batch:
            log(f"  {c['loss']:6s} {c['provider']:9s} {c['name']} ({c['N']}x{c['C']} {c['dtype']})")
        with open(err_path, "w") as ferr:
            proc = subprocess.Popen(_worker_cmd(spec_path), stdout=ferr, stderr=subprocess.STDOUT, env=env,
                                    cwd=tempfile.gettempdir(), start_new_session=True)
            timed_out = past_deadline = False
            case_started = time.monotonic()
            current = -1
            try:
                while proc.poll() is None:
                    time.sleep(0.1)
                    ev = _read_events(res_path)
                    starts = [e["case"] for e in ev if e.get("event") == "start"]
                    if starts and starts[-1] != current:
                        current, case_started = starts[-1], time.monotonic()
                    timed_out = time.monotonic() - case_started > timeout
                    past_deadline = deadline is not None and time.monotonic() > deadline
                    if timed_out or past_deadline:
                        break
            finally:  # a timeout, the deadline, or this process being stopped: the worker goes too
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session (we started it)
                    except ProcessLookupError:
                        pass
                    proc.wait()
        events = _read_events(res_path)
        with open(err_path) as f:
            stderr = f.read()
        for e in events:
            if e.get("event") == "info":
                info = {k2: v for k2, v in e.items() if k2 != "event"}
        batch_rows = [e for e in events if e.get("event") == "row"]
        done = {e["case"] for e in events if e.get("event") == "done"}
        started = [e["case"] for e in events if e.get("event") == "start"]
        rows.extend(batch_rows)
        if len(done) == len(batch):
            continue
        # the process died or was killed inside case `bad`; mark its missing rows, re-queue the rest
        bad = started[-1] if started and started[-1] not in done else (min(set(range(len(batch))) - done))
        note = "deadline" if past_deadline else _classify_death(proc.returncode, stderr, timed_out)
        if note.startswith("error"):
            log("    worker failed:\n" + "\n".join("      " + l for l in stderr.strip().splitlines()[-15:]))
        c = batch[bad]
        have = {(r["mode"], r["metric"]) for r in batch_rows if r["shape_name"] == c["name"]
                and r["provider"] == c["provider"] and r["loss"] == c["loss"] and r["dtype"] == c["dtype"]}
        rows.extend(missing_rows(c, opts["device"], _modes(opts), note, have))
        log(f"    -> {note} ({c['loss']} {c['provider']} {c['name']})")
        rest = [batch[i] for i in range(len(batch)) if i not in done and i != bad]
        if rest:
            batches.insert(0, rest)
    return rows, info


if __name__ == "__main__":  # pragma: no cover
    sys.exit(worker_main(sys.argv[1]))
