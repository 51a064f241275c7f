"""The CUDA kernels of ckd_ext, compiled for the host and run on CPU tensors by the CUDA emulator
(csrc/device/), behind the same API as the top level: ckd_loss, kd_loss, bickd_loss. For tests of the
kernels on machines without a GPU; about a thousand times slower than ckd_ext's CPU kernels, so use small
shapes. Built only with CKD_EXT_EMULATED=1."""
from ._extension import emulated_module
from .ops import LossOps

_ops = LossOps("ckd_ext_emulated", emulated_module.require)
if emulated_module.module is not None:
    _ops.register()

ckd_loss = _ops.ckd_loss
kd_loss = _ops.kd_loss
bickd_loss = _ops.bickd_loss


def is_available() -> bool:
    return emulated_module.module is not None
