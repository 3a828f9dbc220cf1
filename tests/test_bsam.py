"""BSAM: the authors' algorithm (fp64 reference from their JAX code), resume with the noise
generator, the three-call form, errors, faults; and pytorch-optimizer 4.1's BSAM for contrast."""

import copy
import io

import pytest
import torch
import torch.nn as nn

import fastsam
from helpers import host_sync_watch, op_counter
from sam_family_reference import assert_models_close, assert_models_equal, batches, loss_of, make_mlp, reference_bsam

HP = dict(lr=0.05, betas=(0.9, 0.999), weight_decay=1e-3, rho=0.05, damping=0.1)
NUM_DATA = 1000


def run_bsam(model, data, resume_at=None, dtype=None, **kw):
    model = copy.deepcopy(model)
    opt = fastsam.BSAM(model.parameters(), NUM_DATA, seed=7, **dict(HP, **kw))
    losses = []
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = copy.deepcopy(model)
            model.load_state_dict(ckpt["model"])
            opt = fastsam.BSAM(model.parameters(), NUM_DATA, seed=123, **dict(HP, **kw))
            opt.load_state_dict(ckpt["opt"])

        def closure():
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
    return model, opt, losses


def test_bsam_matches_the_authors_algorithm_and_resumes_exactly():
    model, data = make_mlp(), batches()
    mine, opt, _ = run_bsam(model, data)
    state = fastsam.BSAM(copy.deepcopy(model).parameters(), NUM_DATA, seed=7).state_dict()["fastsam"]["generators"]
    reference, _ = reference_bsam(model, data, state["cpu"], NUM_DATA, **HP)
    assert_models_close(mine, reference, rtol=1e-4, atol=1e-5)
    resumed, _, _ = run_bsam(model, data, resume_at=13)
    assert_models_equal(resumed, mine)
    for p in mine.parameters():
        assert (opt.state[p]["precision"] > 0).all() and "momentum" in opt.state[p]


def test_bsam_three_call_form_equals_step():
    model, data = make_mlp(), batches(5)
    stepped, _, _ = run_bsam(model, data)
    manual = copy.deepcopy(model)
    opt = fastsam.BSAM(manual.parameters(), NUM_DATA, seed=7, **HP)
    for x, y in data:
        opt.first_step(zero_grad=True)
        loss_of(manual, x, y).backward()
        opt.second_step(zero_grad=True)
        loss_of(manual, x, y).backward()
        opt.third_step(zero_grad=True)
    assert_models_equal(manual, stepped)


def test_bsam_trains_where_pytorch_optimizers_bsam_does_not():
    """Same MLP, data and hyper-parameters: the authors' algorithm lowers the loss, pytorch-optimizer's
    BSAM (noise and ascent never removed, see the module docstring) raises it."""
    from pytorch_optimizer import BSAM as PeerBSAM

    model, data = make_mlp(), batches(40)
    hp = dict(lr=0.05, weight_decay=1e-4, rho=0.05, damping=0.1)
    x_eval, y_eval = batches(1, seed=99)[0]
    start = loss_of(model, x_eval, y_eval).item()
    mine, _, _ = run_bsam(model, data, **hp)
    peer = copy.deepcopy(model)
    torch.manual_seed(0)
    popt = PeerBSAM(peer.parameters(), NUM_DATA, foreach=False, **hp)  # its foreach path fails in 4.1
    loss_of(peer, *data[0]).backward()  # its first_step initialises state only for parameters with a .grad
    for x, y in data:
        def closure():
            popt.zero_grad()
            loss = loss_of(peer, x, y)
            loss.backward()
            return loss
        popt.step(closure)
    with torch.no_grad():
        ours, theirs = loss_of(mine, x_eval, y_eval).item(), loss_of(peer, x_eval, y_eval).item()
    assert ours < start, (start, ours)
    assert theirs > start, (start, theirs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_data=0), "num_data"), (dict(num_data=2.5), "num_data"), (dict(lr=-1.0), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(weight_decay=-1.0), "weight_decay"), (dict(rho=float("nan")), "rho"),
    (dict(damping=-0.1), "damping"), (dict(s_init=0.0), "s_init"),
])
def test_bsam_rejects_bad_arguments(kwargs, match):
    args = {"num_data": NUM_DATA, **kwargs}
    num_data = args.pop("num_data")
    with pytest.raises(ValueError, match=match):
        fastsam.BSAM(make_mlp().parameters(), num_data, **args)


def test_bsam_call_order_errors_and_faults_restore_the_weights():
    model = make_mlp()
    opt = fastsam.BSAM(model.parameters(), NUM_DATA, **HP)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="second_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="third_step"):
        opt.third_step()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    calls = []

    def closure():
        calls.append(1)
        loss_of(model, x, y).backward()
        if len(calls) == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "clean weights back"
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="middle"):
        opt.load_state_dict(opt.state_dict())
    assert opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bsam_no_host_sync_and_launching_ops_independent_of_tensor_count():
    watch = host_sync_watch()
    model = make_mlp()
    opt = fastsam.BSAM(model.parameters(), NUM_DATA, **HP)
    x, y = batches(1)[0]
    for _ in range(2):
        with watch:
            opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        with watch:
            opt.second_step(zero_grad=True)
        loss_of(model, x, y).backward()
        with watch:
            opt.third_step(zero_grad=True)
    assert watch.seen == []

    def count(n):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(n)]
        o = fastsam.BSAM(params, NUM_DATA, **HP)

        def fill():
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)

        for _ in range(2):
            o.first_step()
            fill()
            o.second_step()
            fill()
            o.third_step()
        with op_counter(skip_views=True) as c:  # views launch no kernels (the noise's per-tensor views)
            o.first_step()
            fill()
            o.second_step()
            fill()
            o.third_step()
        for _ in range(2 * n):  # the fills ran inside the mode too: one randn per tensor each
            c.ops["aten.randn.generator"] -= 1
        return c.ops

    assert count(6) == count(120)


def test_bsam_low_precision_runs():
    model = make_mlp().to(torch.bfloat16)
    opt = fastsam.BSAM(model.parameters(), NUM_DATA, **HP)
    x, y = batches(1)[0]

    def closure():
        loss = loss_of(model, x.to(torch.bfloat16), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in model.parameters())


def test_bsam_refuses_duplicates_and_mismatched_checkpoints_before_changing_anything():
    model = make_mlp()
    w, b = model[0].weight, model[0].bias
    for params in ([w, b, w], [dict(params=[w, b]), dict(params=[model[2].weight, w])]):
        with pytest.raises(ValueError, match="more than once"):
            fastsam.BSAM(params, NUM_DATA)
    opt = fastsam.BSAM([dict(params=[w]), dict(params=[b])], NUM_DATA)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group(dict(params=[model[2].weight, w]))
    assert len(opt.param_groups) == 2
    opt.add_param_group(dict(params=[model[2].weight, model[2].bias]))
    assert len(opt.param_groups) == 3

    trained, opt, _ = run_bsam(model, batches(2))
    other, other_opt, _ = run_bsam(make_mlp(width=9), batches(2))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(16, 10\).*\(9, 10\)"):
        opt.load_state_dict(other_opt.state_dict())
    after = opt.state_dict()
    for i, entry in before["state"].items():
        assert all(torch.equal(t, after["state"][i][k]) for k, t in entry.items())
