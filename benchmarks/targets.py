"""The targets of docs/benchmarks.md, checked against one run's rows: each met, missed or not measured."""
from __future__ import annotations

from typing import Dict, List, Optional

from .cases import LM_GROUPS, MEMORY_TARGET_GROUPS, TOKEN_GROUPS, base_loss, is_gemm_bound
from .costs import dtype_bytes, loss_work
from .report import fmt_mib, fmt_time
from .results import Table, group_of, parse_shape, ratio

# The floor targets: GEMM-bound CKD / BicKD within 1.15x of the floor at N, C >= 1024, 1.5x at 512 x 1000 (where the
# O(N C) element-wise work is a larger share), 1.25x at the other GEMM-bound shapes; BicKD at 1024 x 32000 1.3x at the
# default workspace; KD within 2x of its memory floor.
FLOOR_LIMITS = {("bickd", 1024, 32000): 1.3, (512, 1000): 1.5}


def floor_limit(loss: str, N: int, C: int) -> Optional[float]:
    if base_loss(loss) == "kd":
        return 2.0
    if not is_gemm_bound(loss, N, C):
        return None
    limit = FLOOR_LIMITS.get((base_loss(loss), N, C), FLOOR_LIMITS.get((N, C)))
    if limit is not None:
        return limit
    return 1.15 if N >= 1024 and C >= 1024 else 1.25


def compute_targets(t: Table, info: Dict) -> List[Dict]:
    """The targets of docs/benchmarks.md, from one run's rows. status: met / missed / not measured."""
    out: List[Dict] = []

    def add(case, target, value, threshold, ok, detail=""):
        loss, name, shape, dtype = case
        status = "not measured" if ok is None else ("met" if ok else "missed")
        out.append(dict(target=target, loss=loss, shape_name=name, shape=shape, dtype=dtype,
                        value=value, threshold=threshold, status=status, detail=detail))

    def versus(case, target, other, metric, threshold, passes, share=False, value="{r:.2f}x", detail="",
               ran_out_detail=""):
        """A target comparing ckd_ext's `full` `metric` with `other`'s: passes(r) with r = other / ckd_ext
        (a speedup), or with `share` r = ckd_ext / other. Met outright where ckd_ext has a value and `other`
        ran out of memory or time. `value`, `detail` and `ran_out_detail` are templates of r, {mine} and
        {theirs} (the two values, formatted)."""
        loss, _, shape, dtype = case
        mine = t.val(loss, "ckd_ext", "full", metric, shape, dtype)
        theirs = t.val(loss, other, "full", metric, shape, dtype)
        note = t.note(loss, other, "full", metric, shape, dtype)
        show = {"time": fmt_time, "peak_mem": fmt_mib}[metric]
        if mine is not None and theirs is None and note in ("OOM", "timeout"):
            add(case, target, f"{other} {note}", threshold, True, ran_out_detail.format(mine=show(mine)))
            return
        r = ratio(mine, theirs) if share else ratio(theirs, mine)
        if r is None:
            add(case, target, None, threshold, None)
        else:
            add(case, target, value.format(r=r), threshold, passes(r),
                detail.format(mine=show(mine), theirs=show(theirs)))

    for case in t.cases():
        loss, name, shape, dtype = case
        N, Cc = parse_shape(shape)
        grp = group_of(name)
        if grp in LM_GROUPS:
            lm_targets(t, case, grp, add)
            continue
        fused = t.val(loss, "ckd_ext", "full", "time", shape, dtype)
        # 1. near the floor: GEMM-bound shapes by size (floor_limit), KD within 2x of its memory floor
        limit = floor_limit(loss, N, Cc)
        if limit is not None:
            r = ratio(fused, t.val(loss, "floor", "full", "time", shape, dtype))
            what = "memory floor" if base_loss(loss) == "kd" else "floor (GEMM-bound)"
            add(case, f"full fwd+bwd <= {limit:g}x {what}", None if r is None else f"{r:.2f}x floor",
                f"<= {limit:g}x", None if r is None else r <= limit)
        # 2. faster than eager everywhere, >= 1.5x at token shapes
        need = 1.5 if grp in TOKEN_GROUPS else 1.0
        versus(case, f"faster than eager (>= {need}x)", "eager", "time", f">= {need}x", lambda r: r >= need,
               ran_out_detail="eager did not finish")
        # 3. faster than compiled everywhere (run time; compile time reported apart)
        versus(case, "faster than compiled", "compiled", "time", "> 1x", lambda r: r > 1.0)
        # 4. peak extra memory <= 1/4 of eager's at token and scale shapes
        if grp in MEMORY_TARGET_GROUPS:
            versus(case, "peak extra memory <= 1/4 eager", "eager", "peak_mem", "<= 0.25", lambda r: r <= 0.25,
                   share=True, value="{r:.3f} of eager", detail="{mine} vs {theirs}",
                   ran_out_detail="ckd_ext {mine}")
        # 5. saved for backward = inputs + O(N + C): at most one gradient-sized buffer (allowed by the memory
        #    contract when the gradient is computed in the forward) plus 16 fp32 statistics per row and column
        ex = t.val(loss, "ckd_ext", "forward", "saved_extra", shape, dtype)
        bound = N * Cc * dtype_bytes(dtype) + 64 * (N + Cc)
        add(case, "saved = inputs + O(N + C)", None if ex is None else f"{int(ex)} B extra",
            f"<= {bound} B (grad + 64(N+C))", None if ex is None else ex <= bound)
        # 5b. KD's peak beyond the inputs: one gradient and O(N) (backward scales the kept gradient in place)
        if loss == "kd":
            peak = t.val(loss, "ckd_ext", "full", "peak_mem", shape, dtype)
            bound_mib = (N * Cc * dtype_bytes(dtype) + 64 * (N + Cc)) / 2 ** 20
            add(case, "KD peak extra memory <= one gradient + O(N)", None if peak is None else fmt_mib(peak),
                f"<= {fmt_mib(bound_mib)}", None if peak is None else peak <= bound_mib)
        # 6. GPU: KD at >= 70% of DRAM bandwidth at the large bf16 token shapes
        if info.get("device") == "cuda" and loss == "kd" and grp == "gpu-tokens":
            peak_bw = info.get("gpu_peak_bw_gbs")
            bw = None
            if fused is not None:
                bw = loss_work(loss, N, Cc, dtype).bytes / (fused / 1e3) / 1e9  # read S, read T, write grad
            r = ratio(bw, peak_bw)
            add(case, "KD >= 70% DRAM bandwidth (GPU)",
                None if bw is None else f"{bw:.0f} GB/s" + ("" if r is None else f" = {r:.0%}"),
                f">= 70% of {peak_bw} GB/s", None if r is None else r >= 0.7)
    return out


# The lm group's targets, at the CPU shape and the GPU shape: fused_linear against materialising the logits
# and running ckd_ext's op, forward + backward. (time: the most fused/materialised may take; peak: its largest share)
LM_TARGETS = {"ckd": (1 / 10, 1 / 10), "kd": (1.3, 1 / 4)}
LM_TARGET_SHAPES = ("lm-4k-v32k-h512-1024", "gpu-lm-16k-v128k-h2048-4096")


def lm_targets(t: Table, case, grp: str, add) -> None:
    loss, name, shape, dtype = case
    if name not in LM_TARGET_SHAPES:
        return
    liger = t.val(loss, "liger", "full", "time", shape, dtype)
    if liger is not None:  # fused-linear KD faster than Liger-Kernel's chunked fused-linear JSD (beta = 0)
        mine = t.val(loss, "fused_linear", "full", "time", shape, dtype)
        r = ratio(mine, liger)
        add(case, "fused_linear time vs Liger-Kernel's chunked JSD", None if r is None else f"{1 / r:.2f}x faster",
            "> 1x faster", None if r is None else r < 1, "" if r is None else f"{fmt_time(mine)} vs {fmt_time(liger)}")
    max_time, max_mem = LM_TARGETS[loss]
    for metric, limit, label in (("time", max_time, "time"), ("peak_mem", max_mem, "peak extra memory")):
        mine = t.val(loss, "fused_linear", "full", metric, shape, dtype)
        theirs = t.val(loss, "ckd_ext", "full", metric, shape, dtype)
        r = ratio(mine, theirs)
        show = {"time": fmt_time, "peak_mem": fmt_mib}[metric]
        threshold = (f">= {1 / limit:.0f}x faster" if metric == "time" and limit < 1 else f"<= {limit:g}x")
        target = f"fused_linear {label} vs materialise + ckd_ext"
        if r is None:
            add(case, target, None, threshold, None)
        else:
            value = f"{1 / r:.1f}x faster" if metric == "time" and limit < 1 else f"{r:.3g}x"
            add(case, target, value, threshold, r <= limit, f"{show(mine)} vs {show(theirs)}")
