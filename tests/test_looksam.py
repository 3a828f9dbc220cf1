"""LookSAM against a plain reference over many steps; k=1 is SAM; g_v, restores, resume, errors."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastsam
from helpers import backends_for
from test_sam import ADAMW_KW, SGD_KW, assert_models_close, assert_models_equal, batches, make_model, param_groups
from variant_reference import ReferenceVariant, run_fastsam, run_reference

GROUPS = [dict(rho=0.05), dict(rho=0.1)]
BASES = {"sgd": (torch.optim.SGD, SGD_KW), "adamw": (torch.optim.AdamW, ADAMW_KW),
         "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5))}


def groups_fn(model):
    return param_groups(model, GROUPS)


def _cases():
    for backend in backends_for("looksam_combine", "cpu", torch.float32):
        for base in BASES:
            yield pytest.param(backend, base, id=f"{backend}-{base}")


@pytest.mark.parametrize("backend,base", list(_cases()))
def test_looksam_matches_reference_and_resumes_mid_cycle(backend, base):
    base_cls, kw = BASES[base]
    k, alpha = 5, 0.7
    data = batches()

    def opt_fn(groups):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RMSprop's own alpha keeps its default here, as in the reference
            return fastsam.LookSAM(groups, base_cls, k=k, alpha=alpha, backend=backend, **kw)

    reference, _ = run_reference(lambda g: ReferenceVariant(g, base_cls, kw, "looksam", alpha=alpha, every=k),
                                 groups_fn, data, clip=1.0, sched=True)
    straight, opt = run_fastsam(opt_fn, groups_fn, data, clip=1.0, sched=True)
    resumed, _ = run_fastsam(opt_fn, groups_fn, data, resume_at=13, clip=1.0, sched=True)  # 13 % 5 = 3
    assert_models_close(straight, reference)
    assert_models_equal(resumed, straight)
    # LookSAM's cheap steps really differ from interval SAM's plain ones.
    interval, _ = run_fastsam(lambda g: fastsam.SAM(g, base_cls, every=k, backend=backend, **kw), groups_fn, data,
                              clip=1.0, sched=True)
    assert not torch.allclose(interval.fc1.weight, straight.fc1.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_looksam_with_k_one_is_sam(base):
    base_cls, kw = BASES[base]
    data = batches()
    sam, _ = run_fastsam(lambda g: fastsam.SAM(g, base_cls, **kw), groups_fn, data, clip=1.0)
    looksam, _ = run_fastsam(lambda g: fastsam.LookSAM(g, base_cls, k=1, alpha=0.7, **kw), groups_fn, data, clip=1.0)
    assert_models_equal(looksam, sam)


def test_loop_forms_agree_bit_for_bit():
    data = batches(12)

    def opt_fn(groups):
        return fastsam.LookSAM(groups, torch.optim.SGD, k=3, alpha=0.5, **SGD_KW)

    models = {form: run_fastsam(opt_fn, groups_fn, data, form=form, clip=1.0)[0] for form in ("skip", "both", "closure")}
    assert_models_equal(models["both"], models["skip"])
    assert_models_equal(models["closure"], models["skip"])


def test_g_v_is_computed_orthogonal_and_saved():
    model = make_model()
    opt = fastsam.LookSAM(groups_fn(model), torch.optim.SGD, k=4, alpha=0.7, lr=0.1)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    g_s = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    # The reference g_v = g_s - (<g, g_s>/||g||^2) g, all in fp64.
    dot = sum((a.double() * b.double()).sum() for a, b in zip(g, g_s))
    sq = sum((a.double() ** 2).sum() for a in g)
    expected = [b.double() - dot / sq * a.double() for a, b in zip(g, g_s)]
    gv = [opt._gv[p] for p in model.parameters()]
    for v, e in zip(gv, expected):
        torch.testing.assert_close(v.double(), e, rtol=1e-4, atol=1e-7)
    assert abs(sum((v.double() * a.double()).sum() for v, a in zip(gv, g))) < 1e-5 * sq.sqrt()
    torch.testing.assert_close(opt._gv_sq_norm.double(), sum((e ** 2).sum() for e in expected), rtol=1e-4, atol=0)
    extra = opt.state_dict()["fastsam"]
    assert extra["step"] == 1 and sorted(extra["looksam_gv"]) == list(range(6))
    assert torch.equal(extra["looksam_gv_sq_norm"], opt._gv_sq_norm)


def test_cheap_steps_restore_nothing():
    """Some public versions restore weights saved at the last SAM step on every step."""
    model = make_model()
    opt = fastsam.LookSAM(model.parameters(), torch.optim.SGD, k=5, lr=0.0)  # lr 0: steps move nothing
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for form in ("skip", "both"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)  # e.g. an EMA swap or a manual edit between steps
        edited = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x), y).backward()
        if form == "both":
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), edited)), form


def test_non_finite_sam_step_makes_cheap_steps_plain():
    """After a SAM step whose gradient overflowed, the cheap steps take the plain gradient."""
    data = batches(5)
    models = {}
    for name, make in (("looksam", lambda ps: fastsam.LookSAM(ps, torch.optim.SGD, k=5, alpha=0.7, lr=0.1)),
                       ("interval", lambda ps: fastsam.SAM(ps, torch.optim.SGD, every=5, lr=0.1))):
        model = make_model()
        opt = make(model.parameters())
        for i, (x, y) in enumerate(data):
            F.cross_entropy(model(x), y).backward()
            if opt.needs_second_pass:
                model.fc1.bias.grad[3] = float("nan")
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        models[name] = model
        if name == "looksam":
            assert not torch.isfinite(opt._gv_sq_norm)
    assert_models_equal(models["looksam"], models["interval"])
    assert all(torch.isfinite(p).all() for p in models["looksam"].parameters())


def test_deepcopy_mid_cycle_and_between_passes():
    data = batches(7)
    model = make_model()
    opt = fastsam.LookSAM(model.parameters(), torch.optim.SGD, k=3, alpha=0.7, lr=0.1, momentum=0.9)
    x, y = data[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    twin = copy.deepcopy((model, opt))  # between the passes of a SAM step: g is in the buffers
    pairs = [(model, opt), twin]
    for m, o in pairs:
        F.cross_entropy(m(x), y).backward()
        o.second_step(zero_grad=True)
    for x, y in data[1:]:
        for m, o in pairs:
            F.cross_entropy(m(x), y).backward()
            if o.needs_second_pass:
                o.first_step(zero_grad=True)
                F.cross_entropy(m(x), y).backward()
            o.second_step(zero_grad=True)
    assert_models_equal(model, twin[0])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=0), ValueError, "k must"), (dict(k=-2), ValueError, "k must"), (dict(k=2.0), ValueError, "k must"),
    (dict(k=True), ValueError, "k must"), (dict(alpha=-0.5), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"), (dict(rho=-1.0), ValueError, "rho"),
    (dict(every=2), TypeError, "not every"),
])
def test_bad_hyper_parameters_are_rejected(kwargs, error, match):
    model = make_model()
    with pytest.raises(error, match=match):
        fastsam.LookSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_values_set_between_steps_change_nothing():
    model = make_model()
    opt = fastsam.LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="k must"):
        opt.k = 0
    assert opt.k == 2 and opt.every == 2
    for _ in range(2):  # a SAM step, then a cheap step, each refused once
        snap = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict())
        F.cross_entropy(model(x), y).backward()
        opt.alpha = float("nan")
        with pytest.raises(ValueError, match="alpha"):
            opt.first_step() if opt.needs_second_pass else opt.second_step()
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snap))
        assert opt.state_dict()["fastsam"]["step"] == state["fastsam"]["step"]
        opt.alpha = 0.7
        if opt.needs_second_pass:
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def test_load_state_dict_checks_g_v_before_loading():
    model = make_model()
    opt = fastsam.LookSAM(model.parameters(), torch.optim.SGD, k=3, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    sd = opt.state_dict()
    other_model = make_model(seed=5)
    other = fastsam.LookSAM(other_model.parameters(), torch.optim.SGD, k=3, lr=0.1, momentum=0.9)
    bad = copy.deepcopy(sd)
    bad["fastsam"]["looksam_gv"][0] = torch.zeros(3)
    with pytest.raises(ValueError, match="g_v"):
        other.load_state_dict(bad)
    assert other._step_state.step_count == 0 and not other.state and other._gv_sq_norm is None
    other.load_state_dict(sd)
    assert other._step_state.step_count == 1
    assert all(torch.equal(other._gv[q], opt._gv[p]) for p, q in zip(model.parameters(), other_model.parameters()))
    assert all(other._gv[q].data_ptr() != sd["fastsam"]["looksam_gv"][i].data_ptr()
               for i, q in enumerate(other_model.parameters())), "loaded g_v must be the optimizer's own copy"


def test_rmsprop_alpha_warning():
    model = make_model()
    with pytest.warns(UserWarning, match="LookSAM's alpha= is its own"):
        fastsam.LookSAM(model.parameters(), torch.optim.RMSprop, lr=1e-3)
