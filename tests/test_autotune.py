"""backend="auto" by measured speed: the table, the timed probe, and the dispatch hook (CPU, fake timings)."""

import json

import pytest
import torch

from fastsam import ops
from fastsam.ops import _autotune, _dispatch

CUDA = torch.device("cuda")
DEFAULT = ("cuda", "triton", "torch")


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """Each test starts from the default orders and leaves them as they were."""
    saved = dict(_dispatch._auto_order)
    _dispatch._auto_order.clear()
    _autotune.reset()
    _dispatch.clear_caches()
    monkeypatch.delenv(_autotune.TABLE_ENV, raising=False)
    monkeypatch.delenv(_autotune.AUTOTUNE_ENV, raising=False)
    yield
    _dispatch._auto_order.clear()
    _dispatch._auto_order.update(saved)
    _autotune.reset()
    _dispatch.clear_caches()


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend the CUDA device is an "Example GPU" of compute capability 9.0."""
    monkeypatch.setattr(_autotune, "device_identity", lambda device: ("Example GPU", "sm_90"))


def write(tmp_path, entries):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "devices": entries}))
    return path


def test_order_from_timings_uses_the_geometric_mean_and_keeps_default_on_ties():
    # triton is 10x faster on the small case and 1.5x slower on the large one: geometric mean wins.
    times = {"torch": [10.0, 10.0], "triton": [1.0, 15.0], "cuda": [2.0, 12.0]}
    assert _autotune.order_from_timings(times) == ("triton", "cuda", "torch")
    assert _autotune.order_from_timings({"torch": [1.0], "triton": [1.0], "cuda": [1.0]}) == DEFAULT
    with pytest.raises(ValueError):
        _autotune.order_from_timings({"torch": [1.0], "cuda": [1.0, 2.0]})


def test_lookup_by_name_then_arch():
    table = {"format": 1, "devices": [{"name": "GPU A", "arch": "sm_80", "orders": {}},
                                      {"name": "GPU B", "arch": "sm_90", "orders": {}}]}
    assert _autotune.lookup(table, "GPU B", "sm_80")["name"] == "GPU B"
    assert _autotune.lookup(table, "GPU C", "sm_80")["name"] == "GPU A"
    assert _autotune.lookup(table, "GPU C", "sm_75") is None


def test_shipped_table_is_valid_and_has_no_unmeasured_entries():
    table = _autotune.load_table(_autotune.SHIPPED_TABLE)
    for entry in table["devices"]:
        assert {"name", "arch", "orders", "measured"} <= set(entry), "every entry comes from a benchmark run"


def test_without_measurements_the_default_order_stays(tmp_path, monkeypatch, fake_gpu):
    monkeypatch.setenv(_autotune.TABLE_ENV, str(write(tmp_path, [{"name": "Other", "arch": "sm_80",
                                                                  "orders": {"perturb": ["torch"]}}])))
    ops.resolve("perturb", "auto", CUDA, torch.float32)  # the hook runs here
    assert ops.auto_order("perturb", "cuda") == DEFAULT
    assert _autotune.describe("cuda").startswith("default")


def test_table_entry_sets_the_auto_order_at_first_resolution(tmp_path, monkeypatch, fake_gpu):
    path = write(tmp_path, [{"name": "Example GPU", "arch": "sm_90", "measured": "x",
                             "orders": {"perturb": ["triton", "cuda", "torch"], "restore": ["torch", "cuda"],
                                        "grad_norm": ["cuda", "fortran"]}}])
    monkeypatch.setenv(_autotune.TABLE_ENV, str(path))
    with pytest.warns(UserWarning, match="fortran"):
        name, _ = ops.resolve("perturb", "auto", CUDA, torch.float32)
    assert name == "torch", "no GPU backend can run here, so auto still falls back"
    assert ops.auto_order("perturb", "cuda") == ("triton", "cuda", "torch")
    assert ops.auto_order("restore", "cuda") == ("torch", "cuda")
    assert ops.auto_order("grad_norm", "cuda") == DEFAULT, "a malformed entry is ignored, not guessed"
    assert ops.auto_order("sds_select", "cuda") == DEFAULT, "ops the table does not list keep the default"
    assert "Example GPU" in _autotune.describe("cuda")


def test_a_broken_table_never_breaks_resolution(tmp_path, monkeypatch, fake_gpu):
    path = tmp_path / "table.json"
    path.write_text("{not json")
    monkeypatch.setenv(_autotune.TABLE_ENV, str(path))
    with pytest.warns(UserWarning, match="measured backend order unavailable"):
        assert ops.resolve("restore", "auto", CUDA, torch.float32)[0] == "torch"
    assert ops.auto_order("restore", "cuda") == DEFAULT


def fake_timer(table):
    """A timer returning made-up milliseconds per (backend, case) without running anything."""
    calls = []

    def timer(run, device, *, op, backend, case):
        calls.append((op, backend, case))
        return table[backend][case]

    return timer, calls


@pytest.fixture
def second_cpu_backend(monkeypatch):
    """Give every op a second runnable CPU backend ("cuda", running the torch implementation)."""
    registry = {op: dict(impls) for op, impls in _dispatch._registry.items()}
    for impls in registry.values():
        impls["cuda"] = impls["torch"]
    monkeypatch.setattr(_dispatch, "_registry", registry)
    real_supports = _dispatch.supports
    monkeypatch.setattr(_dispatch, "supports", lambda b, op, device, dtype: (True, "") if b in ("cuda", "torch")
                        else real_supports(b, op, device, dtype))


def test_probe_orders_backends_by_fake_timings(second_cpu_backend):
    timer, calls = fake_timer({"torch": {"small": 5.0, "large": 8.0}, "cuda": {"small": 9.0, "large": 7.0}})
    cases = {"small": (3, 10), "large": (2, 100)}
    orders = _autotune.probe(torch.device("cpu"), ops=["perturb", "restore"], cases=cases, timer=timer)
    assert orders == {"perturb": ("torch", "cuda"), "restore": ("torch", "cuda")}
    assert sorted(calls) == sorted((op, b, c) for op in ("perturb", "restore") for b in ("torch", "cuda")
                                   for c in cases)


def test_autotune_runs_every_op_and_applies_the_orders(second_cpu_backend):
    """The default probe really calls each backend on the synthetic buckets, then sets the auto order."""
    ran = []

    def timer(run, device, *, op, backend, case):
        run()
        ran.append((op, backend))
        return {"torch": 1.0, "cuda": 2.0}[backend]

    all_ops = sorted(op for op in _dispatch._registry if op != "demo_op")
    orders = ops.autotune("cpu", ops=all_ops, timer=timer, cases={"tiny": (2, 33)})
    assert orders == {op: ("torch", "cuda") for op in all_ops}
    assert all(ops.auto_order(op, "cpu") == ("torch", "cuda") for op in all_ops)
    assert sorted(ran) == sorted((op, b) for op in all_ops for b in ("torch", "cuda"))


def test_probe_skips_ops_with_a_single_backend(monkeypatch):
    monkeypatch.setattr(_dispatch, "supports", lambda b, op, device, dtype: (b == "torch", ""))
    timer, calls = fake_timer({})
    assert _autotune.probe(torch.device("cpu"), ops=["restore"], timer=timer) == {}
    assert calls == []


def test_probe_calls_match_every_backend_contract():
    """_probe_calls builds valid arguments for every registered op (run through the torch backend)."""
    for op in sorted(_dispatch._registry):
        if op == "demo_op":
            continue
        args = _autotune._probe_calls(op, torch.device("cpu"), torch.float32, 3, 17)
        _dispatch.implementations(op)["torch"](*args)


def test_autotune_env_probes_once_at_first_resolution(monkeypatch, fake_gpu):
    monkeypatch.setenv(_autotune.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(_autotune, "_probe_is_safe", lambda: True)
    probed = []
    monkeypatch.setattr(_autotune, "autotune", lambda device: probed.append(device) or
                        _autotune._applied.__setitem__("cuda", "probe in this process (0 ops)"))
    ops.resolve("perturb", "auto", CUDA, torch.float32)
    ops.resolve("restore", "auto", CUDA, torch.float32)
    assert probed == [CUDA]
    assert _autotune.describe("cuda").startswith("probe")


def test_write_entry_round_trip(tmp_path):
    path = tmp_path / "sub" / "table.json"
    _autotune.write_entry(path, _autotune.table_entry("GPU A", "sm_80", {"perturb": ("cuda", "torch")}))
    _autotune.write_entry(path, _autotune.table_entry("GPU B", "sm_90", {"perturb": ("triton", "torch")}))
    _autotune.write_entry(path, _autotune.table_entry("GPU A", "sm_80", {"perturb": ("torch", "cuda")}))
    table = _autotune.load_table(path)
    assert [e["name"] for e in table["devices"]] == ["GPU B", "GPU A"]
    assert _autotune.lookup(table, "GPU A", "sm_80")["orders"] == {"perturb": ["torch", "cuda"]}


def test_autotune_env_is_refused_during_graph_capture(monkeypatch, fake_gpu):
    monkeypatch.setenv(_autotune.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(_autotune, "_probe_is_safe", lambda: False)
    monkeypatch.setattr(_autotune, "autotune", lambda device: pytest.fail("must not probe while capturing"))
    with pytest.warns(UserWarning, match="capture"):
        ops.resolve("perturb", "auto", CUDA, torch.float32)
    assert ops.auto_order("perturb", "cuda") == DEFAULT
