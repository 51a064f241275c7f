"""Tests of the token-level distillation demo (ckd_ext/demos/lm.py): a tiny configuration end to end (seconds on 2
CPU cores) and its argument errors. Needs the `lm` extra (tokenizers)."""
import json
import math

import pytest

pytest.importorskip("tokenizers", reason="the LM demo needs the lm extra: pip install 'ckd_ext[lm]'")

import ckd_ext  # noqa: E402
from ckd_ext.demos import lm  # noqa: E402

TINY = ["--chars", "60000", "--vocab", "300", "--context", "16", "--val-tokens", "512", "--teacher-width", "32",
        "--teacher-layers", "1", "--student-width", "16", "--student-layers", "1", "--batch", "4",
        "--teacher-steps", "20", "--steps", "5", "--threads", "1", "--quiet"]


@pytest.mark.skipif(not ckd_ext.is_available(), reason="the demo runs the fused-linear losses")
def test_tiny_run_prints_perplexities_and_writes_json(tmp_path, capsys):
    results = lm.main([*TINY, "--seeds", "0,1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for label in ("method", "val perplexity", "teacher", *lm.DEFAULT_METHODS):
        assert label in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == list(lm.DEFAULT_METHODS) == list(results["methods"])
    vocab = 300
    for runs in saved["methods"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        # perplexity of a model over `vocab` tokens: finite, above 1; after a few steps at most a few times uniform
        assert all(1.0 < r["val_ppl"] < 4 * vocab and math.isfinite(r["val_ppl"]) for r in runs)
    # 20 teacher steps are enough to beat the uniform distribution over the vocabulary
    assert saved["teacher"]["val_ppl"] < vocab
    # the seeds give different students
    ce = saved["methods"]["ce"]
    assert ce[0]["val_ppl"] != ce[1]["val_ppl"]


@pytest.mark.skipif(not ckd_ext.is_available(), reason="the demo runs the fused-linear losses")
def test_tiny_run_from_a_top_k_teacher_file(tmp_path):
    """kd-topk: the teacher's top-k written once to a safetensors file (int32 ids, bfloat16 log-probabilities of
    every training window) and the student trained from it; its perplexity is reported beside the live teacher's."""
    from safetensors.torch import load_file

    results = lm.main([*TINY, "--seeds", "0", "--methods", "kd,kd-topk", "--topk-k", "8", "--out", str(tmp_path)])
    stored = load_file(str(tmp_path / "teacher_topk.safetensors"))
    windows = stored["windows"].shape[0]
    assert stored["ids"].shape == (windows, 16, 8) and stored["ids"].dtype.is_floating_point is False
    assert stored["logprobs"].dtype.is_floating_point and (stored["logprobs"].float() <= 0).all()
    assert results["teacher"]["topk_file"]["windows"] == windows
    for method in ("kd", "kd-topk"):
        (run,) = results["methods"][method]
        assert 1.0 < run["val_ppl"] < 4 * 300 and math.isfinite(run["val_ppl"])


@pytest.mark.parametrize("argv, message", [
    (["--methods", "kd,bickd"], "--methods must list some of ce, kd, kd+ckd, kd-topk, got 'kd,bickd'"),
    (["--topk-tail", "rest"], "argument --topk-tail: invalid choice: 'rest'"),
    (["--methods", ""], "--methods must list some of"),
    (["--seeds", "a"], "--seeds expects a comma list of integers"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["--kd-weight", "0"], "argument --kd-weight: expected a number > 0, got 0"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        lm.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
