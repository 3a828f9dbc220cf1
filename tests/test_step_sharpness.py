"""optimizer.sharpness: L(w + e) - L(w) from the losses a SAM step already has, on the device, no sync."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from fastsam.sharpness import SharpnessLog
from helpers import host_sync_watch
from test_esam import per_sample_closure


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batch(seed=1, n=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


SGD = dict(lr=0.1, momentum=0.9)
# (class, kwargs): every SAM-family optimizer with a two-call form.
TWO_CALL = [
    (fastsam.SAM, dict(rho=0.2)),
    (fastsam.ASAM, dict(rho=0.5, eta=0.01)),
    (fastsam.FisherSAM, dict(rho=0.1, eta=1.0)),
    (fastsam.GSAM, dict(rho=0.2, alpha=0.3)),
    (fastsam.LookSAM, dict(rho=0.2, k=2, alpha=0.5)),
    (fastsam.ESAM, dict(rho=0.2, beta=1.0, gamma=1.0)),
    (fastsam.MSAM, dict(rho=0.2, micro_batches=1)),
]
# Classes added later that keep the two-call form (present on main when this test was written).
for _name, _kw in (("AWP", dict(rho=0.05)), ("HERO", dict(rho=0.05, adaptive=False)), ("AESAM", dict(rho=0.2, total_steps=4)),
                   ("RandomSwitchSAM", dict(rho=0.2, probability=1.0, seed=1)), ("DeltaSAM", dict(rho=0.2)),
                   ("KSAM", dict(rho=0.2, gamma=1.0)), ("FriendlySAM", dict(rho=0.2)), ("WSAM", dict(rho=0.2))):
    if hasattr(fastsam, _name):
        TWO_CALL.append((getattr(fastsam, _name), _kw))


def ids(cases):
    return [c[0].__name__ for c in cases]


def perturbed_loss_by_hand(model, x, y, rho):
    """L(w + rho g / ||g||) on a copy, SAM's perturbed point written out."""
    import copy

    m = copy.deepcopy(model)
    loss = F.cross_entropy(m(x), y)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(m.parameters(), grads):
            p.add_(rho / (norm + 1e-12) * g)
        return F.cross_entropy(m(x), y)


@pytest.mark.parametrize("cls,kw", TWO_CALL, ids=ids(TWO_CALL))
def test_two_call_form_sets_the_difference(cls, kw):
    model = make_model()
    opt = cls(model.parameters(), torch.optim.SGD, **kw, **SGD)
    for step in range(4):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        sam_step = opt.needs_second_pass
        opt.first_step(zero_grad=True, loss=loss)
        perturbed = F.cross_entropy(model(x), y)
        perturbed.backward()
        opt.second_step(zero_grad=True, loss=perturbed)
        if sam_step:
            assert opt.sharpness is not None and opt.sharpness.dim() == 0 and not opt.sharpness.requires_grad
            assert torch.equal(opt.sharpness, perturbed.detach() - loss.detach())
        else:  # LookSAM's reuse step: no perturbed point, no sharpness
            assert opt.sharpness is None


def test_sam_perturbed_loss_is_the_sam_point():
    """The difference is the sharpness at SAM's point w + rho g/||g|| (checked against a hand-made copy)."""
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.3, **SGD)
    x, y = batch()
    expected = perturbed_loss_by_hand(model, x, y, 0.3) - F.cross_entropy(model(x), y).detach()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step(lambda: F.cross_entropy(model(x), y).backward() or F.cross_entropy(model(x), y), loss=loss)
    torch.testing.assert_close(opt.sharpness, expected, rtol=1e-5, atol=1e-7)
    assert opt.sharpness > 0  # a gradient step up the loss raises it


@pytest.mark.parametrize("cls,kw", TWO_CALL[:5], ids=ids(TWO_CALL[:5]))
def test_closure_form_sets_the_difference(cls, kw):
    model = make_model()
    opt = cls(model.parameters(), torch.optim.SGD, **kw, **SGD)
    for step in range(4):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen = []

        def closure():
            out = F.cross_entropy(model(x), y)
            out.backward()
            seen.append(out.detach())
            return out

        sam_step = opt.needs_second_pass
        returned = opt.step(closure, loss=loss)
        if sam_step:
            assert torch.equal(returned.detach(), seen[0])
            assert torch.equal(opt.sharpness, seen[0] - loss.detach())
        else:
            assert seen == [] and opt.sharpness is None


def test_missing_loss_leaves_none_and_old_value_is_cleared():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, **SGD)
    x, y = batch()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True, loss=loss)
    p = F.cross_entropy(model(x), y)
    p.backward()
    opt.second_step(zero_grad=True, loss=p)
    assert opt.sharpness is not None
    for first, second in ((True, False), (False, True), (False, False)):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True, loss=loss if first else None)
        p = F.cross_entropy(model(x), y)
        p.backward()
        opt.second_step(zero_grad=True, loss=p if second else None)
        assert opt.sharpness is None
    # closure form without loss=: None as well
    F.cross_entropy(model(x), y).backward()
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert opt.sharpness is None


def test_interval_sam_cheap_steps_have_no_sharpness():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, every=2, **SGD)
    x, y = batch()
    got = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True, loss=loss)
        p = F.cross_entropy(model(x), y)
        p.backward()
        opt.second_step(zero_grad=True, loss=p)
        got.append(opt.sharpness is not None)
    assert got == [True, False, True, False]


def test_bad_loss_raises_before_anything_moves():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, **SGD)
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="scalar loss"):
        opt.first_step(loss=F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(TypeError, match="scalar loss"):
        opt.first_step(loss="0.3")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt._perturbed is None
    opt.first_step(loss=1.5)  # a number is accepted
    with pytest.raises(ValueError, match="scalar loss"):
        opt.second_step(loss=torch.ones(2))
    opt.second_step(loss=2.0)
    torch.testing.assert_close(opt.sharpness, torch.tensor(0.5))


def _recording(closure_fn, calls):
    def closure(indices=None):
        out = closure_fn(indices)
        calls.append((indices, torch.is_grad_enabled(), out.detach().clone()))
        return out
    return closure


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_esam_step_sharpness_is_whole_batch_difference(gamma):
    model = make_model()
    opt = fastsam.ESAM(model.parameters(), torch.optim.SGD, rho=0.2, beta=0.6, gamma=gamma, seed=3, **SGD)
    x, y = batch(n=20)
    calls = []

    opt.step(_recording(per_sample_closure(model, x, y), calls))
    before = calls[0][2]
    # gamma < 1: the no-grad pass at w + e has every sample; gamma = 1: the second (full) pass.
    after = calls[1][2]
    assert calls[1][0] is None and after.numel() == 20
    assert torch.equal(opt.sharpness, after.mean() - before.mean())


@pytest.mark.skipif(not hasattr(fastsam, "KSAM"), reason="no KSAM")
def test_ksam_step_sharpness_is_the_selected_samples_difference():
    model = make_model()
    opt = fastsam.KSAM(model.parameters(), torch.optim.SGD, rho=0.2, gamma=0.5, **SGD)
    x, y = batch(n=20)
    calls = []

    opt.step(_recording(per_sample_closure(model, x, y), calls))
    (_, _, first), (_, _, second) = calls[1], calls[2]  # the k selected samples at w, then at w + e
    assert first.numel() == second.numel() == 10
    assert torch.equal(opt.sharpness, second.mean() - first.mean())


@pytest.mark.parametrize("m", [1, 4])
def test_msam_step_sharpness_is_mean_over_shards(m):
    model = make_model()
    opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=m, **SGD)
    x, y = batch(n=16)
    calls = []

    opt.step(_recording(per_sample_closure(model, x, y), calls), batch_size=16)
    assert len(calls) == 2 * m
    diffs = torch.stack([calls[2 * k + 1][2].mean() - calls[2 * k][2].mean() for k in range(m)])
    torch.testing.assert_close(opt.sharpness, diffs.mean(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls,kw", TWO_CALL, ids=ids(TWO_CALL))
def test_no_host_sync_when_recording_sharpness(cls, kw):
    """Passing the losses and logging add no host sync: the same syncs as without them (none, except
    the one AE-SAM documents for its switching decision)."""
    def run(with_losses):
        model = make_model()
        opt = cls(model.parameters(), torch.optim.SGD, **kw, **SGD)
        x, y = batch()
        log = SharpnessLog()
        watch = host_sync_watch()
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with watch:
                opt.first_step(zero_grad=True, loss=loss if with_losses else None)
            p = F.cross_entropy(model(x), y)
            p.backward()
            with watch:
                opt.second_step(zero_grad=True, loss=p if with_losses else None)
                log.record(opt, loss)
        return watch.seen, log

    seen, log = run(True)
    assert seen == run(False)[0]
    if cls.__name__ != "AESAM":
        assert seen == []
    rows = log.rows()
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    assert sum(r["sharpness"] is not None for r in rows) >= 1


def test_sharpness_log_summary():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.2, **SGD)
    log = SharpnessLog()
    expected = []
    for step in range(5):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True, loss=loss)
        p = F.cross_entropy(model(x), y)
        p.backward()
        opt.second_step(zero_grad=True, loss=p)
        expected.append((p - loss).item())
        log.record(opt, loss)
    rows = log.rows()
    assert [r["step"] for r in rows] == list(range(5))
    torch.testing.assert_close(torch.tensor([r["sharpness"] for r in rows]), torch.tensor(expected))
    summary = log.summary()
    assert summary["steps"] == 5
    assert summary["sharpness"] == pytest.approx(sum(expected) / 5, rel=1e-5)
    assert "sharpness" in log.format_last()


def test_sharpness_under_torch_compile_fullgraph():
    """first_step(loss=)/second_step(loss=) trace without graph breaks and leave the same sharpness."""
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.2, **SGD)
    torch._dynamo.reset()
    first = torch.compile(lambda loss: opt.first_step(loss=loss), backend="aot_eager", fullgraph=True)
    second = torch.compile(lambda loss: opt.second_step(loss=loss), backend="aot_eager", fullgraph=True)
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        first(loss.detach())
        opt.zero_grad(set_to_none=False)
        perturbed = F.cross_entropy(model(x), y)
        perturbed.backward()
        second(perturbed.detach())
        torch.testing.assert_close(opt.sharpness, perturbed.detach() - loss.detach())


def test_grad_scaler_step_passes_the_perturbed_loss():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batch()
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        opt.first_step(zero_grad=True, loss=loss)
        perturbed = F.cross_entropy(model(x), y)
        scaler.scale(perturbed).backward()
        scaler.step(opt, perturbed_loss=perturbed)
        scaler.update()
        opt.zero_grad()
        assert torch.equal(opt.sharpness, perturbed.detach() - loss.detach())
