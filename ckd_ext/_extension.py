"""Loads the compiled extension: ckd_ext._C (the ops, with the CPU and CUDA backends) and, in test builds
(CKD_EXT_EMULATED=1), ckd_ext._emulated (the CUDA kernels under the CPU emulator), which it installs into _C as
the backend ckd_ext.testing.emulated_cuda() switches to.

`import ckd_ext` must work without them (ckd_ext.reference is pure PyTorch), so a missing or stale build is
remembered here and reported, with the command that fixes it, when a fused op is called. This module is the one
answer to "is the extension built, and how do I build it".
"""
import importlib
import warnings

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps -e .  (from the ckd_ext source folder)"
EMULATED_REBUILD = f"CKD_EXT_EMULATED=1 {REBUILD}"


def _build_info():
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


def _load():
    """(_C or None, why not, emulated backend installed)."""
    info = _build_info()
    if info is None:
        return None, ("ckd_ext's compiled extension (ckd_ext._C) is not built, so the fused ops are unavailable "
                      f"(ckd_ext.reference works without it). Build it with: {REBUILD}"), False
    if info.TORCH_VERSION != torch.__version__:
        # Loading it now would fail with an undefined-symbol error, or load against a different ABI.
        error = (f"ckd_ext was built against torch {info.TORCH_VERSION}, but torch {torch.__version__} is "
                 f"installed. Rebuild the extension against the installed torch: {REBUILD}")
        warnings.warn(error, RuntimeWarning, stacklevel=3)
        return None, error, False
    try:
        module = importlib.import_module("ckd_ext._C")
    except ImportError as exc:
        return None, f"ckd_ext._C failed to load ({exc}). Rebuild it with: {REBUILD}", False
    if not info.WITH_EMULATED:
        return module, "", False
    module.install_emulated_backend(importlib.import_module("ckd_ext._emulated").backend_table())
    return module, "", True


_module, _error, _emulated = _load()


def require_extension():
    """Returns the loaded _C module, or raises RuntimeError saying how to build it."""
    if _module is None:
        raise RuntimeError(_error)
    return _module


def is_available() -> bool:
    return _module is not None


def unavailable_reason() -> str:
    """Why the fused ops cannot run, with the command that builds them; "" when they can."""
    return _error


def emulated_available() -> bool:
    """Whether the emulated CUDA backend is built (test builds: CKD_EXT_EMULATED=1)."""
    return _emulated


def synchronize(device) -> None:
    """Waits for the work queued on `device` (a torch.device or its name); a no-op off CUDA. The one place
    timing code (training, benchmarks) synchronises."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
