"""Bad input is rejected before anything changes; errors never leave the model perturbed."""

import pytest
import torch
import torch.nn.functional as F

import fastsam
from fastsam import ops
from test_sam import batches, make_model


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, snap):
    for p, s in zip(model.parameters(), snap):
        assert torch.equal(p, s)


def backward(model, x, y):
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho"), (dict(rho=float("nan")), "rho"), (dict(rho=float("inf")), "rho"),
    (dict(eta=-1.0), "eta"), (dict(eta=float("nan")), "eta"), (dict(rho="0.1"), "rho"),
    (dict(perturb_eps=-1.0), "perturb_eps"),
])
def test_bad_hyper_parameters_raise_value_error(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("cls", [fastsam.ASAM, fastsam.FisherSAM])
def test_variants_reject_bad_eta_and_adaptive(cls):
    model = make_model()
    with pytest.raises(ValueError, match="eta"):
        cls(model.parameters(), torch.optim.SGD, lr=0.1, eta=-0.5)
    with pytest.raises(TypeError, match="adaptive"):
        cls(model.parameters(), torch.optim.SGD, lr=0.1, adaptive=True)


def test_bad_group_options_raise():
    model = make_model()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="rho"):
        fastsam.SAM([dict(params=params[:2]), dict(params=params[2:], rho=-1.0)], torch.optim.SGD, lr=0.1)
    opt = fastsam.SAM([dict(params=params[:2])], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        opt.add_param_group(dict(params=params[2:], eta=float("nan")))
    with pytest.raises(TypeError):
        fastsam.SAM(model.parameters(), "sgd", lr=0.1)


def test_add_param_group_reaches_the_base_optimizer():
    model = make_model()
    params = list(model.parameters())
    opt = fastsam.SAM(params[:2], torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.2)
    opt.add_param_group(dict(params=params[2:], lr=0.01))
    assert len(opt.base_optimizer.param_groups) == 2
    group = opt.param_groups[1]
    assert group["rho"] == 0.2 and group["momentum"] == 0.9 and group["lr"] == 0.01


def test_hyper_parameter_changed_to_nan_is_caught_before_perturbing():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    backward(model, x, y)
    opt.param_groups[0]["rho"] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    assert_unchanged(model, snap)
    opt.param_groups[0]["rho"] = 0.05
    opt.first_step()  # and the optimizer is still usable


def test_sparse_gradients_are_rejected_before_modifying():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    lin = torch.nn.Linear(4, 2)
    opt = fastsam.SAM(list(emb.parameters()) + list(lin.parameters()), torch.optim.SGD, lr=0.1)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    snap = [p.detach().clone() for p in list(emb.parameters()) + list(lin.parameters())]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    for p, s in zip(list(emb.parameters()) + list(lin.parameters()), snap):
        assert torch.equal(p, s)


def test_sparse_gradient_in_second_pass_restores_then_raises():
    emb = torch.nn.Embedding(10, 4)
    opt = fastsam.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    snap = emb.weight.detach().clone()
    opt.first_step(zero_grad=True)
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 4), (10, 4))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.second_step()
    assert torch.equal(emb.weight, snap)


def test_second_step_without_first_step():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    backward(model, x, y)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    assert_unchanged(model, snap)


def test_first_step_twice_is_an_error_and_does_not_double_perturb():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    backward(model, x, y)
    snap = snapshot(model)
    opt.first_step()
    perturbed = snapshot(model)
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    assert_unchanged(model, perturbed)
    assert opt.restore()
    assert_unchanged(model, snap)
    assert not opt.restore()


def test_closure_exception_restores_weights():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    backward(model, x, y)
    snap = snapshot(model)

    def closure():
        F.cross_entropy(model(x), y).backward()
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert_unchanged(model, snap)
    # The optimizer is usable afterwards.
    backward(model, x, y)
    opt.step(lambda: backward(model, x, y))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("cls", [fastsam.SAM, fastsam.ASAM, fastsam.FisherSAM])
def test_non_finite_gradient_skips_the_perturbation(cls, bad):
    model = make_model()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    backward(model, x, y)
    model.fc2.weight.grad[3, 4] = bad
    snap = snapshot(model)
    opt.first_step(zero_grad=True)
    assert_unchanged(model, snap)
    assert opt.perturbation_skipped.item() is True
    assert not torch.isfinite(opt.grad_norm)
    backward(model, x, y)
    opt.second_step(zero_grad=True)
    for p, s in zip(model.parameters(), snap):  # the base step still ran with finite grads
        assert torch.isfinite(p).all() and not torch.equal(p, s)
    backward(model, x, y)
    opt.first_step()
    assert opt.perturbation_skipped.item() is False


def test_parameters_without_gradients_are_skipped():
    model = make_model()
    model.fc1.requires_grad_(False)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    frozen = model.fc1.weight.detach().clone()
    backward(model, x, y)
    opt.first_step(zero_grad=True)
    assert torch.equal(model.fc1.weight, frozen)
    backward(model, x, y)
    opt.second_step(zero_grad=True)
    assert torch.equal(model.fc1.weight, frozen)
    assert "momentum_buffer" not in opt.state[model.fc1.weight]


def test_parameter_with_gradient_only_in_second_pass():
    """Not perturbed (no first-pass grad) but stepped with its second-pass gradient; and vice versa."""
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    backward(model, x, y)
    model.fc3.bias.grad = None
    bias_before = model.fc3.bias.detach().clone()
    w_before = model.fc3.weight.detach().clone()
    opt.first_step(zero_grad=True)
    assert torch.equal(model.fc3.bias, bias_before)
    backward(model, x, y)
    model.fc3.weight.grad = None  # perturbed in the first pass, no gradient now: restored, not stepped
    g = model.fc3.bias.grad.clone()
    opt.second_step()
    torch.testing.assert_close(model.fc3.bias, bias_before - 0.1 * g)
    assert torch.equal(model.fc3.weight, w_before)


def test_no_gradients_at_all():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    snap = snapshot(model)
    opt.first_step()
    opt.second_step()
    assert_unchanged(model, snap)
    assert opt.grad_norm is None


def test_load_state_dict_while_perturbed_is_refused():
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sd = opt.state_dict()
    x, y = batches(1)[0]
    backward(model, x, y)
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.load_state_dict(sd)


def test_explicit_unavailable_backend_raises_with_reason():
    model = make_model()
    if not torch.cuda.is_available():
        with pytest.raises(ops.BackendUnavailableError, match="cuda"):
            fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="magic")


@pytest.mark.parametrize("cls", [fastsam.ESAM, fastsam.MSAM])
def test_interval_option_is_refused_where_it_cannot_apply(cls):
    model = make_model()
    with pytest.raises(ValueError, match="every"):
        cls(model.parameters(), torch.optim.SGD, lr=0.1, every=2)


def test_fp64_parameters_work_on_the_torch_backend():
    model = make_model().double()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    before = snapshot(model)
    F.cross_entropy(model(x.double()), y).backward()
    opt.first_step(zero_grad=True)
    assert opt.grad_norm.dtype == torch.float64  # fp64 scalars for fp64 weights (issue 12)
    F.cross_entropy(model(x.double()), y).backward()
    opt.second_step(zero_grad=True)
    assert all(p.dtype == torch.float64 and not torch.equal(p, b) for p, b in zip(model.parameters(), before))
