"""SAM.register_base_step_pre_hook, for every class of the SAM family: called once per second_step with
the update's gradients in place, may modify them, is removable, and a hook that raises leaves the
weights restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsam

FAMILY = sorted((obj for obj in vars(fastsam).values() if isinstance(obj, type) and issubclass(obj, fastsam.SAM)),
                key=lambda c: c.__name__)
REQUIRED = {"AESAM": dict(total_steps=10)}  # options without a default
DRIVERS = tuple(getattr(fastsam, n) for n in ("ESAM", "MSAM", "DeltaSAM", "KSAM", "HERO") if hasattr(fastsam, n))


def setup(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    return model, cls(model.parameters(), torch.optim.SGD, lr=0.1, **REQUIRED.get(cls.__name__, {})), x, y


def one_step(model, opt, x, y):
    if isinstance(opt, DRIVERS):
        def closure(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")

        if isinstance(opt, fastsam.MSAM):
            opt.step(closure, batch_size=len(x))
        else:
            opt.step(closure)
        return
    F.cross_entropy(model(x), y).backward()
    if opt.needs_second_pass:
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_hook_runs_once_before_the_base_step_and_can_rewrite_grads(cls):
    model, opt, x, y = setup(cls)
    calls = []

    def zero_update(o):
        assert o is opt
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        calls.append(1)
        for g in grads:
            g.zero_()

    handle = opt.register_base_step_pre_hook(zero_update)
    before = [p.detach().clone() for p in model.parameters()]
    one_step(model, opt, x, y)
    assert calls == [1]
    free_model, free_opt, _, _ = setup(cls)
    one_step(free_model, free_opt, x, y)
    # SGD without momentum or decay: the zeroed gradient reached the base step (which then moves nothing;
    # WSAM adds its decoupled sharpness term after the base step, so it still moves).
    assert any((p - q).abs().max() > 1e-6 for p, q in zip(model.parameters(), free_model.parameters()))
    if cls.__name__ != "WSAM":
        for p, b in zip(model.parameters(), before):
            torch.testing.assert_close(p.detach(), b, atol=0, rtol=0)
    handle.remove()
    one_step(model, opt, x, y)
    assert calls == [1], "a removed hook is not called"
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_a_raising_hook_leaves_the_weights_restored(cls):
    model, opt, x, y = setup(cls)

    def boom(o):
        raise RuntimeError("boom")

    opt.register_base_step_pre_hook(boom)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        one_step(model, opt, x, y)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, atol=0, rtol=0)
