"""The command line: `fastsam info` and the main job `fastsam train`."""

import re
import subprocess
import sys

import pytest


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastsam", *args], capture_output=True, text=True, timeout=timeout)


def test_info_lists_backends_and_reasons():
    out = run("info")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("backends:")
    section = [l.strip() for l in lines[start + 1:start + 4]]
    assert any(re.fullmatch(r"torch\s+available", l) for l in section)
    for name in ("cuda", "triton"):
        line = next(l for l in section if l.startswith(name + " "))
        assert "available" in line
        if "unavailable" in line:
            assert ":" in line, "an unavailable backend must say why"


def test_train_prints_accuracy_and_time_per_optimizer():
    out = run("train", "--epochs", "2", "--optimizers", "sgd,sam,asam,fishersam")
    assert out.returncode == 0, out.stderr
    rows = [l.split() for l in out.stdout.splitlines() if l.split() and l.split()[0] in ("sgd", "sam", "asam",
                                                                                          "fishersam")]
    assert [r[0] for r in rows] == ["sgd", "sam", "asam", "fishersam"]
    for r in rows:
        acc, best, seconds = float(r[1]), float(r[2]), float(r[3])
        assert 0.3 < acc <= 1.0 and acc <= best and seconds > 0
    assert "epoch" in out.stderr  # the progress bar


def test_train_runs_the_other_sam_variants():
    names = ["esam", "msam", "gsam", "looksam"]
    out = run("train", "--epochs", "1", "--optimizers", ",".join(names))
    assert out.returncode == 0, out.stderr
    rows = [l.split() for l in out.stdout.splitlines() if l.split() and l.split()[0] in names]
    assert [r[0] for r in rows] == names
    assert all(0.3 < float(r[1]) <= 1.0 for r in rows)


@pytest.mark.parametrize("args,message", [(["--optimizers", "adam"], "unknown optimizer"),
                                          (["--noise", "1.5"], "--noise")])
def test_train_rejects_bad_arguments(args, message):
    out = run("train", *args)
    assert out.returncode != 0
    assert message in out.stderr


def test_no_command_prints_help():
    out = run()
    assert out.returncode == 2 and "info" in out.stdout and "train" in out.stdout
