"""Building and loading the CUDA extension: setup.py's decision, and what a missing, broken or stale
extension does at run time (nothing breaks; `fastsam info` says why)."""

import importlib
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastsam import _extension
from fastsam.ops import _dispatch

ROOT = Path(__file__).resolve().parent.parent


def run_setup(**env):
    full = {k: v for k, v in __import__("os").environ.items() if k != "FASTSAM_BUILD_CUDA"}
    full.update(env)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)


def fastsam_lines(text):
    return [line for line in text.splitlines() if line.startswith("fastsam:")]


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA: setup.py would build")
def test_setup_skips_the_extension_with_one_line_on_a_cpu_torch():
    out = run_setup()
    assert out.returncode == 0, out.stderr
    assert fastsam_lines(out.stderr) == ["fastsam: not building the CUDA extension (this torch build has no CUDA "
                                         "support); Triton/torch backends will serve"]


def test_setup_env_switch():
    off = run_setup(FASTSAM_BUILD_CUDA="0")
    assert off.returncode == 0
    assert fastsam_lines(off.stderr) == ["fastsam: FASTSAM_BUILD_CUDA=0, not building the CUDA extension"]
    bad = run_setup(FASTSAM_BUILD_CUDA="yes")
    assert bad.returncode != 0 and "FASTSAM_BUILD_CUDA must be 0 or 1" in bad.stderr
    if torch.version.cuda is None:
        forced = run_setup(FASTSAM_BUILD_CUDA="1")
        assert forced.returncode != 0
        assert ("FASTSAM_BUILD_CUDA=1 but the CUDA extension cannot be built: this torch build has no CUDA"
                in forced.stderr)


def test_toolkit_major_version_must_match_torch(monkeypatch):
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("FASTSAM_BUILD_CUDA", "0")
    module = runpy.run_path(str(ROOT / "setup.py"), run_name="fastsam_setup_under_test")
    mismatch = module["toolkit_mismatch"]
    assert mismatch("12.8", "12.4") is None and mismatch("13.0", "13.0") is None
    message = mismatch("12.8", "13.0")
    assert "13.0" in message and "12.8" in message and "major" in message


@pytest.fixture
def fresh_extension_state(monkeypatch):
    """Forget the load result before and after (the real state is restored)."""
    saved = (_extension._module, _extension._reason)
    _extension._module, _extension._reason = None, None
    _dispatch.clear_caches()
    yield
    _extension._module, _extension._reason = saved
    _dispatch.clear_caches()


def _fail_import(monkeypatch, exc):
    real = importlib.import_module

    def fake(name, *args):
        if name == "fastsam._C":
            raise exc
        return real(name, *args)

    monkeypatch.setattr(_extension.importlib, "import_module", fake)


def test_missing_extension_never_breaks_import_and_is_explained():
    code = ("import fastsam, torch; from fastsam import ops, _extension; ok, why = _extension.status(); "
            "print(ok, why); assert ops.resolve('perturb', 'auto', torch.device('cpu'), torch.float32)[0] == 'torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if not out.stdout.startswith("True"):
        assert "not built" in out.stdout and "FASTSAM_CUDA_JIT" in out.stdout


def test_broken_extension_is_reported_not_raised(monkeypatch, fresh_extension_state):
    _fail_import(monkeypatch, OSError("undefined symbol: _ZN3c10"))
    assert _extension.load() is None
    ok, why = _extension.status()
    assert not ok and "failed to load: OSError: undefined symbol" in why
    assert _dispatch.backend_status("cuda") == (False, why)


def test_stale_build_is_refused(monkeypatch, fresh_extension_state):
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name, *a: types.ModuleType(name))
    monkeypatch.setattr(_extension, "_loaded_abi", lambda: _extension.ABI_VERSION + 1)
    assert _extension.load() is None
    assert "built from other sources" in _extension.status()[1]


def test_jit_is_opt_in_and_reports_its_failure(monkeypatch, fresh_extension_state):
    missing = ModuleNotFoundError("No module named 'fastsam._C'", name="fastsam._C")
    _fail_import(monkeypatch, missing)
    built = []
    monkeypatch.setattr(_extension, "build_jit", lambda verbose=False: built.append(1))
    _extension.load()
    assert built == [], "no JIT build unless asked for"
    _extension._reason = None
    monkeypatch.setenv(_extension.JIT_ENV, "1")
    _extension.load()
    assert built == [1]


@pytest.mark.skipif(torch.version.cuda is not None, reason="with CUDA torch a JIT build could really run")
def test_jit_build_without_cuda_torch_says_why(fresh_extension_state):
    assert _extension.build_jit() is None
    assert "JIT build of the CUDA extension failed" in _extension.status()[1]
    assert "no CUDA support" in _extension.status()[1]


def _setup_module(monkeypatch):
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("FASTSAM_BUILD_CUDA", "0")
    return runpy.run_path(str(ROOT / "setup.py"), run_name="fastsam_setup_under_test")


def _fake_toolkit(root: Path, headers: bool = True) -> Path:
    """A toolkit whose nvcc answers --version and --dryrun the way nvcc 13.0 does."""
    (root / "bin").mkdir(parents=True)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("#pragma once\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n"
                    'case "$*" in *--version*) echo "Cuda compilation tools, release 13.0, V13.0.48";; '
                    f'*--dryrun*) echo "#\\$ _HERE_={root}/bin" >&2; echo "#\\$ TOP={root}/bin/.." >&2;; esac\n')
    nvcc.chmod(0o755)
    return nvcc


def _wrapper(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True)
    path.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    path.chmod(0o755)
    return path


def test_toolkit_root_behind_a_wrapper_script(monkeypatch, tmp_path):
    """torch's guess dirname(dirname(which nvcc)) is /usr/local for /usr/local/bin/nvcc; setup.py asks nvcc."""
    setup = _setup_module(monkeypatch)
    real = tmp_path / "cuda-13.0"
    wrapper = _wrapper(tmp_path / "usr" / "bin" / "nvcc", _fake_toolkit(real))
    assert not setup["has_cuda_headers"](str(tmp_path / "usr"))
    assert setup["nvcc_reported_root"](str(wrapper)) == str(real)
    assert setup["find_toolkit_root"](str(wrapper)) == str(real)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:/bin:/usr/bin")
    assert setup["cuda_home_from_environment"]() == (str(real), None)


def test_toolkit_root_through_a_symlink(monkeypatch, tmp_path):
    setup = _setup_module(monkeypatch)
    real = tmp_path / "cuda"
    link = tmp_path / "bin" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(_fake_toolkit(real))
    assert setup["find_toolkit_root"](str(link)) == str(real)


def test_toolkit_without_headers_says_to_set_cuda_home(monkeypatch, tmp_path):
    setup = _setup_module(monkeypatch)
    wrapper = _wrapper(tmp_path / "usr" / "bin" / "nvcc", _fake_toolkit(tmp_path / "cuda", headers=False))
    assert setup["find_toolkit_root"](str(wrapper)) is None
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:/bin:/usr/bin")
    root, why = setup["cuda_home_from_environment"]()
    assert root is None and "\n" not in why and why.endswith("set CUDA_HOME to the toolkit root")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "usr"))
    root, why = setup["cuda_home_from_environment"]()
    assert root is None and f"CUDA_HOME={tmp_path / 'usr'} has no include/cuda_runtime.h" in why


def test_local_nvcc_resolves_to_a_toolkit_with_headers(monkeypatch):
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    setup = _setup_module(monkeypatch)
    root = setup["find_toolkit_root"](nvcc)
    assert root is not None and (Path(root) / "include" / "cuda_runtime.h").is_file()


def test_extension_loader_knows_nothing_of_the_op_layer():
    """One-way imports: fastsam._extension loads and reports; fastsam.ops asks it (no import circle)."""
    import ast

    tree = ast.parse((ROOT / "fastsam" / "_extension.py").read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [f"{'.' * node.level}{node.module or ''}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in imported if "ops" in m.split(".") or m.startswith(".")], imported


def test_dispatch_sees_a_later_load(monkeypatch, fresh_extension_state):
    """A load after dispatch decided (e.g. an explicit build_jit) invalidates the decisions taken before."""
    _fail_import(monkeypatch, ModuleNotFoundError("No module named 'fastsam._C'", name="fastsam._C"))
    assert _dispatch.backend_status("cuda")[0] is False
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name, *a: types.ModuleType(name))
    monkeypatch.setattr(_extension, "_loaded_abi", lambda: _extension.ABI_VERSION)
    _extension._reason = None
    assert _extension.load() is not None
    _dispatch.resolve("restore", "auto", torch.device("cpu"), torch.float32)
    assert _dispatch._status_cache.get("cuda") is None, "stale availability kept after the extension loaded"
