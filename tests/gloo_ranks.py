"""Spawning a gloo process group of CPU ranks for a test: one spawn per world size runs every case of a test file
(startup costs seconds), with a deadline on the whole group and a timeout on every collective, so that a deadlock
fails the test instead of hanging CI."""
import datetime
import pickle
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120  # per process group
# Every collective of the workers times out after this long (the process group's own timeout, default 30 minutes):
# a rank left waiting by a mismatched peer fails its case well within TIMEOUT_S instead of hanging.
COLLECTIVE_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, port: int) -> None:
    """This rank's part of the gloo process group (one thread: the ranks share the machine's cores)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def save(out_dir, results) -> None:
    """Rank 0's results, for run() to return."""
    Path(out_dir, "results.pkl").write_bytes(pickle.dumps(results))


def run(worker, world: int, out_dir: Path, timeout_s: float = TIMEOUT_S):
    """worker(rank, world, port, out_dir) on `world` spawned processes; returns what rank 0 saved."""
    context = mp.start_processes(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {timeout_s} s (a deadlock?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return pickle.loads((Path(out_dir) / "results.pkl").read_bytes())
