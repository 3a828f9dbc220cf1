"""SAM / ASAM / Fisher SAM against a plain fp32 reference loop over many steps, with resume."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from helpers import backends_for, host_sync_watch, two_call_step_ops

STEPS = 24
RESUME_AT = 11


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def batches(n=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(n)]


def param_groups(model, group_opts):
    """Two groups: weights and biases, each with its own options."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [dict(params=weights, **group_opts[0]), dict(params=biases, **group_opts[1])]


# ------------------------------------------------------------------------------------------------
# The reference: the algorithms exactly as written in the papers, one parameter at a time.

class ReferenceSAM:
    def __init__(self, groups, base_cls, mode, base_kwargs):
        self.base = base_cls(groups, foreach=False, **base_kwargs)
        self.mode = mode
        self.backup = {}

    def direction_and_term(self, group, p):
        g, eta = p.grad, group.get("eta", 0.0)
        mode = self.mode if self.mode != "per-group" else ("adaptive" if group["adaptive"] else "plain")
        if mode == "plain":
            return g, g * g
        if mode == "adaptive":
            t = p.abs() + eta
            return t * t * g, (t * g) ** 2
        f = 1 + eta * g * g
        return g / f, g * g / f

    @torch.no_grad()
    def first_step(self):
        sq = sum(self.direction_and_term(gr, p)[1].sum() for gr in self.base.param_groups for p in gr["params"]
                 if p.grad is not None)
        norm = sq.sqrt()
        for gr in self.base.param_groups:
            for p in gr["params"]:
                if p.grad is None:
                    continue
                d, _ = self.direction_and_term(gr, p)
                self.backup[p] = p.clone()
                p.add_(gr["rho"] / (norm + 1e-12) * d)

    @torch.no_grad()
    def second_step(self):
        for p, b in self.backup.items():
            p.copy_(b)
        self.backup.clear()
        self.base.step()


def run_reference(groups_fn, base_cls, mode, base_kwargs, data, clip=None, sched=False):
    model = make_model()
    ref = ReferenceSAM(groups_fn(model), base_cls, mode, base_kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(ref.base, step_size=5, gamma=0.5) if sched else None
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        ref.first_step()
        ref.base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        ref.second_step()
        ref.base.zero_grad()
        if scheduler:
            scheduler.step()
    return model


def run_fastsam(opt_fn, groups_fn, data, resume_at=None, clip=None, sched=False):
    model = make_model()
    opt = opt_fn(groups_fn(model))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5) if sched else None
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            # Save everything, rebuild from scratch, load: the run must continue exactly.
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": scheduler.state_dict() if scheduler else None}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = make_model(seed=123)
            model.load_state_dict(ckpt["model"])
            opt = opt_fn(groups_fn(model))
            opt.load_state_dict(ckpt["opt"])
            if scheduler:
                scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
                scheduler.load_state_dict(ckpt["sched"])
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.second_step(zero_grad=True)
        if scheduler:
            scheduler.step()
    return model, opt


def assert_models_close(a, b, rtol=1e-4, atol=1e-5):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_models_equal(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{name} differs after resume"


SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
ADAMW_KW = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=1e-2)

VARIANTS = {
    # name: (fastsam class, extra kwargs, per-group options, reference mode)
    "sam": (fastsam.SAM, {}, [dict(rho=0.05), dict(rho=0.1)], "plain"),
    "sam-adaptive": (fastsam.SAM, dict(adaptive=True), [dict(rho=0.5), dict(rho=1.0, adaptive=False)], "per-group"),
    "asam": (fastsam.ASAM, {}, [dict(rho=0.5), dict(rho=0.5, eta=0.1)], "adaptive"),
    "fisher": (fastsam.FisherSAM, {}, [dict(rho=0.1), dict(rho=0.05, eta=0.5)], "fisher"),
}
BASES = {"sgd": (torch.optim.SGD, SGD_KW), "adamw": (torch.optim.AdamW, ADAMW_KW)}


def _cases():
    for backend in backends_for("perturb", "cpu", torch.float32):
        for variant in VARIANTS:
            for base in BASES:
                yield pytest.param(backend, variant, base, id=f"{backend}-{variant}-{base}")


@pytest.mark.parametrize("backend,variant,base", list(_cases()))
def test_matches_reference_and_resumes_exactly(backend, variant, base):
    cls, extra, group_opts, mode = VARIANTS[variant]
    base_cls, base_kw = BASES[base]
    default_eta = {"asam": 0.01, "fisher": 1.0}.get(variant, 0.0)
    ref_groups = [dict(o) for o in group_opts]
    for g in ref_groups:
        g.setdefault("eta", default_eta)
        g.setdefault("adaptive", extra.get("adaptive", False))

    def groups_fn(model):
        return param_groups(model, group_opts)

    def opt_fn(groups):
        return cls(groups, base_cls, backend=backend, **extra, **base_kw)

    data = batches()
    reference = run_reference(lambda m: param_groups(m, ref_groups), base_cls, mode, base_kw, data,
                              clip=1.0, sched=True)
    straight, opt = run_fastsam(opt_fn, groups_fn, data, clip=1.0, sched=True)
    resumed, _ = run_fastsam(opt_fn, groups_fn, data, resume_at=RESUME_AT, clip=1.0, sched=True)
    assert_models_close(straight, reference)
    assert_models_equal(resumed, straight)
    # The base optimizer's state really is in the optimizer (momentum / Adam moments).
    state = opt.state_dict()["state"]
    key = "momentum_buffer" if base == "sgd" else "exp_avg"
    assert len(state) == 6 and all(key in s for s in state.values())


def test_step_with_closure_equals_two_calls():
    data = batches(6)
    a, b = make_model(), make_model()
    oa = fastsam.SAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ob = fastsam.SAM(b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for x, y in data:
        F.cross_entropy(a(x), y).backward()
        oa.first_step(zero_grad=True)
        loss_a = F.cross_entropy(a(x), y)
        loss_a.backward()
        oa.second_step(zero_grad=True)

        F.cross_entropy(b(x), y).backward()

        def closure():
            loss = F.cross_entropy(b(x), y)
            loss.backward()
            return loss

        loss_b = ob.step(closure)
        ob.zero_grad()
        assert torch.equal(loss_a, loss_b)
    assert_models_equal(a, b)


@pytest.mark.parametrize("base_cls,kw", [(torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5)),
                                         (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
                                         (torch.optim.Adam, dict(lr=1e-2))])
def test_any_base_optimizer(base_cls, kw):
    """Bases without a fused path (RMSprop, Adam with coupled decay) take restore + base.step()."""
    data = batches(10)
    groups = [dict(rho=0.05), dict(rho=0.05)]
    reference = run_reference(lambda m: param_groups(m, groups), base_cls, "plain", kw, data)
    model, opt = run_fastsam(lambda g: fastsam.SAM(g, base_cls, **kw), lambda m: param_groups(m, groups), data)
    assert_models_close(model, reference)
    fused = opt._fused_base is not None
    assert fused == (base_cls is torch.optim.Adam and "weight_decay" not in kw)


def test_base_optimizer_instance():
    data = batches(8)
    a, b = make_model(), make_model()
    oa = fastsam.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    base = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    ob = fastsam.SAM(b.parameters(), base, rho=0.1)
    assert ob.base_optimizer is base and ob.param_groups is base.param_groups
    for x, y in data:
        for m, o in ((a, oa), (b, ob)):
            F.cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward()
            o.second_step(zero_grad=True)
    assert_models_equal(a, b)
    with pytest.raises(TypeError, match="instance"):
        fastsam.SAM(b.parameters(), base, lr=0.1)
    with pytest.raises(ValueError, match="different parameters"):
        fastsam.SAM(a.parameters(), base)


def test_lr_scheduler_sees_shared_groups_without_warning(recwarn):
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_state_dict_loads_into_stock_optimizer_and_back():
    """The saved state is torch's own format: a stock SGD can read it, and fastsam can read a stock one."""
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    stock = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stock.load_state_dict(opt.base_optimizer.state_dict())
    bufs = [stock.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in zip(bufs, model.parameters()))
    fresh = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sd = stock.state_dict()
    for g in sd["param_groups"]:
        g.update(rho=0.05, adaptive=False, eta=0.0)
    fresh.load_state_dict(sd)
    assert fresh.base_optimizer.state is fresh.state
    assert all(torch.equal(fresh.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), bufs))


def test_constant_number_of_ops_whatever_the_number_of_tensors():
    """The dispatched op count of a whole SAM step does not grow with the number of tensors."""

    def count(n_tensors, base_cls, kw):
        return two_call_step_ops(lambda params: fastsam.SAM(params, base_cls, **kw), n_tensors)

    for base_cls, kw in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-3))):
        small, large = count(8, base_cls, kw), count(200, base_cls, kw)
        assert small == large
        assert sum(small[0].values()) < 30 and sum(small[1].values()) < 10


def test_no_host_sync_ops_in_a_step():
    """No .item()/nonzero-style ops (host syncs on a GPU) are dispatched inside first/second step."""
    watch = host_sync_watch()
    for cls, kw in ((fastsam.SAM, {}), (fastsam.ASAM, {}), (fastsam.FisherSAM, {})):
        for base_cls, bkw in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-3))):
            model = make_model()
            opt = cls(model.parameters(), base_cls, **kw, **bkw)
            x, y = batches(1)[0]
            for _ in range(2):
                F.cross_entropy(model(x), y).backward()
                with watch:
                    opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                with watch:
                    opt.second_step(zero_grad=True)
    assert watch.seen == []


def test_deepcopy_and_repr():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert "SAM(base=SGD" in repr(opt)
    clone = copy.deepcopy(opt)
    assert clone.state is clone.base_optimizer.state
