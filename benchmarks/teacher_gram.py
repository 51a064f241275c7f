#!/usr/bin/env python3
"""Fused-linear CKD with and without a precomputed teacher Gram matrix, against materialising the logits, side by side
in one process (the providers interleaved call by call, so that load changes hit all of them alike), forward +
backward from hidden states and heads, float32:

    fused_linear                  ckd_ext.fused_linear_ckd_loss
    fused_linear + teacher_gram   the same with teacher_gram=ckd_ext.fused_linear_teacher_gram(teacher head), made
                                  once outside the timed calls (its own time is printed)
    materialise + ckd_loss        hidden @ weight.T for both models, then ckd_ext.ckd_loss

    python benchmarks/teacher_gram.py                 # N = 2048, V = 16000, H 256 / 512 (issue 21's CPU shape)
    python benchmarks/teacher_gram.py --tokens 256 --vocab 2000 --reps 1   # a quick look
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
import ckd_ext  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--student-width", type=int, default=256)
    parser.add_argument("--teacher-width", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3, help="timed calls per provider (the median is printed)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: unchanged)")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(a.tokens, a.student_width, generator=g).requires_grad_()
    ws = (torch.randn(a.vocab, a.student_width, generator=g) / a.student_width ** 0.5).requires_grad_()
    ht = torch.randn(a.tokens, a.teacher_width, generator=g)
    wt = torch.randn(a.vocab, a.teacher_width, generator=g) / a.teacher_width ** 0.5
    start = time.perf_counter()
    gram = ckd_ext.fused_linear_teacher_gram(wt)
    gram_seconds = time.perf_counter() - start
    calls = {
        "fused_linear": lambda: ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt),
        "fused_linear + teacher_gram": lambda: ckd_ext.fused_linear_ckd_loss(hs, ws, ht, wt, teacher_gram=gram),
        "materialise + ckd_loss": lambda: ckd_ext.ckd_loss(hs @ ws.T, ht @ wt.T),
    }
    losses = {}
    for name, call in calls.items():  # warm-up, and the same loss from every provider
        hs.grad = ws.grad = None
        loss = call()
        loss.backward()
        losses[name] = loss.item()
    spread = max(losses.values()) - min(losses.values())
    if spread > 1e-4 * max(abs(v) for v in losses.values()):
        raise SystemExit(f"the providers disagree: {losses}")
    times = {name: [] for name in calls}
    for _ in range(a.reps):
        for name, call in calls.items():
            hs.grad = ws.grad = None
            start = time.perf_counter()
            call().backward()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["materialise + ckd_loss"])
    print(f"{a.tokens} x {a.vocab}, H {a.student_width} / {a.teacher_width}, float32, {torch.get_num_threads()} "
          f"thread(s), median of {a.reps}")
    print("| provider | time | materialise / provider |\n|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} s | {base / median:.2f}x |")
    print(f"fused_linear_teacher_gram itself: {gram_seconds:.3f} s (once)")


if __name__ == "__main__":
    main()
