"""Test-only switches of the compiled extension, and the loss configurations and CUDA checks that tests/ and
tools/gpu_check.py share.

    with ckd_ext.testing.emulated_cuda():
        ckd_ext.ckd_loss(student_cpu, teacher_cpu)   # runs the CUDA kernels, under the CPU emulator

    ckd_ext.testing.check_no_sync(case) / check_graph_replay(case)   # CUDA checks of tests/test_cuda.py

The emulated CUDA backend is the CUDA kernels compiled for the host against the CPU emulator (csrc/cuda_emulator): every
CUDA thread an OS thread, about a thousand times slower than the CPU kernels, so use small shapes. Built only
with CKD_EXT_EMULATED=1. The switch is process-wide (autograd may run backward on another thread) and not meant
for concurrent use.
"""
import contextlib

from ._extension import emulated_available, emulated_unavailable_reason, require_extension

__all__ = ["CONFIGS", "GRAPH_TOLERANCE", "OpCase", "check_graph_replay", "check_no_sync", "emulated_available",
           "emulated_cuda", "emulated_launch_count", "op_cases", "run_case"]


@contextlib.contextmanager
def emulated_cuda():
    """Inside the block, the fused ops run CPU tensors through the emulated CUDA backend."""
    module = require_extension()
    if not emulated_available():
        raise RuntimeError(emulated_unavailable_reason())
    previous = module.emulated_cuda()
    module.set_emulated_cuda(True)
    try:
        yield
    finally:
        module.set_emulated_cuda(previous)


def emulated_launch_count() -> int:
    """Kernels the CUDA emulator has launched in this process (the strip-plan tests compare it with the plans)."""
    if not emulated_available():
        raise RuntimeError(emulated_unavailable_reason())
    from . import _emulated
    return _emulated.launch_count()


# ------------------------------------------------------------------------------------------------------------------
# Loss configurations and the CUDA checks that need no oracle: no host synchronisation, and CUDA-graph capture. They
# are here, not in tests/, because two runners use them: tests/test_cuda.py (pytest) and tools/gpu_check.py (the
# sanitizer runs and the check's plan), and the GPU machine runs both from a bare checkout.

# name -> (loss, keyword arguments): the configurations that between them reach every op and branch (the anchors,
# BicKD's sides and symmetry, the defaults). Non-default hyperparameters, so that a forgotten scale (tau, temperature,
# weights) cannot cancel out.
CONFIGS = {
    "kd": ("kd", {"temperature": 2.0}),
    # the other divergences of the KD kernel (docs/math.md 3.1), each with a non-default parameter
    "kd_reverse_kl": ("kd", {"temperature": 2.0, "divergence": "reverse_kl"}),
    "kd_jsd": ("kd", {"temperature": 2.0, "divergence": "jsd", "beta": 0.3}),
    "kd_skew_kl": ("kd", {"temperature": 2.0, "divergence": "skew_kl", "alpha": 0.2}),
    "kd_tvd": ("kd", {"temperature": 2.0, "divergence": "tvd", "scale_t2": False}),
    "ckd_student": ("ckd", {"tau": 0.5, "anchor": "student"}),
    "ckd_teacher": ("ckd", {"tau": 0.5, "anchor": "teacher"}),
    "ckd_default": ("ckd", {}),
    "bickd": ("bickd", {"temperature": 2.0, "tau": 0.2, "w_sample": 1.0, "w_class": 0.5}),
    "bickd_symmetric": ("bickd", {"temperature": 3.0, "tau": 0.3, "w_sample": 0.7, "w_class": 1.3,
                                  "symmetric": True}),
    "bickd_class_only": ("bickd", {"w_sample": 0.0, "w_class": 2.0}),
    "bickd_sample_only": ("bickd", {"w_sample": 1.5, "w_class": 0.0, "tau": 0.5, "temperature": 1.0}),
}


class OpCase:
    """One public call (a configuration of CONFIGS, dtype, mask, reduction, shape) and a scalar total of its outputs
    to differentiate ("none" outputs weighted, so that every per-row gradient is reached)."""

    def __init__(self, config: str, dtype: str, masked: bool, reduction: str, n: int = 37, c: int = 100):
        self.config, self.dtype, self.masked, self.reduction, self.n, self.c = config, dtype, masked, reduction, n, c

    @property
    def name(self) -> str:
        return f"{self.config}/{self.dtype}/{'mask' if self.masked else 'nomask'}/{self.reduction}/{self.n}x{self.c}"

    def __repr__(self) -> str:
        return self.name

    def inputs(self, device: str, seed: int = 0):
        """Student (leaf), teacher, mask and the weights of "none" outputs, all made before the call."""
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
        name, kwargs = CONFIGS[self.config]
        out = getattr(ckd_ext, f"{name}_loss")(s, t, **kwargs, mask=mask, reduction=self.reduction)
        outs = out if isinstance(out, tuple) else (out,)
        if self.reduction != "none":
            return sum(o.float() for o in outs)
        return sum((o.float() * w).sum() for o, w in zip(outs, weights))


def op_cases(check: str, dtypes=("float32", "bfloat16")):
    """The cases of each check. "sync": every configuration, dtype (fp32 computes the gradient in the forward op,
    16-bit students recompute it in the backward op), mask and reduction, so that all six ops and each of their
    branches run. "graph": one masked "mean" case per loss and anchor in each dtype (the mask is what used to sync).
    "run" (the sanitizers): every configuration once per dtype, a packed and an unpacked width, masked "none"."""
    import itertools
    if check == "sync":
        return [OpCase(cfg, dt, m, r) for cfg, dt, m, r in
                itertools.product(CONFIGS, dtypes, (False, True), ("mean", "sum", "none"))]
    if check == "graph":
        return [OpCase(cfg, dt, True, "mean") for cfg in ("ckd_student", "ckd_teacher", "bickd", "kd") for dt in dtypes]
    if check == "run":
        return [OpCase(cfg, dt, m, r, n, c) for cfg in CONFIGS for dt in dtypes
                for (m, r, n, c) in ((False, "mean", 64, 128), (True, "none", 37, 30))]
    raise ValueError(f"op_cases: check must be 'sync', 'graph' or 'run', got {check!r}")


def run_case(case: OpCase, device: str, seed: int = 0):
    """(total, student gradient) of one forward + backward, detached."""
    s, t, mask, weights = case.inputs(device, seed)
    total = case.total(s, t, mask, weights)
    total.backward()
    return total.detach(), s.grad.detach()


def check_no_sync(case: OpCase, device: str = "cuda") -> str:
    """"" when forward and backward run under torch.cuda.set_sync_debug_mode("error") without a host synchronisation
    (any .item(), host copy or synchronising call inside the ops raises there), else what synchronised. A first call
    outside the mode warms up the workspace default, which reads the device's free memory once per process."""
    import torch
    run_case(case, device)
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


def check_graph_replay(case: OpCase, device: str = "cuda") -> str:
    """Capture forward + backward in a CUDA graph, replay it on new inputs copied into the captured ones, and
    compare loss and gradient with an eager run on those inputs: "" when they agree within GRAPH_TOLERANCE, else
    how they differ. On the CPU (no graphs) only the eager comparison runs, which checks the case itself."""
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
        else:
            got = run_case(case, device, seed=1)
    except RuntimeError as e:
        return f"capture/replay failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    want = run_case(case, device, seed=1)
    errs = [_rel_diff(g, w) for g, w in zip(got, want)]
    tol = GRAPH_TOLERANCE[case.dtype]
    if max(errs) > tol:
        return f"replay differs from eager: loss {errs[0]:.3g}, grad {errs[1]:.3g} (tolerance {tol:.3g})"
    return ""
