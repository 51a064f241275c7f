"""The GEMM policy (csrc/orchestration/gemm.h) for 16-bit inputs on tensor-core backends, run by the emulated backend
(which computes each GEMM as the tensor core does: 16-bit operands, fp32 accumulation).

1. The coefficient products: fp32 coefficients times 16-bit rows, one GEMM of the coefficients rounded to the rows'
   dtype (fp16: each row scaled by a power of two first). Against float64, the error of each output is within
   (u16 + K u32) sum_k |c_k| |r_k| (u16 = 2^-8 for bf16, 2^-11 for fp16; K u32 the fp32 accumulation), plus for
   fp16 the subnormal spacing 2^-25 of the row's scale times sum_k |r_k|; and it is larger than fp32 coefficients
   give somewhere (the test can fail either way).
2. The losses end to end, fp16 / bf16 inputs, randn logits at scales 1, 10, 100 and near-converged students
   (student = teacher + 1e-2 noise, where the gradient is a difference of nearly equal terms): the gradient's error
   against the float64 oracle on the same rounded inputs stays within a factor 2 of what rounding the inputs
   themselves to 16 bits does to the float64 gradient (measured: at most 1.4x; docs/cuda.md, "GEMM policy").
"""
import pytest
import torch

import ckd_ext
from ckd_ext import reference
from switches import on_backend, skip_unless

pytestmark = skip_unless("emulated")
ext = ckd_ext.require_extension() if ckd_ext.is_available() else None
U16 = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
U32 = 2.0 ** -24


def _rounding_bound(coef, rows, dtype, k):
    """(u16 + k u32) |coef| @ |rows|, plus fp16's subnormal spacing below each row's power-of-two scale."""
    coef, rows = coef.double(), rows.double()
    bound = (U16[dtype] + k * U32) * (coef.abs() @ rows.abs())
    if dtype == torch.float16:
        scale = torch.exp2(torch.floor(torch.log2(coef.abs().amax(1, keepdim=True))))
        bound += 2.0 ** -25 * scale * rows.abs().sum(0, keepdim=True)
    return bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_coefficient_products_round_the_coefficients_once(dtype):
    gen = torch.Generator().manual_seed(0)
    m, k, n = 33, 300, 47
    # Coefficients spanning 1e-12 .. 1 (w / n times softmax weights times inverse norms), both signs.
    coef = (torch.randn(m, k, generator=gen, dtype=torch.float64) *
            torch.logspace(-12, 0, k, dtype=torch.float64)[torch.randperm(k, generator=gen)]).float()
    rows = (torch.randn(k, n, generator=gen) * 30).to(dtype)
    exact = coef.double() @ rows.double()
    out = ext.gemm_product(coef, rows, "emulated")
    assert ((out.double() - exact).abs() <= _rounding_bound(coef, rows, dtype, k)).all()
    # The coefficients are rounded: fp32 ones would stay within k u32 everywhere.
    assert ((out.double() - exact).abs() > k * U32 * (coef.double().abs() @ rows.double().abs())).any()


def _gradients(student, teacher, anchor, upstream, backend):
    with on_backend(backend):
        return torch.ops.ckd_ext.ckd_backward(torch.tensor(upstream), student, teacher, None, 0.5, anchor, "sum")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("anchor", ["student", "teacher"])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("near_converged", [False, True])
def test_ckd_gradients_within_the_inputs_own_rounding(dtype, anchor, scale, near_converged):
    gen = torch.Generator().manual_seed(int(scale) + 7 * near_converged)
    n, c = 48, 64
    t64 = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    noise = torch.randn(n, c, generator=gen, dtype=torch.float64)
    s64 = t64 + 1e-2 * scale * noise if near_converged else noise * scale
    s16, t16 = s64.to(dtype), t64.to(dtype)

    def oracle(s, t):
        s = s.clone().requires_grad_()
        return torch.autograd.grad(reference.ckd_loss(s, t, tau=0.5, anchor=anchor, reduction="sum"), s)[0]

    g_rounded = oracle(s16.double(), t16.double())
    g_exact_inputs = oracle(s64, t64)
    # An upstream power of two that puts the gradient near 2^14, clear of fp16's subnormals (what GradScaler does).
    upstream = 2.0 ** round(torch.log2(2.0 ** 14 / g_rounded.abs().max()).item())
    g = _gradients(s16, t16, anchor, upstream, "emulated").double() / upstream
    largest = g_rounded.abs().max()
    error = (g - g_rounded).abs().max() / largest
    input_rounding = (g_exact_inputs - g_rounded).abs().max() / largest
    assert error <= 2 * input_rounding, (error.item(), input_rounding.item())
    # Against the CPU path, whose coefficients stay fp32: rounding each coefficient to 16 bits moves an output by at
    # most u16 sum_k |c_k| |r_k|, here below one unit roundoff of the largest gradient entry (measured: 0.7 u16 in
    # bf16, 0.45 u16 in fp16, at teacher anchors far from convergence, where the normalisation's projection cancels).
    g_cpu = _gradients(s16, t16, anchor, upstream, "cpu").double() / upstream
    error_cpu = (g_cpu - g_rounded).abs().max() / largest
    assert error <= error_cpu + U16[dtype], (error.item(), error_cpu.item())
    # And no worse than eager autograd's bf16 arithmetic (the reference under autocast: 16-bit similarities and
    # 16-bit logit gradients; measured 1.6-11x ours). fp16 eager on the CPU overflows at these upstream scales.
    if dtype == torch.bfloat16:
        s_eager = s16.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = reference.ckd_loss(s_eager, t16, tau=0.5, anchor=anchor, reduction="sum")
        (loss.float() * upstream).backward()
        error_eager = (s_eager.grad.double() / upstream - g_rounded).abs().max() / largest
        assert error <= error_eager, (error.item(), error_eager.item())


# The policy's products as ops (torch.ops.ckd_ext.gemm_similarity / gemm_product), which the fused-linear losses
# issue. Shapes large enough that the CPU backend converts 16-bit operands in several blocks (about 2^20 elements a
# block): the similarity of 5 x 4096 by 600 x 4096 in blocks of b's rows, of 300 x 5000 by 200 x 5000 in blocks of
# the shared dimension, the product's 600 x 4096 rows in blocks of rows.
U = {torch.bfloat16: U32, torch.float16: U32, torch.float32: U32, torch.float64: 2.0 ** -53}
SIMILARITY_SHAPES = [(5, 600, 4096), (300, 200, 5000), (7, 9, 33)]


def _operand(shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("backend_name", ["cpu", "emulated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,k", SIMILARITY_SHAPES)
def test_similarity_op_accumulates_exact_products(backend_name, dtype, m, n, k):
    """a @ b^T in the accumulation dtype. 16-bit products are exact in fp32, so each output is within k u32 of
    sum_k |a_k| |b_k| (fp32 accumulation over k terms); fp32 inputs add one rounding of each product ((k + 1) u32);
    fp64 the same in u64. On the emulated backend 16-bit operands are one GEMM as they are (tensor cores)."""
    gen = torch.Generator().manual_seed(m + n + k)
    a, b = _operand((m, k), dtype, gen), _operand((n, k), dtype, gen)
    with on_backend(backend_name):
        calls = ext.gemm_calls()
        out = torch.ops.ckd_ext.gemm_similarity(a, b)
        calls = ext.gemm_calls() - calls
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact = a.double() @ b.double().T
    bound = (k + 1) * U[dtype] * (a.double().abs() @ b.double().abs().T)
    assert ((out.double() - exact).abs() <= bound).all()
    if backend_name == "emulated" or dtype in (torch.float32, torch.float64):
        assert calls == 1  # the operands as they are: one GEMM


@pytest.mark.parametrize("backend_name", ["cpu", "emulated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("accumulate", [False, True])
def test_product_op_keeps_the_split_precision(backend_name, dtype, accumulate):
    """out [+]= coef @ rows, coefficients of both signs spanning 1e-12 .. 1 (as test_coefficient_products_round_the_
    coefficients_once, through the op): within that test's bound on the emulated backend's 16-bit rows (one GEMM),
    (n + 1) u32 sum |c| |r| where the rows are converted to fp32 (the CPU backend, in three blocks of rows) or fp32."""
    gen = torch.Generator().manual_seed(11)
    m, n, k = 9, 600, 4096
    coef = (torch.randn(m, n, generator=gen, dtype=torch.float64) *
            torch.logspace(-12, 0, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]).float()
    rows = _operand((n, k), dtype, gen, scale=30.0)
    start = torch.randn(m, k, generator=gen) if accumulate else torch.full((m, k), float("nan"))
    out = start.clone()
    with on_backend(backend_name):
        calls = ext.gemm_calls()
        torch.ops.ckd_ext.gemm_product(out, coef, rows, accumulate)
        calls = ext.gemm_calls() - calls
    exact = coef.double() @ rows.double() + (start.double() if accumulate else 0.0)
    magnitude = coef.double().abs() @ rows.double().abs() + (start.double().abs() if accumulate else 0.0)
    rounded = backend_name == "emulated" and dtype != torch.float32
    bound = (_rounding_bound(coef, rows, dtype, n + 1) + (start.double().abs() if accumulate else 0.0) * (n + 1) * U32
             if rounded else (n + 1) * U32 * magnitude)
    assert ((out.double() - exact).abs() <= bound).all()
    if backend_name == "emulated":
        assert calls == 1


def test_policy_ops_opcheck():
    """Their fake implementations agree with the kernels (torch.compile traces the fused-linear losses through them)."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32):
        a, b = _operand((4, 6), dtype, gen), _operand((5, 6), dtype, gen)
        torch.library.opcheck(torch.ops.ckd_ext.gemm_similarity.default, (a, b))
        coef = torch.randn(4, 5, generator=gen)
        torch.library.opcheck(torch.ops.ckd_ext.gemm_product.default, (torch.zeros(4, 6), coef, b, True))
    a8, b8 = (torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8) for shape in ((4, 9), (3, 9)))
    torch.library.opcheck(torch.ops.ckd_ext.gemm_exact_int8.default, (a8, b8))


@pytest.mark.parametrize("backend_name", ["cpu", "emulated"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 3, 7), (17, 16, 64)])
def test_exact_int8_op_is_exact(backend_name, m, n, k):
    """gemm_exact_int8: a @ b^T of int8 operands as float64 integers, equal to the int64 product (every shape, the
    extremes +-127 included), one GEMM per block of k."""
    gen = torch.Generator().manual_seed(m * 100 + n * 10 + k)
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    a[0, :] = 127
    b[0, :] = -127
    with on_backend(backend_name):
        calls = ext.gemm_calls()
        out = torch.ops.ckd_ext.gemm_exact_int8(a, b)
        calls = ext.gemm_calls() - calls
    assert out.dtype == torch.float64 and calls == 1
    assert torch.equal(out, (a.long() @ b.long().T).double())


def test_exact_int8_op_blocks_k_within_int32():
    """Past 133144 terms of 127^2 an int32 accumulator would overflow: the op sums blocks of at most that many in
    float64 (two GEMMs here), exactly."""
    k = 133144 + 1000
    a = torch.full((2, k), 127, dtype=torch.int8)
    b = torch.full((3, k), 127, dtype=torch.int8)
    calls = ext.gemm_calls()
    out = torch.ops.ckd_ext.gemm_exact_int8(a, b)
    assert ext.gemm_calls() - calls == 2
    assert (out == 127 ** 2 * k).all() and 127 ** 2 * k >= 2 ** 31


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bickd_operand_blocks_on_tensor_cores(dtype, tau, symmetric):
    """BicKD's operand blocks (normalised softmax rows and columns) are built in the 16-bit student's dtype and
    multiplied on tensor cores. Against the float64 oracle on the same rounded inputs (64 x 100, T = 4): the
    gradient within the CPU path's (fp32 blocks) error plus one 16-bit unit roundoff of its largest entry (measured:
    the extra at most 0.67 u16), and for bf16 no worse than eager autograd under autocast (which rounds the same
    blocks and its similarities too; measured 3-8x ours); the loss, kept float32 under autocast, no worse than
    eager's either (measured 25-500x below)."""
    gen = torch.Generator().manual_seed(64 + int(10 * tau) + symmetric)
    t64 = torch.randn(64, 100, generator=gen, dtype=torch.float64) * 3
    s64 = t64 + torch.randn(64, 100, generator=gen, dtype=torch.float64) * 2
    s16, t16 = s64.to(dtype), t64.to(dtype)
    kw = dict(temperature=4.0, tau=tau, symmetric=symmetric)
    s_oracle = s16.double().requires_grad_()
    loss_oracle = reference.bickd_loss(s_oracle, t16.double(), **kw)
    loss_oracle.backward()
    largest = s_oracle.grad.abs().max()

    def errors(run):
        s = s16.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = run(s)
        loss.float().backward()
        return (abs(loss.double() - loss_oracle) / abs(loss_oracle),
                (s.grad.double() - s_oracle.grad).abs().max() / largest)

    def fused(backend):
        def run(s):
            with on_backend(backend):
                return ckd_ext.bickd_loss(s, t16, **kw)
        return run

    ext_calls = ext.gemm_calls()
    loss_error, grad_error = errors(fused("emulated"))
    assert ext.gemm_calls() > ext_calls
    _, grad_error_cpu = errors(fused("cpu"))
    assert grad_error <= grad_error_cpu + U16[dtype], (grad_error.item(), grad_error_cpu.item())
    if dtype == torch.bfloat16:
        loss_error_eager, grad_error_eager = errors(lambda s: reference.bickd_loss(s, t16, **kw))
        assert grad_error <= grad_error_eager, (grad_error.item(), grad_error_eager.item())
        assert loss_error <= loss_error_eager, (loss_error.item(), loss_error_eager.item())
