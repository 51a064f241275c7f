"""Fixtures every test file shares, and the hypothesis profiles of the property-based tests (tests/test_fuzz.py).

Fixtures (built on tests/switches.py):

* `backend`: the test runs once per backend, "cpu", "emulated" and "cuda" (skipped, with the reason, where the
  emulated backend is not built or no CUDA device exists), with the fused ops switched to it for the whole test; it
  is a switches.Backend: `.name`, and `.device`, where the test's input tensors go. A test that only runs on some
  backends says which: ``@pytest.mark.parametrize("backend", ["cpu", "emulated"], indirect=True)``.
* `workspace`: a function; ``workspace(nbytes)`` sets the workspace budget for the rest of the test (None: the
  device's default); the setting from before the test comes back afterwards, whatever the test set, through this
  function or directly.

Hypothesis profiles:

* "ci" (loaded by default): 300 examples per test, derandomized (a fixed seed: every run draws the same examples,
  so CI is reproducible and a failure is one rerun away), no example database (nothing carried between runs), no
  deadline (example times vary a thousandfold with the drawn shape and backend).
* "thorough" (nightly): ``pytest tests/test_fuzz.py --hypothesis-profile=thorough``, 10x the examples, a fresh
  random seed each run, the example database kept so that a failure found once is replayed first next time.

The option --hypothesis-profile comes from hypothesis' pytest plugin and overrides the default loaded here.
"""

import pytest
from hypothesis import HealthCheck, settings

import ckd_ext

from switches import BACKENDS, on_backend, restored_workspace, set_workspace

_COMMON = dict(
    deadline=None,
    print_blob=True,
    # Examples are slow by design (float64 oracles of up to 2e5 elements) and some draws are rejected on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=3000, **_COMMON)
settings.load_profile("ci")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend this run of the test uses (module docstring)."""
    with on_backend(request.param) as chosen:
        yield chosen


@pytest.fixture
def workspace():
    """Sets the test's workspace budget when called; restores the previous setting after the test."""
    with restored_workspace():
        yield set_workspace


@pytest.fixture
def forward_gradient_bytes():
    """Sets ckd_ext.set_forward_gradient_bytes when called (0: 16-bit CKD / BicKD gradients recomputed in backward);
    restores the device defaults after the test."""
    yield ckd_ext.set_forward_gradient_bytes
    ckd_ext.set_forward_gradient_bytes(None)
