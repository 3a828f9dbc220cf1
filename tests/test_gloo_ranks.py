"""The gloo test harness itself (tests/gloo_ranks.py): results come back, errors and crashes fail."""

import os

import pytest
import torch

from gloo_ranks import run_gloo_ranks

pytestmark = pytest.mark.distributed


def _sum_of_ranks(rank, scale):
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "total": t * scale}


def _rank_one_raises(rank):
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


def _rank_zero_aborts(rank):
    if rank == 0:
        os.abort()  # a crash with no Python error, like torch's teardown race
    return rank


def test_every_rank_returns_its_value_after_a_collective():
    ranks = run_gloo_ranks(_sum_of_ranks, 2.0, world=2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(torch.equal(r["total"], torch.tensor([6.0])) for r in ranks)


def test_a_python_error_in_a_rank_fails_with_its_traceback():
    with pytest.raises(pytest.fail.Exception, match="(?s)rank 1:.*deliberate failure on rank 1"):
        run_gloo_ranks(_rank_one_raises, world=2, timeout=120)


def test_a_rank_that_dies_without_reporting_is_retried_then_fails():
    with pytest.raises(pytest.fail.Exception, match=r"every one of 2 attempts.*0: -6"):
        run_gloo_ranks(_rank_zero_aborts, world=2, attempts=2, timeout=120)
