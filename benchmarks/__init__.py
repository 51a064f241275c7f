"""Benchmarks for ckd_ext (see docs/benchmarks.md): `cases` (shapes, rows), `providers` (what runs, the
floor), `measure` (time, peak memory, saved bytes, profile), `worker` (the measuring subprocess and its
control), `results` (a run's rows, CSV and machine file), `targets` (the targets checked on a run),
`report` (the markdown tables and plots), `run` (the sweep runner's command line), `costs` (the FLOP and
byte model) and `test_bench` (pytest-benchmark)."""
