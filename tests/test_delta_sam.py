"""δ-SAM (fastsam.DeltaSAM): per-sample losses reweighted by softmax(loss increase / temperature).

* an fp64 reference written from the paper over 30 steps, with a ``state_dict`` round trip;
* every backend (fp32) against it;
* the defining properties: the weights sum to 1 and favour the samples whose loss rises most under
  the batch perturbation; a huge temperature is SAM; the perturbation comes from the reweighted
  gradient, not the mean one;
* bad input, faults (weights restored), no host sync, ops per step independent of the tensor count.
"""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from fastsam import ops
from helpers import host_sync_watch, op_counter

STEPS = 30


def make_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)


def data(dtype=torch.float64, seed=1, n=STEPS):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 6, generator=gen).to(dtype), torch.randint(0, 3, (12,), generator=gen))
            for _ in range(n)]


def closure_for(net, x, y):
    def closure(indices=None):
        return F.cross_entropy(net(x), y, reduction="none")
    return closure


def reference_step(net, x, y, rho, temperature, state, lr=0.1, momentum=0.9):
    """The paper's step in fp64, one tensor at a time; SGD with momentum written out."""
    params = list(net.parameters())

    def losses():
        return F.cross_entropy(net(x), y, reduction="none")

    def perturbed(direction, fn):
        norm = torch.sqrt(sum((d * d).sum() for d in direction))
        with torch.no_grad():
            backup = [p.clone() for p in params]
            for p, d in zip(params, direction):
                p.add_(rho * d / (norm + 1e-12))
        out = fn()
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
        return out

    l0 = losses()
    g = torch.autograd.grad(l0.mean(), params)
    with torch.no_grad():
        l1 = perturbed(g, losses)
    weights = torch.softmax((l1 - l0.detach()) / temperature, dim=0)
    gw = torch.autograd.grad((weights * losses()).sum(), params)
    gp = perturbed(gw, lambda: torch.autograd.grad(losses().mean(), params))
    with torch.no_grad():
        for p, u in zip(params, gp):
            buf = state.get(p)
            state[p] = u.clone() if buf is None else buf * momentum + u
            p.sub_(lr * state[p])
    return weights


def run_fastsam(rho, temperature, dtype=torch.float64, backend="torch", resume_at=STEPS // 2):
    net = make_net(dtype)
    make = lambda n: fastsam.DeltaSAM(n.parameters(), torch.optim.SGD, rho=rho, temperature=temperature,  # noqa
                                      lr=0.1, momentum=0.9, backend=backend, model=n)
    opt = make(net)
    weights = []
    for i, (x, y) in enumerate(data(dtype)):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            net = make_net(dtype, seed=99)
            net.load_state_dict(saved["net"])
            opt = make(net)
            opt.load_state_dict(saved["opt"])
        opt.step(closure_for(net, x, y))
        weights.append(opt.last_weights.clone())
    return net, weights


def run_reference(rho, temperature):
    net = make_net()
    state, weights = {}, []
    for x, y in data():
        weights.append(reference_step(net, x, y, rho, temperature, state))
    return net, weights


@pytest.mark.parametrize("rho,temperature", [(0.05, 1.0), (0.2, 0.05)])
def test_fp64_matches_the_paper_over_30_steps_with_a_resume(rho, temperature):
    (got, gw), (ref, rw) = run_fastsam(rho, temperature), run_reference(rho, temperature)
    assert max((a - b).abs().max() for a, b in zip(ref.parameters(), make_net().parameters())) > 0.1
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(gw, rw):  # the weights are fp32 (the op's contract)
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in ops.BACKENDS
                                     if ops.supports(b, "perturb", torch.device("cpu"), torch.float32)[0]])
def test_every_backend_fp32_follows_the_fp64_reference(backend):
    got, _ = run_fastsam(0.1, 0.5, dtype=torch.float32, backend=backend)
    ref, _ = run_reference(0.1, 0.5)
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5)


def test_weights_favour_the_sharpest_samples_and_a_huge_temperature_is_sam():
    x, y = data()[0]
    net = make_net()
    opt = fastsam.DeltaSAM(net.parameters(), torch.optim.SGD, rho=0.3, temperature=0.01, lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    # the loss increase of every sample under SAM's batch perturbation, measured independently
    l0 = F.cross_entropy(net(x), y, reduction="none")
    l0.mean().backward()
    sam = fastsam.SAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    sam.first_step(zero_grad=True)
    with torch.no_grad():
        increase = F.cross_entropy(net(x), y, reduction="none") - l0.detach()
    sam.restore()
    opt.step(closure_for(net, x, y))
    w = opt.last_weights
    torch.testing.assert_close(w.sum().double(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)
    assert int(w.argmax()) == int(increase.argmax()) and w.max() > 0.5  # a cold softmax picks the sharpest

    # temperature -> inf: uniform weights, the reweighted gradient is the mean one: a SAM step.
    nets = [make_net(), make_net()]
    for n in nets:
        for p, b in zip(n.parameters(), before):
            p.data.copy_(b)
    hot = fastsam.DeltaSAM(nets[0].parameters(), torch.optim.SGD, rho=0.1, temperature=1e12, lr=0.1)
    hot.step(closure_for(nets[0], x, y))
    torch.testing.assert_close(hot.last_weights, torch.full((12,), 1 / 12), rtol=1e-6, atol=0)
    sam = fastsam.SAM(nets[1].parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    F.cross_entropy(nets[1](x), y).backward()
    sam.first_step(zero_grad=True)
    F.cross_entropy(nets[1](x), y).backward()
    sam.second_step()
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # the weights are fp32 1/12


@pytest.mark.parametrize("kwargs,match", [(dict(temperature=0.0), "temperature"),
                                          (dict(temperature=float("inf")), "temperature"),
                                          (dict(rho=-0.1), "rho"), (dict(every=2), "every"),
                                          (dict(model=3), "model")])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastsam.DeltaSAM(make_net().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_closures_are_rejected_before_anything_changes():
    net = make_net()
    opt = fastsam.DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()[0]
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.step(lambda indices=None: F.cross_entropy(net(x), y))
    opt.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        opt.step(closure_for(net, x, y))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("fail_at", [2, 3])
def test_a_closure_failing_at_a_perturbed_point_restores_the_weights(fail_at):
    net = make_net()
    opt = fastsam.DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1, rho=0.2)
    x, y = data()[0]
    before = [p.detach().clone() for p in net.parameters()]
    calls = []

    def closure(indices=None):
        calls.append(1)
        if len(calls) == fail_at:  # call 2: the no-grad pass at w + e0; call 3: the second pass at w + e
            raise KeyError("boom")
        return F.cross_entropy(net(x), y, reduction="none")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before)) and opt._perturbed is None
    opt.step(closure_for(net, x, y))  # and the optimizer is usable afterwards


def test_no_host_sync_in_a_step():
    watch = host_sync_watch()
    net = make_net(torch.float32)
    opt = fastsam.DeltaSAM(net.parameters(), torch.optim.AdamW, lr=1e-3, model=net)
    for x, y in data(torch.float32, n=2):
        with watch:
            opt.step(closure_for(net, x, y))
    assert watch.seen == []


def test_dispatched_ops_do_not_grow_with_the_number_of_tensors():
    """Work-doing ops of a whole step (views left out) are the same for 8 and for 200 tensors; the
    closure's own ops, which do grow (one matmul per tensor), are counted apart and subtracted."""
    def count(n):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(5, generator=gen) * 0.1) for _ in range(n)]
        x = torch.randn(8, 5, generator=gen)
        opt = fastsam.DeltaSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)

        def closure(indices=None):
            w = torch.stack(params)          # one op forward, one (unbind) backward
            return torch.tanh(x @ w.t()).pow(2).mean(dim=1)

        for _ in range(2):
            opt.step(closure)
        with op_counter(skip_views=True) as c:
            opt.step(closure)
        return c.ops

    small, large = count(8), count(200)
    assert small == large
