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
That keeps the step free of host synchronisation and lets it be captured in a CUDA graph (see the
note on tables and CUDA graphs below). A new table is copied from pinned memory with
``non_blocking=True`` on the current stream of the tensors' device.

[note: tables and CUDA graphs]
A captured graph holds the addresses of the tables its kernels read, and replays them later, so:

* a table created or used while the current stream is capturing is *pinned*: moved out of the
  LRU cache into a dict that eviction never touches (``clear_tables(pinned=True)`` empties it,
  for code that has destroyed its graphs). A 65th table evicts the oldest unpinned one only;
* a table may be built during a capture, and must be when a whole step is captured after
  ``zero_grad(set_to_none=True)``: the captured backward allocates new gradients (from the
  graph's private pool, at addresses every replay reuses), so their table is a cache miss. It is
  built safely: the device table is allocated from the graph's pool and its upload is captured as
  a host-to-device copy node that every replay repeats, from a pinned host buffer. That buffer is
  kept alive with the pinned table and never written again, so each replay copies the same bytes
  (torch 2.13's pinned allocator also keeps host blocks used by a capture out of reuse; holding
  the reference does not depend on it). The cost is one small copy node per such table in the
  graph. The alternatives are worse: a pageable copy is a
  synchronous call, illegal while capturing, and building every table before capture cannot
  know the addresses the captured backward will allocate;
* a table used from a stream other than the one that uploaded it makes that stream wait for the
  upload stream once, and ``record_stream`` keeps its memory from being reused before that
  stream's work is done, should it be evicted later.

[note: alignment per tensor]
The kernels take an ``ALIGN`` constexpr (16: every address of the program's tensor is a multiple of
16 bytes, so full blocks use 128-bit accesses; 1: no such promise). It is decided per tensor: a
bucket whose tensors are all aligned (the usual case) gets one table and one launch; otherwise its
tensors are split into an aligned part and an unaligned part, one table and one launch each (two
launches at most, whatever the number of tensors), so one odd flat-parameter view does not drop the
whole bucket to scalar accesses. Only lists walked element-wise count: AdamW's step-counter
addresses are never loaded as elements. The bucket-wide element numbering (SWP counters) is kept
across the parts. Kernels that index a per-tensor input or output by the table's tensor index
(per_tensor_norm's segment sums, perturb_per_tensor's scales) ask for one part (``split=False``).

Tensors must be dense; tensors of one index must share their memory layout (all contiguous, or
the same strides of a non-overlapping dense layout, such as channels_last), because the kernels
walk memory order. Other layouts go through contiguous temporaries that are copied back: correct,
one extra copy per such tensor. SWP numbers elements in row-major order, so a masked perturbation
walks only contiguous tensors in place.
"""

from __future__ import annotations

import collections
import contextlib
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

_tables: collections.OrderedDict = collections.OrderedDict()  # LRU, at most MAX_CACHED_TABLES
_pinned: dict = {}    # tables created or used during a CUDA graph capture: never evicted


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def block_size(device: torch.device) -> int:
    return INTERPRETER_BLOCK if device.type != "cuda" else BLOCK


def launch(kernel, grid, *args, num_warps: int | None = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the device of the first tensor argument, counted per kernel name.

    Triton launches on ``torch.cuda.current_device()`` and that device's current stream, so a bucket
    on ``cuda:1`` with ``cuda:0`` current is launched under ``torch.cuda.device(cuda:1)``: the kernel
    runs on the tensors' GPU, ordered on its current stream after the table upload and the backward
    that wrote the gradients.
    """
    launches[kernel.fn.__name__] += 1
    device = launch_device(args)
    with _on_device(device) if device is not None else _NO_GUARD:
        kernel[grid](*args, num_warps=num_warps or NUM_WARPS, **kwargs)  # the interpreter ignores num_warps


def launch_device(args) -> torch.device | None:
    """The device of the first tensor among ``args`` (the table for every multi-tensor kernel)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def launch_table(kernel, tab: "Table", *args, **kwargs) -> None:
    """``kernel`` over every part of ``tab``: ``kernel[(n_blocks,)](meta, n_tensors, *args, ALIGN=..., **kwargs)``."""
    for part in tab.parts:
        launch(kernel, (part.n_blocks,), part.meta, part.n_tensors, *args, ALIGN=part.align, **kwargs)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float64: tl.float64}


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels handle fp32, fp16 and bf16 tensors, not {dtype}") from None


class Part(NamedTuple):
    """One launch's share of a table: tensors of one alignment class."""
    meta: torch.Tensor  # the int64 table described in the module note, on the tensors' device
    n_tensors: int
    n_blocks: int
    align: int          # the kernels' ALIGN constexpr: 16 (all addresses 16-byte aligned) or 1
    first_block: int    # blocks of the earlier parts (where this part's grad_norm partials start)


class Table(NamedTuple):
    parts: tuple        # one Part, or two (aligned tensors first, then the others)
    n_blocks: int       # over all parts
    host: object        # pinned host copies kept alive (tables built during a CUDA graph capture), else None
    users: dict         # the CUDA streams that used the table, the uploading one first (insertion order)

    @property
    def meta(self) -> torch.Tensor:
        """A device tensor of the table's; stands in for absent device-scalar arguments (never read)."""
        return self.parts[0].meta


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


def table(lists: list[list[torch.Tensor]], block: int, address_only: tuple[int, ...] = (),
          split: bool = True) -> Table:
    """The (cached) device table for parallel, kernel-ready ``lists``; sizes come from ``lists[0]``.

    Lists in ``address_only`` hold one-element tensors that are not walked element-wise (AdamW's step
    counters): only their addresses are used, and their alignment does not matter. ``split=False``
    keeps every tensor in one part (aligned only if all are), for kernels whose output is indexed
    by the tensor's position in the table (per_tensor_norm's segment sums).
    """
    first = lists[0]
    device = first[0].device
    addresses = tuple(tuple(map(torch.Tensor.data_ptr, lst)) for lst in lists)
    numels = tuple(map(torch.Tensor.numel, first))
    key = (device, block, addresses, numels, split)  # (hashed once per lookup: the common hit costs two)
    with _on_device(device):
        stream, capturing = stream_state(device)
        hit = _tables.get(key)
        if hit is not None:
            if capturing:  # a graph captured now keeps this address: never evict the table from now on
                _pinned[key] = _tables.pop(key)
            else:
                _tables.move_to_end(key)
        else:
            hit = _pinned.get(key)
            if hit is None:
                hit = _remember(key, _build(addresses, numels, block, address_only, split, device, capturing),
                                capturing)
        if stream is not None:
            _use_on(hit, stream, capturing)
    return hit


def stream_state(device: torch.device):
    """(current stream, whether it is capturing a CUDA graph) of ``device``; (None, False) off CUDA."""
    if device.type != "cuda":
        return None, False
    return torch.cuda.current_stream(device), torch.cuda.is_current_stream_capturing()


def _build(addresses, numels, block, address_only, split, device, capturing=False) -> Table:
    n = len(numels)
    walked = [row for li, row in enumerate(addresses) if li not in address_only]
    aligned = [all(row[i] % ALIGNMENT == 0 for row in walked) for i in range(n)]
    if not split:
        aligned = [all(aligned)] * n
    elem_start, e = [], 0
    for m in numels:
        elem_start.append(e)
        e += m
    groups = [[i for i in range(n) if aligned[i]], [i for i in range(n) if not aligned[i]]]
    parts, hosts, first_block = [], [], 0
    for members, align in zip(groups, (ALIGNMENT, 1)):
        if not members:
            continue
        blocks_per = [-(-numels[i] // block) for i in members]
        block_start, b = [], 0
        for nb in blocks_per:
            block_start.append(b)
            b += nb
        block_tensor = torch.repeat_interleave(torch.arange(len(members), dtype=torch.int64),
                                               torch.tensor(blocks_per, dtype=torch.int64))
        host = torch.cat([torch.tensor([row[i] for row in addresses for i in members] + [numels[i] for i in members]
                                       + [elem_start[i] for i in members] + block_start, dtype=torch.int64),
                          block_tensor])
        if device.type == "cuda":
            host = host.pin_memory()
            meta = host.to(device, non_blocking=True)
            hosts.append(host)
        else:
            meta = host.to(device)
        parts.append(Part(meta, len(members), b, align, first_block))
        first_block += b
    table_builds[device.type] += 1
    # See the note on tables and CUDA graphs: a capture replays the copy from these host buffers.
    return Table(tuple(parts), first_block, tuple(hosts) if capturing else None, {})


def _remember(key, entry: Table, pin: bool) -> Table:
    if pin:
        _pinned[key] = entry
        return entry
    _tables[key] = entry
    while len(_tables) > MAX_CACHED_TABLES:
        # The oldest unpinned table: no graph holds it, and record_stream (see _use_on) makes torch
        # keep its memory until the work queued on every stream that used it is done.
        _tables.popitem(last=False)
    return entry


def _use_on(entry: Table, stream, capturing: bool) -> None:
    """Order ``stream`` after the table's upload and keep its memory alive for ``stream``'s work."""
    users = entry.users
    if not users:  # just built: uploaded on this stream
        users[stream] = None
        return
    if stream in users:
        return
    upload = next(iter(users))
    if not capturing:
        stream.wait_stream(upload)
        for part in entry.parts:
            part.meta.record_stream(stream)
    else:
        # A capturing stream may only wait for work of the same capture: a table uploaded by
        # another stream of this capture. One uploaded before the capture began is complete
        # (torch.cuda.graph synchronises the device first). Pinned tables are never freed, so no
        # record_stream either.
        with torch.cuda.stream(upload):
            same_capture = torch.cuda.is_current_stream_capturing()
        if same_capture:
            stream.wait_stream(upload)
    users[stream] = None


def clear_tables(pinned: bool = False) -> None:
    """Forget the cached tables; ``pinned=True`` also those a CUDA graph may replay (destroy those first)."""
    _tables.clear()
    if pinned:
        _pinned.clear()


_NO_GUARD = contextlib.nullcontext()


def _on_device(device: torch.device):
    """``torch.cuda.device(device)`` unless it is current already (then a no-op: the usual case)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


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
    """The ``ALIGN`` constexpr of a one-part table (use :func:`launch_table` for tables of two parts)."""
    if len(tab.parts) != 1:
        raise ValueError("this table has an aligned and an unaligned part: launch each (launch_table)")
    return tab.parts[0].align
