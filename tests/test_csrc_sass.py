"""The CUDA kernels' memory traffic, read from their sm_90 SASS (no GPU needed).

[note: counting global accesses]
``apply_chunk`` (csrc/multi_tensor_apply.cuh) touches a list through two code paths, a 128-bit
vector access and an unrolled element-by-element tail, so every list the kernel reads costs the
same number ``P`` of ``LDG`` instructions in the code (5 for fp32, 9 for fp16/bf16: one vector
access plus ``16 / sizeof(T)`` scalar ones) and every list it writes ``P`` ``STG``. The restore
kernel writes exactly one list, so its ``STG`` count is ``P``; an op's ``LDG`` count is then
``P * (lists read, over every branch of its body) + (device scalars it reads)``. Before the load
mask the restore kernel had ``2 P`` loads (it read the parameters it overwrites), perturb read the
backups, the fused steps the parameters, and the found-inf copies every list. This checks the
instruction counts, which is what the load mask changes; the bytes moved follow (csrc/README.md).
Compiled and read with tests/gpuless/sass.py. Skipped without nvcc or cuobjdump (the triton wheel
ships one).
"""

import re

import pytest

from gpuless import sass
from nvcc_tools import CSRC, NVCC_FLAGS, find_nvcc

# A body_kernel instantiation: _ZN7fastsam4cuda11body_kernelINS0_<len><Body>I<storage type><flags>EE...
KERNEL = re.compile(r"body_kernelINS0_\d+(?P<body>[A-Za-z]+Body)I(?P<dtype>f|6__half|13__nv_bfloat16)(?P<flags>\w*?)E{2,}J")
PATHS_PER_LIST = {"f": 1 + 4, "6__half": 1 + 8, "13__nv_bfloat16": 1 + 8}  # one 128-bit path + the scalar tail


@pytest.fixture(scope="module")
def tools():
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cuobjdump = sass.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found")
    compiled = {}

    def kernels(source: str) -> dict[str, sass.KernelCode]:
        if source not in compiled:
            compiled[source], _ = sass.nvcc_cubin(nvcc, CSRC / f"{source}.cu", 90, NVCC_FLAGS, [CSRC], cuobjdump)
        return compiled[source]

    return kernels


def _kernels(tools, source: str, body: str, flags: str | None = None):
    """[(storage type, counts)] of the ``body`` kernels of csrc/<source>.cu (``flags``: a template-flag suffix)."""
    found = []
    for name, code in tools(source).items():
        m = KERNEL.search(name)
        if m and m["body"] == body and (flags is None or m["flags"].endswith(flags)):
            found.append((m["dtype"], code.counts))
    assert len(found) >= 3, f"expected the fp32/fp16/bf16 {body} kernels in {source}.cu, found {len(found)}"
    return found


def test_restore_loads_only_the_backups(tools):
    kernels = _kernels(tools, "restore", "RestoreBody")
    assert len(kernels) == 3  # fp32, fp16, bf16
    for dtype, counts in kernels:
        loads, stores, vector_loads = counts["LDG"], counts["STG"], counts["LDG.128"]
        paths = PATHS_PER_LIST[dtype]
        assert stores == paths, dtype
        assert vector_loads == 1, f"{dtype}: one list read, one 128-bit load path"
        assert loads == paths, f"{dtype}: {loads} global loads, expected {paths} (the backups only)"


# (source, body, template flags, lists read by the main branch + by the skip branch, lists written by
# both, device scalars read). The skip branch is the found-inf restore of the fused steps (reads the
# backup, writes the weight) and the non-finite-norm backup of perturb (reads w, writes the backup).
CASES = [
    ("perturb", "PerturbBody", None, 2 + 1, 2 + 1, 1),          # reads w, g (not the backup); the norm
    ("perturb_per_tensor", "PerturbPerTensorBody", None, 2 + 1, 2 + 1, 1),  # reads w, g; its tensor's scale
    ("restore_sgd_step", "SgdBody", "Lb0", 2 + 1, 1 + 1, 3),    # reads g, backup (not w); found_inf, lr, scale
    ("restore_sgd_step", "SgdBody", "Lb1", 3 + 1, 2 + 1, 3),    # + the momentum buffer, read and written
    ("restore_adamw_step", "AdamWBody", "Lb0", 4 + 1, 3 + 1, 5),  # g, backup, m, v; + the step (fp32|fp64 load)
    ("restore_adamw_step", "AdamWBody", "Lb1", 5 + 1, 4 + 1, 5),  # + vmax (amsgrad)
    ("grad_mix", "GradMixBody", "Lb0", 2, 1, 3),                # reads x, y, writes x; a, b, skip
    ("grad_mix", "GradMixBody", "Lb1", 2, 2, 3),                # swap: writes both
    ("ema_direction", "EmaDirectionBody", None, 2, 2, 1),        # reads and writes g, m; skip
    ("momentum_sam", "MomentumSamShiftBody", "Lb0", 2, 1, 1),    # reads w, v, writes w; the scale
    ("momentum_sam", "MomentumSamShiftBody", "Lb1", 2, 2, 1),    # + writes the backup (not read)
    ("sampa_extrapolate", "SampaExtrapolateBody", "Lb0", 2, 2, 0),  # reads w, d; writes w, backup
    ("sampa_extrapolate", "SampaExtrapolateBody", "Lb1", 3, 2, 0),  # + reads the momentum buffer
    ("bsam_ascent", "BsamAscentBody", "Lb0", 3, 2, 0),           # reads backup, g, s (not w); writes w, h
    ("bsam_ascent", "BsamAscentBody", "Lb1", 3, 2, 0),           # adaptive: the same lists
    ("bsam_step", "BsamStepBody", None, 5, 3, 1),                # reads backup, g, m, s, h (not w); writes w, m, s; lr
]


@pytest.mark.parametrize("source,body,flags,reads,writes,scalars", CASES,
                         ids=[f"{c[1]}{c[2] or ''}" for c in CASES])
def test_fused_ops_do_not_load_the_lists_they_only_write(tools, source, body, flags, reads, writes, scalars):
    for dtype, counts in _kernels(tools, source, body, flags):
        loads, stores = counts["LDG"], counts["STG"]
        paths = PATHS_PER_LIST[dtype]
        assert stores == paths * writes, dtype
        assert loads == paths * reads + scalars, (
            f"{body}{flags or ''}<{dtype}>: {loads} global loads, expected {paths} x {reads} lists + {scalars} scalars")


# Fused steps that also reduce (reduce_body_kernel): the lists' accesses as above, plus the block's
# partial sum, one STG (the block tree itself runs in shared memory). (source, body, lists read,
# lists written, device scalars read)
REDUCING_CASES = [
    ("momentum_sam", "MomentumSamSgdBody", 3, 2, 1),    # reads w~, g, v; writes w, v; s_old
    ("momentum_sam", "MomentumSamAdamWBody", 4, 3, 1),  # reads w~, g, m, u; writes w, m, u; s_old
]


@pytest.mark.parametrize("source,body,reads,writes,scalars", REDUCING_CASES, ids=[c[1] for c in REDUCING_CASES])
def test_fused_reducing_steps_touch_each_list_once_and_store_one_partial(tools, source, body, reads, writes, scalars):
    kernels = _kernels(tools, source, body)
    assert len(kernels) == 3  # fp32, fp16, bf16
    for dtype, counts in kernels:
        paths = PATHS_PER_LIST[dtype]
        assert counts["STG"] == paths * writes + 1, f"{body}<{dtype}>: {counts['STG']} global stores"
        assert counts["LDG"] == paths * reads + scalars, (
            f"{body}<{dtype}>: {counts['LDG']} global loads, expected {paths} x {reads} lists + {scalars} scalars")


def test_bsam_noise_reads_w_s_and_its_noise_writes_w_and_the_backup(tools):
    """Two lists read on both paths, two written; the flat noise buffer is read element by element
    (16 / sizeof(T) scalar loads: its slice of a tensor has no alignment promise), the backup never."""
    kernels = _kernels(tools, "bsam_noise", "BsamNoiseBody")
    for dtype, counts in kernels:
        paths = PATHS_PER_LIST[dtype]
        assert counts["STG"] == paths * 2 and counts["STG.128"] == 2, dtype
        assert counts["LDG.128"] == 2, f"{dtype}: w and s on the 128-bit path"
        assert counts["LDG"] == paths * 2 + (paths - 1), (
            f"BsamNoiseBody<{dtype}>: {counts['LDG']} global loads, expected {paths} x 2 lists + {paths - 1} noise")
