"""Test configuration.

Triton kernels run on CPU only under the Triton interpreter, and ``TRITON_INTERPRET`` must be set
before triton is first imported. On a machine without CUDA this file sets it before anything
imports triton (``import torch`` does not), so the whole suite, Triton backend included, runs in
one CPU process; with a GPU the real kernels run instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; a FASTSAM_BACKEND in the caller's shell must not leak in."""
    monkeypatch.delenv("FASTSAM_BACKEND", raising=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
