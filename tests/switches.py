"""The process-wide switches a test flips: which backend runs the fused ops, and the workspace budget.

conftest.py's `backend` and `workspace` fixtures are built on these context managers; use them directly only where
a function-scoped fixture does not fit (inside hypothesis examples, or a test that compares two backends).

* Backends: "cpu" (the CPU kernels), "emulated" (the CUDA kernels on CPU tensors under the CPU emulator, inside
  ckd_ext.testing.emulated_cuda(); built only with CKD_EXT_EMULATED=1) and "cuda" (a CUDA device). A test's input
  tensors go on the backend's `device`: the CPU for "cpu" and "emulated".
* The workspace budget (ckd_ext.set_workspace_bytes) is restored to the previous setting afterwards, "unset"
  included (workspace_setting() == 0, the device's default).
"""
import contextlib
from typing import NamedTuple

import pytest
import torch

import ckd_ext
from ckd_ext import testing

BACKENDS = ("cpu", "emulated", "cuda")


class Backend(NamedTuple):
    name: str  # "cpu", "emulated" or "cuda": also the backend argument of _C.strip_plan
    device: torch.device  # where the test's input tensors go


def unavailable(name):
    """Why backend `name` cannot run here, or None where it can."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "emulated" and not testing.emulated_available():
        return "the emulated CUDA backend is not built (CKD_EXT_EMULATED=1 pip install --no-build-isolation -e .)"
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return None


def skip_unless(name):
    """A skipif mark for tests (or params) that need backend `name`."""
    reason = unavailable(name)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@contextlib.contextmanager
def on_backend(name):
    """Inside the block the fused ops run on backend `name`; yields its Backend. Skips the test where the backend is
    not available."""
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(reason)
    if name == "emulated":
        with testing.emulated_cuda():
            yield Backend(name, torch.device("cpu"))
    else:
        yield Backend(name, torch.device(name))


@contextlib.contextmanager
def restored_workspace():
    """Whatever the block sets, the workspace setting at entry ("unset" included) is back at exit."""
    saved = ckd_ext.require_extension().workspace_setting()
    try:
        yield
    finally:
        ckd_ext.set_workspace_bytes(saved or None)


def set_workspace(nbytes):
    """The fused ops get a workspace of `nbytes` (None: the device's default) from now on."""
    ckd_ext.set_workspace_bytes(nbytes)
    assert nbytes is None or ckd_ext.workspace_bytes() == nbytes


@contextlib.contextmanager
def workspace_budget(nbytes):
    """Inside the block the fused ops get a workspace of `nbytes` (None: the device's default)."""
    with restored_workspace():
        set_workspace(nbytes)
        yield
