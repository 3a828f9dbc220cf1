"""The SASS / resource-usage reader of the GPU-less stage (tests/gpuless/sass.py), on known listings.

The stage's verdicts (spills, 128-bit paths, register limits) are only as good as this parser, so
it is checked here on excerpts of real cuobjdump output (sm_90, CUDA 13.0), in the CPU suite.
"""

from gpuless import sass

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
