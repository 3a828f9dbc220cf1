"""bench/bench_backends.py: a CPU smoke run (torch backend), the CSV rows and the ranking."""

import csv

import pytest

from bench import bench_backends


def test_cpu_smoke_run_writes_rows(tmp_path, capsys):
    out = tmp_path / "backends.csv"
    assert bench_backends.main(["--device", "cpu", "--sets", "tiny", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    ops = {r["op"] for r in rows if r["metric"] == "median_ms"}
    assert ops == set(bench_backends.MULTI_TENSOR_OPS) | set(bench_backends.SDS_OPS)
    for r in rows:
        assert r["device"] and r["torch"] and r["timestamp"]
        if r["metric"] == "median_ms":
            assert float(r["value"]) > 0
    assert "restore_adamw_step" in capsys.readouterr().out


def test_write_table_needs_a_gpu(tmp_path):
    with pytest.raises(SystemExit):
        bench_backends.main(["--device", "cpu", "--sets", "tiny", "--no-sds", "--out", str(tmp_path / "x.csv"),
                             "--write-table", str(tmp_path / "t.json")])


def test_rank_needs_two_backends():
    timings = {"perturb": {"torch": [2.0, 4.0], "cuda": [1.0, 3.0]}, "restore": {"torch": [1.0]}}
    assert bench_backends.rank(timings) == {"perturb": ("cuda", "torch")}
