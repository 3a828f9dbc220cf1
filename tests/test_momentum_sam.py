"""Momentum-SAM (SGD and AdamW forms) and its fused ops, against fp64 references written from the paper."""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from fastsam import ops
from helpers import DTYPES, TOL, backend_cases, host_sync_watch, many_shapes, op_counter, randn_list, shape_sets
from test_sam import batches, make_model

STEPS = 30
RESUME_AT = 13


# ------------------------------------------------------------------------------------------------
# The reference: the paper's update one parameter at a time (fp64 when the model is fp64).

class ReferenceMomentumSAM:
    """SGD form: d = g + wd w~; w = w~ + s_old v; v = mu v + d; w -= lr v; s = rho/(||v||+eps); w~ = w - s v."""

    def __init__(self, groups, eps=1e-12, adamw=False):
        self.groups, self.eps, self.adamw = groups, eps, adamw
        self.v, self.u, self.t = {}, {}, 0
        self.s = [0.0] * len(groups)

    @torch.no_grad()
    def step(self):
        self.t += 1
        for gi, group in enumerate(self.groups):
            for p in group["params"]:
                g = p.grad
                if g is None:  # no gradient this step: the direction is kept, only the ascent moves
                    if p in self.v:
                        p.add_(self.s[gi] * self.v[p])
                    continue
                v = self.v.setdefault(p, torch.zeros_like(p))
                p.add_(self.s[gi] * v)  # back to w
                if self.adamw:
                    b1, b2 = group["betas"]
                    u = self.u.setdefault(p, torch.zeros_like(p))
                    v.mul_(b1).add_((1 - b1) * g)
                    u.mul_(b2).add_((1 - b2) * g * g)
                    denom = u.sqrt() / math.sqrt(1 - b2 ** self.t) + group["eps"]
                    p.sub_(group["lr"] / (1 - b1 ** self.t) * v / denom)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                else:
                    d = g + group["weight_decay"] * (p - self.s[gi] * v)  # decay at w~, where g was taken
                    v.mul_(group["momentum"]).add_(d)
                    p.sub_(group["lr"] * (d + group["momentum"] * v if group.get("nesterov") else v))
        norm = math.sqrt(sum(float((v * v).sum()) for v in self.v.values()))
        for gi, group in enumerate(self.groups):
            self.s[gi] = group["rho"] / (norm + self.eps)
            for p in group["params"]:
                if p in self.v:
                    p.sub_(self.s[gi] * self.v[p])

    @torch.no_grad()
    def unperturbed(self, model):
        out = copy.deepcopy(model)
        by_id = dict(zip([id(p) for p in model.parameters()], out.parameters()))
        for gi, group in enumerate(self.groups):
            for p in group["params"]:
                if p in self.v:
                    by_id[id(p)].add_(self.s[gi] * self.v[p])
        return out


SGD_GROUPS = [dict(lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3, nesterov=False),
              dict(lr=0.05, momentum=0.8, weight_decay=0.0, rho=0.1, nesterov=True)]
ADAMW_GROUPS = [dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, rho=1.0),
                dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, rho=0.5)]


def groups_of(model, opts):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [dict(params=weights, **opts[0]), dict(params=biases, **opts[1])]


def build(kind, groups, backend="auto"):
    if kind == "sgd":
        return fastsam.MomentumSAM(groups, backend=backend)
    return fastsam.MomentumSAMAdamW(groups, backend=backend)


def run(kind, data, dtype=torch.float64, resume_at=None, backend="auto"):
    model = make_model().to(dtype)
    opt = build(kind, groups_of(model, SGD_GROUPS if kind == "sgd" else ADAMW_GROUPS), backend)
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = make_model(seed=7).to(dtype)
            model.load_state_dict(ckpt["model"])
            opt = build(kind, groups_of(model, SGD_GROUPS if kind == "sgd" else ADAMW_GROUPS), backend)
            opt.load_state_dict(ckpt["opt"])
        F.cross_entropy(model(x.to(dtype)), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def run_reference(kind, data, dtype=torch.float64):
    model = make_model().to(dtype)
    ref = ReferenceMomentumSAM(groups_of(model, SGD_GROUPS if kind == "sgd" else ADAMW_GROUPS), adamw=kind == "adamw")
    for x, y in data:
        F.cross_entropy(model(x.to(dtype)), y).backward()
        ref.step()
        model.zero_grad()
    return model, ref


def assert_models(a, b, rtol, atol):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=n)


def assert_equal(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------------------
# The optimizer

@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_matches_fp64_reference_over_30_steps_and_resumes_exactly(kind):
    data = batches(STEPS)
    ref_model, ref = run_reference(kind, data)
    model, opt = run(kind, data)
    assert_models(model, ref_model, rtol=1e-9, atol=1e-11)
    resumed, _ = run(kind, data, resume_at=RESUME_AT)
    assert_equal(resumed, model)
    # The unperturbed weights are the reference's w (= w~ + s v).
    ref_w = ref.unperturbed(ref_model)
    with opt.unperturbed():
        assert_models(model, ref_w, rtol=1e-9, atol=1e-11)
    assert opt.state_dict()["fastsam"]["steps"] == STEPS


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fp32_run_tracks_the_fp64_reference(kind):
    data = batches(STEPS)
    ref_model, _ = run_reference(kind, data)
    model, _ = run(kind, data, dtype=torch.float32)
    assert_models(model.double(), ref_model, rtol=2e-3, atol=2e-4)


def test_default_arguments_are_the_authors():
    opt = fastsam.MomentumSAM([nn.Parameter(torch.zeros(2))])
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "weight_decay", "nesterov", "rho")} == \
        dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=False, rho=0.3)
    adamw = fastsam.MomentumSAMAdamW([nn.Parameter(torch.zeros(2))])
    assert (adamw.defaults["lr"], adamw.defaults["rho"], adamw.defaults["weight_decay"]) == (1e-3, 1.0, 1e-2)


def test_first_step_has_no_perturbation_to_undo_and_equals_sgd_then_ascent():
    """With s = 0 before the first step, step 1 is torch's SGD step followed by w -= rho v/||v||."""
    model = make_model().double()
    twin = copy.deepcopy(model)
    opt = fastsam.MomentumSAM(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = batches(1)[0]
    for m in (model, twin):
        F.cross_entropy(m(x.double()), y).backward()
    opt.step()
    sgd.step()
    bufs = [sgd.state[p]["momentum_buffer"] for p in twin.parameters()]
    norm = torch.sqrt(sum((b * b).sum() for b in bufs))
    for p, q, b in zip(model.parameters(), twin.parameters(), bufs):
        torch.testing.assert_close(p, q - 0.3 / (norm + 1e-12) * b, rtol=1e-12, atol=1e-14)
    with opt.unperturbed():
        assert_models(model, twin, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_unperturbed_context_restores_bit_for_bit_even_on_error(kind):
    model, opt = run(kind, batches(3), dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError):
        with opt.unperturbed():
            assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            raise KeyError("boom")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.move_back()
    with pytest.raises(RuntimeError, match="move_back"):
        opt.move_back()
    with pytest.raises(RuntimeError, match="move_up"):
        opt.step()
    with pytest.raises(RuntimeError, match="move_up"):
        opt.load_state_dict(opt.state_dict())
    opt.move_up()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="move_back"):
        opt.move_up()


def test_closure_is_called_with_gradients_and_its_loss_returned():
    model = make_model()
    opt = fastsam.MomentumSAM(model.parameters())
    x, y = batches(1)[0]

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.requires_grad and opt.state_dict()["fastsam"]["steps"] == 1


def test_parameters_without_gradient_keep_their_direction_and_the_norm_counts_them():
    a, b = nn.Parameter(torch.randn(3, dtype=torch.float64)), nn.Parameter(torch.randn(2, dtype=torch.float64))
    c = nn.Parameter(torch.randn(2, dtype=torch.float64))  # never has a gradient: never moves
    opt = fastsam.MomentumSAM([a, b, c], weight_decay=1e-2)
    ref_a, ref_b, ref_c = (t.detach().clone() for t in (a, b, c))
    ref = ReferenceMomentumSAM([dict(params=[ref_a, ref_b, ref_c], lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.3)])
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        ga, gb = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64)
        a.grad, ref_a.grad = ga.clone(), ga.clone()
        b.grad = ref_b.grad = None
        if i not in (2, 3):
            b.grad, ref_b.grad = gb.clone(), gb.clone()
        opt.step()
        ref.step()
    for got, want in ((a, ref_a), (b, ref_b), (c, ref_c)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    assert "momentum_buffer" not in opt.state[c]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_bad_input_is_rejected_before_anything_changes(kind):
    cls = fastsam.MomentumSAM if kind == "sgd" else fastsam.MomentumSAMAdamW
    p = nn.Parameter(torch.ones(3))
    for bad in (dict(lr=-1.0), dict(rho=-0.1), dict(rho=float("nan")), dict(weight_decay=-1e-3)):
        with pytest.raises(ValueError):
            cls([p], **bad)
    with pytest.raises(ValueError):
        cls([p], perturb_eps=-1.0)
    with pytest.raises(ValueError):
        cls([p], backend="nonsense")
    if kind == "sgd":
        for bad in (dict(momentum=1.5), dict(momentum=0.0, nesterov=True), dict(nesterov="yes")):
            with pytest.raises(ValueError):
                cls([p], **bad)
    else:
        for bad in (dict(betas=(1.0, 0.9)), dict(betas=(0.9,)), dict(eps=-1.0)):
            with pytest.raises(ValueError):
                cls([p], **bad)
    # A bad group value set later, or a sparse gradient, fails at step() with nothing modified.
    model = make_model()
    opt = cls(model.parameters())
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    F.cross_entropy(model(x), y).backward()
    before = [q.detach().clone() for q in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match="rho"):
        opt.step()
    opt.param_groups[0]["rho"] = state_before["param_groups"][0]["rho"]
    last = list(model.parameters())[-1]
    last.grad = last.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(q, b) for q, b in zip(model.parameters(), before))
    sd = opt.state_dict()
    for k, v in state_before["state"].items():
        for kk, vv in v.items():
            assert torch.equal(torch.as_tensor(sd["state"][k][kk]), torch.as_tensor(vv))
    bad_sd = opt.state_dict()
    bad_sd["fastsam"] = dict(bad_sd["fastsam"], scales=[None, None])  # one group, two scales
    with pytest.raises(ValueError, match="scales"):
        opt.load_state_dict(bad_sd)


def test_closure_raising_leaves_everything_untouched():
    model = make_model()
    opt = fastsam.MomentumSAM(model.parameters())
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    before = [q.detach().clone() for q in model.parameters()]

    def closure():
        raise OSError("data loader failed")

    with pytest.raises(OSError):
        opt.step(closure)
    assert all(torch.equal(q, b) for q, b in zip(model.parameters(), before))
    assert opt.state_dict()["fastsam"]["steps"] == 1


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_no_host_sync_in_a_step_or_the_context(kind):
    model = make_model()
    opt = build(kind, model.parameters())
    x, y = batches(1)[0]
    watch = host_sync_watch()
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        with watch:
            opt.step()
            with opt.unperturbed():
                pass
        opt.zero_grad()
    assert watch.seen == []


def _count_ops(n_tensors, kind):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(n_tensors)]
    opt = build(kind, params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    with op_counter() as counted:
        opt.step()
    return counted.ops


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_constant_number_of_ops_whatever_the_number_of_tensors(kind):
    small, large = _count_ops(8, kind), _count_ops(200, kind)
    assert small == large
    assert sum(small.values()) < 40


def test_lr_scheduler_and_deepcopy_and_repr():
    model = make_model()
    opt = fastsam.MomentumSAM(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["fastsam"]["steps"] == 1
    assert "MomentumSAM(" in repr(opt)


def test_state_dict_of_stock_sgd_loads_with_zero_scale():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    sgd.step()
    opt = fastsam.MomentumSAM(model.parameters())
    sd = sgd.state_dict()
    for g in sd["param_groups"]:
        g["rho"] = 0.3
    opt.load_state_dict(sd)
    before = [q.detach().clone() for q in model.parameters()]
    with opt.unperturbed():  # s = 0: nothing to move back
        assert all(torch.equal(q, b) for q, b in zip(model.parameters(), before))


# ------------------------------------------------------------------------------------------------
# The ops, against an fp64 per-tensor reference

def _ref_sgd(w, g, v, s_old, lr, mu, wd, nesterov):
    w, g, v = w.double(), g.double(), v.double()
    d = g + wd * w
    w = w + s_old * v
    v = mu * v + d
    w = w - lr * (d + mu * v if nesterov else v)
    return w, v


@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_sgd", DTYPES + [torch.float64]))
@pytest.mark.parametrize("nesterov,wd", [(False, 1e-2), (True, 0.0)])
def test_sgd_op_matches_fp64_reference(device, backend, dtype, nesterov, wd):
    gen = torch.Generator().manual_seed(3)
    for shapes in shape_sets(gen):
        w = randn_list(shapes, dtype, device, gen)
        g = randn_list(shapes, dtype, device, gen)
        v = randn_list(shapes, dtype, device, gen)
        expected = [_ref_sgd(a, b, c, 0.07, 0.1, 0.9, wd, nesterov) for a, b, c in zip(w, g, v)]
        sq = ops.momentum_sam_sgd_(w, g, v, s_old=torch.tensor(0.07, dtype=torch.float64, device=device), lr=0.1, momentum=0.9,
                                   weight_decay=wd, nesterov=nesterov, backend=backend)
        rtol, atol = TOL[dtype]
        factor = 1 if dtype == torch.float64 else 4
        for a, (ew, ev) in zip(w, expected):
            torch.testing.assert_close(a.double(), ew.to(dtype).double(), rtol=rtol * factor, atol=atol * factor)
        for c, (_, ev) in zip(v, expected):
            torch.testing.assert_close(c.double(), ev.to(dtype).double(), rtol=rtol * factor, atol=atol * factor)
        ref_sq = sum(float((c.double() ** 2).sum()) for c in v)  # the norm of the buffers as stored
        assert sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and sq.device.type == device
        assert math.isclose(float(sq), ref_sq, rel_tol=1e-4)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_adamw", DTYPES + [torch.float64]))
def test_adamw_op_matches_fp64_reference(device, backend, dtype):
    gen = torch.Generator().manual_seed(4)
    b1, b2, eps, lr, wd, step = 0.9, 0.99, 1e-8, 1e-2, 0.1, 3
    for shapes in shape_sets(gen):
        w = randn_list(shapes, dtype, device, gen)
        g = randn_list(shapes, dtype, device, gen)
        m = randn_list(shapes, dtype, device, gen)
        u = [t.abs() for t in randn_list(shapes, dtype, device, gen)]
        exp = []
        for a, b, c, e in zip(w, g, m, u):
            a, b, c, e = a.double(), b.double(), c.double(), e.double()
            a = a + 0.05 * c
            c = b1 * c + (1 - b1) * b
            e = b2 * e + (1 - b2) * b * b
            a = a - lr / (1 - b1 ** step) * c / (e.sqrt() / math.sqrt(1 - b2 ** step) + eps)
            a = a * (1 - lr * wd)
            exp.append((a, c, e))
        sq = ops.momentum_sam_adamw_(w, g, m, u, s_old=0.05, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                                     step=step, backend=backend)
        rtol, atol = TOL[dtype]
        factor = 1 if dtype == torch.float64 else 4
        for got, want in zip((w, m, u), zip(*exp)):
            for a, e in zip(got, want):
                torch.testing.assert_close(a.double(), e.to(dtype).double(), rtol=rtol * factor, atol=atol * factor)
        assert math.isclose(float(sq), sum(float((c.double() ** 2).sum()) for c in m), rel_tol=1e-4)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("momentum_sam_shift", DTYPES + [torch.float64]))
def test_shift_op_matches_fp64_reference_and_backs_up_exactly(device, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    for shapes in shape_sets(gen):
        w = randn_list(shapes, dtype, device, gen)
        v = randn_list(shapes, dtype, device, gen)
        orig = [t.clone() for t in w]
        backups = [torch.empty_like(t) for t in w]
        ops.momentum_sam_shift_(w, v, torch.tensor(-0.3, dtype=torch.float64), backups, backend=backend)
        rtol, atol = TOL[dtype]
        for a, o, b, c in zip(w, orig, backups, v):
            assert torch.equal(b, o)
            torch.testing.assert_close(a.double(), (o.double() - 0.3 * c.double()).to(dtype).double(),
                                       rtol=rtol, atol=atol)
        ops.momentum_sam_shift_(w, v, 0.0, backend=backend)  # no backups: just the move


def test_ops_reject_mismatched_lists_before_modifying():
    w = [torch.zeros(3), torch.zeros(4)]
    with pytest.raises(ValueError):
        ops.momentum_sam_sgd_(w, [torch.zeros(3)], w, s_old=0.0, lr=0.1)
    with pytest.raises(ValueError):
        ops.momentum_sam_sgd_(w, [torch.zeros(3), torch.zeros(5)], [torch.zeros(3), torch.zeros(4)], s_old=0.0, lr=0.1)
    with pytest.raises(ValueError):
        ops.momentum_sam_sgd_(w, w, w, s_old=torch.zeros(2), lr=0.1)
    with pytest.raises(ValueError):
        ops.momentum_sam_adamw_(w, w, w, w, s_old=0.0, lr=0.1, step=0)
    with pytest.raises(ValueError):
        ops.momentum_sam_shift_(w, [torch.zeros(3)], 0.1)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in w)


def test_many_tensors_one_bucket_each_dtype():
    gen = torch.Generator().manual_seed(6)
    shapes = many_shapes(gen, 12)
    w = randn_list(shapes, torch.float32, "cpu", gen) + randn_list(shapes, torch.float64, "cpu", gen)
    g = [torch.randn_like(t) for t in w]
    v = [torch.randn_like(t) for t in w]
    exp = [_ref_sgd(a, b, c, 0.0, 0.1, 0.9, 0.0, False) for a, b, c in zip(w, g, v)]
    sq = ops.momentum_sam_sgd_(w, g, v, s_old=0.0, lr=0.1)
    for a, (e, _) in zip(w, exp):
        torch.testing.assert_close(a.double(), e.to(a.dtype).double(), rtol=1e-5, atol=1e-6)
    assert math.isclose(float(sq), sum(float((c.double() ** 2).sum()) for c in v), rel_tol=1e-5)
