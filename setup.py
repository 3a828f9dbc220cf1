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


def has_cuda_headers(root: str) -> bool:
    """Whether ``root`` is a CUDA toolkit root with its runtime headers (``include/cuda_runtime.h``)."""
    return os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def nvcc_reported_root(nvcc: str) -> str | None:
    """The toolkit root nvcc itself reports (``TOP=`` of a ``--dryrun``), or None.

    nvcc's driver prints the directory it really runs from even when the ``nvcc`` on PATH is a
    wrapper script or a symlink elsewhere (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``).
    """
    import subprocess

    try:
        proc = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    return os.path.normpath(found.group(1).strip()) if found else None


def find_toolkit_root(nvcc: str) -> str | None:
    """The CUDA toolkit root that ``nvcc`` belongs to: the one holding ``include/cuda_runtime.h``.

    torch infers ``CUDA_HOME`` as ``dirname(dirname(which nvcc))``, which is wrong when nvcc is a
    wrapper script (``/usr/local/bin/nvcc`` gives ``/usr/local``, a root without CUDA headers). Tried
    in order: that naive root, the root of the resolved binary (symlinks), and the root nvcc
    reports itself.
    """
    naive = os.path.dirname(os.path.dirname(os.path.abspath(nvcc)))
    resolved = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for root in (naive, resolved):
        if has_cuda_headers(root):
            return root
    reported = nvcc_reported_root(nvcc)
    if reported and has_cuda_headers(reported):
        return reported
    return None


def cuda_home_from_environment() -> tuple[str | None, str | None]:
    """(toolkit root, None) or (None, one-line reason): ``CUDA_HOME``/``CUDA_PATH``, else the nvcc on PATH.

    A reason that ends in "set CUDA_HOME ..." means a toolkit is there but unusable as found: the
    build stops on it rather than skipping (torch would otherwise fail later on a missing header).
    """
    import shutil

    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if not has_cuda_headers(root):
                return None, f"{var}={root} has no include/cuda_runtime.h; set {var} to the CUDA toolkit root"
            return root, None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return (("/usr/local/cuda", None) if has_cuda_headers("/usr/local/cuda") else
                (None, "no CUDA toolkit found (CUDA_HOME unset and nvcc not on PATH)"))
    root = find_toolkit_root(nvcc)
    if root is None:
        return None, (f"cannot find the CUDA toolkit root of {nvcc} (no include/cuda_runtime.h next to it or where "
                      "it reports running from); set CUDA_HOME to the toolkit root")
    return root, None


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
    except Exception as exc:  # torch missing from an isolated build env, or broken
        return skip(f"torch is not importable in the build environment: {exc.__class__.__name__}; "
                    "use `pip install --no-build-isolation`")
    if torch.version.cuda is None:
        return skip("this torch build has no CUDA support")
    cuda_home, why = cuda_home_from_environment()
    if cuda_home is None:
        if "; set CUDA_" in why:
            raise SystemExit(f"fastsam: cannot build the CUDA extension: {why}")
        return skip(why)
    # torch.utils.cpp_extension reads CUDA_HOME once, at import: give it the real root first.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if os.path.normpath(cpp_extension.CUDA_HOME or "") != os.path.normpath(cuda_home):
        cpp_extension.CUDA_HOME = cuda_home  # imported earlier by someone else, with the naive root
    CUDA_HOME = cuda_home
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
        "fastsam.sharpness",
        "fastsam.integrations",
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
        # fastsam.integrations.*: the Hugging Face Trainer (with accelerate, which its Trainer needs) and
        # timm (which pulls torchvision: take the release made for your torch).
        "transformers": ["transformers>=5.0", "accelerate>=1.0"],
        "timm": ["timm>=1.0"],
        # Everything the test suite exercises: the Triton interpreter, the plots and the peer of the
        # benchmarks, the Lightning example, and both integrations.
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "triton>=3.6", "matplotlib", "pytorch-optimizer",
                 "lightning", "transformers>=5.0", "accelerate>=1.0", "timm>=1.0"],
        "bench": ["pytest-benchmark", "matplotlib", "triton>=3.6", "pytorch-optimizer"],
        "examples": ["lightning"],
    },
    entry_points={"console_scripts": ["fastsam=fastsam.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
