"""Reading compiled GPU code without a GPU: SASS, registers, spills, shared memory, vector widths.

Reusable by any check that asks "what did the compiler make of this kernel":

* :func:`triton_cubin` compiles one Triton kernel variant ahead of time for ``sm_<arch>``
  (``triton.compile`` with a ``GPUTarget``; no driver, but the process must not have
  ``TRITON_INTERPRET`` set);
* :func:`nvcc_cubin` compiles one ``csrc/`` file for ``sm_<arch>`` (``nvcc -cubin --resource-usage``);
* :func:`read_cubin` runs ``cuobjdump`` (the copy inside the triton wheel serves) for the resource
  usage and the SASS, and returns one :class:`KernelCode` per function;
* :func:`parse_sass`, :func:`parse_resource_usage` and :func:`summarize` are the pure parsers, tested
  on known listings in ``tests/test_gpuless_sass.py``.

[note: what counts as a spill]
``n_spills`` of a loaded Triton kernel needs a driver. Without one, local memory shows in two
places: the ``LOCAL`` (and ``STACK``) figure of ``cuobjdump --dump-resource-usage`` and ``STL``/``LDL``
instructions in the SASS. Both are reported; the SASS instructions are what the rules test.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RESOURCE_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RESOURCE_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*(.+?)\s*;")


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, next to the real nvcc, or the copy inside the triton wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    if nvcc:
        for root in {Path(nvcc).resolve().parent, Path(nvcc).parent}:
            if (root / "cuobjdump").is_file():
                return str(root / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def opcode(instruction: str) -> str:
    """``LDG.E.128`` from ``@!P1 LDG.E.128 R4, desc[UR4][R2.64]`` (the predicate dropped)."""
    parts = instruction.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def parse_sass(text: str) -> dict[str, list[str]]:
    """``cuobjdump -sass`` output -> {function name: instructions (without addresses and encodings)}."""
    functions: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            current.append(m.group(1))
    return functions


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` (or ``nvcc --resource-usage``'s cuobjdump-style) output ->
    {function name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _RESOURCE_FUNCTION.match(line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            usage[current] = {k: int(v) for k, v in _RESOURCE_FIELD.findall(line)}
            current = None
    return usage


def access_bits(op: str) -> int:
    """Width in bits of a global load/store opcode (``LDG.E`` 32, ``LDG.E.64`` 64, ``STG.E.U16`` 16...)."""
    parts = op.split(".")
    for p in parts[1:]:
        if p in ("64", "128", "256"):
            return int(p)
        if p in ("U8", "S8"):
            return 8
        if p in ("U16", "S16"):
            return 16
    return 32


@dataclasses.dataclass
class KernelCode:
    """What the compiler made of one kernel for one arch."""

    name: str
    arch: int
    registers: int
    stack: int            # bytes of stack frame (cuobjdump STACK)
    local: int            # bytes of local memory (cuobjdump LOCAL)
    shared: int           # bytes of static shared memory (+ Triton's dynamic shared, see triton_cubin)
    instructions: list[str]

    @property
    def counts(self) -> dict[str, int]:
        return summarize(self.instructions)

    @property
    def spills(self) -> int:
        """Local-memory instructions in the SASS (``STL``/``LDL``): 0 for a spill-free kernel."""
        c = self.counts
        return c["STL"] + c["LDL"]

    @property
    def widest_load(self) -> int:
        return self.counts["widest_load"]

    @property
    def widest_store(self) -> int:
        return self.counts["widest_store"]


def summarize(instructions: list[str]) -> dict[str, int]:
    """Counts the checks need: global loads/stores (all, 128-bit), local-memory traffic, widest access."""
    c = {"LDG": 0, "STG": 0, "LDG.128": 0, "STG.128": 0, "STL": 0, "LDL": 0, "widest_load": 0, "widest_store": 0,
         "instructions": len(instructions)}
    for ins in instructions:
        op = opcode(ins)
        head = op.split(".", 1)[0]
        if head in ("LDG", "STG"):
            c[head] += 1
            bits = access_bits(op)
            if bits == 128:
                c[f"{head}.128"] += 1
            key = "widest_load" if head == "LDG" else "widest_store"
            c[key] = max(c[key], bits)
        elif head in ("STL", "LDL"):
            c[head] += 1
    return c


def _run(cmd: list[str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def read_cubin(cubin: Path, arch: int, cuobjdump: str | None = None, extra_shared: int = 0) -> dict[str, KernelCode]:
    """{function: KernelCode} of every function in a cubin (or an object/fatbin with one arch)."""
    cuobjdump = cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (install triton, whose wheel ships one, or a CUDA toolkit)")
    usage = parse_resource_usage(_run([cuobjdump, "--dump-resource-usage", str(cubin)]))
    sass = parse_sass(_run([cuobjdump, "-sass", str(cubin)]))
    out = {}
    for name, code in sass.items():
        u = usage.get(name, {})
        out[name] = KernelCode(name, arch, u.get("REG", 0), u.get("STACK", 0), u.get("LOCAL", 0),
                               u.get("SHARED", 0) + extra_shared, code)
    return out


def triton_compile(fn, signature: dict[str, str], constexprs: dict, arch: int, num_warps: int = 4,
                   aligned_args: tuple[str, ...] = ()):
    """``triton.compile`` of one variant of ``fn`` (a ``@triton.jit`` function) for ``sm_<arch>``.

    ``signature`` maps every non-constexpr argument to its Triton type (``"*fp32"``, ``"i64"``...);
    ``aligned_args`` are the arguments the launcher's specialization would mark 16-byte aligned
    (torch allocations are), as ``tt.divisibility=16``.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ahead-of-time compiles need TRITON_INTERPRET unset (it replaces the compiler)")
    names = fn.arg_names
    full = {}
    for name in names:
        if name in constexprs:
            full[name] = "constexpr"
        else:
            full[name] = signature[name]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned_args}
    source = triton.compiler.ASTSource(fn, full, dict(constexprs), attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def triton_cubin(fn, signature: dict[str, str], constexprs: dict, arch: int, num_warps: int = 4,
                 aligned_args: tuple[str, ...] = (), cuobjdump: str | None = None) -> KernelCode:
    """Compile one Triton kernel variant for ``sm_<arch>`` and read its code (see :func:`triton_compile`)."""
    compiled = triton_compile(fn, signature, constexprs, arch, num_warps, aligned_args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        functions = read_cubin(path, arch, cuobjdump, extra_shared=int(getattr(compiled.metadata, "shared", 0)))
    (code,) = functions.values()
    return code


def nvcc_cubin(nvcc: str, source: Path, arch: int, flags: list[str], include: list[Path] = (),
               cuobjdump: str | None = None) -> tuple[dict[str, KernelCode], str]:
    """Compile one CUDA file for ``sm_<arch>`` with ``--resource-usage``; ({function: code}, nvcc's report)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{source.stem}.cubin"
        report = _run([nvcc, *flags, f"-arch=sm_{arch}", "-cubin", "--resource-usage",
                       *[f"-I{i}" for i in include], str(source), "-o", str(cubin)])
        return read_cubin(cubin, arch, cuobjdump), report
