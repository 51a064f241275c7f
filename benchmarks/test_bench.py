"""pytest-benchmark suite: `pytest benchmarks/` (timings only, in-process; the sweep with memory, OOM
isolation, CSV and plots is `python benchmarks/run.py`).

Environment knobs (all optional):
    CKD_BENCH_SHAPES   comma list of shape names, groups or NxC (default: cifar100-b64,imagenet-b512;
                       "smoke" for the tiny CI shapes; groups: vision, tokens, scale, gpu-tokens, sweep)
    CKD_BENCH_DEVICE   cpu | cuda (default: cuda when available)
    CKD_BENCH_PROVIDERS comma list (default: the four logit providers; the lm group's fused_linear needs hidden
                       states and heads: python benchmarks/run.py --only shape=lm)
    CKD_BENCH_COMPILE_BACKEND  torch.compile backend of the `compiled` provider (default inductor)
    CKD_BENCH_THREADS  torch.set_num_threads (default: os.cpu_count())

CI: `pytest benchmarks/ --benchmark-disable -q` with CKD_BENCH_SHAPES=smoke runs every case once.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks.cases import LOGIT_PROVIDERS, MODES, make_inputs, select_shapes  # noqa: E402
from benchmarks.measure import saved_bytes  # noqa: E402
from benchmarks.providers import Floor, extension, loss_fn, mode_callables, provider_status  # noqa: E402

DEVICE = os.environ.get("CKD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
BACKEND = os.environ.get("CKD_BENCH_COMPILE_BACKEND", "inductor")
torch.set_num_threads(int(os.environ.get("CKD_BENCH_THREADS") or os.cpu_count() or 1))

_sel = [x.strip() for x in os.environ.get("CKD_BENCH_SHAPES", "cifar100-b64,imagenet-b512").split(",") if x.strip()]
SHAPES = select_shapes(DEVICE, smoke=_sel == ["smoke"], only=None if _sel == ["smoke"] else {"shape": _sel})
PROVIDERS = [p.strip() for p in os.environ.get("CKD_BENCH_PROVIDERS", ",".join(LOGIT_PROVIDERS)).split(",")
             if p.strip()]

_fn_cache = {}


def _fn(provider, loss):
    key = (provider, loss)
    if key not in _fn_cache:  # one torch.compile wrapper per loss, shared by the modes (graphs are reused)
        _fn_cache[key] = loss_fn(provider, loss, BACKEND)
    return _fn_cache[key]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.loss}-{s.name}-{s.dtype}")
def test_bench(benchmark, shape, provider, mode):
    ok, why = provider_status(provider, shape.loss)
    if not ok:
        pytest.skip(why)
    student, teacher = make_inputs(shape.N, shape.C, shape.dtype, DEVICE)
    floor = Floor(shape.loss, student, teacher) if provider == "floor" else None
    fn = None if provider == "floor" else _fn(provider, shape.loss)
    setup, run = mode_callables(provider, shape.loss, student, teacher, mode, fn, floor)
    sync = extension().synchronize

    def target():
        run()
        sync(DEVICE)

    def pedantic_setup():
        setup()
        sync(DEVICE)

    benchmark.group = f"{shape.loss} {shape.name} {shape.shape} {shape.dtype} {mode}"
    benchmark.extra_info.update(loss=shape.loss, provider=provider, mode=mode, N=shape.N, C=shape.C,
                                dtype=shape.dtype, device=DEVICE, threads=torch.get_num_threads())
    if provider == "compiled":
        benchmark.extra_info["compile_backend"] = BACKEND
    if mode == "forward" and provider != "floor":
        benchmark.extra_info.update(saved_bytes(fn, student, teacher))
    # warm-up (compiles for `compiled`) is separate from the timed rounds
    benchmark.pedantic(target, setup=pedantic_setup, rounds=5, warmup_rounds=2 if provider == "compiled" else 1,
                       iterations=1)
