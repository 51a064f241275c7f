#!/usr/bin/env python3
"""KD's divergences (docs/math.md 3.1) side by side in one process, forward + backward (mode `full`), the providers
interleaved call by call so that load changes hit all of them alike (ratios are what this measures):

    logits  at the named vision and token shapes (benchmarks/cases.py, loss kd and its KD_DIVERGENCES variants):
            ckd_ext.kd_loss, eager (ckd_ext.reference.kd_loss), compiled (torch.compile of it, inductor) and the
            memory floor (read S, read T, write the gradient: providers.Floor), temperature 4, float32
    lm      at lm-1k-v8k-h512-1024 (hidden states and heads in, temperature 1): fused_linear
            (ckd_ext.fused_linear_kd_loss), ckd_ext (materialised logits + ckd_ext.kd_loss), eager (materialised +
            the reference) and, where it computes the same loss, Liger-Kernel's chunked LigerFusedLinearJSDLoss
            (forward_kl: beta 0, reverse_kl: beta 1, jsd: beta 0.5; providers.LIGER_BETA)

Every provider's loss and gradients are first checked against the float64 oracle (the reference on float64 copies of
the same inputs) and must agree within --agreement (normwise, relative): a ratio is only printed between providers
that compute the same number. The providers are the runner's (benchmarks/providers.py), so these are the rows
`benchmarks/run.py` measures one process per case.

    python benchmarks/divergences.py                                   # both parts (about 30 min on 2 busy cores)
    python benchmarks/divergences.py --part logits --shapes cifar100-b64 --reps 3
    python benchmarks/divergences.py --shapes smoke-8x16 --lm-shape smoke-lm-16x32 --reps 1 --warmup 1 \
        --compile-backend aot_eager                                    # a quick look (tests/test_benchmarks_smoke.py)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
from benchmarks.cases import (KD_DIVERGENCES, PROVIDER_LOSSES, SHAPES, SMOKE_SHAPES, loss_call,  # noqa: E402
                              make_inputs, make_lm_inputs)
from benchmarks.measure import quantiles, time_call, warm_up  # noqa: E402
from benchmarks.providers import (LM_KD_TEMPERATURE, Floor, lm_loss_fn, loss_fn, mode_callables,  # noqa: E402
                                  provider_status)

KD_LOSSES = ("kd",) + KD_DIVERGENCES
LOGIT_SHAPES = ("cifar100-b64", "imagenet-b512", "contrastive-b4096", "tokens-2k-v8k", "tokens-8k-v1k")
LOGIT_PROVIDERS = ("ckd_ext", "eager", "compiled", "floor")
LM_PROVIDERS = ("fused_linear", "ckd_ext", "eager", "liger")


def divergence_of(loss: str) -> str:
    return loss_call(loss)[1].get("divergence", "forward_kl")


def shape_named(name: str):
    for s in SHAPES + SMOKE_SHAPES:
        if s.name == name and s.loss == "kd":
            return s
    raise SystemExit(f"divergences.py: no kd shape named {name!r}")


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (normwise)."""
    scale = expected.abs().max().item()
    return (actual.double() - expected).abs().max().item() / (scale or 1.0)


def grads_of(fn: Callable, inputs) -> List[torch.Tensor]:
    """The loss and the gradients of `inputs` (leaves) of one call of `fn()`."""
    for x in inputs:
        x.grad = None
    loss = fn()
    loss.backward()
    return [loss.detach()] + [x.grad.detach().clone() for x in inputs]


# tvd's gradient p_j (g_j - sum_k p_k g_k), g_j = sign(p_j - q_j) / 2, jumps by p_j where p_j = q_j: at a near-tie
# (|p_j - q_j| below float32's resolution of p_j) float32 and float64 may take either side, both valid subgradients
# (a float32 eager tvd differs from the float64 one by 0.13 normwise at tokens-2k-v8k, ckd_ext by 0.04, from one such
# element). The logit gradient is compared away from those elements (TIE, relative to max(p_j, q_j)); the lm shape's
# hidden-state and head gradients mix every element through the GEMMs, so there tvd's gradients get TVD_LM_AGREEMENT.
TIE = 1e-5
# The logit shapes' temperature: kd_loss's default, which every provider there takes.
LOGIT_TEMPERATURE = 4.0
TVD_LM_AGREEMENT = 1e-2
# --warmup calls each, however long they take (the runner's warm_up stops after a second)
WARM_UP_SECONDS = math.inf


def tvd_ties(student, teacher, temperature: float) -> torch.Tensor:
    """Where p_j and q_j (float64) agree to TIE: the elements whose tvd subgradient is a choice."""
    p, q = (x.detach().double().div(temperature).softmax(-1) for x in (student, teacher))
    return (p - q).abs() <= TIE * torch.maximum(p, q)


def check_agreement(name: str, got: List[torch.Tensor], oracle: List[torch.Tensor], limit: float,
                    ignore=None, gradient_limit=None) -> float:
    """The largest relative error of the loss and gradients against the oracle's; SystemExit above `limit`
    (`gradient_limit` for the gradients when given). `ignore`: elements of the first gradient left out."""
    if ignore is not None:
        keep = ~ignore
        got = [got[0], got[1] * keep] + got[2:]
        oracle = [oracle[0], oracle[1] * keep] + oracle[2:]
    errors = [relative_error(g, o) for g, o in zip(got, oracle)]
    limits = [limit] + [limit if gradient_limit is None else gradient_limit] * (len(errors) - 1)
    err = max(errors)
    if not all(e <= bound for e, bound in zip(errors, limits)):
        raise SystemExit(f"divergences.py: {name} disagrees with the float64 oracle by {err:.2e} (> {limit:g}): "
                         "its timing would not compare the same loss")
    return err


def interleaved(calls: Dict[str, tuple], reps: int) -> Dict[str, List[float]]:
    """`reps` timed calls of each (setup, run), the providers in a rotating order each round."""
    names = list(calls)
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(time_call(*calls[n], "cpu"))
    return times


def logits_part(a) -> None:
    print(f"\n### KD's divergences at the named shapes: full forward + backward, float32, temperature 4 (the "
          f"losses' default), {torch.get_num_threads()} threads\n")
    print("| shape | divergence | ckd_ext p50 ms [p20 .. p80] | eager / ckd_ext | compiled / ckd_ext | "
          "ckd_ext / floor | compile s | rel. error vs float64: ckd_ext, eager, compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for shape_name in a.shapes:
        shape = shape_named(shape_name)
        student, teacher = make_inputs(shape.N, shape.C, "float32", "cpu")
        floor = Floor("kd", student, teacher)
        floor_calls = mode_callables("floor", "kd", student, teacher, "full", floor=floor)
        warm_up(*floor_calls, "cpu", a.warmup, WARM_UP_SECONDS)
        for loss in a.losses:
            # a fresh compile per case, as the runner's fresh process per case has (one process would reuse
            # reference.kd_loss's compiled code object and soon hit dynamo's recompile limit, falling back to eager)
            torch._dynamo.reset()
            oracle_student = student.detach().double().requires_grad_()
            oracle = grads_of(lambda: loss_fn("eager", loss)(oracle_student, teacher.double()), [oracle_student])
            calls, errors, compile_s = {"floor": floor_calls}, {}, None
            for provider in LOGIT_PROVIDERS[:-1]:
                fn = loss_fn(provider, loss, compile_backend=a.compile_backend)
                calls[provider] = mode_callables(provider, loss, student, teacher, "full", fn)
                first = warm_up(*calls[provider], "cpu", a.warmup, WARM_UP_SECONDS)
                compile_s = first if provider == "compiled" else compile_s
                ties = tvd_ties(student, teacher, LOGIT_TEMPERATURE) if divergence_of(loss) == "tvd" else None
                errors[provider] = check_agreement(f"{provider} {loss} at {shape_name}",
                                                   grads_of(lambda: fn(student, teacher), [student]), oracle,
                                                   a.agreement, ignore=ties)
            p = {n: quantiles(ts) for n, ts in interleaved(calls, a.reps).items()}
            base = p["ckd_ext"][1]
            print(f"| {shape_name} ({shape.N} x {shape.C}) | {divergence_of(loss)} | {base:.2f} "
                  f"[{p['ckd_ext'][0]:.2f} .. {p['ckd_ext'][2]:.2f}] | {p['eager'][1] / base:.2f} | "
                  f"{p['compiled'][1] / base:.2f} | {base / p['floor'][1]:.2f} | {compile_s:.0f} | "
                  + ", ".join(f"{errors[n]:.1e}" for n in LOGIT_PROVIDERS[:-1]) + " |", flush=True)


def lm_part(a) -> None:
    shape = shape_named(a.lm_shape)
    (hidden, weight), (teacher_hidden, teacher_weight) = make_lm_inputs(shape.N, shape.C, shape.hidden, "float32",
                                                                        "cpu")
    liger_ok, liger_why = provider_status("liger")
    print(f"\n### KD's divergences from hidden states and heads: {shape.name} (N = {shape.N}, V = {shape.C}, "
          f"H_s = {shape.hidden[0]}, H_t = {shape.hidden[1]}), full forward + backward, float32, temperature "
          f"{LM_KD_TEMPERATURE:g}, {torch.get_num_threads()} threads"
          + ("" if liger_ok else f" (liger skipped: {liger_why})") + "\n")
    print("| divergence | fused_linear p50 ms [p20 .. p80] | materialise + ckd_ext / fused | eager / fused | "
          "Liger / fused | rel. error vs float64 (loss, d hidden, d head): fused, materialised, eager, Liger |")
    print("|---|---|---|---|---|---|")
    for loss in a.losses:
        providers = [p for p in LM_PROVIDERS if p != "liger" or (liger_ok and loss in PROVIDER_LOSSES["liger"])]
        h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
        oracle_fn = lm_loss_fn("eager", loss, w64, teacher_weight.double())
        oracle = grads_of(lambda: oracle_fn(h64, teacher_hidden.double()), [h64, w64])
        calls, errors = {}, {}
        for provider in providers:
            fn = lm_loss_fn(provider, loss, weight, teacher_weight)
            calls[provider] = mode_callables(provider, loss, hidden, teacher_hidden, "full", fn)
            warm_up(*calls[provider], "cpu", a.warmup, WARM_UP_SECONDS)
            errors[provider] = check_agreement(f"{provider} {loss} at {shape.name}",
                                               grads_of(lambda: fn(hidden, teacher_hidden), [hidden, weight]),
                                               oracle, a.agreement, gradient_limit=TVD_LM_AGREEMENT
                                               if divergence_of(loss) == "tvd" else None)
        p = {n: quantiles(ts) for n, ts in interleaved(calls, a.reps).items()}
        base = p["fused_linear"][1]

        def versus(n):
            return f"{p[n][1] / base:.2f}" if n in p else "- (not the same loss)" if n == "liger" else "-"

        print(f"| {divergence_of(loss)} | {base:.0f} [{p['fused_linear'][0]:.0f} .. {p['fused_linear'][2]:.0f}] | "
              f"{versus('ckd_ext')} | {versus('eager')} | {versus('liger')} | "
              + ", ".join(f"{errors[n]:.1e}" if n in errors else "-" for n in LM_PROVIDERS) + " |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("logits", "lm", "both"), default="both")
    ap.add_argument("--shapes", default=",".join(LOGIT_SHAPES), help="comma list of kd shape names (logits part)")
    ap.add_argument("--lm-shape", default="lm-1k-v8k-h512-1024")
    ap.add_argument("--losses", default=",".join(KD_LOSSES), help=f"comma list of {', '.join(KD_LOSSES)}")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per provider")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per provider (>= 1; the compile)")
    ap.add_argument("--agreement", type=float, default=1e-4,
                    help="largest relative error against the float64 oracle a compared provider may have")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: unchanged)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled provider "
                    "(aot_eager: no code generation, for a quick check)")
    a = ap.parse_args(argv)
    a.shapes = [x for x in a.shapes.split(",") if x]
    a.losses = [x for x in a.losses.split(",") if x]
    unknown = [x for x in a.losses if x not in KD_LOSSES]
    if unknown or a.reps < 1 or a.warmup < 1:
        ap.error(f"--losses must list some of {', '.join(KD_LOSSES)}; --reps and --warmup >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    ok, why = provider_status("ckd_ext", "kd")
    if not ok:
        raise SystemExit(f"divergences.py: the ckd_ext provider cannot run: {why}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at "
          f"start; {a.reps} interleaved calls per provider after {a.warmup} warm-up calls")
    if a.part in ("logits", "both"):
        logits_part(a)
    if a.part in ("lm", "both"):
        lm_part(a)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
