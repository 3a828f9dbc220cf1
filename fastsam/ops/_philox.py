"""Counter-based uniform random numbers, bit-identical to Triton's ``tl.rand(seed, offset)``.

[note: one generator for every backend]
ESAM's stochastic weight perturbation keeps each weight with probability ``beta``. The mask is never
stored: element ``i`` of a call is kept iff ``u(seed, offset + i) < beta`` where ``u`` is the first
output of Philox-4x32-10 (Salmon et al., SC 2011) with key ``(seed_lo, seed_hi)`` and counter
``(off_lo, off_hi, 0, 0)``, mapped to [0, 1) the way ``tl.rand`` maps it. That is exactly Triton's
``tl.rand``; the CUDA kernels implement the same rounds, and this file implements them with
int64 torch ops so the pure-torch backend draws the very same mask. A seed therefore regenerates
the mask on every backend and device.

The torch version is slow (about 100 elementwise int64 ops per value); it is the reference and
the CPU fallback, not the fast path.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
_UINT_TO_FLOAT = 4.6566127342e-10  # 1 / 2**31, the constant tl.rand uses


def philox_uint32(seed: int, offsets: torch.Tensor, n_rounds: int = N_ROUNDS) -> torch.Tensor:
    """First 32-bit Philox output for each int64 ``offsets`` entry, as int64 values in [0, 2**32)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    offsets = offsets.to(torch.int64)
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        # 32x32 -> 64-bit products; int64 multiplication wraps, and the masks recover the halves.
        p_b = c2 * _ROUND_B
        p_a = c0 * _ROUND_A
        c0 = ((p_b >> 32) & _M32) ^ c1 ^ k0
        c2 = ((p_a >> 32) & _M32) ^ c3 ^ k1
        c1 = p_b & _M32
        c3 = p_a & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0


def uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in [0, 1), equal bit for bit to ``tl.rand(seed, offsets)``."""
    x = philox_uint32(seed, offsets)
    x = torch.where(x >= 2 ** 31, x - 2 ** 32, x)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * _UINT_TO_FLOAT


def keep_mask(seed: int, offset: int, numel: int, beta: float, device: torch.device) -> torch.Tensor:
    """Bool mask of ``numel`` elements starting at counter ``offset``: True = perturb this weight."""
    offsets = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return uniform(seed, offsets) < torch.tensor(beta, dtype=torch.float32, device=device)
