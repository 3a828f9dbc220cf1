"""pytest-benchmark wrappers for the CPU-runnable kernel subjects: ``pytest bench/ --benchmark-only``.

Each test times one provider of one subject on one parameter set with pytest-benchmark's own
calibration; tests of one (subject, set) share a group, so the report lists the providers side by
side. These are not part of the test suite (``testpaths = ["tests"]``); ``fastsam bench`` is the
main benchmark (interleaved rounds, rotating inputs, stored results).
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from fastsam.bench import (bench_first_step, bench_grad_norm, bench_sam_step, bench_sds_select,  # noqa: E402
                           bench_second_step)
from fastsam.bench.param_sets import PARAM_SETS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETS = ["small2000", "resnet18"]
OPTIMIZER_PROVIDERS = ["fastsam-torch", "fastsam-triton", "fastsam-cuda", "baseline-per-param", "peer-foreach-off",
                       "peer-foreach-on"]


def _bench(benchmark, made: dict, provider: str, group: str) -> None:
    if provider not in made:
        pytest.skip(f"{provider} cannot run here")
    inst = made[provider]()
    benchmark.group = group
    if inst.prepare is None:
        benchmark(inst.run)
        return
    ran = [False]

    def setup():  # an instance is built ready to run; after a run it needs its (untimed) prepare
        if ran[0]:
            inst.prepare()

    def run():
        inst.run()
        ran[0] = True

    benchmark.pedantic(run, setup=setup, rounds=20, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("provider", ["fastsam-torch", "fastsam-triton", "fastsam-cuda", "baseline-per-param", "peer"])
def test_grad_norm(benchmark, set_name, provider):
    made, _ = bench_grad_norm.builders(PARAM_SETS[set_name](), DEVICE)
    _bench(benchmark, made, provider, f"grad_norm {set_name}")


@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("provider", OPTIMIZER_PROVIDERS)
def test_first_step(benchmark, set_name, provider):
    made, _ = bench_first_step.builders(PARAM_SETS[set_name](), DEVICE)
    _bench(benchmark, made, provider, f"first_step {set_name}")


@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("provider", OPTIMIZER_PROVIDERS)
def test_second_step(benchmark, set_name, base, provider):
    made, _ = bench_second_step.builders(PARAM_SETS[set_name](), DEVICE, base)
    _bench(benchmark, made, provider, f"second_step_{base} {set_name}")


@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("provider", OPTIMIZER_PROVIDERS)
def test_sam_step(benchmark, set_name, base, provider):
    made, _ = bench_sam_step.builders(PARAM_SETS[set_name](), DEVICE, base)
    _bench(benchmark, made, provider, f"sam_step_{base} {set_name}")


@pytest.mark.parametrize("batch", [128, 4096, 65536])
@pytest.mark.parametrize("provider", ["fastsam-torch", "fastsam-triton", "fastsam-cuda", bench_sds_select.BASELINE,
                                      "torch.topk"])
def test_sds_select(benchmark, batch, provider):
    _bench(benchmark, bench_sds_select.builders(batch, DEVICE), provider, f"sds_select B={batch}")
