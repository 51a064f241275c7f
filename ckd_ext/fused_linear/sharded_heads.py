"""Heads that are not whole, plain tensors for the whole call (docs/distributed.md, "Sharded heads"):

* DTensor heads (FSDP2's `fully_shard`, `distribute_tensor`): outside lm_head's forward, `model.lm_head.weight` is
  a sharded DTensor. Its full tensor is taken once per call, and the gradient of that full tensor goes back to the
  shards as the mean over the mesh's ranks (a reduce-scatter of the sum, then 1/size), which is what FSDP2 does with
  the gradients of every other parameter, so the head's gradient is the data-parallel one like theirs.
* Gathered heads (ZeRO-3: the full head exists only inside a gather context around the forward): the losses finish
  every head gradient during the forward (`finish_in_forward`), so nothing reads the head in backward; a reduction
  that cannot ("none": its upstream weights arrive in backward) checks the head is still there (`check_not_freed`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..custom_ops import _once_differentiable


def is_dtensor(value) -> bool:
    # DTensor is imported only where it is used: torch.distributed.tensor may be missing (torch built without it)
    return type(value).__name__ == "DTensor" and hasattr(value, "full_tensor")


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def full_head(value):
    """A DTensor's full tensor, with autograd back to its shards averaged over its mesh's ranks; anything else as
    it is. The teacher's heads take the same path (their gradient is never asked for)."""
    if not is_dtensor(value):
        return value
    from torch.distributed.tensor import Partial
    mesh = value.device_mesh
    full = value.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    return _ScaleGradient.apply(full, 1.0 / mesh.size()) if value.requires_grad else full


class _FinishedGradients(torch.autograd.Function):
    """`value` (a detached scalar loss) attached to the differentiable inputs, whose gradients `grads` were finished
    in the forward: backward only scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, *args):  # (*inputs, value, grads)
        value, grads = args[-2:]
        ctx.given = [g is not None for g in grads]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return value

    @staticmethod
    @_once_differentiable  # the saved gradients are constants: a second derivative through them would be 0
    def backward(ctx, grad_value):
        saved = iter(ctx.saved_tensors)
        return tuple(next(saved) * grad_value if given else None for given in ctx.given) + (None, None)


def finish_in_forward(compute: Callable[..., Tensor], inputs: Sequence) -> Tensor:
    """compute(*inputs) (a scalar loss) with its gradients w.r.t. the `inputs` that require grad computed now, during
    the forward, from detached copies: the loss's own backward runs here, and the later backward reads none of the
    inputs (a gathered head may be freed by then). Under torch.compile the plain compute (a traced graph cannot call
    autograd inside a forward)."""
    wanted = [isinstance(x, Tensor) and x.requires_grad for x in inputs]
    if not torch.is_grad_enabled() or not any(wanted) or torch.compiler.is_compiling():
        return compute(*inputs)
    leaves = [x.detach().requires_grad_() if want else x for x, want in zip(inputs, wanted)]
    with torch.enable_grad():
        loss = compute(*leaves)
        targets = [leaf for leaf, want in zip(leaves, wanted) if want]
        # None for an input the loss does not reach (the teacher's: its .grad stays None, as without this wrapper)
        grads = (torch.autograd.grad(loss, targets, allow_unused=True) if loss.requires_grad
                 else [None] * len(targets))
    return _FinishedGradients.apply(*(x for x, want in zip(inputs, wanted) if want), loss.detach(), list(grads))


def check_not_freed(fn: str, name: str, tensor, dim: int) -> None:
    """A RuntimeError if `tensor` (a `dim`-dimensional head saved for a backward that reads it) lost its data since
    the forward: replaced by an empty tensor (`param.data = torch.empty(0)`) or its storage resized to 0, as ZeRO-3
    frees a gathered head on leaving the gather context."""
    if tensor is None or torch.compiler.is_compiling():  # a traced backward cannot inspect storage
        return
    extent = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    needed = (extent + 1) * tensor.element_size() if tensor.numel() else 0
    if tensor.dim() != dim or tensor.untyped_storage().nbytes() < needed:
        raise RuntimeError(
            f"{fn}: {name} was freed between the forward and the backward (now of shape {tuple(tensor.shape)} "
            f"with {tensor.untyped_storage().nbytes()} bytes of storage): with reduction='none' the head's gradient is "
            f"computed in backward, which reads the head. Under a gather context that frees the head on exit "
            f"(ZeRO-3), run backward inside the context, or use reduction='mean' or 'sum', whose head gradients are "
            f"finished during the forward")


def check_not_freed_heads(fn: str, student_weight, student_bias, teacher_weight, teacher_bias) -> None:
    for name, tensor, dim in (("student_weight", student_weight, 2), ("student_bias", student_bias, 1),
                              ("teacher_weight", teacher_weight, 2), ("teacher_bias", teacher_bias, 1)):
        check_not_freed(fn, name, tensor, dim)
