#!/usr/bin/env python3
"""How good is CKD from a top-k teacher (docs/math.md 9.6) on a real language model's teacher? Trains the LM demo's
teacher (ckd_ext.demos.lm: standard-library source, byte-level BPE) and a student, then on validation tokens compares,
for each k, the top-k form against exact CKD (student anchor) on the same logits, everything in float64 through the
oracle (ckd_ext.reference: exact CKD on the teacher's full logits; top-k CKD on its top-k and moments), so that only
the approximation is measured:

    positive      |pos~ - pos| / |pos| per token (median, 90th percentile), and |pos~ - pos| in cosine units
    loss          |L~ - L| / |L| of the batch's mean loss
    gradient      ||g~ - g|| / ||g|| (normwise) of d loss / d student logits, and the cosine between them

for a student at initialisation and after --student-steps CE steps, at tau = 1 (the demo's) and tau = 0.1.

    python benchmarks/topk_ckd_study.py                                  # the numbers in docs/topk.md
    python benchmarks/topk_ckd_study.py --teacher-steps 100 --student-steps 20 --tokens 128   # a quick look
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
from ckd_ext import reference  # noqa: E402
from ckd_ext.demos import lm  # noqa: E402

KS = (8, 32, 128, 512)
TAUS = (1.0, 0.1)


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, tau: float) -> dict:
    """Top-k CKD against exact CKD (student anchor) on the same float64 logits (N, V)."""
    s = student_logits.double().detach().requires_grad_()
    t = teacher_logits.double()
    vocab = t.shape[1]
    top = reference.teacher_topk(t, torch.eye(vocab, dtype=torch.float64), k, moments=True)
    t_tilde = reference.topk_teacher_logits(top.ids, top.logprobs, top.log_normalizer, top.logit_sum, vocab, 1.0)
    exact_cos = (t * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1))
    approx_cos = (t_tilde * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1))
    positive = ((approx_cos - exact_cos).abs() / exact_cos.abs()).tolist()
    exact = reference.ckd_loss(s, t, tau=tau, anchor="student")
    approx = reference.topk_ckd_loss(s, *top, tau=tau)
    (g_exact,) = torch.autograd.grad(exact, s)
    (g_approx,) = torch.autograd.grad(approx, s)
    return dict(
        positive_median=statistics.median(positive), positive_p90=quantile(positive, 0.9),
        cosine_error_median=statistics.median((approx_cos - exact_cos).abs().tolist()),
        exact_cosine_median=statistics.median(exact_cos.tolist()),
        loss=abs(approx.item() - exact.item()) / abs(exact.item()),
        gradient=((g_approx - g_exact).norm() / g_exact.norm()).item(),
        gradient_cosine=F.cosine_similarity(g_approx.flatten(), g_exact.flatten(), dim=0).item(),
        tail_share=((t - t_tilde).norm(dim=1) / t.norm(dim=1)).median().item())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--student-steps", type=int, default=200)
    p.add_argument("--tokens", type=int, default=512, help="validation tokens measured (windows of the context)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    a = lm.parse_args(["--teacher-steps", str(args.teacher_steps), "--steps", str(args.student_steps)])
    torch.set_num_threads(args.threads)
    train_text, val_text = lm.stdlib_text(a.chars)
    tokenizer = lm.train_tokenizer(train_text, a.vocab)
    vocab = tokenizer.get_vocab_size()
    train_ids, val_ids = lm.encode(tokenizer, train_text), lm.encode(tokenizer, val_text)
    val = lm.validation_windows(val_ids, a.context, args.tokens)
    log = print
    teacher = lm.new_model(a, "teacher", vocab, a.teacher_seed)
    lm.train_model(teacher, train_ids, a, a.teacher_steps, a.teacher_seed, log)
    teacher.eval().requires_grad_(False)
    print(f"teacher: {a.teacher_steps} steps, validation perplexity {lm.perplexity(teacher, val):.2f}, V = {vocab}, "
          f"{val.shape[0] * a.context} tokens measured")
    with torch.no_grad():
        teacher_logits = F.linear(teacher(val[:, :-1]), teacher.head.weight).flatten(0, 1)
    student = lm.new_model(a, "student", vocab, 0)
    rows = []
    for stage in ("init", f"CE {a.steps} steps"):
        if stage != "init":
            lm.train_model(student, train_ids, a, a.steps, 0, log)
            student.eval()
        with torch.no_grad():
            student_logits = F.linear(student(val[:, :-1]), student.head.weight).flatten(0, 1)
        for tau in TAUS:
            for k in KS:
                r = measure(student_logits, teacher_logits, k, tau)
                rows.append((stage, tau, k, r))
                print(f"{stage:>14} tau={tau:<4} k={k:<4} tail |t-t~|/|t| {r['tail_share']:.3f}  positive rel err "
                      f"median {r['positive_median']:.2e} p90 {r['positive_p90']:.2e} (cosine err "
                      f"{r['cosine_error_median']:.2e} of {r['exact_cosine_median']:.3f})  loss rel err "
                      f"{r['loss']:.2e}  grad rel err {r['gradient']:.2e} (cos {r['gradient_cosine']:.4f})",
                      flush=True)
    print("\n| student | tau | k | tail `|t - t~| / |t|` | positive rel. err. (median / p90) | loss rel. err. | "
          "gradient rel. err. | gradient cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, tau, k, r in rows:
        print(f"| {stage} | {tau} | {k} | {r['tail_share']:.3f} | {r['positive_median']:.1e} / "
              f"{r['positive_p90']:.1e} | {r['loss']:.1e} | {r['gradient']:.1e} | {r['gradient_cosine']:.4f} |")


if __name__ == "__main__":
    main()
