"""Interval SAM (``every=k``): plain reference over many steps, loop forms, resume, counter, errors."""

import pytest
import torch
import torch.nn.functional as F

import fastsam
from helpers import backends_for, op_counter
from test_sam import ADAMW_KW, SGD_KW, assert_models_close, assert_models_equal, batches, make_model, param_groups
from variant_reference import ReferenceVariant, run_fastsam, run_reference

GROUPS = [dict(rho=0.05), dict(rho=0.1)]
BASES = {"sgd": (torch.optim.SGD, SGD_KW), "adamw": (torch.optim.AdamW, ADAMW_KW),
         "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5))}


def groups_fn(model):
    return param_groups(model, GROUPS)


def _cases():
    for backend in backends_for("perturb", "cpu", torch.float32):
        for base in BASES:
            for every, adaptive in ((3, False), (2, True)):
                yield pytest.param(backend, base, every, adaptive, id=f"{backend}-{base}-every{every}-ad{adaptive}")


@pytest.mark.parametrize("backend,base,every,adaptive", list(_cases()))
def test_interval_sam_matches_reference_and_resumes_exactly(backend, base, every, adaptive):
    base_cls, kw = BASES[base]
    data = batches()

    def opt_fn(groups):
        return fastsam.SAM(groups, base_cls, every=every, adaptive=adaptive, backend=backend, **kw)

    reference, _ = run_reference(lambda g: ReferenceVariant(g, base_cls, kw, "sam", every=every, adaptive=adaptive),
                                 groups_fn, data, clip=1.0, sched=True)
    straight, opt = run_fastsam(opt_fn, groups_fn, data, clip=1.0, sched=True)
    resumed, _ = run_fastsam(opt_fn, groups_fn, data, resume_at=10, clip=1.0, sched=True)  # mid-cycle
    assert_models_close(straight, reference)
    assert_models_equal(resumed, straight)
    assert opt.state_dict()["fastsam"]["step"] == len(data)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_every_one_is_sam(base):
    base_cls, kw = BASES[base]
    data = batches()
    sam, _ = run_fastsam(lambda g: fastsam.SAM(g, base_cls, **kw), groups_fn, data, form="both")
    interval, opt = run_fastsam(lambda g: fastsam.SAM(g, base_cls, every=1, **kw), groups_fn, data, form="skip")
    assert_models_equal(interval, sam)
    assert opt.needs_second_pass


def test_loop_forms_agree_bit_for_bit():
    data = batches(14)

    def opt_fn(groups):
        return fastsam.SAM(groups, torch.optim.SGD, every=4, **SGD_KW)

    models = {form: run_fastsam(opt_fn, groups_fn, data, form=form, clip=1.0)[0] for form in ("skip", "both", "closure")}
    assert_models_equal(models["both"], models["skip"])
    assert_models_equal(models["closure"], models["skip"])


def test_cheap_steps_skip_the_second_pass_and_perturb_nothing():
    model = make_model()
    opt = fastsam.ASAM(model.parameters(), torch.optim.SGD, every=3, lr=0.1)
    x, y = batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    pattern = []
    for _ in range(7):
        pattern.append(opt.needs_second_pass)
        F.cross_entropy(model(x), y).backward()
        out = opt.step(closure)
        assert (out is None) == (not pattern[-1])
        opt.zero_grad()
    assert pattern == [True, False, False, True, False, False, True]
    assert len(calls) == 3
    # first_step on a cheap step leaves the weights alone, and second_step needs no first_step there.
    F.cross_entropy(model(x), y).backward()
    snap = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert opt.grad_norm is None and all(torch.equal(p, s) for p, s in zip(model.parameters(), snap))
    opt.second_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)  # step 8, cheap: the one-pass form
    assert opt.needs_second_pass
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()  # step 9 is a SAM step


def test_step_counter_in_state_dict():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, every=5, lr=0.1)
    x, y = batches(1)[0]
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        if opt.needs_second_pass:
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    sd = opt.state_dict()
    assert sd["fastsam"] == {"step": 3}
    fresh = fastsam.SAM(model.parameters(), torch.optim.SGD, every=5, lr=0.1)
    fresh.load_state_dict(sd)
    assert not fresh.needs_second_pass and fresh._step_state.step_count == 3
    # A stock optimizer's state dict has no counter: a fresh cycle, starting with a SAM step.
    fresh.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict() | {
        "param_groups": sd["param_groups"]})
    assert fresh.needs_second_pass and fresh._step_state.step_count == 0


@pytest.mark.parametrize("every", [0, -1, 2.5, True, "2", None])
def test_bad_every_is_rejected(every):
    model = make_model()
    with pytest.raises(ValueError, match="every"):
        fastsam.SAM(model.parameters(), torch.optim.SGD, every=every, lr=0.1)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, every=2, lr=0.1)
    with pytest.raises(ValueError, match="every"):
        opt.every = every
    assert opt.every == 2
    opt.every = 4
    assert opt.every == 4


VARIANTS = {
    "interval": lambda ps, base, kw: fastsam.SAM(ps, base, every=2, **kw),
    "gsam": lambda ps, base, kw: fastsam.GSAM(ps, base, alpha=0.4, every=2, **kw),
    "looksam": lambda ps, base, kw: fastsam.LookSAM(ps, base, k=2, alpha=0.7, **kw),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_steps_have_no_host_sync_and_a_constant_op_count(variant, monkeypatch):
    """Per step, the dispatched ops neither sync (no .item()/nonzero) nor grow with the tensor count.

    The torch backend's reductions take one BLAS dot per tensor on the CPU, where that is faster
    and more accurate and there are no launches to save (``grad_dot.reduces_per_tensor``); the
    multi-tensor path is the one that runs on GPUs, so that is the one counted here.
    """

    import sys

    # (fastsam.ops.grad_dot is also the op's function: take the module itself.)
    monkeypatch.setattr(sys.modules["fastsam.ops.grad_dot"], "reduces_per_tensor", lambda device: False)

    sync_ops = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose")

    def count(n_tensors, base_cls, kw):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(n_tensors)]
        opt = VARIANTS[variant](params, base_cls, kw)

        def fill():
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)

        def one_step():
            fill()
            if opt.needs_second_pass:
                opt.first_step()
                fill()
            opt.second_step()

        for _ in range(4):  # warm up a full cycle twice: state and buffers allocated
            one_step()
        counts = []
        for _ in range(2):  # a SAM step, then a cheap step
            with op_counter() as mode:
                one_step()
            counts.append(mode.ops)
        return counts

    for base_cls, kw in ((torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-3))):
        small, large = count(6, base_cls, kw), count(150, base_cls, kw)
        for ops_seen in small:
            assert not [op for op in ops_seen if any(s in op for s in sync_ops)], ops_seen
        # randn for the fake gradients grows with the tensor count; everything else must not.
        strip = [{k: v for k, v in c.items() if "randn" not in k} for c in small + large]
        assert strip[0] == strip[2] and strip[1] == strip[3]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_host_sync_on_cuda(variant):
    """On a GPU, whole steps (SAM and cheap) run under torch's sync debug mode set to "error"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).cuda()
    opt = VARIANTS[variant](model.parameters(), torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    x, y = torch.randn(32, 10, device="cuda"), torch.randint(0, 3, (32,), device="cuda")
    for warm in (True, False):
        torch.cuda.set_sync_debug_mode(0 if warm else "error")
        try:
            for _ in range(4):
                F.cross_entropy(model(x), y).backward()
                if opt.needs_second_pass:
                    opt.first_step(zero_grad=True)
                    F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
