"""The extension's architectures against the GPU's, before the first launch (fastsam/_fatbin.py).

Small libraries are compiled here with nvcc for chosen targets; their embedded fat binaries are
read back and judged against compute capabilities the way nvcc's compatibility rules say (SASS:
same major, minor at most the GPU's; PTX: JIT for any later GPU). Then the dispatch layer, with a
fake "loaded extension" built for sm_80 only and a fake sm_90 GPU: the cuda backend is unavailable
on that GPU (auto falls back, an explicit request raises with the reason), though nothing else was
ever checked on CUDA before (the case where a CPU-only call had accepted the extension).
Skipped without nvcc.
"""

import subprocess
import sys

import pytest
import torch

from fastsam import _extension, _fatbin, ops
from fastsam.ops import _autotune, _cuda_common, _dispatch
from nvcc_tools import find_nvcc

SOURCE = """
__global__ void bump(float* x) { x[threadIdx.x] += 1.0f; }
extern "C" void launch_bump(float* x) { bump<<<1, 32>>>(x); }
"""
SECOND = """
__global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }
extern "C" void launch_twice(float* x) { twice<<<1, 32>>>(x); }
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    root = tmp_path_factory.mktemp("fatbin")
    (root / "a.cu").write_text(SOURCE)
    (root / "b.cu").write_text(SECOND)

    def make(name, *gencode):
        out = root / f"{name}.so"
        if out.exists():
            return out
        subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-Wno-deprecated-gpu-targets", *gencode,
                        str(root / "a.cu"), str(root / "b.cu"), "-o", str(out)], check=True, capture_output=True)
        return out

    return make


def test_sass_runs_on_the_same_major_only(build):
    lib = build("sm80", "-gencode=arch=compute_80,code=sm_80")
    assert _fatbin.incompatibility(lib, 8, 0) == ""
    assert _fatbin.incompatibility(lib, 8, 6) == "", "sm_80 SASS runs on sm_86"
    why = _fatbin.incompatibility(lib, 9, 0)
    assert why and "sm_80" in why and "sm_90" in why and 'TORCH_CUDA_ARCH_LIST="9.0"' in why
    assert _fatbin.incompatibility(lib, 7, 5), "nor on an older GPU"


def test_ptx_is_jit_compiled_for_later_gpus(build):
    lib = build("sm80_ptx90", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=[sm_90,compute_90]")
    units = _fatbin.fatbin_entries(_fatbin._elf_section(lib.read_bytes(), ".nv_fatbin"))
    kernel_units = [u for u in units if (_fatbin.KIND_PTX, 90) in u]
    assert len(kernel_units) == 2, units  # one per source file, each with sm_80 + sm_90 SASS + compute_90 PTX
    assert all(sorted(u) == [(1, 90), (2, 80), (2, 90)] for u in kernel_units)
    for cc in ((8, 0), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert _fatbin.incompatibility(lib, *cc) == "", cc
    assert _fatbin.incompatibility(lib, 7, 5)


def test_files_without_device_code_give_no_verdict(tmp_path):
    assert _fatbin.incompatibility(sys.executable, 9, 0) is None
    assert _fatbin.incompatibility(tmp_path / "missing.so", 9, 0) is None
    (tmp_path / "junk.so").write_bytes(b"\x7fELF" + bytes(100))
    assert _fatbin.incompatibility(tmp_path / "junk.so", 9, 0) is None


@pytest.fixture
def fake_sm90_with_sm80_extension(build, monkeypatch):
    lib = build("sm80", "-gencode=arch=compute_80,code=sm_80")

    class Module:
        __file__ = str(lib)

    monkeypatch.setattr(_extension, "_module", Module())
    monkeypatch.setattr(_cuda_common, "register_fakes", lambda: None)  # no real operators behind it
    monkeypatch.setattr(_autotune, "ensure_measured_order", lambda device: None)  # no real GPU to measure
    monkeypatch.setattr(_extension, "_reason", None)
    monkeypatch.setattr(_extension, "generation", _extension.generation + 1000)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0) if index == 1 else (8, 0))
    _dispatch.clear_caches()
    yield
    _dispatch.clear_caches()


def test_the_cuda_backend_is_refused_on_a_gpu_its_build_cannot_run(fake_sm90_with_sm80_extension):
    ok, why = ops.supports("cuda", "restore", torch.device("cuda", 1), torch.float32)
    assert not ok and "sm_80" in why and "sm_90" in why
    ok, why = ops.supports("cuda", "restore", torch.device("cuda", 0), torch.float32)
    assert ok, "an sm_80 GPU runs the sm_80 build"
    with pytest.raises(ops.BackendUnavailableError, match="sm_90"):
        _dispatch.resolve("restore", "cuda", torch.device("cuda", 1), torch.float32)
    name, _ = _dispatch.resolve("restore", "auto", torch.device("cuda", 1), torch.float32)
    assert name != "cuda", "auto falls back on the GPU the build cannot run"
