"""Distillation demo: train a teacher, then distil students with CE, KD, CKD and BicKD.

    python -m ckd_ext.demos.classify                        # digits (bundled with scikit-learn), all methods, 3 seeds
    python -m ckd_ext.demos.classify --impl reference       # the pure-PyTorch losses instead of the fused ops
    python -m ckd_ext.demos.classify --dataset cifar100 --data-dir ~/data --teacher resnet32x4.pt
    torchrun --nproc-per-node 2 -m ckd_ext.demos.classify --ddp --global-negatives ring   # DDP, each rank a shard

Every method's objective is ``ce_weight * CE(student, y)`` plus its weighted distillation terms
(``kd``, ``ckd``, ``bickd`` or a ``+`` combination such as ``kd+bickd``; ``ce`` is the student alone).
The teacher is trained first (or loaded with ``--teacher``) and is used in eval mode under ``no_grad``.
``--ckd-weight`` and ``--ckd-tau`` take comma lists to sweep: a method with a ckd term then runs once per pair.
Prints a table (test accuracy mean +- std and min - max over seeds, time per step inside the distillation loss
call) and writes ``results.json`` and ``accuracy.png`` (learning curves, and the final accuracies on a zoomed
axis) to ``--out``. See docs/training.md.
Needs the ``train`` extra (scikit-learn, matplotlib, tqdm); CIFAR-100 also needs ``cifar`` (torchvision).

With ``--ddp`` (under torchrun) every rank trains the same student under DistributedDataParallel (gloo on CPU, NCCL
on CUDA) on its shard of each ``--batch-size`` batch; ``--global-negatives gather|ring`` makes CKD's negatives and
BicKD's column statistics span the whole batch (docs/distributed.md); rank 0 prints and writes the results.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _extension
from .cli import Help, Threads, count, count0, listed, positive, seed_list, weight
from .models import build_model

DISTILL_TERMS = ("kd", "ckd", "bickd")
GLOBAL_NEGATIVES = {"off": False, "gather": True, "ring": "ring"}  # --global-negatives -> the losses' global_batch
DEFAULT_METHODS = "ce,kd,ckd,bickd,kd+bickd"
CIFAR_FILES = ("train", "test", "meta")
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# Per-dataset defaults; the flags override them.
DATASETS = {
    "digits": dict(teacher_model="digits_teacher", student_model="digits_student", num_classes=10,
                   epochs=30, teacher_epochs=30, lr=0.05, threads=1),
    "cifar100": dict(teacher_model="resnet32x4", student_model="resnet8x4", num_classes=100,
                     epochs=240, teacher_epochs=240, lr=0.05, threads=0),
}


# ------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckd-train", description=__doc__.split("\n\n")[0], formatter_class=Help)
    g = p.add_argument_group("run")
    g.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of ce, kd, ckd, bickd or '+' combinations of the distillation terms")
    g.add_argument("--impl", choices=("fused", "reference"), default="fused",
                   help="fused: ckd_ext's compiled ops; reference: ckd_ext.reference (plain PyTorch)")
    g.add_argument("--seeds", default="0,1,2", help="comma list of student seeds")
    g.add_argument("--seed", type=int, default=None, help="a single seed (shortcut for --seeds N)")
    g.add_argument("--teacher-seed", type=int, default=0, help="seed of the teacher's training")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    g.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast for the forward")
    g.add_argument("--out", default="ckd-train-results", help="folder for results.json and accuracy.png")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    g.add_argument("--ddp", action="store_true",
                   help="DistributedDataParallel under torchrun (gloo on CPU, NCCL on CUDA): each rank trains on "
                        "its shard of every batch")
    g.add_argument("--global-negatives", choices=tuple(GLOBAL_NEGATIVES), default="off",
                   help="with --ddp: off: each rank's CKD negatives and BicKD column statistics are its own shard's "
                        "(as the CKD authors' nn.DataParallel runs); gather: the whole batch, by all-gather; ring: "
                        "the whole batch, blocks passed rank to rank (less memory)")
    g.add_argument("--threads", type=count0, default=None,
                   help="CPU threads for torch (default: 1 on digits, whose tiny ops only lose from "
                        "threading; torch's default on cifar100; 0: torch's default)")
    g = p.add_argument_group("data and models")
    g.add_argument("--dataset", choices=tuple(DATASETS), default="digits", help="digits: bundled with scikit-learn")
    g.add_argument("--data-dir", default=None,
                   help="CIFAR-100: the folder holding cifar-100-python/{train,test,meta} (never downloaded)")
    g.add_argument("--workers", type=count0, default=None, help="CIFAR loader workers (default: min(4, CPUs))")
    g.add_argument("--teacher", metavar="PATH", default=None, help="load a saved teacher instead of training")
    g.add_argument("--save-teacher", metavar="PATH", default=None, help="save the trained teacher here")
    g = p.add_argument_group("optimisation (SGD, momentum 0.9, cosine schedule, like the CKD authors)")
    g.add_argument("--epochs", type=count, default=None, help="student epochs (default: digits 30, cifar100 240)")
    g.add_argument("--teacher-epochs", type=count0, default=None, help="teacher epochs (default: as --epochs)")
    g.add_argument("--batch-size", type=count, default=64, help="training batch size")
    g.add_argument("--lr", type=positive, default=None, help="learning rate (default: 0.05)")
    g.add_argument("--weight-decay", type=weight, default=5e-4, help="SGD weight decay")
    g = p.add_argument_group("loss weights and temperatures")
    g.add_argument("--ce-weight", type=weight, default=1.0, help="weight of CE(student, labels), every method")
    g.add_argument("--kd-weight", type=weight, default=1.0, help="KD weight (T^2 scaling is inside kd_loss)")
    g.add_argument("--kd-temperature", type=positive, default=4.0, help="KD softmax temperature T")
    g.add_argument("--ckd-weight", type=listed(weight), default="10",
                   help="CKD weight (authors: 10, 50 or 100; the default is theirs, not tuned: on digits no weight "
                        "from 0.1 to 100 ends above CE alone, see docs/training.md), or a comma list to sweep: every "
                        "method with ckd then runs once per weight and --ckd-tau, one row each")
    g.add_argument("--ckd-tau", type=listed(positive), default="1",
                   help="CKD contrastive temperature (authors: 1, 2 for two pairs), or a comma list to sweep")
    g.add_argument("--ckd-anchor", choices=("teacher", "student"), default="teacher",
                   help="teacher: the authors' released code; student: the paper's statement")
    g.add_argument("--bickd-weight", type=weight, default=1.0, help="BicKD weight")
    g.add_argument("--bickd-temperature", type=positive, default=4.0, help="BicKD softmax temperature")
    g.add_argument("--bickd-tau", type=positive, default=0.1, help="BicKD contrastive temperature")
    g.add_argument("--bickd-w-sample", type=weight, default=1.0, help="BicKD sample-side weight")
    g.add_argument("--bickd-w-class", type=weight, default=1.0, help="BicKD class-side weight")
    g.add_argument("--bickd-symmetric", action="store_true", help="average BicKD with its teacher-anchored twin")
    return p


def _parse_methods(text: str, p: argparse.ArgumentParser) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        p.error("--methods is empty")
    for m in methods:
        terms = m.split("+")
        ok = m == "ce" or (all(t in DISTILL_TERMS for t in terms) and len(set(terms)) == len(terms))
        if not ok:
            p.error(f"unknown method {m!r} in --methods; expected ce, kd, ckd, bickd "
                    f"or a '+' combination of kd/ckd/bickd such as kd+bickd")
    if len(set(methods)) != len(methods):
        p.error(f"--methods lists a method twice: {text!r}")
    return methods


def _need(module: str, extra: str, p: argparse.ArgumentParser) -> None:
    if importlib.util.find_spec(module) is None:
        p.error(f"this needs the {module} package: pip install 'ckd_ext[{extra}]'")


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    """Parse and check everything that can be checked before training (errors exit with status 2); fills in
    the per-dataset defaults."""
    p = parser or build_parser()
    a = p.parse_args(argv)
    a.methods = _parse_methods(a.methods, p)
    if a.seed is not None:
        a.seeds = [a.seed]
    else:
        a.seeds = seed_list(a.seeds, p)
    if a.workers is None:
        a.workers = min(4, os.cpu_count() or 1)
    for key, value in DATASETS[a.dataset].items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    for module in ("matplotlib", "tqdm") + (("sklearn",) if a.dataset == "digits" else ()):
        _need(module, "train", p)
    if a.dataset == "cifar100":
        if a.data_dir is None:
            p.error("--dataset cifar100 needs --data-dir DIR with DIR/cifar-100-python/{train,test,meta}")
        missing = [f for f in CIFAR_FILES if not (Path(a.data_dir) / "cifar-100-python" / f).is_file()]
        if missing:
            p.error(f"--data-dir {a.data_dir}: no CIFAR-100 copy there (missing "
                    f"{', '.join('cifar-100-python/' + f for f in missing)}); expected the python version "
                    f"of CIFAR-100 unpacked as DIR/cifar-100-python/{{train,test,meta}}; nothing is downloaded")
        _need("torchvision", "cifar", p)
    elif a.data_dir is not None:
        p.error("--data-dir is only used with --dataset cifar100")
    if a.teacher is not None and not Path(a.teacher).is_file():
        p.error(f"--teacher {a.teacher}: no such file")
    if a.teacher is not None and a.save_teacher is not None:
        p.error("--save-teacher saves a trained teacher; it cannot be combined with --teacher")
    if a.global_negatives != "off" and not a.ddp:
        p.error(f"--global-negatives {a.global_negatives} needs --ddp (the batch of one process is already global)")
    if a.ddp and not all(os.environ.get(v) for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        p.error("--ddp needs the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): run "
                "torchrun --nproc-per-node N -m ckd_ext.demos.classify --ddp ...")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return a


def loss_ops(impl: str):
    """The module providing ckd_loss / bickd_loss / kd_loss (same signatures for both impls); ImportError,
    with the reason and the build command, when the fused ops cannot run."""
    if impl == "reference":
        return importlib.import_module("ckd_ext.reference")
    reason = _extension.unavailable_reason()
    if reason:
        raise ImportError(f"the fused ops need the compiled extension ckd_ext._C: {reason}; "
                          f"or use --impl reference")
    return importlib.import_module("ckd_ext")


@dataclasses.dataclass(frozen=True)
class Fit:
    """How `fit` trains and `evaluate` tests a model (the optimisation flags, --device, --amp, --quiet)."""
    device: str
    lr: float
    weight_decay: float
    ce_weight: float
    amp: str
    quiet: bool
    ddp: bool


@dataclasses.dataclass(frozen=True)
class Terms:
    """Weights and temperatures of the distillation terms (the --kd-*, --ckd-* and --bickd-* flags)."""
    kd_weight: float
    kd_temperature: float
    ckd_weight: float
    ckd_tau: float
    ckd_anchor: str
    bickd_weight: float
    bickd_temperature: float
    bickd_tau: float
    bickd_w_sample: float
    bickd_w_class: float
    bickd_symmetric: bool
    global_negatives: str


def _config(cls, args: argparse.Namespace, **values):
    """A config dataclass filled from `values` and, for the other fields, the parsed flags of the same names."""
    return cls(**{f.name: values[f.name] if f.name in values else getattr(args, f.name)
                  for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the results: a method and the weights and temperatures it trains with; `label` names the row."""
    label: str
    method: str
    terms: Terms


def settings(a: argparse.Namespace) -> list[Setting]:
    """The rows to run: each of --methods once, except that a method with a ckd term runs once per
    (--ckd-weight, --ckd-tau) pair when those are lists, labelled with the pair."""
    pairs = [(w, tau) for w in a.ckd_weight for tau in a.ckd_tau]
    rows = []
    for method in a.methods:
        if "ckd" not in method.split("+"):
            rows.append(Setting(method, method, _config(Terms, a, ckd_weight=pairs[0][0], ckd_tau=pairs[0][1])))
            continue
        for w, tau in pairs:
            label = method if len(pairs) == 1 else f"{method} w={w:g} tau={tau:g}"
            rows.append(Setting(label, method, _config(Terms, a, ckd_weight=w, ckd_tau=tau)))
    return rows


# ----------------------------------------------------------------------------------------------- data
class TensorLoader:
    """Mini-batches of in-memory tensors; reshuffled each epoch from a seeded generator."""

    def __init__(self, x, y, batch_size, shuffle=False, drop_last=False, seed=0):
        self.x, self.y, self.bs, self.shuffle, self.drop_last = x, y, batch_size, shuffle, drop_last
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        n = len(self.y)
        return n // self.bs if self.drop_last else math.ceil(n / self.bs)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.gen) if self.shuffle else torch.arange(len(self.y))
        for i in range(len(self)):
            idx = order[i * self.bs:(i + 1) * self.bs].to(self.x.device)
            yield self.x[idx], self.y[idx]


def load_data(dataset: str, device: str, batch_size: int, data_dir=None, workers: int = 0):
    """(train_loader_factory(seed), test_loader, description). Training batches drop the last partial one.
    ValueError where the CIFAR-100 copy in `data_dir` cannot be read."""
    if dataset == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        x, y = load_digits(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=0)
        t = lambda v, dt: torch.as_tensor(v, dtype=dt, device=device)  # noqa: E731
        xtr, xte, ytr, yte = t(xtr, torch.float32), t(xte, torch.float32), t(ytr, torch.long), t(yte, torch.long)
        test = TensorLoader(xte, yte, 512)
        train = lambda seed: TensorLoader(xtr, ytr, batch_size, True, True, seed)  # noqa: E731
        return train, test, f"digits ({len(ytr)} train / {len(yte)} test, 8x8, 10 classes)"

    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import CIFAR100
    norm = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm])
    try:
        trainset = CIFAR100(data_dir, train=True, transform=augment, download=False)
        testset = CIFAR100(data_dir, train=False, transform=T.Compose(norm), download=False)
    except Exception as e:  # torchvision: "Dataset not found or corrupted", unpickling errors, ...
        raise ValueError(f"the CIFAR-100 copy could not be read ({e}); expected the python version unpacked "
                         f"as DIR/cifar-100-python/{{train,test,meta}}") from e
    kw = dict(num_workers=workers, pin_memory=device == "cuda", persistent_workers=workers > 0)
    test = DataLoader(testset, batch_size=256, **kw)
    train = lambda seed: DataLoader(trainset, batch_size, shuffle=True, drop_last=True,  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed), **kw)
    return train, test, f"cifar100 ({len(trainset)} train / {len(testset)} test)"


# -------------------------------------------------------------------------------------------- training
def distillation(method: str, ops, terms: Terms):
    """fn(student_logits, teacher_logits) -> weighted sum of the method's distillation terms, or None."""
    if method == "ce":
        return None
    mode = GLOBAL_NEGATIVES[terms.global_negatives]
    calls = {
        "kd": lambda s, t: terms.kd_weight * ops.kd_loss(s, t, temperature=terms.kd_temperature),
        "ckd": lambda s, t: terms.ckd_weight * ops.ckd_loss(s, t, tau=terms.ckd_tau, anchor=terms.ckd_anchor,
                                                            global_batch=mode),
        "bickd": lambda s, t: terms.bickd_weight * ops.bickd_loss(
            s, t, temperature=terms.bickd_temperature, tau=terms.bickd_tau, w_sample=terms.bickd_w_sample,
            w_class=terms.bickd_w_class, symmetric=terms.bickd_symmetric, global_batch=mode),
    }
    return lambda s, t: sum(calls[name](s, t) for name in method.split("+"))


def evaluate(model, test, cfg: Fit) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad(), torch.autocast(cfg.device, torch.bfloat16, enabled=cfg.amp == "bf16"):
        for x, y in test:
            x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def fit(model, train, test, cfg: Fit, *, epochs, seed, distill=None, teacher=None, desc="", max_steps=None):
    """Train `model` with SGD + cosine; returns {"test_acc": per epoch, "loss": per step, "loss_time": s, ...}.

    With `distill`, the objective is ce_weight * CE + distill(student_logits, teacher_logits) and the time
    spent inside the distill call (forward only) is accumulated. With `max_steps`, stops after that many
    steps (used by `loss_trajectory`). With `cfg.ddp`, `model` trains under DistributedDataParallel, each rank on
    its shard of every batch (every rank draws the same batches from the same seed).
    """
    from tqdm.auto import tqdm
    device = torch.device(cfg.device)
    torch.manual_seed(seed)
    loader = train(seed)
    world, rank = (dist.get_world_size(), dist.get_rank()) if cfg.ddp else (1, 0)
    net = torch.nn.parallel.DistributedDataParallel(model) if cfg.ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    hist = dict(test_acc=[], loss=[], loss_time=0.0, steps=0)
    bars = not cfg.quiet and sys.stderr.isatty()
    for epoch in range(epochs):
        model.train()
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, disable=not bars)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
            with torch.autocast(**amp):
                logits = net(x)
                loss = cfg.ce_weight * F.cross_entropy(logits, y)
                if distill is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    _extension.synchronize(device)
                    start = time.perf_counter()
                    d = distill(logits, t_logits)
                    _extension.synchronize(device)
                    hist["loss_time"] += time.perf_counter() - start
                    loss = loss + d
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist["loss"].append(loss.item())
            hist["steps"] += 1
            if hist["steps"] % 10 == 0:
                bar.set_postfix(loss=f"{hist['loss'][-1]:.4f}")
            if max_steps is not None and hist["steps"] >= max_steps:
                return hist
        sched.step()
        hist["test_acc"].append(evaluate(model, test, cfg))
    return hist


def new_model(arch: str, num_classes: int, seed: int, device: str):
    """`arch` built after torch.manual_seed(seed), on `device`."""
    torch.manual_seed(seed)
    return build_model(arch, num_classes).to(device)


def load_teacher(path: str, arch: str, num_classes: int, device: str):
    """A teacher saved by `save_teacher`; ValueError where `path` cannot be read or holds no `arch` teacher."""
    teacher = build_model(arch, num_classes).to(device)
    try:
        state = torch.load(path, map_location=device)
    except Exception as e:
        raise ValueError(f"cannot be read ({e})") from e
    if not isinstance(state, dict) or state.get("arch") != arch:
        raise ValueError(f"not a saved {arch!r} teacher (--save-teacher writes one)")
    teacher.load_state_dict(state["state_dict"])
    return teacher


def save_teacher(teacher, arch: str, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(arch=arch, state_dict=teacher.state_dict()), path)


@contextlib.contextmanager
def _process_group(a: argparse.Namespace):
    """With --ddp: the default process group (from torchrun's environment) for the run, and --quiet on every rank
    but 0, which alone reports."""
    if not a.ddp:
        yield
        return
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    a.world_size = dist.get_world_size()
    a.quiet = a.quiet or dist.get_rank() != 0
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mode(a: argparse.Namespace) -> str:
    """Which distributed mode ran, for the results header."""
    if not a.ddp:
        return "single process"
    negatives = {"off": "each rank's own shard (local)", "gather": "the global batch, all-gather",
                 "ring": "the global batch, ring"}[a.global_negatives]
    return (f"DDP, {a.world_size} ranks ({dist.get_backend()}), batch {a.batch_size} split over the ranks; "
            f"CKD negatives / BicKD column statistics: {negatives}")


# --------------------------------------------------------------------------------------------- session
@dataclasses.dataclass
class Session:
    """A checked command line ready to run: its loss ops, data and (frozen) teacher. Made by `session`."""
    args: argparse.Namespace
    ops: object
    fit: Fit
    settings: list[Setting]
    train: Callable
    test: Iterable
    data_desc: str
    teacher: torch.nn.Module
    teacher_record: dict

    def student(self, setting: Setting, seed: int, max_steps=None) -> dict:
        """Train a fresh student with `setting`; `fit`'s history."""
        a = self.args
        return fit(new_model(a.student_model, a.num_classes, seed, a.device), self.train, self.test, self.fit,
                   epochs=a.epochs, seed=seed, distill=distillation(setting.method, self.ops, setting.terms),
                   teacher=self.teacher, desc=f"{setting.label} seed {seed}", max_steps=max_steps)


@contextlib.contextmanager
def session(argv=None):
    """Parse `argv`, load the loss ops and the data, load or train the teacher, and yield the `Session`, with
    torch's thread count set for the run. What the loss ops, data and teacher code reject (--impl, --data-dir,
    --teacher) is reported as a usage error (exit 2), like a bad flag."""
    parser = build_parser()
    a = parse_args(argv, parser)
    try:
        ops = loss_ops(a.impl)
    except ImportError as e:
        parser.error(f"--impl {a.impl}: {e}")
    cfg = _config(Fit, a)
    with Threads(a.threads), _process_group(a):
        try:
            train, test, data_desc = load_data(a.dataset, a.device, a.batch_size, a.data_dir, a.workers)
        except ValueError as e:
            parser.error(f"--data-dir {a.data_dir}: {e}")
        if a.teacher is not None:
            try:
                teacher = load_teacher(a.teacher, a.teacher_model, a.num_classes, a.device)
            except ValueError as e:
                parser.error(f"--teacher {a.teacher}: {e}")
            record = dict(source=a.teacher, history=[])
        else:
            teacher = new_model(a.teacher_model, a.num_classes, a.teacher_seed, a.device)
            hist = fit(teacher, train, test, cfg, epochs=a.teacher_epochs, seed=a.teacher_seed, desc="teacher")
            record = dict(source="trained", history=hist["test_acc"])
            if a.save_teacher:
                save_teacher(teacher, a.teacher_model, a.save_teacher)
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        record["test_acc"] = evaluate(teacher, test, cfg)
        yield Session(a, ops, cfg, settings(a), train, test, data_desc, teacher, record)


def loss_trajectory(argv=(), steps=20) -> dict[str, list[float]]:
    """Per-step total training loss for each row (each of --methods, or its --ckd-weight/--ckd-tau pairs) over the
    first `steps` steps of the first seed, by row label.

    Uses the same path as `main` (teacher trained per --teacher-epochs). For tests comparing --impl fused
    with --impl reference: with the same seeds both give the same trajectory up to rounding.
    """
    with session(list(argv)) as s:
        return {row.label: s.student(row, s.args.seeds[0], max_steps=steps)["loss"] for row in s.settings}


# -------------------------------------------------------------------------------------------- results
def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _label(row: str) -> str:
    return "ce (student alone)" if row == "ce" else row


def format_table(results) -> str:
    rows = [("method", "test acc (%)", "min - max", "loss ms/step")]
    rows.append(("teacher", f"{results['teacher']['test_acc']:.2f}", "-", "-"))
    for m, s in results["summary"].items():
        ms = "-" if s["method"] == "ce" else f"{s['loss_ms_per_step']:.3f}"
        rows.append((_label(m), f"{s['test_acc_mean']:.2f} +- {s['test_acc_std']:.2f}",
                     f"{s['test_acc_min']:.2f} - {s['test_acc_max']:.2f}", ms))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([f"{r[0]:<{w[0]}}"] + [f"{c:>{n}}" for c, n in zip(r[1:], w[1:])]) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def final_accuracy_limits(results, pad_fraction=0.08, min_pad=0.25) -> tuple[float, float]:
    """y-limits of the final-accuracy panel: every seed's final accuracy and the teacher's, padded by
    `pad_fraction` of their span (at least `min_pad` points), so that differences of a fraction of a point show."""
    values = [r["final_test_acc"] for r in results["runs"]] + [results["teacher"]["test_acc"]]
    low, high = min(values), max(values)
    pad = max(pad_fraction * (high - low), min_pad)
    return max(low - pad, 0.0), min(high + pad, 100.0)


def figure(results):
    """The results figure: test accuracy per epoch (mean over seeds, +- std band) on the left; on the right each
    row's final test accuracy (mean, error bars from the lowest to the highest seed, every seed a dot) on a y-axis
    zoomed to the final accuracies. The teacher is dashed in both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(results["summary"])
    if len(rows) <= 20:
        palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
        colours = {m: palette(i) for i, m in enumerate(rows)}
    else:  # a large sweep: distinct colours from a continuous map rather than a repeating cycle
        colours = {m: plt.get_cmap("turbo")(i / (len(rows) - 1)) for i, m in enumerate(rows)}
    fig, (curves_ax, final_ax) = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=(3, 2))
    teacher = results["teacher"]
    if teacher["history"]:
        curves_ax.plot(range(1, len(teacher["history"]) + 1), teacher["history"], "k--", label="teacher")
    else:
        curves_ax.axhline(teacher["test_acc"], color="k", ls="--", label="teacher")
    for m in rows:
        curves = [r["test_acc"] for r in results["runs"] if r["setting"] == m]
        epochs = range(1, len(curves[0]) + 1)
        stats = [_mean_std(v) for v in zip(*curves)]
        curves_ax.plot(epochs, [s[0] for s in stats], color=colours[m], label=_label(m))
        curves_ax.fill_between(epochs, [s[0] - s[1] for s in stats], [s[0] + s[1] for s in stats],
                               color=colours[m], alpha=0.15)
    curves_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy per epoch (mean +- std)")
    curves_ax.grid(alpha=0.3)
    curves_ax.legend(fontsize="small" if len(rows) <= 8 else "x-small", ncol=1 if len(rows) <= 12 else 2)

    final_ax.axhline(teacher["test_acc"], color="k", ls="--", label=f"teacher {teacher['test_acc']:.2f}")
    for x, m in enumerate(rows):
        s = results["summary"][m]
        seeds = [r["final_test_acc"] for r in results["runs"] if r["setting"] == m]
        final_ax.plot([x] * len(seeds), seeds, "o", color=colours[m], alpha=0.35, ms=4)
        final_ax.errorbar([x], [s["test_acc_mean"]], yerr=[[s["test_acc_mean"] - s["test_acc_min"]],
                                                          [s["test_acc_max"] - s["test_acc_mean"]]],
                          fmt="D", color=colours[m], capsize=4, ms=6)
    final_ax.set_xticks(range(len(rows)), [_label(m) for m in rows], rotation=30 if len(rows) <= 8 else 60,
                        ha="right", fontsize="small" if len(rows) <= 8 else "x-small")
    final_ax.set_ylim(*final_accuracy_limits(results))
    final_ax.set(ylabel="final test accuracy (%)",
                 title="after the last epoch: mean, seeds' min - max")
    final_ax.grid(alpha=0.3, axis="y")
    final_ax.legend(fontsize="small", loc="lower right")
    c = results["config"]
    fig.suptitle(f"{c['dataset']}: {c['teacher_model']} -> {c['student_model']}, {len(c['seeds'])} seed(s), "
                 f"--impl {c['impl']}")
    fig.tight_layout()
    return fig


def plot(results, path):
    fig = figure(results)
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)


def main(argv=None) -> dict:
    started = time.perf_counter()
    with session(argv) as s:
        return _run(s, started)


def _run(s: Session, started: float) -> dict:
    a = s.args
    say = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))
    say(f"teacher {a.teacher_model}: test acc {s.teacher_record['test_acc']:.2f}%")
    runs = []
    for row in s.settings:
        for seed in a.seeds:
            h = s.student(row, seed)
            runs.append(dict(setting=row.label, method=row.method, seed=seed, final_test_acc=h["test_acc"][-1],
                             test_acc=h["test_acc"], loss_ms_per_step=1e3 * h["loss_time"] / max(h["steps"], 1),
                             steps=h["steps"]))
            say(f"{row.label} seed {seed}: test acc {h['test_acc'][-1]:.2f}%")
    summary = {}
    for row in s.settings:
        rs = [r for r in runs if r["setting"] == row.label]
        finals = [r["final_test_acc"] for r in rs]
        mean, std = _mean_std(finals)
        has_ckd = "ckd" in row.method.split("+")
        ckd = dict(ckd_weight=row.terms.ckd_weight, ckd_tau=row.terms.ckd_tau) if has_ckd else {}
        summary[row.label] = dict(method=row.method, **ckd, test_acc_mean=mean, test_acc_std=std,
                                  test_acc_min=min(finals), test_acc_max=max(finals),
                                  loss_ms_per_step=statistics.fmean(r["loss_ms_per_step"] for r in rs))
    config = dict(vars(a), data=s.data_desc, torch=torch.__version__, distributed=_mode(a))
    results = dict(config=config, teacher=s.teacher_record, summary=summary, runs=runs,
                   wall_seconds=time.perf_counter() - started)
    if a.ddp and dist.get_rank() != 0:  # every rank holds the same results; rank 0 reports them
        return results
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "accuracy.png")
    threads = f" ({torch.get_num_threads()} threads)" if a.device == "cpu" else ""
    print(f"{s.data_desc}; {a.teacher_model} -> {a.student_model}; --impl {a.impl}; "
          f"device {a.device}{threads}; amp {a.amp}; {len(a.seeds)} seed(s), {a.epochs} epochs")
    print(f"distributed: {config['distributed']}")
    print(format_table(results))
    print(f"(test accuracy after the last epoch, mean +- std over seeds; loss ms/step = time inside the "
          f"distillation loss call, forward only; {results['wall_seconds']:.1f} s in all; "
          f"results in {out}/results.json, plot in {out}/accuracy.png)")
    return results


def cli() -> int:
    """The `ckd-train` console script: runs main() and exits 0 (console scripts pass main's return value to
    sys.exit, which would print the results dict and exit 1)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
