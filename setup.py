"""fastsam: fused Sharpness-Aware Minimization for PyTorch.

Build notes
-----------
* The only top-level import name installed is ``fastsam``. The Triton kernels in ``kernels/`` ship as
  ``fastsam.kernels`` and the benchmarks in ``bench/`` as ``fastsam.bench`` (package_dir mapping).
* The CUDA extension ``fastsam._C`` (sources in ``csrc/``) is built only when torch with CUDA and a
  CUDA toolchain are importable in the build environment. ``FASTSAM_BUILD_CUDA=1`` forces the build
  (and fails loudly if it cannot), ``FASTSAM_BUILD_CUDA=0`` skips it. ``TORCH_CUDA_ARCH_LIST`` and
  ``MAX_JOBS`` are honoured as in any torch extension. Because pip builds in an isolated environment
  without torch, building the extension needs ``pip install --no-build-isolation -e .``.
* torch itself is a requirement but is never pinned or pulled here beyond ``>=2.11``: install the
  torch build you want first.
"""

import glob
import os
import re
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "fastsam", "version.py")) as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def nvcc_release(cuda_home: str) -> str | None:
    """``major.minor`` of the toolkit's nvcc, or None if it cannot be run."""
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def toolkit_mismatch(torch_cuda: str, toolkit: str) -> str | None:
    """Why a toolkit cannot build for this torch (major versions differ, as apex refuses), or None."""
    if torch_cuda.split(".")[0] != toolkit.split(".")[0]:
        return (f"the CUDA toolkit is {toolkit} but torch was built with CUDA {torch_cuda}; the major versions must "
                f"match (install a CUDA {torch_cuda.split('.')[0]}.x toolkit and point CUDA_HOME at it)")
    return None


def cuda_extension():
    """Return (ext_modules, cmdclass) for fastsam._C, or empty ones with a one-line reason."""
    flag = os.environ.get("FASTSAM_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"FASTSAM_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        print("fastsam: FASTSAM_BUILD_CUDA=0, not building the CUDA extension", file=sys.stderr)
        return [], {}

    def skip(reason):
        if flag == "1":
            raise RuntimeError(f"fastsam: FASTSAM_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"fastsam: not building the CUDA extension ({reason}); Triton/torch backends will serve",
              file=sys.stderr)
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return skip("no sources in csrc/")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing from an isolated build env, or broken
        return skip(f"torch is not importable in the build environment: {exc.__class__.__name__}; "
                    "use `pip install --no-build-isolation`")
    if torch.version.cuda is None:
        return skip("this torch build has no CUDA support")
    if CUDA_HOME is None:
        return skip("no CUDA toolkit found (CUDA_HOME unset and nvcc not on PATH)")
    toolkit = nvcc_release(CUDA_HOME)
    if toolkit is None:
        return skip(f"nvcc under {CUDA_HOME} did not report its version")
    mismatch = toolkit_mismatch(torch.version.cuda, toolkit)
    if mismatch:
        return skip(mismatch)
    # torch's build honours TORCH_CUDA_ARCH_LIST (default: the visible GPUs, else every arch this torch
    # supports) and MAX_JOBS (parallel ninja jobs); say which applies.
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "torch's default archs"
    print(f"fastsam: building the CUDA extension with CUDA {toolkit} for {archs} "
          f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'default')})", file=sys.stderr)
    ext = CUDAExtension(
        name="fastsam._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -std flag: torch adds the C++ standard its headers need (C++17 or C++20).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="fastsam",
    version=read_version(),
    description="Fused Triton/CUDA kernels and drop-in optimizers for Sharpness-Aware Minimization "
                "(SAM, ASAM, Fisher SAM, ESAM, mSAM, GSAM, LookSAM)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "fastsam",
        "fastsam.ops",
        "fastsam.optim",
        "fastsam.utils",
        "fastsam.kernels",
        "fastsam.bench",
    ],
    package_dir={
        "fastsam": "fastsam",
        "fastsam.kernels": "kernels",
        "fastsam.bench": "bench",
    },
    package_data={"fastsam": ["auto_table.json"]},
    install_requires=["torch>=2.11", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "train": ["scikit-learn"],
        "plot": ["matplotlib"],  # fastsam.sharpness.plot_landscape, fastsam sharpness
        # Everything the test suite exercises: the Triton interpreter, the plots and the peer of the
        # benchmarks, and the Lightning example.
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "triton>=3.6", "matplotlib", "pytorch-optimizer",
                 "lightning"],
        "bench": ["pytest-benchmark", "matplotlib", "triton>=3.6", "pytorch-optimizer"],
        "examples": ["lightning"],
    },
    entry_points={"console_scripts": ["fastsam=fastsam.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
