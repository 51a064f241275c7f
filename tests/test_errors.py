"""docs/errors.md, tested: one test per entry id, which checks the exception type and matches the message against
the text documented there (placeholders `{name}` match anything, and where a test knows what they stand for it
checks that too), for the fused function, its ckd_ext.reference twin and its module wherever all three raise.

The ids come from parsing the page: test_every_documented_id_is_tested fails when an id has no test or a test
names an id the page does not have, test_every_test_has_an_id when a test here documents nothing. So the page
and the code cannot drift apart: a changed message fails its entry's test."""
import builtins
import contextlib
import ctypes
import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

import ckd_ext
from ckd_ext import _extension, distributed, reference
from ckd_ext.demos import classify
from ckd_ext.testing import emulated_cuda
from switches import on_backend, skip_unless

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"


# --------------------------------------------------------------------------------------------------
# The page: ids, what each raises, its message forms
# --------------------------------------------------------------------------------------------------

class Entry(NamedTuple):
    raises: Optional[type]   # the documented exception type; None for ckd-train (exit status) and "not errors"
    exit_status: Optional[int]
    messages: list           # the documented message forms, one per line of the entry's text block
    patterns: list           # the same as compiled regular expressions


PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")  # {fn}, {value}; not {train,test,meta}, which is literal text


def message_pattern(message: str) -> re.Pattern:
    """The documented message as a regex: literal text escaped, each placeholder a named group (a repeated one a
    back-reference), to be matched with fullmatch."""
    parts, seen, pos = [], set(), 0
    for m in PLACEHOLDER.finditer(message):
        parts.append(re.escape(message[pos:m.start()]))
        name = m.group(1)
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>.*?)")
        seen.add(name)
        pos = m.end()
    parts.append(re.escape(message[pos:]))
    return re.compile("".join(parts), re.S)


def parse_doc(text: str) -> dict:
    entries = {}
    for m in re.finditer(r"^### ([ETRN]-[a-z0-9-]+)[ \t]*\n(.*?)(?=^## |^### |\Z)", text, re.M | re.S):
        entry_id, body = m.group(1), m.group(2)
        assert entry_id not in entries, f"{entry_id} is documented twice"
        raises = re.search(r"^Raises `(\w+)`", body, re.M)
        exits = re.search(r"^Exits with status (\d+)", body, re.M)
        block = re.search(r"^```text\n(.*?)^```", body, re.M | re.S)
        messages = block.group(1).splitlines() if block else []
        entries[entry_id] = Entry(getattr(builtins, raises.group(1)) if raises else None,
                                  int(exits.group(1)) if exits else None, messages,
                                  [message_pattern(line) for line in messages])
    return entries


ENTRIES = parse_doc(DOC.read_text())


def check(entry_id: str, text: str, form: Optional[int] = None, **values) -> re.Match:
    """`text` is one of the documented forms of `entry_id` (form number `form` if given); the placeholders named in
    `values` stand for exactly those strings."""
    entry = ENTRIES[entry_id]
    forms = range(len(entry.messages)) if form is None else [form]
    for k in forms:
        match = entry.patterns[k].fullmatch(text)
        if match:
            break
    else:
        pytest.fail(f"{entry_id}: the message {text!r} is not the documented "
                    f"{[entry.messages[k] for k in forms]}")
    for name, value in values.items():
        assert match.group(name) == value, f"{entry_id}: {{{name}}} is {match.group(name)!r}, expected {value!r}"
    return match


def expect(entry_id: str, call, form: Optional[int] = None, **values) -> BaseException:
    """`call()` raises exactly the documented exception type of `entry_id`, with a documented message."""
    expected = ENTRIES[entry_id].raises
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is expected, f"{entry_id}: raised {type(info.value).__name__}: {info.value}"
    check(entry_id, str(info.value), form, **values)
    return info.value


TESTED = {}  # id -> test function names


def documents(entry_id: str):
    """Marks the test of a documented entry."""
    def mark(fn):
        TESTED.setdefault(entry_id, []).append(fn.__name__)
        fn.entry_id = entry_id
        return fn
    return mark


def meta(fn):
    """Marks a test of this file's bookkeeping (it documents no entry)."""
    fn.entry_id = None
    return fn


@meta
def test_every_documented_id_is_tested():
    documented, tested = set(ENTRIES), set(TESTED)
    assert documented - tested == set(), "documented in docs/errors.md but not tested"
    assert tested - documented == set(), "tested but not documented in docs/errors.md"
    assert {k: v for k, v in TESTED.items() if len(v) > 1} == {}, "one test per id"


@meta
def test_every_test_has_an_id():
    tests = {name: fn for name, fn in globals().items() if name.startswith("test_") and callable(fn)}
    assert [name for name, fn in tests.items() if not hasattr(fn, "entry_id")] == []


@meta
def test_entries_are_well_formed():
    assert len(ENTRIES) > 40
    for entry_id, entry in ENTRIES.items():
        if entry_id.startswith("N-"):  # not errors: no exception, no message
            assert entry.raises is None and entry.exit_status is None and entry.messages == [], entry_id
        elif entry_id.startswith("T-"):
            assert entry.exit_status == 2 and entry.messages, entry_id
        else:
            assert entry.raises in (TypeError, ValueError, RuntimeError) and entry.messages, entry_id


# --------------------------------------------------------------------------------------------------
# Calling the public API
# --------------------------------------------------------------------------------------------------

_gen = torch.Generator().manual_seed(0)
S = torch.randn(4, 3, generator=_gen)
T = torch.randn(4, 3, generator=_gen)
FUNCTIONS = ("ckd_loss", "kd_loss", "bickd_loss")
MODULES = {"ckd_loss": ckd_ext.CKDLoss, "kd_loss": ckd_ext.KDLoss, "bickd_loss": ckd_ext.BicKDLoss}
IMPLS = ("fused", "reference", "module")


def call(impl: str, fn: str, student=S, teacher=T, mask=None, **hyperparameters):
    """`fn` through the fused function, the reference or the module (hyperparameters at construction)."""
    if impl == "module":
        return MODULES[fn](**hyperparameters)(student, teacher, mask)
    module = ckd_ext if impl == "fused" else reference
    return getattr(module, fn)(student, teacher, mask=mask, **hyperparameters)


def cases(*items):
    """pytest params of (fn, overrides, placeholder values), one per function in `fns` of each item."""
    params = []
    for fns, overrides, values in items:
        for fn in fns:
            label = ",".join(f"{k}={v!r}"[:24] for k, v in overrides.items())
            params.append(pytest.param(fn, overrides, values, id=f"{fn}-{label}"))
    return params


def public_test(entry_id, *items):
    """A test of `entry_id` raised by each impl (fused, reference, module) of every loss in `items`, `{fn}` being
    the function's name."""
    @documents(entry_id)
    @pytest.mark.parametrize("fn, overrides, values", cases(*items))
    def test(fn, overrides, values):
        for impl in IMPLS:
            try:
                expect(entry_id, lambda: call(impl, fn, **overrides), fn=fn, **values)
            except BaseException as exc:  # name the implementation that failed
                exc.add_note(f"implementation: {impl}")
                raise
    return test


ALL, CKD, KD, BICKD = FUNCTIONS, ("ckd_loss",), ("kd_loss",), ("bickd_loss",)
TEMPERATURE = ("kd_loss", "bickd_loss")
TAU = ("ckd_loss", "bickd_loss")
META = "meta"  # a second device everywhere: the checks compare devices, they need not run on them

# ---- TypeError
test_tensor_type = public_test(
    "E-tensor-type",
    (ALL, dict(student=[[1.0, 2.0, 3.0]]), dict(name="student", type="list")),
    (ALL, dict(teacher=3.0), dict(name="teacher", type="float")))
test_tensor_dtype = public_test(
    "E-tensor-dtype",
    (ALL, dict(student=torch.ones(4, 3, dtype=torch.int64)), dict(name="student", dtype="torch.int64")),
    (ALL, dict(teacher=torch.ones(4, 3, dtype=torch.bool)), dict(name="teacher", dtype="torch.bool")),
    (CKD, dict(student=torch.ones(4, 3, dtype=torch.complex64)), dict(name="student", dtype="torch.complex64")),
    (ALL, dict(student=torch.ones(4, 3).to(torch.float8_e4m3fn)), dict(name="student", dtype="torch.float8_e4m3fn")),
    (ALL, dict(teacher=torch.ones(4, 3).to(torch.float8_e5m2)), dict(name="teacher", dtype="torch.float8_e5m2")))
test_mask_type = public_test(
    "E-mask-type",
    (ALL, dict(mask=[True] * 4), dict(type="list")))
test_mask_dtype = public_test(
    "E-mask-dtype",
    (ALL, dict(mask=torch.ones(4, dtype=torch.int64)), dict(dtype="torch.int64")),
    (KD, dict(mask=torch.ones(4)), dict(dtype="torch.float32")))
test_number_type = public_test(
    "E-number-type",
    (TAU, dict(tau="1"), dict(name="tau", type="str")),
    (TEMPERATURE, dict(temperature=True), dict(name="temperature", type="bool")),
    (CKD, dict(tau=torch.tensor(1.0)), dict(name="tau", type="Tensor")),
    (BICKD, dict(w_sample=None), dict(name="w_sample", type="NoneType")),
    (BICKD, dict(w_class=False), dict(name="w_class", type="bool")),
    (KD, dict(divergence="jsd", beta="0.5"), dict(name="beta", type="str")),
    (KD, dict(divergence="skew_kl", alpha=True), dict(name="alpha", type="bool")))
test_scale_t2_type = public_test(
    "E-scale-t2-type",
    (KD, dict(scale_t2=1), dict(type="int")),
    (KD, dict(scale_t2=None), dict(type="NoneType")))
test_symmetric_type = public_test(
    "E-symmetric-type",
    (BICKD, dict(symmetric=1), dict(type="int")),
    (BICKD, dict(symmetric="yes"), dict(type="str")))

# ---- ValueError
test_student_0d = public_test(
    "E-student-0d",
    (ALL, dict(student=torch.tensor(1.0), teacher=torch.tensor(1.0)), {}))
test_shape = public_test(
    "E-shape",
    (ALL, dict(teacher=torch.randn(4, 4)), dict(student_shape="(4, 3)", teacher_shape="(4, 4)")),
    (KD, dict(teacher=torch.randn(1, 4, 3)), dict(student_shape="(4, 3)", teacher_shape="(1, 4, 3)")))
test_no_classes = public_test(
    "E-no-classes",
    (ALL, dict(student=torch.randn(4, 0), teacher=torch.randn(4, 0)), dict(shape="(4, 0)")))
test_teacher_device = public_test(
    "E-teacher-device",
    (ALL, dict(teacher=torch.randn(4, 3, device=META)), dict(student_device="cpu", teacher_device="meta")))
test_mask_shape = public_test(
    "E-mask-shape",
    (ALL, dict(mask=torch.ones(3, dtype=torch.bool)), dict(lead_shape="(4,)", mask_shape="(3,)")),
    (ALL, dict(student=torch.randn(2, 3, 5), teacher=torch.randn(2, 3, 5), mask=torch.ones(6, dtype=torch.bool)),
     dict(lead_shape="(2, 3)", mask_shape="(6,)")),
    (CKD, dict(student=torch.randn(2, 3, 5), teacher=torch.randn(2, 3, 5), mask=torch.ones(3, 2, dtype=torch.bool)),
     dict(lead_shape="(2, 3)", mask_shape="(3, 2)")))
test_mask_device = public_test(
    "E-mask-device",
    (ALL, dict(mask=torch.ones(4, dtype=torch.bool, device=META)), dict(student_device="cpu", mask_device="meta")))
test_tau_range = public_test(
    "E-tau-range",
    *[(TAU, dict(tau=v), dict(value=repr(v))) for v in (0.0, -1.0, 0, float("inf"), float("nan"), 1e-40, 1e20)])
test_temperature_range = public_test(
    "E-temperature-range",
    *[(TEMPERATURE, dict(temperature=v), dict(value=repr(v))) for v in (0, -4.0, float("-inf"), 2e19, 10 ** 400)])
test_weight_range = public_test(
    "E-weight-range",
    (BICKD, dict(w_sample=-0.5), dict(name="w_sample", value="-0.5")),
    (BICKD, dict(w_class=float("nan")), dict(name="w_class", value="nan")),
    (BICKD, dict(w_class=1e39), dict(name="w_class", value="1e+39")))
test_weights_zero = public_test(
    "E-weights-zero",
    (BICKD, dict(w_sample=0.0, w_class=0), {}))
test_reduction = public_test(
    "E-reduction",
    (ALL, dict(reduction="avg"), dict(value="'avg'")),
    (ALL, dict(reduction="Mean"), dict(value="'Mean'")),
    (KD, dict(reduction=None), dict(value="None")))
test_anchor = public_test(
    "E-anchor",
    (CKD, dict(anchor="both"), dict(value="'both'")),
    (CKD, dict(anchor=None), dict(value="None")))
test_divergence = public_test(
    "E-divergence",
    (KD, dict(divergence="kl"), dict(value="'kl'")),
    (KD, dict(divergence="JSD"), dict(value="'JSD'")),
    (KD, dict(divergence=None), dict(value="None")))
test_divergence_parameter = public_test(
    "E-divergence-parameter",
    (KD, dict(beta=0.5), dict(name="beta", owner="'jsd'", value="0.5", divergence="'forward_kl'")),
    (KD, dict(divergence="jsd", alpha=0.1), dict(name="alpha", owner="'skew_kl'", value="0.1", divergence="'jsd'")))
test_divergence_parameter_range = public_test(
    "E-divergence-parameter-range",
    *[(KD, dict(divergence="jsd", beta=v), dict(name="beta", value=repr(v))) for v in (0.0, 1, 1.5, float("nan"))],
    (KD, dict(divergence="skew_kl", alpha=-0.1), dict(name="alpha", value="-0.1")))
test_global_batch = public_test(
    "E-global-batch",
    (ALL, dict(global_batch="gather"), dict(value="'gather'")),
    (ALL, dict(global_batch=1), dict(value="1")),
    (CKD, dict(global_batch=None), dict(value="None")))
test_group_type = public_test(
    "E-group-type",
    (ALL, dict(group=[0, 1]), dict(type="list")),
    (BICKD, dict(global_batch=True, group=0), dict(type="int")))
# The test process never initialises torch.distributed (tests/test_distributed.py does so in spawned ranks).
test_no_process_group = public_test(
    "E-no-process-group",
    (ALL, dict(global_batch=True), dict(value="True")),
    (TAU, dict(global_batch="ring"), dict(value="'ring'")))


# ---- the fused-linear losses' own arguments
FL_CKD, FL_KD = ("fused_linear_ckd_loss",), ("fused_linear_kd_loss",)
FL_ALL = FL_CKD + FL_KD
FL_MODULES = {"fused_linear_ckd_loss": ckd_ext.FusedLinearCKDLoss, "fused_linear_kd_loss": ckd_ext.FusedLinearKDLoss}
FL_POSITIONAL = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
FL_HYPERPARAMETERS = ("tau", "anchor", "temperature", "divergence", "beta", "alpha", "scale_t2", "ce_weight",
                      "ignore_index", "reduction", "global_batch", "vocab_parallel_group")


def fl_inputs():
    """Valid inputs of a fused-linear loss: 4 tokens, V = 5, H_s = 3, H_t = 2."""
    g = torch.Generator().manual_seed(1)
    return dict(student_hidden=torch.randn(4, 3, generator=g), student_weight=torch.randn(5, 3, generator=g),
                teacher_hidden=torch.randn(4, 2, generator=g), teacher_weight=torch.randn(5, 2, generator=g))


def fl_call(impl: str, fn: str, **overrides):
    """`fn` through the function or its module (hyperparameters at construction)."""
    args = dict(fl_inputs(), **overrides)
    positional = [args.pop(k) for k in FL_POSITIONAL]
    if impl == "module":
        hyper = {k: args.pop(k) for k in FL_HYPERPARAMETERS if k in args}
        return FL_MODULES[fn](**hyper)(*positional, **args)
    return getattr(ckd_ext, fn)(*positional, **args)


def fused_linear_test(entry_id, *items):
    """A test of `entry_id` raised by the function and the module of every fused-linear loss in `items`."""
    @documents(entry_id)
    @pytest.mark.parametrize("fn, overrides, values", cases(*items))
    def test(fn, overrides, values):
        for impl in ("fused", "module"):
            try:
                expect(entry_id, lambda: fl_call(impl, fn, **overrides), fn=fn, **values)
            except BaseException as exc:
                exc.add_note(f"implementation: {impl}")
                raise
    return test


test_fl_hidden_0d = fused_linear_test(
    "E-fl-hidden-0d",
    (FL_ALL, dict(student_hidden=torch.tensor(1.0)), dict(name="student_hidden")),
    (FL_CKD, dict(teacher_hidden=torch.tensor(1.0)), dict(name="teacher_hidden")))
test_fl_hidden_size = fused_linear_test(
    "E-fl-hidden-size",
    (FL_ALL, dict(student_hidden=torch.randn(4, 0), student_weight=torch.randn(5, 0)),
     dict(name="student_hidden", shape="(4, 0)")),
    (FL_KD, dict(teacher_hidden=torch.randn(2, 2, 0), teacher_weight=torch.randn(5, 0)),
     dict(name="teacher_hidden", shape="(2, 2, 0)")))
test_fl_weight_shape = fused_linear_test(
    "E-fl-weight-shape",
    (FL_ALL, dict(student_weight=torch.randn(3, 5)), dict(name="student_weight", width="3", hidden="student_hidden",
                                                         shape="(3, 5)")),
    (FL_KD, dict(teacher_weight=torch.randn(5)), dict(name="teacher_weight", width="2", hidden="teacher_hidden",
                                                      shape="(5,)")))
test_fl_no_vocab = fused_linear_test(
    "E-fl-no-vocab",
    (FL_ALL, dict(student_weight=torch.randn(0, 3), teacher_weight=torch.randn(0, 2)), dict(shape="(0, 3)")))
test_fl_vocab = fused_linear_test(
    "E-fl-vocab",
    (FL_ALL, dict(teacher_weight=torch.randn(6, 2)), dict(vocab="5", shape="(6, 2)")))
test_fl_bias_shape = fused_linear_test(
    "E-fl-bias-shape",
    (FL_ALL, dict(student_bias=torch.randn(5, 1)), dict(name="student_bias", vocab="5", shape="(5, 1)")),
    (FL_CKD, dict(teacher_bias=torch.randn(4)), dict(name="teacher_bias", vocab="5", shape="(4,)")))
test_fl_tokens = fused_linear_test(
    "E-fl-tokens",
    (FL_ALL, dict(teacher_hidden=torch.randn(2, 2, 2)), dict(lead_shape="(4,)", shape="(2, 2, 2)")))
test_fl_head_dtype = fused_linear_test(
    "E-fl-head-dtype",
    (FL_ALL, dict(student_weight=torch.randn(5, 3, dtype=torch.float64)),
     dict(name="student_weight", hidden="student_hidden", dtype="torch.float32", got="torch.float64")),
    (FL_KD, dict(teacher_bias=torch.randn(5).half()),
     dict(name="teacher_bias", hidden="teacher_hidden", dtype="torch.float32", got="torch.float16")))
test_fl_device = fused_linear_test(
    "E-fl-device",
    (FL_ALL, dict(teacher_hidden=torch.randn(4, 2, device=META)), dict(name="teacher_hidden", device="cpu",
                                                                       got="meta")),
    (FL_KD, dict(labels=torch.zeros(4, dtype=torch.int64, device=META)), dict(name="labels", device="cpu",
                                                                              got="meta")))
test_labels_type = fused_linear_test(
    "E-labels-type",
    (FL_KD, dict(labels=[0, 1, 2, 3]), dict(got="list")),
    (FL_KD, dict(labels=torch.zeros(4)), dict(got="dtype torch.float32")))
test_labels_shape = fused_linear_test(
    "E-labels-shape",
    (FL_KD, dict(labels=torch.zeros(2, 2, dtype=torch.int64)), dict(lead_shape="(4,)", shape="(2, 2)")))
test_labels_range = fused_linear_test(
    "E-labels-range",
    (FL_KD, dict(labels=torch.tensor([0, -1, 2, 3])),
     dict(vocab="5", ignore_index="-100", label="-1", position="1")),
    (FL_KD, dict(labels=torch.tensor([0, 1, 5, 7]), ce_weight=0.5, ignore_index=7),
     dict(vocab="5", ignore_index="7", label="5", position="2")),
    (FL_KD, dict(labels=torch.tensor([9, 1, 2, 1 << 40]), mask=torch.tensor([False, True, True, True])),
     dict(vocab="5", ignore_index="-100", label=str(1 << 40), position="3")))


@documents("E-global-batch-mismatch")
@pytest.mark.parametrize("why", [None, "the vocabulary shards compute one loss"])
@pytest.mark.parametrize("field, values_by_rank, values", [
    (0, ["True", "ring", "True"], "True on ranks 0, 2; 'ring' on rank 1"),
    (1, [torch.float32, torch.float64], "torch.float32 on rank 0; torch.float64 on rank 1"),
    (2, [7, 8], "7 on rank 0; 8 on rank 1"),
    (3, [0.5, 2.0], "0.5 on rank 0; 2.0 on rank 1")])
def test_global_batch_mismatch(field, values_by_rank, values, why):
    """The check every rank runs on the gathered signatures (its message), with a global batch and with vocabulary
    shards (`why`); tests/test_distributed.py and tests/test_sharded_heads.py raise it on real ranks."""
    fields = (("global_batch", "True"), ("student's dtype", torch.float32), ("the number of classes C", 7),
              ("tau", 0.5))
    signature = distributed.Signature("ckd_loss", fields, *([why] if why else []))
    encoded = [distributed._encode(v) for v in ["ckd_loss"] + [v for _, v in fields]]
    table = []
    for rank, value in enumerate(values_by_rank):
        row = [4 + rank] + encoded  # row counts may differ
        row[2 + field] = distributed._encode(value)
        table.append(row)
    expect("E-global-batch-mismatch", lambda: distributed._check_signatures(signature, table), fn="ckd_loss",
           name=fields[field][0], values=values)
    distributed._check_signatures(signature, [[4 + rank] + encoded for rank in range(3)])


@documents("E-rank-rejected-arguments")
@pytest.mark.parametrize("rejected, ranks, whose", [([-1, 4, 5], "rank 0", "its"),
                                                    ([4, -1, -1], "ranks 1, 2", "their")])
def test_rank_rejected_arguments(rejected, ranks, whose, monkeypatch):
    """What the waiting ranks raise when others sent REJECTED as their row count (gather_layout on a stand-in
    all-gather); tests/test_distributed.py raises it on real ranks."""
    table = torch.tensor([[count] + [0] * (distributed.SIGNATURE_SLOTS - 1) for count in rejected])
    monkeypatch.setattr(distributed, "_all_gather", lambda tensor, group: table)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None: 0)
    signature = distributed.Signature("ckd_loss", (("tau", 0.5),))
    expect("E-rank-rejected-arguments", lambda: distributed.gather_layout(4, "cpu", None, signature), fn="ckd_loss",
           ranks=ranks, whose=whose)


# A process group object without torch.distributed initialised: enough for the argument checks, which run first.
LONE_GROUP = torch.distributed.ProcessGroup(torch.distributed.HashStore(), 0, 1)
test_vocab_parallel_group_type = fused_linear_test(
    "E-vocab-parallel-group-type",
    (FL_ALL, dict(vocab_parallel_group=[0, 1]), dict(type="list")),
    (FL_KD, dict(vocab_parallel_group=True), dict(type="bool")))
test_vocab_parallel_global_batch = fused_linear_test(
    "E-vocab-parallel-global-batch",
    (FL_ALL, dict(vocab_parallel_group=LONE_GROUP, global_batch=True), dict(value="True")),
    (FL_CKD, dict(vocab_parallel_group=LONE_GROUP, global_batch="ring"), dict(value="'ring'")))


@contextlib.contextmanager
def fake_process_group():
    """torch's fake backend (collectives do nothing) for the DTensor a check needs, torn down after: the rest of this
    file runs without an initialised torch.distributed."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@documents("E-vocab-parallel-dtensor")
@pytest.mark.parametrize("fn", FL_ALL)
@pytest.mark.parametrize("head", ["student_weight", "teacher_bias"])
def test_vocab_parallel_dtensor(fn, head):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    with fake_process_group():
        group = torch.distributed.group.WORLD
        inputs = dict(fl_inputs(), teacher_bias=torch.randn(5))
        inputs[head] = distribute_tensor(inputs[head], init_device_mesh("cpu", (2,)), [Shard(0)])
        for impl in ("fused", "module"):
            expect("E-vocab-parallel-dtensor", lambda: fl_call(impl, fn, vocab_parallel_group=group, **inputs), fn=fn)


test_vocab_parallel_divergence = fused_linear_test(
    "E-vocab-parallel-divergence",
    *[(FL_KD, dict(vocab_parallel_group=LONE_GROUP, divergence=d),
       dict(choices="'forward_kl'", value=repr(d))) for d in ("reverse_kl", "jsd", "tvd")],
    (FL_KD, dict(vocab_parallel_group=LONE_GROUP, scale_t2=False), dict(value="False")))


def teacher_gram_inputs(bias=False):
    """fl_inputs() with a teacher bias (if asked) and a TeacherGram made from that teacher head."""
    inputs = fl_inputs()
    if bias:
        inputs["teacher_bias"] = torch.randn(5)
    inputs["teacher_gram"] = ckd_ext.fused_linear_teacher_gram(inputs["teacher_weight"], inputs.get("teacher_bias"))
    return inputs


@documents("E-teacher-gram-type")
def test_teacher_gram_type():
    inputs = teacher_gram_inputs()
    for impl in ("fused", "module"):
        expect("E-teacher-gram-type", lambda: fl_call(impl, FL_CKD[0], **dict(
            inputs, teacher_gram=inputs["teacher_gram"].gram)), fn=FL_CKD[0], type="Tensor")


@documents("E-teacher-gram")
def test_teacher_gram():
    fn = FL_CKD[0]
    for impl in ("fused", "module"):
        inputs = teacher_gram_inputs(bias=True)
        expect("E-teacher-gram", lambda: fl_call(impl, fn, vocab_parallel_group=LONE_GROUP, **inputs), form=0, fn=fn)
        for other in (dict(teacher_weight=inputs["teacher_weight"].clone()), dict(teacher_bias=None)):
            expect("E-teacher-gram", lambda: fl_call(impl, fn, **dict(inputs, **other)), form=1, fn=fn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expect("E-teacher-gram", lambda: fl_call(impl, fn, **inputs), form=3, fn=fn, made="torch.float32",
                   now="torch.bfloat16")
        inputs["teacher_bias"].add_(1.0)
        expect("E-teacher-gram", lambda: fl_call(impl, fn, **inputs), form=2, fn=fn, made="(0, 0)", now="(0, 1)")


@documents("E-teacher-gram-head")
def test_teacher_gram_head():
    weight = torch.randn(5, 2)
    expect("E-teacher-gram-head", lambda: ckd_ext.fused_linear_teacher_gram(weight[0]), form=0, shape="(2,)")
    expect("E-teacher-gram-head", lambda: ckd_ext.fused_linear_teacher_gram(torch.randn(0, 2)), form=0,
           shape="(0, 2)")
    expect("E-teacher-gram-head", lambda: ckd_ext.fused_linear_teacher_gram(weight, torch.randn(4)), form=1,
           vocab="5", dtype="torch.float32", shape="(4,)", got="torch.float32")
    expect("E-teacher-gram-head", lambda: ckd_ext.fused_linear_teacher_gram(weight, torch.randn(5).double()),
           form=1, shape="(5,)", got="torch.float64")


test_ce_weight_range = fused_linear_test(
    "E-ce-weight-range",
    *[(FL_KD, dict(ce_weight=v, labels=torch.zeros(4, dtype=torch.int64)), dict(value=repr(v)))
      for v in (-1.0, float("nan"), float("inf"))])
test_ce_weight_labels = fused_linear_test(
    "E-ce-weight-labels",
    (FL_KD, dict(ce_weight=0.5), dict(value="0.5")))
test_ignore_index_type = fused_linear_test(
    "E-ignore-index-type",
    (FL_KD, dict(ignore_index=-1.0), dict(type="float")),
    (FL_KD, dict(ignore_index=True), dict(type="bool")))


@documents("E-workspace-type")
@pytest.mark.parametrize("value, error, form", [
    ([1], TypeError, 1), (2 ** 70, TypeError, 0), ("abc", ValueError, None), (float("nan"), ValueError, None),
    (float("inf"), OverflowError, None)])
@pytest.mark.usefixtures("workspace")  # restores the budget these calls set
def test_workspace_type(value, error, form):
    with pytest.raises(error) as info:
        ckd_ext.set_workspace_bytes(value)
    if form is not None:  # int()'s ValueError / OverflowError are Python's messages, not documented verbatim
        assert error is ENTRIES["E-workspace-type"].raises
        check("E-workspace-type", str(info.value).split("\n")[0], form)
    ckd_ext.set_workspace_bytes("4096")  # documented: int() first, so a numeric string is accepted
    assert ckd_ext.workspace_bytes() == 4096


@documents("E-workspace-size")
@pytest.mark.parametrize("value, shown", [(0, "0"), (-5, "-5"), (0.5, "0")])
@pytest.mark.usefixtures("workspace")
def test_workspace_size(value, shown):
    expect("E-workspace-size", lambda: ckd_ext.set_workspace_bytes(value), nbytes=shown)


@documents("E-cpu-isa")
def test_cpu_isa():
    allowed = ", ".join(ckd_ext.available_cpu_isas())
    previous = ckd_ext.cpu_isa()
    expect("E-cpu-isa", lambda: ckd_ext.set_cpu_isa("sse9"), form=0, name="sse9", allowed=allowed)
    unsupported = [isa for isa in ("avx2", "avx512") if isa not in ckd_ext.available_cpu_isas()]
    for isa in unsupported:  # none on a CPU with AVX-512; only the unknown form can be raised there
        expect("E-cpu-isa", lambda: ckd_ext.set_cpu_isa(isa), form=1, name=isa, allowed=allowed)
    assert ckd_ext.cpu_isa() == previous


@documents("E-fl-head-freed")
@pytest.mark.parametrize("fn", FL_ALL)
@pytest.mark.parametrize("free", ["data", "storage"])
def test_fl_head_freed(fn, free):
    """A head freed after a reduction="none" forward (ZeRO-3's gather context exiting) and before its backward."""
    inputs = fl_inputs()
    weight = torch.nn.Parameter(inputs.pop("student_weight"))
    loss = getattr(ckd_ext, fn)(inputs["student_hidden"], weight, inputs["teacher_hidden"], inputs["teacher_weight"],
                                reduction="none")
    if free == "data":
        weight.data = torch.empty(0)
    else:
        weight.untyped_storage().resize_(0)
    expect("E-fl-head-freed", lambda: loss.sum().backward(), fn=fn, name="student_weight",
           shape="(0,)" if free == "data" else "(5, 3)", nbytes="0")


@documents("E-double-backward")
@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward(fn, reduction):
    def first_grad(module):
        student = S.clone().requires_grad_()
        out = getattr(module, fn)(student, T, reduction=reduction)
        total = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
        (grad,) = torch.autograd.grad(total, student, create_graph=True)
        return student, grad

    _, grad = first_grad(ckd_ext)
    expect("E-double-backward", lambda: grad.pow(2).sum().backward())
    # Documented caveat: a second derivative taken only with respect to the student does not reach the mark.
    student, grad = first_grad(ckd_ext)
    with pytest.raises(RuntimeError, match="appears to not have been used in the graph"):
        torch.autograd.grad(grad.pow(2).sum(), student)
    student, grad = first_grad(ckd_ext)
    assert torch.autograd.grad(grad.pow(2).sum(), student, allow_unused=True) == (None,)
    # The reference differentiates twice.
    student, grad = first_grad(reference)
    grad.pow(2).sum().backward()
    assert student.grad is not None


# ---- the extension missing, stale or broken: decided at import, so run in a subprocess (the tests that read
# it are at the end of this file, so that it runs alongside all the others)

SCENARIO_SCRIPT = r"""
# Imports ckd_ext afresh in each scenario (all but the compiled modules purged in between) and records what the
# public API does. ckd_ext._C is loaded for the first time by "emulated-missing" (which, like "no-emulated", then
# works without the emulated backend); the Python registrations happen once per process.
import importlib.abc, json, os, sys, types, warnings
import torch

SCENARIOS = ("not-built", "load-failed", "torch-mismatch", "emulated-missing", "no-emulated", "workspace-env",
             "cpu-isa-env")
TORCH_VERSION = torch.__version__


class Missing(importlib.abc.MetaPathFinder):
    # Makes one module unimportable, as if its file were not there.
    def __init__(self, name):
        self.name = name

    def find_spec(self, name, path=None, target=None):
        if name == self.name:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def scenario(name):
    for module in [m for m in sys.modules if m == "ckd_ext" or m.startswith("ckd_ext.")]:
        if module not in ("ckd_ext._C", "ckd_ext._emulated"):
            del sys.modules[module]
    finders = {"not-built": "ckd_ext._build_info", "load-failed": "ckd_ext._C", "emulated-missing": "ckd_ext._emulated"}
    blocker = Missing(finders[name]) if name in finders else None
    if blocker:
        sys.meta_path.insert(0, blocker)
    torch.__version__ = "0.0.1-not-the-build-torch" if name == "torch-mismatch" else TORCH_VERSION
    if name == "workspace-env":
        os.environ["CKD_EXT_WORKSPACE_MB"] = "abc"
    if name == "cpu-isa-env":
        os.environ["CKD_EXT_CPU_ISA"] = "sse9"
    if name in ("no-emulated", "emulated-missing"):  # either kind of build: a build without / with the emulator
        info = types.ModuleType("ckd_ext._build_info")
        info.TORCH_VERSION, info.WITH_EMULATED = TORCH_VERSION, name == "emulated-missing"
        sys.modules["ckd_ext._build_info"] = info
    out = {"calls": {}}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                import ckd_ext, ckd_ext.testing
            except Exception as exc:
                out["import"] = [type(exc).__name__, str(exc)]
                return out
        out["warnings"] = [[w.category.__name__, str(w.message)] for w in caught if "ckd_ext" in str(w.message)]
    finally:
        if blocker:
            sys.meta_path.remove(blocker)
        torch.__version__ = TORCH_VERSION
        os.environ.pop("CKD_EXT_WORKSPACE_MB", None)
        os.environ.pop("CKD_EXT_CPU_ISA", None)

    def record(call, fn):
        try:
            fn()
            out["calls"][call] = None
        except Exception as exc:
            out["calls"][call] = [type(exc).__name__, str(exc)]

    s = torch.randn(4, 3)
    for fn in ("ckd_loss", "kd_loss", "bickd_loss"):
        record(fn, lambda: getattr(ckd_ext, fn)(s, s))
        record("reference." + fn, lambda: getattr(ckd_ext.reference, fn)(s, s))
    record("CKDLoss", lambda: ckd_ext.CKDLoss()(s, s))
    record("KDLoss", lambda: ckd_ext.KDLoss()(s, s))
    record("BicKDLoss", lambda: ckd_ext.BicKDLoss()(s, s))
    record("workspace_bytes", lambda: ckd_ext.workspace_bytes())
    record("set_workspace_bytes", lambda: ckd_ext.set_workspace_bytes(64 << 20))
    record("testing.emulated_cuda", lambda: ckd_ext.testing.emulated_cuda().__enter__())
    record("bad tau", lambda: ckd_ext.ckd_loss(s, s, tau=0))
    if ckd_ext.is_available():
        record("_C.set_emulated_cuda", lambda: ckd_ext._extension.require_extension().set_emulated_cuda(True))
    if name == "cpu-isa-env":
        out["available_cpu_isas"] = importlib.import_module("ckd_ext._C").available_cpu_isas()
    out["is_available"] = ckd_ext.is_available()
    out["reason"] = ckd_ext._extension.unavailable_reason()
    return out


print(json.dumps({name: scenario(name) for name in SCENARIOS}))
"""
UNAVAILABLE_CALLS = ("ckd_loss", "kd_loss", "bickd_loss", "CKDLoss", "KDLoss", "BicKDLoss", "workspace_bytes",
                     "set_workspace_bytes", "testing.emulated_cuda")


class _Scenarios:
    """The subprocess running SCENARIO_SCRIPT, started with the first test of this file (it mostly imports torch,
    which then overlaps with the other tests) and waited for by the tests that read it."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SCENARIO_SCRIPT], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._results = None

    def __getitem__(self, name):
        if self._results is None:
            stdout, stderr = self.proc.communicate(timeout=120)
            assert self.proc.returncode == 0, stdout + stderr
            self._results = json.loads(stdout.strip().splitlines()[-1])
        return self._results[name]


@pytest.fixture(scope="module", autouse=True)
def extension_scenarios():
    scenarios = _Scenarios()
    yield scenarios
    if scenarios.proc.poll() is None:
        scenarios.proc.kill()
        scenarios.proc.communicate()


def error_of(result, call_name, error_type):
    outcome = result["calls"][call_name]
    assert outcome is not None, f"{call_name} did not raise"
    assert outcome[0] == error_type.__name__, outcome
    return outcome[1]


def check_unavailable(entry_id, result, **values):
    """Every call that needs the extension raises the same documented error; the rest still works."""
    assert result.get("import") is None and result["is_available"] is False
    messages = {error_of(result, name, ENTRIES[entry_id].raises) for name in UNAVAILABLE_CALLS}
    assert messages == {result["reason"]}
    check(entry_id, result["reason"], **values)
    for fn in FUNCTIONS:
        assert result["calls"]["reference." + fn] is None  # the reference needs no extension
    # Argument checks come first: a bad argument is reported as such even without the extension.
    check("E-tau-range", error_of(result, "bad tau", ValueError), fn="ckd_loss", value="0")


def check_import_warning(result):
    """`import ckd_ext` warned once, with the error's text and where to look for what is built."""
    assert result["warnings"] == [["ExtensionUnavailableWarning",
                                   f"{result['reason']} `python -m ckd_ext.info` reports what is built."]]


class _Table(ctypes.Structure):  # csrc/backends/backends.h: EmulatedBackendTable
    _fields_ = [("abi", ctypes.c_int64), ("float_backend", ctypes.c_void_p), ("double_backend", ctypes.c_void_p)]


def _capsule(pointer: int, name: bytes):
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(pointer, name, None)


# --------------------------------------------------------------------------------------------------
# ckd-train
# --------------------------------------------------------------------------------------------------

def usage_error(argv, monkeypatch, capsys) -> str:
    """`ckd-train argv` exits with the documented status before training; returns the error message."""
    monkeypatch.setattr(classify, "fit", lambda *a, **k: pytest.fail("training started despite a usage error"))
    with pytest.raises(SystemExit) as info:
        classify.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "\nckd-train: error: " in err, err
    return err.split("\nckd-train: error: ", 1)[1].rstrip("\n")


def train_test(entry_id, *params):
    """A test of `entry_id` for each (argv, form, placeholder values); '--impl reference' is appended unless
    argv chooses --impl, so that the fused ops' availability does not matter."""
    @documents(entry_id)
    @pytest.mark.parametrize("argv, form, values", params, ids=[" ".join(argv) for argv, _, _ in params])
    def test(argv, form, values, monkeypatch, capsys, tmp_path):
        if "--impl" not in argv:
            argv = argv + ["--impl", "reference"]
        check(entry_id, usage_error(argv + ["--quiet", "--out", str(tmp_path / "out")], monkeypatch, capsys),
              form, **values)
    return test


test_train_usage = train_test(
    "T-usage",
    (["--lr", "0"], 0, dict(flag="--lr", what="a number > 0", value="0")),
    (["--ckd-tau", "nan"], 0, dict(flag="--ckd-tau", what="a number > 0", value="nan")),
    (["--kd-weight", "-1"], 0, dict(flag="--kd-weight", what="a weight >= 0", value="-1")),
    (["--epochs", "1.5"], 0, dict(flag="--epochs", what="an integer >= 1", value="'1.5'")),
    (["--workers", "-1"], 0, dict(flag="--workers", what="an integer >= 0", value="-1")),
    (["--impl", "eager"], 1, dict(flag="--impl", value="'eager'")),
    (["--seed", "x"], 2, dict(flag="--seed", value="'x'")),
    (["--bogus"], 3, dict(arguments="--bogus")))
test_train_methods = train_test(
    "T-methods",
    (["--methods", " , "], 0, {}),
    (["--methods", "ce,crd"], 1, dict(method="'crd'")),
    (["--methods", "kd+kd"], 1, dict(method="'kd+kd'")),
    (["--methods", "kd,kd"], 2, dict(value="'kd,kd'")))
test_train_sweep = train_test(
    "T-sweep",
    (["--ckd-tau", ","], 0, dict(flag="--ckd-tau", value="','")),
    (["--ckd-weight", "10,50,10"], 1, dict(flag="--ckd-weight", value="'10,50,10'")))
test_train_seeds = train_test(
    "T-seeds",
    (["--seeds", "0,x"], 0, dict(value="'0,x'")),
    (["--seeds", ","], 1, {}))


@documents("T-data-dir")
@pytest.mark.parametrize("case", ["no-data-dir", "missing-files", "not-cifar", "unreadable"])
def test_train_data_dir(case, monkeypatch, capsys, tmp_path):
    argv = {"no-data-dir": ["--dataset", "cifar100"], "not-cifar": ["--data-dir", str(tmp_path)]}.get(
        case, ["--dataset", "cifar100", "--data-dir", str(tmp_path)])
    values = {"missing-files": dict(path=str(tmp_path), missing=", ".join(
        f"cifar-100-python/{name}" for name in ("train", "test", "meta")))}.get(case, {})
    if case == "unreadable":  # the files are there, but are no CIFAR-100 pickles
        pytest.importorskip("torchvision", reason="reading CIFAR-100 needs the cifar extra (torchvision)")
        (tmp_path / "cifar-100-python").mkdir()
        for name in ("train", "test", "meta"):
            (tmp_path / "cifar-100-python" / name).write_bytes(b"not a pickle")
        values = dict(path=str(tmp_path))
    message = usage_error(argv + ["--impl", "reference", "--quiet", "--out", str(tmp_path / "out")],
                          monkeypatch, capsys)
    form = {"no-data-dir": 0, "missing-files": 1, "not-cifar": 2, "unreadable": 3}[case]
    check("T-data-dir", message, form, **values)


test_train_device = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")(train_test(
    "T-device",
    (["--device", "cuda"], 0, {})))


@documents("T-extra")
@pytest.mark.parametrize("module, argv", [("matplotlib", []), ("tqdm", []), ("sklearn", []),
                                          ("torchvision", ["--dataset", "cifar100", "--data-dir", "TMP"])])
def test_train_extra(module, argv, monkeypatch, capsys, tmp_path):
    for name in ("train", "test", "meta"):  # a complete CIFAR-100 copy, so that only the package is missing
        (tmp_path / "cifar-100-python").mkdir(exist_ok=True)
        (tmp_path / "cifar-100-python" / name).write_bytes(b"")
    real = classify.importlib.util.find_spec
    monkeypatch.setattr(classify.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    argv = [a.replace("TMP", str(tmp_path)) for a in argv] + ["--impl", "reference"]
    check("T-extra", usage_error(argv, monkeypatch, capsys), module=module,
          extra="cifar" if module == "torchvision" else "train")


@documents("T-teacher")
@pytest.mark.parametrize("case", ["missing", "with-save", "unreadable", "not-a-teacher"])
def test_train_teacher(case, monkeypatch, capsys, tmp_path):
    path = tmp_path / "teacher.pt"
    if case == "unreadable":
        path.write_bytes(b"not a checkpoint")
    elif case in ("with-save", "not-a-teacher"):
        torch.save(dict(arch="resnet8x4", state_dict={}), path)
    argv = ["--teacher", str(path), "--impl", "reference", "--quiet", "--out", str(tmp_path / "out")]
    if case == "with-save":
        argv += ["--save-teacher", str(tmp_path / "saved.pt")]
    # The teacher file is read after the data are loaded: a stub instead of the digits (sklearn, ~1 s).
    monkeypatch.setattr(classify, "load_data", lambda *a, **k: (lambda seed: [], [], "no data"))
    message = usage_error(argv, monkeypatch, capsys)
    form = {"missing": 0, "with-save": 1, "unreadable": 2, "not-a-teacher": 3}[case]
    values = {} if case == "with-save" else dict(path=str(path))
    if case == "not-a-teacher":
        values["arch"] = "'digits_teacher'"
    check("T-teacher", message, form, **values)


@documents("T-ddp")
@pytest.mark.parametrize("case", ["negatives-without-ddp", "ddp-without-torchrun"])
def test_train_ddp(case, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--global-negatives", "ring"] if case == "negatives-without-ddp" else ["--ddp"]
    values = dict(mode="ring") if case == "negatives-without-ddp" else {}
    check("T-ddp", usage_error(argv + ["--impl", "reference"], monkeypatch, capsys),
          form=0 if case == "negatives-without-ddp" else 1, **values)


@documents("T-impl")
def test_train_impl(monkeypatch, capsys, tmp_path):
    # The fused ops unavailable, for the reason E-not-built gives.
    reason = ENTRIES["E-not-built"].messages[0]
    monkeypatch.setattr(_extension, "_error", reason)
    monkeypatch.setattr(classify, "load_data", lambda *a, **k: pytest.fail("data loaded without the fused ops"))
    message = usage_error(["--impl", "fused", "--quiet", "--out", str(tmp_path)], monkeypatch, capsys)
    check("T-impl", message, reason=reason)


# --------------------------------------------------------------------------------------------------
# Raw ops
# --------------------------------------------------------------------------------------------------

OPS = ("ckd_forward", "ckd_backward", "kd_forward", "kd_backward", "bickd_forward", "bickd_backward")


def raw(op, student=S, teacher=T, mask=None, grad=None, grad_class=None, tau=1.0, temperature=4.0, anchor="student",
        w_sample=1.0, w_class=1.0, divergence="forward_kl", beta=0.0, alpha=0.0, reduction="mean"):
    """Calls torch.ops.ckd_ext.<op> with valid defaults for everything not given."""
    fn = getattr(torch.ops.ckd_ext, op)
    if grad is None:
        grad = torch.ones(()) if reduction != "none" else torch.ones(student.shape[0] if student.dim() else 1)
    if grad_class is None:
        grad_class = torch.ones(student.shape[-1] if student.dim() else 1)
    if op == "ckd_forward":
        return fn(student, teacher, mask, tau, anchor, reduction, False)
    if op == "ckd_backward":
        return fn(grad, student, teacher, mask, tau, anchor, reduction)
    if op == "kd_forward":
        return fn(student, teacher, mask, temperature, divergence, beta, alpha, True, reduction, False)
    if op == "kd_backward":
        return fn(grad, student, teacher, mask, temperature, divergence, beta, alpha, True, reduction)
    if op == "bickd_forward":
        return fn(student, teacher, mask, temperature, tau, w_sample, w_class, False, reduction, False)
    return fn(grad, grad_class, student, teacher, mask, temperature, tau, w_sample, w_class, False, reduction)


def raw_test(entry_id, *items, needs_cuda=False):
    """A test of `entry_id` for each (ops, overrides, placeholder values); `{op}` is the op's name."""
    params = []
    for ops, overrides, values in items:
        for op in ops:
            label = ",".join(f"{k}={v!r}"[:20] for k, v in overrides.items())
            params.append(pytest.param(op, overrides, values, id=f"{op}-{label}"))

    @documents(entry_id)
    @pytest.mark.parametrize("op, overrides, values", params)
    def test(op, overrides, values):
        if needs_cuda and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (a second device the kernels run on)")
        overrides = {k: v() if callable(v) else v for k, v in overrides.items()}
        values = {k: v.replace("OP", op) for k, v in values.items()}
        expect(entry_id, lambda: raw(op, **overrides), **values)
    return test


TAU_OPS = ("ckd_forward", "ckd_backward", "bickd_forward", "bickd_backward")
TEMPERATURE_OPS = ("kd_forward", "kd_backward", "bickd_forward", "bickd_backward")
BICKD_OPS = ("bickd_forward", "bickd_backward")

test_raw_shape = raw_test(
    "R-shape",
    (OPS, dict(teacher=torch.randn(4, 4)), dict(op="OP", student_sizes="[4, 3]", teacher_sizes="[4, 4]")),
    (("kd_forward",), dict(student=torch.randn(2, 2, 3), teacher=torch.randn(2, 2, 3)),
     dict(student_sizes="[2, 2, 3]", teacher_sizes="[2, 2, 3]")),
    (("ckd_forward",), dict(student=torch.randn(3), teacher=torch.randn(3)),
     dict(student_sizes="[3]", teacher_sizes="[3]")))
test_raw_no_classes = raw_test(
    "R-no-classes",
    (OPS, dict(student=torch.randn(4, 0), teacher=torch.randn(4, 0)), dict(op="OP")))
test_raw_dtype = raw_test(
    "R-dtype",
    (OPS, dict(student=S.long()), dict(dtype="Long")),
    (("kd_forward",), dict(teacher=T.int()), dict(dtype="Int")),
    (("ckd_forward",), dict(student=S.to(torch.complex64), teacher=T.to(torch.complex64)), dict(dtype="ComplexFloat")),
    (("bickd_forward",), dict(student=S.to(torch.float8_e4m3fn)), dict(dtype="Float8_e4m3fn")))
test_raw_device = raw_test(
    "R-device",
    (OPS, dict(student=lambda: S.cuda()), dict(op="OP", student_device="cuda:0", teacher_device="cpu")),
    needs_cuda=True)
test_raw_mask = raw_test(
    "R-mask",
    (OPS, dict(mask=torch.ones(4)), dict(op="OP", rows="4", dtype="Float", sizes="[4]")),
    (("kd_forward",), dict(mask=torch.ones(4, 1, dtype=torch.bool)), dict(rows="4", dtype="Bool", sizes="[4, 1]")),
    (("ckd_forward",), dict(mask=torch.ones(3, dtype=torch.bool)), dict(rows="4", dtype="Bool", sizes="[3]")))
test_raw_mask_device = raw_test(
    "R-mask-device",
    (OPS, dict(student=lambda: S.cuda(), teacher=lambda: T.cuda(), grad=lambda: torch.ones((), device="cuda"),
               grad_class=lambda: torch.ones(3, device="cuda"), mask=torch.ones(4, dtype=torch.bool)),
     dict(op="OP")),
    needs_cuda=True)
test_raw_reduction = raw_test(
    "R-reduction",
    (OPS, dict(reduction="avg"), dict(value="avg")))
test_raw_anchor = raw_test(
    "R-anchor",
    (("ckd_forward", "ckd_backward"), dict(anchor="both"), dict(value="both")))
test_raw_divergence = raw_test(
    "R-divergence",
    (("kd_forward", "kd_backward"), dict(divergence="kl"), dict(value="kl")))
test_raw_divergence_parameter = raw_test(
    "R-divergence-parameter",
    (("kd_forward", "kd_backward"), dict(divergence="jsd", beta=1.0), dict(name="beta", value="1")),
    (("kd_forward",), dict(divergence="skew_kl", alpha=0.0), dict(name="alpha", value="0")))
test_raw_positive = raw_test(
    "R-positive",
    (TAU_OPS, dict(tau=0.0), dict(name="tau", value="0")),
    (("ckd_forward",), dict(tau=float("nan")), dict(name="tau", value="nan")),
    (TEMPERATURE_OPS, dict(temperature=float("inf")), dict(name="temperature", value="inf")),
    (("kd_forward",), dict(temperature=1e20), dict(name="temperature", value="1e+20")))
test_raw_weights = raw_test(
    "R-weights",
    (BICKD_OPS, dict(w_sample=0.0, w_class=0.0), dict(w_sample="0", w_class="0")),
    (BICKD_OPS, dict(w_sample=-1.0), dict(w_sample="-1", w_class="1")),
    (("bickd_forward",), dict(w_class=float("inf")), dict(w_sample="1", w_class="inf")))
test_raw_upstream = raw_test(
    "R-upstream",
    (("ckd_backward", "kd_backward", "bickd_backward"), dict(grad=torch.ones(2)), dict(sizes="[2]")),
    (("kd_backward",), dict(grad=torch.ones(2), mask=torch.zeros(4, dtype=torch.bool)), dict(sizes="[2]")),
    (("ckd_backward", "kd_backward", "bickd_backward"), dict(grad=torch.ones(3), reduction="none"),
     dict(count="4", numel="3")),
    (("bickd_backward",), dict(grad_class=torch.ones(2), reduction="none"), dict(count="3", numel="2")))


@documents("R-no-kernels")
def test_raw_no_kernels():
    # Unreachable: the dispatcher sends only CPU and CUDA tensors to the kernels (meta ones to the fake), so the
    # guard's message is checked against its source instead.
    for op in OPS:
        dump = torch._C._dispatch_dump(f"ckd_ext::{op}")
        keys = set(re.findall(r"^(\S+): registered at .* :: ", dump, re.M))
        assert {"CPU", "Meta"} <= keys <= {"CPU", "CUDA", "Meta", "Autograd[alias]"}, (op, keys)
    source = (ROOT / "csrc/backends/select.cpp").read_text()
    match = re.search(r'TORCH_CHECK\(false, "(ckd_ext: this build has no kernels for device )", x\.device\(\)\)',
                      source)
    assert match, "the guard in csrc/backends/select.cpp changed"
    check("R-no-kernels", match.group(1) + "cpu", device="cpu")
    # What a device without kernels gets instead: the dispatcher's error.
    assert issubclass(NotImplementedError, RuntimeError)


@documents("R-emulated-capsule")
def test_raw_emulated_capsule():
    table, name = _Table(3, None, None), b"not.the.backend_table"
    capsule = _capsule(ctypes.addressof(table), name)
    expect("R-emulated-capsule", lambda: _extension.require_extension().install_emulated_backend(capsule))


# --------------------------------------------------------------------------------------------------
# Not errors: non-finite values
# --------------------------------------------------------------------------------------------------

FUSED, REFERENCE = (ckd_ext, functools.partial(on_backend, "cpu")), (reference, contextlib.nullcontext)
# The CUDA kernels under the CPU emulator: ~0.3 s a call, so a few cases only.
EMULATED = (ckd_ext, functools.partial(on_backend, "emulated"))
INF, NAN = float("inf"), float("nan")
CONFIG = {"kd_loss": dict(temperature=2.0), "ckd_loss": dict(tau=0.5), "bickd_loss": dict(temperature=2.0, tau=0.2)}


def backends(full, emulated):
    """Params (impl, *case): every case of `full` on the fused CPU ops and the reference, the cases of `emulated`
    on the emulated CUDA backend too (where it is built)."""
    skip = skip_unless("emulated")
    params = []
    for case in full:
        case = case if isinstance(case, tuple) else (case,)
        label = "-".join(map(str, case))
        params += [pytest.param(FUSED, *case, id=f"fused-{label}"),
                   pytest.param(REFERENCE, *case, id=f"reference-{label}")]
    for case in emulated:
        case = case if isinstance(case, tuple) else (case,)
        params.append(pytest.param(EMULATED, *case, id="emulated-" + "-".join(map(str, case)), marks=skip))
    return params


def run(impl, fn, student, teacher, reduction="mean", **kwargs):
    """(output(s) detached, gradient of their sum) of `fn` in float32."""
    module, context = impl
    student = student.clone().requires_grad_()
    with context():
        out = getattr(module, fn)(student, teacher, reduction=reduction, **{**CONFIG[fn], **kwargs})
        outs = out if isinstance(out, tuple) else (out,)
        (grad,) = torch.autograd.grad(sum(o.sum() for o in outs), student)
    return tuple(o.detach() for o in outs) if isinstance(out, tuple) else out.detach(), grad


def logits(rows=5, classes=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=generator), torch.randn(rows, classes, generator=generator)


@documents("N-masked-rows")
@pytest.mark.parametrize("impl, fn, reduction", backends(
    [(fn, red) for fn in FUNCTIONS for red in ("mean", "sum")], [("ckd_loss", "sum")]))
def test_masked_rows(impl, fn, reduction):
    student, teacher = logits()
    student[1, 2], teacher[1, 0], teacher[1, 4] = NAN, INF, -INF
    student[3], teacher[3, 1] = -INF, NAN  # a row of -inf too
    mask = torch.tensor([True, False, True, False, True])
    loss, grad = run(impl, fn, student, teacher, reduction, mask=mask)
    compact_loss, compact_grad = run(impl, fn, student[mask], teacher[mask], reduction)
    torch.testing.assert_close(loss, compact_loss)
    torch.testing.assert_close(grad[mask], compact_grad)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


@documents("N-kd-teacher-neg-inf")
@pytest.mark.parametrize("impl, student_too", backends([False, True], [True]))
def test_kd_teacher_neg_inf(impl, student_too):
    student, teacher = logits()
    teacher[0, 1] = teacher[2, 4] = teacher[2, 5] = -INF
    if student_too:
        student[0, 1] = -INF
    loss, grad = run(impl, "kd_loss", student, teacher, "none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    expected, expected_grad = run(REFERENCE, "kd_loss", student.double(), teacher.double(), "none")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@documents("N-kd-student-neg-inf")
@pytest.mark.parametrize("impl, reduction", backends(["none", "mean", "sum"], ["none"]))
def test_kd_student_neg_inf(impl, reduction):
    student, teacher = logits()
    student[0, 1] = -INF  # the teacher's probability of class 1 is > 0 in row 0
    loss, grad = run(impl, "kd_loss", student, teacher, reduction)
    if reduction == "none":
        assert loss[0] == INF and torch.isfinite(loss[1:]).all()
    else:
        assert loss == INF
    assert torch.isfinite(grad).all()


ROWS = {"all-neg-inf": [-INF] * 6, "pos-inf": [0.0, INF, 0, 0, 0, 0], "nan": [0.0, 0, NAN, 0, 0, 0]}


@documents("N-softmax-nan")
@pytest.mark.parametrize("impl, fn, who, row, reduction", backends(
    [(fn, who, row, red) for fn in ("kd_loss", "bickd_loss") for who in ("student", "teacher") for row in ROWS
     for red in ("none", "mean")],
    [("kd_loss", "teacher", "pos-inf", "none"), ("bickd_loss", "student", "nan", "none")]))
def test_softmax_nan(impl, fn, who, row, reduction, request):
    student, teacher = logits()
    (student if who == "student" else teacher)[0] = torch.tensor(ROWS[row])
    out, grad = run(impl, fn, student, teacher, reduction)
    assert torch.isnan(grad).any()
    if reduction == "mean":
        assert torch.isnan(out)
    elif fn == "kd_loss":
        assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
    else:
        sample_terms, class_terms = out
        assert torch.isnan(sample_terms[0]) and torch.isnan(class_terms).all()


@documents("N-bickd-neg-inf")
@pytest.mark.parametrize("impl, who", backends(["student", "teacher"], ["teacher"]))
def test_bickd_neg_inf(impl, who):
    student, teacher = logits()
    logit = student if who == "student" else teacher
    logit[0, :3] = -INF  # some classes of a row, its maximum finite
    logit[:, 5] = -INF   # a whole column
    out, grad = run(impl, "bickd_loss", student, teacher, "mean")
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    expected, expected_grad = run(REFERENCE, "bickd_loss", student.double(), teacher.double(), "mean")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@documents("N-ckd-non-finite")
@pytest.mark.parametrize("impl, anchor, who, bad", backends(
    [(anchor, who, bad) for anchor in ("student", "teacher") for who in ("student", "teacher")
     for bad in (INF, -INF, NAN)],
    [("teacher", "student", INF)]))
def test_ckd_non_finite(impl, anchor, who, bad):
    student, teacher = logits()
    (student if who == "student" else teacher)[2, 3] = bad
    terms, grad = run(impl, "ckd_loss", student, teacher, "none", anchor=anchor)
    assert torch.isnan(terms[2]) and torch.isnan(grad).any()
    if who == "student":  # a student row is a candidate of every anchor
        assert torch.isnan(terms).all()
    if impl is not EMULATED:  # one call fewer on the slow backend
        loss, _ = run(impl, "ckd_loss", student, teacher, "mean", anchor=anchor)
        assert torch.isnan(loss)


@documents("N-fl-ckd-non-finite")
@pytest.mark.parametrize("name", ("student_weight", "student_bias", "teacher_weight", "teacher_bias",
                                  "student_hidden", "teacher_hidden"))
@pytest.mark.parametrize("bad", (INF, -INF, NAN))
def test_fl_ckd_non_finite(name, bad):
    inputs = fl_inputs()
    inputs["student_bias"], inputs["teacher_bias"] = torch.randn(5), torch.randn(5)
    inputs[name].view(-1)[1] = bad
    positional = [inputs.pop(k) for k in FL_POSITIONAL]
    assert torch.isnan(ckd_ext.fused_linear_ckd_loss(*positional, **inputs))


@documents("N-no-valid-rows")
@pytest.mark.parametrize("impl, fn", backends(FUNCTIONS, FUNCTIONS))
def test_no_valid_rows(impl, fn):
    student, teacher = logits()
    student[0, 0], teacher[1, 1], student[2] = NAN, INF, -INF
    batches = [(student, teacher, torch.zeros(5, dtype=torch.bool)), (student[:0], teacher[:0], None)]
    for s, t, mask in batches:
        for reduction in ("mean", "sum", "none"):
            out, grad = run(impl, fn, s, t, reduction, mask=mask)
            for o in out if isinstance(out, tuple) else (out,):
                assert torch.equal(o, torch.zeros_like(o)), (reduction, o)
            assert torch.equal(grad, torch.zeros_like(grad))


# --------------------------------------------------------------------------------------------------
# The entries that read the subprocess of SCENARIO_SCRIPT: last, so that it ran alongside everything above
# --------------------------------------------------------------------------------------------------

@documents("E-emulated-not-built")
def test_emulated_not_built(monkeypatch, extension_scenarios):
    monkeypatch.setattr(_extension, "_emulated_error", _extension.NOT_BUILT_EMULATED)
    with pytest.raises(RuntimeError) as info:
        with emulated_cuda():
            pytest.fail("entered the emulated backend")
    assert type(info.value) is RuntimeError
    check("E-emulated-not-built", str(info.value))
    # A real build without it (faked in a subprocess): the same error from the public switch.
    check("E-emulated-not-built", error_of(extension_scenarios["no-emulated"], "testing.emulated_cuda", RuntimeError))


@documents("E-not-built")
def test_not_built(extension_scenarios):
    result = extension_scenarios["not-built"]
    check_unavailable("E-not-built", result)
    check_import_warning(result)


@documents("E-torch-mismatch")
def test_torch_mismatch(extension_scenarios):
    result = extension_scenarios["torch-mismatch"]
    values = dict(built=torch.__version__, installed="0.0.1-not-the-build-torch")
    check_unavailable("E-torch-mismatch", result, **values)
    check_import_warning(result)


@documents("E-load-failed")
def test_load_failed(extension_scenarios):
    result = extension_scenarios["load-failed"]
    check_unavailable("E-load-failed", result, reason="No module named 'ckd_ext._C'")
    check_import_warning(result)


@documents("E-emulated-abi")
def test_emulated_abi(extension_scenarios):
    # The check `import ckd_ext` runs, given a table from other sources (its ABI number differs). The number this
    # build expects is the digest of the kernel interface's headers that tools/build_config.py compiled in.
    table, name = _Table(999, None, None), b"ckd_ext._emulated.backend_table"
    capsule = _capsule(ctypes.addressof(table), name)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import build_config
    finally:
        sys.path.remove(str(ROOT / "tools"))
    expect("E-emulated-abi", lambda: _extension.require_extension().install_emulated_backend(capsule), abi="999",
           expected=str(int(build_config.kernel_interface_digest(), 16)))
    # Documented alongside: a test build whose ckd_ext._emulated is missing still imports; the emulated backend
    # says why it cannot run.
    missing = extension_scenarios["emulated-missing"]
    assert "import" not in missing and missing["is_available"] is True
    assert error_of(missing, "testing.emulated_cuda", RuntimeError).startswith(
        "ckd_ext._emulated failed to load (No module named 'ckd_ext._emulated')")


@documents("E-workspace-env")
def test_workspace_env(extension_scenarios):
    result = extension_scenarios["workspace-env"]
    for call_name in ("ckd_loss", "kd_loss", "bickd_loss", "workspace_bytes"):
        check("E-workspace-env", error_of(result, call_name, RuntimeError), value="'abc'")
    assert result["calls"]["reference.ckd_loss"] is None
    check_import_warning(result)


@documents("E-cpu-isa-env")
def test_cpu_isa_env(extension_scenarios):
    result = extension_scenarios["cpu-isa-env"]
    allowed = result["available_cpu_isas"]
    for call_name in ("ckd_loss", "kd_loss", "bickd_loss", "workspace_bytes"):
        check("E-cpu-isa-env", error_of(result, call_name, RuntimeError), value="'sse9'", allowed=", ".join(allowed),
              best=allowed[-1])
    assert result["calls"]["reference.ckd_loss"] is None
    check_import_warning(result)


@documents("R-emulated-not-installed")
def test_raw_emulated_not_installed(extension_scenarios):
    result = extension_scenarios["no-emulated"]
    assert result["is_available"] is True
    check("R-emulated-not-installed", error_of(result, "_C.set_emulated_cuda", RuntimeError))


# ---- top-k teachers: topk_kd_loss, fused_linear_topk_kd_loss (function, reference, module) and teacher_topk
TOPK_LOGITS, TOPK_FL = ("topk_kd_loss",), ("fused_linear_topk_kd_loss",)
TOPK_CKD = ("topk_ckd_loss", "fused_linear_topk_ckd_loss")  # CKD from a top-k teacher: the teacher's checks too
TOPK_ALL = TOPK_LOGITS + TOPK_FL
TOPK_MODULES = {"topk_kd_loss": ckd_ext.TopKKDLoss, "fused_linear_topk_kd_loss": ckd_ext.FusedLinearTopKKDLoss}
TOPK_HYPERPARAMETERS = ("temperature", "divergence", "tail", "scale_t2", "ce_weight", "ignore_index", "reduction")


def topk_inputs(fn):
    """Valid inputs: 4 rows, V = 5, k = 2 (log-probabilities of mass 0.5 per row); H = 3 for the fused-linear loss."""
    g = torch.Generator().manual_seed(2)
    first = (dict(student=torch.randn(4, 5, generator=g)) if fn == "topk_kd_loss" else
             dict(student_hidden=torch.randn(4, 3, generator=g), student_weight=torch.randn(5, 3, generator=g)))
    return dict(first, teacher_ids=torch.tensor([[0, 1], [2, 3], [4, -1], [1, 0]]),
                teacher_logprobs=torch.full((4, 2), math.log(0.25)))


def topk_call(impl: str, fn: str, **overrides):
    if fn in TOPK_CKD:
        return topk_ckd_call(impl, fn, **overrides)
    args = dict(topk_inputs(fn), **overrides)
    positional = [args.pop(k) for k in ("student", "student_hidden", "student_weight", "teacher_ids",
                                        "teacher_logprobs") if k in args]
    if impl == "module":
        hyper = {k: args.pop(k) for k in TOPK_HYPERPARAMETERS if k in args}
        return TOPK_MODULES[fn](**hyper)(*positional, **args)
    return getattr(ckd_ext if impl == "fused" else reference, fn)(*positional, **args)


def every_impl_test(entry_id, call, *items):
    """A test of `entry_id` raised by the function, the reference and the module of every loss in `items`, each
    called as `call(impl, fn, **overrides)`."""
    @documents(entry_id)
    @pytest.mark.parametrize("fn, overrides, values", cases(*items))
    def test(fn, overrides, values):
        for impl in IMPLS:
            try:
                expect(entry_id, lambda: call(impl, fn, **overrides), fn=fn, **values)
            except BaseException as exc:
                exc.add_note(f"implementation: {impl}")
                raise
    return test


def topk_test(entry_id, *items):
    """every_impl_test of the top-k KD losses (and the producer)."""
    return every_impl_test(entry_id, topk_call, *items)


test_tail = topk_test(
    "E-tail",
    (TOPK_ALL, dict(tail="rest"), dict(value="'rest'")),
    (TOPK_LOGITS, dict(tail=None), dict(value="None")))
test_topk_student_shape = topk_test(
    "E-topk-student-shape",
    (TOPK_LOGITS, dict(student=torch.tensor(1.0)), dict(shape="()")),
    (TOPK_LOGITS, dict(student=torch.randn(4, 0)), dict(shape="(4, 0)")))
test_topk_ids_type = topk_test(
    "E-topk-ids-type",
    (TOPK_ALL, dict(teacher_ids=[[0, 1]] * 4), dict(got="list")),
    (TOPK_ALL, dict(teacher_ids=torch.zeros(4, 2)), dict(got="dtype torch.float32")),
    (TOPK_LOGITS, dict(teacher_ids=torch.zeros(4, 2, dtype=torch.int16)), dict(got="dtype torch.int16")))
test_topk_ids_shape = topk_test(
    "E-topk-ids-shape",
    (TOPK_LOGITS, dict(teacher_ids=torch.zeros(3, 2, dtype=torch.int64)),
     dict(expected="4, k", name="student", shape="(3, 2)")),
    (TOPK_FL, dict(teacher_ids=torch.zeros(4, dtype=torch.int64)),
     dict(expected="4, k", name="student_hidden", shape="(4,)")),
    (TOPK_LOGITS, dict(teacher_ids=torch.zeros(4, 0, dtype=torch.int64)),
     dict(expected="4, k", name="student", shape="(4, 0)")))
test_topk_logprobs_shape = topk_test(
    "E-topk-logprobs-shape",
    (TOPK_ALL, dict(teacher_logprobs=torch.zeros(4, 3)), dict(ids_shape="(4, 2)", shape="(4, 3)")))
test_topk_device = topk_test(
    "E-topk-device",
    (TOPK_LOGITS, dict(teacher_ids=torch.zeros(4, 2, dtype=torch.int64, device=META)),
     dict(name="teacher_ids", student="student", device="cpu", got="meta")),
    (TOPK_FL, dict(teacher_logprobs=torch.zeros(4, 2, device=META)),
     dict(name="teacher_logprobs", student="student_hidden", device="cpu", got="meta")),
    (("topk_ckd_loss",), dict(logit_sum=torch.ones(4, device=META)),
     dict(name="logit_sum", student="student", device="cpu", got="meta")),
    (("fused_linear_topk_ckd_loss",), dict(teacher_ids=torch.zeros(4, 2, dtype=torch.int64, device=META)),
     dict(name="teacher_ids", student="student_hidden", device="cpu", got="meta")))
test_topk_ids_range = topk_test(
    "E-topk-ids-range",
    (TOPK_ALL, dict(teacher_ids=torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])), dict(vocab="5", id="5", row="2")),
    (TOPK_LOGITS, dict(teacher_ids=torch.tensor([[0, 1], [9, 3], [4, 5], [1, 0]]),
                       mask=torch.tensor([True, False, True, True])), dict(vocab="5", id="5", row="2")))
test_topk_ids_repeat = topk_test(
    "E-topk-ids-repeat",
    (TOPK_ALL, dict(teacher_ids=torch.tensor([[0, 1], [2, 3], [4, -1], [1, 1]])), dict(ids="[1, 1]", row="3")))
test_topk_logprobs_range = topk_test(
    "E-topk-logprobs-range",
    (TOPK_ALL, dict(teacher_logprobs=torch.tensor([[-1.0, -2.0], [0.5, -1.0], [-1.0, -1.0], [-1.0, -1.0]])),
     dict(value="0.5", row="1")),
    (TOPK_LOGITS, dict(teacher_logprobs=torch.tensor([[-1.0, -2.0], [-2.0, -1.0], [-1.0, -1.0],
                                                      [-1.0, float("nan")]])), dict(value="nan", row="3")))
test_topk_mass = topk_test(
    "E-topk-mass",
    (TOPK_ALL + TOPK_CKD,
     dict(teacher_logprobs=torch.tensor([[-0.1, -0.5], [-2.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])),
     dict(row="0", dtype="torch.float32", mass="1.51137")))


# ---- CKD from a top-k teacher: topk_ckd_loss, fused_linear_topk_ckd_loss (function, reference, module)
TOPK_CKD_MODULES = {"topk_ckd_loss": ckd_ext.TopKCKDLoss, "fused_linear_topk_ckd_loss": ckd_ext.FusedLinearTopKCKDLoss}
MOMENTS = ("log_normalizer", "logit_sum", "logit_square_sum")


def topk_ckd_call(impl: str, fn: str, **overrides):
    """The top-k KD test inputs (4 rows, V = 5, k = 2) with moments of the right shape."""
    base = topk_inputs("topk_kd_loss" if fn == "topk_ckd_loss" else "fused_linear_topk_kd_loss")
    base.update({name: torch.full((4,), value) for name, value in zip(MOMENTS, (0.5, 1.0, 9.0))})
    args = dict(base, **overrides)
    positional = [args.pop(k) for k in ("student", "student_hidden", "student_weight", "teacher_ids",
                                        "teacher_logprobs", *MOMENTS) if k in args]
    if impl == "module":
        hyper = {k: args.pop(k) for k in ("temperature", "tau", "reduction") if k in args}
        return TOPK_CKD_MODULES[fn](**hyper)(*positional, **args)
    return getattr(ckd_ext if impl == "fused" else reference, fn)(*positional, **args)


def topk_ckd_test(entry_id, *items):
    """every_impl_test of the top-k CKD losses."""
    return every_impl_test(entry_id, topk_ckd_call, *items)


test_topk_moments_type = topk_ckd_test(
    "E-topk-moments-type",
    (TOPK_CKD, dict(log_normalizer=None), dict(name="log_normalizer", got="NoneType")),
    (("topk_ckd_loss",), dict(logit_square_sum=torch.ones(4, dtype=torch.int64)),
     dict(name="logit_square_sum", got="dtype torch.int64")))
test_topk_moments_shape = topk_ckd_test(
    "E-topk-moments-shape",
    (TOPK_CKD, dict(logit_sum=torch.ones(4, 1)), dict(name="logit_sum", expected="(4,)", shape="(4, 1)")))


@documents("E-topk-flag-type")
@pytest.mark.parametrize("impl", IMPLS)
def test_topk_flag_type(impl):
    expect("E-topk-flag-type", lambda: topk_call(impl, "topk_kd_loss", scale_t2=1), fn="topk_kd_loss",
           name="scale_t2", type="int")
    expect("E-topk-flag-type", lambda: ckd_ext.teacher_topk(torch.randn(2, 3), torch.randn(5, 3), 2, moments="yes"),
           fn="teacher_topk", name="moments", type="str")


TEACHER_TOPK = dict(hidden=torch.randn(2, 3), weight=torch.randn(5, 3), k=2)


def teacher_topk_call(impl, **overrides):
    args = dict(TEACHER_TOPK, **overrides)
    module = ckd_ext if impl == "fused" else reference
    return module.teacher_topk(args.pop("hidden"), args.pop("weight"), args.pop("k"), **args)


@documents("E-teacher-topk-shape")
@pytest.mark.parametrize("impl", ("fused", "reference"))
@pytest.mark.parametrize("overrides, form, values", [
    (dict(hidden=torch.tensor(1.0)), 0, dict(shape="()")),
    (dict(weight=torch.randn(5, 4)), 1, dict(hidden="3", shape="(5, 4)")),
    (dict(weight=torch.randn(0, 3)), 1, dict(hidden="3", shape="(0, 3)")),
    (dict(bias=torch.randn(4)), 2, dict(vocab="5", shape="(4,)"))])
def test_teacher_topk_shape(impl, overrides, form, values):
    expect("E-teacher-topk-shape", lambda: teacher_topk_call(impl, **overrides), form, fn="teacher_topk", **values)


@documents("E-teacher-topk-dtype")
@pytest.mark.parametrize("impl", ("fused", "reference"))
def test_teacher_topk_dtype(impl):
    expect("E-teacher-topk-dtype", lambda: teacher_topk_call(impl, bias=torch.randn(5).double()), fn="teacher_topk",
           name="bias", dtype="torch.float32", got="torch.float64")


@documents("E-teacher-topk-device")
@pytest.mark.parametrize("impl", ("fused", "reference"))
def test_teacher_topk_device(impl):
    expect("E-teacher-topk-device", lambda: teacher_topk_call(impl, weight=torch.randn(5, 3, device=META)),
           fn="teacher_topk", name="weight", device="cpu", got="meta")


@documents("E-teacher-topk-k")
@pytest.mark.parametrize("impl", ("fused", "reference"))
@pytest.mark.parametrize("k", (0, 6, 2.0, True))
def test_teacher_topk_k(impl, k):
    expect("E-teacher-topk-k", lambda: teacher_topk_call(impl, k=k), fn="teacher_topk", vocab="5", value=repr(k))
