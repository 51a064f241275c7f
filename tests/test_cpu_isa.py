"""The CPU kernels' instruction sets (csrc/backends/cpu/cpu_isa.h): each one this machine runs matches the float64
oracle, all of them give the same bits, and CKD_EXT_CPU_ISA / ckd_ext.set_cpu_isa choose among them."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckd_ext
from ckd_ext import _extension
from inputs import loss_and_grad, pair, random_mask
from tolerances import check_against_oracle

pytestmark = pytest.mark.skipif(not ckd_ext.is_available(), reason=_extension.unavailable_reason())

ISAS = ckd_ext.available_cpu_isas() if ckd_ext.is_available() else []
# Both CKD anchors, BicKD with both terms, and KD: together they reach every CPU kernel (row statistics, KD rows,
# the contrastive epilogue and symmetric tiles, column norms and dots, BicKD's backward rows, normalize_backward).
CONFIGS = ["kd", "ckd_student", "ckd_teacher", "bickd", "bickd_symmetric"]
# 515 classes: past kd_row's 512-class chunk (a second, partial chunk) and no multiple of any vector width, so
# every vectorised loop runs its remainder too.
SHAPE = (37, 515)


@pytest.fixture
def use_isa():
    """Sets the instruction set for the test, then restores the one the process had."""
    previous = ckd_ext.cpu_isa()
    yield ckd_ext.set_cpu_isa
    ckd_ext.set_cpu_isa(previous)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_isa_matches_oracle(use_isa, isa, config, dtype):
    use_isa(isa)
    assert ckd_ext.cpu_isa() == isa
    student, teacher = pair(*SHAPE, seed=17)
    # The suite's tolerances (tolerances.TOLERANCE), whose float32 accumulation bounds hold for any instruction set.
    check_against_oracle(config, student, teacher, dtype=dtype)


def _results(config, dtype, mask):
    student, teacher = pair(*SHAPE, seed=23)
    student = student.detach().to(dtype).requires_grad_()
    return loss_and_grad(ckd_ext, config, student, teacher.to(dtype), mask=mask, reduction="none")


@pytest.mark.skipif(len(ISAS) < 2, reason="this machine runs only the baseline CPU kernels")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_isas_agree_bitwise(use_isa, config, dtype, masked):
    """-ffp-contract=off and sums in a fixed order (tools/build_config.py): wider vectors change no rounding, so
    every instruction set gives the baseline's bits, per-row losses and gradients alike."""
    mask = random_mask((SHAPE[0],), seed=3) if masked else None
    use_isa("baseline")
    expected = _results(config, dtype, mask)
    for isa in ISAS[1:]:
        use_isa(isa)
        loss, grad = _results(config, dtype, mask)
        for what, actual, wanted in [("loss", loss, expected[0]), ("grad", grad, expected[1])]:
            actual = actual if isinstance(actual, tuple) else (actual,)
            wanted = wanted if isinstance(wanted, tuple) else (wanted,)
            for a, w in zip(actual, wanted):
                differ = (a != w) & ~(torch.isnan(a) & torch.isnan(w))
                assert not differ.any(), f"{isa} {what}: {int(differ.sum())} elements differ from the baseline's"


@pytest.mark.skipif("CKD_EXT_CPU_ISA" in os.environ, reason="CKD_EXT_CPU_ISA chose the instruction set")
def test_highest_isa_is_the_default_and_avx512_is_built_where_the_cpu_has_it():
    """Without CKD_EXT_CPU_ISA the default is the highest available set (every test here restores the one it
    found), and on an x86-64 Linux CPU that lists the features the build dispatches to them, not the baseline alone."""
    assert ISAS[0] == "baseline" and ckd_ext.cpu_isa() == ISAS[-1]
    flags = _cpu_flags()
    if {"avx2", "fma", "f16c"} <= flags:
        assert "avx2" in ISAS
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert ISAS == ["baseline", "avx2", "avx512"]


def test_env_var_forces_a_lower_isa():
    env = dict(os.environ, CKD_EXT_CPU_ISA="Baseline ")  # case and surrounding spaces are forgiven
    assert _run_python("import ckd_ext; print(ckd_ext.cpu_isa())", env) == "baseline"


@pytest.mark.parametrize("value", ["", "avx512" if "avx512" not in ISAS else "avx-512"])
def test_env_var_with_a_bad_value_is_an_error_and_changes_nothing(monkeypatch, value):
    """Beside docs/errors.md's E-cpu-isa-env (tests/test_errors.py): an empty value and a near miss are errors too."""
    previous = ckd_ext.cpu_isa()
    monkeypatch.setenv("CKD_EXT_CPU_ISA", value)
    error = _extension._apply_cpu_isa_env(_extension.require_extension())
    assert error.startswith(f"CKD_EXT_CPU_ISA must be one of {', '.join(ISAS)} on this machine, got {value!r}")
    assert ckd_ext.cpu_isa() == previous


def _run_python(code, env):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(shutil.which("objdump") is None or "avx2" not in ISAS, reason="needs objdump and an x86-64 build")
def test_only_the_isa_compilations_use_vex_instructions():
    """tools/build_config.py's link order: inline functions that the AVX compilations emit too (std::, c10::) must
    keep their baseline copies, or a CPU without AVX would fault in baseline code. So in the built library every
    function with a VEX / EVEX instruction (v-prefixed, on xmm/ymm/zmm) lives in the avx2 or avx512 namespace (the
    mangled names of lambdas and OpenMP outlines included), and no avx2 one touches a zmm register."""
    library = _extension.require_extension().__file__
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    function = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    vex = re.compile(r"\tv[a-z0-9]+ +.*%[xyz]mm")
    wrong, name = set(), ""
    for line in listing.splitlines():
        m = function.match(line)
        if m:
            name = m.group(1)
        elif vex.search(line):
            isa = "avx512" if "cpu6avx512" in name else "avx2" if "cpu4avx2" in name else None
            if isa is None or (isa == "avx2" and "%zmm" in line):
                wrong.add(name)
    assert not wrong, f"{len(wrong)} functions outside their ISA compilation, e.g. {sorted(wrong)[:3]}"
