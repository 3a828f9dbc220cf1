"""The Triton backend's launch layer (kernels/_multi_tensor.py): devices, streams, table lifetime, alignment.

What a CPU can check, on the interpreter: that a launch enters the tensors' device (the device
functions are replaced by recording fakes, since Triton reads ``torch.cuda.current_device()``);
that tables created or used while a capture is underway are pinned and survive any number of later
tables; that a table used from a second stream waits for its upload stream and is
``record_stream``-ed; alignment per tensor (two parts at most, step counters ignored) with results
equal to the torch backend; the grad-norm reduction tree; an empty ``sds_weights`` batch.
The GPU halves of these (a real second GPU, a real graph capture) are in test_gpu_backends.py.
"""

import pytest
import torch

from fastsam import ops
from helpers import assert_close_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK, WHY = ops.supports("triton", "perturb", torch.device(DEVICE), torch.float32)
pytestmark = [pytest.mark.triton, pytest.mark.skipif(not TRITON_OK, reason=f"Triton backend unavailable: {WHY}")]

if TRITON_OK:
    from fastsam.kernels import _multi_tensor, grad_norm as grad_norm_kernels


def rand_list(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype) for s in shapes]


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.fixture(autouse=True)
def _fresh_tables():
    _multi_tensor.clear_tables(pinned=True)
    yield
    _multi_tensor.clear_tables(pinned=True)


# ------------------------------------------------------------------------------------------------
# device guard


class _FakeCuda:
    """Stands in for torch.cuda's device functions: a current device, and a guard that switches it."""

    def __init__(self, current):
        self.current = current
        self.entered = []

    def current_device(self):
        return self.current

    def device(self, device):
        fake = self

        class Guard:
            def __enter__(self):
                self.saved, fake.current = fake.current, torch.device(device).index
                fake.entered.append(fake.current)

            def __exit__(self, *exc):
                fake.current = self.saved

        return Guard()


class _RecordingKernel:
    """``kernel[grid](*args)``: records the current device at launch time."""

    class fn:
        __name__ = "recording_kernel"

    def __init__(self, cuda):
        self.cuda, self.seen = cuda, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.append(self.cuda.current_device())


@pytest.mark.parametrize("current,tensor_device,guarded", [(0, 1, True), (1, 1, False), (0, 0, False)])
def test_launch_runs_under_the_tensors_device(monkeypatch, current, tensor_device, guarded):
    cuda = _FakeCuda(current)
    monkeypatch.setattr(torch.cuda, "current_device", cuda.current_device)
    monkeypatch.setattr(torch.cuda, "device", cuda.device)
    monkeypatch.setattr(_multi_tensor, "launch_device", lambda args: torch.device("cuda", tensor_device))
    kernel = _RecordingKernel(cuda)
    _multi_tensor.launch(kernel, (1,), torch.zeros(1))
    assert kernel.seen == [tensor_device], "the kernel must see the tensors' device as current"
    assert cuda.entered == ([tensor_device] if guarded else []), "a guard only when the device differs"
    assert cuda.current == current, "the caller's device is restored"


def test_launch_device_is_the_first_tensor_argument():
    a, b = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    assert _multi_tensor.launch_device((3, a, b)) == a.device
    assert _multi_tensor.launch_device((1, 2.0)) is None


# ------------------------------------------------------------------------------------------------
# table lifetime and streams


class _Stream:
    def __init__(self, name, capturing=False):
        self.name, self.capturing, self.waited_for = name, capturing, []

    def wait_stream(self, other):
        self.waited_for.append(other.name)


def test_tables_used_during_a_capture_are_never_evicted(monkeypatch):
    """A "capture" (stream_state says so) pins the tables it builds or hits; 70 later tables evict only
    unpinned ones, and the pinned tables are then hit again, unchanged, with no rebuild."""
    state = {"stream": None, "capturing": False}
    monkeypatch.setattr(_multi_tensor, "stream_state", lambda device: (state["stream"], state["capturing"]))
    hit_params, hit_backups = rand_list([(70,), (3, 5)], seed=1), rand_list([(70,), (3, 5)], seed=2)
    ops.restore_(hit_params, hit_backups, backend="triton")  # built eagerly, hit during the capture
    state["capturing"] = True
    miss_params, miss_backups = rand_list([(9,), (4,)], seed=3), rand_list([(9,), (4,)], seed=4)
    ops.restore_(hit_params, hit_backups, backend="triton")
    ops.restore_(miss_params, miss_backups, backend="triton")  # built during the capture
    state["capturing"] = False
    pinned = {key: (entry, [part.meta.clone() for part in entry.parts]) for key, entry in _multi_tensor._pinned.items()}
    assert len(pinned) == 2
    keep = []
    for i in range(_multi_tensor.MAX_CACHED_TABLES + 6):
        ps, bs = rand_list([(5,)], seed=10 + i), rand_list([(5,)], seed=100 + i)
        keep.append((ps, bs))
        ops.restore_(ps, bs, backend="triton")
    assert len(_multi_tensor._tables) == _multi_tensor.MAX_CACHED_TABLES, "the LRU still evicts unpinned tables"
    builds = _multi_tensor.table_builds[torch.device(DEVICE).type]
    for params, backups in ((hit_params, hit_backups), (miss_params, miss_backups)):
        for p in params:
            p.zero_()
        ops.restore_(params, backups, backend="triton")
        assert all(torch.equal(p, b) for p, b in zip(params, backups))
    assert _multi_tensor.table_builds[torch.device(DEVICE).type] == builds, "pinned tables are hits"
    for key, (entry, contents) in pinned.items():
        assert _multi_tensor._pinned[key] is entry
        assert all(torch.equal(part.meta, c) for part, c in zip(entry.parts, contents)), "a replay reads these"
    _multi_tensor.clear_tables()
    assert len(_multi_tensor._pinned) == 2, "clear_tables() keeps what a graph may replay"
    _multi_tensor.clear_tables(pinned=True)
    assert not _multi_tensor._pinned


def test_a_table_used_from_a_second_stream_waits_for_its_upload_and_is_recorded(monkeypatch):
    recorded = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append((self.data_ptr(),
                                                                                            stream.name)))
    upload, side = _Stream("upload"), _Stream("side")
    state = {"stream": upload}
    monkeypatch.setattr(_multi_tensor, "stream_state", lambda device: (state["stream"], False))
    params, backups = rand_list([(33,), (7,)], seed=1), rand_list([(33,), (7,)], seed=2)
    ops.restore_(params, backups, backend="triton")
    ops.restore_(params, backups, backend="triton")
    assert recorded == [] and side.waited_for == [], "the uploading stream needs neither"
    state["stream"] = side
    ops.restore_(params, backups, backend="triton")
    ops.restore_(params, backups, backend="triton")
    (entry,) = _multi_tensor._tables.values()
    assert side.waited_for == ["upload"], "once per (table, stream)"
    assert recorded == [(part.meta.data_ptr(), "side") for part in entry.parts]
    assert all(torch.equal(p, b) for p, b in zip(params, backups))


# ------------------------------------------------------------------------------------------------
# alignment per tensor


def test_alignment_is_decided_per_tensor(monkeypatch):
    monkeypatch.setattr(_multi_tensor, "INTERPRETER_BLOCK", 64)
    aligned, odd = rand_list([(300,), (65,), (7,)], seed=1), misaligned(rand_list([(129,)], seed=2)[0])
    params = [aligned[0], odd, aligned[1], aligned[2]]
    backups = rand_list([(300,), (129,), (65,), (7,)], seed=3)
    tab = _multi_tensor.table([params, backups], 64)
    assert [(p.n_tensors, p.align) for p in tab.parts] == [(3, 16), (1, 1)], "only the odd tensor goes unaligned"
    assert [p.n_blocks for p in tab.parts] == [5 + 2 + 1, 3] and tab.parts[1].first_block == 8
    # Misaligned backups of an aligned parameter: the tensor is unaligned as a whole.
    tab = _multi_tensor.table([aligned, [misaligned(aligned[0])] + aligned[1:]], 64)
    assert [(p.n_tensors, p.align) for p in tab.parts] == [(2, 16), (1, 1)]
    assert len(_multi_tensor.table([aligned, aligned], 64).parts) == 1

    before = dict(_multi_tensor.launches)
    ops.restore_(params, backups, backend="triton")
    assert _multi_tensor.launches["restore_kernel"] - before.get("restore_kernel", 0) == 2, "one launch per part"
    assert all(torch.equal(p, b) for p, b in zip(params, backups))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_alignment_matches_the_torch_backend(monkeypatch, dtype):
    """Every op over a bucket with aligned and unaligned tensors (SWP counters numbered over the whole
    bucket across the two parts), against the torch backend on contiguous copies."""
    monkeypatch.setattr(_multi_tensor, "INTERPRETER_BLOCK", 64)
    shapes = [(300,), (129,), (65,), (7,)]

    def make(seed):
        xs = rand_list(shapes, dtype, seed)
        return [misaligned(x) if i in (1, 3) else x for i, x in enumerate(xs)]

    def run(backend, params, grads, backups, bufs):
        norm = ops.grad_norm(grads, params, mode="adaptive", eta=0.01, backend=backend)
        ops.perturb_(params, grads, backups, norm, 0.2, mode="adaptive", eta=0.01, beta=0.5, seed=9, offset=11,
                     backend=backend)
        perturbed = [p.clone() for p in params]
        ops.restore_sgd_step_(params, grads, backups, bufs, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
        return [norm], perturbed, params, bufs

    odd = [make(s) for s in (1, 2, 3, 4)]
    plain = [[x.clone() for x in xs] for xs in odd]
    got, want = run("triton", *odd), run("torch", *plain)
    torch.testing.assert_close(got[0][0], want[0][0], rtol=1e-5, atol=1e-6)
    for gs, ws in zip(got[1:], want[1:]):
        for a, b in zip(gs, ws):
            assert_close_dtype(a, b.double(), dtype, factor=4)


def test_adamw_step_counters_do_not_count_for_alignment(monkeypatch):
    """Step counters that are views at odd offsets of one flat tensor: still one aligned part."""
    monkeypatch.setattr(_multi_tensor, "INTERPRETER_BLOCK", 64)
    shapes = [(300,), (65,)]
    params, grads, backups = (rand_list(shapes, seed=s) for s in (1, 2, 3))
    m, v = rand_list(shapes, seed=4), [x.abs() for x in rand_list(shapes, seed=5)]
    flat_steps = torch.full((5,), 2.0, device=DEVICE)
    steps = [flat_steps[1:2].view(()), flat_steps[3:4].view(())]
    assert all(s.data_ptr() % 16 for s in steps)
    ref = [[x.clone() for x in xs] for xs in (params, m, v)]
    ref_steps = [torch.tensor(2.0, device=DEVICE) for _ in shapes]
    builds = _multi_tensor.table_builds[torch.device(DEVICE).type]
    ops.restore_adamw_step_(params, grads, backups, m, v, [], steps, lr=1e-3, weight_decay=0.1, backend="triton")
    assert _multi_tensor.table_builds[torch.device(DEVICE).type] == builds + 2
    step_tab, counters_tab = list(_multi_tensor._tables.values())[-2:]  # the step's, then the counters' own
    assert len(step_tab.parts) == 1 and step_tab.parts[0].align == 16, "counter addresses never count"
    assert len(counters_tab.parts) == 1, "the counters' own table is one address row"
    ops.restore_adamw_step_(ref[0], grads, backups, ref[1], ref[2], [], ref_steps, lr=1e-3, weight_decay=0.1,
                            backend="torch")
    assert [s.item() for s in steps] == [s.item() for s in ref_steps] == [3.0, 3.0]
    for a, b in zip(params + m + v, ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# grad_norm: the reduction tree


def test_grad_norm_sums_partials_as_a_tree(monkeypatch):
    """Tiny blocks and a 4-wide tree: 1 + 2 + 300 + 41 elements make 3 + 1 + 19 + 3 = 26 partials, then
    7, 2 and 1 values (three tree launches); equal to the fp64 sum and bitwise reproducible."""
    monkeypatch.setattr(_multi_tensor, "INTERPRETER_BLOCK", 16)
    monkeypatch.setattr(grad_norm_kernels, "REDUCE_BLOCK", 4)
    grads = rand_list([(1,), (2,), (300,), (41,)], seed=7)
    grads[0] = misaligned(grads[0])  # two parts: the partials of both go into one buffer
    before = _multi_tensor.launches["sum_partials_kernel"]
    first = ops.grad_sq_norm(grads, backend="triton")
    assert _multi_tensor.launches["sum_partials_kernel"] - before == 3
    want = sum(float(g.double().square().sum()) for g in grads)
    assert abs(first.item() - want) <= 1e-5 * want
    assert torch.equal(ops.grad_sq_norm(grads, backend="triton"), first)


def test_sum_tree_levels():
    for n in (1, 4, 5, 1000, 4097):
        partials = torch.rand(n, device=DEVICE, generator=None)
        out = torch.empty((), device=DEVICE)
        before = _multi_tensor.launches["sum_partials_kernel"]
        grad_norm_kernels.sum_tree_(partials, out)
        levels, m = 0, n
        while True:
            m, levels = -(-m // grad_norm_kernels.REDUCE_BLOCK), levels + 1
            if m == 1:
                break
        assert _multi_tensor.launches["sum_partials_kernel"] - before == levels
        torch.testing.assert_close(out.double(), partials.double().sum(), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# sds_weights: an empty batch


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sds_weights_of_an_empty_batch(backend):
    empty = torch.empty(0, device=DEVICE)
    w = ops.sds_weights(empty, empty, 0.5, backend=backend)
    assert w.shape == (0,) and w.dtype == torch.float32 and w.device == empty.device
