"""restore_adamw_step_: restore + torch.optim.AdamW's update, against an fp64 per-tensor reference."""

import itertools

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype, backend_cases, randn_list, shape_sets

CONFIGS = [
    dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False),
    dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, amsgrad=True, maximize=False),
    dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=True),
]


def reference_adamw(backup, grad, m, v, vmax, step, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                    grad_scale=None):
    w, g = backup.double().cpu(), grad.double().cpu()
    if grad_scale is not None:
        g = g / grad_scale
    if maximize:
        g = -g
    step = step + 1
    w = w * (1 - lr * weight_decay)
    m = beta1 * m.double().cpu() + (1 - beta1) * g
    v = beta2 * v.double().cpu() + (1 - beta2) * g * g
    vmax = torch.maximum(vmax.double().cpu(), v) if amsgrad else None
    denom = (vmax if amsgrad else v).sqrt() / (1 - beta2 ** step) ** 0.5 + eps
    w = w - lr / (1 - beta1 ** step) * m / denom
    return w, m, v, vmax


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"b{c['beta1']}-ams{c['amsgrad']}-max{c['maximize']}")
@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore_adamw_step"))
def test_restore_adamw_step_matches_reference(device, backend, dtype, config):
    gen = torch.Generator().manual_seed(hash((device, backend, str(dtype), str(config))) % 2**31)
    for shapes, step0, lr_tensor in itertools.product(shape_sets(gen), (0.0, 6.0), (False, True)):
        n = len(shapes)
        params = randn_list(shapes, dtype, device, gen)
        backups = randn_list(shapes, dtype, device, gen)
        grads = randn_list(shapes, dtype, device, gen)
        ms = randn_list(shapes, dtype, device, gen, scale=0.1)
        vs = [x.abs() for x in randn_list(shapes, dtype, device, gen, scale=0.01)]
        vmaxs = [x.abs() for x in randn_list(shapes, dtype, device, gen, scale=0.01)] if config["amsgrad"] else []
        if step0 == 0.0:  # a fresh state: zero moments
            ms = [torch.zeros_like(x) for x in ms]
            vs = [torch.zeros_like(x) for x in vs]
            vmaxs = [torch.zeros_like(x) for x in vmaxs]
        olds = [[x.clone() for x in xs] for xs in (ms, vs, vmaxs)]
        steps = [torch.tensor(step0, device=device) for _ in range(n)]
        lr = torch.tensor(1e-2, device=device) if lr_tensor else 1e-2
        ops.restore_adamw_step_(params, grads, backups, ms, vs, vmaxs, steps, lr=lr, backend=backend, **config)
        for i in range(n):
            w, m, v, vmax = reference_adamw(backups[i], grads[i], olds[0][i], olds[1][i],
                                            olds[2][i] if config["amsgrad"] else None, step0, 1e-2, **config)
            assert steps[i].item() == step0 + 1
            assert_close_dtype(params[i], w, dtype, factor=4)
            assert_close_dtype(ms[i], m, dtype, factor=4)
            assert_close_dtype(vs[i], v, dtype, factor=4)
            if config["amsgrad"]:
                assert_close_dtype(vmaxs[i], vmax, dtype, factor=4)


@pytest.mark.parametrize("device,backend,dtype", backend_cases("restore_adamw_step"))
def test_restore_adamw_step_grad_scale_and_found_inf(device, backend, dtype):
    gen = torch.Generator().manual_seed(4)
    shapes = [(4097,), (2, 9)]
    config = CONFIGS[0]
    for found in (0.0, 1.0):
        params = randn_list(shapes, dtype, device, gen)
        backups = randn_list(shapes, dtype, device, gen)
        grads = randn_list(shapes, dtype, device, gen, scale=512.0)
        grads_in = [g.clone() for g in grads]  # backends may unscale grads in place (as torch's fused ones do)
        ms = randn_list(shapes, dtype, device, gen, scale=0.1)
        vs = [x.abs() for x in randn_list(shapes, dtype, device, gen, scale=0.01)]
        olds = [[x.clone() for x in xs] for xs in (ms, vs)]
        steps = [torch.tensor(3.0, device=device) for _ in shapes]
        ops.restore_adamw_step_(params, grads, backups, ms, vs, [], steps, lr=1e-2,
                                grad_scale=torch.tensor(512.0, device=device),
                                found_inf=torch.tensor(found, device=device), backend=backend, **config)
        for i in range(len(shapes)):
            if found:
                assert torch.equal(params[i], backups[i])
                assert torch.equal(ms[i], olds[0][i]) and torch.equal(vs[i], olds[1][i])
                assert steps[i].item() == 3.0, "a skipped step does not count"
            else:
                w, m, v, _ = reference_adamw(backups[i], grads_in[i], olds[0][i], olds[1][i], None, 3.0, 1e-2,
                                             grad_scale=512.0, **config)
                assert steps[i].item() == 4.0
                assert_close_dtype(params[i], w, dtype, factor=4)
                assert_close_dtype(ms[i], m, dtype, factor=4)


def test_restore_adamw_step_validates():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="one entry per parameter"):
        ops.restore_adamw_step_(p, p, p, p, p, [], [], lr=0.1)
    with pytest.raises(ValueError, match="max_exp_avg_sqs"):
        ops.restore_adamw_step_(p, p, p, p, p, [], [torch.tensor(0.0)], lr=0.1, amsgrad=True)
