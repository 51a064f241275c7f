"""Shared helpers for the ckd_ext benchmarks: shapes, providers, measurement, subprocess workers.

Used by both the pytest-benchmark suite (``benchmarks/test_bench.py``) and the sweep runner
(``benchmarks/run.py``) so that the two never disagree on what a case is or how it is measured.

Vocabulary
----------
case      one (loss, provider, shape, dtype, device); measured in all modes.
provider  ``ckd_ext`` (fused ops), ``eager`` (``ckd_ext.reference``), ``compiled`` (``torch.compile`` of the
          reference) and ``floor`` (the bare work no implementation can avoid, see :class:`Floor`).
mode      ``full`` (forward + backward, the headline), ``forward`` (with autograd recording),
          ``backward`` (``loss.backward()`` alone, the forward done untimed beforehand), ``no_grad``.
metric    ``time`` (ms, p20/p50/p80 over repetitions after warm-up), ``peak_mem`` (MiB beyond the inputs),
          ``saved_total`` / ``saved_inputs`` / ``saved_extra`` (bytes kept for backward, from
          ``saved_tensors_hooks``; mode ``forward`` only), ``compile_time`` (s, ``compiled`` only: the cold
          first call of modes ``full`` and ``no_grad``, the two graphs torch.compile builds).

This module imports torch lazily so that the runner's parent process and ``--help`` stay light.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]

LOSSES: Tuple[str, ...] = ("ckd", "bickd", "kd")
PROVIDERS: Tuple[str, ...] = ("ckd_ext", "eager", "compiled", "floor")
# Order matters: `full` runs first so that torch.compile builds its forward+backward graphs there.
MODES: Tuple[str, ...] = ("full", "forward", "backward", "no_grad")
SAVED_METRICS: Tuple[str, ...] = ("saved_total", "saved_inputs", "saved_extra")
METRICS: Tuple[str, ...] = ("time", "peak_mem") + SAVED_METRICS + ("compile_time",)
UNITS = {"time": "ms", "peak_mem": "MiB", "saved_total": "bytes", "saved_inputs": "bytes",
         "saved_extra": "bytes", "compile_time": "s"}
CSV_COLUMNS: Tuple[str, ...] = (
    "loss", "provider", "mode", "metric", "shape", "dtype", "p20", "p50", "p80", "unit", "device",
    "threads", "torch_version", "package_version", "timestamp",
    # extra columns: which named shape this is, and why a value is missing ("OOM", "timeout", "error: ...")
    # or how it was taken ("backend=aot_eager").
    "shape_name", "note")

# Default address-space limits (GiB) for CPU worker processes: eager/compiled materialise N x N and C x C
# matrices and are expected to run out at the scale shapes; the fused ops and the floor get more room.
DEFAULT_MEM_LIMIT_GIB = 20.0
DEFAULT_FUSED_MEM_LIMIT_GIB = 23.0


def expected_metrics(provider: str, mode: str) -> Tuple[str, ...]:
    """The metrics a (provider, mode) produces: what the runner writes and the smoke test checks."""
    out = ["time", "peak_mem"]
    if provider != "floor" and mode == "forward":
        out += list(SAVED_METRICS)
    if provider == "compiled" and mode in ("full", "no_grad"):
        out.append("compile_time")
    return tuple(out)


# --------------------------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shape:
    name: str          # what it stands for (used in the docs)
    group: str         # vision | tokens | scale | gpu-tokens | sweep | smoke
    loss: str
    N: int
    C: int
    dtype: str = "float32"
    cuda_only: bool = False

    @property
    def shape(self) -> str:
        return f"{self.N}x{self.C}"


def _mk(name, group, losses, N, C, dtype="float32", cuda_only=False) -> List[Shape]:
    return [Shape(name, group, loss, N, C, dtype, cuda_only) for loss in losses]


ALL = LOSSES
SHAPES: List[Shape] = (
    # vision: one image per row, one class per column
    _mk("cifar100-b64", "vision", ALL, 64, 100)
    + _mk("imagenet-b512", "vision", ALL, 512, 1000)
    + _mk("contrastive-b4096", "vision", ALL, 4096, 1000)
    # tokens: one token per row, one vocabulary entry per column
    + _mk("tokens-2k-v8k", "tokens", ("ckd", "kd"), 2048, 8192)
    + _mk("tokens-8k-v1k", "tokens", ("ckd", "kd"), 8192, 1024)
    + _mk("tokens-1k-v8k", "tokens", ("bickd",), 1024, 8192)
    # scale: where the materialising reference cannot follow (N x N or C x C no longer fits)
    + _mk("scale-rows-64k", "scale", ("ckd",), 65536, 256)
    + _mk("scale-classes-32k", "scale", ("bickd",), 1024, 32000)
    # GPU only: bf16 LLM-vocabulary token batches
    + _mk("gpu-tokens-4k-v32k", "gpu-tokens", ALL, 4096, 32000, "bfloat16", True)
    + _mk("gpu-tokens-16k-v32k", "gpu-tokens", ALL, 16384, 32000, "bfloat16", True)
    + _mk("gpu-tokens-16k-v128k", "gpu-tokens", ALL, 16384, 128256, "bfloat16", True)
    # sweeps for the plots (together with the vision shapes: N = 128..4096 at C = 1000, C = 128..8192 at N = 512)
    + [s for N in (128, 256, 1024, 2048) for s in _mk(f"sweep-N{N}", "sweep", ALL, N, 1000)]
    + [s for C in (128, 256, 2048, 4096, 8192) for s in _mk(f"sweep-C{C}", "sweep", ALL, 512, C)]
)
# --smoke: tiny, but still an N sweep (C = 16) and a C sweep (N = 16) so that every plot gets drawn.
SMOKE_SHAPES: List[Shape] = (_mk("smoke-8x16", "smoke", ALL, 8, 16) + _mk("smoke-16x16", "smoke", ALL, 16, 16)
                             + _mk("smoke-16x32", "smoke", ALL, 16, 32))

# Target classes of shapes (issue 4, section 3).
TOKEN_GROUPS = ("tokens", "gpu-tokens")
MEMORY_TARGET_GROUPS = ("tokens", "scale", "gpu-tokens")


def is_gemm_bound(loss: str, N: int, C: int) -> bool:
    """CKD/BicKD shapes whose floor is dominated by the N x N x C (and C x C x N) GEMMs."""
    return loss != "kd" and N >= 256 and C >= 256


def select_shapes(device: str, smoke: bool = False, only: Optional[Dict[str, List[str]]] = None) -> List[Shape]:
    only = only or {}
    shapes = SMOKE_SHAPES if smoke else SHAPES + (SMOKE_SHAPES if "shape" in only else [])
    shapes = [s for s in shapes if device == "cuda" or not s.cuda_only]
    out = []
    for s in shapes:
        if "loss" in only and s.loss not in only["loss"]:
            continue
        if "dtype" in only and s.dtype not in only["dtype"]:
            continue
        if "shape" in only and not ({s.name, s.group, s.shape} & set(only["shape"])):
            continue
        out.append(s)
    return out


def parse_only(items: Sequence[str]) -> Dict[str, List[str]]:
    """`--only provider=eager,floor --only shape=tokens` -> {"provider": [...], "shape": [...]}."""
    out: Dict[str, List[str]] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--only expects KEY=VALUE[,VALUE...], got {item!r}")
        key, vals = item.split("=", 1)
        key = key.strip()
        if key not in ("loss", "provider", "mode", "shape", "dtype"):
            raise ValueError(f"--only: unknown key {key!r} (loss, provider, mode, shape, dtype)")
        out.setdefault(key, []).extend(v.strip() for v in vals.split(",") if v.strip())
    return out


# ------------------------------------------------------------------------------------------ providers
def _import_ckd_ext():
    """Import ckd_ext; if it is not installed, fall back to the source tree (appended, so that an installed
    copy always wins)."""
    try:
        import ckd_ext  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "ckd_ext":
            raise
        if str(REPO_ROOT) not in sys.path:
            sys.path.append(str(REPO_ROOT))
        import ckd_ext  # noqa: F401
    import ckd_ext
    return ckd_ext


def package_version() -> str:
    try:
        return str(getattr(_import_ckd_ext(), "__version__", "unknown"))
    except Exception:  # noqa: BLE001
        return "unavailable"


def provider_status(provider: str, loss: Optional[str] = None) -> Tuple[bool, str]:
    """(available, note). ckd_ext needs the compiled extension `ckd_ext._C`; eager/compiled need
    `ckd_ext.reference`; floor needs only torch."""
    if provider == "floor":
        return True, ""
    try:
        ckd_ext = _import_ckd_ext()
    except Exception as e:  # noqa: BLE001
        return False, f"ckd_ext not importable ({type(e).__name__}: {e})"
    if provider == "ckd_ext":
        try:
            import ckd_ext._C  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return False, f"ckd_ext._C not importable ({type(e).__name__}: {e}); build with " \
                          f"`pip install --no-build-isolation -e .`"
        names = [f"{loss}_loss"] if loss else [f"{x}_loss" for x in LOSSES]
        missing = [n for n in names if not callable(getattr(ckd_ext, n, None))]
        if missing:
            return False, f"ckd_ext has no {', '.join(missing)}"
        return True, ""
    if provider in ("eager", "compiled"):
        try:
            from ckd_ext import reference
        except Exception as e:  # noqa: BLE001
            return False, f"ckd_ext.reference not importable ({type(e).__name__}: {e})"
        if loss and not callable(getattr(reference, f"{loss}_loss", None)):
            return False, f"ckd_ext.reference has no {loss}_loss"
        return True, ""
    return False, f"unknown provider {provider!r}"


def loss_fn(provider: str, loss: str, compile_backend: str = "inductor") -> Callable:
    """The callable `f(student, teacher) -> scalar loss` of an autograd provider (not floor)."""
    ckd_ext = _import_ckd_ext()
    if provider == "ckd_ext":
        return getattr(ckd_ext, f"{loss}_loss")
    from ckd_ext import reference
    fn = getattr(reference, f"{loss}_loss")
    if provider == "eager":
        return fn
    if provider == "compiled":
        import torch
        return torch.compile(fn, dynamic=False, backend=compile_backend)
    raise ValueError(provider)


# ------------------------------------------------------------------------------------------ the floor
class Floor:
    """The work no implementation of the loss can avoid, as bare torch ops of the same sizes.

    forward  : one read of each input (``x.sum(dtype=float32)``), then the similarity GEMMs:
               CKD   one N x N x C GEMM  (S @ T^T);
               BicKD one N x N x C GEMM  (S @ T^T, sample side) + one C x C x N GEMM (S^T @ T, class side);
               KD    none.
    backward : the gradient GEMMs, each writing its output (N x C for the sample side, which *is* the write
               of the gradient, so no separate write is added):
               CKD   one N x N x C GEMM  (W @ S, W an N x N coefficient block);
               BicKD one N x N x C GEMM  (W @ T) + one C x C x N GEMM (G @ T^T);
               KD    one write of the gradient (``torch.empty_like(S).fill_(1.0)``).
    full = forward + backward; no_grad = forward.
    GEMMs run in the input dtype, chunked over output rows so that no output block exceeds
    max(N*C, 2**22) elements: the floor never materialises an N x N or C x C matrix either (which is what the
    memory contract asks of the fused ops), and its peak memory is the gradient plus the blocks.
    The coefficient blocks W/G are random and allocated once, outside the timed region.
    """

    def __init__(self, loss: str, student, teacher):
        import torch
        self.loss, self.s, self.t = loss, student.detach(), teacher.detach()
        N, C = self.s.shape
        self.N, self.C = N, C
        budget = max(N * C, 1 << 22)
        self.bm = max(1, min(N, budget // max(N, 1)))   # rows per N x N block
        self.bc = max(1, min(C, budget // max(N, C)))   # rows per C x C block (out bc x C and bc x N)
        dev, dt = self.s.device, self.s.dtype
        self.sim_buf = torch.empty(self.bm, N, device=dev, dtype=dt) if loss != "kd" else None
        self.w_blk = torch.randn(self.bm, N, device=dev, dtype=dt) if loss != "kd" else None
        if loss == "bickd":
            self.cls_buf = torch.empty(self.bc, C, device=dev, dtype=dt)
            self.g_blk = torch.randn(self.bc, C, device=dev, dtype=dt)
            self.cls_out = torch.empty(self.bc, N, device=dev, dtype=dt)

    def forward(self):
        import torch
        s, t = self.s, self.t
        a = s.sum(dtype=torch.float32)
        b = t.sum(dtype=torch.float32)
        if self.loss in ("ckd", "bickd"):
            tt = t.t()
            for r in range(0, self.N, self.bm):
                rows = min(self.bm, self.N - r)
                torch.mm(s[r:r + rows], tt, out=self.sim_buf[:rows])
        if self.loss == "bickd":
            st = s.t()
            for c in range(0, self.C, self.bc):
                cols = min(self.bc, self.C - c)
                torch.mm(st[c:c + cols], t, out=self.cls_buf[:cols])
        return a + b

    def backward(self):
        import torch
        s, t = self.s, self.t
        grad = torch.empty_like(s)
        if self.loss == "kd":
            grad.fill_(1.0)
            return grad
        v = s if self.loss == "ckd" else t
        for r in range(0, self.N, self.bm):
            rows = min(self.bm, self.N - r)
            torch.mm(self.w_blk[:rows], v, out=grad[r:r + rows])
        if self.loss == "bickd":
            tt = t.t()
            for c in range(0, self.C, self.bc):
                cols = min(self.bc, self.C - c)
                torch.mm(self.g_blk[:cols], tt, out=self.cls_out[:cols])
        return grad


# ------------------------------------------------------------------------------------- case callables
def make_inputs(N: int, C: int, dtype: str, device: str, seed: int = 0):
    """Student (leaf, requires_grad) and teacher logits, created directly in `dtype` on `device`."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    t = torch.randn(N, C, generator=g, device=device, dtype=torch.float32).mul_(3.0)
    s = (t * 0.5).add_(torch.randn(N, C, generator=g, device=device, dtype=torch.float32), alpha=2.0)
    return s.to(dt).requires_grad_(True), t.to(dt)


def mode_callables(provider: str, loss: str, student, teacher, mode: str, fn: Optional[Callable] = None,
                   floor: Optional[Floor] = None) -> Tuple[Callable[[], None], Callable[[], None]]:
    """(setup, run) for one mode: `setup` is untimed, `run` is what gets timed and memory-measured."""
    import torch
    if provider == "floor":
        assert floor is not None
        work = {"forward": floor.forward, "no_grad": floor.forward, "backward": floor.backward,
                "full": lambda: (floor.forward(), floor.backward())}[mode]
        def run_floor():
            work()

        return (lambda: None), run_floor
    assert fn is not None
    held: Dict[str, object] = {}

    def clear():
        student.grad = None
        held.clear()

    if mode == "full":
        return clear, lambda: fn(student, teacher).backward()
    if mode == "forward":
        def run_forward():
            fn(student, teacher)  # the result (and its graph) is dropped at once

        return clear, run_forward
    if mode == "backward":
        def setup():
            clear()
            held["loss"] = fn(student, teacher)

        return setup, lambda: held.pop("loss").backward()
    if mode == "no_grad":
        def run():
            with torch.no_grad():
                fn(student, teacher)

        return clear, run
    raise ValueError(mode)


# ---------------------------------------------------------------------------------------- measurement
def _sync(device: str):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


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
    _sync(device)
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
    t0 = time.perf_counter()
    setup()
    run()
    _sync(device)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(calls - 1):
        if time.perf_counter() - t1 > max_seconds:
            break
        setup()
        run()
        _sync(device)
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

    inputs = {(str(x.device), x.untyped_storage().data_ptr()) for x in (student, teacher)}
    student.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn(student, teacher)
    del loss
    total = sum(storages.values())
    inp = sum(v for k, v in storages.items() if k in inputs)
    return {"saved_total": total, "saved_inputs": inp, "saved_extra": total - inp}


def _freeze_gc():
    """Move every object alive now (torch's and dynamo's module state) out of the collector's reach, so that
    the gc.collect() before each memory measurement costs microseconds instead of ~0.2 s."""
    gc.collect()
    gc.freeze()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return any(k in msg for k in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                  "bad_alloc", "failed to allocate"))


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_mm",
            "aten::linear", "aten::_scaled_mm", "aten::mm.dtype")


def profile_full(provider: str, loss: str, N: int, C: int, dtype: str, device: str, calls: int = 3,
                 compile_backend: str = "inductor") -> Dict[str, float]:
    """Where the time of `full` goes: shares of self time in GEMM ops, in ckd_ext's own ops (name contains
    "ckd"), in other aten ops, and overhead (wall time not covered by any op's self time: Python, autograd
    engine, dispatch). Uses torch.profiler; one warm-up call first."""
    import torch
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
        _sync(device)
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


# -------------------------------------------------------------------------------------------- worker
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
    modes = [m for m in MODES if m in opts.get("modes", MODES)]
    base_row = dict(loss=loss, provider=provider, shape=f"{case['N']}x{case['C']}", dtype=case["dtype"],
                    shape_name=case["name"], device=device)

    def row(mode, metric, vals=None, note=""):
        p = (vals + [None, None, None])[:3] if vals else [None, None, None]
        emit(event="row", **base_row, mode=mode, metric=metric, p20=p[0], p50=p[1], p80=p[2],
             unit=UNITS[metric], note=note)

    def fail_mode(mode, note):
        for metric in expected_metrics(provider, mode):
            row(mode, metric, note=note)

    try:
        student, teacher = make_inputs(case["N"], case["C"], case["dtype"], device)
        fn = floor = None
        if provider == "floor":
            floor = Floor(loss, student, teacher)
        else:
            fn = loss_fn(provider, loss, opts.get("compile_backend", "inductor"))
    except Exception as e:  # noqa: BLE001
        note = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"
        for mode in modes:
            fail_mode(mode, note)
        return

    backend_note = f"backend={opts.get('compile_backend', 'inductor')}" if provider == "compiled" else ""
    for mode in modes:
        done = set()
        try:
            setup, run = mode_callables(provider, loss, student, teacher, mode, fn, floor)
            first = warm_up(setup, run, device, opts.get("warmup", 2), opts.get("warmup_seconds", 1.0))
            _freeze_gc()
            if provider == "compiled" and mode in ("full", "no_grad"):
                row(mode, "compile_time", [first] * 3, backend_note)
                done.add("compile_time")
            if mode == "forward" and provider != "floor":
                sb = saved_bytes(fn, student, teacher)
                for k in SAVED_METRICS:
                    row(mode, k, [sb[k]] * 3, backend_note)
                    done.add(k)
            mib, note = measure_peak(setup, run, device)
            row(mode, "peak_mem", [mib] * 3, note or backend_note)
            done.add("peak_mem")
            times = measure_time(setup, run, device, opts.get("reps", 25), opts.get("min_reps", 3),
                                 opts.get("max_seconds", 5.0))
            row(mode, "time", quantiles(times), backend_note)
            done.add("time")
        except Exception as e:  # noqa: BLE001
            note = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"
            if not _is_oom(e) and opts.get("verbose"):
                traceback.print_exc()
            for metric in expected_metrics(provider, mode):
                if metric not in done:
                    row(mode, metric, note=note)
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
    _freeze_gc()
    for i, case in enumerate(spec["cases"]):
        emit(event="start", case=i)
        run_case(case, opts, emit)
        emit(event="done", case=i)
    return 0


# ------------------------------------------------------------------------------------ orchestration
def _worker_cmd(spec_path: str) -> List[str]:
    code = ("import sys; sys.path.append(%r); from benchmarks.common import worker_main; "
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
    low = stderr.lower()
    if rc in (-signal.SIGKILL, 137) or any(k in low for k in ("bad_alloc", "memoryerror", "out of memory",
                                                                "can't allocate", "cannot allocate")):
        return "OOM"
    last = [l for l in stderr.strip().splitlines() if l.strip()][-1:] or [""]
    return f"error: worker exited with {rc}: {last[0][:200]}"


def run_cases(cases: List[Dict], opts: Dict, timeout: float, mem_limit_gib: Optional[float],
              fused_mem_limit_gib: Optional[float], isolate: str = "case",
              log: Callable[[str], None] = print) -> Tuple[List[Dict], Dict]:
    """Run cases in worker subprocesses and return (rows, machine info).

    isolate="case": one fresh process per case (the default: clean peak-RSS numbers, a crash or OOM kill
    costs one case). isolate="batch": all cases share one process (under the smallest memory limit) (smoke runs: one
    torch import); a process that dies or passes `timeout` on a case has that case marked, and the rest
    go on in a new process. Every expected (mode, metric) of a case that produced no row gets one with the
    note "timeout", "OOM" or "error: ...".
    """
    rows: List[Dict] = []
    info: Dict = {}

    def limit_for(c):
        gib = fused_mem_limit_gib if c["provider"] in ("ckd_ext", "floor") else mem_limit_gib
        return int(gib * 2 ** 30) if gib else None

    # group by memory limit, keep order
    batches: List[List[Dict]] = []
    if isolate == "case":
        batches = [[c] for c in cases]
    else:
        batches = [list(cases)] if cases else []  # one process, under the smallest of the limits

    tmpdir = tempfile.mkdtemp(prefix="ckd_bench_")
    env = dict(os.environ, OMP_NUM_THREADS=str(opts["threads"]), MKL_NUM_THREADS=str(opts["threads"]))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    k = 0
    while batches:
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
            timed_out = False
            case_started = time.monotonic()
            current = -1
            while proc.poll() is None:
                time.sleep(0.1)
                ev = _read_events(res_path)
                starts = [e["case"] for e in ev if e.get("event") == "start"]
                if starts and starts[-1] != current:
                    current, case_started = starts[-1], time.monotonic()
                if time.monotonic() - case_started > timeout:
                    timed_out = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session (we started it)
                    except ProcessLookupError:
                        pass
                    proc.wait()
                    break
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
        note = _classify_death(proc.returncode, stderr, timed_out)
        if note.startswith("error"):
            log("    worker failed:\n" + "\n".join("      " + l for l in stderr.strip().splitlines()[-15:]))
        c = batch[bad]
        have = {(r["mode"], r["metric"]) for r in batch_rows if r["shape_name"] == c["name"]
                and r["provider"] == c["provider"] and r["loss"] == c["loss"] and r["dtype"] == c["dtype"]}
        for mode in opts.get("modes", MODES):
            for metric in expected_metrics(c["provider"], mode):
                if (mode, metric) not in have:
                    rows.append(dict(event="row", loss=c["loss"], provider=c["provider"],
                                     shape=f"{c['N']}x{c['C']}", dtype=c["dtype"], shape_name=c["name"],
                                     device=opts["device"], mode=mode, metric=metric, p20=None, p50=None,
                                     p80=None, unit=UNITS[metric], note=note))
        log(f"    -> {note} ({c['loss']} {c['provider']} {c['name']})")
        rest = [batch[i] for i in range(len(batch)) if i not in done and i != bad]
        if rest:
            batches.insert(0, rest)
    return rows, info


def make_case(shape: Shape, provider: str) -> Dict:
    return {"loss": shape.loss, "provider": provider, "name": shape.name, "group": shape.group,
            "N": shape.N, "C": shape.C, "dtype": shape.dtype}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


if __name__ == "__main__":  # pragma: no cover - `python benchmarks/common.py SPEC` runs a worker by hand
    sys.path.append(str(REPO_ROOT))
    sys.exit(worker_main(sys.argv[1]))
