"""Hypothesis profiles for the property-based tests (tests/test_fuzz.py).

* "ci" (loaded by default): 300 examples per test, derandomized (a fixed seed: every run draws the same examples,
  so CI is reproducible and a failure is one rerun away), no example database (nothing carried between runs), no
  deadline (example times vary a thousandfold with the drawn shape and backend).
* "thorough" (nightly): ``pytest tests/test_fuzz.py --hypothesis-profile=thorough``, 10x the examples, a fresh
  random seed each run, the example database kept so that a failure found once is replayed first next time.

The option --hypothesis-profile comes from hypothesis' pytest plugin and overrides the default loaded here.
"""
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    print_blob=True,
    # Examples are slow by design (float64 oracles of up to 2e5 elements) and some draws are rejected on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=3000, **_COMMON)
settings.load_profile("ci")
