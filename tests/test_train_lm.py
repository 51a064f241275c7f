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
    import torch
    from safetensors.torch import load_file

    results = lm.main([*TINY, "--seeds", "0", "--methods", "kd,kd-topk,kd+ckd-topk", "--ckd-anchor", "student",
                       "--topk-k", "8", "--out", str(tmp_path)])
    stored = load_file(str(tmp_path / "teacher_topk.safetensors"))
    windows = stored["windows"].shape[0]
    assert stored["ids"].shape == (windows, 16, 8) and stored["ids"].dtype.is_floating_point is False
    assert stored["logprobs"].dtype.is_floating_point and (stored["logprobs"].float() <= 0).all()
    # kd+ckd-topk's moments, float32, one of each per token; Cauchy-Schwarz over the vocabulary of 300 ties the sum
    # of squares to the sum (V * sum of squares >= sum^2)
    for name in ("log_normalizer", "logit_sum", "logit_square_sum"):
        assert stored[name].shape == (windows, 16) and stored[name].dtype == torch.float32, name
    assert (stored["logit_square_sum"] * 300 >= stored["logit_sum"].square() * (1 - 1e-5)).all()
    assert results["teacher"]["topk_file"]["windows"] == windows
    for method in ("kd", "kd-topk", "kd+ckd-topk"):
        (run,) = results["methods"][method]
        assert 1.0 < run["val_ppl"] < 4 * 300 and math.isfinite(run["val_ppl"])


@pytest.mark.skipif(not ckd_ext.is_available(), reason="the demo runs the fused-linear losses")
def test_tiny_run_gives_one_row_per_divergence_and_teacher_form(tmp_path, capsys):
    """--divergences: each KD method (live teacher, teacher file) runs once per divergence, forward KL under the
    method's own name; the same seed sees the same initialisation and batches, so only the loss tells rows apart."""
    results = lm.main([*TINY, "--seeds", "0", "--methods", "ce,kd,kd-topk", "--topk-k", "8",
                       "--divergences", "forward_kl,jsd,tvd", "--jsd-beta", "0.3", "--out", str(tmp_path)])
    labels = ["ce", "kd", "kd/jsd", "kd/tvd", "kd-topk", "kd-topk/jsd", "kd-topk/tvd"]
    assert list(results["methods"]) == labels
    assert list(json.loads((tmp_path / "results.json").read_text())["methods"]) == labels
    for label, runs in results["methods"].items():
        (run,) = runs
        assert run["method"] == label.split("/")[0]
        assert run["divergence"] == (None if label == "ce" else label.split("/")[1] if "/" in label else "forward_kl")
        assert 1.0 < run["val_ppl"] < 4 * 300 and math.isfinite(run["val_ppl"])
    ppl = {label: runs[0]["val_ppl"] for label, runs in results["methods"].items()}
    assert len(set(ppl.values())) == len(ppl), ppl  # every divergence trains a different student
    table = capsys.readouterr().out.split("\n")
    assert table[0].split()[:2] == ["method", "divergence"]
    for label in labels[1:]:
        method, divergence = (label.split("/") + ["forward_kl"])[:2]
        assert any(line.split()[:2] == [method, divergence] for line in table), (label, table)


@pytest.mark.skipif(not ckd_ext.is_available(), reason="the demo runs the fused-linear losses")
@pytest.mark.parametrize("divergence", lm.DIVERGENCES)
@pytest.mark.parametrize("method", ["kd", "kd-topk", "kd+ckd-topk"])
def test_objective_takes_the_divergence_and_its_parameter(method, divergence):
    """distillation_loss against the float64 oracle (ckd_ext.reference on materialised logits): KD with the
    divergence (and --jsd-beta / --skew-alpha, not their defaults) weighted by --kd-weight, plus --ce-weight CE, and
    for kd+ckd-topk --ckd-weight top-k CKD at --ckd-tau from the same top-k teacher and its moments."""
    import torch
    from ckd_ext import reference
    from tolerances import assert_matches

    a = lm.parse_args(["--jsd-beta", "0.3", "--skew-alpha", "0.4", "--kd-weight", "0.7", "--ce-weight", "0.2",
                       "--kd-temperature", "2", "--topk-k", "5", "--ckd-weight", "0.6", "--ckd-tau", "0.5",
                       "--ckd-anchor", "student"])
    g = torch.Generator().manual_seed(3)
    vocab, tokens = 40, 12
    student, teacher = lm.CausalLM(vocab, 8, 1, tokens), lm.CausalLM(vocab, 12, 1, tokens)
    hidden = torch.randn(2, tokens // 2, 8, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(2, tokens // 2, 12, generator=g)
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=g)
    chosen = dict(lm.divergence_kwargs(a, divergence), temperature=2.0)
    hs, ws = hidden.detach().flatten(0, 1).double(), student.head.weight.detach().double()
    ce = torch.nn.functional.cross_entropy(hs @ ws.T, labels.flatten())
    if method == "kd":
        given = teacher_hidden
        kd = reference.kd_loss(hs @ ws.T, teacher_hidden.flatten(0, 1).double() @ teacher.head.weight.double().T,
                               **chosen)
    else:
        top = lm.teacher_topk(teacher_hidden.flatten(0, 1), teacher.head.weight, a.topk_k, temperature=2.0,
                              moments=True)
        stored = top if method == "kd+ckd-topk" else top[:2]  # the file holds the moments only for kd+ckd-topk
        given = tuple(x.unflatten(0, (2, tokens // 2)) for x in stored)
        kd = reference.fused_linear_topk_kd_loss(hs, ws, top.ids, top.logprobs.double(), tail=a.topk_tail, **chosen)
    expected = 0.7 * kd + 0.2 * ce
    if method == "kd+ckd-topk":
        expected = expected + 0.6 * reference.fused_linear_topk_ckd_loss(
            hs, ws, top.ids, *(x.double() for x in top[1:]), temperature=2.0, tau=0.5)
    loss = lm.distillation_loss(method, a, hidden, labels, student, given, teacher, divergence)
    assert_matches(loss.detach(), expected, torch.float32, f"{method} {divergence}")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "kd,bickd"], "--methods must list some of ce, kd, kd+ckd, kd-topk, kd+ckd-topk, got 'kd,bickd'"),
    (["--methods", "kd+ckd,kd+ckd-topk"], "--methods kd+ckd-topk needs --ckd-anchor student"),
    (["--topk-tail", "rest"], "argument --topk-tail: invalid choice: 'rest'"),
    (["--divergences", "kl"], "argument --divergences: expected some of forward_kl, reverse_kl, jsd, skew_kl, tvd, "
                              "got 'kl'"),
    (["--divergences", "jsd,jsd"], "argument --divergences: a value is listed twice in 'jsd,jsd'"),
    (["--jsd-beta", "1"], "argument --jsd-beta: expected a number in the open interval (0, 1), got 1"),
    (["--skew-alpha", "0"], "argument --skew-alpha: expected a number in the open interval (0, 1), got 0"),
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
