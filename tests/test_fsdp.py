"""FSDP (``fully_shard``): 2 processes on gloo; SAM on sharded parameters equals single-process SAM.

Each rank holds a shard of every parameter and half of the batch. fastsam runs its ops on the local
shards and all-reduces only the squared-norm partial sums, so the result must match SAM on one
process with the whole batch and unsharded parameters.
"""

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gloo_ranks import run_gloo_ranks

pytestmark = pytest.mark.distributed

STEPS = 6
WORLD = 2


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 17), nn.Tanh(), nn.Linear(17, 3))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(STEPS)]


CONFIGS = {
    "sam-sgd": ("SAM", torch.optim.SGD, dict(rho=0.1, lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "asam-adamw": ("ASAM", torch.optim.AdamW, dict(rho=0.5, lr=1e-2)),
    "fisher-sgd": ("FisherSAM", torch.optim.SGD, dict(lr=0.1)),
    "sam-rmsprop": ("SAM", torch.optim.RMSprop, dict(lr=1e-2)),  # generic (non-fused) base step
}


def train(model, opt, data, rank=None):
    for x, y in data:
        if rank is not None:  # each rank takes its half of the batch
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def worker(rank, name):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fastsam

    cls_name, base, kw = CONFIGS[name]
    cls = getattr(fastsam, cls_name)
    data = batches()

    reference = make_model()
    train(reference, cls(reference.parameters(), base, **kw), data)

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = cls(model.parameters(), base, **kw)
    assert opt._shard_groups, "sharded parameters must be detected"
    train(model, opt, data, rank)

    for (n, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), r, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # Optimizer state stays sharded, in torch's format.
    for state in opt.state.values():
        assert all(type(v).__name__ == "DTensor" for k, v in state.items() if k != "step")

    if name == "sam-sgd":  # variants that are not shard-aware yet refuse clearly
        try:
            fastsam.GSAM(model.parameters(), torch.optim.SGD, lr=0.1)
        except NotImplementedError as exc:
            assert "sharded" in str(exc)
        else:
            raise AssertionError("GSAM accepted sharded parameters")
    return [p.full_tensor().detach().clone() for p in model.parameters()]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo process groups")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp_sam_equals_single_process_sam(name):
    # Each rank checks its sharded run against its own one-process run; run_gloo_ranks fails on
    # any rank's error. Both ranks must also end with the same full parameters.
    ranks = run_gloo_ranks(worker, name, world=WORLD)
    for a, b in zip(*ranks):
        assert torch.equal(a, b)
