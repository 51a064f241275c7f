"""Two builds of ckd_ext side by side: fused forward + backward at the named CPU shapes, the builds alternating
process by process (before, after, after, before), each process one warm-up step and `reps` timed steps (the median
step); the ratio is the median of the two paired after / before ratios.

    python benchmarks/compare_builds.py --before /path/to/old/checkout --after .

Each path is a checkout with its extension built in place (`python setup.py build_ext --inplace`).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = [("kd", 4, 8, 2000), ("ckd_student", 4, 8, 2000), ("kd", 64, 100, 1000), ("ckd_student", 64, 100, 1000),
         ("ckd_teacher", 64, 100, 1000), ("bickd", 64, 100, 500), ("ckd_student", 512, 128, 200),
         ("ckd_student", 512, 256, 200), ("ckd_student", 512, 1000, 9),
         ("ckd_teacher", 512, 1000, 9), ("bickd", 512, 1000, 5), ("kd", 512, 1000, 15), ("ckd_student", 2048, 8192, 3),
         ("ckd_teacher", 2048, 8192, 3), ("kd", 2048, 8192, 5), ("bickd", 1024, 8192, 2),
         ("ckd_student", 4096, 1000, 3), ("ckd_teacher", 4096, 1000, 3), ("bickd", 4096, 1000, 2), ("kd", 4096, 1000, 9),
         ("ckd_student", 8192, 1024, 2), ("ckd_teacher", 8192, 1024, 2), ("kd", 8192, 1024, 5)]


def worker(repo, loss, n, c, reps):
    sys.path.insert(0, repo)
    import torch
    import ckd_ext
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(n, c, generator=g) * 3, torch.randn(n, c, generator=g) * 3
    f = {"ckd_student": lambda s: ckd_ext.ckd_loss(s, t), "ckd_teacher": lambda s: ckd_ext.ckd_loss(s, t, anchor="teacher"),
         "bickd": lambda s: ckd_ext.bickd_loss(s, t), "kd": lambda s: ckd_ext.kd_loss(s, t)}[loss]

    def step():
        s = s0.clone().requires_grad_()
        f(s).backward()

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median": statistics.median(times), "ckd_ext": ckd_ext.__file__}))


def one(repo, case):
    out = subprocess.run([sys.executable, __file__, "--worker", repo, *map(str, case)], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["median"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_known_args()[0] if "--worker" in sys.argv else parser.parse_args()
    print("| loss | N x C | before (ms) | after (ms) | after / before |\n|---|---|---|---|---|")
    for case in CASES:
        b1, a1, a2, b2 = one(args.before, case), one(args.after, case), one(args.after, case), one(args.before, case)
        print(f"| {case[0]} | {case[1]}x{case[2]} | {statistics.median([b1, b2]) * 1e3:.1f} | "
              f"{statistics.median([a1, a2]) * 1e3:.1f} | {statistics.median([a1 / b1, a2 / b2]):.2f}x |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        repo, loss, n, c, reps = sys.argv[2:7]
        worker(repo, loss, int(n), int(c), int(reps))
    else:
        main()
