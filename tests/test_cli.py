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


def _rows(stdout, names):
    """Result rows: name, accuracy mean, '±', std, best accuracy, images/s, 'N.NNx' (throughput vs SGD)."""
    return [l.split() for l in stdout.splitlines() if l.split() and l.split()[0] in names]


def test_train_prints_accuracy_and_throughput_per_optimizer():
    names = ["sgd", "sam", "asam", "fishersam"]
    out = run("train", "--epochs", "2", "--seeds", "2", "--optimizers", ",".join(names))
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout, names)
    assert [r[0] for r in rows] == names
    for r in rows:
        acc, pm, std, best, ips, ratio = float(r[1]), r[2], float(r[3]), float(r[4]), float(r[5]), r[6]
        assert 0.3 < acc <= 1.0 and pm == "±" and 0 <= std < 0.5 and best <= 1.0 and ips > 0
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
    assert rows[0][6] == "1.00x"  # SGD relative to itself
    assert "2 seed(s)" in out.stdout and "total" in out.stdout
    assert "epoch" in out.stderr  # the progress bar


def test_train_one_seed_has_zero_spread_and_seeds_differ():
    one = _rows(run("train", "--epochs", "1", "--seeds", "1", "--optimizers", "sgd").stdout, ["sgd"])
    assert float(one[0][3]) == 0.0
    other = _rows(run("train", "--epochs", "1", "--seeds", "1", "--seed", "1", "--optimizers", "sgd").stdout, ["sgd"])
    assert one[0][1] != other[0][1] or one[0][4] != other[0][4]


def test_train_runs_the_other_sam_variants():
    names = ["esam", "msam", "gsam", "looksam", "intervalsam"]
    out = run("train", "--epochs", "1", "--seeds", "1", "--optimizers", ",".join(names))
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout, names)
    assert [r[0] for r in rows] == names
    assert all(0.1 < float(r[1]) <= 1.0 for r in rows)
    assert all(r[6] == "-" for r in rows)  # no SGD row to compare with


def test_train_help_shows_defaults_and_every_optimizer():
    out = run("train", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "(default: 3)" in text and "(default: 30)" in text
    from fastsam.train import OPTIMIZERS

    assert "".join(out.stdout.split()).count(",".join(OPTIMIZERS)) == 1


def test_train_registry_takes_one_line_per_optimizer():
    import torch

    from fastsam import train

    train.register("_test_adam", lambda p, s: torch.optim.Adam(p, lr=s.lr / 10), "plain")
    try:
        opt = train.make_optimizer("_test_adam", [torch.nn.Parameter(torch.zeros(2))], 0.1, "auto")
        assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.01
        with pytest.raises(ValueError, match="already registered"):
            train.register("_test_adam", lambda p, s: None, "plain")
        with pytest.raises(ValueError, match="drive"):
            train.register("_test_other", lambda p, s: None, "twice")
    finally:
        train.OPTIMIZERS.pop("_test_adam")


@pytest.mark.parametrize("args,message", [(["--optimizers", "adam"], "unknown optimizer"),
                                          (["--noise", "1.5"], "--noise"),
                                          (["--seeds", "0"], "--seeds")])
def test_train_rejects_bad_arguments(args, message):
    out = run("train", *args)
    assert out.returncode != 0
    assert message in out.stderr


def test_no_command_prints_help():
    out = run()
    assert out.returncode == 2 and "info" in out.stdout and "train" in out.stdout


def test_train_runs_the_layerwise_and_reweighting_variants():
    names = ["awp", "wtawp", "hero", "deltasam"]
    out = run("train", "--epochs", "1", "--seeds", "1", "--optimizers", ",".join(names))
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout, names)
    assert [r[0] for r in rows] == names
    assert all(0.1 < float(r[1]) <= 1.0 for r in rows)
