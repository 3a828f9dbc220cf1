"""K-SAM against an fp64 reference written from the paper (both passes on the top-k loss samples)."""

import copy
import io
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from helpers import host_sync_watch, op_counter
from test_esam import batches, groups_of, make_model, per_sample_closure

STEPS = 30
SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
ADAMW_KW = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=1e-2)
BASES = {"sgd": (torch.optim.SGD, SGD_KW), "adamw": (torch.optim.AdamW, ADAMW_KW)}


class ReferenceKSAM:
    """Ni et al. 2022 in plain torch: no-grad full forward, top-k by loss, SAM on those k samples."""

    def __init__(self, model, groups, base_cls, kw, gamma):
        self.model, self.gamma = model, gamma
        self.base = base_cls(groups, foreach=False, **kw)
        self.selected = []

    def params(self):
        return [p for g in self.base.param_groups for p in g["params"]]

    def step(self, x, y):
        model = self.model
        with torch.no_grad():
            losses = F.cross_entropy(model(x), y, reduction="none")
        k = max(1, int(self.gamma * len(y)))
        # Largest losses first, ties to the lower index (a stable sort of the negated losses).
        idx = sorted(range(len(y)), key=lambda i: (-float(losses[i]), i))[:k]
        self.selected.append(idx)
        idx = torch.tensor(idx)
        bn_state = {n: b.clone() for n, b in model.named_buffers()}
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.params()))
            backup = {}
            for group in self.base.param_groups:
                for p in group["params"]:
                    backup[p] = p.clone()
                    p.add_(group["rho"] / (norm + 1e-12) * p.grad)
        self.base.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for p, b in backup.items():
                p.copy_(b)
            for n, b in model.named_buffers():  # the subset passes leave BatchNorm statistics alone
                b.copy_(bn_state[n])
        self.base.step()
        self.base.zero_grad()


def run_ref(base, data, gamma=0.5):
    base_cls, kw = BASES[base]
    model = make_model().double()
    ref = ReferenceKSAM(model, groups_of(model), base_cls, kw, gamma)
    for x, y in data:
        ref.step(x.double(), y)
    return model, ref


def run_ksam(base, data, gamma=0.5, resume_at=None, with_model=True):
    base_cls, kw = BASES[base]
    model = make_model().double()

    def build(m):
        return fastsam.KSAM(groups_of(m), base_cls, gamma=gamma, model=m if with_model else None, **kw)

    opt = build(model)
    selected = []
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = make_model(seed=9).double()
            model.load_state_dict(ckpt["model"])
            opt = build(model)
            opt.load_state_dict(ckpt["opt"])
        opt.step(per_sample_closure(model, x.double(), y))
        selected.append(opt.last_indices.tolist())
    return model, opt, selected


def assert_close(a, b, rtol=1e-6, atol=1e-8):
    # fastsam's perturbation scale uses its fp32 global norm (the grad_norm contract): ~1e-7 relative.
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_matches_fp64_reference_over_30_steps_and_resumes_exactly(base):
    data = batches(STEPS)
    ref_model, ref = run_ref(base, data)
    model, opt, selected = run_ksam(base, data)
    assert selected == ref.selected and all(len(s) == 12 for s in selected)
    assert_close(model, ref_model)
    resumed, _, rsel = run_ksam(base, data, resume_at=13)
    assert rsel == selected
    for (n, p), q in zip(resumed.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), n


def test_gamma_one_is_sam_with_the_same_bn_policy():
    """gamma = 1 selects the whole batch (in decreasing-loss order): SAM's step, up to summation order."""
    data = batches(6)
    model, _, _ = run_ksam("sgd", data, gamma=1.0)
    sam_model = make_model().double()
    sam = fastsam.SAM(groups_of(sam_model), torch.optim.SGD, **SGD_KW)
    for x, y in data:
        x = x.double()
        with torch.no_grad():
            sam_model(x)  # K-SAM's selection forward is the pass that updates the BN statistics
        with fastsam.frozen_running_stats(sam_model):
            F.cross_entropy(sam_model(x), y).backward()
            sam.first_step(zero_grad=True)
            F.cross_entropy(sam_model(x), y).backward()
        sam.second_step(zero_grad=True)
    assert_close(model, sam_model, rtol=1e-6, atol=1e-9)


def test_selection_is_the_top_k_losses_and_costs_no_host_sync():
    model = make_model()
    opt = fastsam.KSAM(model.parameters(), torch.optim.SGD, gamma=0.25, model=model, lr=0.1)
    x, y = batches(1)[0]
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
    watch = host_sync_watch()
    with watch:
        opt.step(per_sample_closure(model, x, y))
    assert watch.seen == []
    assert sorted(opt.last_indices.tolist()) == sorted(torch.topk(losses, 6).indices.tolist())


def test_closure_gets_k_indices_and_bad_closures_are_rejected():
    model = make_model()
    opt = fastsam.KSAM(model.parameters(), torch.optim.SGD, gamma=0.5, lr=0.1)
    x, y = batches(1)[0]
    seen = []

    def closure(indices=None):
        seen.append(None if indices is None else len(indices))
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")

    opt.step(closure)
    assert seen == [None, 12, 12]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(lambda indices=None: F.cross_entropy(model(x), y))  # a scalar
    with pytest.raises(ValueError, match="selection asked"):
        opt.step(lambda indices=None: F.cross_entropy(model(x), y, reduction="none"))  # ignores indices
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_bad_arguments():
    p = [nn.Parameter(torch.zeros(2))]
    for bad in (dict(gamma=0.0), dict(gamma=1.5), dict(rho=-1.0), dict(every=2)):
        with pytest.raises(ValueError):
            fastsam.KSAM(p, torch.optim.SGD, lr=0.1, **bad)
    with pytest.raises(TypeError):
        fastsam.KSAM(p, torch.optim.SGD, lr=0.1, model="not a module")


def test_exception_in_the_second_pass_restores_the_weights():
    model = make_model()
    opt = fastsam.KSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure(indices=None):
        calls.append(indices)
        if len(calls) == 3:
            raise OSError("device lost in the second pass")
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")

    with pytest.raises(OSError):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt._perturbed is None
    opt.step(per_sample_closure(model, x, y))  # and the optimizer is usable again


def test_constant_number_of_optimizer_ops_whatever_the_number_of_tensors(monkeypatch):
    """The optimizer's own work (selection, perturbation, restore + base step) does not grow with the tensors.

    Counted inside ``sds_select``, ``first_step`` and ``second_step``; the closure's forward/backward is the
    model's cost, one autograd node per tensor, and is left out.
    """
    from fastsam import ops

    def counted(fn, sink):
        def wrapper(*a, **k):
            mode = op_counter()
            with mode:
                out = fn(*a, **k)
            sink.update(mode.ops)
            return out
        return wrapper

    def count(n):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(3, generator=gen)) for _ in range(n)]
        x = torch.randn(16, 3, generator=gen)
        opt = fastsam.KSAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)

        def closure(indices=None):
            xb = x if indices is None else x[indices]
            return sum((xb * p).sum(1) for p in params) ** 2

        for _ in range(2):
            opt.step(closure)
        sink = Counter()
        monkeypatch.setattr(ops, "sds_select", counted(ops.sds_select, sink))
        opt.first_step = counted(opt.first_step, sink)
        opt.second_step = counted(opt.second_step, sink)
        opt.step(closure)
        monkeypatch.undo()
        return sink

    small, large = count(8), count(100)
    assert small == large and sum(small.values()) < 40


def test_deepcopy_and_repr():
    model = make_model()
    opt = fastsam.KSAM(model.parameters(), torch.optim.SGD, gamma=0.5, lr=0.1)
    assert "gamma=0.5" in repr(opt)
    clone = copy.deepcopy(opt)
    assert clone.gamma == 0.5
