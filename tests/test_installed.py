"""fastsam as a user gets it: a non-editable install, optional dependencies missing.

* ``pip install --no-deps .`` into a temporary venv that reuses this environment's torch
  (``--system-site-packages``), then ``fastsam bench --plan tiny --out DIR``, the report and the plot,
  run from a directory outside the source tree: results go where asked, nothing into site-packages.
* Without triton / matplotlib (hidden from a subprocess), the failures are one line naming the extra.
* ``import fastsam`` never imports the integrations' libraries.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def hiding(*modules: str) -> str:
    """Python source that makes ``import <module>`` fail as if it were not installed."""
    return textwrap.dedent(f"""
        import importlib.abc, sys
        class _Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(modules)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, _Hide())
        for _m in [m for m in sys.modules if m.split(".")[0] in {set(modules)!r}]:
            del sys.modules[_m]
    """)


def python(code: str, *, cwd=None, exe=sys.executable, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([str(exe), "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_kernels_without_triton_name_the_extra():
    proc = python(hiding("triton") + "import fastsam.kernels")
    assert proc.returncode != 0
    assert "pip install 'fastsam[triton]'" in last_line(proc.stderr), proc.stderr[-2000:]
    # fastsam itself imports and trains on the torch backend; the triton backend explains itself.
    proc = python(hiding("triton") + textwrap.dedent("""
        import torch, fastsam
        from fastsam.ops import _dispatch
        ok, why = _dispatch.backend_status("triton")
        assert not ok and "pip install 'fastsam[triton]'" in why, why
        w = torch.nn.Parameter(torch.ones(3))
        opt = fastsam.SAM([w], torch.optim.SGD, lr=0.1)
        (w ** 2).sum().backward(); opt.first_step(zero_grad=True)
        (w ** 2).sum().backward(); opt.second_step(zero_grad=True)
        print("trained", w.tolist())
    """))
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-2000:]


def test_import_fastsam_imports_no_integration_library():
    proc = python(textwrap.dedent("""
        import sys, fastsam, fastsam.integrations
        heavy = sorted(m for m in ("transformers", "timm", "torchvision", "accelerate", "lightning", "matplotlib")
                       if m in sys.modules)
        print("imported:", heavy)
    """))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "imported: []"


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    from fastsam.bench import harness

    results = tmp_path / "results.csv"
    harness.append_rows([dict(op="copy", provider="torch", size="copy", metric="gbps", value="1.0",
                              device="CPU test")], results)
    proc = python(hiding("matplotlib") + f"import sys; sys.argv = ['plot', '--results', {str(results)!r}]\n"
                  "import runpy; runpy.run_module('fastsam.bench.plot', run_name='__main__')", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "fastsam.bench.plot: matplotlib is not installed: pip install 'fastsam[bench]' " \
                                  "(or matplotlib)"


def test_results_path_rules(tmp_path, monkeypatch):
    from fastsam.bench import harness

    assert harness.results_path(tmp_path) == tmp_path / "results.csv"
    assert harness.results_path(tmp_path / "x.csv") == tmp_path / "x.csv"
    assert harness.results_path(tmp_path, "backends.csv") == tmp_path / "backends.csv"
    monkeypatch.chdir(tmp_path)
    assert harness.results_path() == tmp_path / "results.csv", "outside the source tree: the current directory"
    if harness.SOURCE_ROOT is not None:  # an editable install / checkout: inside it, the stored results
        monkeypatch.chdir(harness.SOURCE_ROOT / "tests")
        assert harness.results_path() == harness.SOURCE_ROOT / "bench" / "results" / "results.csv"
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="not a fastsam results file"):
        harness.append_rows([dict(op="copy")], other)
    assert other.read_text() == "a,b\n1,2\n", "a foreign file is left alone"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding a non-editable fastsam (built from this checkout) over this environment's packages."""
    where = tmp_path_factory.mktemp("installed")
    env_dir = where / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False, symlinks=True)
    exe = env_dir / "bin" / "python"
    # The outer interpreter's pip installs into the venv (--prefix would miss the venv's scripts dir, so
    # --python); no build isolation: setuptools and torch come from this environment, offline.
    build = subprocess.run([sys.executable, "-m", "pip", "--python", str(exe), "install", "--no-deps",
                            "--no-build-isolation", "--no-warn-script-location", "--quiet", str(ROOT)],
                           capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, FASTSAM_BUILD_CUDA="0"))
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    probe = python("import fastsam, fastsam.bench.harness as h; print(fastsam.__file__); print(h.SOURCE_ROOT)",
                   exe=exe, cwd=where)
    assert probe.returncode == 0, probe.stderr[-2000:]
    file, source_root = probe.stdout.split()
    assert str(env_dir) in file and "site-packages" in file, f"the venv's copy must serve, got {file}"
    assert source_root == "None"
    return exe, Path(file).parent, where


def run_installed(exe, *args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.slow
def test_installed_bench_report_plot(installed):
    exe, package, where = installed
    work = where / "work"
    work.mkdir()
    out = where / "results"
    proc = run_installed(exe, "-m", "fastsam", "bench", "--plan", "tiny", "--threads", "1", "--no-progress",
                         "--out", str(out), cwd=work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} >= {"copy", "grad_norm", "sam_step_sgd", "sds_select"}
    assert all(r["commit"].startswith("fastsam-") for r in rows), "an installed package names its version"

    # python -m fastsam.bench is the same driver; its default output is the current directory.
    proc = run_installed(exe, "-m", "fastsam.bench", "--plan", "tiny", "--only", "sds_select", "--threads", "1",
                         "--no-progress", cwd=work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (work / "results.csv").is_file()
    written = [p for p in package.rglob("*") if p.suffix in (".csv", ".png")]
    assert not written, f"nothing may be written into site-packages: {written}"

    proc = run_installed(exe, "-m", "fastsam.bench.report", "--results", str(out), "--print", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rows[0]["device"] in proc.stdout and "| sam_step_sgd | tiny" in proc.stdout
    proc = run_installed(exe, "-m", "fastsam.bench.report", "--results", str(out), cwd=work)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"no README file {work / 'README.md'}" in proc.stderr
    readme = work / "README.md"
    readme.write_text("# mine\n\n<!-- bench:begin -->\n<!-- bench:end -->\n")
    proc = run_installed(exe, "-m", "fastsam.bench.report", "--results", str(out), cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| sam_step_sgd | tiny" in readme.read_text() and "(../results/" in readme.read_text()

    proc = run_installed(exe, "-m", "fastsam.bench.plot", "--results", str(out / "results.csv"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.suffix for p in out.iterdir()].count(".png") == 1
    proc = run_installed(exe, "-m", "fastsam.bench.plot", "--results", str(where / "missing.csv"), cwd=work)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "missing.csv" in proc.stderr
