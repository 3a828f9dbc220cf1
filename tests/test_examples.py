"""The scripts in examples/ run end to end on tiny settings (CPU), and learn something."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from gloo_ranks import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def accuracy(text):
    return float(re.search(r"accuracy (?:after \d+ SAM steps: )?([0-9.]+)", text).group(1))


def test_plain_loop_with_clipping_schedule_and_resume():
    assert accuracy(run(["examples/sam_plain.py", "--steps", "40"])) > 0.9


def test_gradient_accumulation_over_micro_batches():
    assert accuracy(run(["examples/sam_plain.py", "--steps", "30", "--accumulate", "4"])) > 0.9


@pytest.mark.parametrize("optimizer", ["sam", "fisher"])
def test_amp_with_grad_scaler(optimizer):
    assert accuracy(run(["examples/sam_amp.py", "--steps", "40", "--optimizer", optimizer])) > 0.6


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["global", "local"])
def test_ddp_with_torchrun(mode):
    # About one torchrun+gloo run in ten aborts at interpreter exit ("terminate called without an
    # active exception") on this CPU build of torch, with or without fastsam (a plain DDP script
    # does it too), after the script has finished its work. Up to three attempts keep that torch
    # teardown race from failing CI while any real failure still fails every attempt.
    errors = []
    for _ in range(3):
        try:
            text = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()), "examples/sam_ddp.py", "--steps", "5",
                        "--perturbation", mode], timeout=300)
        except AssertionError as exc:
            errors.append(str(exc))
            continue
        assert "weights identical on all ranks: True" in text
        return
    pytest.fail("\n\n".join(errors))


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="Lightning is not installed")
def test_lightning_manual_optimization():
    assert accuracy(run(["examples/sam_lightning.py", "--max-steps", "20"])) > 0.5


# ---- SAM-family recipes (issue 15): each runs on tiny settings; their defining properties are
# checked in tests/test_example_recipes.py.

def test_sdat_domain_adversarial():
    text = run(["examples/sam_sdat.py", "--steps", "150"])
    assert float(re.search(r"target accuracy ([0-9.]+)", text).group(1)) > 0.7


def test_saq_quantization_aware():
    text = run(["examples/sam_saq.py", "--steps", "150"])
    assert float(re.search(r"int8 accuracy ([0-9.]+)", text).group(1)) > 0.7


@pytest.mark.parametrize("extra", [[], ["--inner-rho", "0.01", "--first-order"]])
def test_sharp_maml(extra):
    text = run(["examples/sam_sharp_maml.py", "--steps", "60", *extra])
    before, after = map(float, re.search(r"before ([0-9.]+) after ([0-9.]+)", text).groups())
    assert after < before


def test_swa_with_sam():
    text = run(["examples/sam_swa.py", "--steps", "120"])
    assert float(re.search(r"SWA accuracy ([0-9.]+)", text).group(1)) > 0.9
