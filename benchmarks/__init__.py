"""Benchmarks for ckd_ext (see docs/benchmarks.md): `cases` (shapes, rows), `providers` (what runs, the
floor), `measure` (time, peak memory, saved bytes, profile), `worker` (the measuring subprocess and its
control), `run` (the sweep runner: CSV, tables, plots, targets) and `test_bench` (pytest-benchmark)."""
