"""Triton kernels of fastsam (installed as ``fastsam.kernels``).

One file per op, named like the op in ``fastsam/ops/``; each holds the ``@triton.jit`` kernels and
the launcher the op's ``triton`` backend calls. Importing this package must not fail when only the
interpreter is available (``TRITON_INTERPRET=1`` on CPU).
"""
