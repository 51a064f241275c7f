"""The extension records the torch it was built against; under another torch, importing ckd_ext still works
(the reference needs no extension) but warns, and calling a fused op raises a RuntimeError that says how to
rebuild, instead of failing with an undefined-symbol error while loading _C."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import warnings, torch
torch.__version__ = "0.0.1-not-the-build-torch"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ckd_ext
assert any("built against torch" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert not ckd_ext.is_available()
s = torch.randn(4, 3)
ckd_ext.reference.ckd_loss(s, s)            # the reference still works
try:
    ckd_ext.ckd_loss(s, s)
except RuntimeError as exc:
    message = str(exc)
    assert "0.0.1-not-the-build-torch" in message and "pip install --no-build-isolation" in message, message
    print("OK")
else:
    raise AssertionError("the fused op ran against a mismatched build")
"""


def test_torch_version_mismatch_gives_a_rebuild_message():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_build_records_the_torch_version():
    import torch

    from ckd_ext import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
