"""Tests of the distillation demo (ckd_ext/demos/classify.py): smoke run, fused == reference trajectories, bad arguments.

Needs the `train` extra (scikit-learn, matplotlib, tqdm). Everything runs on the bundled digits data with
1 epoch and the tiny models, a few seconds in all on 2 CPU cores.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs the train extra: pip install 'ckd_ext[train]'")
pytest.importorskip("matplotlib", reason="the demo needs the train extra: pip install 'ckd_ext[train]'")
pytest.importorskip("tqdm", reason="the demo needs the train extra: pip install 'ckd_ext[train]'")

import ckd_ext  # noqa: E402
from ckd_ext import _extension  # noqa: E402
from ckd_ext.demos import classify, models  # noqa: E402

ALL_METHODS = ["ce", "kd", "ckd", "bickd", "kd+bickd"]
TINY = ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "0", "--quiet"]

needs_fused = pytest.mark.skipif(not ckd_ext.is_available(),
                                 reason=f"--impl fused cannot run: {_extension.unavailable_reason()}")


@pytest.mark.parametrize("impl", ["reference", pytest.param("fused", marks=needs_fused)])
def test_smoke_all_methods_table_json_png(impl, tmp_path, capsys):
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    results = classify.main([*TINY, "--impl", impl, "--out", str(out)])
    assert torch.get_num_threads() == threads  # --threads (1 on digits) is restored after the run
    printed = capsys.readouterr().out
    for label in ["method", "test acc (%)", "loss ms/step", "teacher", "ce (student alone)", *ALL_METHODS]:
        assert label in printed, f"{label!r} missing from the printed table:\n{printed}"
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["summary"]) == ALL_METHODS
    assert len(saved["runs"]) == len(ALL_METHODS)
    for run in saved["runs"]:
        assert len(run["test_acc"]) == 1 and 0.0 <= run["final_test_acc"] <= 100.0
        assert (run["loss_ms_per_step"] == 0.0) == (run["method"] == "ce")
    assert 0.0 <= saved["teacher"]["test_acc"] <= 100.0
    assert saved["config"]["impl"] == impl and results["summary"].keys() == saved["summary"].keys()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _results(finals: dict, teacher: float, epochs: int = 3) -> dict:
    """A results dict as `main` returns it, with the given final accuracies per row and seed (the curves rise
    linearly to them from 30 %)."""
    runs = [dict(setting=row, method=row.split()[0], seed=seed, final_test_acc=acc,
                 test_acc=[30 + (acc - 30) * (e + 1) / epochs for e in range(epochs)])
            for row, accs in finals.items() for seed, acc in enumerate(accs)]
    summary = {row: dict(method=row.split()[0], test_acc_mean=sum(accs) / len(accs), test_acc_std=0.0,
                         test_acc_min=min(accs), test_acc_max=max(accs), loss_ms_per_step=0.1)
               for row, accs in finals.items()}
    config = dict(dataset="digits", teacher_model="digits_teacher", student_model="digits_student", impl="reference",
                  seeds=list(range(len(next(iter(finals.values()))))))
    return dict(config=config, teacher=dict(test_acc=teacher, history=[40.0, 90.0, teacher]), summary=summary,
                runs=runs)


def test_figure_zooms_onto_the_final_accuracies():
    """The learning curves start near 30 %, so their panel spans ~70 points; the final-accuracy panel must
    enclose every seed's final accuracy and the teacher's, and zoom onto them (a few points), with one error bar
    per row from its lowest to its highest seed around the mean."""
    import matplotlib.pyplot as plt
    finals = {"ce": [96.22, 96.44, 96.44], "kd": [97.33, 97.33, 97.56], "ckd w=10 tau=1": [95.11, 95.78, 96.00]}
    teacher = 98.67
    fig = classify.figure(_results(finals, teacher))
    try:
        curves_ax, final_ax = fig.axes
        assert len(curves_ax.get_lines()) == 1 + len(finals)  # the teacher and one mean curve per row
        assert curves_ax.get_ylim()[1] - curves_ax.get_ylim()[0] > 60
        low, high = final_ax.get_ylim()
        values = [a for accs in finals.values() for a in accs] + [teacher]
        assert low < min(values) and max(values) < high
        assert high - low < 2 * (max(values) - min(values)), (low, high)  # zoomed: the data fill over half of it
        bars = final_ax.containers
        assert len(bars) == len(finals)
        for bar, (row, accs) in zip(bars, finals.items()):
            (x,), (mean,) = bar.lines[0].get_data()
            assert mean == pytest.approx(sum(accs) / len(accs))
            (segment,) = bar.lines[2][0].get_segments()
            assert sorted(y for _, y in segment) == pytest.approx([min(accs), max(accs)])
        assert [t.get_text() for t in final_ax.get_xticklabels()] == ["ce (student alone)", "kd", "ckd w=10 tau=1"]
    finally:
        plt.close(fig)


def test_figure_limits_stay_within_0_and_100_and_show_equal_accuracies():
    """Equal final accuracies everywhere still give a visible span (the minimum padding), clipped to [0, 100]."""
    low, high = classify.final_accuracy_limits(_results({"ce": [100.0, 100.0], "kd": [100.0, 100.0]}, 100.0))
    assert high == 100.0 and 99.0 < low < 100.0


def test_ckd_weight_and_tau_lists_sweep_one_row_per_pair(tmp_path, capsys):
    results = classify.main([*TINY, "--impl", "reference", "--methods", "ce,kd,ckd", "--ckd-weight", "1,10",
                             "--ckd-tau", "0.5,2", "--out", str(tmp_path)])
    rows = ["ce", "kd", "ckd w=1 tau=0.5", "ckd w=1 tau=2", "ckd w=10 tau=0.5", "ckd w=10 tau=2"]
    assert list(results["summary"]) == rows
    assert [(s.get("ckd_weight"), s.get("ckd_tau")) for s in results["summary"].values()] == [
        (None, None), (None, None), (1.0, 0.5), (1.0, 2.0), (10.0, 0.5), (10.0, 2.0)]
    assert [r["setting"] for r in results["runs"]] == rows
    assert [r["method"] for r in results["runs"]] == ["ce", "kd"] + ["ckd"] * 4
    printed = capsys.readouterr().out
    for row in rows[1:]:
        assert row in printed


def test_a_swept_row_trains_as_the_single_setting_does():
    """Each row of a sweep is the run its flags give alone (same loss trajectory); weight 0 is CE alone."""
    base = ["--impl", "reference", "--teacher-epochs", "1", "--seed", "0", "--quiet"]
    swept = classify.loss_trajectory([*base, "--methods", "ce,ckd,kd+ckd", "--ckd-weight", "0,50",
                                      "--ckd-tau", "0.5,2"], steps=5)
    assert len(swept) == 1 + 2 * 4
    alone = classify.loss_trajectory([*base, "--methods", "ckd,kd+ckd", "--ckd-weight", "50", "--ckd-tau", "0.5"],
                                     steps=5)
    assert swept["ckd w=50 tau=0.5"] == alone["ckd"] and swept["kd+ckd w=50 tau=0.5"] == alone["kd+ckd"]
    assert swept["ckd w=0 tau=2"] == swept["ckd w=0 tau=0.5"] == swept["ce"]
    assert swept["ckd w=50 tau=2"] != swept["ckd w=50 tau=0.5"]


def test_seeds_give_mean_and_std(tmp_path):
    results = classify.main(["--epochs", "1", "--teacher-epochs", "1", "--seeds", "0,1", "--quiet",
                          "--impl", "reference", "--methods", "ce", "--out", str(tmp_path)])
    accs = [r["final_test_acc"] for r in results["runs"]]
    assert len(accs) == 2
    summary = results["summary"]["ce"]
    assert summary["test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert summary["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert (summary["test_acc_min"], summary["test_acc_max"]) == (min(accs), max(accs))


def test_same_seed_same_trajectory():
    argv = ["--impl", "reference", "--teacher-epochs", "1", "--methods", "kd,ckd", "--quiet"]
    assert classify.loss_trajectory(argv, steps=5) == classify.loss_trajectory(argv, steps=5)


@needs_fused
def test_fused_and_reference_trajectories_match():
    argv = ["--teacher-epochs", "1", "--seed", "0", "--methods", ",".join(ALL_METHODS), "--quiet"]
    fused = classify.loss_trajectory([*argv, "--impl", "fused"], steps=20)
    ref = classify.loss_trajectory([*argv, "--impl", "reference"], steps=20)
    for method in ALL_METHODS:
        assert len(fused[method]) == len(ref[method]) == 20
        for step, (f, r) in enumerate(zip(fused[method], ref[method])):
            assert abs(f - r) <= 1e-4 * abs(r), f"{method} step {step}: fused {f} vs reference {r}"


def test_teacher_save_and_load(tmp_path):
    path = tmp_path / "teacher.pt"
    base = ["--epochs", "1", "--seeds", "0", "--quiet", "--impl", "reference", "--methods", "ce"]
    trained = classify.main([*base, "--teacher-epochs", "2", "--save-teacher", str(path), "--out", str(tmp_path / "a")])
    loaded = classify.main([*base, "--teacher", str(path), "--out", str(tmp_path / "b")])
    assert loaded["teacher"]["test_acc"] == trained["teacher"]["test_acc"]
    assert loaded["runs"][0]["final_test_acc"] == trained["runs"][0]["final_test_acc"]


def _garbage(tmp_path):
    bad = tmp_path / "garbage.pt"
    torch.save({"arch": "resnet8x4", "state_dict": {}}, bad)
    return bad


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ce,foo"], "unknown method 'foo'"),
    (["--methods", "kd+kd"], "unknown method 'kd+kd'"),
    (["--methods", "ce+kd"], "unknown method 'ce+kd'"),
    (["--kd-weight", "-1"], "expected a weight >= 0"),
    (["--ckd-weight", "-0.5"], "expected a weight >= 0"),
    (["--bickd-w-class", "-2"], "expected a weight >= 0"),
    (["--ce-weight", "nan"], "expected a weight >= 0"),
    (["--ckd-tau", "0"], "expected a number > 0"),
    (["--ckd-weight", "10,-1"], "expected a weight >= 0, got -1"),
    (["--ckd-tau", "1,0"], "expected a number > 0, got 0"),
    (["--ckd-tau", ","], "expected a comma list, got ','"),
    (["--ckd-weight", "10,50,10"], "a value is listed twice in '10,50,10'"),
    (["--kd-temperature", "-4"], "expected a number > 0"),
    (["--impl", "eager"], "invalid choice: 'eager'"),
    (["--seeds", "0,x"], "--seeds expects a comma list of integers"),
    (["--epochs", "0"], "expected an integer >= 1"),
    (["--threads", "-1"], "expected an integer >= 0"),
    (["--dataset", "cifar100"], "needs --data-dir"),
    (["--dataset", "cifar100", "--data-dir", "/nonexistent/cifar"], "cifar-100-python/{train,test,meta}"),
    (["--data-dir", "/tmp"], "only used with --dataset cifar100"),
    (["--teacher", "/nonexistent/teacher.pt"], "no such file"),
])
def test_bad_arguments_fail_before_training(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(classify, "fit", lambda *a, **k: pytest.fail("training started despite a bad argument"))
    monkeypatch.setattr(classify, "load_data", lambda *a, **k: pytest.fail("data loaded despite a bad argument"))
    with pytest.raises(SystemExit) as exc:
        classify.main([*argv, "--impl", "reference"] if argv[0] != "--impl" else argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_wrong_teacher_file_is_rejected_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(classify, "fit", lambda *a, **k: pytest.fail("training started despite a bad teacher"))
    with pytest.raises(SystemExit) as exc:
        classify.main(["--teacher", str(_garbage(tmp_path)), "--impl", "reference", "--quiet",
                    "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "not a saved 'digits_teacher' teacher" in capsys.readouterr().err


def test_teacher_and_data_code_raise_value_errors(tmp_path):
    """Below `main` the errors are exceptions; only `main` turns them into usage errors."""
    with pytest.raises(ValueError, match="not a saved 'digits_teacher' teacher"):
        classify.load_teacher(str(_garbage(tmp_path)), "digits_teacher", 10, "cpu")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be read"):
        classify.load_teacher(str(tmp_path / "empty.pt"), "digits_teacher", 10, "cpu")


@pytest.mark.skipif(ckd_ext.is_available(), reason="the fused ops can run here")
def test_fused_without_the_extension_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(classify, "load_data", lambda *a, **k: pytest.fail("data loaded without the fused ops"))
    with pytest.raises(SystemExit) as exc:
        classify.main(["--impl", "fused", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert _extension.unavailable_reason() in err and "or use --impl reference" in err


def test_malformed_cifar_copy_gets_a_clear_error(tmp_path, capsys):
    pytest.importorskip("torchvision", reason="the CIFAR-100 path needs the cifar extra (torchvision)")
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(SystemExit) as exc:
        classify.main(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--impl", "reference",
                    "--quiet", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "cifar-100-python/{train,test,meta}" in capsys.readouterr().err


def test_module_entry_point_rejects_unknown_method():
    proc = subprocess.run([sys.executable, "-m", "ckd_ext.demos.classify", "--methods", "crd", "--impl", "reference"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown method 'crd'" in proc.stderr
    assert proc.stdout == ""


def test_console_entry_point_exits_zero(tmp_path):
    """`ckd-train` is ckd_ext.demos.classify:cli: a successful run exits 0 and prints the table, not the results dict."""
    code = ("import sys; from ckd_ext.demos.classify import cli; sys.argv = ['ckd-train'] + sys.argv[1:]; "
            "sys.exit(cli())")
    proc = subprocess.run([sys.executable, "-c", code, "--methods", "ce", "--seeds", "0", "--epochs", "1",
                           "--teacher-epochs", "1", "--impl", "reference", "--quiet", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test acc (%)" in proc.stdout and "'config'" not in proc.stdout + proc.stderr


def test_models_shapes_and_sizes():
    x = torch.rand(3, 64)
    assert models.digits_teacher()(x).shape == (3, 10)
    assert models.digits_student()(x).shape == (3, 10)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(models.digits_student()) < n_params(models.digits_teacher()) // 100
    img = torch.rand(2, 3, 32, 32)
    small, big = models.resnet8x4(), models.resnet32x4()
    assert small(img).shape == big(img).shape == (2, 100)
    # the standard CIFAR pair (CRD / mdistiller): ~1.23 M and ~7.43 M parameters
    assert round(n_params(small) / 1e6, 2) == 1.23 and round(n_params(big) / 1e6, 2) == 7.43
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("resnet9000", 10)


@needs_fused
def test_torchrun_ddp_ring(tmp_path):
    """The README's torchrun command at a tiny size: 2 gloo ranks on CPU, CKD and BicKD with global negatives by
    ring; the table says which mode ran. (The losses' numbers under DDP are tested in tests/test_distributed.py.)"""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ckd_ext.demos.classify", "--ddp", "--global-negatives", "ring", "--methods", "ckd,bickd", *TINY,
               "--out", str(out)]
    root = Path(__file__).resolve().parents[1]  # the ranks import this checkout's ckd_ext
    # A session of its own, so that a timeout kills the ranks too and not only the launcher.
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                                start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail("torchrun did not finish within 120 s")
    done = subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed: DDP, 2 ranks (gloo)" in done.stdout and "the global batch, ring" in done.stdout
    assert done.stdout.count("method") == 1  # rank 0 alone reports
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["global_negatives"] == "ring" and saved["config"]["world_size"] == 2
    assert list(saved["summary"]) == ["ckd", "bickd"]
