"""Test-only switches of the compiled extension.

    with ckd_ext.testing.emulated_cuda():
        ckd_ext.ckd_loss(student_cpu, teacher_cpu)   # runs the CUDA kernels, under the CPU emulator

The emulated CUDA backend is the CUDA kernels compiled for the host against the CPU emulator (csrc/cuda_emulator): every
CUDA thread an OS thread, about a thousand times slower than the CPU kernels, so use small shapes. Built only
with CKD_EXT_EMULATED=1. The switch is process-wide (autograd may run backward on another thread) and not meant
for concurrent use.
"""
import contextlib

from ._extension import emulated_available, emulated_unavailable_reason, require_extension

__all__ = ["emulated_available", "emulated_cuda", "emulated_launch_count"]


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
