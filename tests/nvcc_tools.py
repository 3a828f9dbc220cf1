"""Compiling csrc/ without a GPU: the nvcc compile check, the binding's syntax check, and the host
emulation library the CPU tests run the kernels' code through.

Builds are cached by content (sources, flags, compiler version) under ``FASTSAM_NVCC_CACHE``
(default: a ``fastsam-nvcc-cache`` folder in the system temp directory), so a second test run
costs nothing; a fresh CI machine compiles once, in parallel.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMULATION_SOURCE = Path(__file__).resolve().parent / "csrc" / "host_emulation.cu"

# The compile check targets: Ampere (A100) and Hopper (H100/H200).
CHECK_ARCHS = ("80", "90")
# torch's extension builds add TORCH_NVCC_DEFINES to every nvcc call (no implicit half/bf16 conversions
# or operators); the check compiles under the same restrictions, with warnings as errors.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Wno-deprecated-gpu-targets", *TORCH_NVCC_DEFINES,
              "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def find_nvcc() -> str | None:
    """nvcc from PATH, CUDA_HOME/CUDA_PATH, or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def cuda_include_dir(nvcc: str) -> Path | None:
    """The toolkit's include directory (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [Path(nvcc).resolve().parent.parent / "include"]
    candidates += [Path(r) / "include" for r in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if r]
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


def nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()


def kernel_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.name.encode())
            h.update(part.read_bytes())
        else:
            h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    path = Path(os.environ.get("FASTSAM_NVCC_CACHE") or Path(tempfile.gettempdir()) / "fastsam-nvcc-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _headers() -> list[Path]:
    return sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))


def _run(cmd: list[str], timeout: int = 600) -> tuple[int, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def compile_kernel(nvcc: str, source: Path, archs=CHECK_ARCHS) -> tuple[bool, str]:
    """Compile one kernel file to an object for every arch (one nvcc call); (ok, compiler output)."""
    key = _digest(nvcc_version(nvcc), NVCC_FLAGS, archs, source, *_headers())
    marker = cache_dir() / f"compiled-{source.stem}-{key}.ok"
    if marker.exists():
        return True, "cached"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        code, out = _run([nvcc, *NVCC_FLAGS, *gencode, f"-I{CSRC}", "-c", str(source), "-o", str(Path(tmp) / "k.o")])
    if code == 0:
        marker.write_text(out)
    return code == 0, out


def compile_all(nvcc: str, sources=None, workers: int | None = None) -> dict[str, tuple[bool, str]]:
    sources = kernel_sources() if sources is None else sources
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: (s.name, compile_kernel(nvcc, s)), sources)
        return dict(results)


def build_emulation_library(nvcc: str) -> Path:
    """The host emulation shared library (tests/csrc/host_emulation.cu + csrc/), built once per content."""
    flags = ["-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", "-Werror", "all-warnings",
             "-Wno-deprecated-gpu-targets", *TORCH_NVCC_DEFINES]
    key = _digest(nvcc_version(nvcc), flags, EMULATION_SOURCE, *kernel_sources(), *_headers())
    out = cache_dir() / f"libfastsam_emulation-{key}.so"
    if out.exists():
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    code, log = _run([nvcc, *flags, f"-I{CSRC}", str(EMULATION_SOURCE), "-o", str(tmp)])
    if code != 0:
        raise RuntimeError(f"building the host emulation library failed:\n{log}")
    os.replace(tmp, out)
    return out


def binding_syntax_check(cxx: str, cuda_include: Path) -> tuple[bool, str]:
    """Type-check csrc/binding.cpp against this torch's headers (a CPU wheel ships the CUDA headers too).

    Linking needs a CUDA build of torch, so this stops at ``-fsyntax-only``. The CPU wheel lacks one
    generated header (c10/cuda/impl/cuda_cmake_macros.h, a build-configuration stub); an empty one
    stands in for it.
    """
    import torch

    torch_include = Path(torch.__file__).resolve().parent / "include"
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp) / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DTORCH_EXTENSION_NAME=_C",
               f"-I{CSRC}"]
        for inc in (torch_include, torch_include / "torch" / "csrc" / "api" / "include", cuda_include,
                    Path(sysconfig.get_paths()["include"]), Path(tmp)):
            cmd += ["-isystem", str(inc)]
        code, out = _run(cmd + [str(CSRC / "binding.cpp")])
    return code == 0, out


def main() -> int:
    """``python tests/nvcc_tools.py``: the compile check by hand."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found")
        return 1
    failed = 0
    for name, (ok, out) in compile_all(nvcc).items():
        print(f"{name}: {'ok' if ok else 'FAILED'}")
        if not ok:
            failed += 1
            print(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
