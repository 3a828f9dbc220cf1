"""``nvcc --resource-usage`` for every file in ``csrc/`` (sm_90, sm_80), as result rows like triton_aot's.

``python tests/gpuless/csrc_resources.py --out rows.csv``. The kernel files are torch-free, so they
compile here with the compile check's flags (tests/nvcc_tools.py: torch's nvcc defines, -O3,
warnings as errors); the cubin is then read by :mod:`gpuless.sass`. Multi-tensor kernels are the
``body_kernel`` instantiations of ``csrc/multi_tensor_apply.cuh``: streaming, and their aligned path
must use 128-bit accesses.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: nvcc_tools, gpuless

import nvcc_tools  # noqa: E402
from gpuless import sass  # noqa: E402
from gpuless.triton_aot import FIELDS  # noqa: E402


# The multi-tensor streaming kernels (csrc/multi_tensor_apply.cuh bodies): register limit, 128-bit path.
STREAMING_BODIES = re.compile(r"\b(RestoreBody|PerturbBody|SgdBody|AdamWBody|NormChunkBody|BsamNoiseBody|BsamAscentBody"
                              r"|BsamStepBody)<")


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """``fastsam::cuda::body_kernel<fastsam::cuda::RestoreBody<float>, ...>`` -> ``RestoreBody<float>``."""
    m = re.search(r"body_kernel<fastsam::cuda::(\w+<[^>]*>)", name)
    if m:
        return m.group(1).replace("fastsam::cuda::", "")
    return re.sub(r"\(.*$", "", name).replace("fastsam::cuda::", "")


def rows_for(nvcc: str, source: Path, arch: int, version: str) -> list[dict]:
    t0 = time.perf_counter()
    base = {"kernel": source.name, "target": f"sm_{arch}", "toolchain": f"nvcc {version}"}
    try:
        functions, _report = sass.nvcc_cubin(nvcc, source, arch, nvcc_tools.NVCC_FLAGS, [nvcc_tools.CSRC])
    except Exception as exc:
        return [{**base, "variant": "-", "error": str(exc).splitlines()[0]}]
    names = demangle(list(functions))
    rows = []
    for mangled, code in functions.items():
        c = code.counts
        multi = bool(STREAMING_BODIES.search(names[mangled]))
        rows.append({**base, "variant": short(names[mangled]), "registers": code.registers, "spills": code.spills,
                     "stack": code.stack, "local": code.local, "shared": code.shared,
                     "widest_load": c["widest_load"], "widest_store": c["widest_store"], "ldg": c["LDG"],
                     "stg": c["STG"], "ldg128": c["LDG.128"], "stg128": c["STG.128"], "streaming": int(multi),
                     "vector_path": int(multi), "compile_s": round(time.perf_counter() - t0, 2)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--archs", default="90,80")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    nvcc = nvcc_tools.find_nvcc()
    if nvcc is None:
        print("gpuless: nvcc not found", file=sys.stderr)
        return 2
    version = re.search(r"release (\d+\.\d+)", nvcc_tools.nvcc_version(nvcc))
    version = version.group(1) if version else "?"
    jobs = [(s, int(a)) for s in nvcc_tools.kernel_sources() for a in args.archs.split(",")]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = [r for batch in pool.map(lambda j: rows_for(nvcc, j[0], j[1], version), jobs) for r in batch]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS + ["error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"gpuless: nvcc {version}: {len(jobs)} csrc files x arch -> {len(rows)} kernels in "
          f"{time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
