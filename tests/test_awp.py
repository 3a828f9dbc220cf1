"""AWP / WT-AWP: the layer-wise relative perturbation and the two-gradient update (HERO: tests/test_hero.py).

* an fp64 reference written from the papers, one tensor at a time, over 30 steps with a
  ``state_dict`` round trip in the middle (SGD with momentum and weight decay, and AdamW);
* every backend (fp32) against the same reference;
* the defining properties: ``||e_l|| = rho ||w_l||`` on every perturbed layer, truncated and 1-D
  layers untouched, ``lmbda = 1`` is plain descent at ``w``;
* bad input before anything changes, faults restore the weights, non-finite gradients skip;
* no host sync, and a number of dispatched ops per step independent of the number of tensors.
"""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from fastsam import ops
from helpers import host_sync_watch, two_call_step_ops

STEPS = 30


def make_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))
    return net.to(dtype)


def data(dtype=torch.float64, seed=1, n=STEPS):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(n)]


def loss_of(net, x, y):
    return F.cross_entropy(net(x), y)


class Reference:
    """The papers' step in fp64, one tensor at a time; the base step written out (SGD or AdamW)."""

    def __init__(self, net, kind, rho, mix=0.0, truncate=(), perturb_1d=False, base="sgd", lr=0.1,
                 momentum=0.9, weight_decay=1e-3):
        self.net, self.kind, self.rho, self.mix = net, kind, rho, mix
        self.truncate = {id(p) for p in truncate}
        self.perturb_1d, self.base, self.lr = perturb_1d, base, lr
        self.momentum, self.wd = momentum, weight_decay
        self.state = {}
        self.t = 0

    def perturbs(self, p):
        return id(p) not in self.truncate and (self.perturb_1d or p.dim() > 1)

    def step(self, x, y):
        params = list(self.net.parameters())
        g = torch.autograd.grad(loss_of(self.net, x, y), params)
        with torch.no_grad():
            backup = [p.clone() for p in params]
            for p, gl in zip(params, g):
                if self.perturbs(p):
                    p.add_(self.rho * p.norm() * gl / (gl.norm() + 1e-12))
        gp = torch.autograd.grad(loss_of(self.net, x, y), params)
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
            for p, gl, gpl in zip(params, g, gp):
                u = self.mix * gl + (1 - self.mix) * gpl   # WT-AWP: lmbda g(w) + (1 - lmbda) g(w + e)
                self._base_step(p, u)
        self.t += 1

    def _base_step(self, p, u):
        st = self.state.setdefault(p, {})
        if self.base == "sgd":
            u = u + self.wd * p
            buf = st.get("buf")
            st["buf"] = u.clone() if buf is None else buf * self.momentum + u
            p.sub_(self.lr * st["buf"])
        else:  # AdamW, beta = (0.9, 0.999), eps 1e-8
            t = st["t"] = st.get("t", 0) + 1
            p.mul_(1 - self.lr * self.wd)
            m = st["m"] = st.get("m", torch.zeros_like(p)) * 0.9 + 0.1 * u
            v = st["v"] = st.get("v", torch.zeros_like(p)) * 0.999 + 0.001 * u * u
            p.sub_(self.lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8))


CLASSES = {
    "awp": lambda params, base, bkw, rho, mix, **kw: fastsam.AWP(params, base, rho=rho, lmbda=mix, **kw, **bkw),
}
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
         "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=1e-3))}


def run_fastsam(kind, rho, mix, base, dtype=torch.float64, backend="torch", truncate_last=False, perturb_1d=False,
                resume_at=STEPS // 2):
    net = make_net(dtype)
    base_cls, bkw = BASES[base]
    if base == "adamw":
        bkw = dict(bkw, lr=0.01)
    trunc = lambda n: list(n[-1].parameters()) if truncate_last else None  # noqa: E731
    opt = CLASSES[kind](net.parameters(), base_cls, bkw, rho, mix, truncate=trunc(net), perturb_1d=perturb_1d,
                        backend=backend)
    for i, (x, y) in enumerate(data(dtype)):
        if i == resume_at:  # a fresh model and optimizer from the saved states
            buf = io.BytesIO()
            torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            net = make_net(dtype, seed=123)
            net.load_state_dict(saved["net"])
            opt = CLASSES[kind](net.parameters(), base_cls, bkw, rho, mix, truncate=trunc(net),
                                perturb_1d=perturb_1d, backend=backend)
            opt.load_state_dict(saved["opt"])
        loss_of(net, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(net, x, y).backward()
        opt.second_step(zero_grad=True)
    return net


def run_reference(kind, rho, mix, base, truncate_last=False, perturb_1d=False):
    net = make_net(torch.float64)
    lr = 0.01 if base == "adamw" else 0.1
    ref = Reference(net, kind, rho, mix, truncate=list(net[-1].parameters()) if truncate_last else (),
                    perturb_1d=perturb_1d, base=base, lr=lr)
    for x, y in data(torch.float64):
        ref.step(x, y)
    return net


CASES = [("awp", 0.05, 0.0, "sgd", False, False), ("awp", 0.05, 0.3, "sgd", True, False),
         ("awp", 0.02, 0.5, "adamw", True, True), ("awp", 0.05, 0.75, "sgd", False, False),
         ("awp", 0.03, 0.25, "adamw", True, True)]


@pytest.mark.parametrize("kind,rho,mix,base,truncate_last,perturb_1d", CASES)
def test_fp64_matches_the_papers_over_30_steps_with_a_resume(kind, rho, mix, base, truncate_last, perturb_1d):
    got = run_fastsam(kind, rho, mix, base, truncate_last=truncate_last, perturb_1d=perturb_1d)
    ref = run_reference(kind, rho, mix, base, truncate_last=truncate_last, perturb_1d=perturb_1d)
    moved = sum((a - b).abs().max() for a, b in zip(ref.parameters(), make_net().parameters()))
    assert moved > 0.1  # the run does something
    for a, b in zip(got.parameters(), ref.parameters()):
        # fp64 throughout, the per-tensor norms and scales included; grad_mix_ takes its coefficients
        # as fp32 device scalars (its contract), which bounds the mixed runs at ~1e-8 relative.
        tol = dict(rtol=1e-10, atol=1e-12) if mix == 0 else dict(rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(a, b, **tol)


def _cpu_backends(op):
    return [b for b in ops.BACKENDS if ops.supports(b, op, torch.device("cpu"), torch.float32)[0]]


@pytest.mark.parametrize("backend", _cpu_backends("perturb_per_tensor"))
@pytest.mark.parametrize("kind,mix", [("awp", 0.3), ("awp", 0.0)])
def test_every_backend_fp32_follows_the_fp64_reference(backend, kind, mix):
    got = run_fastsam(kind, 0.05, mix, "sgd", dtype=torch.float32, backend=backend, truncate_last=True)
    ref = run_reference(kind, 0.05, mix, "sgd", truncate_last=True)
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5)


def test_the_perturbation_has_radius_rho_times_the_layer_norm():
    net = make_net(torch.float64)
    opt = fastsam.AWP(net.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, truncate=net[2])
    before = [p.detach().clone() for p in net.parameters()]
    x, y = data()[0]
    loss_of(net, x, y).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.first_step()
    for (name, p), w, g in zip(net.named_parameters(), before, grads):
        e = p.detach() - w
        if p.dim() == 1 or name.startswith("2."):
            assert torch.equal(e, torch.zeros_like(e)), name  # 1-D and truncated layers never move
        else:
            torch.testing.assert_close(e.norm(), 0.07 * w.norm(), rtol=1e-9, atol=0)  # e = (w + e) - w
            assert torch.nn.functional.cosine_similarity(e.flatten(), g.flatten(), dim=0) > 1 - 1e-9
    opt.restore()
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), before))
    assert opt.grad_norm.dtype == torch.float64
    torch.testing.assert_close(opt.grad_norm, torch.stack([g.norm() for g in grads]).norm(), rtol=1e-12, atol=0)


def test_lmbda_one_is_plain_descent_and_lmbda_zero_keeps_no_buffer():
    x, y = data()[0]
    nets = [make_net() for _ in range(3)]
    opts = [fastsam.AWP(nets[0].parameters(), torch.optim.SGD, rho=0.1, lmbda=1.0, lr=0.1),
            torch.optim.SGD(nets[1].parameters(), lr=0.1)]
    loss_of(nets[0], x, y).backward()
    opts[0].first_step(zero_grad=True)
    loss_of(nets[0], x, y).backward()
    opts[0].second_step()
    loss_of(nets[1], x, y).backward()
    opts[1].step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    awp = fastsam.AWP(nets[2].parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    loss_of(nets[2], x, y).backward()
    awp.first_step(zero_grad=True)
    loss_of(nets[2], x, y).backward()
    awp.second_step(zero_grad=True)
    assert awp._step_state.variant["first_grads"] == {}  # no buffer without a mix
    assert not all(torch.equal(a, b) for a, b in zip(nets[2].parameters(), make_net().parameters()))


def test_closure_form_and_deepcopy():
    net = make_net()
    opt = fastsam.AWP(net.parameters(), torch.optim.SGD, rho=0.05, lmbda=0.5, lr=0.1, truncate=net[4].weight)
    x, y = data()[0]
    loss_of(net, x, y).backward()
    loss = opt.step(lambda: loss_of(net, x, y).backward() or loss_of(net, x, y))
    assert torch.isfinite(loss)
    clone = copy.deepcopy(opt)
    assert clone.lmbda == 0.5 and len(clone._truncated) == 1 and clone._truncated != opt._truncated
    assert "AWP(" in repr(opt) and "lmbda=0.5" in repr(opt)


@pytest.mark.parametrize("make,match", [
    (lambda ps: fastsam.AWP(ps, torch.optim.SGD, rho=-1.0, lr=0.1), "rho"),
    (lambda ps: fastsam.AWP(ps, torch.optim.SGD, lmbda=1.5, lr=0.1), "lmbda"),
    (lambda ps: fastsam.AWP(ps, torch.optim.SGD, lmbda=float("nan"), lr=0.1), "lmbda"),
    (lambda ps: fastsam.AWP(ps, torch.optim.SGD, adaptive=True, lr=0.1), "adaptive"),
    (lambda ps: fastsam.AWP(ps, torch.optim.SGD, truncate=[nn.Parameter(torch.ones(2))], lr=0.1), "truncate"),
    (lambda ps: fastsam.AWP(ps, torch.optim.SGD, truncate=[3], lr=0.1), "truncate"),
])
def test_bad_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(list(make_net().parameters()))


@pytest.mark.parametrize("cls", [fastsam.AWP])
def test_bad_input_mid_run_is_rejected_before_anything_changes(cls):
    net = make_net()
    opt = cls(net.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()[0]
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    loss_of(net, x, y).backward()
    before = [p.detach().clone() for p in net.parameters()]
    opt.lmbda = 2.0
    match = "lmbda"
    with pytest.raises(ValueError, match=match):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before)) and opt._perturbed is None


@pytest.mark.parametrize("cls,kw", [(fastsam.AWP, dict(lmbda=0.4)), (fastsam.AWP, dict(lmbda=0.0, perturb_1d=True))])
def test_faults_restore_the_weights(cls, kw):
    net = make_net()
    opt = cls(net.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, **kw)
    x, y = data()[0]
    before = [p.detach().clone() for p in net.parameters()]
    loss_of(net, x, y).backward()

    def boom():
        raise KeyError("closure failed")

    with pytest.raises(KeyError):
        opt.step(boom)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    # A parameter turned sparse between the passes: the second step restores before raising.
    loss_of(net, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(net, x, y).backward()
    p0 = next(net.parameters())
    p0.grad = p0.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("cls", [fastsam.AWP])
def test_non_finite_gradient_leaves_the_weights_untouched(cls):
    net = make_net()
    opt = cls(net.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data()[0]
    loss_of(net, x, y).backward()
    next(net.parameters()).grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in net.parameters()]
    opt.first_step()
    assert bool(opt.perturbation_skipped)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    opt.restore()


def test_no_host_sync_in_a_step():
    watch = host_sync_watch()
    for cls, kw in ((fastsam.AWP, dict(lmbda=0.3)), (fastsam.AWP, {}), (fastsam.AWP, dict(lmbda=0.7, perturb_1d=True))):
        for base_cls, bkw in BASES.values():
            net = make_net(torch.float32)
            opt = cls(net.parameters(), base_cls, truncate=net[4], **kw, **bkw)
            for x, y in data(torch.float32, n=2):
                loss_of(net, x, y).backward()
                with watch:
                    opt.first_step(zero_grad=True)
                loss_of(net, x, y).backward()
                with watch:
                    opt.second_step(zero_grad=True)
    assert watch.seen == []


def test_dispatched_ops_do_not_grow_with_the_number_of_tensors():
    """Work-doing ops per step (views, which launch nothing, left out: the torch backend packs
    buckets through one view per tensor) are the same for 8 and for 200 tensors."""
    def count(n, cls, kw):
        return two_call_step_ops(lambda params: cls(params, torch.optim.SGD, lr=0.1, momentum=0.9,
                                                    truncate=params[-1], **kw), n, skip_views=True)

    for cls, kw in ((fastsam.AWP, {}), (fastsam.AWP, dict(lmbda=0.5)), (fastsam.AWP, dict(lmbda=0.9, perturb_1d=True))):
        small, large = count(8, cls, kw), count(200, cls, kw)
        assert small == large, cls
        assert sum(small[0].values()) < 40 and sum(small[1].values()) < 25


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_gpu_steps_without_host_sync_and_like_the_torch_backend(backend):
    """On a GPU: every backend under set_sync_debug_mode("error"), against the torch backend."""
    if not ops.supports(backend, "perturb_per_tensor", torch.device("cuda"), torch.float32)[0]:
        pytest.skip(f"{backend} unavailable")
    results = {}
    for b in ("torch", backend):
        torch.manual_seed(0)
        net = make_net(torch.float32).cuda()
        opts = [fastsam.AWP(net.parameters(), torch.optim.SGD, lmbda=0.3, truncate=net[4], lr=0.1, momentum=0.9,
                            backend=b),
                fastsam.AWP(net.parameters(), torch.optim.AdamW, lmbda=0.5, perturb_1d=True, lr=1e-3, backend=b)]
        for i, (x, y) in enumerate(data(torch.float32, n=6)):
            x, y = x.cuda(), y.cuda()
            opt = opts[i % 2]
            loss_of(net, x, y).backward()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.first_step(zero_grad=True)
                loss_of(net, x, y).backward()
                opt.second_step(zero_grad=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        results[b] = [p.detach().cpu() for p in net.parameters()]
    for a, b in zip(results["torch"], results[backend]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("cls,base,kw", [(fastsam.AWP, torch.optim.SGD, dict(lr=0.1, momentum=0.9, lmbda=0.4)),
                                         (fastsam.AWP, torch.optim.AdamW, dict(lr=1e-2, lmbda=0.6, perturb_1d=True))],
                         ids=["awp-sgd", "awp-adamw"])
def test_grad_scaler_matches_the_unscaled_run(cls, base, kw, clip):
    """The mix of g(w) and g(w + e) under a GradScaler: both carry the same scale (or the step refuses)."""
    from test_amp import run

    ref, _ = run(cls, base, kw, clip=clip)
    for unscale_first in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
        if clip and not unscale_first:  # scaler.unscale_ before step: the copy of g(w) would keep the scale
            with pytest.raises(ValueError, match="grad_scaler=scaler"):
                run(cls, base, kw, scaler=scaler, clip=clip, unscale_first=False)
            continue
        got, _ = run(cls, base, kw, scaler=scaler, clip=clip, unscale_first=unscale_first)
        for a, b in zip(got.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
