"""Global-batch CKD and BicKD across the ranks of a torch.distributed process group (docs/distributed.md).

Three modes, chosen by the losses' ``global_batch`` argument:

* ``False`` (default): each rank's loss over its own rows; nothing here runs.
* ``True`` (all-gather): every rank gathers the valid rows of all ranks (teacher without autograd, student through
  `GatherRows`, whose backward is a reduce-scatter), runs the single-process loss on the concatenated batch with
  ``reduction="none"`` and keeps its own anchors' terms.
* ``"ring"``: no rank holds the global batch. Candidate blocks pass from rank to rank (`RingLSE`); each rank merges
  its own anchors' running log-sum-exp over them, and the backward passes each block's gradient along with it, so
  that it arrives back at its owner. BicKD's class side first exchanges column strips (`RowsToColumns`, an
  all-to-all), so that each rank holds whole columns of a strip of classes, and then runs the same ring on them.

Scaling: rank r returns ``world * (its anchors' share of the row terms) + the class side`` (BicKD's class side is
global and the same on every rank), so that the mean of the returned losses over ranks is the global loss and
DDP's gradient averaging (or FSDP's reduce-scatter) gives exactly the single-process gradient.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
import zlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .rows import EPS, accumulation_dtype, scatter_rows, softplus_contrast

MODES = (False, True, "ring")
STRIP_BYTES = 64 << 20  # similarity strip budget of the ring's GEMMs, as the fused ops' default workspace


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def check_arguments(fn: str, global_batch, group) -> None:
    """`global_batch` is one of MODES (no truthy stand-ins: 1 or "gather" are errors, not coerced); a global mode
    needs an initialised process group; `group` is None or a ProcessGroup."""
    if not any(global_batch is mode if isinstance(mode, bool) else global_batch == mode for mode in MODES):
        raise ValueError(f"{fn}: global_batch must be False, True or 'ring', got {global_batch!r}")
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{fn}: group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if global_batch is not False and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}: global_batch={global_batch!r} needs an initialised torch.distributed process "
                           f"group (torch.distributed.init_process_group), but none is initialised")


def _global_mode(global_batch) -> bool:
    return global_batch is True or (isinstance(global_batch, str) and global_batch == "ring")


def _usable_group(group) -> bool:
    return dist.is_available() and dist.is_initialized() and (group is None or isinstance(group, dist.ProcessGroup))


@contextlib.contextmanager
def checked_together(group, communicates: bool):
    """Around the argument checks of a call whose first collective is gather_layout's all-gather (`communicates`): a
    rank whose checks raise still takes part in that all-gather, with its row count REJECTED, before its own error
    propagates, so the other ranks raise a ValueError naming it (gather_layout) instead of waiting for it until the
    process group's timeout. A rank that does not mean to communicate (a local or invalid mode) raises alone."""
    if not (communicates and _usable_group(group)):
        yield
        return
    try:
        yield
    except Exception:
        slots = torch.zeros(1, SIGNATURE_SLOTS, dtype=torch.int64, device=_group_device(group))
        slots[0, 0] = REJECTED
        _all_gather(slots, group)
        raise


def global_batch_checks(global_batch, group):
    """checked_together for a `global_batch` call: only True and "ring" communicate."""
    return checked_together(group, _global_mode(global_batch))


def _group_device(group):
    """Where this rank's tensors of a collective on `group` live: NCCL's on the current CUDA device."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Communication: every collective goes through these helpers, which count the bytes this rank sends
# --------------------------------------------------------------------------------------------------


class ByteCounter:
    """Bytes this process sent through the helpers below while it was active: for collectives, what a
    bandwidth-optimal ring algorithm (NCCL's, gloo's ring) sends per rank; for point-to-point, the payload."""

    def __init__(self):
        self.sent = 0
        self.by_kind = {}

    def add(self, kind: str, nbytes: int) -> None:
        self.sent += nbytes
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes


_counters: list = []


@contextlib.contextmanager
def count_bytes():
    """with count_bytes() as c: ...; c.sent is what this rank sent inside the block (forward and backward)."""
    counter = ByteCounter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _count(kind: str, nbytes: float) -> None:
    for counter in _counters:
        counter.add(kind, int(nbytes))


def _all_gather(tensor: Tensor, group) -> Tensor:
    """(world * rows, ...) from every rank's equally shaped (rows, ...) tensor, in rank order."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = tensor.new_empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]))
    _count("all_gather", (world - 1) * tensor.numel() * tensor.element_size())
    dist.all_gather_single(out, tensor, group=group)
    return out


def all_reduce(tensor: Tensor, group, op=None) -> Tensor:
    """The elementwise reduction (`op`: a dist.ReduceOp, SUM by default) over the ranks of `tensor`, in place; the
    same result on every rank."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    _count("all_reduce", 2 * (world - 1) / world * tensor.numel() * tensor.element_size())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def _reduce_scatter(tensor: Tensor, group) -> Tensor:
    """Rank r's (rows / world, ...) slice of the sum over ranks of `tensor`."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = tensor.new_empty((tensor.shape[0] // world,) + tuple(tensor.shape[1:]))
    _count("reduce_scatter", (world - 1) * out.numel() * out.element_size())
    dist.reduce_scatter_single(out, tensor, group=group)
    return out


def _all_to_all(pieces: list, shapes: list, group) -> list:
    """Sends pieces[q] to rank q; returns what each rank q sent here, of shapes[q]."""
    rank = dist.get_rank(group)
    # Flattened into one all_to_all_single with uneven splits: gloo's list all_to_all needs equal shapes.
    sent = torch.cat([p.reshape(-1) for p in pieces])
    sizes = [math.prod(shape) for shape in shapes]
    received = sent.new_empty(sum(sizes))
    _count("all_to_all", sum(p.numel() * p.element_size() for q, p in enumerate(pieces) if q != rank))
    dist.all_to_all_single(received, sent, output_split_sizes=sizes, input_split_sizes=[p.numel() for p in pieces],
                           group=group)
    return [piece.view(shape) for piece, shape in zip(received.split(sizes), shapes)]


class _Ring:
    """Point-to-point to the next rank and from the previous one. Each message has its own tag, so that blocks and
    gradient blocks of equal shapes cannot be matched out of order (gloo; NCCL matches in order, which is the
    same). The receive and the send are one batch_isend_irecv: with NCCL on 2 ranks the previous and the next
    rank are the same peer, and a receive and a send launched one after the other on that pair's stream would
    wait for each other."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def shift(self, tensor: Tensor, tag: int):
        """Starts sending `tensor` to the next rank and receiving the previous rank's; (received, wait)."""
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        _count("send", tensor.numel() * tensor.element_size())
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.irecv, received, group=self.group, tag=tag, group_peer=self.prev),
            dist.P2POp(dist.isend, tensor, group=self.group, tag=tag, group_peer=self.next)])

        def wait():
            for work in works:
                work.wait()
            return received

        return wait


# --------------------------------------------------------------------------------------------------
# How the global batch is laid out over the ranks
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Rank r holds rows offset(r) .. offset(r) + counts[r] of the global batch (its valid rows, in rank order);
    collectives pad every rank's rows to `block` (the largest count)."""
    counts: tuple
    rank: int

    @property
    def world(self) -> int:
        return len(self.counts)

    @property
    def block(self) -> int:
        return max(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def offset(self, rank: int) -> int:
        return sum(self.counts[:rank])

    def padding_mask(self, device) -> Tensor:
        """(world * block,) bool: True at the real rows of a gathered, padded batch."""
        index = torch.arange(self.block, device=device)
        return torch.cat([index < count for count in self.counts])


@dataclasses.dataclass(frozen=True)
class Signature:
    """What every rank's call must agree on: the loss (`fn`) and (argument, value) pairs, values being bools, ints,
    floats, strings or dtypes. A rank that disagrees would send rows of another width or dtype (gloo aborts the
    process), take another communication path (the other ranks wait until the process group's timeout) or silently
    compute another loss. `why`, in the error, says why the ranks must agree."""
    fn: str
    fields: tuple
    why: str = "the global batch is one loss over all ranks"


SIGNATURE_SLOTS = 14  # int64 slots of one rank's signature: the row count, the loss and up to 12 arguments
REJECTED = -1  # the row count a rank whose own argument checks failed sends (checked_together)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STRINGS = ("True", "ring", "student", "teacher", "mean", "sum", "none")


def _encode(value) -> int:
    if isinstance(value, torch.dtype):
        return _DTYPES.index(value)
    if isinstance(value, str):
        return _STRINGS.index(value) if value in _STRINGS else zlib.crc32(value.encode())
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return int(value)


def _decode(code: int, like):
    """The value `code` encodes, read as the type of this rank's own value `like`."""
    if isinstance(like, torch.dtype):
        return _DTYPES[code] if 0 <= code < len(_DTYPES) else f"dtype #{code}"
    if isinstance(like, str):  # global_batch travels as "True" / "ring"
        if 0 <= code < len(_STRINGS):
            return True if _STRINGS[code] == "True" else _STRINGS[code]
        return like if code == _encode(like) else "another string"
    if isinstance(like, float):
        return struct.unpack("<d", struct.pack("<q", code))[0]
    if isinstance(like, bool):
        return bool(code)
    return code


def _ranks_text(ranks) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _check_signatures(signature: Signature, table: list) -> None:
    """Raises the same ValueError on every rank (each holds every rank's signature) at the first slot that differs."""
    names = [("the loss called", signature.fn)] + list(signature.fields)
    for slot, (name, value) in enumerate(names, start=1):
        codes = [row[slot] for row in table]
        if len(set(codes)) == 1:
            continue
        by_value = {}
        for rank, code in enumerate(codes):
            by_value.setdefault(code, []).append(rank)
        got = "; ".join(f"{_decode(code, value)!r} on {_ranks_text(ranks)}" for code, ranks in by_value.items())
        raise ValueError(f"{signature.fn}: {name} must be the same on every rank of the process group "
                         f"({signature.why}), got {got}")


def gather_layout(rows: int, device, group, signature: Optional[Signature] = None) -> Layout:
    """The layout of every rank's `rows` valid rows: one all-gather of SIGNATURE_SLOTS int64 per rank, the row count
    and the call's signature, which every rank checks against every other's before any rows are sent."""
    slots = [rows]
    if signature is not None:
        if len(signature.fields) + 2 > SIGNATURE_SLOTS:
            raise AssertionError("a signature longer than SIGNATURE_SLOTS")
        slots += [_encode(signature.fn)] + [_encode(value) for _, value in signature.fields]
    slots += [0] * (SIGNATURE_SLOTS - len(slots))
    table = _all_gather(torch.tensor([slots], dtype=torch.int64, device=device), group).tolist()
    rejected = [rank for rank, row in enumerate(table) if row[0] == REJECTED]
    if rejected:
        fn = "ckd_ext" if signature is None else signature.fn
        whose = "its" if len(rejected) == 1 else "their"
        raise ValueError(f"{fn}: {_ranks_text(rejected)} of the process group rejected {whose} arguments (the error "
                         f"raised there says why); every rank stops here")
    if signature is not None:
        _check_signatures(signature, table)
    return Layout(tuple(int(row[0]) for row in table), dist.get_rank(group))


def _pad_rows(rows: Tensor, block: int) -> Tensor:
    return F.pad(rows, (0, 0, 0, block - rows.shape[0])) if rows.shape[0] < block else rows


def gather_rows(rows: Tensor, layout: Layout, group) -> Tensor:
    """(world * block, C): every rank's rows, zero-padded to `block`; no autograd (the teacher's)."""
    return _all_gather(_pad_rows(rows, layout.block), group)


class GatherRows(torch.autograd.Function):
    """gather_rows with autograd: the backward sends each rank the sum over ranks of the gradient of its rows (a
    reduce-scatter). Every rank's loss depends on every rank's rows, so the gradient of rank r's rows has a
    contribution from each rank; the widely copied GatherLayer that keeps only the local slice of the incoming
    gradient drops all but one of them."""

    @staticmethod
    def forward(ctx, rows, layout, group):
        ctx.layout, ctx.group, ctx.rows = layout, group, rows.shape[0]
        return gather_rows(rows, layout, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group)[:ctx.rows], None, None


class RowsToColumns(torch.autograd.Function):
    """Row shards -> column shards: rank r's (counts[r], C) rows become the (total, classes[r]) strip of columns
    classes[r] (an all-to-all); the backward sends the gradient back the same way."""

    @staticmethod
    def forward(ctx, rows, layout, classes, group):
        ctx.layout, ctx.classes, ctx.group = layout, classes, group
        pieces = list(rows.split(list(classes), dim=1))
        shapes = [(count, classes[layout.rank]) for count in layout.counts]
        return torch.cat(_all_to_all(pieces, shapes, group), dim=0)

    @staticmethod
    def backward(ctx, grad):
        layout, classes = ctx.layout, ctx.classes
        pieces = list(grad.split(list(layout.counts), dim=0))
        shapes = [(layout.counts[layout.rank], c) for c in classes]
        return torch.cat(_all_to_all(pieces, shapes, ctx.group), dim=1), None, None, None


# --------------------------------------------------------------------------------------------------
# The ring log-sum-exp
# --------------------------------------------------------------------------------------------------


def _strips(rows: int, cols: int, element_size: int):
    """Row ranges of the anchor strips: a strip of similarities (and its exp) within STRIP_BYTES."""
    step = max(1, STRIP_BYTES // max(1, 2 * cols * element_size))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _block_logits(anchors: Tensor, block: Tensor, tau: float, start: int, stop: int, own: bool) -> Tensor:
    """<a_i, b_j> / tau for anchors start..stop against a block; -inf at j == i (the same global row) when the
    block is the rank's own."""
    logits = torch.ops.ckd_ext.gemm_similarity(anchors[start:stop], block).div_(tau)
    if own:
        index = torch.arange(stop - start, device=logits.device)
        logits[index, index + start] = float("-inf")
    return logits


class RingLSE(torch.autograd.Function):
    """lse_i = LSE over the valid candidate rows j of all ranks, j != i, of <a_i, b_j> / tau, for this rank's anchor
    rows a_i (anchors: (counts[rank], D)) against every rank's candidate rows b_j (candidates: this rank's
    (counts[rank], D)). -inf where there is no candidate.

    Forward: world steps; at step k a rank holds the block of rank (rank - k), merges its anchors' running
    (max, sum of exp) over it strip by strip, while the block moves on to the next rank. Backward: the blocks pass
    again, each with the gradient of its rows accumulated by the ranks it visited (the softmax weights recomputed
    from the saved lse); after `world` hops that gradient is back at the block's owner. A rank holds its own rows
    and two blocks (forward) or two (block, gradient) pairs (backward), never the global batch.

    This is ATen around the GEMM policy's ops (gemm_similarity, gemm_product), not the fused kernels, because the
    custom ops end at a loss: a ring step needs a partial result (each anchor's running max and sum of exp over one
    visiting block, own columns excluded at an offset) and a backward against an lse that only exists after the
    last block. Running the strip engine per ring block takes
    two ops the engine's tiles already compute internally: block_lse(anchors, block, tau, diagonal_offset) ->
    (max, sum) and block_backward(anchors, block, lse, weight, tau, diagonal_offset) -> (grad_anchors, grad_block),
    with the CKD positives and BicKD's softmax rows kept in Python around them."""

    @staticmethod
    def forward(ctx, anchors, candidates, tau, layout, group):
        ring = _Ring(group)
        n = anchors.shape[0]
        running_max = anchors.new_full((n,), float("-inf"))
        running_sum = anchors.new_zeros(n)
        block = _pad_rows(candidates, layout.block)
        for step in range(layout.world):
            source = (layout.rank - step) % layout.world
            wait = ring.shift(block, tag=step) if step < layout.world - 1 else None
            valid = block[:layout.counts[source]]
            for start, stop in _strips(n, valid.shape[0], valid.element_size()) if valid.shape[0] else ():
                logits = _block_logits(anchors, valid, tau, start, stop, source == layout.rank)
                new_max = torch.maximum(running_max[start:stop], logits.amax(dim=1))
                shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                running_sum[start:stop] = (running_sum[start:stop] * torch.exp(running_max[start:stop] - shift)
                                           + torch.exp(logits - shift[:, None]).sum(dim=1))
                running_max[start:stop] = new_max
            block = wait() if wait is not None else block
        lse = running_max + torch.log(running_sum)
        lse = torch.where(torch.isinf(running_max), running_max, lse)
        ctx.save_for_backward(anchors, candidates, lse)
        ctx.tau, ctx.layout, ctx.group = tau, layout, group
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        anchors, candidates, lse = ctx.saved_tensors
        tau, layout = ctx.tau, ctx.layout
        ring = _Ring(ctx.group)
        need_anchors, need_candidates = ctx.needs_input_grad[:2]
        # Anchors without a candidate have lse = -inf and no gradient (not 0 * NaN).
        weight = torch.where(torch.isinf(lse), torch.zeros_like(grad_lse), grad_lse) / tau
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        grad_anchors = torch.zeros_like(anchors) if need_anchors else None
        block = _pad_rows(candidates, layout.block)
        grad_block = torch.zeros_like(block) if need_candidates else None
        contribution = torch.empty_like(block) if need_candidates else None
        wait_grad = None
        world = layout.world
        for step in range(world):
            source = (layout.rank - step) % world
            wait_block = ring.shift(block, tag=2 * step) if step < world - 1 else None
            if need_candidates:
                contribution.zero_()
            count = layout.counts[source]
            valid = block[:count]
            for start, stop in _strips(anchors.shape[0], count, valid.element_size()) if count else ():
                logits = _block_logits(anchors, valid, tau, start, stop, source == layout.rank)
                coefficients = torch.exp(logits - lse[start:stop, None]) * weight[start:stop, None]
                if need_anchors:
                    torch.ops.ckd_ext.gemm_product(grad_anchors[start:stop], coefficients, valid, True)
                if need_candidates:
                    torch.ops.ckd_ext.gemm_product(contribution[:count], coefficients.T, anchors[start:stop], True)
            if need_candidates:
                grad_block = wait_grad() if wait_grad is not None else grad_block
                grad_block += contribution
                # Every hop, the last one included, goes to the next rank: after `world` hops the gradient of
                # each block has visited every rank and is back at its owner.
                wait_grad = ring.shift(grad_block, tag=2 * step + 1) if world > 1 else None
            block = wait_block() if wait_block is not None else block
        grad_candidates = None
        if need_candidates:
            grad_block = wait_grad() if wait_grad is not None else grad_block
            grad_candidates = grad_block[:candidates.shape[0]]
        return grad_anchors, grad_candidates, None, None, None


def ring_lse(anchors: Tensor, candidates: Tensor, tau: float, layout: Layout, group) -> Tensor:
    return RingLSE.apply(anchors, candidates, tau, layout, group)


# --------------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------------


def _valid(prepared):
    """This rank's valid student and teacher rows (masked rows dropped: they take no part)."""
    if prepared.mask is None:
        return prepared.student, prepared.teacher
    return prepared.student[prepared.mask], prepared.teacher[prepared.mask]


def row_share(terms: Tensor, layout: Layout, reduction: str) -> Tensor:
    """world * this rank's anchors' share of the global sum or mean of the row terms (the scaling convention)."""
    accumulate = accumulation_dtype(terms.dtype)
    total = terms.to(accumulate).sum() * layout.world
    if reduction == "mean":
        total = total / max(layout.total, 1)
    return total.to(terms.dtype)


@contextlib.contextmanager
def _no_autocast(device: torch.device):
    with torch.autocast(device.type, enabled=False):
        yield


def run(local_loss, prepared, *, reduction, global_batch, group, **hyper):
    """The global-batch loss (`global_batch` True or "ring") whose single-process form is `local_loss`: a fused or
    reference `ckd_loss` / `bickd_loss`, which the all-gather mode runs on the gathered batch (so each
    implementation stays its own oracle across ranks); `hyper` are its remaining keywords. Returns what
    `local_loss` returns for this rank's rows, in local_loss's output dtype (all-gather) or the accumulation dtype
    (ring), for the caller to convert."""
    loss = _GLOBAL_LOSSES[local_loss.__name__]
    return loss(local_loss, prepared, reduction=reduction, global_batch=global_batch, group=group, **hyper)


def own_row_terms(student: Tensor, teacher: Tensor, layout: Layout, group, global_batch, gathered_terms,
                  ring_terms) -> Tensor:
    """The terms of this rank's anchor rows in a global batch: all-gather runs `gathered_terms(students, teachers,
    padding_mask)` on every rank's rows (the student's through GatherRows, so its gradient returns by
    reduce-scatter) and keeps this rank's; the ring runs `ring_terms()`, which passes blocks along `layout`. Every
    CKD form (logits, fused-linear rows) goes through here."""
    if global_batch is True:
        everyone = GatherRows.apply(student, layout, group)
        terms = gathered_terms(everyone, gather_rows(teacher, layout, group), layout.padding_mask(student.device))
        start = layout.rank * layout.block
        return terms[start:start + student.shape[0]]
    return ring_terms()


def _global_ckd(local_loss, prepared, *, tau, anchor, reduction, global_batch, group):
    """Global-batch CKD: per-row terms (...) of this rank's rows for "none", else the scalar loss."""
    student, teacher = _valid(prepared)
    signature = Signature("ckd_loss", (
        ("global_batch", str(global_batch)), ("student's dtype", prepared.student.dtype),
        ("teacher's dtype", prepared.teacher.dtype), ("the number of classes C", prepared.student.shape[1]),
        ("anchor", anchor), ("tau", float(tau)), ("reduction", reduction)))
    layout = gather_layout(student.shape[0], student.device, group, signature)

    def ring_terms():
        with _no_autocast(student.device):
            dtype = accumulation_dtype(prepared.student.dtype)
            u = F.normalize(teacher.to(dtype), dim=1, eps=EPS)
            v = F.normalize(student.to(dtype), dim=1, eps=EPS)
            positives = (u * v).sum(dim=1) / tau
            return softplus_contrast(ring_lse(u if anchor == "teacher" else v, v, tau, layout, group), positives)

    terms = own_row_terms(student, teacher, layout, group, global_batch,
                          lambda s, t, padding: local_loss(s, t, tau=tau, anchor=anchor, mask=padding,
                                                           reduction="none"),
                          ring_terms)
    if reduction == "none":
        return scatter_rows(terms, prepared)
    return row_share(terms, layout, reduction)


def _global_bickd(local_loss, prepared, *, temperature, tau, w_sample, w_class, symmetric, reduction, global_batch,
                  group):
    """Global-batch BicKD: (per-row sample terms (...) of this rank's rows, the global class terms (C,)) for "none",
    else the scalar loss."""
    student, teacher = _valid(prepared)
    signature = Signature("bickd_loss", (
        ("global_batch", str(global_batch)), ("student's dtype", prepared.student.dtype),
        ("teacher's dtype", prepared.teacher.dtype), ("the number of classes C", prepared.student.shape[1]),
        ("temperature", float(temperature)), ("tau", float(tau)), ("w_sample", float(w_sample)),
        ("w_class", float(w_class)), ("symmetric", bool(symmetric)), ("reduction", reduction)))
    layout = gather_layout(student.shape[0], student.device, group, signature)
    if global_batch is True:
        everyone = GatherRows.apply(student, layout, group)
        sample_terms, class_terms = local_loss(
            everyone, gather_rows(teacher, layout, group), temperature=temperature, tau=tau, w_sample=w_sample,
            w_class=w_class, symmetric=symmetric, mask=layout.padding_mask(student.device), reduction="none")
        start = layout.rank * layout.block
        sample_terms = sample_terms[start:start + student.shape[0]]
    else:
        with _no_autocast(student.device):
            sample_terms, class_terms = _ring_bickd(student, teacher, layout, group, temperature, tau, w_sample,
                                                    w_class, symmetric, accumulation_dtype(prepared.student.dtype))
    if reduction == "none":
        return scatter_rows(sample_terms, prepared), class_terms
    accumulate = accumulation_dtype(class_terms.dtype)
    class_side = class_terms.to(accumulate).sum()
    if reduction == "mean":
        class_side = class_side / class_terms.shape[0]
    return (row_share(sample_terms, layout, reduction).to(accumulate) + class_side).to(class_terms.dtype)


def _diagonal_ring_terms(student_side: Tensor, teacher_side: Tensor, tau: float, layout: Layout, group,
                         symmetric: bool) -> Tensor:
    """InfoNCE terms of the student-anchored rows of <student_side_i, teacher_side_k> / tau (diagonal positives),
    averaged with the teacher-anchored twin when `symmetric`; both sides already L2-normalised."""
    positives = (student_side * teacher_side).sum(dim=1) / tau
    terms = softplus_contrast(ring_lse(student_side, teacher_side, tau, layout, group), positives)
    if symmetric:
        twin = softplus_contrast(ring_lse(teacher_side, student_side, tau, layout, group), positives)
        terms = 0.5 * (terms + twin)
    return terms


def class_strips(num_classes: int, world: int) -> tuple:
    """How many classes each rank's column strip holds (as even as possible, lower ranks one more)."""
    return tuple(num_classes // world + (r < num_classes % world) for r in range(world))


def _ring_bickd(student, teacher, layout, group, temperature, tau, w_sample, w_class, symmetric, dtype):
    p = F.softmax(student.to(dtype) / temperature, dim=1)
    q = F.softmax(teacher.to(dtype) / temperature, dim=1)
    num_classes = p.shape[1]
    if w_sample == 0:
        sample_terms = p.new_zeros(p.shape[0])
    else:
        sample_terms = w_sample * _diagonal_ring_terms(F.normalize(p, dim=1, eps=EPS), F.normalize(q, dim=1, eps=EPS),
                                                       tau, layout, group, symmetric)
    if w_class == 0 or layout.total == 0:
        # No valid row anywhere: the class side is 0 by convention (the reference's); p has no rows on any rank,
        # so p.sum(0) is C zeros in the graph.
        return sample_terms, p.sum(dim=0) * 0
    classes = class_strips(num_classes, layout.world)
    p_columns = RowsToColumns.apply(p, layout, classes, group)   # (total, classes[rank]): whole columns
    q_columns = RowsToColumns.apply(q, layout, classes, group)
    class_layout = Layout(classes, layout.rank)
    # Columns normalised over all valid rows of all ranks; then the class side is the sample side's ring on the
    # transposed strips (anchors: this rank's student classes; candidates: every rank's teacher classes).
    own_terms = w_class * _diagonal_ring_terms(F.normalize(p_columns, dim=0, eps=EPS).T,
                                               F.normalize(q_columns, dim=0, eps=EPS).T, tau, class_layout, group,
                                               symmetric)
    class_terms = GatherRows.apply(own_terms[:, None], class_layout, group)
    return sample_terms, class_terms[class_layout.padding_mask(p.device), 0]


_GLOBAL_LOSSES = {"ckd_loss": _global_ckd, "bickd_loss": _global_bickd}
