"""The build's tools: the torch floor is declared the same way everywhere; CKD_EXT_QUICK_BUILD drops the CPU
backend's instruction-set variants from the shared build configuration; tools/build_prebuilt.py reads wheel names and
architectures strictly, writes torch's own nvcc flags and C++ standard, and its symbol check passes the tree's own
build against the installed torch and catches a symbol that resolves nowhere."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_prebuilt  # noqa: E402


def test_the_torch_floor_is_the_same_in_every_requirement():
    floors = {
        "setup.py": re.findall(r'"torch>=([0-9.]+)"', (ROOT / "setup.py").read_text()),
        "pyproject.toml": re.findall(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()),
        "requirements-test.txt": re.findall(r"^torch>=([0-9.]+)$", (ROOT / "requirements-test.txt").read_text(), re.M),
    }
    assert all(len(v) == 1 for v in floors.values()), floors
    assert len({v[0] for v in floors.values()}) == 1, floors
    installed = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert installed >= tuple(int(x) for x in floors["setup.py"][0].split(".")), "the installed torch is below the floor"


def cmake_lists(tmp_path, **env) -> str:
    out = tmp_path / "build_config.cmake"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_config.py"), "--cmake", str(out)],
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the instruction-set variants are x86-64 only")
def test_quick_build_drops_the_isa_variants_and_their_dispatch(tmp_path):
    full = cmake_lists(tmp_path, CKD_EXT_QUICK_BUILD="0")
    assert "set(CKD_CPU_ISAS avx2 avx512)" in full and "-DCKD_CPU_MULTI_ISA" in full
    quick = cmake_lists(tmp_path, CKD_EXT_QUICK_BUILD="1")
    assert "set(CKD_CPU_ISAS )" in quick and "-DCKD_CPU_MULTI_ISA" not in quick
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_config.py"), "--cmake", str(tmp_path / "x")],
                          env=dict(os.environ, CKD_EXT_QUICK_BUILD="yes"), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "CKD_EXT_QUICK_BUILD must be 0 or 1, got 'yes'" in proc.stderr


def test_wheel_names_and_architectures_are_read_strictly():
    assert build_prebuilt.parse_wheel_name(Path("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl")) == \
        ("2.11.0", "cp312")
    for bad in ("torch-2.11.0.tar.gz", "torch-2.11.0-cp312-cp312-manylinux_2_28_aarch64.whl",
                "torch-2.11.0-cp313-cp313t-manylinux_2_28_x86_64.whl"):
        with pytest.raises(SystemExit, match="build_prebuilt"):
            build_prebuilt.parse_wheel_name(Path(bad))
    assert build_prebuilt.gencode_flags("9.0") == ["-gencode=arch=compute_90,code=sm_90"]
    assert build_prebuilt.gencode_flags("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(SystemExit, match="is not like 9.0"):
        build_prebuilt.gencode_flags("sm_90")


def test_torch_flags_are_the_installed_cpp_extensions():
    """What build_prebuilt writes out is what torch.utils.cpp_extension does, checked against the torch here (the
    same reading of the wheel's cpp_extension.py gives its C++ standard)."""
    from torch.utils import cpp_extension
    assert build_prebuilt.TORCH_NVCC_FLAGS == cpp_extension.COMMON_NVCC_FLAGS
    torch_dir = Path(torch.__file__).parent
    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch")
    facts = build_prebuilt.torch_facts(torch_dir)
    assert facts["__version__"] == torch.__version__ and facts["cuda"] == torch.version.cuda
    source = Path(cpp_extension.__file__).read_text()
    assert f"cpp_flag_prefix + '{facts['std']}'" in source


def built_extension() -> Path:
    import ckd_ext
    if not ckd_ext.is_available():
        pytest.skip("ckd_ext's extension is not built")
    return Path(ckd_ext.require_extension().__file__)


def test_symbol_check_resolves_the_tree_build_and_catches_a_missing_symbol(tmp_path):
    so = built_extension()
    torch_dir = Path(torch.__file__).parent
    home = build_prebuilt.cuda_home() if torch.version.cuda else Path("/nonexistent")
    check = build_prebuilt.check_symbols(so, torch_dir, home)
    assert check["unresolved"] == [], check["unresolved"][:10]
    assert check["python_api"] > 0 and check["undefined"] > check["python_api"]
    assert "NOT FOUND" not in check["libraries"].values()
    src = tmp_path / "bad.c"
    src.write_text("extern int ckd_no_such_symbol(void);\nint use(void) { return ckd_no_such_symbol(); }\n")
    bad = tmp_path / "libbad.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(src), "-o", str(bad)], check=True)
    check = build_prebuilt.check_symbols(bad, torch_dir, home)
    assert check["unresolved"] == ["ckd_no_such_symbol"]
