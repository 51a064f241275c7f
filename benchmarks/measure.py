"""Measurement of one (setup, run) pair: time, peak memory beyond the inputs, bytes saved for backward, and
where the time of `full` goes (torch.profiler)."""
from __future__ import annotations

import ctypes
import gc
import math
import resource
import time
from typing import Callable, Dict, List, Sequence, Tuple

from .cases import make_inputs
from .providers import extension, loss_fn, mode_callables


def quantiles(xs: Sequence[float], qs=(0.2, 0.5, 0.8)) -> List[float]:
    """Linear-interpolation quantiles (numpy's default method)."""
    ys = sorted(xs)
    out = []
    for q in qs:
        pos = q * (len(ys) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(ys[lo] + (ys[hi] - ys[lo]) * (pos - lo))
    return out


def time_call(setup: Callable, run: Callable, device: str) -> float:
    """One timed call of `run` (after an untimed `setup`), in ms."""
    setup()
    extension().synchronize(device)
    if device == "cuda":
        import torch
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def measure_time(setup: Callable, run: Callable, device: str, reps: int = 25, min_reps: int = 3,
                 max_seconds: float = 5.0) -> List[float]:
    """Repeated timed calls (the caller has warmed up): at least `min_reps`, at most `reps`, stopping once
    `max_seconds` of measurement have passed. Returns the per-call times in ms."""
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < reps:
        times.append(time_call(setup, run, device))
        if len(times) >= min_reps and time.perf_counter() - start > max_seconds:
            break
    return times


def warm_up(setup: Callable, run: Callable, device: str, calls: int = 2, max_seconds: float = 1.0) -> float:
    """Warm-up calls (at least one). Returns the wall time of the first (cold) call in seconds: for the
    compiled provider that is the compile time (plus one run)."""
    sync = extension().synchronize
    t0 = time.perf_counter()
    setup()
    run()
    sync(device)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(calls - 1):
        if time.perf_counter() - t1 > max_seconds:
            break
        setup()
        run()
        sync(device)
    return first


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


_LIBC = None


def _malloc_trim():
    """Give freed heap memory back to the OS so that RSS reflects live memory (glibc only)."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except Exception:  # noqa: BLE001
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure_peak(setup: Callable, run: Callable, device: str) -> Tuple[float, str]:
    """Peak memory (MiB) that `run` needs beyond the inputs (memory held by `setup`, e.g. the autograd graph
    before a timed backward, counts; setup's own transient peak does not). Returns (MiB, method note).

    CUDA: torch.cuda.max_memory_allocated() during `run` minus memory_allocated() with only the inputs alive.
    CPU : VmHWM during `run` (reset through /proc/self/clear_refs after `setup`) minus VmRSS with only the
          inputs alive (after malloc_trim), in this (fresh, per-case) worker process.
    """
    gc.collect()
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return (peak - base) / 2 ** 20, ""
    _malloc_trim()
    base = _proc_status_kib("VmRSS")
    setup()
    if _reset_hwm():
        run()
        peak = _proc_status_kib("VmHWM")
        note = ""
    else:  # no clear_refs: lifetime maximum, an over-estimate once anything bigger ran before
        run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        note = "approx (ru_maxrss, clear_refs unavailable)"
    return max(0.0, (peak - base) / 1024.0), note


def saved_bytes(fn: Callable, student, teacher) -> Dict[str, int]:
    """Bytes the autograd graph of one forward keeps for backward: unique storages of the tensors packed by
    `saved_tensors_hooks`, split into the inputs' own storages and the rest (tensors kept on a ctx attribute
    instead of `save_for_backward` are invisible to the hooks)."""
    import torch
    storages: Dict[Tuple[str, int], int] = {}

    def pack(x):
        st = x.untyped_storage()
        storages[(str(x.device), st.data_ptr())] = st.nbytes()
        return x

    inputs = {(str(x.device), x.untyped_storage().data_ptr())
              for x in (student, teacher) + tuple(getattr(fn, "inputs", ()))}  # an lm provider's heads
    student.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(student, teacher)
    del loss
    total = sum(storages.values())
    inp = sum(v for k, v in storages.items() if k in inputs)
    return {"saved_total": total, "saved_inputs": inp, "saved_extra": total - inp}


def freeze_gc():
    """Move every object alive now (torch's and dynamo's module state) out of the collector's reach, so that
    the gc.collect() before each memory measurement costs microseconds instead of ~0.2 s."""
    gc.collect()
    gc.freeze()


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_mm",
            "aten::linear", "aten::_scaled_mm", "aten::mm.dtype")


def profile_full(provider: str, loss: str, N: int, C: int, dtype: str, device: str, calls: int = 3,
                 compile_backend: str = "inductor") -> Dict[str, float]:
    """Where the time of `full` goes: shares of self time in GEMM ops, in ckd_ext's own ops (name contains
    "ckd"), in other aten ops, and overhead (wall time not covered by any op's self time: Python, autograd
    engine, dispatch). Uses torch.profiler; one warm-up call first."""
    from torch.profiler import ProfilerActivity, profile
    student, teacher = make_inputs(N, C, dtype, device)
    fn = loss_fn(provider, loss, compile_backend)
    setup, run = mode_callables(provider, loss, student, teacher, "full", fn)
    warm_up(setup, run, device, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts):  # the profiler's own start-up cost stays out of the numbers
        setup()
        run()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(calls):
            setup()
            run()
        extension().synchronize(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    cats = {"gemm": 0.0, "ckd_ext": 0.0, "other_ops": 0.0}
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    for ev in prof.key_averages():
        us = float(getattr(ev, attr, 0.0) or 0.0)
        name = ev.key
        if name.startswith("ProfilerStep") or us <= 0:
            continue
        if name in GEMM_OPS or "gemm" in name.lower() or "matmul" in name.lower():
            cats["gemm"] += us
        elif "ckd" in name.lower():
            cats["ckd_ext"] += us
        else:
            cats["other_ops"] += us
    busy = sum(cats.values())
    total = max(wall_us, busy)
    out = {k: v / total for k, v in cats.items()}
    out["overhead"] = max(0.0, 1.0 - busy / total)
    out["wall_ms_per_call"] = wall_us / calls / 1e3
    return out
