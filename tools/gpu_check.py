#!/usr/bin/env python3
"""The Python side of tools/gpu_check.sh (which says what runs when, with which budget). Run from the repository
root, so that the in-tree ckd_ext is the one imported.

    python tools/gpu_check.py preflight            torch, the GPU, the tools the steps need (exit 1 without a GPU)
    python tools/gpu_check.py arch                 TORCH_CUDA_ARCH_LIST of this GPU only, e.g. "9.0"
    python tools/gpu_check.py extension            exit 0 when ckd_ext._C loads and runs a fused op on CUDA
    python tools/gpu_check.py ops --check run      one forward + backward of every loss configuration (the
                                                   reduced set compute-sanitizer runs)
    python tools/gpu_check.py ops --check sync     every op under torch.cuda.set_sync_debug_mode("error")
    python tools/gpu_check.py ops --check graph    forward + backward captured in a CUDA graph, replayed on new
                                                   inputs, against an eager run
    python tools/gpu_check.py peaks --json F       measured bf16 GEMM TFLOPS and copy GB/s of this GPU
    python tools/gpu_check.py bench-check DIR      exit 1 unless DIR/results.csv holds at least one measured time
    python tools/gpu_check.py summary --out DIR    DIR/summary.md from the steps' records

`ops --device cpu` runs the same cases on the CPU without the CUDA-only part (CI checks the case list that way).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # inputs.CONFIGS: the configurations that reach every op variant


def _torch():
    try:
        import torch
    except ImportError as e:
        raise SystemExit(f"gpu_check: torch is not importable with {sys.executable} ({e}); the check installs "
                         "nothing (the GPU machine may have no network): use a Python that has torch "
                         "(PYTHON=... tools/gpu_check.sh)")
    return torch


# ------------------------------------------------------------------------------------------- preflight
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


def cmd_preflight(_a) -> int:
    torch = _torch()
    info: Dict[str, object] = {"python": sys.executable, "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                               "cuda_available": torch.cuda.is_available(), "nvcc": shutil.which("nvcc"),
                               "ninja": shutil.which("ninja"), "compute_sanitizer": find_sanitizer(),
                               "cpu_count": os.cpu_count()}
    for mod in ("pytest", "hypothesis", "numpy", "matplotlib", "setuptools"):
        try:
            __import__(mod)
            info[mod] = "yes"
        except ImportError:
            info[mod] = "MISSING"
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


def cmd_extension(_a) -> int:
    """Whether the build in the tree can be reused: ckd_ext._C loads against this torch and runs on this GPU."""
    torch = _torch()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 1
    import ckd_ext
    from ckd_ext import _extension
    if not ckd_ext.is_available():
        print(f"not reusable: {_extension.unavailable_reason()}")
        return 1
    try:
        s = torch.randn(8, 16, device="cuda", requires_grad=True)
        ckd_ext.kd_loss(s, torch.randn(8, 16, device="cuda")).backward()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001  (no kernel image for this GPU, a CPU-only _C, ...)
        print(f"not reusable: a fused op failed on CUDA: {type(e).__name__}: {str(e)[:300]}")
        return 1
    print(f"reusable: {Path(_extension.require_extension().__file__).name} runs on {torch.cuda.get_device_name(0)}")
    return 0


# ------------------------------------------------------------------------------------------------- ops
class Case:
    """One public call (a loss configuration, dtype, mask, reduction) and a scalar total to differentiate."""

    def __init__(self, config: str, dtype: str, masked: bool, reduction: str, n: int = 37, c: int = 100):
        self.config, self.dtype, self.masked, self.reduction, self.n, self.c = config, dtype, masked, reduction, n, c

    @property
    def name(self) -> str:
        return f"{self.config}/{self.dtype}/{'mask' if self.masked else 'nomask'}/{self.reduction}/{self.n}x{self.c}"

    def inputs(self, device: str, seed: int = 0):
        """Student (leaf), teacher, mask and the upstream weights of a "none" output, all made before the call."""
        import torch
        g = torch.Generator().manual_seed(seed)
        dt = getattr(torch, self.dtype)
        s = (3 * torch.randn(self.n, self.c, generator=g)).to(device=device, dtype=dt).requires_grad_()
        t = (3 * torch.randn(self.n, self.c, generator=g)).to(device=device, dtype=dt)
        mask = (torch.rand(self.n, generator=g) < 0.7).to(device) if self.masked else None
        weights = [(torch.rand(k, generator=g) + 0.5).to(device=device, dtype=torch.float32) for k in (self.n, self.c)]
        return s, t, mask, weights

    def total(self, s, t, mask, weights):
        import ckd_ext
        from inputs import CONFIGS
        name, kwargs = CONFIGS[self.config]
        out = getattr(ckd_ext, f"{name}_loss")(s, t, **kwargs, mask=mask, reduction=self.reduction)
        outs = out if isinstance(out, tuple) else (out,)
        if self.reduction != "none":
            return sum(o.float() for o in outs)
        return sum((o.float() * w).sum() for o, w in zip(outs, weights))


def op_cases(check: str, dtypes: Sequence[str]) -> List[Case]:
    """The cases of each check. sync: every configuration, dtype (fp32 computes the gradient in the forward op,
    16-bit students recompute it in the backward op), mask and reduction, so that all six ops and each of their
    branches run. graph: one masked "mean" case per loss and anchor in each dtype (the mask is what used to sync).
    run (the sanitizers): every configuration once per dtype, a packed and an unpacked width, masked "none"."""
    from inputs import CONFIGS
    if check == "sync":
        return [Case(cfg, dt, m, r) for cfg, dt, m, r in
                itertools.product(CONFIGS, dtypes, (False, True), ("mean", "sum", "none"))]
    if check == "graph":
        return [Case(cfg, dt, True, "mean") for cfg in ("ckd_student", "ckd_teacher", "bickd", "kd") for dt in dtypes]
    return [Case(cfg, dt, m, r, n, c) for cfg in CONFIGS for dt in dtypes
            for (m, r, n, c) in ((False, "mean", 64, 128), (True, "none", 37, 30))]


def run_once(case: Case, device: str, seed: int = 0):
    s, t, mask, weights = case.inputs(device, seed)
    total = case.total(s, t, mask, weights)
    total.backward()
    return total.detach(), s.grad.detach()


def check_sync(case: Case, device: str) -> str:
    """"" when the forward and backward ran under set_sync_debug_mode("error") without a host synchronisation."""
    import torch
    s, t, mask, weights = case.inputs(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        total = case.total(s, t, mask, weights)
        total.backward()
    except RuntimeError as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    if device == "cuda":
        torch.cuda.synchronize()
    return ""


def _rel_diff(a, b) -> float:
    scale = max(float(b.abs().max()), 1e-30)
    return float((a.double() - b.double()).abs().max()) / scale


# Graph and eager runs execute the same kernels and cuBLAS calls on the same inputs, so they are expected to agree
# bitwise (the kernels are deterministic, docs/cuda.md); the tolerance only allows cuBLAS to pick another algorithm
# inside a capture (another summation order): 8 units of the dtype's roundoff relative to the largest magnitude.
GRAPH_TOLERANCE = {"float32": 8 * 2 ** -24, "bfloat16": 8 * 2 ** -8, "float16": 8 * 2 ** -11}


def check_graph(case: Case, device: str) -> str:
    """Capture forward + backward in a CUDA graph, replay it on new inputs copied into the captured ones, and
    compare loss and gradient with an eager run on those inputs. "" when they agree (within GRAPH_TOLERANCE)."""
    import torch
    s, t, mask, weights = case.inputs(device, seed=0)
    new_s, new_t, _, _ = case.inputs(device, seed=1)
    try:
        if device == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
                for _ in range(2):
                    s.grad = None
                    case.total(s, t, mask, weights).backward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            s.grad = None
            with torch.cuda.graph(graph):
                static_total = case.total(s, t, mask, weights)
                static_total.backward()
            with torch.no_grad():
                s.copy_(new_s)
                t.copy_(new_t)
            graph.replay()
            torch.cuda.synchronize()
            got = static_total.detach().clone(), s.grad.detach().clone()
        else:  # CPU: no graphs; the comparison itself is what runs
            s.grad = None
            got = run_once(case, device, seed=1)
    except RuntimeError as e:
        return f"capture/replay failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    want = run_once(case, device, seed=1)
    errs = [_rel_diff(g, w) for g, w in zip(got, want)]
    tol = GRAPH_TOLERANCE[case.dtype]
    if max(errs) > tol:
        return f"replay differs from eager: loss {errs[0]:.3g}, grad {errs[1]:.3g} (tolerance {tol:.3g})"
    bitwise = all(torch.equal(g, w) for g, w in zip(got, want))
    print(f"    {case.name}: {'bitwise equal' if bitwise else f'within {max(errs):.3g}'}")
    return ""


def cmd_ops(a) -> int:
    import torch
    device = a.device
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 1
    cases = op_cases(a.check, a.dtypes.split(","))
    fn: Callable[[Case, str], str] = {"sync": check_sync, "graph": check_graph,
                                       "run": lambda c, d: (run_once(c, d), "")[1]}[a.check]
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


def bench_lines(out: Path) -> List[str]:
    """The headline of the GPU benchmark: per case and provider, full fwd+bwd time, peak memory and the rate the
    cost model implies (benchmarks/costs.py), against the datasheet peak."""
    from benchmarks.costs import achieved, device_peak, peak_fraction
    rows: List[Dict[str, str]] = []
    for csv_path in sorted(out.glob("bench*/results.csv")):
        with open(csv_path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r["mode"] == "full"]
    if not rows:
        return ["No benchmark results."]
    gpu = ""
    for mj in sorted(out.glob("bench*/machine.json")):
        gpu = json.loads(mj.read_text()).get("gpu", gpu) or gpu
    peak = device_peak(gpu)
    idx = {(r["loss"], r["shape"], r["provider"], r["metric"]): r for r in rows}
    L = [f"GPU {gpu or '?'}; rates from benchmarks/costs.py loss_work (the floor's GEMMs / bytes) over the measured "
         f"time; peak = datasheet {peak.name + ' ' + str(peak.tensor_tflops) + ' TFLOPS, ' + str(peak.hbm_tbs) + ' TB/s' if peak else 'unknown'}.",
         "", "| loss | shape | provider | full fwd+bwd | peak memory | rate | of peak |", "|---|---|---|---|---|---|---|"]
    seen = []
    for r in rows:
        key = (r["loss"], r["shape"], r["provider"])
        if key in seen:
            continue
        seen.append(key)
        tr, mr = idx.get(key + ("time",)), idx.get(key + ("peak_mem",))
        ms = float(tr["p50"]) if tr and tr["p50"] else None
        n, c = (int(x) for x in r["shape"].split("x"))
        rate = achieved(r["loss"], n, c, r["dtype"], "full", ms)
        frac = peak_fraction(rate, peak) if rate else None
        time_cell = f"{ms:.2f} ms" if ms is not None else (tr["note"] if tr else "missing")
        mem_cell = f"{float(mr['p50']):.0f} MiB" if mr and mr["p50"] else (mr["note"] if mr else "")
        L.append(f"| {r['loss']} | {r['shape']} {r['dtype']} | {r['provider']} | {time_cell} | {mem_cell} | "
                 f"{'' if rate is None else f'{rate[0]:.1f} {rate[1]}'} | {'' if frac is None else f'{frac:.0%}'} |")
    return L


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


def cmd_summary(a) -> int:
    out = Path(a.out)
    steps = _read_steps(out)
    failed = [s for s in steps if s["status"] != "passed"]
    L = ["# GPU check summary", ""]
    pre = out / "preflight.log"
    if pre.exists():
        facts = dict(l.split(": ", 1) for l in pre.read_text().splitlines() if ": " in l)
        L.append(f"- GPU: {facts.get('gpu', '?')} (sm {facts.get('capability', '?')}, {facts.get('sms', '?')} SMs, "
                 f"{facts.get('gpu_mem_gib', '?')} GiB); torch {facts.get('torch', '?')} (CUDA "
                 f"{facts.get('cuda_runtime', '?')}); compute-sanitizer: {facts.get('compute_sanitizer', '?')}")
    peaks = out / "peaks.json"
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
        L += _tail(out / s["log"]) or ["(empty)"]
        L.append("```")
    L += ["", "## Benchmark (bf16, full forward + backward, p50)", ""] + bench_lines(out)
    (out / "summary.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("preflight")
    sub.add_parser("arch")
    sub.add_parser("extension")
    p = sub.add_parser("ops")
    p.add_argument("--check", choices=("run", "sync", "graph"), required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p = sub.add_parser("peaks")
    p.add_argument("--json", default=None)
    p = sub.add_parser("bench-check")
    p.add_argument("dir")
    p = sub.add_parser("summary")
    p.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    return {"preflight": cmd_preflight, "arch": cmd_arch, "extension": cmd_extension, "ops": cmd_ops,
            "peaks": cmd_peaks, "bench-check": cmd_bench_check, "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
