"""WSAM: fp64 reference from the paper, pytorch-optimizer 4.1's WSAM, resume, backends, errors, faults."""


import pytest
import torch

import fastsam
from helpers import backends_for, two_call_step_ops
from sam_family_reference import (assert_raising_closure_restores_the_weights, host_syncs_in_two_call_steps,
                                  assert_models_close, assert_models_equal, batches, loss_of, make_mlp,
                                  reference_wsam, run, sam_step)

SGD = (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3))
ADAMW = (torch.optim.AdamW, dict(lr=3e-3, weight_decay=1e-2))
BACKENDS = backends_for("grad_mix", "cpu", torch.float32)


# Every configuration on the torch backend; the kernel backends (Triton under the interpreter on CPU:
# slow) on one configuration that uses every op.
CONFIGS = [("torch", True, None, False, "sgd"), ("torch", False, None, False, "sgd"),
           ("torch", True, 0.5, False, "adamw"), ("torch", False, 0.5, True, "adamw")]
CONFIGS += [(b, True, 0.5, False, "sgd") for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("backend,decouple,max_norm,adaptive,base", CONFIGS)
def test_wsam_matches_fp64_reference_and_resumes_exactly(backend, decouple, max_norm, adaptive, base):
    base_cls, kw = {"sgd": SGD, "adamw": ADAMW}[base]
    model, data = make_mlp(), batches(30 if backend == "torch" else 10)  # the interpreter is slow: fewer steps
    options = dict(rho=0.1, gamma=0.8, decouple=decouple, max_norm=max_norm, adaptive=adaptive)

    def opt_fn(m):
        return fastsam.WSAM(m.parameters(), base_cls, backend=backend, **options, **kw)

    reference = reference_wsam(model, data, base_cls, kw, **options)
    straight, _ = run(model, opt_fn, data)
    resumed, _ = run(model, opt_fn, data, resume_at=13 if backend == "torch" else 6)
    assert_models_close(straight, reference)
    assert_models_equal(resumed, straight)
    if backend == "torch":
        sam, _ = run(model, lambda m: fastsam.SAM(m.parameters(), base_cls, rho=0.1, adaptive=adaptive, **kw), data)
        assert not torch.allclose(sam[0].weight, straight[0].weight, rtol=1e-3, atol=1e-4), "WSAM must differ"


@pytest.mark.parametrize("decouple,max_norm", [(True, None), (False, None), (True, 0.3), (False, 0.3)])
def test_wsam_matches_pytorch_optimizer(decouple, max_norm):
    from pytorch_optimizer import WSAM as PeerWSAM

    base_cls, kw = ADAMW
    model, data = make_mlp(), batches(20)
    mine, peer = make_mlp(), make_mlp()
    opt = fastsam.WSAM(mine.parameters(), base_cls, rho=0.05, gamma=0.9, decouple=decouple, max_norm=max_norm, **kw)
    ref = PeerWSAM(peer, peer.parameters(), base_cls, rho=0.05, gamma=0.9, decouple=decouple, max_norm=max_norm,
                   **kw)
    for x, y in data:
        sam_step(mine, opt, x, y)
        loss_of(peer, x, y).backward()
        ref.first_step(zero_grad=True)
        loss_of(peer, x, y).backward()
        ref.second_step(zero_grad=True)
    # The peer restores by subtracting e (fastsam copies the backup back): a rounding apart per step.
    assert_models_close(mine, peer, rtol=2e-5, atol=2e-6)
    assert model is not None


def test_wsam_gamma_half_not_decoupled_is_sam():
    base_cls, kw = SGD
    model, data = make_mlp(), batches(10)
    wsam, _ = run(model, lambda m: fastsam.WSAM(m.parameters(), base_cls, gamma=0.5, decouple=False, **kw), data)
    sam, _ = run(model, lambda m: fastsam.SAM(m.parameters(), base_cls, **kw), data)
    assert_models_close(wsam, sam, rtol=1e-6, atol=1e-7)


def test_wsam_tensor_lr_and_lr_scheduler():
    base_cls, kw = SGD
    model = make_mlp()
    opt = fastsam.WSAM(model.parameters(), base_cls, **dict(kw, lr=torch.tensor(0.1)))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches(5):
        sam_step(model, opt, x, y)
        sched.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=1.0), "gamma"), (dict(gamma=-0.1), "gamma"), (dict(gamma=True), "gamma"),
    (dict(max_norm=0.0), "max_norm"), (dict(max_norm=float("inf")), "max_norm"), (dict(rho=-1.0), "rho"),
])
def test_wsam_rejects_bad_arguments(kwargs, match):
    model = make_mlp()
    with pytest.raises(ValueError, match=match):
        fastsam.WSAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_wsam_bad_gamma_between_steps_changes_nothing():
    model = make_mlp()
    opt = fastsam.WSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.gamma = 1.5
    with pytest.raises(ValueError, match="gamma"):
        opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.gamma = 0.9
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.gamma = 1.0
    with pytest.raises(ValueError, match="gamma"):
        opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "weights restored on the error"
    assert opt._perturbed is None


def test_wsam_closure_raising_restores_the_weights():
    model = make_mlp()
    assert_raising_closure_restores_the_weights(model, fastsam.WSAM(model.parameters(), torch.optim.SGD, lr=0.1))


def test_wsam_non_finite_first_gradient_leaves_the_weights_finite():
    model = make_mlp()
    opt = fastsam.WSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    assert bool(opt.perturbation_skipped)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)  # plain SGD with the inf first gradient would poison the weights...
    # ...the decoupled sharpness term (g_p - g, not finite) is skipped on the device.
    assert torch.isfinite(model[2].weight).all()


def test_wsam_no_host_sync_in_a_step():
    model = make_mlp()
    for decouple, max_norm in ((True, 1.0), (False, None)):
        opt = fastsam.WSAM(model.parameters(), torch.optim.AdamW, lr=1e-3, decouple=decouple, max_norm=max_norm)
        assert host_syncs_in_two_call_steps(model, opt, steps=2) == []


def _count_ops(opt_cls, n_tensors, **kw):
    return two_call_step_ops(lambda params: opt_cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, **kw), n_tensors)


@pytest.mark.parametrize("kw", [dict(decouple=True, max_norm=1.0), dict(decouple=False)])
def test_wsam_dispatched_ops_do_not_grow_with_the_number_of_tensors(kw):
    assert _count_ops(fastsam.WSAM, 6, **kw) == _count_ops(fastsam.WSAM, 150, **kw)


def test_wsam_with_grad_scaler_matches_unscaled_run():
    """GradScaler (CPU, enabled): the scaled mix and the unscaled decoupled term equal a run without AMP."""
    model, data = make_mlp(), batches(6)
    plain, _ = run(model, lambda m: fastsam.WSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), data)
    scaled = make_mlp()
    opt = fastsam.WSAM(scaled.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    for x, y in data:
        scaler.scale(loss_of(scaled, x, y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(loss_of(scaled, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert_models_close(scaled, plain, rtol=1e-5, atol=1e-6)


def test_wsam_and_friendly_sam_deepcopy_continue_identically():
    import copy

    for cls, kw in ((fastsam.WSAM, dict(gamma=0.8, max_norm=1.0)), (fastsam.FriendlySAM, dict(sigma=0.5))):
        model = make_mlp()
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
        data = batches(6)
        for x, y in data[:3]:
            sam_step(model, opt, x, y)
        model2, opt2 = copy.deepcopy((model, opt))
        for x, y in data[3:]:
            sam_step(model, opt, x, y)
            sam_step(model2, opt2, x, y)
        assert_models_equal(model2, model)
