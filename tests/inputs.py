"""Inputs of the fused ops' tests, on every backend (CPU, emulated CUDA, CUDA): the loss configurations, seeded
random logits and masks, distinct upstream weights, and (loss, student gradient) of one call."""
import torch

# Every loss configuration the suite runs, name -> (loss name, keyword arguments); tools/gpu_check.py runs them too.
from ckd_ext.testing import CONFIGS  # noqa: F401


def logits(*shape, scale=3.0, dtype=torch.float64, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def pair(*shape, scale=3.0, dtype=torch.float64, seed=0):
    """A student (requires grad) and a teacher of the same shape."""
    return (logits(*shape, scale=scale, dtype=dtype, seed=seed, requires_grad=True),
            logits(*shape, scale=scale, dtype=dtype, seed=seed + 1000))


def random_mask(shape, seed=0, p=0.7):
    generator = torch.Generator().manual_seed(seed + 7)
    return torch.rand(shape, generator=generator) < p


def weighted_total(out, seed=0):
    """A scalar from any loss output with distinct upstream weights per term, so that a "none" backward
    that ignored its per-anchor weights would be caught. BicKD "none" returns (sample, class) terms. The weights are
    drawn on the CPU (the same on every backend) and applied on the outputs' device."""
    outs = out if isinstance(out, tuple) else (out,)
    generator = torch.Generator().manual_seed(seed + 11)
    total = 0
    for o in outs:
        w = torch.rand(o.shape, generator=generator, dtype=torch.float64) + 0.5
        total = total + (o * w.to(device=o.device, dtype=o.dtype)).sum()
    return total


def loss_and_grad(module, config, student, teacher, **extra):
    """(loss output detached, d weighted_total / d student) for `module` in {ckd_ext, ckd_ext.reference}."""
    name, kwargs = CONFIGS[config]
    fn = getattr(module, f"{name}_loss")
    out = fn(student, teacher, **kwargs, **extra)
    (grad,) = torch.autograd.grad(weighted_total(out), student)
    detached = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    return detached, grad


def bickd_large_logit_gradients(shape, seed, symmetric, reduction):
    """(fused float32, float64 oracle) student gradients of BicKD at logit scale 1000 and T = 0.5 (softmax arguments
    up to ~5e3), under weighted_total's distinct per-term upstream weights."""
    import ckd_ext
    from ckd_ext import reference as ref

    student, teacher = pair(*shape, scale=1000.0, seed=seed, dtype=torch.float32)
    kwargs = {"temperature": 0.5, "tau": 0.1, "symmetric": symmetric, "reduction": reduction}
    s = student.detach().requires_grad_()
    (grad,) = torch.autograd.grad(weighted_total(ckd_ext.bickd_loss(s, teacher, **kwargs)), s)
    s64 = student.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(weighted_total(ref.bickd_loss(s64, teacher.double(), **kwargs)), s64)
    return grad, grad64


def saved_by(fn, *args, **kwargs):
    """fn(*args, **kwargs) and every tensor autograd saved for its backward (saved_tensors_hooks): what the memory
    tests bound."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, saved


class GemmsIssued:
    """Within the block, the matrix products issued: `policy`, those of the GEMM policy (ckd_ext's gemm_calls(), the
    products inside its ops and fused kernels), and `aten`, ATen matrix products dispatched from Python around them
    (mm, addmm, bmm, ... as a TorchDispatchMode sees them: the policy ops' own GEMMs run below it). Code that keeps
    every product in the policy has aten == 0."""

    NAMES = {"mm", "addmm", "bmm", "baddbmm", "matmul", "dot", "mv", "addmv", "addbmm", "linear", "_scaled_mm"}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        import ckd_ext

        counter = self

        class _Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "aten" and func._opname.rstrip("_") in GemmsIssued.NAMES:
                    counter.aten += 1
                return func(*args, **(kwargs or {}))

        self.aten, self.policy = 0, 0
        self._ext = ckd_ext.require_extension()
        self._start = self._ext.gemm_calls()
        self._mode = _Count()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self.policy = self._ext.gemm_calls() - self._start
        return False
