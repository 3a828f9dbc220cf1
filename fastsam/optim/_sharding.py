"""Sharded parameters (FSDP2 ``fully_shard``, or any DTensor sharding).

[note: sharded parameters]
With ``fully_shard`` every parameter and gradient is a DTensor whose local tensor is this rank's
shard. fastsam never gathers parameters: every op runs on the local shards (``to_local()`` shares
their storage, so in-place updates land in the real parameters), and the only cross-rank work is
one all-reduce of the squared-norm partial sums (or of GSAM/LookSAM-style dot products) over the
mesh dimensions the parameters are sharded on. Replicated mesh dimensions (HSDP) hold identical
sums and are not reduced. Optimizer state (momentum buffers, Adam moments) is created like the
parameters, as DTensors, so ``state_dict()`` keeps torch's sharded format.
"""

from __future__ import annotations

import torch

try:  # public since torch 2.4
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - builds without distributed support
    DTensor = None


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """This rank's shard of a DTensor (same storage), or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def local_list(ts) -> list:
    return [local(t) for t in ts]


def shard_groups(params: list) -> list:
    """Process groups over which per-rank partial sums of ``params`` must be all-reduced.

    Empty for ordinary tensors. Raises for layouts fastsam does not reduce correctly yet.
    """
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return []
    if len(sharded) != len(params):
        raise NotImplementedError("fastsam: an optimizer mixing sharded (DTensor) and ordinary parameters is not "
                                  "supported; shard every parameter (fully_shard the root module) or none")
    mesh = sharded[0].device_mesh
    kinds = tuple(pl.is_shard() for pl in sharded[0].placements)
    for p in sharded:
        if p.device_mesh != mesh or tuple(pl.is_shard() for pl in p.placements) != kinds:
            raise NotImplementedError("fastsam: every sharded parameter must use the same device mesh and the "
                                      "same sharded/replicated mesh dimensions")
        if any(pl.is_partial() for pl in p.placements):
            raise NotImplementedError("fastsam: parameters with Partial placements are not supported")
    return [mesh.get_group(dim) for dim, sharded_dim in enumerate(kinds) if sharded_dim]


def all_reduce_sum_(t: torch.Tensor, groups: list) -> torch.Tensor:
    """Sum ``t`` in place over each group (a collective, not a host sync)."""
    import torch.distributed as dist

    for group in groups:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
