"""Shared test helpers: devices, backends, dtypes, tolerances, random tensor lists."""

from __future__ import annotations

import torch

from fastsam import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (rtol, atol) for results stored in each dtype, compared with an fp64 reference rounded to it.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
    torch.float64: (1e-10, 1e-12),
}

ODD_SIZES = [1, 4097, 278011]


def backends_for(op: str, device: str, dtype: torch.dtype) -> list[str]:
    """Every backend that can run ``op`` here: torch always, Triton/CUDA where they can."""
    dev = torch.device(device)
    return [b for b in ops.BACKENDS if ops.supports(b, op, dev, dtype)[0]]


def backend_cases(op: str, dtypes=DTYPES):
    """pytest params (device, backend, dtype) for an op."""
    import pytest

    cases = []
    for device in DEVICES:
        for dtype in dtypes:
            for backend in backends_for(op, device, dtype):
                cases.append(pytest.param(device, backend, dtype, id=f"{device}-{backend}-{str(dtype)[6:]}"))
    return cases


def many_shapes(gen: torch.Generator, n: int = 40) -> list[tuple[int, ...]]:
    """A mix of ranks and awkward sizes, like a real network's parameter list."""
    shapes = []
    for _ in range(n):
        rank = int(torch.randint(1, 5, (1,), generator=gen))
        dims = torch.randint(1, 13, (rank,), generator=gen).tolist()
        shapes.append(tuple(dims))
    return shapes


def shape_sets(gen: torch.Generator):
    """Single odd-sized tensors and one list of many tensors."""
    return [[(n,)] for n in ODD_SIZES] + [many_shapes(gen)]


def randn_list(shapes, dtype, device, gen, scale=1.0):
    return [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes]


def assert_close_dtype(actual: torch.Tensor, expected_fp64: torch.Tensor, dtype: torch.dtype, msg: str = "",
                       factor: float = 1.0):
    """``actual`` (stored in dtype) against an fp64 reference rounded to dtype, per-dtype tolerance."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected_fp64.to(dtype).double().cpu(),
                               rtol=rtol * factor, atol=atol * factor, msg=msg or None)


# Ops that force a host synchronisation on a GPU (reading a device value on the host).
SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose")


def host_sync_watch():
    """A dispatch mode collecting, in ``.seen``, every host-syncing op dispatched inside it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostSyncWatch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(s in str(func) for s in SYNC_OPS):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    return HostSyncWatch()


def op_counter(skip_views: bool = False):
    """A dispatch mode counting the ops dispatched inside it, by name, in ``.ops`` (a ``Counter``).

    ``skip_views`` leaves out view ops (they launch no kernel). Setting ``.paused = True`` stops the
    count (for work that is not the optimizer's, such as a closure's forward and backward).
    The tests that dispatched ops per step do not grow with the number of tensors use it.
    """
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()
            self.paused = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused and not (skip_views and func.is_view):
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def two_call_step_ops(make_opt, n_tensors: int, *, skip_views: bool = False, before_first=None):
    """``(ops of first_step, ops of second_step)`` for ``make_opt(params)`` over ``n_tensors`` 5x3 tensors.

    Random gradients are written before each call, after two warm-up steps (state and backups
    allocated); ``before_first(opt)`` runs inside the first count (AE-SAM's per-step decision).
    Counted with :func:`op_counter` (``skip_views`` as there).
    """
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(n_tensors)]
    opt = make_opt(params)

    def fill():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)

    for _ in range(2):
        fill()
        opt.first_step()
        fill()
        opt.second_step()
    fill()
    with op_counter(skip_views=skip_views) as first:
        if before_first is not None:
            before_first(opt)
        opt.first_step()
    fill()
    with op_counter(skip_views=skip_views) as second:
        opt.second_step()
    return first.ops, second.ops
