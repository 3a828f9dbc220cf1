"""The built extension without a GPU: it loads, and every cuda-backend function binds to its schema.

Run with the CUDA build of torch and an installed ``fastsam`` holding ``_C`` (``tests/gpuless/run.sh``
does both), from outside the source tree so that the installed package is the one imported:

    python tests/gpuless/extension.py

Each Python function the op files register as their ``cuda`` backend is called on fake CUDA tensors
(``FakeTensorMode``: no device memory, no kernel launch). The call goes through the compiled
schema, so a wrong argument count, order or type between ``fastsam/ops/<op>.py`` and
``csrc/binding.cpp`` raises here; the fake implementation the op layer registered then checks the
output's shape, dtype and device. A cuda-backend function without a case here fails too, so a new op
cannot slip past. The numerics and the mutation annotations are opchecked by
``tests/test_csrc_schemas.py`` against the same compiled schemas.
"""

from __future__ import annotations

import sys


def cases(torch):
    """{op name: (call(fn, new_tensor) -> output, check(output))} for every cuda-backend function."""
    shapes = [(4097,), (3, 5), (1,)]

    def lists(new, dtype, k):
        return [[new(s, dtype) for s in shapes] for _ in range(k)]

    def norm(fn, new, dtype):
        g, p = lists(new, dtype, 2)
        out = fn(g, p, "adaptive", 0.1)
        assert out.shape == () and out.dtype == torch.float32 and out.device.type == "cuda", out
        return out

    def perturb(fn, new, dtype):
        p, g, b = lists(new, dtype, 3)
        for beta in (1.0, 0.5):
            fn(p, g, b, new((), torch.float32), 0.05, "fisher", 0.1, 1e-12, beta, 2 ** 63 + 5, 77)

    def restore(fn, new, dtype):
        p, b = lists(new, dtype, 2)
        fn(p, b)

    def sgd(fn, new, dtype):
        p, g, b, m = lists(new, dtype, 4)
        for lr in (0.1, new((), torch.float32)):
            fn(p, g, b, m, lr, 0.9, 0.1, True, 1e-4, False, False, new((), torch.float32), new((), torch.float32))
            fn(p, g, b, [], lr, 0.0, 0.0, False, 0.0, True, True, None, None)

    def adamw(fn, new, dtype):
        p, g, b, m, v, vmax = lists(new, dtype, 6)
        steps = [new((), torch.float32) for _ in shapes]
        for lr, amsgrad in ((1e-3, True), (new((), torch.float32), False)):
            fn(p, g, b, m, v, vmax if amsgrad else [], steps, lr, 0.9, 0.999, 1e-8, 1e-2, amsgrad, False,
               new((), torch.float32), None)

    def select(fn, new, dtype):
        out = fn(new((300,), dtype), new((300,), dtype), 40)
        assert out.shape == (40,) and out.dtype == torch.int64 and out.device.type == "cuda", out

    def weights(fn, new, dtype):
        out = fn(new((300,), dtype), new((300,), dtype), 0.5)
        assert out.shape == (300,) and out.dtype == torch.float32 and out.device.type == "cuda", out

    def mix(fn, new, dtype):
        x, y = lists(new, dtype, 2)
        for swap, skip in ((False, None), (True, new((), torch.float32))):
            fn(x, y, new((), torch.float32), new((), torch.float32), swap, skip)

    def ema(fn, new, dtype):
        g, m = lists(new, dtype, 2)
        for skip in (None, new((), torch.float32)):
            fn(g, m, 0.5, 0.9, skip)

    def per_tensor_norms(fn, new, dtype):
        (x,) = lists(new, dtype, 1)
        out = fn(x)
        assert out.shape == (len(shapes),) and out.dtype == torch.float32 and out.device.type == "cuda", out

    def perturb_per_tensor(fn, new, dtype):
        p, g, b = lists(new, dtype, 3)
        fn(p, g, b, new((len(shapes),), torch.float32))

    def scalar_out(out):
        assert out.shape == () and out.dtype == torch.float32 and out.device.type == "cuda", out

    def msam_sgd(fn, new, dtype):
        p, g, v = lists(new, dtype, 3)
        for nesterov, wd in ((False, 1e-2), (True, 0.0)):
            scalar_out(fn(p, g, v, new((), torch.float32), 0.1, 0.9, wd, nesterov))

    def msam_adamw(fn, new, dtype):
        p, g, m, u = lists(new, dtype, 4)
        scalar_out(fn(p, g, m, u, new((), torch.float32), 1e-3, 0.9, 0.999, 1e-8, 1e-2, 3))

    def msam_shift(fn, new, dtype):
        p, v, b = lists(new, dtype, 3)
        for backups in (None, b):
            fn(p, v, new((), torch.float32), backups)

    def sampa(fn, new, dtype):
        p, d, b, m = lists(new, dtype, 4)
        for bufs in ([], m):
            fn(p, d, b, bufs, 0.1, 0.9, 5e-4)

    def bsam_noise(fn, new, dtype):
        p, b, s = lists(new, dtype, 3)
        fn(p, b, s, 1000, None)  # the default generator: a CUDA generator needs a device

    def bsam_ascent(fn, new, dtype):
        p, b, g, s, h = lists(new, dtype, 5)
        for adaptive in (False, True):
            fn(p, b, g, s, h, 0.05, adaptive)

    def bsam_step(fn, new, dtype):
        p, b, g, m, s, h = lists(new, dtype, 6)
        for lr in (0.1, new((), torch.float32)):
            fn(p, b, g, m, s, h, lr, 0.9, 0.999, 1e-4, 0.1)

    return {"momentum_sam_sgd": msam_sgd, "momentum_sam_adamw": msam_adamw, "momentum_sam_shift": msam_shift,
            "sampa_extrapolate": sampa,
            "bsam_noise": bsam_noise, "bsam_ascent": bsam_ascent, "bsam_step": bsam_step,
            "grad_mix": mix, "ema_direction": ema, "per_tensor_norm": per_tensor_norms,
            "perturb_per_tensor": perturb_per_tensor, "grad_norm": norm, "perturb": perturb, "restore": restore, "restore_sgd_step": sgd,
            "restore_adamw_step": adamw, "sds_select": select, "sds_weights": weights}


def main() -> int:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastsam
    from fastsam.ops import _cuda_common, _dispatch

    if torch.version.cuda is None:
        print("gpuless: this torch has no CUDA support; run under the CUDA build (tests/gpuless/run.sh)")
        return 2
    ok, why = _cuda_common.status()
    if not ok:
        print(f"gpuless: the CUDA extension does not load: {why}")
        return 1
    lib = _cuda_common.library()
    print(f"gpuless: {lib.__file__} loads without a GPU (torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuda available: {torch.cuda.is_available()}), fastsam from {fastsam.__file__}")
    table = cases(torch)
    registered = {op: impls["cuda"] for op, impls in _dispatch._registry.items() if "cuda" in impls}
    failures = [f"{op}: a cuda-backend function with no case in tests/gpuless/extension.py"
                for op in sorted(set(registered) - set(table))]
    for op in sorted(set(registered) & set(table)):
        fn = registered[op]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            try:
                with FakeTensorMode():
                    def new(shape, dt):
                        return torch.empty(shape, dtype=dt, device="cuda")

                    table[op](fn, new, dtype)
            except Exception as exc:
                failures.append(f"{op} ({fn.__module__}.{fn.__name__}, {dtype}): {exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}")
        print(f"gpuless: {fn.__module__}.{fn.__name__} binds to the compiled schema (fp32, bf16, fp16)")
    for line in failures:
        print(f"gpuless: FAIL {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
