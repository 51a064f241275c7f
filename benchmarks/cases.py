"""What a benchmark case is: the vocabulary, the shapes, the rows a case yields, and its inputs.

Vocabulary
----------
case      one (loss, provider, shape, dtype, device); measured in all modes.
provider  ``ckd_ext`` (fused ops), ``eager`` (``ckd_ext.reference``), ``compiled`` (``torch.compile`` of the
          reference) and ``floor`` (the bare work no implementation can avoid, see
          :class:`benchmarks.providers.Floor`). The ``lm`` group (hidden states and LM heads in, see
          :func:`benchmarks.providers.lm_loss_fn`) has ``fused_linear`` (``ckd_ext.fused_linear_*_loss``) and, on
          materialised logits ``hidden @ W.T``, ``ckd_ext``, ``eager`` and ``compiled``; no floor.
mode      ``full`` (forward + backward, the headline), ``forward`` (with autograd recording),
          ``backward`` (``loss.backward()`` alone, the forward done untimed beforehand), ``no_grad``.
metric    ``time`` (ms, p20/p50/p80 over repetitions after warm-up), ``peak_mem`` (MiB beyond the inputs),
          ``saved_total`` / ``saved_inputs`` / ``saved_extra`` (bytes kept for backward, from
          ``saved_tensors_hooks``; mode ``forward`` only), ``compile_time`` (s, ``compiled`` only: the cold
          first call of modes ``full`` and ``no_grad``, the two graphs torch.compile builds).

The benchmark modules import torch inside functions, so that the runner's parent process and ``--help``
stay light.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

LOSSES: Tuple[str, ...] = ("ckd", "bickd", "kd")
# Benchmarked variants of a loss, each its own rows: CKD with teacher anchors is the authors' released form, the one
# people reproducing the paper run (the package's default is the student anchor).
# KD's other divergences (docs/math.md 3.1) are variants of kd: the same kernel, its floor the same reads and write.
LOSS_VARIANTS: Dict[str, Tuple[str, Dict[str, str]]] = {
    "ckd_teacher": ("ckd", {"anchor": "teacher"}),
    "kd_reverse_kl": ("kd", {"divergence": "reverse_kl"}),
    "kd_jsd": ("kd", {"divergence": "jsd"}),
    "kd_skew_kl": ("kd", {"divergence": "skew_kl"}),
    "kd_tvd": ("kd", {"divergence": "tvd"}),
}
KD_DIVERGENCES: Tuple[str, ...] = ("kd_reverse_kl", "kd_jsd", "kd_skew_kl", "kd_tvd")


def loss_call(loss: str) -> Tuple[str, Dict[str, str]]:
    """(the loss function's stem, its keyword arguments) of a benchmarked loss name."""
    return LOSS_VARIANTS.get(loss, (loss, {}))


def base_loss(loss: str) -> str:
    """The loss whose work (floor, cost model) a benchmarked loss name does: an anchor does not change it."""
    return loss_call(loss)[0]
PROVIDERS: Tuple[str, ...] = ("fused_linear", "ckd_ext", "eager", "compiled", "floor")
LOGIT_PROVIDERS: Tuple[str, ...] = ("ckd_ext", "eager", "compiled", "floor")
LM_PROVIDERS: Tuple[str, ...] = ("fused_linear", "ckd_ext", "eager", "compiled")
# Providers a shape names itself (only_providers), with an optional dependency: Liger-Kernel's chunked fused-linear
# JSD (`pip install liger-kernel`), whose beta = 0 / 1 are forward / reverse KL (providers.LIGER_BETA).
# PROVIDER_LOSSES: the losses a provider implements (every loss where a provider is not listed).
EXTRA_LM_PROVIDERS: Tuple[str, ...] = ("liger",)
PROVIDER_LOSSES: Dict[str, Tuple[str, ...]] = {"liger": ("kd", "kd_reverse_kl", "kd_jsd")}
LM_GROUPS: Tuple[str, ...] = ("lm", "gpu-lm", "smoke-lm")
# Order matters: `full` runs first so that torch.compile builds its forward+backward graphs there.
MODES: Tuple[str, ...] = ("full", "forward", "backward", "no_grad")
SAVED_METRICS: Tuple[str, ...] = ("saved_total", "saved_inputs", "saved_extra")
METRICS: Tuple[str, ...] = ("time", "peak_mem") + SAVED_METRICS + ("compile_time",)
UNITS = {"time": "ms", "peak_mem": "MiB", "saved_total": "bytes", "saved_inputs": "bytes",
         "saved_extra": "bytes", "compile_time": "s"}
CSV_COLUMNS: Tuple[str, ...] = (
    "loss", "provider", "mode", "metric", "shape", "dtype", "p20", "p50", "p80", "unit", "device",
    "threads", "torch_version", "package_version", "timestamp",
    # extra columns: which named shape this is, and why a value is missing ("OOM", "timeout", "error: ...")
    # or how it was taken ("backend=aot_eager").
    "shape_name", "note")


def expected_metrics(provider: str, mode: str) -> Tuple[str, ...]:
    """The metrics a (provider, mode) produces: what the runner writes and the smoke test checks."""
    out = ["time", "peak_mem"]
    if provider != "floor" and mode == "forward":
        out += list(SAVED_METRICS)
    if provider == "compiled" and mode in ("full", "no_grad"):
        out.append("compile_time")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str          # what it stands for (used in the docs)
    group: str         # vision | tokens | scale | gpu-tokens | sweep | smoke
    loss: str
    N: int
    C: int
    dtype: str = "float32"
    cuda_only: bool = False
    hidden: Tuple[int, ...] = ()  # (H_s, H_t) of the lm groups: C is then the vocabulary V
    only_providers: Tuple[str, ...] = ()  # where some providers cannot finish in reasonable time

    @property
    def shape(self) -> str:
        return f"{self.N}x{self.C}"

    @property
    def providers(self) -> Tuple[str, ...]:
        listed = self.only_providers or (LM_PROVIDERS if self.group in LM_GROUPS else LOGIT_PROVIDERS)
        return tuple(p for p in listed if self.loss in PROVIDER_LOSSES.get(p, (self.loss,)))


def _mk(name, group, losses, N, C, dtype="float32", cuda_only=False, hidden=(), only_providers=()) -> List[Shape]:
    return [Shape(name, group, loss, N, C, dtype, cuda_only, hidden, only_providers) for loss in losses]


ALL = LOSSES
# The named CPU shapes also get teacher-anchor CKD rows and KD's other divergences (LOSS_VARIANTS); the sweeps and
# GPU shapes do not.
NAMED = ("ckd", "ckd_teacher", "bickd", "kd") + KD_DIVERGENCES
SHAPES: List[Shape] = (
    # vision: one image per row, one class per column
    _mk("cifar100-b64", "vision", NAMED, 64, 100)
    + _mk("imagenet-b512", "vision", NAMED, 512, 1000)
    + _mk("contrastive-b4096", "vision", NAMED, 4096, 1000)
    # tokens: one token per row, one vocabulary entry per column
    + _mk("tokens-2k-v8k", "tokens", ("ckd", "ckd_teacher", "kd") + KD_DIVERGENCES, 2048, 8192)
    + _mk("tokens-8k-v1k", "tokens", ("ckd", "ckd_teacher", "kd") + KD_DIVERGENCES, 8192, 1024)
    + _mk("tokens-1k-v8k", "tokens", ("bickd",), 1024, 8192)
    # scale: where the materialising reference cannot follow (N x N or C x C no longer fits)
    + _mk("scale-rows-64k", "scale", ("ckd",), 65536, 256)
    + _mk("scale-classes-32k", "scale", ("bickd",), 1024, 32000)
    # GPU only: bf16 LLM-vocabulary token batches
    + _mk("gpu-tokens-4k-v32k", "gpu-tokens", ALL, 4096, 32000, "bfloat16", True)
    + _mk("gpu-tokens-16k-v32k", "gpu-tokens", ALL, 16384, 32000, "bfloat16", True)
    + _mk("gpu-tokens-16k-v128k", "gpu-tokens", ALL, 16384, 128256, "bfloat16", True)
    # sweeps for the plots (together with the vision shapes: N = 128..4096 at C = 1000, C = 128..8192 at N = 512)
    + [s for N in (128, 256, 1024, 2048) for s in _mk(f"sweep-N{N}", "sweep", ALL, N, 1000)]
    + [s for C in (128, 256, 2048, 4096, 8192) for s in _mk(f"sweep-C{C}", "sweep", ALL, 512, C)]
    # lm: hidden states (N x H_s, N x H_t) and LM heads (V x H) in, the logits never materialised by fused_linear
    # (eager and compiled, a few minutes per call there on 2 cores, only on the smaller shape below)
    + [s for dt in ("float32", "bfloat16")
       for s in _mk("lm-4k-v32k-h512-1024", "lm", ("ckd", "kd"), 4096, 32000, dt, hidden=(512, 1024),
                    only_providers=("fused_linear", "ckd_ext", "liger"))]
    # the CKD shape where the bilinear forms' float64 Gram matrices weigh most (docs/math.md 8.3)
    + _mk("lm-2k-v16k-h256-512", "lm", ("ckd",), 2048, 16000, hidden=(256, 512),
          only_providers=("fused_linear", "ckd_ext"))
    # a quarter of the tokens and vocabulary, where the eager and compiled references finish on 2 cores; KD in every
    # divergence, against Liger where it computes the same loss
    + _mk("lm-1k-v8k-h512-1024", "lm", ("ckd", "kd") + KD_DIVERGENCES, 1024, 8000, hidden=(512, 1024),
          only_providers=LM_PROVIDERS + EXTRA_LM_PROVIDERS)
    + _mk("gpu-lm-16k-v128k-h2048-4096", "gpu-lm", ("ckd", "kd"), 16384, 128256, "bfloat16", True, (2048, 4096))
)
# --smoke: tiny, but still an N sweep (C = 16) and a C sweep (N = 16) so that every plot gets drawn.
SMOKE_SHAPES: List[Shape] = (_mk("smoke-8x16", "smoke", NAMED, 8, 16) + _mk("smoke-16x16", "smoke", ALL, 16, 16)
                             + _mk("smoke-16x32", "smoke", ALL, 16, 32)
                             + _mk("smoke-lm-16x32", "smoke-lm", ("ckd", "kd") + KD_DIVERGENCES, 16, 32, hidden=(4, 6)))

# The shape groups some targets single out (the targets of docs/benchmarks.md, checked by benchmarks/run.py).
TOKEN_GROUPS = ("tokens", "gpu-tokens")
MEMORY_TARGET_GROUPS = ("tokens", "scale", "gpu-tokens")


def is_gemm_bound(loss: str, N: int, C: int) -> bool:
    """CKD/BicKD shapes whose floor is dominated by the N x N x C (and C x C x N) GEMMs."""
    return base_loss(loss) != "kd" and N >= 256 and C >= 256


def select_shapes(device: str, smoke: bool = False, only: Optional[Dict[str, List[str]]] = None) -> List[Shape]:
    only = only or {}
    shapes = SMOKE_SHAPES if smoke else SHAPES + (SMOKE_SHAPES if "shape" in only else [])
    shapes = [s for s in shapes if device == "cuda" or not s.cuda_only]
    out = []
    for s in shapes:
        if "loss" in only and s.loss not in only["loss"]:
            continue
        if "dtype" in only and s.dtype not in only["dtype"]:
            continue
        if "shape" in only and not ({s.name, s.group, s.shape} & set(only["shape"])):
            continue
        out.append(s)
    return out


def parse_only(items: Sequence[str]) -> Dict[str, List[str]]:
    """`--only provider=eager,floor --only shape=tokens` -> {"provider": [...], "shape": [...]}."""
    out: Dict[str, List[str]] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--only expects KEY=VALUE[,VALUE...], got {item!r}")
        key, vals = item.split("=", 1)
        key = key.strip()
        if key not in ("loss", "provider", "mode", "shape", "dtype"):
            raise ValueError(f"--only: unknown key {key!r} (loss, provider, mode, shape, dtype)")
        out.setdefault(key, []).extend(v.strip() for v in vals.split(",") if v.strip())
    return out


def make_case(shape: Shape, provider: str) -> Dict:
    """A case as the worker receives it (JSON)."""
    return {"loss": shape.loss, "provider": provider, "name": shape.name, "group": shape.group,
            "N": shape.N, "C": shape.C, "dtype": shape.dtype, "hidden": list(shape.hidden)}


def result_row(case: Dict, device: str, mode: str, metric: str, vals: Optional[Sequence[float]] = None,
               note: str = "") -> Dict:
    """One (mode, metric) result of a case: p20/p50/p80 from `vals` (empty without, `note` saying why)."""
    p = (list(vals) + [None, None, None])[:3] if vals else [None, None, None]
    return dict(event="row", loss=case["loss"], provider=case["provider"], shape=f"{case['N']}x{case['C']}",
                dtype=case["dtype"], shape_name=case["name"], device=device, mode=mode, metric=metric,
                p20=p[0], p50=p[1], p80=p[2], unit=UNITS[metric], note=note)


def missing_rows(case: Dict, device: str, modes: Sequence[str], note: str,
                 have: Sequence[Tuple[str, str]] = ()) -> List[Dict]:
    """An empty row with `note` ("OOM", "timeout", "error: ...") for every expected (mode, metric) of `case`
    in `modes` that is not in `have`."""
    return [result_row(case, device, mode, metric, note=note)
            for mode in modes for metric in expected_metrics(case["provider"], mode)
            if (mode, metric) not in have]


def make_inputs(N: int, C: int, dtype: str, device: str, seed: int = 0):
    """Student (leaf, requires_grad) and teacher logits, created directly in `dtype` on `device`."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    t = torch.randn(N, C, generator=g, device=device, dtype=torch.float32).mul_(3.0)
    s = (t * 0.5).add_(torch.randn(N, C, generator=g, device=device, dtype=torch.float32), alpha=2.0)
    return s.to(dt).requires_grad_(True), t.to(dt)


def make_lm_inputs(N: int, V: int, hidden: Sequence[int], dtype: str, device: str, seed: int = 0):
    """(student hidden, student weight) as leaves requiring grad and (teacher hidden, teacher weight), in `dtype`:
    unit-scale hidden states and heads of scale 1/sqrt(H), so logits have unit scale, the teacher's somewhat
    larger and correlated with the student's through a shared part of the hidden states."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    h_s, h_t = hidden

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    ht = randn(N, h_t)
    hs = ht[:, :h_s] * 0.5 + randn(N, h_s)
    ws = randn(V, h_s).mul_(h_s ** -0.5)
    wt = randn(V, h_t).mul_(2.0 * h_t ** -0.5)
    return ((hs.to(dt).requires_grad_(True), ws.to(dt).requires_grad_(True)), (ht.to(dt), wt.to(dt)))
