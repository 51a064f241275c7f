#!/usr/bin/env python3
"""KD from an offline top-k teacher at the lm shape: forward + backward from student hidden states and head, with the
teacher as (ids, log-probabilities) of its k = 64 top classes, side by side in one process (providers interleaved
call by call, so that load changes hit all of them alike):

    fused_linear   ckd_ext.fused_linear_topk_kd_loss (tokens in chunks, never N x V)
    logits         F.linear to materialised student logits, then ckd_ext.topk_kd_loss on them
    eager          F.linear to materialised logits, then a plain-PyTorch top-k KD with the bucket tail (TRL's
                   `loss_add_tail` form: log_softmax, gather, log1mexp of the top-k log-mass), autograd backward

All compute forward KL with the bucket tail at temperature 1 (one number, checked to agree). Peak memory is the
process's high-water mark during one forward + backward beyond the inputs (benchmarks/measure.py measure_peak).

    python benchmarks/topk_lm.py                     # N = 4096, V = 32000, H = 512, k = 64, float32 and bfloat16
    python benchmarks/topk_lm.py --tokens 256 --reps 2   # a quick look
    python benchmarks/topk_lm.py --device cuda --tokens 16384 --vocab 128256 --hidden 2048 --dtypes bfloat16
                                                     # the GPU shape (tools/gpu_check.py's topk step)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
import ckd_ext  # noqa: E402
from benchmarks.measure import measure_peak, quantiles  # noqa: E402
from ckd_ext.topk import log1mexp  # noqa: E402


def eager_topk_kd(hidden, weight, ids, logprobs):
    """The usual plain-PyTorch top-k KD on materialised logits (forward KL, bucket tail)."""
    log_q = F.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    top = log_q.gather(-1, ids)
    log_q_tail = log1mexp(top.logsumexp(-1).clamp(max=0))
    log_p_tail = log1mexp(logprobs.logsumexp(-1).clamp(max=0))
    terms = (logprobs.exp() * (logprobs - top)).sum(-1) + log_p_tail.exp() * (log_p_tail - log_q_tail)
    return terms.mean()


def providers(hidden, weight, ids, logprobs):
    return {
        "fused_linear": lambda: ckd_ext.fused_linear_topk_kd_loss(hidden, weight, ids, logprobs),
        "logits": lambda: ckd_ext.topk_kd_loss(F.linear(hidden, weight), ids, logprobs),
        "eager": lambda: eager_topk_kd(hidden, weight, ids, logprobs),
    }


def step(loss_fn, hidden, weight):
    hidden.grad = weight.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at start")
    print(f"N = {args.tokens}, V = {args.vocab}, H = {args.hidden}, k = {args.k}, torch {torch.__version__}, {where}")

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print("| dtype | provider | p50 ms [p20 .. p80] | x fused_linear | peak MiB beyond inputs | loss |")
    print("|---|---|---|---|---|---|")
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
        weight = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5 * 2).to(device, dtype)
        weight.requires_grad_()
        # a teacher close to the student: its hidden states perturbed, its top-k written by the producer
        noise = 0.3 * torch.randn(hidden.shape, generator=g).to(device, dtype)
        teacher = ckd_ext.teacher_topk(hidden.detach() + noise, weight.detach(), args.k)
        ids, logprobs = teacher.ids, teacher.logprobs
        fns = providers(hidden, weight, ids, logprobs)
        losses = {name: step(fn, hidden, weight) for name, fn in fns.items()}  # warm-up, and the values
        times = {name: [] for name in fns}
        for _ in range(args.reps):  # interleaved
            for name, fn in fns.items():
                synchronize()
                start = time.perf_counter()
                step(fn, hidden, weight)
                synchronize()
                times[name].append((time.perf_counter() - start) * 1e3)
        peaks = {}
        for name, fn in fns.items():
            peaks[name], _ = measure_peak(lambda: setattr(hidden, "grad", None) or setattr(weight, "grad", None),
                                          lambda fn=fn: fn().backward(), device.type)
        base = quantiles(times["fused_linear"])[1]
        for name in fns:
            p20, p50, p80 = quantiles(times[name])
            print(f"| {str(dtype).replace('torch.', '')} | {name} | {p50:.0f} [{p20:.0f} .. {p80:.0f}] | "
                  f"{p50 / base:.2f} | {peaks[name]:.0f} | {losses[name].item():.6f} |")
    if device.type == "cpu":
        print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
