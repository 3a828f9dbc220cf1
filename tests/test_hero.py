"""HERO: against a plain fp64 version of the authors' training loop (Xiaoxuan-Yang/HERO, cifar_hero.py),
the Hessian-vector product on a quadratic, resume, backends, bad input, faults, no host sync, op counts."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from helpers import backends_for, host_sync_watch, op_counter

STEPS = 30


def make_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)


def data(dtype=torch.float64, n=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=gen).to(dtype), torch.randint(0, 3, (12,), generator=gen)) for _ in range(n)]


def reference_hero(net, batches, base, rho, lmbda, adaptive=True, regularize_1d=False, warmup_steps=0,
                   lr=0.1, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-8):
    """The authors' loop, one parameter at a time in fp64: SAM's (adaptive) ascent, then ``g_p`` with its
    graph, ``R = lmbda sum_l mse(g_p,l, g_l)`` over the >1-D tensors, ``update = g_p + grad R``, and a
    hand-written SGD(momentum, weight decay) or AdamW step from the clean weights."""
    params = list(net.parameters())
    state = [dict() for _ in params]
    for t, (x, y) in enumerate(batches, start=1):
        g = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        scaled = [(p.abs() if adaptive else 1.0) * gi for p, gi in zip(params, g)]
        norm = torch.sqrt(sum((s * s).sum() for s in scaled))
        clean = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_((p * p if adaptive else 1.0) * gi * rho / (norm + 1e-12))
        loss_p = F.cross_entropy(net(x), y)
        if lmbda > 0 and t > warmup_steps:
            gp = torch.autograd.grad(loss_p, params, create_graph=True)
            penalty = sum(lmbda * F.mse_loss(a, b) for p, a, b in zip(params, gp, g) if regularize_1d or p.dim() > 1)
            hv = torch.autograd.grad(penalty, params)
            update = [a.detach() + b for a, b in zip(gp, hv)]
        else:
            update = torch.autograd.grad(loss_p, params)
        with torch.no_grad():
            for p, w, u, s in zip(params, clean, update, state):
                p.copy_(w)
                if base == "sgd":
                    d = u + weight_decay * p
                    s["buf"] = d.clone() if "buf" not in s else s["buf"] * momentum + d
                    p.sub_(lr * s["buf"])
                else:
                    p.mul_(1 - lr * weight_decay)
                    s["m"] = s.get("m", torch.zeros_like(p)) * betas[0] + (1 - betas[0]) * u
                    s["v"] = s.get("v", torch.zeros_like(p)) * betas[1] + (1 - betas[1]) * u * u
                    m_hat, v_hat = s["m"] / (1 - betas[0] ** t), s["v"] / (1 - betas[1] ** t)
                    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return net


BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
         "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=5e-4))}


def closure_for(net, x, y):
    return lambda indices=None: F.cross_entropy(net(x), y)


def run_hero(base, dtype=torch.float64, resume_at=None, backend="auto", batches=None, **hero_kw):
    net = make_net(dtype)
    base_cls, bkw = BASES[base]
    make = lambda n: fastsam.HERO(n.parameters(), base_cls, backend=backend, **hero_kw, **bkw)  # noqa: E731
    opt = make(net)
    for i, (x, y) in enumerate(batches or data(dtype)):
        if i == resume_at:  # a fresh process: new model and optimizer from the checkpoints
            saved_net, saved_opt = copy.deepcopy(net.state_dict()), opt.state_dict()
            net = make_net(dtype, seed=5)
            net.load_state_dict(saved_net)
            opt = make(net)
            opt.load_state_dict(saved_opt)
        opt.step(closure_for(net, x, y))
    return net, opt


@pytest.mark.parametrize("base,rho,lmbda,adaptive,regularize_1d,warmup", [
    ("sgd", 0.5, 5.0, True, False, 0),       # the authors' CIFAR-10 command
    ("sgd", 0.05, 1.0, False, True, 4),
    ("adamw", 0.3, 2.0, True, False, 7),
])
def test_fp64_matches_the_authors_loop_over_30_steps_with_a_resume(base, rho, lmbda, adaptive, regularize_1d, warmup):
    kw = dict(rho=rho, lmbda=lmbda, adaptive=adaptive, regularize_1d=regularize_1d, warmup_steps=warmup)
    ours, _ = run_hero(base, resume_at=STEPS // 2, **kw)
    ref = reference_hero(make_net(), data(), base, **kw, **({"lr": 0.01} if base == "adamw" else {}))
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    moved = max((a - b).abs().max().item() for a, b in zip(make_net().parameters(), ours.parameters()))
    assert moved > 0.1


@pytest.mark.parametrize("backend", backends_for("grad_mix", "cpu", torch.float32))
def test_every_backend_fp32_follows_the_fp64_reference(backend):
    batches = data(n=8)
    ours, _ = run_hero("sgd", dtype=torch.float32, backend=backend,
                       batches=[(x.float(), y) for x, y in batches])
    ref = reference_hero(make_net(), batches, "sgd", rho=0.5, lmbda=5.0)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_the_hessian_term_is_the_hessian_vector_product_on_a_quadratic():
    """L(w) = 1/2 w^T A w: g = A w, g_p = A (w + e), and grad R = lmbda (2/n) A (g_p - g) = lmbda (2/n) A A e."""
    torch.manual_seed(3)
    n = 5
    m = torch.randn(n, n, dtype=torch.float64)
    a = m @ m.t() + torch.eye(n, dtype=torch.float64)
    w = nn.Parameter(torch.randn(n, 2, dtype=torch.float64))  # 2-D: regularised
    w0 = w.detach().clone()
    lmbda, rho = 3.0, 0.2
    opt = fastsam.HERO([w], torch.optim.SGD, rho=rho, lmbda=lmbda, adaptive=False, lr=1.0)
    opt.step(lambda indices=None: 0.5 * (w * (a @ w)).sum())
    g = a @ w0
    e = rho * g / (g.norm() + 1e-12)
    gp = a @ (w0 + e)
    expected_update = gp + lmbda * (2.0 / w.numel()) * a @ (gp - g)
    torch.testing.assert_close(w.grad, expected_update, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.detach(), w0 - expected_update, rtol=1e-12, atol=1e-12)


def test_lmbda_zero_and_the_warmup_steps_are_sam():
    batches = data(n=6)
    for kw in (dict(lmbda=0.0), dict(lmbda=5.0, warmup_steps=6)):
        hero, _ = run_hero("sgd", batches=batches, **kw)
        net = make_net()
        sam = fastsam.SAM(net.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, **BASES["sgd"][1])
        for x, y in batches:
            F.cross_entropy(net(x), y).backward()
            sam.step(lambda: F.cross_entropy(net(x), y).backward())
            sam.zero_grad()
        for p, q in zip(hero.parameters(), net.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    with_term, _ = run_hero("sgd", batches=batches, warmup_steps=5)
    assert not all(torch.equal(p, q) for p, q in zip(with_term.parameters(), hero.parameters()))


def test_per_sample_losses_are_averaged():
    batches = data(n=4)
    net_a, net_b = make_net(), make_net()
    opt_a = fastsam.HERO(net_a.parameters(), torch.optim.SGD, lr=0.1)
    opt_b = fastsam.HERO(net_b.parameters(), torch.optim.SGD, lr=0.1)
    for x, y in batches:
        opt_a.step(lambda indices=None: F.cross_entropy(net_a(x), y))
        opt_b.step(lambda indices=None: F.cross_entropy(net_b(x), y, reduction="none"))
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kwargs,match", [(dict(lmbda=-1.0), "lmbda"), (dict(warmup_steps=-1), "warmup_steps"),
                                          (dict(warmup_steps=1.5), "warmup_steps"), (dict(rho=-0.1), "rho"),
                                          (dict(every=2), "every")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastsam.HERO(make_net().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_closures_are_rejected_before_anything_changes():
    net = make_net()
    opt = fastsam.HERO(net.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data(n=1)[0]
    F.cross_entropy(net(x), y).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    before = [p.detach().clone() for p in net.parameters()]
    for bad, match in ((lambda indices=None: 1.0, "closure must return the loss"),
                       (lambda indices=None: net(x), "shape"),
                       (lambda indices=None: F.cross_entropy(net(x), y).detach(), "without a graph")):
        with pytest.raises(ValueError, match=match):
            opt.step(bad)
        assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
        assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads)), ".grad untouched"
    with pytest.raises(RuntimeError, match="needs closure"):
        opt.step()
    opt.lmbda = -2.0
    with pytest.raises(ValueError, match="lmbda"):
        opt.step(closure_for(net, x, y))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_closure_failing_restores_the_weights(fail_at):
    net = make_net()
    opt = fastsam.HERO(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = data(n=1)[0]
    opt.step(closure_for(net, x, y))
    before = [p.detach().clone() for p in net.parameters()]
    calls = []

    def closure(indices=None):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return F.cross_entropy(net(x), y)

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert opt._perturbed is None
    opt.step(closure_for(net, x, y))  # usable afterwards


def test_no_host_sync_in_a_step():
    watch = host_sync_watch()
    for base in BASES:
        net = make_net(torch.float32)
        opt = fastsam.HERO(net.parameters(), BASES[base][0], **BASES[base][1])
        for x, y in data(torch.float32, n=3):
            with watch:
                opt.step(closure_for(net, x, y))
    assert watch.seen == []


def test_optimizer_ops_do_not_grow_with_the_number_of_tensors(monkeypatch):
    """HERO's own dispatched ops in a step are the same for 6 and for 150 tensors. The closure's forward
    and autograd's passes (backward, double backward: the model's per-layer work) are counted apart."""
    counter = op_counter(skip_views=True)
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    def paused(fn):
        def wrapper(*args, **kwargs):
            was, counter.paused = counter.paused, True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.paused = was
        return wrapper

    monkeypatch.setattr(torch.autograd, "grad", paused(real_grad))
    monkeypatch.setattr(torch.autograd, "backward", paused(real_backward))

    def count(n):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(4, 5, generator=gen) * 0.3) for _ in range(n)]
        x = torch.randn(8, 5, generator=gen)
        opt = fastsam.HERO(params, torch.optim.SGD, lr=0.1, momentum=0.9)

        @paused
        def closure(indices=None):
            w = torch.stack(params).reshape(-1, 5)       # one op over all tensors; contiguous gradients
            return torch.tanh(x @ w.t()).pow(2).mean()

        for _ in range(2):
            opt.step(closure)
        counter.ops.clear()
        with counter:
            opt.step(closure)
        return dict(counter.ops)

    small, large = count(6), count(150)
    assert small == large
    assert small  # HERO's own work was counted (the copy of g, the penalty, the mix, the base step)


def test_deepcopy_state_dict_and_repr():
    net = make_net()
    opt = fastsam.HERO(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, lmbda=2.0, warmup_steps=3)
    batches = data(n=6)
    for x, y in batches[:2]:
        opt.step(closure_for(net, x, y))
    twin_net = copy.deepcopy(net)
    twin = fastsam.HERO(twin_net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, lmbda=2.0, warmup_steps=3)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch shares the tensors otherwise)
    assert twin.state_dict()["fastsam"]["step"] == 2  # the warm-up counts on from the checkpoint
    for x, y in batches[2:]:
        opt.step(closure_for(net, x, y))
        twin.step(closure_for(twin_net, x, y))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin_net.parameters()))
    clone = copy.deepcopy(opt)
    assert clone.lmbda == 2.0 and clone.warmup_steps == 3
    assert "HERO(" in repr(opt) and "lmbda=2.0" in repr(opt)


def test_a_model_without_second_derivative_gets_a_clear_error_and_the_weights_back():
    torch.manual_seed(0)
    proj = nn.Linear(8, 8)
    x = torch.randn(2, 4, 8)
    opt = fastsam.HERO(proj.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in proj.parameters()]

    def closure(indices=None):  # CPU scaled-dot-product attention: no double backward in torch
        q = proj(x).unsqueeze(1)
        return F.scaled_dot_product_attention(q, q, q).pow(2).mean()

    with pytest.raises(RuntimeError, match="second derivative.*weights were restored"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(proj.parameters(), before))


def test_loss_scale_keeps_the_update_linear_in_the_scale():
    """With the closure's loss multiplied by S and loss_scale=S, the update is exactly S times the unscaled one
    (the penalty is quadratic in the gradients: without loss_scale its part would carry S^2)."""
    x, y = data(n=1)[0]
    grads = {}
    for scale in (None, 1024.0, "no-correction"):
        net = make_net()
        opt = fastsam.HERO(net.parameters(), torch.optim.SGD, lr=0.0)
        s = 1.0 if scale is None else 1024.0
        opt.step(lambda indices=None: s * F.cross_entropy(net(x), y),
                 loss_scale=None if scale in (None, "no-correction") else torch.tensor(s, dtype=torch.float64))
        grads[scale] = [p.grad.clone() for p in net.parameters()]
    for a, b in zip(grads[1024.0], grads[None]):
        torch.testing.assert_close(a / 1024.0, b, rtol=1e-9, atol=1e-12)  # (perturb_eps is not scaled)
    assert not all(torch.allclose(a / 1024.0, b) for a, b in zip(grads["no-correction"], grads[None]))
