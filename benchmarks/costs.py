"""The FLOP and byte model of each loss, in one place: the benchmark tables' TFLOPS and GB/s columns
(`loss_work`), the GPU check's summary, and the estimate table of docs/cuda.md (`python -m benchmarks.costs`).

Counting rules
--------------
* FLOPs are GEMM FLOPs, 2 per multiply-add; the element-wise work (norms, log-sum-exps, epilogues) is counted
  in bytes only.
* Bytes are DRAM traffic; a tensor written by one kernel and read by the next counts twice (no cache reuse is
  assumed, so the per-kernel models are upper bounds on traffic; `loss_work`, the minimum, is exact).
* An estimated time is max(FLOPs / GEMM rate, bytes / bandwidth, launches x launch cost): the three overlap
  when the GPU is busy, and the largest one binds.

`loss_work` is the work no implementation can avoid, the same GEMMs as the benchmark's floor
(`benchmarks.providers.Floor`): CKD one N x N x C GEMM forward and one backward (either anchor); BicKD that
plus one C x C x N GEMM each way; KD none. Bytes: the inputs read once, the gradient written once. Achieved
rates divide this by a measured time, so providers compare on the same numerator.

The per-implementation models (`fused_op`, `eager`) describe one forward + backward with a 16-bit student. ckd_ext
computes CKD's and BicKD's gradient in the forward and keeps it in fp32 where it fits `forward_gradient_bytes` (a
quarter of the device's memory: `FORWARD_GRADIENT_BYTES` for the 80 GB device modelled here), and backward only
scales it; above that, the forward computes no gradient and the backward op recomputes, paying the similarity GEMMs
twice (ckd_ext/losses.py, `_grad_needed`). The fused op's earlier implementation (csrc/losses.cpp) is a frozen table
in docs/cuda.md, not a model here.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

from .cases import base_loss

GIB = 1 << 30
# The workspace the fused op's rows use: the CUDA default on an 80 GB device (an eighth of its free memory, at most
# 4 GiB; csrc/orchestration/workspace.h).
WORKSPACE = 4 * GIB
ACC_BYTES = 4  # fp32 accumulation: similarities, coefficients, converted operands
# Host cost of one kernel or cuBLAS launch through ATen; at millions of tiny launches it, not the GPU, sets the time.
LAUNCH_SECONDS = 10e-6
# ckd_ext.forward_gradient_bytes() on an 80 GB device (a quarter of its memory): the largest fp32 gradient of a
# 16-bit student that CKD and BicKD compute in their forward.
FORWARD_GRADIENT_BYTES = 80 * 10 ** 9 // 4


def dtype_bytes(dtype: str) -> int:
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[dtype]


# ------------------------------------------------------------------------------------------------- devices
@dataclasses.dataclass(frozen=True)
class DevicePeak:
    name: str
    tensor_tflops: float  # dense bf16 / fp16 tensor cores, fp32 accumulation (no sparsity)
    fp32_tflops: float    # fp32 SIMT (non-tensor) rate
    hbm_tbs: float        # DRAM bandwidth, TB/s


H100 = DevicePeak("H100 SXM", 989.0, 67.0, 3.35)
# Vendor datasheet figures, matched on torch.cuda.get_device_name() (first match wins).
_KNOWN: Tuple[Tuple[Tuple[str, ...], DevicePeak], ...] = (
    (("H200",), DevicePeak("H200", 989.0, 67.0, 4.8)),
    (("H100", "PCIE"), DevicePeak("H100 PCIe", 756.0, 51.0, 2.0)),
    (("H100", "NVL"), DevicePeak("H100 NVL", 835.0, 60.0, 3.9)),
    (("H100",), H100),
    (("A100",), DevicePeak("A100", 312.0, 19.5, 2.0)),
    (("L40S",), DevicePeak("L40S", 362.0, 91.6, 0.864)),
)


def device_peak(device_name: Optional[str]) -> Optional[DevicePeak]:
    """The datasheet peaks of a GPU named like torch.cuda.get_device_name(), None when unknown."""
    upper = (device_name or "").upper()
    for words, peak in _KNOWN:
        if all(w in upper for w in words):
            return peak
    return None


# ---------------------------------------------------------------------------------------------------- work
@dataclasses.dataclass
class Work:
    flops: float = 0.0
    bytes: float = 0.0
    gemms: int = 0
    launches: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.gemms + other.gemms,
                    self.launches + other.launches)

    def gemm(self, m: int, n: int, k: int, operand_bytes: int, accumulate: bool = False, count: int = 1) -> None:
        """`count` GEMMs (m x k) @ (k x n) -> fp32 m x n (read as well when accumulating, addmm)."""
        self.flops += 2.0 * m * n * k * count
        self.bytes += count * ((m + n) * k * operand_bytes + m * n * ACC_BYTES * (2 if accumulate else 1))
        self.gemms += count
        self.launches += count

    def kernel(self, read: float, written: float, count: int = 1) -> None:
        self.bytes += count * (read + written)
        self.launches += count

    def seconds(self, gemm_tflops: float, hbm_tbs: float, launch_seconds: float = LAUNCH_SECONDS) -> float:
        return max(self.flops / (gemm_tflops * 1e12), self.bytes / (hbm_tbs * 1e12), self.launches * launch_seconds)


def loss_work(loss: str, N: int, C: int, dtype: str, mode: str = "full") -> Work:
    """The minimum work of `loss` in a benchmark mode (full, forward, backward, no_grad): see the module doc."""
    b = dtype_bytes(dtype)
    gemms = {"ckd": [(N, N, C)], "bickd": [(N, N, C), (C, C, N)], "kd": []}[base_loss(loss)]
    passes = {"full": 2, "forward": 1, "no_grad": 1, "backward": 1}[mode]
    flops = passes * sum(2.0 * m * n * k for m, n, k in gemms)
    nbytes = {"full": 3, "forward": 2, "no_grad": 2, "backward": 1}[mode] * N * C * b
    return Work(flops=flops, bytes=nbytes, gemms=passes * len(gemms))


def achieved(loss: str, N: int, C: int, dtype: str, mode: str, ms: Optional[float]) -> Optional[Tuple[float, str]]:
    """(rate, unit) a measured time implies for `loss_work`: TFLOPS for the GEMM-bound losses, GB/s for KD."""
    if ms is None or ms <= 0:
        return None
    w = loss_work(loss, N, C, dtype, mode)
    if w.flops > 0:
        return w.flops / (ms * 1e-3) / 1e12, "TFLOPS"
    return w.bytes / (ms * 1e-3) / 1e9, "GB/s"


def peak_fraction(rate: Tuple[float, str], peak: Optional[DevicePeak]) -> Optional[float]:
    """The share of the device's datasheet peak (tensor-core rate for TFLOPS, DRAM bandwidth for GB/s)."""
    if peak is None:
        return None
    value, unit = rate
    return value / peak.tensor_tflops if unit == "TFLOPS" else value / (peak.hbm_tbs * 1e3)


# ----------------------------------------------------------------------------------------------- the fused op
def _blocks(total: int, size: int) -> List[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def _kd(N, C, b, want_grad) -> Work:
    w = Work()
    w.kernel(2 * N * C * b, N * C * b if want_grad else 0)                 # kd_rows: one pass
    return w


def _contrastive_bytes(w: Work, anchors: int, cands: int, K: int, b: int, want_grad: bool, budget: int) -> None:
    """One contrastive side on tensor cores: strips of anchors sized by their fp32 output (anchors x cands
    within `budget`), 16-bit operands read as they are; with the gradient, one GEMM of the coefficient strip
    by the 16-bit candidates, and a recompute of the similarities per output block when the whole coefficient
    matrix does not fit the workspace (the gradient of a candidate needs every anchor strip)."""
    strip = max(1, min(anchors, budget // (cands * ACC_BYTES)))
    strips = _blocks(anchors, strip)
    recompute = len(strips) > 1
    for rows in strips:
        w.gemm(rows, cands, K, b)
        w.kernel(rows * cands * ACC_BYTES, rows * cands * ACC_BYTES)       # epilogue
        if want_grad:
            if recompute:
                w.gemm(rows, cands, K, b)
            w.gemm(rows, K, cands, b, accumulate=False)


def fused_op(loss: str, N: int, C: int, dtype: str = "bfloat16", anchor: str = "student",
             budget: int = WORKSPACE) -> Tuple[Work, Work]:
    """(forward, backward) calls of the fused op: GEMMs, their FLOPs and the kernel launches come from
    the extension's strip plan (`ckd_ext._C.strip_plan`, csrc/orchestration/plan.h), the plan the op follows and
    tests/test_strip_plans.py checks against what calls issue. The forward computes the gradient, in fp32, where it
    fits FORWARD_GRADIENT_BYTES, and backward scales and rounds it; else the forward computes the loss alone and the
    backward op recomputes (ckd_ext/losses.py, `_grad_needed`). Bytes stay this module's model
    (`_contrastive_bytes`). 16-bit GEMMs run on tensor cores, BicKD's on its operand blocks built in the 16-bit dtype
    (docs/cuda.md, "GEMM policy")."""
    b = dtype_bytes(dtype)
    if loss == "kd":
        return _kd(N, C, b, False), _kd(N, C, b, True)
    import ckd_ext
    ext = ckd_ext.require_extension()
    name = "bickd" if loss == "bickd" else f"ckd_{anchor}"
    in_forward = ACC_BYTES * N * C <= FORWARD_GRADIENT_BYTES

    def call(want_grad: bool, backward: bool) -> Work:
        bytes_model = Work()
        bytes_model.kernel(2 * N * C * b, 4 * (N + C) * ACC_BYTES, 2)
        _contrastive_bytes(bytes_model, N, N, C, b, want_grad, budget)
        if loss == "bickd":  # its operand blocks are built in the 16-bit dtype too (and written once more)
            _contrastive_bytes(bytes_model, C, C, N, b, want_grad, budget)
        if want_grad:  # the normalisation backward: inputs and d read, the gradient written
            bytes_model.kernel(N * C * (2 * b + ACC_BYTES), N * C * (b if backward else ACC_BYTES))
        plan = ext.strip_plan(name, N, C, dtype, "cuda", budget, want_grad=want_grad, backward=backward)
        return Work(flops=plan["gemm_flops"], bytes=bytes_model.bytes, gemms=plan["gemms"],
                    launches=plan["launches"] + plan["gemms"])

    if in_forward:
        scale = Work()
        scale.kernel(N * C * ACC_BYTES, N * C * b)  # backward: the kept gradient times the upstream, rounded once
        return call(True, False), scale
    return call(False, False), call(True, True)


# -------------------------------------------------------------------------------------------------- eager
def similarity_elements(loss: str, N: int, C: int) -> int:
    """Elements of the similarity matrices eager PyTorch materialises (N x N, and C x C for BicKD)."""
    return {"ckd": N * N, "bickd": N * N + C * C, "kd": 0}[loss]


def eager(loss: str, N: int, C: int, dtype: str = "bfloat16", anchor: str = "student") -> Work:
    """Eager PyTorch (the few lines of the reference under autocast): forward + backward GEMMs in the 16-bit
    dtype on tensor cores, autograd's gradient GEMMs (both operands of v @ v^T for CKD's student anchors, one
    for the rest); bytes a lower bound: the inputs, the gradient, every similarity matrix written and read
    once in fp32 each way."""
    b = dtype_bytes(dtype)
    w = Work()
    if loss in ("ckd", "bickd"):
        w.gemm(N, N, C, b)
        w.gemm(N, C, N, b, count=2 if (loss == "ckd" and anchor == "student") else 1)
    if loss == "bickd":
        w.gemm(C, C, N, b)
        w.gemm(N, C, C, b)
    # the inputs' fp32 copies (the reference upcasts) and their normalised / softmaxed versions, written and read
    # once each way
    w.bytes += 3 * N * C * b + 8 * N * C * ACC_BYTES + 4 * similarity_elements(loss, N, C) * ACC_BYTES
    return w


# --------------------------------------------------------------------------------------------- the table
GPU_SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 32000), (16384, 32000), (16384, 128256))
VARIANTS: Tuple[Tuple[str, str, str], ...] = (("ckd", "student", "CKD, student anchor"),
                                              ("ckd", "teacher", "CKD, teacher anchor"),
                                              ("bickd", "student", "BicKD"), ("kd", "student", "KD"))


def fmt_count(x: float) -> str:
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g}"


def fmt_seconds(s: float) -> str:
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def estimate_rows(shapes: Iterable[Tuple[int, int]] = GPU_SHAPES, dtype: str = "bfloat16",
                  peak: DevicePeak = H100) -> List[Dict[str, str]]:
    """One row per (loss, shape, implementation) of the docs/cuda.md estimate table."""
    rows = []
    for N, C in shapes:
        for loss, anchor, title in VARIANTS:
            minimum = loss_work(loss, N, C, dtype)
            fused = sum(fused_op(loss, N, C, dtype, anchor), Work())
            impls = [("minimum (floor)", minimum, peak.tensor_tflops),
                     ("fused (strip plan, 4 GiB)", fused, peak.tensor_tflops),
                     ("eager bf16", eager(loss, N, C, dtype, anchor), peak.tensor_tflops)]
            for name, w, rate in impls:
                sim = similarity_elements(loss, N, C)
                rows.append(dict(
                    loss=title, shape=f"{N} x {C}", impl=name, flops=fmt_count(w.flops), bytes=fmt_count(w.bytes) + "B",
                    gemms=fmt_count(w.gemms), launches={"eager bf16": "tens", "minimum (floor)": ""}.get(name, fmt_count(w.launches)),
                    t_tensor=fmt_seconds(w.flops / (peak.tensor_tflops * 1e12)),
                    t_fp32=fmt_seconds(w.flops / (peak.fp32_tflops * 1e12)),
                    t_hbm=fmt_seconds(w.bytes / (peak.hbm_tbs * 1e12)),
                    t_launch=fmt_seconds(w.launches * LAUNCH_SECONDS) if w.launches and name != "eager bf16" else "",
                    estimate=fmt_seconds(w.seconds(rate, peak.hbm_tbs)),
                    memory=(f"{sim * 2 / GIB:.3g} GiB bf16 / {sim * 4 / GIB:.3g} GiB fp32"
                            if name == "eager bf16" and sim else "")))
    return rows


def markdown_table(rows: List[Dict[str, str]]) -> str:
    cols = [("loss", "loss"), ("shape", "N x C"), ("impl", "implementation"), ("flops", "GEMM FLOPs"),
            ("bytes", "DRAM bytes"), ("gemms", "GEMMs"), ("launches", "launches (kernels + GEMMs)"),
            ("t_tensor", "FLOPs at 989 TFLOPS"), ("t_fp32", "FLOPs at 67 TFLOPS"), ("t_hbm", "bytes at 3.35 TB/s"),
            ("t_launch", "launches x 10 us"), ("estimate", "estimate"), ("memory", "N x N (+ C x C) matrices")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(r[k] for k, _ in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Print the FLOP / byte / launch estimate table of docs/cuda.md.")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    a = ap.parse_args(argv)
    print(markdown_table(estimate_rows(dtype=a.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
