"""Benchmarks for ckd_ext (see docs/benchmarks.md). `benchmarks.common` holds the shared helpers."""
