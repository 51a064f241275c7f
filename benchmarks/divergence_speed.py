"""KD's divergences side by side (issue 22, section 1): fused ``kd_loss`` forward + backward per divergence against its
floor (read S, read T, write the gradient: benchmarks.providers.Floor), the eager reference and ``torch.compile`` of
the reference, all in one process, interleaved.

    python -m benchmarks.divergence_speed [--rounds 7] [--shapes 2048x8192,4096x1000,...] [--bf16 2048x8192]

Each round times every (shape, divergence, provider) once, in an order rotated from round to round, after a warm-up
call each (the compile outside the timing); reported: the median over rounds of each ratio taken within the round
(fused / floor, fused / compiled, fused / eager), so that a busy machine's drift cancels. Threads as
benchmarks/run.py sets them (os.cpu_count()) unless --threads says otherwise. Inputs: benchmarks.cases.make_inputs (the benchmarks' logits, T = 4,
the reference's defaults for beta and alpha).
"""
import argparse
import os
import statistics
import time

import torch

from .cases import LOSS_VARIANTS, make_inputs
from .providers import Floor, loss_fn, mode_callables

DIVERGENCES = ("kd", "kd_reverse_kl", "kd_jsd", "kd_skew_kl", "kd_tvd")
PROVIDERS = ("ckd_ext", "floor", "compiled", "eager")
SHAPES = ("64x100", "512x1000", "4096x1000", "8192x1024", "2048x8192")


def timed(setup, run) -> float:
    setup()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="float32 N x C shapes, comma-separated")
    ap.add_argument("--bf16", default="2048x8192", help="bfloat16 N x C shapes, comma-separated ('' for none)")
    ap.add_argument("--divergences", default=",".join(DIVERGENCES))
    ap.add_argument("--no-eager", action="store_true", help="leave out the eager reference")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default os.cpu_count(), as "
                    "benchmarks/run.py; on a machine shared with other jobs, 1 keeps OpenMP barriers from waiting out "
                    "other processes' time slices)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    import ckd_ext
    cases = [(shape, "float32") for shape in a.shapes.split(",") if shape] + \
            [(shape, "bfloat16") for shape in a.bf16.split(",") if shape]
    divergences = [d for d in a.divergences.split(",") if d]
    providers = [p for p in PROVIDERS if not (a.no_eager and p == "eager")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ckd_ext CPU ISA {ckd_ext.cpu_isa()}, "
          f"{a.rounds} rounds")
    runs = {}
    for shape, dtype in cases:
        N, C = (int(v) for v in shape.split("x"))
        student, teacher = make_inputs(N, C, dtype, "cpu")
        for loss in divergences:
            for provider in providers:
                if provider == "floor":
                    setup, run = mode_callables("floor", loss, student, teacher, "full", floor=Floor(loss, student,
                                                                                                     teacher))
                else:
                    setup, run = mode_callables(provider, loss, student, teacher, "full", fn=loss_fn(provider, loss))
                timed(setup, run)  # warm-up (and the compile)
                runs[(shape, dtype, loss, provider)] = (setup, run)
    keys = list(runs)
    times = {k: [] for k in keys}
    for r in range(a.rounds):
        shift = (r * 7) % len(keys)
        for k in keys[shift:] + keys[:shift]:
            times[k].append(timed(*runs[k]))
    print("\n| divergence | N x C | dtype | fused (ms) | floor (ms) | compiled (ms) | eager (ms) | fused / floor | "
          "fused / compiled | fused / eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape, dtype in cases:
        for loss in divergences:
            fused = times[(shape, dtype, loss, "ckd_ext")]
            def ratio(provider):
                if (shape, dtype, loss, provider) not in times:
                    return "-"
                other = times[(shape, dtype, loss, provider)]
                return f"{statistics.median(f / o for f, o in zip(fused, other)):.2f}x"
            name = LOSS_VARIANTS.get(loss, ("kd", {"divergence": "forward_kl"}))[1]["divergence"]
            def ms(provider):
                other = times.get((shape, dtype, loss, provider))
                return f"{statistics.median(other) * 1e3:.2f}" if other else "-"
            print(f"| {name} | {shape} | {dtype} | {ms('ckd_ext')} | {ms('floor')} | {ms('compiled')} | {ms('eager')} | "
                  f"{ratio('floor')} | {ratio('compiled')} | {ratio('eager')} |")


if __name__ == "__main__":
    main()
