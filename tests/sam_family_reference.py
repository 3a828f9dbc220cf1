"""fp64 references for WSAM, FriendlySAM and BSAM, written from the papers (and, for BSAM, the
authors' JAX code), one parameter at a time; and the training loops the tests share.

Nothing of fastsam is used here. The base optimizer of WSAM/FriendlySAM is a stock torch optimizer
with ``foreach=False`` over fp64 copies of the model.
"""

from __future__ import annotations

import copy
import io

import torch
import torch.nn as nn
import torch.nn.functional as F

STEPS = 30


def make_mlp(seed=0, dtype=torch.float32, width=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


def batches(n=STEPS, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 10, generator=gen).to(dtype), torch.randint(0, 3, (32,), generator=gen))
            for _ in range(n)]


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def _grads(model, x, y):
    model.zero_grad()
    loss_of(model, x, y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _sam_e(params, grads, rho, adaptive, eps=1e-12):
    terms = [p.abs() * g if adaptive else g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((t * t).sum() for t in terms))
    return [rho / (norm + eps) * (p * p * g if adaptive else g) for p, g in zip(params, grads)]


def reference_wsam(model, data, base_cls, base_kw, rho=0.05, gamma=0.9, decouple=True, max_norm=None,
                   adaptive=False):
    """WSAM (Yue et al. 2023, Algorithm 1), fp64. Returns the trained fp64 model."""
    model = copy.deepcopy(model).double()
    params = list(model.parameters())
    base = base_cls(params, foreach=False, **base_kw)
    alpha = gamma / (1 - gamma)
    for x, y in data:
        x = x.double()
        g = _grads(model, x, y)
        with torch.no_grad():
            e = _sam_e(params, g, rho, adaptive)
            for p, ei in zip(params, e):
                p.add_(ei)
        gp = _grads(model, x, y)
        with torch.no_grad():
            for p, ei in zip(params, e):
                p.sub_(ei)
            if max_norm is not None:
                norm = torch.sqrt(sum((t * t).sum() for t in gp))
                c = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
                gp = [c * t for t in gp]
            for p, gi, gpi in zip(params, g, gp):
                p.grad = gi.clone() if decouple else alpha * gpi + (1 - alpha) * gi
        base.step()
        if decouple:
            with torch.no_grad():
                lr = base.param_groups[0]["lr"]
                for p, gi, gpi in zip(params, g, gp):
                    p.add_(-lr * alpha * (gpi - gi))
    return model


def reference_friendly_sam(model, data, base_cls, base_kw, rho=0.05, sigma=1.0, lmbda=0.9, adaptive=False):
    """FriendlySAM (Li et al. 2024, Algorithm 1), fp64."""
    model = copy.deepcopy(model).double()
    params = list(model.parameters())
    base = base_cls(params, foreach=False, **base_kw)
    m = None
    for x, y in data:
        x = x.double()
        g = _grads(model, x, y)
        with torch.no_grad():
            if m is None:
                m, d = [gi.clone() for gi in g], g
            else:
                d = [gi - sigma * mi for gi, mi in zip(g, m)]
                m = [lmbda * mi + (1 - lmbda) * gi for gi, mi in zip(g, m)]
            e = _sam_e(params, d, rho, adaptive)
            for p, ei in zip(params, e):
                p.add_(ei)
        gp = _grads(model, x, y)
        with torch.no_grad():
            for p, ei, gpi in zip(params, e, gp):
                p.sub_(ei)
                p.grad = gpi
        base.step()
    return model


def run(model, opt_fn, data, resume_at=None, step=None):
    """Train a copy of ``model`` with ``opt_fn(params)``; at ``resume_at`` save, rebuild and load."""
    model = copy.deepcopy(model)
    opt = opt_fn(model)
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = copy.deepcopy(model)
            model.load_state_dict(ckpt["model"])
            opt = opt_fn(model)
            opt.load_state_dict(ckpt["opt"])
        (step or sam_step)(model, opt, x, y)
    return model, opt


def sam_step(model, opt, x, y):
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)


def assert_models_close(a, b, rtol=1e-4, atol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach().double(), rtol=rtol, atol=atol, msg=name)


def assert_models_equal(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def reference_bsam(model, data, generator_state, num_data, lr, betas, weight_decay, rho, damping, s_init=1.0):
    """bSAM as the authors' JAX code (team-approx-bayes/bayesian-sam optim.py, msharpness = 1) does it, fp64.

    The noise is the same draw fastsam makes: one flat fp32 randn over all parameters per step,
    from a generator in ``generator_state``.
    """
    model = copy.deepcopy(model).double()
    params = list(model.parameters())
    gen = torch.Generator()
    gen.set_state(generator_state)
    beta1, beta2 = betas
    m = [torch.zeros_like(p) for p in params]
    s = [torch.full_like(p, s_init) for p in params]
    losses = []
    for x, y in data:
        x = x.double()
        w = [p.detach().clone() for p in params]
        noise = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=torch.float32).double()
        noise = [n.view(p.shape) for n, p in zip(noise.split([p.numel() for p in params]), params)]
        with torch.no_grad():
            for p, wi, ni, si in zip(params, w, noise, s):
                p.copy_(wi + torch.sqrt(1.0 / (num_data * si)) * ni)
        g = _grads(model, x, y)
        with torch.no_grad():
            for p, wi, gi, si in zip(params, w, g, s):
                p.copy_(wi + rho * gi / si)
        model.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        losses.append(loss.item())
        gp = [p.grad.detach().clone() for p in params]
        with torch.no_grad():
            gs = [torch.sqrt(si * gi ** 2) for si, gi in zip(s, g)]
            m = [beta1 * mi + (1 - beta1) * (gpi + weight_decay * wi) for mi, gpi, wi in zip(m, gp, w)]
            for p, wi, mi, si in zip(params, w, m, s):
                p.copy_(wi - lr * mi / si)
            s = [beta2 * si + (1 - beta2) * (gsi + damping + weight_decay) for si, gsi in zip(s, gs)]
    return model, losses


def assert_raising_closure_restores_the_weights(model, opt):
    """``opt.step(closure)`` with a closure that raises at the perturbed point leaves ``model`` as it was."""
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        raise RuntimeError("boom")

    try:
        opt.step(closure)
    except RuntimeError as exc:
        assert "boom" in str(exc)
    else:
        raise AssertionError("the closure's error did not propagate")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return before


def host_syncs_in_two_call_steps(model, opt, steps=3):
    """The host-syncing ops dispatched by ``opt.first_step``/``opt.second_step`` over ``steps`` steps."""
    from helpers import host_sync_watch

    watch = host_sync_watch()
    x, y = batches(1)[0]
    for _ in range(steps):
        loss_of(model, x, y).backward()
        with watch:
            opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        with watch:
            opt.second_step(zero_grad=True)
    return watch.seen
