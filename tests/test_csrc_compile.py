"""CI compile check for csrc/: every kernel file builds with nvcc for sm_80 and sm_90 (warnings are
errors), the kernel files stay torch-free, and the torch binding type-checks against this torch's
headers. Compile-only: nothing runs on a GPU. Skipped with a message where nvcc is absent.
"""

import re
import shutil
from pathlib import Path

import pytest

from fastsam import _extension
from nvcc_tools import (CHECK_ARCHS, CSRC, binding_syntax_check, compile_all, cuda_include_dir, find_nvcc,
                        kernel_sources)

OPS_WITH_KERNELS = {"grad_norm", "perturb", "restore", "restore_sgd_step", "restore_adamw_step", "sds_select",
                    "sds_weights", "grad_mix", "ema_direction",
                    "per_tensor_norm", "perturb_per_tensor",  # layer-wise perturbation (AWP, HERO)
                    "momentum_sam", "sampa_extrapolate",  # Momentum-SAM, SAMPa
                    "bsam_noise", "bsam_ascent", "bsam_step"}  # Bayesian SAM


def _nvcc_or_skip() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA compile check needs the CUDA toolkit (skipped, not failed)")
    return nvcc


def test_one_kernel_file_per_op():
    assert {p.stem for p in kernel_sources()} == OPS_WITH_KERNELS


def test_kernel_files_are_torch_free():
    """Only binding.cpp may include torch; the kernels must build with a plain nvcc anywhere."""
    for path in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        torchy = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "Python.h", "pybind11")]
        assert not torchy, f"{path.name} includes {torchy}"


def test_abi_version_matches_the_python_side():
    declared = re.search(r"kAbiVersion\s*=\s*(\d+)", (CSRC / "launchers.h").read_text())
    assert declared and int(declared.group(1)) == _extension.ABI_VERSION


def test_every_kernel_file_compiles_for_sm80_and_sm90():
    nvcc = _nvcc_or_skip()
    assert CHECK_ARCHS == ("80", "90")
    results = compile_all(nvcc)
    assert set(results) == {p.name for p in kernel_sources()}
    failed = {name: out for name, (ok, out) in results.items() if not ok}
    assert not failed, "\n\n".join(f"{name}:\n{out}" for name, out in failed.items())


def test_binding_type_checks_against_torch_headers():
    import torch

    nvcc = _nvcc_or_skip()
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_include = cuda_include_dir(nvcc)
    torch_include = Path(torch.__file__).resolve().parent / "include"
    if cxx is None:
        pytest.skip("no C++ compiler")
    if cuda_include is None:
        pytest.skip("the CUDA toolkit's headers were not found")
    if not (torch_include / "c10" / "cuda" / "CUDAStream.h").is_file():
        pytest.skip("this torch build ships no c10/cuda headers")
    ok, out = binding_syntax_check(cxx, cuda_include)
    assert ok, out


CPP_TO_SCHEMA = {
    "at::TensorList": "Tensor[]",
    "const at::Tensor&": "Tensor",
    "const c10::optional<at::Tensor>&": "Tensor?",
    "double": "float",
    "int64_t": "int",
    "bool": "bool",
    "c10::string_view": "str",
}


def _schema_types(schema: str) -> tuple[list[str], str]:
    args, ret = re.fullmatch(r"\w+\((.*)\) -> (.*)", schema).groups()
    types = [re.sub(r"\([a-z]!?\)", "", a.strip().rsplit(" ", 1)[0]) for a in args.split(",") if a.strip()]
    return types, ret.strip()


def test_cpp_signatures_match_the_schemas():
    """torch checks this only when the extension loads on a GPU machine; check it here from the source."""
    text = (CSRC / "binding.cpp").read_text()
    schemas = {s.split("(", 1)[0]: s for s in re.findall(r'm\.def\(\s*"([^"]+)"', text)}
    impls = dict(re.findall(r'm\.impl\("(\w+)", &fastsam::cuda::(\w+)\)', text))
    assert set(impls) == set(schemas) - {"abi_version"}
    for name, fn in impls.items():
        ret, params = re.search(rf"\n(at::Tensor|void) {fn}\(([^)]*(?:\)[^{{]*?)?)\) {{", text).groups()
        cpp = [CPP_TO_SCHEMA[re.sub(r"\s+", " ", p.strip()).rsplit(" ", 1)[0]] for p in params.split(",")]
        types, schema_ret = _schema_types(schemas[name])
        assert cpp == types, f"{name}: C++ takes {cpp}, the schema declares {types}"
        assert {"at::Tensor": "Tensor", "void": "()"}[ret] == schema_ret, name
