"""The benchmark tooling: `fastsam bench` (tiny plan), its rows, the plot, the README report, the harness."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import time

import pytest
import torch

from fastsam.bench import harness

KERNEL_OPS = ("grad_norm", "first_step", "second_step_sgd", "second_step_adamw", "sam_step_sgd", "sam_step_adamw")


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastsam", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.csv"
    proc = run_cli("--plan", "tiny", "--threads", "1", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with out.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.FIELDS
        rows = list(reader)
    return proc, out, rows


def _value(rows, op, provider, metric, size=None):
    hits = [float(r["value"]) for r in rows
            if r["op"] == op and r["provider"] == provider and r["metric"] == metric and size in (None, r["size"])]
    assert len(hits) == 1, (op, provider, metric, hits)
    return hits[0]


def test_bench_tiny_writes_one_run_of_rows(tiny_run):
    proc, _, rows = tiny_run
    assert len({r["timestamp"] for r in rows}) == 1, "one run shares one timestamp"
    devices = {r["device"] for r in rows}
    assert len(devices) == 1 and devices.pop().startswith("CPU") and rows[0]["device"].endswith("(1 thread)")
    assert all(r["torch"] == torch.__version__ and r["commit"] for r in rows)
    ops = {r["op"] for r in rows}
    assert set(KERNEL_OPS) | {"copy", "sds_select", "e2e_resnet18", "e2e_vit"} <= ops
    assert _value(rows, "copy", "torch", "gbps") > 0
    for op in KERNEL_OPS:
        size = "tiny:10x9688"
        fast = _value(rows, op, "fastsam-torch", "median_ms", size)
        base = _value(rows, op, "baseline-per-param", "median_ms", size)
        assert fast > 0 and base > 0
        assert _value(rows, op, "fastsam-torch", "p20_ms", size) <= fast <= _value(rows, op, "fastsam-torch",
                                                                                   "p80_ms", size)
        assert _value(rows, op, "fastsam-torch", "speedup_vs_baseline", size) > 0
        # The fraction is paired per round with a copy timed in the same rounds (provider "copy").
        gbps = _value(rows, op, "fastsam-torch", "gbps", size)
        copy_gbps = _value(rows, op, "copy", "gbps", size)
        frac = _value(rows, op, "fastsam-torch", "bw_fraction", size)
        assert gbps > 0 and copy_gbps > 0 and 0.2 < frac / (gbps / copy_gbps) < 5
    # fastsam's launches do not grow with the tensor count; the per-parameter loop's do.
    for op in ("first_step", "sam_step_sgd", "sam_step_adamw"):
        assert _value(rows, op, "fastsam-torch", "launches") < _value(rows, op, "baseline-per-param", "launches")
    assert "fastsam-triton" not in {r["provider"] for r in rows}, "the Triton interpreter must never be timed"
    for batch in (128, 1024):
        size = f"B={batch},k={batch // 2}"
        assert _value(rows, "sds_select", "fastsam-torch", "median_ms", size) > 0
        assert _value(rows, "sds_select", "baseline-esam-code", "median_ms", size) > 0
    for model in ("e2e_resnet18", "e2e_vit"):
        assert _value(rows, model, "sgd", "ratio_to_sgd") == 1.0
        assert _value(rows, model, "sam", "images_per_s") > 0
        assert 0 < _value(rows, model, "sam", "ratio_to_sgd") < 5
        assert all("batch=8" in r["size"] for r in rows if r["op"] == model), "rows name the reduced settings"
    assert "sam_step_sgd" in proc.stdout and "x baseline" in proc.stdout, "the table is printed"


def test_plot_and_report_from_stored_rows(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    from fastsam.bench import plot, report

    _, out, rows = tiny_run
    written = plot.plot_results(out, tmp_path)
    assert len(written) == 1 and written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{report.BEGIN}\nstale\n{report.END}\n\nafter\n")
    assert report.rewrite(readme, out)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n\nbefore") and text.rstrip().endswith("after")
    assert rows[0]["device"] in text and "| sam_step_sgd | tiny" in text and "| resnet18 (batch=8" in text
    assert not report.rewrite(readme, out), "a second rewrite changes nothing"


def test_bench_rejects_unknown_subject():
    proc = run_cli("--only", "grad_norm,nonsense", "--no-progress")
    assert proc.returncode == 2 and "nonsense" in proc.stderr


# --------------------------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------------------------

def test_case_rotates_and_prepares_far_from_use():
    log = []
    instances = [harness.Instance(lambda i=i: log.append(("run", i)), lambda i=i: log.append(("prep", i)))
                 for i in range(3)]
    case = harness.Case(instances)
    for _ in range(6):
        case.before()
        case.run()
    runs = [i for kind, i in log if kind == "run"]
    assert runs == [1, 2, 0, 1, 2, 0]
    for k, event in enumerate(log):
        if event[0] == "prep":  # an instance is prepared right after its own run, not before its next one
            assert log[k - 1] == ("run", event[1])


def test_time_interleaved_pairs_samples_and_honours_the_budget():
    timings = harness.time_interleaved({"a": lambda: None, "b": lambda: time.sleep(0.002)}, rounds=1000,
                                       warmup=1, min_rounds=4, budget_s=0.05)
    assert 4 <= len(timings["a"].samples) == len(timings["b"].samples) < 1000
    assert harness.speedup(timings, "a", "b") > 1
    assert timings["b"].p20_ms <= timings["b"].median_ms <= timings["b"].p80_ms


def test_speedup_is_median_of_paired_ratios():
    fast = harness.Timing(2.0, 1.0, 4.0, [1.0, 2.0, 4.0], paired=True)
    slow = harness.Timing(4.0, 3.0, 20.0, [3.0, 4.0, 20.0], paired=True)
    assert harness.speedup({"f": fast, "s": slow}, "f", "s") == 3.0
    fast.paired = False  # samples from separate runs: ratio of the medians
    assert harness.speedup({"f": fast, "s": slow}, "f", "s") == 2.0


def test_bandwidth_fraction_is_paired_with_the_copy_per_round():
    op = harness.Timing(1.5, 1.0, 2.0, [1.0, 2.0], paired=True)
    copy = harness.Timing(2.0, 2.0, 2.0, [2.0, 2.0], paired=True)
    rows = harness._derived_rows("op", "s", {"x": op}, 100, 1.0, copy_timing=copy, copy_bytes=100)
    got = {(r["provider"], r["metric"]): float(r["value"]) for r in rows}
    assert got[("x", "bw_fraction")] == 1.5  # median of 2/1 and 2/2
    assert got[("copy", "gbps")] == pytest.approx(100 / 2e-3 / 1e9)
    rows = harness._derived_rows("op", "s", {"x": op}, 100, 1e-4)  # unpaired: the run's copy GB/s
    assert {r["metric"]: float(r["value"]) for r in rows}["bw_fraction"] == pytest.approx(100 / 1.5e-3 / 1e9 / 1e-4)


@pytest.mark.parametrize("interleave", [True, False])
def test_time_builders_times_counts_and_skips(interleave, one_thread):
    ts = [torch.zeros(100) for _ in range(5)]
    builders = {
        "loop": lambda: harness.Instance(lambda: [t.add_(1.0) for t in ts]),
        "foreach": lambda: harness.Instance(lambda: torch._foreach_add_(ts, 1.0)),
        "broken": lambda: harness.Instance(lambda: 1 / 0),
    }
    timings, rows, notes = harness.time_builders("op", "s", builders, torch.device("cpu"), budget_s=0.05,
                                                 min_rounds=3, interleave=interleave)
    assert set(timings) == {"loop", "foreach"} and all(t.paired == interleave for t in timings.values())
    assert len(notes) == 1 and "broken skipped: ZeroDivisionError" in notes[0]
    launches = {r["provider"]: int(r["value"]) for r in rows if r["metric"] == "launches"}
    assert launches == {"loop": 5, "foreach": 1}


def test_count_launches_counts_dispatched_ops_on_cpu():
    ts = [torch.zeros(5) for _ in range(7)]
    assert harness.count_launches(lambda: torch._foreach_add_(ts, 1.0), "cpu") == 1
    assert harness.count_launches(lambda: [t.add_(1.0) for t in ts], "cpu") == 7
    assert harness.count_launches(lambda: [t.view(-1) for t in ts], "cpu") == 0


def test_rotation_count_covers_the_cache_only_when_needed():
    llc = harness.last_level_cache_bytes("cpu")
    assert harness.rotation_count(10 * llc, "cpu") == 1
    assert harness.rotation_count(llc, "cpu") == 4  # 3 other copies between two uses of one
    assert harness.rotation_count(llc, "cpu", interleaved_with=3) == 2  # never prepare right before use
    assert harness.rotation_count(llc // 2, "cpu", interleaved_with=2) == 3
    assert harness.rotation_count(1, "cpu") == 8


def test_size_labels_and_latest_runs():
    assert harness.size_label("tiny", [(2, 3), (4,)]) == "tiny:2x10"
    assert harness.size_value("resnet18:62x11173962") == 11173962
    assert harness.size_value("B=4096,k=2048") == 4096
    assert math.isnan(harness.size_value("batch=8,image=16"))
    jan, feb = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"
    rows = [dict(device="d1", timestamp=jan, op="a", size="s", provider="old"),
            dict(device="d1", timestamp=jan, op="b", size="s", provider="kept"),
            dict(device="d1", timestamp=feb, op="a", size="s", provider="new"),
            dict(device="d2", timestamp=jan, op="a", size="s", provider="other")]
    runs = harness.latest_runs(rows)
    assert [r["provider"] for r in runs["d1"]] == ["kept", "new"] and [r["provider"] for r in runs["d2"]] == ["other"]


def test_append_rows_fills_environment_and_keeps_one_header(tmp_path):
    path = tmp_path / "r.csv"
    harness.append_rows([dict(op="x", provider="p", size="s", metric="m", value="1")], path, stamp="T1")
    harness.append_rows([dict(op="y", provider="p", size="s", metric="m", value="2")], path, stamp="T2")
    rows = harness.read_rows(path)
    assert [(r["op"], r["timestamp"]) for r in rows] == [("x", "T1"), ("y", "T2")]
    assert rows[0]["torch"] == torch.__version__ and path.read_text().count("op,provider") == 1


@pytest.fixture
def one_thread():
    """Timing code on a shared CPU: parallel kernels stall on a loaded machine (see bench/run.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_e2e_runs_every_sam_variant_this_fastsam_has(one_thread):
    """Each optimizer is driven through its own API (two-call form, per-sample closure, batch_size, ...)."""
    import fastsam
    from fastsam.bench import bench_e2e

    rows, notes = bench_e2e.measure(bench_e2e.PLANS["tiny"][0], torch.device("cpu"), steps=2, min_steps=2,
                                    budget_s=0.1)
    assert not [n for n in notes if "skipped" in n], notes
    expected = {"sgd", "sam"} | {name for name, cls in (("esam", "ESAM"), ("msam", "MSAM"), ("looksam", "LookSAM"),
                                                         ("gsam", "GSAM")) if hasattr(fastsam, cls)}
    got = {r["provider"] for r in rows if r["metric"] == "images_per_s"}
    assert got == expected
    assert all(float(r["value"]) > 0 for r in rows if r["metric"] in ("images_per_s", "ratio_to_sgd"))


# --------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_count_launches_counts_cuda_kernels():
    ts = [torch.zeros(5, device="cuda") for _ in range(7)]
    assert harness.count_launches(lambda: [t.add_(1.0) for t in ts], "cuda") == 7
    assert harness.count_launches(lambda: torch._foreach_add_(ts, 1.0), "cuda") == 1


@pytest.mark.gpu
def test_cuda_timing_leaves_prepare_out():
    x = torch.zeros(1 << 16, device="cuda")
    quick = harness.Case([harness.Instance(lambda: x.add_(1.0)) for _ in range(2)])
    # A prepare that keeps the GPU busy for milliseconds must not show up in the timed call.
    slow_prep = harness.Case([harness.Instance(lambda: x.add_(1.0), lambda: torch.cuda._sleep(5_000_000))
                              for _ in range(2)])
    t_quick = harness.time_fn(quick, "cuda")
    t_prep = harness.time_fn(slow_prep, "cuda")
    assert t_prep.median_ms < t_quick.median_ms + 0.5


@pytest.mark.gpu
def test_bench_tiny_on_cuda(tmp_path):
    out = tmp_path / "results.csv"
    proc = run_cli("--plan", "tiny", "--device", "cuda", "--no-compile", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = harness.read_rows(out)
    assert {r["device"] for r in rows} == {torch.cuda.get_device_name()}
    providers = {r["provider"] for r in rows}
    for op in KERNEL_OPS:
        assert _value(rows, op, "fastsam-torch", "median_ms") > 0
        assert _value(rows, op, "fastsam-torch", "launches") > 0
    for op in ("first_step", "sam_step_sgd", "sam_step_adamw"):
        assert _value(rows, op, "baseline-per-param", "launches") > _value(rows, op, "fastsam-torch", "launches")
    assert {"e2e_resnet18", "e2e_vit"} <= {r["op"] for r in rows}
    assert "fastsam-torch" in providers
