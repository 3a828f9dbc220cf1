"""The GPU-less stage's own logic (tests/gpuless/), in the CPU suite.

The stage (``bash tests/gpuless/run.sh``) is too slow for the suite, but its verdicts are only as good
as its parts: the SASS / resource-usage reader (checked on excerpts of real cuobjdump output, sm_90,
CUDA 13.0), the variant lists (they must name exactly the constexprs each kernel takes, so a new
launcher flag cannot go uncompiled), the pairwise covering, the rules, and its refusal to pass when
the CUDA torch cannot be installed.
"""

import inspect
import itertools
import os
import subprocess
from pathlib import Path


from gpuless import report, sass, triton_aot

ROOT = Path(__file__).resolve().parent.parent

SASS_LISTING = """
	code for sm_90a
	.target	sm_90a

		Function : perturb_kernel
	.headerflags	@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                 /* 0x00000a00ff017b82 */
                                                                                          /* 0x000fe20000000800 */
        /*00e0*/                   LDG.E.64 R2, desc[UR6][R2.64] ;                        /* 0x0000000602027981 */
        /*0100*/              @!P0 LDG.E.128 R4, desc[UR6][R12.64] ;                      /* 0x0000000a0c04a981 */
        /*0110*/                   STL [R1+0x4], R7 ;                                     /* 0x0000040701007387 */
        /*0120*/                   LDL R7, [R1+0x4] ;                                     /* 0x0000040001077983 */
        /*0130*/                   STG.E.128 desc[UR6][R14.64], R4 ;                      /* 0x000000040e007986 */
        /*0140*/               @P1 STG.E.U16 desc[UR6][R16.64], R9 ;                      /* 0x0000000910001986 */
        /*0150*/                   EXIT ;                                                 /* 0x000000000000794d */
		..........

		Function : sum_partials_kernel
        /*0000*/                   LDG.E R3, desc[UR4][R2.64] ;                           /* 0x0000000402037981 */
        /*0010*/                   STG.E desc[UR4][R4.64], R3 ;                           /* 0x0000000304007986 */
"""

RESOURCE_LISTING = """
Resource usage:
 Common:
  GLOBAL:0
 Function perturb_kernel:
  REG:128 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function sum_partials_kernel:
  REG:14 STACK:0 SHARED:32 LOCAL:0 CONSTANT[0]:536 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_sass_functions_and_instructions():
    functions = sass.parse_sass(SASS_LISTING)
    assert list(functions) == ["perturb_kernel", "sum_partials_kernel"]
    assert functions["perturb_kernel"][2] == "@!P0 LDG.E.128 R4, desc[UR6][R12.64]"
    assert len(functions["perturb_kernel"]) == 8 and len(functions["sum_partials_kernel"]) == 2


def test_counts_spills_and_vector_widths():
    c = sass.summarize(sass.parse_sass(SASS_LISTING)["perturb_kernel"])
    assert (c["LDG"], c["STG"], c["LDG.128"], c["STG.128"]) == (2, 2, 1, 1)
    assert (c["STL"], c["LDL"]) == (1, 1)
    assert (c["widest_load"], c["widest_store"]) == (128, 128)
    plain = sass.summarize(sass.parse_sass(SASS_LISTING)["sum_partials_kernel"])
    assert (plain["STL"], plain["LDL"], plain["widest_load"], plain["LDG.128"]) == (0, 0, 32, 0)


def test_opcodes_and_widths():
    assert sass.opcode("@!P1 LDG.E.128 R4, desc[UR4][R2.64]") == "LDG.E.128"
    assert sass.opcode("STG.E.64 desc[UR4][R2.64], R4") == "STG.E.64"
    assert [sass.access_bits(o) for o in ("LDG.E", "LDG.E.64", "LDG.E.128", "STG.E.U16", "LDG.E.U8.CONSTANT")] == \
        [32, 64, 128, 16, 8]


def test_resource_usage():
    usage = sass.parse_resource_usage(RESOURCE_LISTING)
    assert usage["perturb_kernel"]["REG"] == 128 and usage["perturb_kernel"]["LOCAL"] == 8
    assert usage["perturb_kernel"]["STACK"] == 16
    assert usage["sum_partials_kernel"] == {"REG": 14, "STACK": 0, "SHARED": 32, "LOCAL": 0, "CONSTANT[0]": 536,
                                            "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}


def test_variant_lists_name_exactly_each_kernels_arguments():
    for spec in triton_aot.specs_cached():
        names, constexprs = triton_aot.kernel_arguments(spec.kernel)
        others = set(names) - constexprs
        for c in triton_aot.variants(spec):
            assert {k for k in c if k in names} == constexprs, (spec.name, c)
            assert set(spec.signature(c)) == others, spec.name


def test_launchers_pass_the_constexprs_the_variants_cover():
    """Each launcher's keyword constexprs (read from its source) are among the spec's axes, flags or ties."""
    for spec in triton_aot.specs_cached():
        module = inspect.getmodule(spec.kernel.fn)
        launched = set()
        for _, fn in inspect.getmembers(module, inspect.isfunction):
            src = inspect.getsource(fn)
            if f"launch({spec.kernel.fn.__name__}," in src.replace("\n", " "):
                launched |= {name for name in triton_aot.kernel_arguments(spec.kernel)[1] if f"{name}=" in src}
        if launched:
            covered = set(triton_aot.variants(spec)[0])
            assert launched <= covered, (spec.name, launched - covered)


def test_pairwise_covering():
    flags = ("a", "b", "c", "d", "e", "f", "g", "h")
    candidates = [dict(zip(flags, bits)) for bits in itertools.product((False, True), repeat=len(flags))]
    rows = triton_aot.covering_rows(candidates, flags)
    assert dict.fromkeys(flags, True) in rows and dict.fromkeys(flags, False) in rows
    for a, b in itertools.combinations(flags, 2):
        assert {(r[a], r[b]) for r in rows} == {(False, False), (False, True), (True, False), (True, True)}
    assert len(rows) <= 10  # not the 256 of the full product


def test_sgd_variants_keep_the_launchers_ties():
    (spec,) = [s for s in triton_aot.specs_cached() if s.name.endswith("restore_sgd_step_kernel")]
    variants = triton_aot.variants(spec)
    assert all(c["N_LISTS"] == (4 if c["HAS_MOMENTUM"] else 3) for c in variants)
    assert not any((c["FIRST"] or c["NESTEROV"]) and not c["HAS_MOMENTUM"] for c in variants)
    full = triton_aot.variants(spec, full=True)
    # --full: per dtype and alignment, 2^7 flag sets with momentum and 2^5 without (FIRST, NESTEROV tied)
    assert len(full) == 3 * 2 * (2 ** 7 + 2 ** 5)


def _row(**kw):
    base = {"kernel": "perturb.perturb_kernel", "variant": "DTYPE=fp32", "target": "sm_90", "toolchain": "triton 3.9.0",
            "registers": "64", "spills": "0", "local": "0", "ldg128": "8", "stg128": "8", "streaming": "1",
            "vector_path": "1", "error": ""}
    base.update({k: str(v) for k, v in kw.items()})
    return base


def test_report_rules():
    assert report.violations([_row()]) == []
    assert "129 registers > 128" in report.violations([_row(registers=129)])[0]
    assert report.violations([_row(registers=129, streaming=0)]) == []
    assert "spills" in report.violations([_row(spills=2)])[0]
    assert "128-bit load" in report.violations([_row(ldg128=0)])[0]
    assert "128-bit store" in report.violations([_row(stg128=0)])[0]
    assert report.violations([_row(kernel="grad_norm.grad_sq_norm_partials_kernel", stg128=0)]) == []
    assert report.violations([_row(stg128=0, vector_path=0)]) == []
    assert "compile error" in report.violations([_row(error="CompilationError: x")])[0]


def test_stage_fails_clearly_when_the_registry_is_unreachable(tmp_path):
    """No cached environment and no registry: exit 3 and one line that says so, never a silent pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(FASTSAM_GPULESS_CACHE=str(tmp_path / "cache"), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="", PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_CONFIG_FILE=os.devnull,
               PIP_CONSTRAINT="")
    out = subprocess.run(["bash", str(ROOT / "tests" / "gpuless" / "run.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 3, out.stdout + out.stderr
    fails = [line for line in out.stdout.splitlines() if line.startswith("gpuless: FAIL")]
    assert len(fails) == 1 and "cannot install the CUDA build of torch" in fails[0], out.stdout


def test_every_launched_kernel_has_a_variant_list():
    """A new @triton.jit kernel in kernels/ that a launcher starts must join the ahead-of-time compiles."""
    import re

    covered = {spec.kernel.fn.__name__ for spec in triton_aot.specs_cached()}
    launched = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        launched |= set(re.findall(r"launch(?:_table)?\(\s*(\w+_kernel)\b", path.read_text()))
    assert launched and launched <= covered, sorted(launched - covered)
