"""fastsam with timm: create_sam over timm's optimizer factory, timm's scheduler, AMP; the example learns.

timm imports torchvision. In CI (PyPI's torchvision 0.28.0, a CUDA build, beside the CPU build of
torch) that import needs .ci/torchvision_cpu_fix.py, which .ci/run applies; a broken import fails
here, it is not skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed (pip install 'fastsam[timm]')", allow_module_level=True)
try:
    import timm
    import timm.scheduler
except RuntimeError as exc:  # torchvision's "operator torchvision::nms does not exist"
    raise RuntimeError(f"timm does not import ({exc}); beside a CPU build of torch run "
                       "`python .ci/torchvision_cpu_fix.py` (see that file)") from exc

import fastsam  # noqa: E402
from fastsam.integrations.timm import create_sam  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=4)


def test_create_sam_wraps_timms_optimizer_and_its_scheduler_drives_it():
    model = tiny_model()
    opt = create_sam(model, opt="sgd", lr=0.1, weight_decay=1e-3, rho=0.05)
    assert isinstance(opt, fastsam.SAM) and isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups is opt.base_optimizer.param_groups
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, 1e-3], "timm's groups: no weight decay on biases and norms"
    sched, _ = timm.scheduler.create_scheduler_v2(opt, sched="cosine", num_epochs=4, warmup_epochs=1,
                                                  warmup_lr=1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    sched.step(2)
    assert 1e-3 < opt.param_groups[0]["lr"] < 0.1
    asam = create_sam(model, opt="adamw", lr=1e-3, sam_class=fastsam.ASAM, rho=0.5)
    assert isinstance(asam, fastsam.ASAM) and isinstance(asam.base_optimizer, torch.optim.AdamW)
    with pytest.raises(TypeError, match="sam_class"):
        create_sam(model, sam_class=torch.optim.SGD)


def test_steps_equal_sam_over_the_same_sgd():
    """create_sam + GradScaler steps == fastsam.SAM over a hand-built SGD with timm's groups."""
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 4
    model, ref = tiny_model(), tiny_model()
    opt = create_sam(model, opt="sgd", lr=0.05, weight_decay=1e-3, rho=0.05)
    groups = [{"params": [dict(ref.named_parameters())[n] for n, p in model.named_parameters()
                          if any(p is q for q in g["params"])], "weight_decay": g["weight_decay"]}
              for g in opt.param_groups]
    ref_opt = fastsam.SAM(groups, torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, rho=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.first_step(zero_grad=True)
        F.cross_entropy(ref(x), y).backward()
        ref_opt.second_step(zero_grad=True)
    start = tiny_model()
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), start.parameters())) > 1e-3
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_example_learns_with_amp():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "examples/sam_timm.py", "--train-samples", "128", "--epochs", "2"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", out.stdout).group(1))
    assert accuracy > 0.5, out.stdout
