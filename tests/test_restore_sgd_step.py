"""restore_sgd_step_: restore + torch.optim.SGD's update, against an fp64 per-tensor reference."""

import itertools

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases, randn_list, shape_sets

CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4, maximize=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False),
    dict(momentum=0.5, dampening=0.3, nesterov=False, weight_decay=0.0, maximize=True),
]


def reference_sgd(backup, grad, buf, lr, momentum, dampening, nesterov, weight_decay, maximize, first,
                  grad_scale=None):
    w, g = backup.double().cpu(), grad.double().cpu()
    if grad_scale is not None:
        g = g / grad_scale
    if maximize:
        g = -g
    if weight_decay:
        g = g + weight_decay * w
    new_buf = None
    if momentum:
        new_buf = g.clone() if first else momentum * buf.double().cpu() + (1 - dampening) * g
        g = g + momentum * new_buf if nesterov else new_buf
    return w - lr * g, new_buf


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore_sgd_step"))
def test_restore_sgd_step_matches_reference(device, backend, dtype, config):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), str(config))) % 2**31)
    for shapes, first, lr_tensor in itertools.product(shape_sets(gen), (False, True), (False, True)):
        if first and not config["momentum"]:
            continue
        params = randn_list(shapes, dtype, device, gen)  # perturbed weights, overwritten by the restore
        backups = randn_list(shapes, dtype, device, gen)
        grads = randn_list(shapes, dtype, device, gen)
        bufs = randn_list(shapes, dtype, device, gen) if config["momentum"] else []
        old_bufs = [b.clone() for b in bufs]
        lr = torch.tensor(0.1, device=device) if lr_tensor else 0.1
        ops.restore_sgd_step_(params, grads, backups, bufs, lr=lr, is_first_step=first, backend=backend, **config)
        for i, p in enumerate(params):
            w_ref, buf_ref = reference_sgd(backups[i], grads[i], old_bufs[i] if bufs else None, 0.1,
                                           first=first, **config)
            assert_close_dtype(p, w_ref, dtype, factor=4)
            if bufs:
                assert_close_dtype(bufs[i], buf_ref, dtype, factor=4)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore_sgd_step"))
def test_restore_sgd_step_grad_scale_and_found_inf(device, backend, dtype):
    gen = torch.Generator().manual_seed(9)
    shapes = [(4097,), (7, 3)]
    config = CONFIGS[1]
    scale = torch.tensor(1024.0, device=device)
    for found in (0.0, 1.0):
        params = randn_list(shapes, dtype, device, gen)
        backups = randn_list(shapes, dtype, device, gen)
        grads = randn_list(shapes, dtype, device, gen, scale=1024.0)
        grads_in = [g.clone() for g in grads]  # backends may unscale grads in place (as torch's fused ones do)
        bufs = randn_list(shapes, dtype, device, gen)
        old_bufs = [b.clone() for b in bufs]
        ops.restore_sgd_step_(params, grads, backups, bufs, lr=0.1, grad_scale=scale,
                              found_inf=torch.tensor(found, device=device), backend=backend, **config)
        for i, p in enumerate(params):
            if found:
                assert torch.equal(p, backups[i]), "found_inf: the weights are restored, not stepped"
                assert torch.equal(bufs[i], old_bufs[i]), "found_inf: the momentum is not updated"
            else:
                w_ref, buf_ref = reference_sgd(backups[i], grads_in[i], old_bufs[i], 0.1, first=False,
                                               grad_scale=1024.0, **config)
                assert_close_dtype(p, w_ref, dtype, factor=4)
                assert_close_dtype(bufs[i], buf_ref, dtype, factor=4)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore_sgd_step", dtypes=[torch.float32]))
def test_param_as_its_own_backup(device, backend, dtype):
    """A parameter that was not perturbed passes itself as backup: a plain SGD step."""
    p = torch.randn(4097, device=device)
    g = torch.randn(4097, device=device)
    expected = p.double().cpu() - 0.1 * g.double().cpu()
    ops.restore_sgd_step_([p], [g], [p], [], lr=0.1, backend=backend)
    assert_close_dtype(p, expected, dtype)


def test_restore_sgd_step_validates():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="momentum buffer"):
        ops.restore_sgd_step_(p, p, p, [], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Nesterov"):
        ops.restore_sgd_step_(p, p, p, [torch.zeros(3)], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
