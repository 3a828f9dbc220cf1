"""Test configuration.

Triton kernels run on CPU only under the Triton interpreter, and ``TRITON_INTERPRET`` must be set
before triton is first imported. On a machine without CUDA this file sets it before anything
imports triton (``import torch`` does not), so the whole suite, Triton backend included, runs in
one CPU process; with a GPU the real kernels run instead.
"""

import os
import subprocess
import sys

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


ISOLATED_CHILD_ENV = "FASTSAM_ISOLATED_CHILD"


def pytest_pyfunc_call(pyfuncitem):
    """``@pytest.mark.isolated`` tests run in a fresh interpreter (their own pytest process).

    For tests whose native state (torch.compile's caches, the Triton interpreter) has crashed the
    shared suite process at random after a thousand other tests, though never alone: a crash then
    fails that one test, with its output, instead of killing the whole run. The child's exit status
    decides, so a segmentation fault counts as a failure.
    """
    if "isolated" not in pyfuncitem.keywords or os.environ.get(ISOLATED_CHILD_ENV) == "1":
        return None
    env = dict(os.environ, **{ISOLATED_CHILD_ENV: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    proc = subprocess.run(cmd, cwd=str(pyfuncitem.config.rootpath), env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"isolated run of {pyfuncitem.nodeid} exited with {proc.returncode}:\n"
                    f"{(proc.stdout + proc.stderr)[-4000:]}", pytrace=False)
    return True
