"""The providers: what each one runs for a loss (`loss_fn`, :class:`Floor`) and in each mode
(`mode_callables`), and whether it can run here (`provider_status`)."""
from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from .cases import LOSSES, base_loss, loss_call

REPO_ROOT = Path(__file__).resolve().parents[1]


def import_ckd_ext(module: str = "ckd_ext"):
    """Import ckd_ext (or one of its modules); if it is not installed, fall back to the source tree (appended,
    so that an installed copy always wins)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != "ckd_ext":
            raise
        if str(REPO_ROOT) not in sys.path:
            sys.path.append(str(REPO_ROOT))
        return importlib.import_module(module)


def extension():
    """`ckd_ext._extension`: `unavailable_reason()` (why the fused ops cannot run, "" when they can) and
    `synchronize(device)` (waits for the queued work, a no-op off CUDA)."""
    return import_ckd_ext("ckd_ext._extension")


def package_version() -> str:
    try:
        return str(getattr(import_ckd_ext(), "__version__", "unknown"))
    except Exception:  # noqa: BLE001
        return "unavailable"


def provider_status(provider: str, loss: Optional[str] = None) -> Tuple[bool, str]:
    """(available, note). Every provider needs `import ckd_ext` to work (the measurement synchronises through
    `ckd_ext._extension`); ckd_ext also needs its compiled extension (``ckd_ext.is_available()``),
    eager/compiled need `ckd_ext.reference`, floor nothing more."""
    try:
        ckd_ext = import_ckd_ext()
    except Exception as e:  # noqa: BLE001
        return False, f"ckd_ext not importable ({type(e).__name__}: {e})"
    if provider == "floor":
        return True, ""
    if provider == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return False, f"liger-kernel not importable ({type(e).__name__}: {e}; pip install liger-kernel)"
        return True, ""
    if provider == "fused_linear":
        if not ckd_ext.is_available():
            return False, extension().unavailable_reason()
        names = [f"fused_linear_{loss_call(loss)[0]}_loss"] if loss else ["fused_linear_ckd_loss",
                                                                           "fused_linear_kd_loss"]
        missing = [n for n in names if not callable(getattr(ckd_ext, n, None))]
        return (False, f"ckd_ext has no {', '.join(missing)}") if missing else (True, "")
    if provider == "ckd_ext":
        if not ckd_ext.is_available():
            return False, extension().unavailable_reason()
        names = [f"{loss_call(loss)[0]}_loss"] if loss else [f"{x}_loss" for x in LOSSES]
        missing = [n for n in names if not callable(getattr(ckd_ext, n, None))]
        if missing:
            return False, f"ckd_ext has no {', '.join(missing)}"
        return True, ""
    if provider in ("eager", "compiled"):
        try:
            from ckd_ext import reference
        except Exception as e:  # noqa: BLE001
            return False, f"ckd_ext.reference not importable ({type(e).__name__}: {e})"
        if loss and not callable(getattr(reference, f"{loss_call(loss)[0]}_loss", None)):
            return False, f"ckd_ext.reference has no {loss_call(loss)[0]}_loss"
        return True, ""
    return False, f"unknown provider {provider!r}"


def autocast_dtype(device: str, dtype: str) -> Optional[str]:
    """The autocast dtype eager and compiled run under: the input's 16-bit dtype on CUDA, else none. The reference
    upcasts 16-bit inputs to float32, so without autocast its GEMMs would run in float32 (SIMT on a GPU); under
    autocast they take 16-bit operands on tensor cores, which is what eager PyTorch on bf16 logits gets, and what
    the floor's input-dtype GEMMs measure."""
    return dtype if device == "cuda" and dtype in ("bfloat16", "float16") else None


def loss_fn(provider: str, loss: str, compile_backend: str = "inductor", autocast: Optional[str] = None) -> Callable:
    """The callable `f(student, teacher) -> scalar loss` of an autograd provider (not floor); eager and compiled
    run under CUDA autocast to `autocast` when given (see `autocast_dtype`)."""
    ckd_ext = import_ckd_ext()
    stem, kwargs = loss_call(loss)
    if provider == "ckd_ext":
        return functools.partial(getattr(ckd_ext, f"{stem}_loss"), **kwargs)
    from ckd_ext import reference
    fn = functools.partial(getattr(reference, f"{stem}_loss"), **kwargs)
    if autocast:
        import torch
        plain, dt = fn, getattr(torch, autocast)

        def fn(student, teacher):
            with torch.autocast("cuda", dtype=dt):
                return plain(student, teacher)

    if provider == "eager":
        return fn
    if provider == "compiled":
        import torch
        return torch.compile(fn, dynamic=False, backend=compile_backend)
    raise ValueError(provider)


# KD's temperature in the lm group, for every provider: 1, fused_linear_kd_loss's default (LLM distillation's usual).
LM_KD_TEMPERATURE = 1.0
# The divergences Liger-Kernel's LigerFusedLinearJSDLoss computes, and its beta for each (jsd at our default beta; the
# benchmark's kd_jsd uses it). cases.PROVIDER_LOSSES lists the same losses for the liger provider.
LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}


def lm_loss_fn(provider: str, loss: str, student_weight, teacher_weight, compile_backend: str = "inductor"):
    """The callable `f(student_hidden, teacher_hidden) -> scalar loss` of an lm-group provider, the heads bound to it:
    fused_linear takes hidden states and heads; the others materialise the logits (`F.linear`, in the input dtype, as
    a model's head would) and run ckd_ext's op, the eager reference or its torch.compile. The heads are listed in
    `f.inputs` (the student's first, `f.params`: its gradient is cleared between calls like the hidden states')."""
    import torch
    import torch.nn.functional as F
    ckd_ext = import_ckd_ext()
    stem, kwargs = loss_call(loss)
    if stem == "kd":
        kwargs = dict(kwargs, temperature=LM_KD_TEMPERATURE)
    if provider == "fused_linear":
        fused = getattr(ckd_ext, f"fused_linear_{stem}_loss")

        def fn(student_hidden, teacher_hidden):
            return fused(student_hidden, student_weight, teacher_hidden, teacher_weight, **kwargs)
    elif provider == "liger":
        fn = liger_kd_fn(student_weight, teacher_weight, kwargs.get("divergence", "forward_kl"))
    else:
        from ckd_ext import reference
        logit_loss = getattr(ckd_ext if provider == "ckd_ext" else reference, f"{stem}_loss")

        def materialised(student_hidden, teacher_hidden):
            return logit_loss(F.linear(student_hidden, student_weight), F.linear(teacher_hidden, teacher_weight),
                              **kwargs)

        fn = torch.compile(materialised, dynamic=False, backend=compile_backend) if provider == "compiled" \
            else materialised
    call = (lambda s, t: fn(s, t))
    call.inputs = (student_weight, teacher_weight)
    call.params = (student_weight,)
    return call


def liger_kd_fn(student_weight, teacher_weight, divergence: str = "forward_kl"):
    """Liger-Kernel's chunked fused-linear JSD computing fused_linear_kd_loss's loss with `divergence` at temperature 1
    averaged over the tokens (docs/math.md 3.1, "Conventions elsewhere"): its beta weights the teacher in the mixture
    as ours does, and it special-cases beta = 0 as KL(teacher || student) and beta = 1 as KL(student || teacher)
    (LIGER_BETA). It does not scale by T^2, which at T = 1 is 1. Its chunks (1024 tokens, its default) are plain
    PyTorch; compiled=False, as torch.compile of its chunk step would time the compiler on a CPU
    (`pip install liger-kernel`)."""
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=LIGER_BETA[divergence],
                                   temperature=LM_KD_TEMPERATURE, compiled=False)

    def fn(student_hidden, teacher_hidden):
        labels = torch.zeros(student_hidden.shape[0], dtype=torch.long, device=student_hidden.device)
        return loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    return fn


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
        self.loss, self.s, self.t = base_loss(loss), student.detach(), teacher.detach()
        N, C = self.s.shape
        self.N, self.C = N, C
        budget = max(N * C, 1 << 22)
        self.bm = max(1, min(N, budget // max(N, 1)))   # rows per N x N block
        self.bc = max(1, min(C, budget // max(N, C)))   # rows per C x C block (out bc x C and bc x N)
        dev, dt = self.s.device, self.s.dtype
        self.sim_buf = torch.empty(self.bm, N, device=dev, dtype=dt) if self.loss != "kd" else None
        self.w_blk = torch.randn(self.bm, N, device=dev, dtype=dt) if self.loss != "kd" else None
        if self.loss == "bickd":
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
        for param in getattr(fn, "params", ()):  # an lm provider's student head
            param.grad = None
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
