"""Token-level distillation demo: a small causal teacher LM and a smaller student, distilled through the fused-linear
losses (hidden states and LM heads in, no logits held by the loss).

    ckd-train-lm                                   # = python -m ckd_ext.demos.lm: methods ce, kd, kd+ckd; seeds 0,1
    ckd-train-lm --methods ce,kd --seeds 0,1,2 --out runs/lm

Data: the Python standard library's own source files (on every machine with Python, nothing is downloaded), split
by file into training and validation text, tokenised by a byte-level BPE vocabulary trained on the training text
with the ``tokenizers`` package. The teacher is trained first with cross-entropy, then frozen; each student is
trained from the same initialisation per seed with

    ce       CE(student logits, next token)                                         (the student alone)
    kd       ce_weight * CE + kd_weight * KD(student || teacher) over the tokens    fused_linear_kd_loss
    kd+ckd   the above + ckd_weight * CKD(student, teacher) over the batch's tokens  + fused_linear_ckd_loss
    kd-topk  ce_weight * CE + kd_weight * top-k KD against a teacher file            fused_linear_topk_kd_loss
             (the teacher's top --topk-k ids and log-probabilities of fixed training windows, written once by
             teacher_topk to a safetensors file; no teacher model while the student trains)
    kd+ckd-topk  kd-topk + ckd_weight * top-k CKD (student anchor) from the same file   + fused_linear_topk_ckd_loss
             (the file then also holds each token's log-normaliser and logit sum and sum of squares)

KD is each divergence of --divergences (forward_kl, reverse_kl, jsd with --jsd-beta, skew_kl with --skew-alpha, tvd;
docs/math.md 3.1), one row per KD method and divergence:

    ckd-train-lm --methods kd,kd-topk --divergences forward_kl,reverse_kl,jsd   # live teacher vs teacher file

and the validation perplexity (exp of the mean next-token cross-entropy) is printed per row, mean +- std over
seeds. See docs/training-lm.md. Needs the ``lm`` extra (tokenizers).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .._extension import require_extension
from ..divergences import DEFAULT_ALPHA, DEFAULT_BETA, DIVERGENCES
from ..fused_linear import (fused_linear_ckd_loss, fused_linear_kd_loss, fused_linear_topk_ckd_loss,
                            fused_linear_topk_kd_loss, teacher_topk)
from .._validation import TAILS
from .models import CausalLM
from .cli import Help, Threads, count, listed, open_unit, positive, seed_list, weight

METHODS = ("ce", "kd", "kd+ckd", "kd-topk", "kd+ckd-topk")
DEFAULT_METHODS = ("ce", "kd", "kd+ckd")
# The methods with a KD term: each runs once per divergence of --divergences.
KD_METHODS = ("kd", "kd+ckd", "kd-topk", "kd+ckd-topk")
# The methods trained from the teacher file instead of the teacher model.
TEACHER_FILE_METHODS = ("kd-topk", "kd+ckd-topk")
# The teacher file's per-token tensors in teacher_topk's order (TeacherTopK's fields); the last three, the moments
# top-k CKD needs, only when a method uses them.
TEACHER_FILE_TENSORS = ("ids", "logprobs", "log_normalizer", "logit_sum", "logit_square_sum")
STORED_DTYPES = {"ids": torch.int32, "logprobs": torch.bfloat16}  # the moments: float32


def divergence_name(text: str) -> str:
    if text not in DIVERGENCES:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(DIVERGENCES)}, got {text!r}")
    return text


def row_label(method: str, divergence) -> str:
    """A result row's name: the method, with the divergence where it is not forward KL (the KD of the methods'
    table, so the default rows keep their names)."""
    return method if divergence in (None, "forward_kl") else f"{method}/{divergence}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckd-train-lm", description=__doc__.split("\n\n")[0], formatter_class=Help)
    g = p.add_argument_group("run")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
    g.add_argument("--seeds", default="0,1", help="comma list of student seeds")
    g.add_argument("--teacher-seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for the run (0: unchanged)")
    g.add_argument("--out", default=None, help="folder for results.json (none: print only)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    d = p.add_argument_group("data and tokenizer")
    d.add_argument("--chars", type=count, default=1_500_000, help="characters of standard-library source used")
    d.add_argument("--vocab", type=count, default=2048, help="BPE vocabulary size")
    d.add_argument("--context", type=count, default=64, help="tokens per training window")
    d.add_argument("--val-tokens", type=count, default=32768, help="validation tokens (at most)")
    m = p.add_argument_group("models")
    m.add_argument("--teacher-width", type=count, default=128)
    m.add_argument("--teacher-layers", type=count, default=4)
    m.add_argument("--student-width", type=count, default=64)
    m.add_argument("--student-layers", type=count, default=2)
    t = p.add_argument_group("training")
    t.add_argument("--batch", type=count, default=8, help="windows per step (batch x context tokens)")
    t.add_argument("--teacher-steps", type=count, default=600)
    t.add_argument("--steps", type=count, default=200, help="steps per student")
    t.add_argument("--lr", type=positive, default=3e-3, help="AdamW learning rate (cosine schedule)")
    t.add_argument("--ce-weight", type=weight, default=1.0)
    t.add_argument("--kd-weight", type=positive, default=1.0)
    t.add_argument("--kd-temperature", type=positive, default=1.0)
    t.add_argument("--ckd-weight", type=weight, default=1.0)
    t.add_argument("--ckd-tau", type=positive, default=1.0)
    t.add_argument("--ckd-anchor", choices=("student", "teacher"), default="teacher",
                   help="kd+ckd's anchor; kd+ckd-topk has only the student anchor and needs 'student'")
    t.add_argument("--topk-k", type=count, default=32, help="kd-topk: classes kept per token in the teacher file")
    t.add_argument("--topk-tail", choices=TAILS, default="bucket", help="kd-topk: what the missing mass means")
    t.add_argument("--divergences", type=listed(divergence_name), default="forward_kl",
                   help=f"comma list of KD's divergences ({', '.join(DIVERGENCES)}): each KD method runs once per "
                        "divergence")
    t.add_argument("--jsd-beta", type=open_unit, default=DEFAULT_BETA, help="jsd: the teacher's share of the mixture")
    t.add_argument("--skew-alpha", type=open_unit, default=DEFAULT_ALPHA, help="skew_kl: the teacher's share")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    a.method_list = [x.strip() for x in a.methods.split(",") if x.strip()]
    unknown = [x for x in a.method_list if x not in METHODS]
    if not a.method_list or unknown:
        p.error(f"--methods must list some of {', '.join(METHODS)}, got {a.methods!r}")
    if "kd+ckd-topk" in a.method_list and a.ckd_anchor != "student":
        # no silent switch: kd+ckd beside it would keep the teacher anchor, and the rows would differ in two things
        p.error("--methods kd+ckd-topk needs --ckd-anchor student (top-k CKD has no teacher anchor, docs/topk.md)")
    a.seed_list = seed_list(a.seeds, p)
    return a


# ------------------------------------------------------------------------------------------------ data
def stdlib_text(chars: int) -> Tuple[str, str]:
    """(training, validation) text: the standard library's top-level .py files in name order, up to `chars`
    characters; every tenth file is validation (split by file, so no window straddles the two)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts, total = [], 0
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        total += len(texts[-1])
        if total >= chars:
            break
    held_out = set(range(9, len(texts), 10)) or {len(texts) - 1}
    train = [t for i, t in enumerate(texts) if i not in held_out]
    val = [t for i, t in enumerate(texts) if i in held_out]
    if not train or not val:
        raise SystemExit(f"ckd-train-lm: found too little standard-library source under "
                         f"{sysconfig.get_paths()['stdlib']} ({total} characters)")
    return "\n".join(train), "\n".join(val)


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE vocabulary of `vocab` entries trained on `text` (every byte is a token, so nothing is
    out of vocabulary)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise SystemExit("ckd-train-lm needs the tokenizers package: pip install 'ckd_ext[lm]'") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    lines = text.splitlines(keepends=True)
    tokenizer.train_from_iterator((lines[i:i + 1000] for i in range(0, len(lines), 1000)), trainer=trainer)
    return tokenizer


def encode(tokenizer, text: str) -> torch.Tensor:
    lines = text.splitlines(keepends=True)
    ids: List[int] = []
    for i in range(0, len(lines), 1000):
        ids.extend(tokenizer.encode("".join(lines[i:i + 1000])).ids)
    return torch.tensor(ids, dtype=torch.int64)


def windows(ids: torch.Tensor, context: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of context + 1 tokens (inputs and their next tokens)."""
    starts = torch.randint(0, ids.numel() - context - 1, (batch,), generator=generator)
    return torch.stack([ids[s:s + context + 1] for s in starts.tolist()])


def validation_windows(ids: torch.Tensor, context: int, max_tokens: int) -> torch.Tensor:
    count_ = min(ids.numel() - 1, max_tokens) // context
    return ids[:count_ * context + 1].unfold(0, context + 1, context)


# -------------------------------------------------------------------------------------------- training
@torch.no_grad()
def perplexity(model: CausalLM, val: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, val.shape[0], batch):
        w = val[i:i + batch]
        logits = F.linear(model(w[:, :-1]), model.head.weight)
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        tokens += w[:, 1:].numel()
    model.train()
    return math.exp(total / tokens)


def write_teacher_file(teacher: CausalLM, ids: torch.Tensor, a, path: Path, batch: int = 64) -> int:
    """The teacher's top-k (int32 ids, bfloat16 log-probabilities at --kd-temperature, as a top-k dataset stores
    them) of every non-overlapping training window, with the windows, in one safetensors file; for kd+ckd-topk also
    the moments (float32: the positive is rebuilt from the sum and the norm is the square root of the sum of squares
    of up to V logits, which bfloat16's 8 bits would spoil, docs/topk.md). Returns its bytes."""
    from safetensors.torch import save_file

    train = validation_windows(ids, a.context, ids.numel())
    moments = "kd+ckd-topk" in a.method_list
    stored = {name: [] for name in (TEACHER_FILE_TENSORS if moments else TEACHER_FILE_TENSORS[:2])}
    with torch.no_grad():
        for i in range(0, train.shape[0], batch):
            top = teacher_topk(teacher(train[i:i + batch, :-1]), teacher.head.weight, a.topk_k,
                               temperature=a.kd_temperature, moments=moments)
            for name, values in stored.items():
                values.append(getattr(top, name).to(STORED_DTYPES.get(name, torch.float32)))
    save_file({"windows": train.contiguous(), **{name: torch.cat(v) for name, v in stored.items()}}, str(path),
              metadata={"k": str(a.topk_k), "temperature": str(a.kd_temperature)})
    return path.stat().st_size


def divergence_kwargs(a, divergence: str) -> dict:
    """The KD losses' divergence arguments: jsd takes --jsd-beta, skew_kl --skew-alpha (the others neither)."""
    extra = {"jsd": {"beta": a.jsd_beta}, "skew_kl": {"alpha": a.skew_alpha}}.get(divergence, {})
    return dict(divergence=divergence, **extra)


def distillation_loss(method: str, a, hidden, labels, student: CausalLM, teacher_hidden, teacher: CausalLM,
                      divergence: str = "forward_kl"):
    """The method's objective from the student's and the teacher's last hidden states (the heads' logits are never
    materialised by the fused-linear losses), KD with `divergence`; for the teacher-file methods `teacher_hidden`
    is the stored (ids, logprobs) and for kd+ckd-topk the three moments after them."""
    hs = hidden.flatten(0, 1)
    if method == "ce":
        return a.ce_weight * F.cross_entropy(F.linear(hs, student.head.weight), labels.flatten())
    if method in TEACHER_FILE_METHODS:
        top = [x.flatten(0, 1) for x in teacher_hidden]
        loss = a.kd_weight * fused_linear_topk_kd_loss(
            hs, student.head.weight, top[0], top[1], temperature=a.kd_temperature, tail=a.topk_tail,
            **divergence_kwargs(a, divergence), labels=labels.flatten(), ce_weight=a.ce_weight / a.kd_weight)
        if method == "kd+ckd-topk" and a.ckd_weight:
            loss = loss + a.ckd_weight * fused_linear_topk_ckd_loss(
                hs, student.head.weight, *top, temperature=a.kd_temperature, tau=a.ckd_tau)
        return loss
    ht = teacher_hidden.flatten(0, 1)
    # kd_weight * KD + ce_weight * CE, both means over the same tokens: the fused loss adds ce_weight' * CE to KD
    loss = a.kd_weight * fused_linear_kd_loss(
        hs, student.head.weight, ht, teacher.head.weight, temperature=a.kd_temperature, labels=labels.flatten(),
        ce_weight=a.ce_weight / a.kd_weight, **divergence_kwargs(a, divergence))
    if method == "kd+ckd" and a.ckd_weight:
        loss = loss + a.ckd_weight * fused_linear_ckd_loss(
            hs, student.head.weight, ht, teacher.head.weight, tau=a.ckd_tau, anchor=a.ckd_anchor)
    return loss


def train_model(model: CausalLM, ids, a, steps: int, seed: int, log, *, method="ce", teacher=None,
                teacher_file=None, divergence="forward_kl") -> dict:
    """AdamW with a cosine schedule over `steps` windows batches drawn with `seed`; returns timing. The teacher-file
    methods draw their batches from the windows of `teacher_file` (the loaded safetensors dict) and their stored
    top-k."""
    generator = torch.Generator().manual_seed(seed + 12345)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_seconds, started = 0.0, time.perf_counter()
    for step in range(steps):
        if method in TEACHER_FILE_METHODS:
            rows = torch.randint(0, teacher_file["windows"].shape[0], (a.batch,), generator=generator)
            w = teacher_file["windows"][rows]
        else:
            w = windows(ids, a.context, a.batch, generator)
        inputs, labels = w[:, :-1], w[:, 1:]
        hidden = model(inputs)
        teacher_hidden = None
        if method in TEACHER_FILE_METHODS:
            teacher_hidden = tuple(teacher_file[name][rows] for name in TEACHER_FILE_TENSORS if name in teacher_file)
        elif teacher is not None and method != "ce":
            with torch.no_grad():
                teacher_hidden = teacher(inputs)
        t0 = time.perf_counter()
        loss = distillation_loss(method, a, hidden, labels, model, teacher_hidden, teacher, divergence)
        loss_seconds += time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"    step {step + 1}/{steps}: loss {loss.item():.3f}")
    return {"seconds": time.perf_counter() - started, "loss_ms_per_step": 1e3 * loss_seconds / steps}


def new_model(a, role: str, vocab: int, seed: int) -> CausalLM:
    torch.manual_seed(seed)
    width, layers = (a.teacher_width, a.teacher_layers) if role == "teacher" else (a.student_width, a.student_layers)
    return CausalLM(vocab, width, layers, a.context)


def format_table(results: dict) -> str:
    rows = [("method", "divergence", "val perplexity (mean +- std)", "per seed", "loss ms/step")]
    t = results["teacher"]
    rows.append(("teacher", "", f"{t['val_ppl']:.2f}", "", ""))
    for label, runs in results["methods"].items():
        ppl = [r["val_ppl"] for r in runs]
        std = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        rows.append((runs[0]["method"], runs[0]["divergence"] or "", f"{statistics.mean(ppl):.2f} +- {std:.2f}",
                     ", ".join(f"{x:.2f}" for x in ppl), f"{statistics.mean(r['loss_ms_per_step'] for r in runs):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> dict:
    a = parse_args(argv)
    require_extension()  # the fused-linear losses need the compiled ops; fail before any training
    log = (lambda *_: None) if a.quiet else (lambda msg: print(msg, flush=True))
    with Threads(a.threads):
        train_text, val_text = stdlib_text(a.chars)
        tokenizer = train_tokenizer(train_text, a.vocab)
        vocab = tokenizer.get_vocab_size()
        train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
        val = validation_windows(val_ids, a.context, a.val_tokens)
        log(f"data: {len(train_text)} + {len(val_text)} characters of standard-library source, BPE vocabulary "
            f"{vocab}, {train_ids.numel()} training and {val.shape[0] * a.context} validation tokens")
        teacher = new_model(a, "teacher", vocab, a.teacher_seed)
        log(f"teacher ({teacher.num_parameters()} parameters): {a.teacher_steps} steps")
        timing = train_model(teacher, train_ids, a, a.teacher_steps, a.teacher_seed, log)
        teacher.eval().requires_grad_(False)
        results = {"config": {k: v for k, v in vars(a).items()},
                   "teacher": dict(val_ppl=perplexity(teacher, val), parameters=teacher.num_parameters(), **timing),
                   "methods": {}}
        log(f"teacher validation perplexity {results['teacher']['val_ppl']:.2f}")
        teacher_file = None
        if any(m in TEACHER_FILE_METHODS for m in a.method_list):
            teacher_file = _teacher_file(teacher, train_ids, a, results, log)
        for method, divergence in ((m, d) for m in a.method_list
                                   for d in (a.divergences if m in KD_METHODS else [None])):
            label = row_label(method, divergence)
            for seed in a.seed_list:
                student = new_model(a, "student", vocab, seed)
                log(f"{label} seed {seed} (student, {student.num_parameters()} parameters)")
                timing = train_model(student, train_ids, a, a.steps, seed, log, method=method, teacher=teacher,
                                     teacher_file=teacher_file, divergence=divergence)
                run = dict(method=method, divergence=divergence, seed=seed, val_ppl=perplexity(student, val), **timing)
                results["methods"].setdefault(label, []).append(run)
                log(f"    validation perplexity {run['val_ppl']:.2f}")
    print(format_table(results))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _teacher_file(teacher: CausalLM, train_ids, a, results: dict, log) -> dict:
    """Writes the teacher file (into --out, or a temporary folder) and loads it back, as a separate run would."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(a.out or scratch) / "teacher_topk.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = write_teacher_file(teacher, train_ids, a, path)
        stored = load_file(str(path))
    results["teacher"]["topk_file"] = dict(k=a.topk_k, bytes=size, windows=stored["windows"].shape[0])
    log(f"teacher file: top-{a.topk_k} of {stored['windows'].shape[0]} windows, {size / 2 ** 20:.1f} MiB")
    return stored


def cli() -> int:
    """The `ckd-train-lm` console script (exits 0; main returns the results)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
