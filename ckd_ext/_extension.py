"""Loads the compiled extension: ckd_ext._C (the ops, with the CPU and CUDA backends) and, in test builds
(CKD_EXT_EMULATED=1), ckd_ext._emulated (the CUDA kernels under the CPU emulator), which it installs into _C as
the backend ckd_ext.testing.emulated_cuda() switches to.

`import ckd_ext` must work without them (ckd_ext.reference is pure PyTorch), so a missing or stale build is
remembered here, warned about once at import (ExtensionUnavailableWarning) and raised, with the command that fixes
it, when a fused op is called. This module is the one
answer to "is the extension built, and how do I build it".
"""
import importlib
import os
import sys
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


NOT_BUILT_EMULATED = "the emulated CUDA backend is not built (it is opt-in). Build it with: " + EMULATED_REBUILD


def _load():
    """(_C or None, why not, why the emulated backend is not installed): an empty reason means it is there."""
    info = _build_info()
    if info is None:
        return None, ("ckd_ext's compiled extension (ckd_ext._C) is not built, so the fused ops are unavailable "
                      f"(ckd_ext.reference works without it). Build it with: {REBUILD}"), NOT_BUILT_EMULATED
    if info.TORCH_VERSION != torch.__version__:
        # Loading it now would fail with an undefined-symbol error, or load against a different ABI.
        error = (f"ckd_ext was built against torch {info.TORCH_VERSION}, but torch {torch.__version__} is "
                 f"installed. Rebuild the extension against the installed torch: {REBUILD}")
        return None, error, NOT_BUILT_EMULATED
    try:
        module = importlib.import_module("ckd_ext._C")
    except ImportError as exc:
        return None, f"ckd_ext._C failed to load ({exc}). Rebuild it with: {REBUILD}", NOT_BUILT_EMULATED
    env_error = _apply_workspace_env(module) or _apply_cpu_isa_env(module)
    if env_error:
        return None, env_error, NOT_BUILT_EMULATED
    if not info.WITH_EMULATED:
        return module, "", NOT_BUILT_EMULATED
    try:
        module.install_emulated_backend(importlib.import_module("ckd_ext._emulated").backend_table())
    except (ImportError, RuntimeError) as exc:
        # A test-only module: the fused ops and the reference work without it; testing.emulated_cuda() says why not.
        return module, "", f"ckd_ext._emulated failed to load ({exc}). Rebuild it with: {EMULATED_REBUILD}"
    return module, "", ""


def _apply_workspace_env(module) -> str:
    """CKD_EXT_WORKSPACE_MB, when set, is the default workspace in MiB; a value that is not a positive integer up
    to 2^30 MiB (1 PiB) is an error of every fused call, not silently ignored."""
    text = os.environ.get("CKD_EXT_WORKSPACE_MB")
    if text is None:
        return ""
    value = text.strip()
    if not (value.isdigit() and 0 < int(value) <= 2 ** 30):
        return (f"CKD_EXT_WORKSPACE_MB must be a positive integer number of MiB (at most {2 ** 30}), got {text!r}; "
                f"unset it for the per-device default (CPU: 64 MiB) or use ckd_ext.set_workspace_bytes")
    module.set_workspace_bytes(int(value) << 20)
    return ""


def _apply_cpu_isa_env(module) -> str:
    """CKD_EXT_CPU_ISA, when set, is the instruction set the CPU kernels run with (baseline, avx2 or avx512; by
    default the highest this build and CPU have); a value that is unknown or that this machine cannot run is an
    error of every fused call, not silently replaced."""
    text = os.environ.get("CKD_EXT_CPU_ISA")
    if text is None:
        return ""
    try:
        module.set_cpu_isa(text.strip().lower())
    except RuntimeError:
        allowed = module.available_cpu_isas()
        return (f"CKD_EXT_CPU_ISA must be one of {', '.join(allowed)} on this machine, got {text!r}; unset it for "
                f"the highest ({allowed[-1]}) or use ckd_ext.set_cpu_isa")
    return ""


class ExtensionUnavailableWarning(RuntimeWarning):
    """Issued once, when ``import ckd_ext`` cannot load the compiled extension: the fused ops would raise later."""


def _warn_at_importer(message: str, category) -> None:
    """Warns with the location of the first frame outside this package and importlib: the user's import line,
    whichever of the package's modules happened to import this one first."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename.startswith("<frozen importlib")):
        frame = frame.f_back
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


_module, _error, _emulated_error = _load()
if _module is None:
    # At import, not at the first loss call, which may come hours into a run; once, since a module runs once.
    _warn_at_importer(f"{_error} `python -m ckd_ext.info` reports what is built.", ExtensionUnavailableWarning)


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
    return not _emulated_error


def emulated_unavailable_reason() -> str:
    """Why ckd_ext.testing.emulated_cuda() cannot run, with the command that builds it; "" when it can."""
    return _emulated_error


def synchronize(device) -> None:
    """Waits for the work queued on `device` (a torch.device or its name); a no-op off CUDA. The one place
    timing code (training, benchmarks) synchronises."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
