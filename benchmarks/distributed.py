#!/usr/bin/env python3
"""Communication, memory and time of the distributed modes (local, all-gather, ring), side by side in one run.

    python benchmarks/distributed.py                                  # 2 gloo ranks, 1024 rows x 4096 classes each
    python benchmarks/distributed.py --world 3 --rows 512 --classes 32000 --losses ckd

For each loss and mode, a fresh process group of --world ranks (CPU, gloo, 1 thread each) builds its float32
inputs, then runs one forward + backward and reports per rank: the bytes it sent (ckd_ext.distributed.count_bytes:
collectives counted as a bandwidth-optimal ring algorithm sends them, point-to-point as the payload), the growth of
its peak resident memory over that call (a fresh process per measurement, because the peak cannot be reset), and the
median time of --repeats further calls. Prints a markdown table (the largest value over ranks). The ranks run with
glibc's mmap threshold fixed at 128 KiB, so that every large tensor is its own mapping, returned when freed: the
peak resident memory then follows the live tensors instead of the heap's fragmentation.
"""
from __future__ import annotations

import argparse
import os
import pickle
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import ckd_ext  # noqa: E402
from ckd_ext import distributed  # noqa: E402

MODES = {"local": False, "gather": True, "ring": "ring"}
LOSSES = {"ckd": lambda s, t, mode: ckd_ext.ckd_loss(s, t, anchor="student", global_batch=mode),
          "bickd": lambda s, t, mode: ckd_ext.bickd_loss(s, t, global_batch=mode)}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(rank, world, port, args, loss, mode, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(rank)
    student = torch.randn(args.rows, args.classes, generator=generator).requires_grad_()
    teacher = torch.randn(args.rows, args.classes, generator=generator)
    dist.barrier()
    before = peak_rss_bytes()
    with distributed.count_bytes() as counter:
        LOSSES[loss](student, teacher, MODES[mode]).backward()
    grown = peak_rss_bytes() - before
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        LOSSES[loss](student, teacher, MODES[mode]).backward()
        times.append(time.perf_counter() - start)
    result = torch.tensor([counter.sent, grown, statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_bytes(pickle.dumps(result.tolist()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rows", type=int, default=1024, help="rows per rank")
    p.add_argument("--classes", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--losses", default="ckd,bickd")
    args = p.parse_args(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)  # read by glibc when each spawned rank starts
    input_mb = args.rows * args.classes * 4 / 2 ** 20
    print(f"{args.world} gloo ranks (CPU, 1 thread each), float32, {args.rows} x {args.classes} per rank "
          f"({input_mb:.1f} MiB per input), forward + backward, largest value over ranks; torch {torch.__version__}")
    print()
    print("| loss | mode | MiB sent per rank | peak memory growth (MiB) | x one input | time (s) | x local |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses.split(","):
            local_time = None
            for mode in MODES:
                out = os.path.join(tmp, f"{loss}-{mode}.pkl")
                mp.start_processes(worker, args=(args.world, free_port(), args, loss, mode, out),
                                   nprocs=args.world, start_method="spawn")
                sent, grown, seconds = pickle.loads(Path(out).read_bytes())
                local_time = local_time or seconds
                print(f"| {loss} | {mode} | {sent / 2 ** 20:.2f} | {grown / 2 ** 20:.0f} | "
                      f"{grown / 2 ** 20 / input_mb:.1f} | {seconds:.3f} | {seconds / local_time:.2f} |", flush=True)


if __name__ == "__main__":
    main()
