#!/usr/bin/env python3
"""The CPU kernels' instruction sets side by side (csrc/backends/cpu/cpu_isa.h): forward + backward of each case
with every set this machine runs, in one process, on one thread.

    python benchmarks/cpu_isa.py                   # the cases of docs/benchmarks.md, "CPU instruction sets"
    python benchmarks/cpu_isa.py --repeats 41

Each repeat times one call per instruction set, in an order rotated from repeat to repeat (so that a slow spell of
a busy machine falls on every set alike), after one untimed warm-up call per set; the table gives each set's
median, and the median over repeats of baseline time / set time (within one repeat, so paired), as a speedup.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
import torch  # noqa: E402

import ckd_ext  # noqa: E402

# (label, loss name, keyword arguments, rows, classes)
CASES = [
    ("KD", "kd", {}, 64, 100),
    ("KD", "kd", {}, 512, 1000),
    ("KD", "kd", {}, 2048, 8192),
    ("CKD student anchor", "ckd", {"anchor": "student"}, 1024, 1024),
    ("CKD student anchor", "ckd", {"anchor": "student"}, 512, 1000),
    ("BicKD", "bickd", {}, 1024, 1024),
    ("BicKD", "bickd", {}, 512, 1000),
]


def time_once(fn, student, teacher, kwargs) -> float:
    t0 = time.perf_counter()
    loss = fn(student, teacher, **kwargs)
    loss.backward()
    elapsed = time.perf_counter() - t0
    student.grad = None
    return elapsed


def measure(isas, case, repeats):
    _, name, kwargs, rows, classes = case
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(rows, classes, generator=generator) * 3).requires_grad_()
    teacher = torch.randn(rows, classes, generator=generator) * 3
    fn = getattr(ckd_ext, f"{name}_loss")
    times = {isa: [] for isa in isas}
    for isa in isas:
        ckd_ext.set_cpu_isa(isa)
        time_once(fn, student, teacher, kwargs)
    for r in range(repeats):
        order = isas[r % len(isas):] + isas[:r % len(isas)]
        for isa in order:
            ckd_ext.set_cpu_isa(isa)
            times[isa].append(time_once(fn, student, teacher, kwargs))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    isas = ckd_ext.available_cpu_isas()
    previous = ckd_ext.cpu_isa()
    print(f"instruction sets: {', '.join(isas)}; torch {torch.__version__}, 1 thread, {args.repeats} repeats, fp32")
    print()
    print("| loss | N x C | " + " | ".join(f"{isa} (median)" for isa in isas) + " | "
          + " | ".join(f"{isa} speedup" for isa in isas[1:]) + " |")
    print("|---|---|" + "---:|" * (2 * len(isas) - 1))
    try:
        for case in CASES:
            times = measure(isas, case, args.repeats)
            medians = [f"{statistics.median(times[isa]) * 1e3:.2f} ms" for isa in isas]
            speedups = [f"{statistics.median(b / t for b, t in zip(times['baseline'], times[isa])):.2f}x"
                        for isa in isas[1:]]
            print(f"| {case[0]} | {case[3]} x {case[4]} | " + " | ".join(medians + speedups) + " |", flush=True)
    finally:
        ckd_ext.set_cpu_isa(previous)


if __name__ == "__main__":
    main()
