"""FriendlySAM: fp64 reference from the paper, pytorch-optimizer 4.1's FriendlySAM, EMA state, errors."""

import pytest
import torch

import fastsam
from helpers import backends_for
from sam_family_reference import (assert_raising_closure_restores_the_weights, host_syncs_in_two_call_steps,
                                  assert_models_close, assert_models_equal, batches, loss_of, make_mlp,
                                  reference_friendly_sam, run, sam_step)
from test_wsam import _count_ops

SGD = (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3))
ADAMW = (torch.optim.AdamW, dict(lr=3e-3, weight_decay=1e-2))
BACKENDS = backends_for("ema_direction", "cpu", torch.float32)
CONFIGS = [("torch", 1.0, 0.9, False, "sgd"), ("torch", 0.5, 0.6, True, "adamw")]
CONFIGS += [(b, 1.0, 0.9, False, "sgd") for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("backend,sigma,lmbda,adaptive,base", CONFIGS)
def test_friendly_sam_matches_fp64_reference_and_resumes_exactly(backend, sigma, lmbda, adaptive, base):
    base_cls, kw = {"sgd": SGD, "adamw": ADAMW}[base]
    model, data = make_mlp(), batches(30 if backend == "torch" else 10)  # the interpreter is slow: fewer steps
    options = dict(rho=0.1, sigma=sigma, lmbda=lmbda, adaptive=adaptive)

    def opt_fn(m):
        return fastsam.FriendlySAM(m.parameters(), base_cls, backend=backend, **options, **kw)

    reference = reference_friendly_sam(model, data, base_cls, kw, **options)
    straight, opt = run(model, opt_fn, data)
    resumed, _ = run(model, opt_fn, data, resume_at=13 if backend == "torch" else 6)
    assert_models_close(straight, reference)
    assert_models_equal(resumed, straight)
    assert len(opt.momentum) == len(list(straight.parameters()))
    if backend == "torch":
        sam, _ = run(model, lambda m: fastsam.SAM(m.parameters(), base_cls, rho=0.1, adaptive=adaptive, **kw), data)
        assert not torch.allclose(sam[0].weight, straight[0].weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sigma,lmbda", [(1.0, 0.9), (0.7, 0.3)])
def test_friendly_sam_matches_pytorch_optimizer(sigma, lmbda):
    from pytorch_optimizer import FriendlySAM as PeerFriendlySAM

    base_cls, kw = ADAMW
    mine, peer = make_mlp(), make_mlp()
    opt = fastsam.FriendlySAM(mine.parameters(), base_cls, rho=0.05, sigma=sigma, lmbda=lmbda, **kw)
    ref = PeerFriendlySAM(peer.parameters(), base_cls, rho=0.05, sigma=sigma, lmbda=lmbda, **kw)
    for x, y in batches(20):
        sam_step(mine, opt, x, y)
        loss_of(peer, x, y).backward()
        ref.first_step(zero_grad=True)
        loss_of(peer, x, y).backward()
        ref.second_step(zero_grad=True)
    assert_models_close(mine, peer, rtol=2e-5, atol=2e-6)
    for p, q in zip(mine.parameters(), peer.parameters()):
        torch.testing.assert_close(opt.momentum[p], ref.state[q]["momentum"], rtol=2e-5, atol=2e-6)


def test_friendly_sam_sigma_zero_is_sam():
    base_cls, kw = SGD
    model, data = make_mlp(), batches(8)
    friendly, _ = run(model, lambda m: fastsam.FriendlySAM(m.parameters(), base_cls, sigma=0.0, **kw), data)
    sam, _ = run(model, lambda m: fastsam.SAM(m.parameters(), base_cls, **kw), data)
    assert_models_close(friendly, sam, rtol=1e-6, atol=1e-7)


def test_friendly_sam_state_dict_holds_the_ema():
    model = make_mlp()
    opt = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for x, y in batches(3):
        sam_step(model, opt, x, y)
    sd = opt.state_dict()
    saved = sd["fastsam"]["momentum"]
    assert sorted(saved) == list(range(len(list(model.parameters()))))
    for i, p in enumerate(model.parameters()):
        assert torch.equal(saved[i], opt.momentum[p])
    fresh = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    fresh.load_state_dict(sd)
    for p in model.parameters():
        assert torch.equal(fresh.momentum[p], opt.momentum[p]) and fresh.momentum[p] is not opt.momentum[p]
    bad = dict(sd, fastsam=dict(sd["fastsam"], momentum={0: torch.zeros(3)}))
    with pytest.raises(ValueError, match="momentum entry 0"):
        fresh.load_state_dict(bad)


@pytest.mark.parametrize("kwargs,match", [(dict(sigma=-1.0), "sigma"), (dict(lmbda=1.5), "lmbda"),
                                          (dict(lmbda=-0.1), "lmbda"), (dict(rho=-1.0), "rho")])
def test_friendly_sam_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastsam.FriendlySAM(make_mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_friendly_sam_non_finite_gradient_never_enters_the_ema():
    model = make_mlp()
    opt = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    sam_step(model, opt, x, y)
    kept = {p: m.clone() for p, m in opt.momentum.items()}
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    model[0].weight.grad[1, 2] = float("nan")
    opt.first_step(zero_grad=True)
    assert bool(opt.perturbation_skipped)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "nothing perturbed"
    assert all(torch.equal(opt.momentum[p], kept[p]) for p in kept), "the EMA is untouched"
    opt.restore()


def test_friendly_sam_faults_restore_the_weights():
    model = make_mlp()
    opt = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = assert_raising_closure_restores_the_weights(model, opt)
    opt.sigma = -1.0
    with pytest.raises(ValueError, match="sigma"):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_friendly_sam_no_host_sync_in_a_step():
    model = make_mlp()
    assert host_syncs_in_two_call_steps(model, fastsam.FriendlySAM(model.parameters(), torch.optim.AdamW, lr=1e-3)) == []


def test_friendly_sam_dispatched_ops_do_not_grow_with_the_number_of_tensors():
    assert _count_ops(fastsam.FriendlySAM, 6) == _count_ops(fastsam.FriendlySAM, 150)


def test_friendly_sam_with_grad_scaler_matches_unscaled_run():
    """first_step(grad_scaler=...) unscales g before it enters the EMA: same run as without AMP."""
    model, data = make_mlp(), batches(6)
    plain, popt = run(model, lambda m: fastsam.FriendlySAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9),
                      data)
    scaled = make_mlp()
    opt = fastsam.FriendlySAM(scaled.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)  # the scale changes mid-run
    for x, y in data:
        scaler.scale(loss_of(scaled, x, y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_of(scaled, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() != 1024.0
    assert_models_close(scaled, plain, rtol=1e-5, atol=1e-6)
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(opt.momentum[p], popt.momentum[q], rtol=1e-5, atol=1e-6)


def test_friendly_sam_non_finite_first_gradient_starts_the_ema_at_zero():
    model = make_mlp()
    opt = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    assert bool(opt.perturbation_skipped)
    assert all(torch.equal(m, torch.zeros_like(m)) for m in opt.momentum.values())
    opt.restore()
    loss_of(model, x, y).backward()
    g = {p: p.grad.clone() for p in model.parameters()}
    opt.first_step(zero_grad=True)
    for p, m in opt.momentum.items():
        torch.testing.assert_close(m, 0.1 * g[p])  # (1 - lmbda) g into a zero EMA
