"""mSAM (micro-batch SAM) against a plain reference written here, over many steps, with resume."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import fastsam
from helpers import backends_for, host_sync_watch
from test_esam import (BASES, SGD_KW, assert_models_close, assert_models_equal, batches, groups_of,
                       make_model, per_sample_closure)

STEPS = 12
RESUME_AT = 5


class ReferenceMSAM:
    """mSAM as defined: each shard perturbed by its own gradient; the update averages the perturbed-point gradients."""

    def __init__(self, groups, base_cls, base_kw, micro_batches, adaptive=False):
        self.base = base_cls(groups, foreach=False, **base_kw)
        self.m, self.adaptive = micro_batches, adaptive

    def params(self):
        return [p for g in self.base.param_groups for p in g["params"]]

    def step(self, model, x, y):
        size = len(y) // self.m
        total = {p: torch.zeros_like(p) for p in self.params()}
        losses = []
        for k in range(self.m):
            xs, ys = x[k * size:(k + 1) * size], y[k * size:(k + 1) * size]
            self.base.zero_grad()
            # BatchNorm statistics: the first shard's first pass is the step's one update.
            with fastsam.frozen_running_stats(model) if k else torch.enable_grad():
                loss = F.cross_entropy(model(xs), ys, reduction="none").mean()
                loss.backward()
            losses.append(loss.detach())
            with torch.no_grad():
                terms = [((p.abs() * p.grad) if self.adaptive else p.grad).pow(2).sum() for p in self.params()]
                norm = torch.stack(terms).sum().sqrt()
                backups = {}
                for g in self.base.param_groups:
                    for p in g["params"]:
                        backups[p] = p.clone()
                        d = p.abs() ** 2 * p.grad if self.adaptive else p.grad
                        p.add_(g["rho"] / (norm + 1e-12) * d)
            self.base.zero_grad()
            with fastsam.frozen_running_stats(model):
                F.cross_entropy(model(xs), ys, reduction="none").mean().backward()
            with torch.no_grad():
                for p in self.params():
                    total[p] += p.grad
                    p.copy_(backups[p])
        for p in self.params():
            p.grad = total[p] / self.m
        self.base.step()
        return torch.stack(losses).mean()


def run_reference(data, base_cls, base_kw, m, adaptive=False):
    model = make_model()
    ref = ReferenceMSAM(groups_of(model), base_cls, base_kw, m, adaptive)
    return model, [ref.step(model, x, y) for x, y in data]


def run_msam(data, opt_fn, resume_at=None):
    model = make_model()
    opt = opt_fn(model)
    losses = []
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = make_model(seed=99)
            model.load_state_dict(ckpt["model"])
            opt = opt_fn(model)
            opt.load_state_dict(ckpt["opt"])
        losses.append(opt.step(per_sample_closure(model, x, y), batch_size=len(y)))
    return model, opt, losses


def _cases():
    for backend in backends_for("perturb", "cpu", torch.float32):
        for m in (2, 4):
            for base in BASES:
                if backend != "torch" and (base == "adamw" or m == 4):
                    continue  # the interpreter is slow; one case covers the kernels' use here
                yield pytest.param(backend, m, base, id=f"{backend}-m{m}-{base}")


@pytest.mark.parametrize("backend,m,base", list(_cases()))
def test_matches_reference_and_resumes_exactly(backend, m, base):
    base_cls, base_kw = BASES[base]
    data = batches(STEPS)

    def opt_fn(model):
        return fastsam.MSAM(groups_of(model), base_cls, micro_batches=m, model=model, backend=backend, **base_kw)

    reference, ref_losses = run_reference(data, base_cls, base_kw, m)
    straight, opt, losses = run_msam(data, opt_fn)
    resumed, _, resumed_losses = run_msam(data, opt_fn, resume_at=RESUME_AT)
    assert_models_close(straight, reference)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5, atol=1e-6)
    assert_models_equal(resumed, straight)
    assert all(torch.equal(a, b) for a, b in zip(losses, resumed_losses))
    assert int(straight.bn.num_batches_tracked) == STEPS  # one BatchNorm update per step


def test_adaptive_matches_reference():
    data = batches(8)
    reference, _ = run_reference(data, torch.optim.SGD, SGD_KW, 3, adaptive=True)
    model = make_model()
    opt = fastsam.MSAM(groups_of(model), torch.optim.SGD, micro_batches=3, adaptive=True, model=model, **SGD_KW)
    for x, y in data:
        opt.step(per_sample_closure(model, x, y), batch_size=len(y))
    assert_models_close(model, reference)


@pytest.mark.parametrize("base", list(BASES))
def test_one_micro_batch_is_exactly_sam(base):
    base_cls, base_kw = BASES[base]
    data = batches(10)
    sam_model, msam_model = make_model(), make_model()
    sam = fastsam.SAM(groups_of(sam_model), base_cls, **base_kw)
    msam = fastsam.MSAM(groups_of(msam_model), base_cls, micro_batches=1, model=msam_model, **base_kw)
    for i, (x, y) in enumerate(data):
        closure = per_sample_closure(sam_model, x, y)
        sam_loss = closure().mean()
        sam_loss.backward()

        def second():
            with fastsam.frozen_running_stats(sam_model):
                closure().mean().backward()

        sam.step(second)
        sam.zero_grad()
        # batch_size is optional with one micro-batch
        msam_loss = msam.step(per_sample_closure(msam_model, x, y), **({"batch_size": len(y)} if i % 2 else {}))
        assert torch.equal(msam_loss, sam_loss.detach())
    assert_models_equal(msam_model, sam_model)


def test_shards_are_disjoint_and_cover_the_batch():
    model = make_model()
    opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, micro_batches=4, lr=0.1, model=model)
    x, y = batches(1)[0]
    seen = []

    def closure(indices=None):
        seen.append((indices.clone(), torch.is_grad_enabled()))
        return F.cross_entropy(model(x[indices]), y[indices], reduction="none")

    opt.step(closure, batch_size=len(y))
    assert len(seen) == 8 and all(g for _, g in seen)
    firsts = [i for i, _ in seen[0::2]]
    assert all(torch.equal(a, b) for a, b in zip(firsts, [i for i, _ in seen[1::2]]))  # same shard, both passes
    assert torch.equal(torch.cat(firsts), torch.arange(len(y)))


def test_with_gradient_accumulation_semantics_loss_is_the_batch_mean():
    """The returned loss is the mean first-pass loss over the whole batch (the shards' means averaged)."""
    model = make_model()
    opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, rho=0.0, micro_batches=4, lr=0.0, model=model)
    x, y = batches(1)[0]
    loss = opt.step(per_sample_closure(model, x, y), batch_size=len(y))
    with fastsam.frozen_running_stats(model):
        expected = torch.stack([F.cross_entropy(model(x[i:i + 6]), y[i:i + 6]) for i in range(0, 24, 6)]).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("m", [0, -1, 2.5, True, "2"])
def test_bad_micro_batches_raise(m):
    model = make_model()
    with pytest.raises(ValueError, match="micro_batches"):
        fastsam.MSAM(model.parameters(), torch.optim.SGD, micro_batches=m, lr=0.1)


def test_bad_batch_sizes_and_closures_leave_everything_unchanged():
    model = make_model()
    opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, micro_batches=4, lr=0.1, momentum=0.9, model=model)
    x, y = batches(1)[0]
    opt.step(per_sample_closure(model, x, y), batch_size=24)
    before = copy.deepcopy(model.state_dict())
    bufs = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}

    def unchanged():
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(opt.state_dict()["state"][k]["momentum_buffer"], v) for k, v in bufs.items())
        assert opt._perturbed is None

    closure = per_sample_closure(model, x, y)
    with pytest.raises(ValueError, match="does not divide the batch size 23"):
        opt.step(closure, batch_size=23)
    with pytest.raises(ValueError, match="batch_size"):
        opt.step(closure)
    with pytest.raises(ValueError, match="batch_size"):
        opt.step(closure, batch_size=0)
    unchanged()
    calls = []

    def fails_in_the_second_pass(indices=None):
        calls.append(indices)
        if len(calls) == 4:
            raise KeyError("boom")
        return closure(indices)

    with pytest.raises(KeyError):
        opt.step(fails_in_the_second_pass, batch_size=24)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights restored
    model.load_state_dict(before)  # (the first pass of shard 0 did update the BatchNorm statistics)
    unchanged()
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.step(lambda indices=None: closure(indices).mean(), batch_size=24)
    with pytest.raises(ValueError, match="dp_perturbation"):
        fastsam.MSAM(model.parameters(), torch.optim.SGD, lr=0.1, dp_perturbation="local")


def test_no_host_sync_ops_in_a_step():
    watch = host_sync_watch()
    model = make_model()
    opt = fastsam.MSAM(model.parameters(), torch.optim.AdamW, micro_batches=3, lr=1e-3, model=model)
    x, y = batches(1)[0]
    for _ in range(2):
        with watch:
            opt.step(per_sample_closure(model, x, y), batch_size=24)
    assert watch.seen == []


def test_deepcopy_and_repr():
    model = make_model()
    opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, micro_batches=2, lr=0.1)
    assert "micro_batches=2" in repr(opt)
    clone = copy.deepcopy(opt)
    assert clone.micro_batches == 2 and clone.state is clone.base_optimizer.state


@pytest.mark.gpu
def test_cuda_step_has_no_host_sync():
    model = make_model().cuda()
    opt = fastsam.MSAM(model.parameters(), torch.optim.SGD, micro_batches=4, lr=0.1, momentum=0.9, model=model)
    x, y = (t.cuda() for t in batches(1)[0])
    opt.step(per_sample_closure(model, x, y), batch_size=24)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(per_sample_closure(model, x, y), batch_size=24)
    finally:
        torch.cuda.set_sync_debug_mode(0)
