"""Mixed precision: autocast + GradScaler with SAM-family optimizers (CPU bf16 here, CUDA fp16 on GPU)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastsam


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))


def data(n=8, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=gen).to(device), torch.randint(0, 4, (16,), generator=gen).to(device))
            for _ in range(n)]


def run(opt_cls, base, kw, *, scaler=None, device="cpu", amp_dtype=torch.bfloat16, steps=None, clip=None,
        unscale_first=False):
    model = make_model().to(device)
    opt = opt_cls(model.parameters(), base, **kw)
    for x, y in data(device=device)[:steps]:
        with torch.autocast(device, dtype=amp_dtype):
            loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler if unscale_first else None)
        with torch.autocast(device, dtype=amp_dtype):
            loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.second_step()
        opt.zero_grad()
    return model, opt


CASES = [
    (fastsam.SAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (fastsam.ASAM, torch.optim.AdamW, dict(lr=1e-2)),
    (fastsam.SAM, torch.optim.RMSprop, dict(lr=1e-2)),  # no fused path: unscale + host-side skip
    (fastsam.GSAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (fastsam.LookSAM, torch.optim.SGD, dict(lr=0.1, k=2)),
]


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("opt_cls,base,kw", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_grad_scaler_matches_unscaled_run(opt_cls, base, kw, clip):
    """A power-of-two loss scale changes nothing: same weights as the run without a scaler."""
    ref, _ = run(opt_cls, base, kw, clip=clip)
    for unscale_first in (False, True):
        if opt_cls is fastsam.GSAM and clip and not unscale_first:
            continue  # rejected: see test_gsam_with_unscale_needs_an_unscaled_first_pass
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
        got, _ = run(opt_cls, base, kw, scaler=scaler, clip=clip, unscale_first=unscale_first)
        for a, b in zip(got.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gsam_with_unscale_needs_an_unscaled_first_pass():
    """GSAM mixes g and g_p: scaler.unscale_() on g_p alone would mix two scales, so it is refused."""
    model = make_model()
    opt = fastsam.GSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = data(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(ValueError, match="grad_scaler=scaler to first_step"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)), "weights restored"


def test_fisher_sam_needs_and_gets_the_true_scale():
    kw = dict(lr=0.1, momentum=0.9, eta=1.0)
    ref, _ = run(fastsam.FisherSAM, torch.optim.SGD, kw)
    scaled = lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)  # noqa: E731
    good, _ = run(fastsam.FisherSAM, torch.optim.SGD, kw, scaler=scaled(), unscale_first=True)
    bad, _ = run(fastsam.FisherSAM, torch.optim.SGD, kw, scaler=scaled())
    for a, b in zip(good.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(bad.parameters(), ref.parameters()))


def one_step(opt, model, x, y, scaler, poison_first=False, poison_second=False):
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if poison_first:
        next(model.parameters()).grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if poison_second:
        next(model.parameters()).grad[0, 0] = float("nan")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                     (torch.optim.AdamW, dict(lr=1e-2)), (torch.optim.RMSprop, dict(lr=1e-2))])
def test_overflow_skips_the_update_and_leaves_no_perturbation(base, kw):
    model = make_model()
    opt = fastsam.SAM(model.parameters(), base, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = data(1)[0]
    before = [p.detach().clone() for p in model.parameters()]

    one_step(opt, model, x, y, scaler, poison_second=True)  # second pass overflows
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)), "restored, not stepped"
    assert scaler.get_scale() == 2.0 ** 7, "the scaler backs off"
    for p in model.parameters():  # a skipped step leaves the state as fresh as it was
        for key, value in opt.state[p].items():
            assert not value.any(), f"{key} changed by a skipped step"

    one_step(opt, model, x, y, scaler, poison_first=True)  # first pass overflows
    assert opt.perturbation_skipped.item()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))

    one_step(opt, model, x, y, scaler)  # a clean step moves the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_scaler_step_adds_no_host_sync_with_a_fused_base():
    """GradScaler.step + our fused restore/step: no .item()-style op at all (CPU proxy of the GPU check)."""
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "_local_scalar_dense" in str(func) or "nonzero" in str(func):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for x, y in data(3):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        with Watch():
            opt.first_step(zero_grad=True)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        with Watch():
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    assert seen == []


def test_step_without_closure_finishes_a_started_step():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data(1)[0]
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    assert opt.step() is None and opt._perturbed is None


@pytest.mark.gpu
@pytest.mark.parametrize("opt_cls,base,kw", CASES[:2], ids=lambda c: getattr(c, "__name__", ""))
def test_fp16_autocast_with_scaler_on_cuda(opt_cls, base, kw):
    ref, _ = run(opt_cls, base, kw, device="cuda", amp_dtype=torch.float16,
                 scaler=torch.amp.GradScaler("cuda", init_scale=2.0 ** 10))
    assert all(torch.isfinite(p).all() for p in ref.parameters())
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(opt_cls, base, kw, device="cuda", amp_dtype=torch.float16, steps=3,
            scaler=torch.amp.GradScaler("cuda", init_scale=2.0 ** 10))
    finally:
        torch.cuda.set_sync_debug_mode(0)
