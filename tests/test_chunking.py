"""Chunked execution with partial last strips and tiles, against the float64 oracle: every configuration, on the
CPU kernels in float32 and float64 and on the emulated CUDA kernels.

Chunk sizes (csrc/losses.cpp; rows_within<Acc>(bytes, row_elems, total) = clamp(bytes / (row_elems *
sizeof(Acc)), 1, total)), for a budget B, N rows and C classes:
  CKD teacher anchor, BicKD sample side: strip_rows = min(rows_within(B/2, N, N), rows_within(B/4, C, N)),
      candidate blocks of rows_within(B/4, C, N) rows (when candidates are copies: 16-bit or masked inputs; BicKD
      always);
  CKD student anchor: tile_rows = min(sqrt(B/2 / sizeof(Acc)), rows_within(B/8, C, N), N);
  BicKD class side: strip_cols = min(rows_within(B/2, C, C), rows_within(B/4, N, C)), blocks of
      rows_within(B/4, N, C) columns.
KD works row by row and has no chunks (it is here because every configuration is).

CPU, B = 16 KiB, C = 32:
                           float32 (4 bytes)                  float64 (8 bytes)
  teacher / sample strips  min(8192/604, 4096/128) = 13        min(8192/1208, 4096/256) = 6
                           N=151: 11 x 13 + 8; N=152: 11 x 13 + 9   N=151: 25 x 6 + 1; N=152: 25 x 6 + 2
  candidate blocks         4096/128 = 32: 4 x 32 + 23 / + 24    4096/256 = 16: 9 x 16 + 7 / + 8
  student-anchor tiles     min(45, 2048/128) = 16               min(32, 2048/256) = 8
                           N=151: 9 x 16 + 7; N=152: 9 x 16 + 8     N=151: 18 x 8 + 7; N=152: 19 x 8 (exact)
  class strips and blocks  4096/(4 N) = 6: 32 = 5 x 6 + 2       4096/(8 N) = 3: 32 = 10 x 3 + 2
(8192/608 for N=152 is also 13, 8192/1216 also 6.) So every strip and tile kind ends in a partial one, except
float64 student tiles at N=152, which divide evenly (the full-tiles case next to the partial one at N=151).

Emulated CUDA, B = 4 KiB, N = 42, C = 32, float32: teacher / sample strips min(2048/168, 1024/128) = 8
(42 = 5 x 8 + 2), candidate blocks 8 (5 x 8 + 2), student tiles min(22, 512/128) = 4 (42 = 10 x 4 + 2), class strips
and blocks 1024/168 = 6 (32 = 5 x 6 + 2). (tests/test_emulated.py's N=40, C=30 divides all of these evenly.)
"""
import pytest
import torch

import ckd_ext
from ckd_ext import testing
from helpers import CONFIGS, check_against_oracle, pair, random_mask

ALL = list(CONFIGS)


def with_workspace(nbytes, run):
    saved = ckd_ext.workspace_bytes()
    ckd_ext.set_workspace_bytes(nbytes)
    try:
        assert ckd_ext.workspace_bytes() == nbytes
        return run()
    finally:
        ckd_ext.set_workspace_bytes(saved)


@pytest.mark.parametrize("config", ALL)
@pytest.mark.parametrize("n", [151, 152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_partial_strips_and_tiles(config, n, dtype, reduction):
    """16 KiB: partial last strips, tiles and blocks (module docstring). "mean" computes the gradient in the
    forward, "none" recomputes it in backward with per-anchor weights. N = 151 is masked (masked candidates are
    copied block by block, and masked rows sit inside partial tiles), N = 152 is not (candidates are views)."""
    student, teacher = pair(n, 32, seed=n)
    mask = random_mask(n, seed=n) if n == 151 else None
    with_workspace(16 * 1024, lambda: check_against_oracle(config, student, teacher, dtype=dtype, mask=mask,
                                                           reduction=reduction))


@pytest.mark.skipif(not testing.emulated_available(),
                    reason="the emulated CUDA backend is not built (CKD_EXT_EMULATED=1 pip install --no-build-isolation -e .)")
@pytest.mark.parametrize("config", ALL)
def test_emulated_partial_strips_and_tiles(config):
    """4 KiB at N = 42: partial last strips, tiles and blocks in the CUDA kernels (module docstring). Masked, with
    per-anchor weights ("none"): the backward recomputes every strip with them."""
    student, teacher = pair(42, 32, seed=42)
    mask = random_mask(42, seed=42)

    def run():
        with testing.emulated_cuda():
            check_against_oracle(config, student, teacher, dtype=torch.float32, mask=mask, reduction="none")

    with_workspace(4 * 1024, run)
