"""Shared test inputs and comparisons for the fused ops on every backend (CPU, emulated CUDA, CUDA)."""
import torch

# Every loss configuration the suite runs: (loss name, keyword arguments). Non-default hyperparameters
# so that a forgotten scale (tau, temperature, weights) cannot cancel out.
CONFIGS = {
    "kd": ("kd", {"temperature": 2.0}),
    "ckd_student": ("ckd", {"tau": 0.5, "anchor": "student"}),
    "ckd_teacher": ("ckd", {"tau": 0.5, "anchor": "teacher"}),
    "ckd_default": ("ckd", {}),
    "bickd": ("bickd", {"temperature": 2.0, "tau": 0.2, "w_sample": 1.0, "w_class": 0.5}),
    "bickd_symmetric": ("bickd", {"temperature": 3.0, "tau": 0.3, "w_sample": 0.7, "w_class": 1.3,
                                  "symmetric": True}),
    "bickd_class_only": ("bickd", {"w_sample": 0.0, "w_class": 2.0}),
    "bickd_sample_only": ("bickd", {"w_sample": 1.5, "w_class": 0.0, "tau": 0.5, "temperature": 1.0}),
}

# Tolerances of a fused result against the float64 oracle run on the same (already rounded) inputs,
# relative to the largest magnitude of the expected tensor:
# - float32: every statistic accumulates in float32 over at most a few thousand terms (C <= 4099 or
#   N <= 257), so errors stay near sqrt(terms) * 6e-8 < 1e-5.
# - float16 / bfloat16: computed in float32, then the loss and each gradient element are rounded once
#   to the 16-bit type (unit roundoff 4.9e-4 / 3.9e-3); twice that covers the float32 error on top.
# - float64: accumulates in float64; only summation order differs.
# float16 gradients below its smallest normal (6.1e-5) are subnormal, spaced 2^-24 apart: that spacing
# is added as an absolute tolerance (for the other dtypes, their smallest normal).
# Logits of scale 100 put softmax arguments near 300 / T (3 sigma), where float32 rounding of x / T and of
# the log-sum-exp is ~2e-5 absolute; exp() turns that into a relative error of the same size, and BicKD's
# gradient (a difference of such terms through the softmax backward) can lose another factor of ~10 to
# cancellation. float32 results at that scale get 20x the tolerance (2e-4); at scale 10 the 1e-5 holds.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


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
    that ignored its per-anchor weights would be caught. BicKD "none" returns (sample, class) terms."""
    outs = out if isinstance(out, tuple) else (out,)
    generator = torch.Generator().manual_seed(seed + 11)
    total = 0
    for o in outs:
        w = torch.rand(o.shape, generator=generator, dtype=torch.float64) + 0.5
        total = total + (o * w.to(o.dtype)).sum()
    return total


def loss_and_grad(module, config, student, teacher, **extra):
    """(loss output detached, d weighted_total / d student) for `module` in {ckd_ext, ckd_ext.reference}."""
    name, kwargs = CONFIGS[config]
    fn = getattr(module, f"{name}_loss")
    out = fn(student, teacher, **kwargs, **extra)
    (grad,) = torch.autograd.grad(weighted_total(out), student)
    detached = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    return detached, grad


def tolerance(dtype, scale=1.0):
    return TOLERANCE[dtype] * (20 if scale > 10 and dtype == torch.float32 else 1)


def assert_matches(actual, expected, dtype, what, tol=None):
    """actual (any dtype) against the float64 expected, within tol (default TOLERANCE[dtype]) of
    expected's scale."""
    tol = TOLERANCE[dtype] if tol is None else tol
    if isinstance(expected, tuple):
        return max(assert_matches(a, e, dtype, f"{what} ({part})", tol)
                   for a, e, part in zip(actual, expected, ("sample terms", "class terms")))
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    # Below the smallest normal of the output dtype a value cannot be compared relatively (BicKD gradients at
    # logit scale 100 reach 1e-67 in float64, which float32 returns as 0).
    atol = max(2.0 ** -24 if dtype == torch.float16 else 0.0, torch.finfo(dtype).tiny)
    assert err <= tol * scale + atol, f"{what}: max error {err:.3e} > {tol:g} x scale {scale:.3e}"
    return err / scale if scale else 0.0


def check_against_oracle(config, student, teacher, dtype=None, scale=1.0, module=None, **extra):
    """Runs `module`'s op (default: the fused ckd_ext) on (student, teacher) and the oracle on their float64
    copies; compares both the loss and the gradient. Returns the relative errors."""
    import ckd_ext
    from ckd_ext import reference as ref

    module = module or ckd_ext
    dtype = dtype or student.dtype
    tol = tolerance(dtype, scale)
    s = student.detach().to(dtype).requires_grad_()
    t = teacher.detach().to(dtype)
    loss, grad = loss_and_grad(module, config, s, t, **extra)
    s64 = s.detach().double().requires_grad_()
    loss64, grad64 = loss_and_grad(ref, config, s64, t.double(), **extra)
    mask = extra.get("mask")
    one_valid_row = student.shape[0] == 1 or (mask is not None and int(mask.sum()) == 1)
    if CONFIGS[config][0] != "kd" and (student.shape[-1] == 1 or one_valid_row):
        # The exact gradient is 0: with one class, normalised rows are +-1 (CKD) and softmaxes are 1
        # (BicKD); with one valid row, CKD and BicKD's sample side have no negative and BicKD's class
        # columns are all the same unit vector. The float64 oracle returns rounding residue near 1e-17, the
        # float32 op rounding of O(1 / tau) terms that cancel: both must be ~0.
        assert grad64.abs().max().item() <= 1e-12
        assert grad.abs().max().item() <= 1e-6
        grad64, grad = torch.zeros_like(grad64), torch.zeros_like(grad)
    return (assert_matches(loss, loss64, dtype, f"{config} loss", tol),
            assert_matches(grad, grad64, dtype, f"{config} grad", tol))
