"""The CUDA kernels' code run on the host (tests/csrc/host_emulation.cu), called like the compiled ops.

:class:`Emulation` exposes one method per ``fastsam_cuda::<op>`` schema of csrc/binding.cpp, with the
same arguments, working on CPU tensors. It does in Python what the binding does in C++ (collect the
data pointers list-major, turn optional scalars into pointers) and then runs the kernels' planning
and per-thread code through the host executor. The tests use it both directly and as the CPU
implementation of the real schemas (tests/test_csrc_schemas.py).
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_double, c_float, c_int, c_int64, c_uint32, c_uint64, c_void_p

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MODE_CODES = {"plain": 0, "adaptive": 1, "fisher": 2}


def _ptr(t: torch.Tensor | None):
    return None if t is None else c_void_p(t.data_ptr())


def _rows(*lists):
    n = len(lists[0])
    flat = [t.data_ptr() if t.numel() else None for lst in lists for t in lst]
    return (c_void_p * len(flat))(*flat), (c_int64 * n)(*[t.numel() for t in lists[0]]), n


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"emulated {what} returned error {code}")


def _scalar(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


class Emulation:
    def __init__(self, path):
        lib = self.lib = ctypes.CDLL(str(path))
        vp, i64p = POINTER(c_void_p), POINTER(c_int64)
        lib.fastsam_emu_max_tensors.argtypes = [c_int]
        lib.fastsam_emu_chunk_size.restype = c_int64
        lib.fastsam_emu_plan.argtypes = [c_int, i64p, c_int, i64p, c_int64]
        lib.fastsam_emu_philox.argtypes = [c_uint64, POINTER(c_uint64), c_int, POINTER(c_uint32), POINTER(c_float)]
        lib.fastsam_emu_philox.restype = None
        lib.fastsam_emu_partials_count.argtypes = [i64p, c_int]
        lib.fastsam_emu_partials_count.restype = c_int64
        lib.fastsam_emu_grad_sq_norm.argtypes = [c_int, c_int, c_float, vp, i64p, c_int, c_void_p, c_void_p]
        lib.fastsam_emu_perturb.argtypes = [c_int, vp, i64p, c_int, c_void_p, c_int, c_float, c_float, c_float,
                                            c_float, c_uint64, c_int64]
        lib.fastsam_emu_restore.argtypes = [c_int, vp, i64p, c_int]
        lib.fastsam_emu_restore_sgd_step.argtypes = [c_int, vp, i64p, c_int, c_void_p, c_float, c_int, c_float,
                                                     c_double, c_float, c_int, c_int, c_int, c_void_p, c_void_p]
        lib.fastsam_emu_restore_adamw_step.argtypes = [c_int, vp, vp, i64p, c_int, c_void_p, c_float, c_double,
                                                       c_double, c_float, c_float, c_int, c_int, c_int, c_void_p,
                                                       c_void_p]
        lib.fastsam_emu_grad_mix.argtypes = [c_int, vp, i64p, c_int, c_void_p, c_void_p, c_int, c_void_p]
        lib.fastsam_emu_ema_direction.argtypes = [c_int, vp, i64p, c_int, c_float, c_float, c_void_p]
        lib.fastsam_emu_sds_select.argtypes = [c_int, c_void_p, c_void_p, c_int, c_int, c_void_p]
        lib.fastsam_emu_sds_weights.argtypes = [c_int, c_void_p, c_void_p, c_int64, c_float, c_void_p]
        # layer-wise perturbation (AWP / WT-AWP / HERO)
        lib.fastsam_emu_per_tensor_partials_count.argtypes = [i64p, c_int]
        lib.fastsam_emu_per_tensor_partials_count.restype = c_int64
        lib.fastsam_emu_per_tensor_sq_norms.argtypes = [c_int, vp, i64p, c_int, c_void_p, c_void_p]
        lib.fastsam_emu_perturb_per_tensor.argtypes = [c_int, vp, i64p, c_int, c_void_p]
        # Momentum-SAM and SAMPa
        lib.fastsam_emu_momentum_sam_sgd.argtypes = [c_int, vp, i64p, c_int, c_void_p, c_float, c_float, c_float,
                                                     c_int, c_void_p, c_void_p]
        lib.fastsam_emu_momentum_sam_adamw.argtypes = [c_int, vp, i64p, c_int, c_void_p, c_double, c_double,
                                                       c_double, c_float, c_double, c_int64, c_void_p, c_void_p]
        lib.fastsam_emu_momentum_sam_shift.argtypes = [c_int, vp, i64p, c_int, c_int, c_void_p]
        lib.fastsam_emu_sampa_extrapolate.argtypes = [c_int, vp, i64p, c_int, c_float, c_int, c_float, c_float]
        # Bayesian SAM (bSAM)
        lib.fastsam_emu_bsam_noise.argtypes = [c_int, vp, i64p, c_int, c_void_p, c_float]
        lib.fastsam_emu_bsam_ascent.argtypes = [c_int, vp, i64p, c_int, c_float, c_int]
        lib.fastsam_emu_bsam_step.argtypes = [c_int, vp, i64p, c_int, c_void_p, c_float, c_float, c_float, c_float,
                                              c_float]

    # ---------------------------------------------------------------- planning and Philox

    @property
    def chunk_size(self) -> int:
        return int(self.lib.fastsam_emu_chunk_size())

    def max_tensors(self, depth: int) -> int:
        return int(self.lib.fastsam_emu_max_tensors(depth))

    def plan(self, depth: int, numels: list[int]) -> torch.Tensor:
        """One row per block: (launch, global chunk, tensor, chunk start, chunk length, first bucket index)."""
        n = len(numels)
        max_blocks = sum((x + self.chunk_size - 1) // self.chunk_size for x in numels) + 1
        out = torch.zeros(max_blocks, 6, dtype=torch.int64)
        written = self.lib.fastsam_emu_plan(depth, (c_int64 * n)(*numels), n,
                                            ctypes.cast(out.data_ptr(), POINTER(c_int64)), max_blocks)
        if written < 0:
            raise RuntimeError("planning failed")
        return out[:written]

    def philox(self, seed: int, counters: list[int]) -> tuple[list[int], torch.Tensor]:
        n = len(counters)
        words = (c_uint32 * n)()
        uniforms = torch.zeros(n, dtype=torch.float32)
        self.lib.fastsam_emu_philox(seed & (2 ** 64 - 1), (c_uint64 * n)(*[c & (2 ** 64 - 1) for c in counters]), n,
                                    words, ctypes.cast(uniforms.data_ptr(), POINTER(c_float)))
        return list(words), uniforms

    def partials_count(self, numels: list[int]) -> int:
        return int(self.lib.fastsam_emu_partials_count((c_int64 * len(numels))(*numels), len(numels)))

    # ---------------------------------------------------------------- the ops, schema for schema

    def grad_sq_norm(self, grads, params, mode, eta):
        lists = [grads] + ([params] if mode == "adaptive" else [])
        rows, numels, n = _rows(*lists)
        partials = torch.zeros(max(1, self.partials_count([g.numel() for g in grads])), dtype=torch.float32)
        out = torch.zeros((), dtype=torch.float32)
        _check(self.lib.fastsam_emu_grad_sq_norm(DTYPE_CODES[grads[0].dtype], MODE_CODES[mode], eta, rows, numels, n,
                                                 _ptr(partials), _ptr(out)), "grad_sq_norm")
        return out

    def perturb_(self, params, grads, backups, norm, rho, mode, eta, eps, beta, seed, offset):
        rows, numels, n = _rows(params, grads, backups)
        norm = _scalar(norm)
        _check(self.lib.fastsam_emu_perturb(DTYPE_CODES[params[0].dtype], rows, numels, n, _ptr(norm),
                                            MODE_CODES[mode], rho, eta, eps, beta, seed & (2 ** 64 - 1), offset),
               "perturb_")

    def restore_(self, params, backups):
        rows, numels, n = _rows(params, backups)
        _check(self.lib.fastsam_emu_restore(DTYPE_CODES[params[0].dtype], rows, numels, n), "restore_")

    def restore_sgd_step_(self, params, grads, backups, momentum_buffers, lr_tensor, lr, momentum, dampening,
                          nesterov, weight_decay, maximize, is_first_step, grad_scale, found_inf):
        lists = [params, grads, backups] + ([momentum_buffers] if momentum_buffers else [])
        rows, numels, n = _rows(*lists)
        lr_tensor, grad_scale, found_inf = _scalar(lr_tensor), _scalar(grad_scale), _scalar(found_inf)
        _check(self.lib.fastsam_emu_restore_sgd_step(
            DTYPE_CODES[params[0].dtype], rows, numels, n, _ptr(lr_tensor), lr, int(bool(momentum_buffers)), momentum,
            dampening, weight_decay, int(nesterov), int(maximize), int(is_first_step), _ptr(grad_scale),
            _ptr(found_inf)), "restore_sgd_step_")

    def restore_adamw_step_(self, params, grads, backups, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                            lr_tensor, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, found_inf):
        lists = [params, grads, backups, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
        rows, numels, n = _rows(*lists)
        steps = (c_void_p * n)(*[s.data_ptr() for s in state_steps])
        lr_tensor, grad_scale, found_inf = _scalar(lr_tensor), _scalar(grad_scale), _scalar(found_inf)
        _check(self.lib.fastsam_emu_restore_adamw_step(
            DTYPE_CODES[params[0].dtype], rows, steps, numels, n, _ptr(lr_tensor), lr, beta1, beta2, eps, weight_decay,
            int(amsgrad), int(maximize), int(state_steps[0].dtype == torch.float64), _ptr(grad_scale),
            _ptr(found_inf)), "restore_adamw_step_")

    def grad_mix_(self, xs, ys, a, b, swap, skip):
        rows, numels, n = _rows(xs, ys)
        a, b, skip = _scalar(a), _scalar(b), _scalar(skip)
        _check(self.lib.fastsam_emu_grad_mix(DTYPE_CODES[xs[0].dtype], rows, numels, n, _ptr(a), _ptr(b), int(swap),
                                             _ptr(skip)), "grad_mix_")

    def ema_direction_(self, grads, momenta, sigma, lmbda, skip):
        rows, numels, n = _rows(grads, momenta)
        skip = _scalar(skip)
        _check(self.lib.fastsam_emu_ema_direction(DTYPE_CODES[grads[0].dtype], rows, numels, n, sigma, lmbda,
                                                  _ptr(skip)), "ema_direction_")

    @staticmethod
    def _losses(before, after):
        if before.dtype in DTYPE_CODES and after.dtype == before.dtype:
            return before.contiguous(), after.contiguous()
        return before.float().contiguous(), after.float().contiguous()

    def sds_select(self, loss_before, loss_after, k):
        before, after = self._losses(loss_before, loss_after)
        out = torch.full((k,), -1, dtype=torch.int64)
        _check(self.lib.fastsam_emu_sds_select(DTYPE_CODES[before.dtype], _ptr(before), _ptr(after), before.numel(),
                                               k, _ptr(out)), "sds_select")
        return out

    def sds_weights(self, loss_before, loss_after, temperature):
        before, after = self._losses(loss_before, loss_after)
        out = torch.empty(before.numel(), dtype=torch.float32)
        if before.numel() == 0:  # as the binding: no launch for an empty batch
            return out
        _check(self.lib.fastsam_emu_sds_weights(DTYPE_CODES[before.dtype], _ptr(before), _ptr(after), before.numel(),
                                                temperature, _ptr(out)), "sds_weights")
        return out

    # ---------------------------------------------------------------- layer-wise perturbation (AWP, HERO)

    def per_tensor_sq_norms(self, tensors):
        if any(t.numel() == 0 for t in tensors):
            raise ValueError("fastsam cuda: empty tensors are dropped by the Python op before the kernels")
        rows, numels, n = _rows(tensors)
        count = int(self.lib.fastsam_emu_per_tensor_partials_count(numels, n))
        partials = torch.zeros(max(1, count), dtype=torch.float32)
        out = torch.full((n,), float("nan"), dtype=torch.float32)
        _check(self.lib.fastsam_emu_per_tensor_sq_norms(DTYPE_CODES[tensors[0].dtype], rows, numels, n,
                                                        _ptr(partials), _ptr(out)), "per_tensor_sq_norms")
        return out

    def perturb_per_tensor_(self, params, grads, backups, scales):
        if any(t.numel() == 0 for t in params):
            raise ValueError("fastsam cuda: empty tensors are dropped by the Python op before the kernels")
        rows, numels, n = _rows(params, grads, backups)
        scales = scales.to(torch.float32).contiguous()
        _check(self.lib.fastsam_emu_perturb_per_tensor(DTYPE_CODES[params[0].dtype], rows, numels, n, _ptr(scales)),
               "perturb_per_tensor_")

    # ---------------------------------------------------------------- Momentum-SAM and SAMPa

    def _reduction_buffers(self, tensors):
        partials = torch.full((max(1, self.partials_count([t.numel() for t in tensors])),), float("nan"))
        return partials, torch.full((), float("nan"))

    def momentum_sam_sgd_(self, params, grads, bufs, s_old, lr, momentum, weight_decay, nesterov):
        rows, numels, n = _rows(params, grads, bufs)
        s_old = _scalar(s_old)
        partials, out = self._reduction_buffers(params)
        _check(self.lib.fastsam_emu_momentum_sam_sgd(DTYPE_CODES[params[0].dtype], rows, numels, n, _ptr(s_old), lr,
                                                     momentum, weight_decay, int(nesterov), _ptr(partials),
                                                     _ptr(out)), "momentum_sam_sgd_")
        return out

    def momentum_sam_adamw_(self, params, grads, exp_avgs, exp_avg_sqs, s_old, lr, beta1, beta2, eps, weight_decay,
                            step):
        rows, numels, n = _rows(params, grads, exp_avgs, exp_avg_sqs)
        s_old = _scalar(s_old)
        partials, out = self._reduction_buffers(params)
        _check(self.lib.fastsam_emu_momentum_sam_adamw(DTYPE_CODES[params[0].dtype], rows, numels, n, _ptr(s_old),
                                                       lr, beta1, beta2, eps, weight_decay, step, _ptr(partials),
                                                       _ptr(out)), "momentum_sam_adamw_")
        return out

    def momentum_sam_shift_(self, params, bufs, scale, backups):
        rows, numels, n = _rows(params, bufs, *([backups] if backups else []))
        scale = _scalar(scale)
        _check(self.lib.fastsam_emu_momentum_sam_shift(DTYPE_CODES[params[0].dtype], rows, numels, n,
                                                       int(bool(backups)), _ptr(scale)), "momentum_sam_shift_")

    def sampa_extrapolate_(self, params, directions, backups, bufs, lr, momentum, weight_decay):
        has_momentum = bool(bufs) and momentum != 0  # as the binding
        rows, numels, n = _rows(params, directions, backups, *([bufs] if has_momentum else []))
        _check(self.lib.fastsam_emu_sampa_extrapolate(DTYPE_CODES[params[0].dtype], rows, numels, n, lr,
                                                      int(has_momentum), momentum, weight_decay),
               "sampa_extrapolate_")

    # ---------------------------------------------------------------- Bayesian SAM (bSAM)

    def bsam_noise_(self, params, backups, precisions, noise, num_data):
        if noise.dtype != torch.float32 or noise.dim() != 1 or noise.numel() != sum(p.numel() for p in params):
            raise ValueError("fastsam cuda: noise must be a contiguous 1-D float32 tensor of sum(numel) elements")
        if num_data < 1:
            raise ValueError("fastsam cuda: num_data must be >= 1")
        rows, numels, n = _rows(params, backups, precisions)
        noise = noise.contiguous()
        _check(self.lib.fastsam_emu_bsam_noise(DTYPE_CODES[params[0].dtype], rows, numels, n, _ptr(noise), num_data),
               "bsam_noise_")

    def bsam_ascent_(self, params, backups, grads, precisions, scales, rho, adaptive):
        rows, numels, n = _rows(params, backups, grads, precisions, scales)
        _check(self.lib.fastsam_emu_bsam_ascent(DTYPE_CODES[params[0].dtype], rows, numels, n, rho, int(adaptive)),
               "bsam_ascent_")

    def bsam_step_(self, params, backups, grads, momenta, precisions, scales, lr_tensor, lr, beta1, beta2,
                   weight_decay, damping):
        rows, numels, n = _rows(params, backups, grads, momenta, precisions, scales)
        lr_tensor = _scalar(lr_tensor)
        # 1 - beta and damping + weight_decay in double, as binding.cpp forms them
        _check(self.lib.fastsam_emu_bsam_step(DTYPE_CODES[params[0].dtype], rows, numels, n, _ptr(lr_tensor), lr,
                                              1.0 - beta1, 1.0 - beta2, weight_decay, damping + weight_decay),
               "bsam_step_")


_cached: Emulation | None = None


def emulation_or_skip() -> Emulation:
    """The emulation library, built on first use; skips the calling test when nvcc is absent."""
    global _cached
    import pytest

    from nvcc_tools import build_emulation_library, find_nvcc

    if _cached is None:
        nvcc = find_nvcc()
        if nvcc is None:
            pytest.skip("nvcc not found (install the CUDA toolkit to run the CUDA kernels' host emulation)")
        _cached = Emulation(build_emulation_library(nvcc))
    return _cached
