"""What torch.compile needs to know about ckd_ext's own functions, without importing torch._dynamo when ckd_ext is
imported (torch.compiler.assume_constant_result imports it: ~1 s, as long as `import torch` itself)."""
from __future__ import annotations

from typing import Callable, TypeVar

Fn = TypeVar("Fn", bound=Callable)


def assume_constant_result(fn: Fn) -> Fn:
    """torch.compiler.assume_constant_result(fn): a graph calls `fn` once while it is traced and is specialised to
    the result. That decorator only sets this attribute (torch 2.11 through 2.14), which dynamo reads when it traces
    a call. tests/test_ops.py checks that torch's decorator leaves a function as this one does, and the fullgraph
    compiles of tests/test_fused_linear.py fail if the mark is not honoured (the workspace budget comes from the
    extension through pybind11, which dynamo cannot trace)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn
