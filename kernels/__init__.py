"""Triton kernels of fastsam (installed as ``fastsam.kernels``).

One file per op, named like the op in ``fastsam/ops/``; each holds the ``@triton.jit`` kernels and
the launcher the op's ``triton`` backend calls. Importing this package must not fail when only the
interpreter is available (``TRITON_INTERPRET=1`` on CPU).
"""

# Importing the op modules registers their torch.library ops (``torch.ops.fastsam.*_triton*``).
from . import (ema_direction, grad_mix, grad_norm, perturb, restore, restore_adamw_step,  # noqa: E402,F401
               restore_sgd_step, sds_select, sds_weights)
