"""`python -m ckd_ext.info` reports what the imported build holds (versions, CPU instruction sets, CUDA
architectures, the emulated backend, workspaces) and, when the compiled extension cannot be loaded, why and the
command that builds it; an `import ckd_ext` that cannot load it warns once. Cost: ~15 s (six interpreter starts, each
importing torch)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckd_ext
from ckd_ext import _extension, info, testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_config  # noqa: E402

needs_extension = pytest.mark.skipif(not ckd_ext.is_available(), reason=_extension.unavailable_reason())


def run_info(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "ckd_ext.info", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)


def expected_architectures(arch_list: str):
    """TORCH_CUDA_ARCH_LIST's meaning ("8.0;9.0+PTX"): SASS for every entry, PTX for those marked +PTX."""
    sass, ptx = [], []
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        number = entry.removesuffix("+PTX").replace(".", "")
        sass.append(f"sm_{number}")
        if entry.endswith("+PTX"):
            ptx.append(f"compute_{number}")
    return sass, ptx


@needs_extension
def test_report_states_the_loaded_build():
    """Every line states what the running process sees: the versions, the active and available instruction sets,
    the CPU workspace in MiB and whether the emulated backend is built; with the extension loaded, the import warns
    nothing (RuntimeWarnings are errors here) and --check exits 0."""
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "ckd_ext.info", "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert ckd_ext.__version__ in out and torch.__version__ in out
    assert f"CPU backend:                {ckd_ext.cpu_isa()} " in out
    assert ", ".join(ckd_ext.available_cpu_isas()) in out
    assert f"workspace cpu:              {ckd_ext.workspace_bytes('cpu') / 2 ** 20:.1f} MiB" in out
    assert ("emulated CUDA backend:      built" in out) == testing.emulated_available()
    assert "NOT LOADED" not in out and "ExtensionUnavailableWarning" not in result.stderr


@needs_extension
def test_json_workspace_follows_the_environment():
    """CKD_EXT_WORKSPACE_MB=16 is reported as 16 MiB set explicitly, and the variable is listed."""
    env = dict(os.environ, CKD_EXT_WORKSPACE_MB="16")
    result = run_info("--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["workspace"]["cpu"] == {"bytes": 16 << 20, "source": "set"}
    assert report["environment"]["CKD_EXT_WORKSPACE_MB"] == "16"
    assert report["extension"]["built_against_torch"] == torch.__version__


@needs_extension
def test_cuda_architectures_are_those_the_build_compiled():
    """The architectures read from the extension's device code are TORCH_CUDA_ARCH_LIST's (default: the build
    config's), and a CUDA backend is reported exactly when the dispatcher has CUDA kernels for the ops."""
    report = info.collect()
    cuda = report["cuda_backend"]
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("ckd_ext::ckd_forward", "CUDA")
    assert cuda["compiled"] == has_cuda_kernels
    if has_cuda_kernels:
        sass, ptx = expected_architectures(os.environ.get("TORCH_CUDA_ARCH_LIST", build_config.DEFAULT_CUDA_ARCHS))
        assert (cuda["sass"], cuda["ptx"]) == (sass, ptx)
        data = Path(report["extension"]["path"]).read_bytes()
        assert all(name.encode() in data for name in sass)  # cuobjdump-free evidence that they are embedded


def test_files_without_device_code():
    """An ELF library without CUDA code has no architectures; a file that is not ELF is unknown (None)."""
    emulated = list((ROOT / "ckd_ext").glob("_emulated*.so"))
    if emulated:
        assert info.cuda_architectures(str(emulated[0])) == {"sass": [], "ptx": []}
    assert info.cuda_architectures(__file__) is None


def test_runs_on_follows_cuda_compatibility():
    """SASS runs on the same major version at an equal or higher minor one; PTX on any capability at or above it."""
    archs = {"sass": ["sm_80", "sm_90"], "ptx": ["compute_90"]}
    assert info._runs_on(archs, (8, 0)) and info._runs_on(archs, (8, 6)) and info._runs_on(archs, (10, 0))
    assert not info._runs_on({"sass": ["sm_86"], "ptx": []}, (8, 0))
    assert not info._runs_on({"sass": ["sm_80"], "ptx": []}, (9, 0))
    assert not info._runs_on(archs, (7, 5))


def unbuilt_copy(tmp_path, build_info: bool, broken_library: bool) -> Path:
    """The package's Python files in a fresh folder: no compiled extension (or a corrupt one)."""
    package = tmp_path / "ckd_ext"
    package.mkdir()
    for source in (ROOT / "ckd_ext").rglob("*.py"):
        if source.name == "_build_info.py" and not build_info:
            continue
        target = package / source.relative_to(ROOT / "ckd_ext")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    # An editable install (pip install -e) adds an import hook that finds ckd_ext's submodules, _C included, in
    # its source folder when the package folder lacks them; without it this copy really has no extension.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n")
    if broken_library:
        suffix = next((ROOT / "ckd_ext").glob("_C*.so"), None)
        name = suffix.name if suffix else "_C" + __import__("sysconfig").get_config_var("EXT_SUFFIX")
        (package / name).write_bytes(b"not a shared library")
    return tmp_path


IMPORT_SCRIPT = r"""
import importlib, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ckd_ext
    import ckd_ext.losses, ckd_ext.fused_linear, ckd_ext.testing
    importlib.import_module("ckd_ext")
ours = [w for w in caught if issubclass(w.category, ckd_ext._extension.ExtensionUnavailableWarning)]
assert len(ours) == 1, [str(w.message) for w in caught]
print(ours[0].filename)
print(ours[0].message)
"""


@pytest.mark.parametrize("case", ["not built", "corrupt library"])
def test_unloadable_extension_warns_once_and_info_says_how_to_build(tmp_path, case):
    """Without a loadable _C: `import ckd_ext` warns exactly once, pointing at the importing file, with the reason
    and the build command; `python -m ckd_ext.info --check` prints both and exits 1."""
    folder = unbuilt_copy(tmp_path, build_info=case == "corrupt library", broken_library=case == "corrupt library")
    env = dict(os.environ, PYTHONPATH=str(folder))
    script = folder / "user_script.py"
    script.write_text(IMPORT_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    filename, message = result.stdout.split("\n", 1)
    assert filename == str(script)
    reason = "is not built" if case == "not built" else "failed to load"
    assert reason in message and _extension.REBUILD in message and "python -m ckd_ext.info" in message

    checked = run_info("--check", cwd=folder, env=env)
    assert checked.returncode == 1, checked.stderr
    assert "NOT LOADED" in checked.stdout and reason in checked.stdout and _extension.REBUILD in checked.stdout
