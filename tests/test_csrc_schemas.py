"""The cuda backend's Python half, end to end on CPU: schemas, fake impls, argument order, fallback.

The real operators come from csrc/binding.cpp, which needs a CUDA build of torch. Here the very
same schema strings (read from binding.cpp) are defined in the ``fastsam_cuda`` namespace with a CPU
implementation that runs the kernels' host emulation (tests/csrc_emulation.py, which mirrors what
the binding does). Then:

* the cuda backend functions of fastsam/ops/<op>.py run unchanged on CPU tensors and must agree
  with the torch backend (this catches a wrong argument order or type between Python and schema);
* ``torch.library.opcheck`` checks every schema's mutation annotations against what the kernels
  really write, and the fake implementations the op files register against the real outputs;
* a layout the kernels reject falls back to the torch backend.

Where the real extension loads (a CUDA build of torch, as in the GPU-less stage tests/gpuless/run.sh,
with or without a GPU), the schemas are the compiled ones: the emulation is registered as their CPU
implementation, so everything above runs against what binding.cpp really registered.
"""

import os
import re

import pytest
import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from csrc_emulation import emulation_or_skip
from fastsam import _extension, ops
from fastsam.ops import _cuda_common
from fastsam.ops.grad_norm import grad_sq_norm_cuda
from fastsam.ops.perturb import perturb_cuda
from fastsam.ops.restore import restore_cuda
from fastsam.ops.restore_adamw_step import restore_adamw_step_cuda
from fastsam.ops.restore_sgd_step import restore_sgd_step_cuda
from fastsam.ops.sds_select import sds_select_cuda, sds_weights_cuda
from helpers import assert_close_dtype, randn_list
from nvcc_tools import CSRC

_library = None


def binding_schemas() -> dict[str, str]:
    """name -> schema of every m.def in csrc/binding.cpp (one string literal each)."""
    text = (CSRC / "binding.cpp").read_text()
    schemas = re.findall(r'm\.def\(\s*"([^"]+)"', text)
    return {s.split("(", 1)[0]: s for s in schemas}


def _layout_ok(lists) -> bool:
    """binding.cpp's TensorRows check: dense, and the parameter's strides wherever a size exceeds 1."""
    ref = lists[0]
    return all(is_non_overlapping_and_dense(x) and all(x.stride(d) == r.stride(d) for d in range(x.dim())
                                                       if x.size(d) > 1)
               for lst in lists for x, r in zip(lst, ref))


def _layout_guard(fn, *, list_args, swp=False, row_major=False):
    """Mirror binding.cpp's layout checks, then run the emulation (``row_major``: contiguous only)."""

    def impl(*args):
        lists = [args[i] for i in list_args if args[i]]
        if not _layout_ok(lists) or (swp and args[8] < 1 and not all(p.is_contiguous() for p in args[0])) or (
                row_major and not all(x.is_contiguous() for lst in lists for x in lst)):
            raise NotImplementedError(f"{_cuda_common.FALLBACK_TAG} layout the kernels do not take")
        return fn(*args)

    return impl


@pytest.fixture(scope="module")
def fake_extension():
    """``fastsam_cuda::*`` from binding.cpp's schemas, implemented on CPU by the host emulation."""
    global _library
    emu = emulation_or_skip()
    compiled = _cuda_common.library() is not None
    if not compiled and os.environ.get("FASTSAM_REQUIRE_COMPILED") == "1":  # the GPU-less stage
        pytest.fail(f"FASTSAM_REQUIRE_COMPILED=1 but the extension does not load: {_cuda_common.status()[1]}")
    if _library is None:
        lib = torch.library.Library(_cuda_common.NAMESPACE, "IMPL" if compiled else "DEF")
        impls = {
            "abi_version": lambda: _extension.ABI_VERSION,
            "grad_sq_norm": _layout_guard(emu.grad_sq_norm, list_args=(0, 1)),
            "perturb_": _layout_guard(emu.perturb_, list_args=(0, 1, 2), swp=True),
            "restore_": _layout_guard(emu.restore_, list_args=(0, 1)),
            "restore_sgd_step_": _layout_guard(emu.restore_sgd_step_, list_args=(0, 1, 2, 3)),
            "restore_adamw_step_": _layout_guard(emu.restore_adamw_step_, list_args=(0, 1, 2, 3, 4, 5)),
            "grad_mix_": _layout_guard(emu.grad_mix_, list_args=(0, 1)),
            "ema_direction_": _layout_guard(emu.ema_direction_, list_args=(0, 1)),
            "sds_select": emu.sds_select,
            "sds_weights": emu.sds_weights,
            # layer-wise perturbation (AWP / WT-AWP / HERO)
            "per_tensor_sq_norms": _layout_guard(emu.per_tensor_sq_norms, list_args=(0,)),
            "perturb_per_tensor_": _layout_guard(emu.perturb_per_tensor_, list_args=(0, 1, 2)),
            # Momentum-SAM and SAMPa
            "momentum_sam_sgd_": _layout_guard(emu.momentum_sam_sgd_, list_args=(0, 1, 2)),
            "momentum_sam_adamw_": _layout_guard(emu.momentum_sam_adamw_, list_args=(0, 1, 2, 3)),
            "momentum_sam_shift_": _layout_guard(emu.momentum_sam_shift_, list_args=(0, 1, 3)),
            "sampa_extrapolate_": _layout_guard(emu.sampa_extrapolate_, list_args=(0, 1, 2, 3)),
            # Bayesian SAM (bSAM)
            "bsam_noise_": _layout_guard(emu.bsam_noise_, list_args=(0, 1, 2), row_major=True),
            "bsam_ascent_": _layout_guard(emu.bsam_ascent_, list_args=(0, 1, 2, 3, 4)),
            "bsam_step_": _layout_guard(emu.bsam_step_, list_args=(0, 1, 2, 3, 4, 5)),
        }
        for name, schema in binding_schemas().items():
            if compiled:
                if name != "abi_version":  # the compiled one answers for itself
                    lib.impl(name, impls[name], "CPU")
                continue
            lib.define(schema)
            lib.impl(name, impls[name], "CompositeExplicitAutograd" if name == "abi_version" else "CPU")
        _cuda_common.register_fakes()
        _library = lib  # kept for the whole session: the registrations live as long as it does
    return emu


def test_binding_defines_every_op():
    assert set(binding_schemas()) == {"abi_version", "grad_sq_norm", "perturb_", "restore_", "restore_sgd_step_",
                                      "restore_adamw_step_", "sds_select", "sds_weights", "grad_mix_",
                                      "ema_direction_", "per_tensor_sq_norms", "perturb_per_tensor_",
                                      "momentum_sam_sgd_", "momentum_sam_adamw_", "momentum_sam_shift_",
                                      "sampa_extrapolate_",
                                      "bsam_noise_", "bsam_ascent_", "bsam_step_"}
    names = {name for name, _ in _cuda_common._fakes}
    assert names == set(binding_schemas()) - {"abi_version"}, "every op needs a fake implementation"


def test_compiled_schemas_are_binding_cpp_s(fake_extension):
    """The schemas the tests run against are exactly binding.cpp's (compiled ones where the extension loads)."""
    for name, schema in binding_schemas().items():
        registered = str(_cuda_common.op(name).default._schema)
        assert registered == str(torch._C.parse_schema(f"{_cuda_common.NAMESPACE}::{schema}")), name


def _lists(shapes, dtype, gen, k):
    return [randn_list(shapes, dtype, "cpu", gen) for _ in range(k)]


SHAPES = [(4097,), (3, 5), (1,), (70001,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_functions_through_the_schemas(fake_extension, dtype):
    gen = torch.Generator().manual_seed(0)
    grads, params = _lists(SHAPES, dtype, gen, 2)
    for mode in ("plain", "adaptive", "fisher"):
        torch.testing.assert_close(grad_sq_norm_cuda(grads, params, mode, 0.1),
                                   ops.grad_sq_norm(grads, params, mode=mode, eta=0.1, backend="torch"),
                                   rtol=2e-5, atol=1e-6)

    norm = ops.grad_norm(grads, backend="torch")
    mine, ref = [p.clone() for p in params], [p.clone() for p in params]
    b1, b2 = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    perturb_cuda(mine, grads, b1, norm, 0.3, "adaptive", 0.01, 1e-12, 0.5, 2 ** 63 + 5, 77)
    ops.perturb_(ref, grads, b2, norm, 0.3, mode="adaptive", eta=0.01, beta=0.5, seed=2 ** 63 + 5, offset=77,
                 backend="torch")
    for a, b in zip(mine, ref):
        assert_close_dtype(a, b.double(), dtype)
    assert all(torch.equal(a, b) for a, b in zip(b1, b2))

    restore_cuda(mine, b1)
    assert all(torch.equal(a, b) for a, b in zip(mine, params))

    for lr in (0.1, torch.tensor(0.1)):
        w1, bk, g, m1 = _lists(SHAPES, dtype, gen, 4)
        w2, m2 = [x.clone() for x in w1], [x.clone() for x in m1]
        args = (0.9, 0.1, False, 1e-3, True, False, torch.tensor(8.0), torch.tensor(0.0))
        restore_sgd_step_cuda(w1, g, bk, m1, lr, *args)
        ops.restore_sgd_step_(w2, g, bk, m2, lr=lr, momentum=0.9, dampening=0.1, weight_decay=1e-3, maximize=True,
                              grad_scale=args[6], found_inf=args[7], backend="torch")
        for a, b in zip(w1 + m1, w2 + m2):
            assert_close_dtype(a, b.double(), dtype, factor=4)

    w1, bk, g, m1 = _lists(SHAPES, dtype, gen, 4)
    v1, vmax1 = [[x.abs() for x in xs] for xs in _lists(SHAPES, dtype, gen, 2)]
    w2, m2, v2, vmax2 = ([x.clone() for x in xs] for xs in (w1, m1, v1, vmax1))
    s1, s2 = ([torch.tensor(3.0) for _ in SHAPES] for _ in range(2))
    restore_adamw_step_cuda(w1, g, bk, m1, v1, vmax1, s1, torch.tensor(1e-3), 0.8, 0.99, 1e-6, 0.1, True, False,
                            None, None)
    ops.restore_adamw_step_(w2, g, bk, m2, v2, vmax2, s2, lr=torch.tensor(1e-3), beta1=0.8, beta2=0.99, eps=1e-6,
                            weight_decay=0.1, amsgrad=True, backend="torch")
    assert [s.item() for s in s1] == [s.item() for s in s2] == [4.0] * len(SHAPES)
    for a, b in zip(w1 + m1 + v1 + vmax1, w2 + m2 + v2 + vmax2):
        assert_close_dtype(a, b.double(), dtype, factor=4)

    before, after = torch.rand(300, generator=gen).to(dtype), torch.rand(300, generator=gen).to(dtype)
    assert torch.equal(sds_select_cuda(before, after, 40), ops.sds_select(before, after, 40, backend="torch"))
    torch.testing.assert_close(sds_weights_cuda(before, after, 0.5),
                               ops.sds_weights(before, after, 0.5, backend="torch"))


def test_unsupported_layouts_fall_back_to_torch(fake_extension):
    """SWP on a transposed (dense, not row-major) weight: the kernels decline, the torch backend serves."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 30, generator=gen).t()
    g = torch.randn(40, 30, generator=gen).t()
    assert not w.is_contiguous()
    ref = w.clone()
    b1, b2 = torch.empty_like(w), torch.empty_like(w)
    norm = ops.grad_norm([g], backend="torch")
    perturb_cuda([w], [g], [b1], norm, 0.2, "plain", 0.0, 1e-12, 0.5, 9, 0)
    ops.perturb_([ref], [g], [b2], norm, 0.2, beta=0.5, seed=9, backend="torch")
    assert torch.equal(w, ref) and torch.equal(b1, b2)
    with pytest.raises(NotImplementedError, match="fallback"):
        _cuda_common.op("perturb_")([w], [g], [b1], norm, 0.2, "plain", 0.0, 1e-12, 0.5, 9, 0)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(2)
    shapes = [(257,), (3, 5)]
    p, g, b, m, v, vm = _lists(shapes, torch.float32, gen, 6)
    v, vm = [x.abs() for x in v], [x.abs() for x in vm]
    steps = [torch.tensor(2.0) for _ in shapes]
    norm = torch.tensor(3.0)
    before, after = torch.rand(64, generator=gen), torch.rand(64, generator=gen)
    return {
        "grad_sq_norm": (g, p, "adaptive", 0.1),
        "perturb_": (p, g, b, norm, 0.05, "plain", 0.0, 1e-12, 0.5, 3, 11),
        "restore_": (p, b),
        "restore_sgd_step_": (p, g, b, m, torch.tensor(0.1), 0.0, 0.9, 0.0, True, 1e-4, False, False, None,
                              torch.tensor(0.0)),
        "restore_adamw_step_": (p, g, b, m, v, vm, steps, None, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True, False,
                                torch.tensor(4.0), None),
        "grad_mix_": (p, g, torch.tensor(0.7), torch.tensor(-0.2), True, torch.tensor(0.0)),
        "ema_direction_": (g, m, 0.5, 0.9, None),
        "sds_select": (before, after, 10),
        "sds_weights": (before, after, 2.0),
        "per_tensor_sq_norms": (g,),
        "perturb_per_tensor_": (p, g, b, torch.tensor([0.5, float("nan")])),
        "momentum_sam_sgd_": (p, g, m, torch.tensor(0.1), 0.1, 0.9, 1e-2, True),
        "momentum_sam_adamw_": (p, g, m, v, torch.tensor(0.1), 1e-3, 0.9, 0.999, 1e-8, 1e-2, 3),
        "momentum_sam_shift_": (p, m, torch.tensor(-0.2), b),
        "sampa_extrapolate_": (p, g, b, m, 0.1, 0.9, 5e-4),
        "bsam_noise_": (p, b, [x.abs() + 0.5 for x in v], torch.randn(257 + 15, generator=gen), 1000.0),
        "bsam_ascent_": (p, b, g, [x.abs() + 0.5 for x in v], m, 0.05, True),
        "bsam_step_": (p, b, g, m, [x.abs() + 0.5 for x in v], vm, torch.tensor(0.1), 0.0, 0.9, 0.999, 1e-4, 0.1),
    }


@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck(fake_extension, name):
    """Schema mutation annotations, fake impls and AOT dispatch, as torch.library.opcheck sees them."""
    torch.library.opcheck(_cuda_common.op(name), _opcheck_cases()[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mix_and_ema_backend_functions_through_the_schemas(fake_extension, dtype):
    from fastsam.ops.ema_direction import ema_direction_cuda
    from fastsam.ops.grad_mix import grad_mix_cuda

    gen = torch.Generator().manual_seed(3)
    for swap in (False, True):
        xs, ys = _lists(SHAPES, dtype, gen, 2)
        x2, y2 = [x.clone() for x in xs], [y.clone() for y in ys]
        grad_mix_cuda(xs, ys, torch.tensor(0.7), torch.tensor(-0.2), swap, None)
        ops.grad_mix_(x2, y2, 0.7, -0.2, swap=swap, backend="torch")
        for a, b in zip(xs + ys, x2 + y2):
            assert_close_dtype(a, b.double(), dtype)
    gs, ms = _lists(SHAPES, dtype, gen, 2)
    g2, m2 = [g.clone() for g in gs], [m.clone() for m in ms]
    ema_direction_cuda(gs, ms, 0.5, 0.9, torch.tensor(0.0))
    ops.ema_direction_(g2, m2, 0.5, 0.9, skip=torch.tensor(0.0), backend="torch")
    for a, b in zip(gs + ms, g2 + m2):
        assert_close_dtype(a, b.double(), dtype)


# ---- layer-wise perturbation (AWP / WT-AWP / HERO) ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layerwise_backend_functions_through_the_schemas(fake_extension, dtype):
    from fastsam.ops.per_tensor_norm import per_tensor_sq_norms_cuda
    from fastsam.ops.perturb_per_tensor import perturb_per_tensor_cuda

    gen = torch.Generator().manual_seed(3)
    grads, params = _lists(SHAPES, dtype, gen, 2)
    torch.testing.assert_close(per_tensor_sq_norms_cuda(grads), ops.per_tensor_sq_norms(grads, backend="torch"),
                               rtol=2e-5, atol=1e-6)
    scales = torch.tensor([0.1, float("nan"), -0.5, 2.0])
    mine, ref = [p.clone() for p in params], [p.clone() for p in params]
    b1, b2 = [torch.empty_like(p) for p in params], [torch.empty_like(p) for p in params]
    perturb_per_tensor_cuda(mine, grads, b1, scales)
    ops.perturb_per_tensor_(ref, grads, b2, scales, backend="torch")
    for a, b in zip(mine, ref):
        assert_close_dtype(a, b.double(), dtype)
    assert torch.equal(mine[1], params[1]) and all(torch.equal(a, b) for a, b in zip(b1, b2))


def test_sds_weights_of_an_empty_batch(fake_extension):
    """An empty batch gets an empty weight vector (no launch, no error), as from torch.softmax."""
    empty = torch.empty(0)
    w = sds_weights_cuda(empty, empty, 0.5)
    assert w.shape == (0,) and w.dtype == torch.float32


# ---- Momentum-SAM and SAMPa ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_momentum_sam_and_sampa_backend_functions_through_the_schemas(fake_extension, dtype):
    from fastsam.ops.momentum_sam import momentum_sam_adamw_cuda, momentum_sam_sgd_cuda, momentum_sam_shift_cuda
    from fastsam.ops.sampa_extrapolate import sampa_extrapolate_cuda

    gen = torch.Generator().manual_seed(4)
    s = torch.tensor(0.07)
    for nesterov in (False, True):
        w1, g, v1 = _lists(SHAPES, dtype, gen, 3)
        w2, v2 = [x.clone() for x in w1], [x.clone() for x in v1]
        sq1 = momentum_sam_sgd_cuda(w1, g, v1, s, 0.1, 0.9, 1e-2, nesterov)
        sq2 = ops.momentum_sam_sgd_(w2, g, v2, s_old=s, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov,
                                    backend="torch")
        for a, b in zip(w1 + v1, w2 + v2):
            assert_close_dtype(a, b.double(), dtype, factor=4)
        torch.testing.assert_close(sq1, sq2, rtol=2e-5, atol=0.0)

    w1, g, m1 = _lists(SHAPES, dtype, gen, 3)
    (u1,) = [[x.abs() for x in xs] for xs in _lists(SHAPES, dtype, gen, 1)]
    w2, m2, u2 = ([x.clone() for x in xs] for xs in (w1, m1, u1))
    sq1 = momentum_sam_adamw_cuda(w1, g, m1, u1, s, 1e-2, 0.8, 0.99, 1e-6, 0.1, 5)
    sq2 = ops.momentum_sam_adamw_(w2, g, m2, u2, s_old=s, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1,
                                  step=5, backend="torch")
    for a, b in zip(w1 + m1 + u1, w2 + m2 + u2):
        assert_close_dtype(a, b.double(), dtype, factor=4)
    torch.testing.assert_close(sq1, sq2, rtol=2e-5, atol=0.0)

    for backups in (None, [torch.empty_like(x) for x in w1]):
        w2 = [x.clone() for x in w1]
        ref_backups = None if backups is None else [torch.empty_like(x) for x in w1]
        momentum_sam_shift_cuda(w1, m1, torch.tensor(-0.3), backups)
        ops.momentum_sam_shift_(w2, m1, -0.3, ref_backups, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(w1, w2))
        if backups is not None:
            assert all(torch.equal(a, b) for a, b in zip(backups, ref_backups))

    for bufs in ([], m1):
        w2 = [x.clone() for x in w1]
        b1, b2 = [torch.empty_like(x) for x in w1], [torch.empty_like(x) for x in w1]
        sampa_extrapolate_cuda(w1, g, b1, bufs, 0.1, 0.9, 5e-4)
        ops.sampa_extrapolate_(w2, g, b2, bufs, lr=0.1, momentum=0.9, weight_decay=5e-4, backend="torch")
        for a, b in zip(w1, w2):
            assert_close_dtype(a, b.double(), dtype, factor=2)
        assert all(torch.equal(a, b) for a, b in zip(b1, b2))


def test_momentum_sam_norm_with_empty_tensors_through_the_schemas(fake_extension):
    """Zero-element tensors get no chunk; an all-empty bucket still writes its (zero) norm."""
    from fastsam.ops.momentum_sam import momentum_sam_sgd_cuda

    gen = torch.Generator().manual_seed(6)
    w, g, v = ([torch.zeros(0), torch.randn(4097, generator=gen)] for _ in range(3))
    ref_w, ref_v = [x.clone() for x in w], [x.clone() for x in v]
    sq = momentum_sam_sgd_cuda(w, g, v, torch.tensor(0.1), 0.1, 0.9, 0.0, False)
    ref_sq = ops.momentum_sam_sgd_(ref_w, g, ref_v, s_old=0.1, lr=0.1, backend="torch")
    assert_close_dtype(w[1], ref_w[1].double(), torch.float32)
    torch.testing.assert_close(sq, ref_sq, rtol=2e-5, atol=0.0)
    empty = [torch.zeros(0)]
    assert float(momentum_sam_sgd_cuda(empty, empty, empty, torch.tensor(0.1), 0.1, 0.9, 0.0, False)) == 0.0


def test_momentum_sam_layouts_the_kernels_decline_fall_back_to_torch(fake_extension):
    """A transposed weight next to a row-major buffer: the kernels decline, the torch backend serves."""
    from fastsam.ops.momentum_sam import momentum_sam_sgd_cuda

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 30, generator=gen).t()
    g, v = torch.randn(30, 40, generator=gen), torch.randn(30, 40, generator=gen)
    ref_w, ref_v = w.clone(), v.clone()
    sq = momentum_sam_sgd_cuda([w], [g], [v], torch.tensor(0.1), 0.1, 0.9, 0.0, False)
    ref_sq = ops.momentum_sam_sgd_([ref_w], [g], [ref_v], s_old=0.1, lr=0.1, backend="torch")
    assert torch.equal(w, ref_w) and torch.equal(v, ref_v) and torch.equal(sq, ref_sq)
    with pytest.raises(NotImplementedError, match="fallback"):
        _cuda_common.op("momentum_sam_sgd_")([w], [g], [v], torch.tensor(0.1), 0.1, 0.9, 0.0, False)


# ---- Bayesian SAM (bSAM) --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bsam_backend_functions_through_the_schemas(fake_extension, dtype):
    """The cuda backends of bsam_noise_ / bsam_ascent_ / bsam_step_ against the torch backend, the noise
    drawn from the same generator state (and a transposed weight: the noise kernel declines, the torch
    arithmetic serves on the same draw)."""
    from fastsam.ops.bsam_ascent import bsam_ascent_cuda
    from fastsam.ops.bsam_noise import bsam_noise_cuda
    from fastsam.ops.bsam_step import bsam_step_cuda

    gen = torch.Generator().manual_seed(4)
    for shapes in (SHAPES, [(40, 30), (7,)]):
        w, = _lists(shapes, dtype, gen, 1)
        if shapes[0] == (40, 30):
            w[0] = w[0].t()  # not contiguous: falls back
        s = [(0.5 + torch.rand(x.shape, generator=gen)).to(dtype) for x in w]
        w1, w2 = [x.clone() for x in w], [x.clone() for x in w]
        b1, b2 = [torch.empty_like(x) for x in w], [torch.empty_like(x) for x in w]
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        bsam_noise_cuda(w1, b1, s, 500, g1)
        ops.bsam_noise_(w2, b2, s, 500, g2, backend="torch")
        assert torch.equal(g1.get_state(), g2.get_state())
        for a, b in zip(w1, w2):
            assert_close_dtype(a, b.double(), dtype)
        assert all(torch.equal(a, x) for a, x in zip(b1, w))

    backups, grads = _lists(SHAPES, dtype, gen, 2)
    s = [(0.5 + torch.rand(x.shape, generator=gen)).to(dtype) for x in backups]
    for adaptive in (False, True):
        p1, p2 = [torch.empty_like(x) for x in backups], [torch.empty_like(x) for x in backups]
        h1, h2 = [torch.empty_like(x) for x in backups], [torch.empty_like(x) for x in backups]
        bsam_ascent_cuda(p1, backups, grads, s, h1, 0.2, adaptive)
        ops.bsam_ascent_(p2, backups, grads, s, h2, 0.2, adaptive, backend="torch")
        for a, b in zip(p1 + h1, p2 + h2):
            assert_close_dtype(a, b.double(), dtype)

    for lr in (0.1, torch.tensor(0.1)):
        p1, m1 = _lists(SHAPES, dtype, gen, 2)
        p2, m2, s1, s2 = [x.clone() for x in p1], [x.clone() for x in m1], [x.clone() for x in s], [x.clone() for x in s]
        bsam_step_cuda(p1, backups, grads, m1, s1, h1, lr, 0.9, 0.999, 1e-2, 0.1)
        ops.bsam_step_(p2, backups, grads, m2, s2, h1, lr=lr, beta1=0.9, beta2=0.999, weight_decay=1e-2, damping=0.1,
                       backend="torch")
        for a, b in zip(p1 + m1 + s1, p2 + m2 + s2):
            assert_close_dtype(a, b.double(), dtype, factor=4)
