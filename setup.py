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


def cuda_extension():
    """Return (ext_modules, cmdclass) for fastsam._C, or empty ones with a one-line reason."""
    flag = os.environ.get("FASTSAM_BUILD_CUDA", "").strip()
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
    ext = CUDAExtension(
        name="fastsam._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-lineinfo", "-std=c++17"]},
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
    install_requires=["torch>=2.11", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "train": ["scikit-learn"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "triton>=3.6"],
        "bench": ["pytest-benchmark", "matplotlib", "triton>=3.6", "pytorch-optimizer"],
    },
    entry_points={"console_scripts": ["fastsam=fastsam.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
