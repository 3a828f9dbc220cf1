"""AE-SAM and RST (RandomSwitchSAM): fp64 references from the papers over 30 steps, loop forms,
resume, host syncs (AE-SAM: exactly one per step; RST: none), ops per step, bad input, faults."""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam
from helpers import host_sync_watch, two_call_step_ops
from test_sam import ADAMW_KW, SGD_KW, assert_models_equal, batches, make_model, param_groups
from variant_reference import ReferenceVariant

STEPS = 30
GROUPS = [dict(rho=0.05), dict(rho=0.1)]
BASES = {"sgd": (torch.optim.SGD, SGD_KW), "adamw": (torch.optim.AdamW, ADAMW_KW)}


def groups_fn(model):
    return param_groups(model, GROUPS)


# ------------------------------------------------------------------------------------------------
# References written from the papers (plain per-parameter loops, stock base optimizer).

class ReferenceAESAM(ReferenceVariant):
    """Jiang et al. 2023, Algorithm 1: EMA of mean/variance of ||g||^2, SAM iff ||g||^2 >= mu + c_t sigma."""

    def __init__(self, groups, base_cls, kw, total, delta=0.9, lam1=-1.0, lam2=1.0):
        super().__init__(groups, base_cls, kw, "sam")
        self.total, self.delta, self.lam1, self.lam2 = total, delta, lam1, lam2
        self.mu, self.var = 0.0, 1e-10
        self.pattern = []

    def decide(self):
        sq = sum(float((p.grad.double() ** 2).sum()) for p in self.params())
        self.mu = self.delta * self.mu + (1 - self.delta) * sq
        self.var = self.delta * self.var + (1 - self.delta) * (sq - self.mu) ** 2
        c = self.lam1 + (self.lam2 - self.lam1) * min(self.t / self.total, 1.0)
        return sq >= self.mu + c * math.sqrt(self.var)

    def step(self, model, x, y, clip=None):
        F.cross_entropy(model(x), y).backward()
        sam = self.decide()
        self.pattern.append(sam)
        if sam:
            self._sam_step(model, x, y, clip)
        self.base.step()
        self.base.zero_grad()
        self.t += 1


class ReferenceRST(ReferenceVariant):
    """Zhao et al. 2022: a Bernoulli(p_t) trial per step; the uniforms are given (the same stream as fastsam's)."""

    def __init__(self, groups, base_cls, kw, uniforms, p):
        super().__init__(groups, base_cls, kw, "sam")
        self.uniforms, self.p = uniforms, p
        self.pattern = []

    def step(self, model, x, y, clip=None):
        F.cross_entropy(model(x), y).backward()
        sam = self.uniforms[self.t] < self.p(self.t)
        self.pattern.append(sam)
        if sam:
            self._sam_step(model, x, y, clip)
        self.base.step()
        self.base.zero_grad()
        self.t += 1


def splitmix64(x):
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def rst_uniforms(seed, n):
    return [splitmix64((seed + t * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)) / 2.0 ** 64 for t in range(n)]


def run64(opt_fn, data, resume_at=None, form="skip"):
    """fastsam in fp64, one of the loop forms, optionally saved/rebuilt/loaded at ``resume_at``."""
    model = make_model().double()
    opt = opt_fn(groups_fn(model))
    pattern = []
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = make_model(seed=5).double()
            model.load_state_dict(ckpt["model"])
            opt = opt_fn(groups_fn(model))
            opt.load_state_dict(ckpt["opt"])
        x = x.double()
        F.cross_entropy(model(x), y).backward()
        if form == "closure":
            def closure():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            pattern.append(opt.needs_second_pass)
            opt.step(closure)
            opt.zero_grad()
            continue
        sam = opt.needs_second_pass
        pattern.append(sam)
        if sam or form == "both":
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return model, opt, pattern


def ref64(ref_fn, data):
    model = make_model().double()
    ref = ref_fn(groups_fn(model))
    for x, y in data:
        ref.step(model, x.double(), y)
    return model, ref


def assert_close64(a, b):
    """fp64 models; SAM's perturbation scale comes from fastsam's fp32 norm (the grad_norm contract): ~1e-7."""
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------
# AE-SAM

@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_aesam_matches_fp64_reference_and_resumes_exactly(base):
    base_cls, kw = BASES[base]
    data = batches(STEPS)

    def opt_fn(groups):
        return fastsam.AESAM(groups, base_cls, total_steps=STEPS, **kw)

    ref_model, ref = ref64(lambda g: ReferenceAESAM(g, base_cls, kw, STEPS), data)
    model, opt, pattern = run64(opt_fn, data)
    assert pattern == ref.pattern
    assert 0 < sum(pattern) < STEPS  # both kinds of step occur
    assert_close64(model, ref_model)
    assert opt.sam_steps == sum(pattern)
    resumed, ropt, rpattern = run64(opt_fn, data, resume_at=13)
    assert rpattern == pattern
    assert_models_equal(resumed, model)
    extra = opt.state_dict()["fastsam"]
    assert extra["step"] == STEPS and extra["aesam_mu"] == pytest.approx(ref.mu) and \
        extra["aesam_var"] == pytest.approx(ref.var)


def test_aesam_loop_forms_agree_bit_for_bit():
    data = batches(16)

    def opt_fn(groups):
        return fastsam.AESAM(groups, torch.optim.SGD, total_steps=16, **SGD_KW)

    assert_loop_forms_agree(opt_fn, data)


def assert_loop_forms_agree(opt_fn, data):
    """The skip / both-passes / closure loops (see ``run64``) make the same choices and the same weights."""
    skip, _, p1 = run64(opt_fn, data, form="skip")
    both, _, p2 = run64(opt_fn, data, form="both")
    closure, _, p3 = run64(opt_fn, data, form="closure")
    assert p1 == p2 == p3
    assert_models_equal(both, skip)
    assert_models_equal(closure, skip)


def assert_is_sam_or_the_base_optimizer(model, pattern, data, expect):
    """A switching run whose every step was SAM (``expect="sam"``) or none was equals SAM or plain SGD."""
    if expect == "sam":
        other, _, _ = run64(lambda g: fastsam.SAM(g, torch.optim.SGD, **SGD_KW), data)
        assert all(pattern)
    else:
        other = make_model().double()
        sgd = torch.optim.SGD(groups_fn(other), **SGD_KW)
        for x, y in data:
            F.cross_entropy(other(x.double()), y).backward()
            sgd.step()
            sgd.zero_grad()
        assert not any(pattern)
    assert_close64(model, other)


@pytest.mark.parametrize("lam,expect", [(-1e9, "sam"), (1e9, "base")])
def test_aesam_extreme_thresholds_are_sam_or_the_base_optimizer(lam, expect):
    data = batches(8)
    model, _, pattern = run64(lambda g: fastsam.AESAM(g, torch.optim.SGD, total_steps=8, lambda1=lam, lambda2=lam,
                                                      **SGD_KW), data)
    assert_is_sam_or_the_base_optimizer(model, pattern, data, expect)


def test_aesam_makes_exactly_one_host_sync_per_step():
    model = make_model()
    opt = fastsam.AESAM(model.parameters(), torch.optim.SGD, total_steps=10, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    watch = host_sync_watch()
    for _ in range(6):
        F.cross_entropy(model(x), y).backward()
        with watch:
            sam = opt.needs_second_pass
            assert opt.needs_second_pass == sam  # cached: asking again syncs no more
            if sam:
                opt.first_step(zero_grad=True)
        if sam:
            F.cross_entropy(model(x), y).backward()
        with watch:
            opt.second_step(zero_grad=True)
    assert len(watch.seen) == 6 and set(watch.seen) == {"aten._local_scalar_dense.default"}


def test_aesam_needs_gradients_to_decide_and_rejects_bad_input():
    p = nn.Parameter(torch.ones(3))
    opt = fastsam.AESAM([p], torch.optim.SGD, total_steps=5, lr=0.1)
    with pytest.raises(RuntimeError, match="after the first backward"):
        opt.needs_second_pass
    for bad in (dict(total_steps=0), dict(total_steps=2.5), dict(total_steps=5, delta=1.0),
                dict(total_steps=5, delta=-0.1), dict(total_steps=5, lambda1=float("nan")),
                dict(total_steps=5, every=2), dict(total_steps=5, rho=-1.0)):
        with pytest.raises(ValueError):
            fastsam.AESAM([p], torch.optim.SGD, lr=0.1, **bad)
    with pytest.raises(TypeError):
        fastsam.AESAM([p], torch.optim.SGD, lr=0.1)  # total_steps is required


def test_aesam_non_finite_norm_is_a_plain_step_and_keeps_the_statistics():
    p = nn.Parameter(torch.ones(3))
    opt = fastsam.AESAM([p], torch.optim.SGD, total_steps=5, lr=0.1)
    p.grad = torch.ones(3)
    opt.needs_second_pass
    opt.first_step(zero_grad=True) if opt.needs_second_pass else None
    p.grad = torch.ones(3)
    opt.second_step(zero_grad=True)
    mu, var = opt.state_dict()["fastsam"]["aesam_mu"], opt.state_dict()["fastsam"]["aesam_var"]
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert opt.needs_second_pass is False
    sd = opt.state_dict()["fastsam"]
    assert (sd["aesam_mu"], sd["aesam_var"]) == (mu, var)


# ------------------------------------------------------------------------------------------------
# RST

@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_rst_matches_fp64_reference_and_resumes_exactly(base, schedule):
    base_cls, kw = BASES[base]
    data = batches(STEPS)
    sched = dict(probability=0.5) if schedule == "constant" else dict(probability=0.1, final_probability=0.9,
                                                                         total_steps=STEPS)

    def p_t(t):
        return 0.5 if schedule == "constant" else 0.1 + 0.8 * min(t / STEPS, 1.0)

    def opt_fn(groups):
        return fastsam.RandomSwitchSAM(groups, base_cls, seed=1234, **sched, **kw)

    ref_model, ref = ref64(lambda g: ReferenceRST(g, base_cls, kw, rst_uniforms(1234, STEPS), p_t), data)
    model, opt, pattern = run64(opt_fn, data)
    assert pattern == ref.pattern and 0 < sum(pattern) < STEPS
    assert_close64(model, ref_model)
    resumed, _, rpattern = run64(opt_fn, data, resume_at=11)
    assert rpattern == pattern
    assert_models_equal(resumed, model)
    assert opt.state_dict()["fastsam"]["rst_seed"] == 1234


def test_rst_loop_forms_agree_and_no_host_sync():
    data = batches(12)

    def opt_fn(groups):
        return fastsam.RandomSwitchSAM(groups, torch.optim.SGD, seed=7, **SGD_KW)

    assert_loop_forms_agree(opt_fn, data)
    model = make_model()
    opt = fastsam.RandomSwitchSAM(model.parameters(), torch.optim.SGD, seed=3, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    watch = host_sync_watch()
    for _ in range(6):
        F.cross_entropy(model(x), y).backward()
        with watch:
            sam = opt.needs_second_pass
            if sam:
                opt.first_step(zero_grad=True)
        if sam:
            F.cross_entropy(model(x), y).backward()
        with watch:
            opt.second_step(zero_grad=True)
    assert watch.seen == []


def test_rst_draws_are_seeded_uniform_and_follow_the_probability():
    opt = fastsam.RandomSwitchSAM([nn.Parameter(torch.zeros(1))], torch.optim.SGD, probability=0.3, seed=99, lr=0.1)
    draws = [opt.draw(t) for t in range(4000)]
    assert draws == rst_uniforms(99, 4000)
    assert all(0 <= u < 1 for u in draws)
    frac = sum(opt.is_sam_step(t) for t in range(4000)) / 4000
    assert abs(frac - 0.3) < 0.03
    torch.manual_seed(0)
    a = fastsam.RandomSwitchSAM([nn.Parameter(torch.zeros(1))], torch.optim.SGD, lr=0.1)
    torch.manual_seed(0)
    b = fastsam.RandomSwitchSAM([nn.Parameter(torch.zeros(1))], torch.optim.SGD, lr=0.1)
    assert a.seed == b.seed
    ends = fastsam.RandomSwitchSAM([nn.Parameter(torch.zeros(1))], torch.optim.SGD, probability=0.0,
                                   final_probability=1.0, total_steps=10, seed=1, lr=0.1)
    assert [ends.probability_at(t) for t in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert not ends.is_sam_step(0) and ends.is_sam_step(10)


@pytest.mark.parametrize("p,expect", [(1.0, "sam"), (0.0, "base")])
def test_rst_extreme_probabilities_are_sam_or_the_base_optimizer(p, expect):
    data = batches(6)
    model, _, pattern = run64(lambda g: fastsam.RandomSwitchSAM(g, torch.optim.SGD, probability=p, seed=0, **SGD_KW),
                              data)
    assert_is_sam_or_the_base_optimizer(model, pattern, data, expect)


def test_rst_rejects_bad_input():
    p = [nn.Parameter(torch.zeros(2))]
    for bad in (dict(probability=1.5), dict(probability=-0.1), dict(probability=float("nan")),
                dict(final_probability=0.5), dict(final_probability=0.5, total_steps=0),
                dict(total_steps=10), dict(seed=1.5), dict(every=3), dict(rho=-0.5)):
        with pytest.raises(ValueError):
            fastsam.RandomSwitchSAM(p, torch.optim.SGD, lr=0.1, **bad)


# ------------------------------------------------------------------------------------------------
# Both: faults, ops per step, pickling

def _make(kind, params, **kw):
    if kind == "aesam":
        return fastsam.AESAM(params, torch.optim.SGD, total_steps=10, lambda1=-1e9, lambda2=-1e9, lr=0.1,
                             momentum=0.9, **kw)
    return fastsam.RandomSwitchSAM(params, torch.optim.SGD, probability=1.0, seed=0, lr=0.1, momentum=0.9, **kw)


@pytest.mark.parametrize("kind", ["aesam", "rst"])
def test_closure_raising_on_a_sam_step_restores_the_weights(kind):
    model = make_model()
    opt = _make(kind, model.parameters())
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        F.cross_entropy(model(x), y).backward()
        raise OSError("out of memory in the second pass")

    with pytest.raises(OSError):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # Two-call form: an exception between the passes, then restore() by the caller.
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kind", ["aesam", "rst"])
def test_constant_number_of_ops_whatever_the_number_of_tensors(kind):
    def is_a_sam_step(opt):
        assert opt.needs_second_pass

    def count(n):
        first, second = two_call_step_ops(lambda params: _make(kind, params), n, before_first=is_a_sam_step)
        return first + second

    small, large = count(8), count(200)
    assert small == large and sum(small.values()) < 50


@pytest.mark.parametrize("kind", ["aesam", "rst"])
def test_deepcopy_keeps_the_schedule_state(kind):
    model = make_model()
    opt = _make(kind, model.parameters())
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["fastsam"] == opt.state_dict()["fastsam"]
    assert type(clone).__name__ in repr(clone)
