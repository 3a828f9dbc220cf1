"""Backend registry: selection, environment override, fallbacks and errors."""

import pytest
import torch

from fastsam import ops
from fastsam.ops import _dispatch

CPU = torch.device("cpu")


def test_torch_backend_always_available():
    assert ops.backend_status("torch") == (True, "")
    for op in ("grad_norm", "perturb", "restore", "restore_sgd_step", "restore_adamw_step"):
        assert ops.resolve(op, "torch", CPU, torch.float32)[0] == "torch"
        assert ops.resolve(op, "auto", CPU, torch.bfloat16)[0] == "torch"


def test_auto_on_cpu_is_torch_even_with_interpreter():
    """The Triton interpreter is for tests; auto never picks it for real CPU work."""
    assert ops.resolve("perturb", "auto", CPU, torch.float32)[0] == "torch"


def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv("FASTSAM_BACKEND", "torch")
    assert _dispatch.requested_backend("auto") == "torch"
    assert _dispatch.requested_backend(None) == "torch"
    assert _dispatch.requested_backend("triton") == "triton", "an explicit argument wins over the variable"
    monkeypatch.setenv("FASTSAM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTSAM_BACKEND"):
        _dispatch.requested_backend("auto")


def test_environment_variable_forcing_an_unavailable_backend(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("cuda may be available here")
    monkeypatch.setenv("FASTSAM_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.check_backend("auto")


def test_explicit_backend_that_cannot_run_names_the_reason():
    if not torch.cuda.is_available():
        with pytest.raises(ops.BackendUnavailableError, match="cannot run perturb on cpu"):
            ops.resolve("perturb", "cuda", CPU, torch.float32)
    with pytest.raises(ops.BackendUnavailableError, match="not supported"):
        ops.resolve("perturb", "torch", CPU, torch.int64)


def test_auto_order_table_and_fallback(monkeypatch):
    calls = []

    @ops.register("demo_op", "torch")
    def demo_torch(x):
        calls.append("torch")

    assert ops.resolve("demo_op", "auto", CPU, torch.float32)[0] == "torch"
    # A preferred backend that cannot run here is skipped silently under auto.
    ops.set_auto_order("demo_op", "cpu", ("cuda", "triton"))
    assert ops.auto_order("demo_op", "cpu")[-1] == "torch"
    assert ops.resolve("demo_op", "auto", CPU, torch.float32)[0] == "torch"
    with pytest.raises(ValueError):
        ops.set_auto_order("demo_op", "cpu", ("fortran",))
    with pytest.raises(KeyError):
        ops.resolve("no_such_op", "auto", CPU, torch.float32)


def test_registering_unknown_backend_fails():
    with pytest.raises(ValueError, match="unknown backend"):
        ops.register("grad_norm", "opencl")
