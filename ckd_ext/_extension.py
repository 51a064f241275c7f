"""Loads the compiled extension modules: ckd_ext._C (the ops, CPU and CUDA kernels) and, when built with
CKD_EXT_EMULATED=1, ckd_ext._emulated (the CUDA kernels run on CPU tensors by the emulator, for tests).

`import ckd_ext` must work without them (ckd_ext.reference is pure PyTorch), so a missing or stale build
is remembered here and reported, with the command that fixes it, when a fused op is called.
"""
import importlib
import warnings

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps -e .  (from the ckd_ext source folder)"


class CompiledModule:
    def __init__(self, name: str, what: str, build_hint: str = ""):
        self.name, self.what, self.build_hint = name, what, build_hint
        self.module, self.error = None, None

    def load(self, build_info):
        if build_info is None:
            self.error = (f"ckd_ext's compiled extension (ckd_ext.{self.name}) is not built, so {self.what} is "
                          f"unavailable (ckd_ext.reference works without it). Build it with: "
                          f"{self.build_hint}{REBUILD}")
            return
        if build_info.TORCH_VERSION != torch.__version__:
            # Loading it now would fail with an undefined-symbol error, or load against a different ABI.
            self.error = (f"ckd_ext was built against torch {build_info.TORCH_VERSION}, but torch "
                          f"{torch.__version__} is installed. Rebuild the extension against the installed "
                          f"torch: {self.build_hint}{REBUILD}")
            warnings.warn(self.error, RuntimeWarning, stacklevel=4)
            return
        try:
            self.module = importlib.import_module(f"ckd_ext.{self.name}")
        except ImportError as exc:
            self.error = (f"ckd_ext.{self.name} failed to load ({exc}). Rebuild it with: "
                          f"{self.build_hint}{REBUILD}")

    def require(self):
        if self.module is None:
            raise RuntimeError(self.error)
        return self.module


def _build_info():
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


ops_module = CompiledModule("_C", "the fused ops")
emulated_module = CompiledModule("_emulated", "ckd_ext.emulated (the CUDA kernels under the CPU emulator)",
                                 build_hint="CKD_EXT_EMULATED=1 ")

_info = _build_info()
ops_module.load(_info)
if _info is not None and not getattr(_info, "WITH_EMULATED", False):
    emulated_module.error = ("ckd_ext.emulated was not built (it is opt-in). Build it with: "
                             f"CKD_EXT_EMULATED=1 {REBUILD}")
else:
    emulated_module.load(_info)


def require_extension():
    """Returns the loaded _C module, or raises RuntimeError saying how to build it."""
    return ops_module.require()


def is_available() -> bool:
    return ops_module.module is not None


def unavailable_reason() -> str:
    """Why the fused ops cannot run, with the command that builds them; "" when they can."""
    return "" if is_available() else ops_module.error


def synchronize(device) -> None:
    """Waits for the work queued on `device` (a torch.device or its name); a no-op off CUDA. The one place
    timing code (training, benchmarks) synchronises."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
