"""GSAM and RhoScheduler against plain references over many steps; resume; errors."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastsam
from helpers import backends_for
from test_sam import ADAMW_KW, SGD_KW, assert_models_close, assert_models_equal, batches, make_model, param_groups
from variant_reference import ReferenceVariant, run_fastsam, run_reference

GROUPS = [dict(rho=0.05), dict(rho=0.1)]
BASES = {"sgd": (torch.optim.SGD, SGD_KW), "adamw": (torch.optim.AdamW, ADAMW_KW)}


def groups_fn(model):
    return param_groups(model, GROUPS)


def _cases():
    for backend in backends_for("grad_dot", "cpu", torch.float32):
        for base in BASES:
            for extra in ("plain", "adaptive", "every2"):
                yield pytest.param(backend, base, extra, id=f"{backend}-{base}-{extra}")


@pytest.mark.parametrize("backend,base,extra", list(_cases()))
def test_gsam_matches_reference_and_resumes_exactly(backend, base, extra):
    base_cls, kw = BASES[base]
    alpha = 0.3
    options = {"plain": {}, "adaptive": dict(adaptive=True), "every2": dict(every=2)}[extra]
    data = batches()

    def opt_fn(groups):
        return fastsam.GSAM(groups, base_cls, alpha=alpha, backend=backend, **options, **kw)

    reference, _ = run_reference(
        lambda g: ReferenceVariant(g, base_cls, kw, "gsam", alpha=alpha, every=options.get("every", 1),
                                   adaptive=options.get("adaptive", False)),
        groups_fn, data, clip=1.0, sched=True)
    straight, opt = run_fastsam(opt_fn, groups_fn, data, clip=1.0, sched=True)
    resumed, _ = run_fastsam(opt_fn, groups_fn, data, resume_at=11, clip=1.0, sched=True)
    assert_models_close(straight, reference)
    assert_models_equal(resumed, straight)
    # The decomposition really happened: its sums are there, and the result differs from SAM's.
    assert opt.grad_stats is not None and torch.isfinite(opt.grad_stats).all()
    if extra != "plain":
        return
    sam, _ = run_fastsam(lambda g: fastsam.SAM(g, base_cls, backend=backend, **options, **kw), groups_fn, data,
                         clip=1.0, sched=True)
    assert not torch.allclose(sam.fc1.weight, straight.fc1.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", list(BASES))
def test_gsam_with_alpha_zero_is_sam(base):
    base_cls, kw = BASES[base]
    data = batches()
    sam, _ = run_fastsam(lambda g: fastsam.SAM(g, base_cls, **kw), groups_fn, data, clip=1.0)
    gsam, _ = run_fastsam(lambda g: fastsam.GSAM(g, base_cls, alpha=0.0, **kw), groups_fn, data, clip=1.0)
    assert_models_equal(gsam, sam)


def test_gsam_closure_form_and_deepcopy_mid_step():
    data = batches(8)
    a, _ = run_fastsam(lambda g: fastsam.GSAM(g, torch.optim.SGD, alpha=0.5, **SGD_KW), groups_fn, data)
    b, _ = run_fastsam(lambda g: fastsam.GSAM(g, torch.optim.SGD, alpha=0.5, **SGD_KW), groups_fn, data,
                       form="closure")
    assert_models_equal(a, b)
    # A deep copy taken between the two passes carries the saved first-pass gradient.
    model = make_model()
    opt = fastsam.GSAM(model.parameters(), torch.optim.SGD, alpha=0.5, lr=0.1)
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    model2, opt2 = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (model2, opt2)):
        F.cross_entropy(m(x), y).backward()
        o.second_step(zero_grad=True)
    assert_models_equal(model, model2)


def test_gsam_non_finite_first_gradient_falls_back_to_sam():
    """Perturbation skipped and no decomposition: the step is SAM's (here: a plain gradient step)."""
    x, y = batches(1)[0]
    models = {}
    for cls in (fastsam.SAM, fastsam.GSAM):
        model = make_model()
        opt = cls(groups_fn(model), torch.optim.SGD, lr=0.1)
        F.cross_entropy(model(x), y).backward()
        model.fc2.weight.grad[0, 0] = float("inf")  # an overflow in the first pass
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        models[cls] = (model, opt)
    model, opt = models[fastsam.GSAM]
    assert not torch.isfinite(opt.grad_stats).all()
    assert_models_equal(model, models[fastsam.SAM][0])
    # The next step is a normal GSAM step again.
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert torch.isfinite(opt.grad_stats).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gsam_rho_scheduler_matches_reference():
    """rho_t follows a cosine LR schedule; fastsam and the reference apply the same formula."""
    data = batches(20)
    rho_max, rho_min, lr_max = 0.1, 0.02, 0.1
    kw = dict(lr=lr_max, momentum=0.9)

    def expected_rho(lr):
        return rho_min + (rho_max - rho_min) * lr / lr_max

    model_ref = make_model()
    ref = ReferenceVariant([dict(params=list(model_ref.parameters()), rho=rho_max)], torch.optim.SGD, kw, "gsam",
                           alpha=0.2)
    ref.rho_schedule = expected_rho
    sched_ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref.base, T_max=len(data))
    model = make_model()
    opt = fastsam.GSAM(model.parameters(), torch.optim.SGD, rho=rho_max, alpha=0.2, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(data))
    rho_sched = fastsam.RhoScheduler(opt, rho_min=rho_min)
    seen = []
    for x, y in data:
        ref.step(model_ref, x, y)
        sched_ref.step()
        F.cross_entropy(model(x), y).backward()
        seen.append(opt.param_groups[0]["rho"])
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
        rho_sched.step()
    assert_models_close(model, model_ref)
    assert seen[0] == pytest.approx(rho_max) and seen[-1] < 0.03
    assert all(a > b for a, b in zip(seen, seen[1:]))


def test_rho_scheduler_formula_clamp_and_state():
    model = make_model()
    params = list(model.parameters())
    opt = fastsam.SAM([dict(params=params[:2], rho=0.2), dict(params=params[2:], rho=0.05, lr=0.01)],
                      torch.optim.SGD, lr=0.1)
    s = fastsam.RhoScheduler(opt, rho_min=0.01, lr_min=0.001)
    assert s.rho_max == [0.2, 0.05] and s.lr_max == [0.1, 0.01]
    assert s.get_last_rho() == pytest.approx([0.2, 0.05])
    opt.param_groups[0]["lr"] = 0.0505
    opt.param_groups[1]["lr"] = torch.tensor(0.0)  # below lr_min (and a tensor): clamped to rho_min
    s.step()
    assert opt.param_groups[0]["rho"] == pytest.approx(0.01 + 0.19 * 0.5)
    assert opt.param_groups[1]["rho"] == pytest.approx(0.01)
    opt.param_groups[0]["lr"] = 1.0  # above lr_max (e.g. a warm-up overshoot): clamped to rho_max
    s.step()
    assert opt.param_groups[0]["rho"] == pytest.approx(0.2)
    # lr_max == lr_min (a constant lr): rho_max throughout.
    flat = fastsam.RhoScheduler(opt, rho_min=0.0, rho_max=0.3, lr_max=0.5, lr_min=0.5)
    assert flat.step() == pytest.approx([0.3, 0.3])
    s.step()
    state = s.state_dict()
    other = fastsam.RhoScheduler(opt, rho_min=0.0)
    other.load_state_dict(state)
    assert other.rho_min == 0.01 and other.rho_max == [0.2, 0.05] and other.lr_max == [0.1, 0.01]
    assert math.isclose(other.rho_for(0.0505, 0), 0.01 + 0.19 * 0.5)


@pytest.mark.parametrize("kwargs,match", [(dict(rho_min=-0.1), "rho_min"), (dict(rho_min=0.5), "rho_max"),
                                          (dict(lr_min=1.0), "lr_max"), (dict(lr_max=float("nan")), "lr_max"),
                                          (dict(rho_max="0.1"), "rho_max")])
def test_rho_scheduler_rejects_bad_arguments(kwargs, match):
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match=match):
        fastsam.RhoScheduler(opt, **kwargs)
    assert opt.param_groups[0]["rho"] == 0.1
    with pytest.raises(TypeError, match="fastsam optimizer"):
        fastsam.RhoScheduler(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf"), "0.4", True, None])
def test_gsam_bad_alpha_is_rejected_before_anything_changes(alpha):
    model = make_model()
    with pytest.raises(ValueError, match="alpha"):
        fastsam.GSAM(model.parameters(), torch.optim.SGD, alpha=alpha, lr=0.1)
    opt = fastsam.GSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    snap = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.alpha = alpha
    with pytest.raises(ValueError, match="alpha"):
        opt.first_step()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snap))
    opt.alpha = 0.4
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.alpha = alpha  # changed between the passes: refused, and the weights are restored
    with pytest.raises(ValueError, match="alpha"):
        opt.second_step()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snap))
    assert not opt.state[model.fc1.weight], "no base step was taken"


def test_gsam_alpha_and_rmsprop_alpha():
    """GSAM's alpha never reaches RMSprop; RMSprop's comes through the groups (or an instance)."""
    model = make_model()
    with pytest.warns(UserWarning, match="RMSprop's option of the same name keeps its default"):
        opt = fastsam.GSAM(model.parameters(), torch.optim.RMSprop, alpha=0.3, lr=1e-3)
    assert opt.alpha == 0.3 and opt.param_groups[0]["alpha"] == 0.99
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = fastsam.GSAM([dict(params=model.parameters(), alpha=0.9)], torch.optim.RMSprop, alpha=0.3, lr=1e-3)
        assert opt.alpha == 0.3 and opt.param_groups[0]["alpha"] == 0.9
        base = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.8)
        opt = fastsam.GSAM(model.parameters(), base, alpha=0.3)
        assert opt.param_groups[0]["alpha"] == 0.8
        fastsam.GSAM(model.parameters(), torch.optim.SGD, alpha=0.3, lr=0.1)  # no clash, no warning
    # And RMSprop with GSAM trains against the reference (the non-fused base path).
    data = batches(10)
    kw = dict(lr=1e-3, momentum=0.5)
    groups = [dict(rho=0.05, alpha=0.9), dict(rho=0.05, alpha=0.9)]
    reference, _ = run_reference(lambda g: ReferenceVariant(g, torch.optim.RMSprop, kw, "gsam", alpha=0.3),
                                 lambda m: param_groups(m, groups), data)
    model, _ = run_fastsam(lambda g: fastsam.GSAM(g, torch.optim.RMSprop, alpha=0.3, **kw),
                           lambda m: param_groups(m, groups), data)
    assert_models_close(model, reference)


@pytest.mark.parametrize("cls,op", [(fastsam.GSAM, "gsam_combine"), (fastsam.LookSAM, "looksam_orthogonal")])
def test_missing_op_is_reported_before_anything_changes(monkeypatch, cls, op):
    from fastsam.ops import _dispatch

    impls = _dispatch._registry[op]
    monkeypatch.setitem(_dispatch._registry, op, {"cuda": impls["torch"]})  # no torch implementation
    _dispatch.clear_caches()
    try:
        model = make_model()
        with pytest.raises(fastsam.ops.BackendUnavailableError, match=op):
            cls(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")  # explicit: at construction
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.1)  # auto: when the step would need it
        x, y = batches(1)[0]
        F.cross_entropy(model(x), y).backward()
        snap = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(fastsam.ops.BackendUnavailableError, match=op):
            opt.first_step()
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snap))
        assert opt._perturbed is None
    finally:
        monkeypatch.undo()
        _dispatch.clear_caches()
