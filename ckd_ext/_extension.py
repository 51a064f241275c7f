"""Loads the compiled extension ckd_ext._C, which registers the torch.ops.ckd_ext ops.

`import ckd_ext` must work without it (ckd_ext.reference is pure PyTorch), so a missing or stale build
is remembered here and reported, with the command that fixes it, when a fused op is called.
"""
import warnings

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps -e .  (from the ckd_ext source folder)"

_C = None
_load_error = None


def _load():
    global _C, _load_error
    try:
        from . import _build_info
    except ImportError:
        _load_error = (
            "ckd_ext's compiled extension (ckd_ext._C) is not built, so the fused ops are unavailable "
            f"(ckd_ext.reference works without it). Build it with: {REBUILD}"
        )
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        # Loading _C now would fail with an undefined-symbol error, or worse, load against a different ABI.
        _load_error = (
            f"ckd_ext was built against torch {_build_info.TORCH_VERSION}, but torch {torch.__version__} is "
            f"installed. Rebuild the extension against the installed torch: {REBUILD}"
        )
        warnings.warn(_load_error, RuntimeWarning, stacklevel=3)
        return
    try:
        from . import _C as module
    except ImportError as exc:
        _load_error = f"ckd_ext's compiled extension failed to load ({exc}). Rebuild it with: {REBUILD}"
        return
    _C = module


def require_extension():
    """Returns the loaded _C module, or raises RuntimeError saying how to build it."""
    if _C is None:
        raise RuntimeError(_load_error)
    return _C


def is_available() -> bool:
    return _C is not None


_load()
