"""`fastsam train --save DIR` then `fastsam sharpness DIR`: one table row per optimizer, one figure."""

import os
import subprocess
import sys

import pytest
import torch


def run(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastsam", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_train_save_then_sharpness_table_and_figure(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    models = tmp_path / "models"
    out = run("train", "--epochs", "2", "--seeds", "2", "--optimizers", "sgd,sam", "--save", str(models))
    assert out.returncode == 0, out.stderr
    files = sorted(os.listdir(models))
    assert files == ["sam-seed0.pt", "sam-seed1.pt", "sgd-seed0.pt", "sgd-seed1.pt"]
    saved = torch.load(models / "sam-seed1.pt", weights_only=True)
    assert saved["optimizer"] == "sam" and saved["seed"] == 1 and "conv1.weight" in saved["state_dict"]

    figure = tmp_path / "curves.png"
    out = run("sharpness", str(models), "--samples", "128", "--m", "64", "--steps", "2", "--hessian-samples", "64",
              "--hessian-iters", "3", "--trace-samples", "2", "--landscape-steps", "5", "--figure", str(figure))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["sgd"], ["sam"])}
    assert set(rows) == {"sgd", "sam"}
    for name, r in rows.items():
        # optimizer, models, acc ± std, m-sharpness ± std, lambda_max ± std, trace ± std
        assert r[1] == "2" and r[3] == r[6] == r[9] == r[12] == "±"
        acc, ms, lam, tr = float(r[2]), float(r[5]), float(r[8]), float(r[11])
        assert 0.1 < acc <= 1.0 and ms >= 0 and lam > 0 and tr != 0
        # the table's test accuracy is the one train measured at the end of training
        accs = [torch.load(models / f"{name}-seed{s}.pt", weights_only=True)["test_accuracy"] for s in (0, 1)]
        assert acc == pytest.approx(sum(accs) / 2, abs=1e-3)
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "model" in out.stderr  # the progress bar


def test_sharpness_without_models_says_how_to_make_them(tmp_path):
    out = run("sharpness", str(tmp_path))
    assert out.returncode != 0 and "fastsam train --save" in out.stderr
