"""Multi-tensor launches for the Triton kernels: one launch over a whole list of tensors.

[note: pointer tables]
A SAM step touches every parameter tensor of a model, often hundreds of them, many tiny. One
launch per tensor would make the step launch-bound, so each elementwise kernel covers a whole
bucket (one device, one dtype) in a single launch, whatever the number of tensors. The kernel
receives one int64 *table* in device memory, ``T`` tensors and ``L`` parallel lists
(params, grads, backups, ...), laid out as rows of ``T`` entries (``B`` = number of blocks):

    row 0 .. L-1    addresses of list l's tensors (``data_ptr``), cast back to typed pointers
    row L           element count of each tensor
    row L+1         first element of each tensor in the bucket's running count (SWP counters)
    row L+2         first program (block) of each tensor
    then B entries  for every program, the tensor it works on

Program ``pid`` reads its tensor ``t``, covers elements ``(pid - first_block[t]) * BLOCK`` onward of
every list, and masks only the tensor's last, partial block (full blocks load without a mask, so
they vectorise). The addresses are real device addresses, so the same kernels run on CUDA tensors
and, under ``TRITON_INTERPRET=1``, on CPU tensors (the interpreter dereferences integer-to-pointer
casts as host addresses; this is why the kernels take a table and not, say, Python lists of
tensors, which the compiled path cannot take at all).

Tables are cached by (device, block size, every address, every size): a training loop re-uses the
same storages every step, so after the first step a launch does no host-to-device copy at all.
That keeps the step free of host synchronisation and lets it be captured in a CUDA graph (warm up
one step before capturing). A new table is copied from pinned memory with ``non_blocking=True``.

Tensors must be dense; tensors of one index must share their memory layout (all contiguous, or
the same strides of a non-overlapping dense layout, such as channels_last), because the kernels
walk memory order. Other layouts go through contiguous temporaries that are copied back: correct,
one extra copy per such tensor. SWP numbers elements in row-major order, so a masked perturbation
walks only contiguous tensors in place.
"""

from __future__ import annotations

import collections
import os
from typing import NamedTuple

import torch
import triton.language as tl

# Elements per program. On a GPU, 2048 elements over 4 warps (16 per thread, 128-bit accesses) is
# a usual shape for memory-bound kernels; it is not tuned yet (bench_triton_kernels.py --block
# --num-warps sweeps it). The interpreter runs programs one after another in Python, so it gets
# larger blocks: fewer programs, each a handful of numpy calls.
BLOCK = 2048
NUM_WARPS = 4
INTERPRETER_BLOCK = 16384

MAX_CACHED_TABLES = 64
ALIGNMENT = 16  # bytes: 128-bit vector loads

# Observability for tests and benchmarks (cheap: one dict increment per launch / per build).
launches: collections.Counter = collections.Counter()
table_builds: collections.Counter = collections.Counter()

_tables: collections.OrderedDict = collections.OrderedDict()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def block_size(device: torch.device) -> int:
    return INTERPRETER_BLOCK if device.type != "cuda" else BLOCK


def launch(kernel, grid, *args, num_warps: int | None = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, counted per kernel name."""
    launches[kernel.fn.__name__] += 1
    kernel[grid](*args, num_warps=num_warps or NUM_WARPS, **kwargs)  # the interpreter ignores num_warps


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels handle fp32, fp16 and bf16 tensors, not {dtype}") from None


class Table(NamedTuple):
    meta: torch.Tensor  # the int64 table described in the module note, on the tensors' device
    n_tensors: int
    n_blocks: int
    aligned: bool       # every address a multiple of ALIGNMENT: the kernels may assume it


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense_lists(lists: list[list[torch.Tensor]], mutated: tuple[int, ...] = (), address_only: tuple[int, ...] = (),
                logical_order: bool = False):
    """Make the parallel ``lists`` kernel-ready: drop empty tensors, fix unusual layouts.

    Returns ``(lists, write_back)``: the lists the kernel may walk in memory order, and the
    ``(original, temporary)`` pairs whose temporaries must be copied back after the launch (only
    for lists in ``mutated`` whose tensors needed a contiguous temporary). Lists in
    ``address_only`` (one-element tensors such as step counters) are passed through unchanged.
    ``logical_order`` asks for row-major element order (SWP counters number elements that way), so
    only contiguous tensors are walked in place.
    """
    n = len(lists[0])
    for lst in lists:
        if len(lst) != n:
            raise ValueError(f"tensor lists differ in length ({n} vs {len(lst)})")
    walked = [li for li in range(len(lists)) if li not in address_only]
    # Fast path, the usual case: every tensor contiguous, sizes and devices matching, none empty
    # (C-level map calls: this runs on every launch).
    numels = list(map(torch.Tensor.numel, lists[walked[0]]))
    device_index = lists[walked[0]][0].get_device() if n else None  # -1 on CPU
    if 0 not in numels and all(
            all(map(torch.Tensor.is_contiguous, lists[li])) and list(map(torch.Tensor.numel, lists[li])) == numels
            and set(map(torch.Tensor.get_device, lists[li])) == {device_index} for li in walked):
        return [list(lst) for lst in lists], []
    out = [[] for _ in lists]
    write_back = []
    for i in range(n):
        group = [lists[li][i] for li in walked]
        numel, device = group[0].numel(), group[0].device
        for t in group[1:]:
            if t.numel() != numel or t.device != device:
                raise ValueError(f"tensors of one parameter must match in size and device; got "
                                 f"{tuple(group[0].shape)} on {device} and {tuple(t.shape)} on {t.device}")
        if numel == 0:
            continue
        same_layout = all(t.is_contiguous() for t in group) or (not logical_order and (
            _dense(group[0]) and all(t.stride() == group[0].stride() for t in group)))
        for li in range(len(lists)):
            t = lists[li][i]
            if not same_layout and li not in address_only:
                c = t.contiguous()
                if li in mutated and c is not t:
                    write_back.append((t, c))
                t = c
            out[li].append(t)
    return out, write_back


def copy_back(write_back) -> None:
    for original, temporary in write_back:
        original.copy_(temporary)


def table(lists: list[list[torch.Tensor]], block: int) -> Table:
    """The (cached) device table for parallel, kernel-ready ``lists``; sizes come from ``lists[0]``.

    Lists of one-element tensors that are not walked element-wise (AdamW's step counters) may be
    among ``lists``: only their addresses are used.
    """
    first = lists[0]
    device = first[0].device
    addresses = tuple(tuple(map(torch.Tensor.data_ptr, lst)) for lst in lists)
    numels = tuple(map(torch.Tensor.numel, first))
    key = (device, block, addresses, numels)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    n = len(first)
    blocks_per = [-(-m // block) for m in numels]
    elem_start, block_start, e, b = [], [], 0, 0
    for m, nb in zip(numels, blocks_per):
        elem_start.append(e)
        block_start.append(b)
        e += m
        b += nb
    block_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), torch.tensor(blocks_per))
    host = torch.cat([torch.tensor([a for row in addresses for a in row] + list(numels) + elem_start + block_start,
                                   dtype=torch.int64), block_tensor])
    if device.type == "cuda":
        meta = host.pin_memory().to(device, non_blocking=True)
    else:
        meta = host.to(device)
    aligned = all(a % ALIGNMENT == 0 for row in addresses for a in row)
    entry = Table(meta, n, b, aligned)
    table_builds[device.type] += 1
    _tables[key] = entry
    if len(_tables) > MAX_CACHED_TABLES:
        _tables.popitem(last=False)
    return entry


def clear_tables() -> None:
    _tables.clear()


# ------------------------------------------------------------------------------------------------
# [note: the kernels' preamble]
# Every elementwise kernel starts by locating its block in the table, written out inline:
#
#     pid = tl.program_id(0).to(tl.int64)
#     t = tl.load(meta + (N_LISTS + 3) * n_tensors + pid)              # the tensor of this block
#     numel = tl.load(meta + N_LISTS * n_tensors + t)
#     start = (pid - tl.load(meta + (N_LISTS + 2) * n_tensors + t)) * BLOCK
#     x_ptr = tl.multiple_of(tl.load(meta + l * n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
#
# then runs its body once, in a branch that is either a full block (a constant all-true mask, so
# loads vectorise) or the tensor's last block (``offs < numel``). The preamble is inline rather
# than in shared @triton.jit helpers because the interpreter (triton 3.9) pays about a millisecond
# per helper call and program, some twenty times an inline operation, and the CPU tests of the
# optimizers run hundreds of programs per step; compiled kernels inline helpers anyway, so the GPU
# code is the same. For the same reason a scalar flag is broadcast inline with
# ``tl.where(flag, tl.full([BLOCK], 1, tl.int32), 0) != 0``:
#
# [note: scalar conditions under the interpreter]
# The Triton interpreter (seen in 3.9) types a scalar comparison by its operands (fp32 for
# ``norm < inf``), so broadcasting it against a block mask turns it into floats and ``mask & flag``
# fails. Going through ``tl.where`` yields a real boolean block in both modes, at no cost on a GPU.


def alignment(tab: Table) -> int:
    """The ``ALIGN`` constexpr for a table: 16 when every address allows 128-bit accesses, else 1."""
    return ALIGNMENT if tab.aligned else 1
