"""frozen_running_stats: the second pass normalises with batch statistics and updates nothing."""

import torch
import torch.nn as nn

import fastsam


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4),
                         nn.BatchNorm1d(4, momentum=None))


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def test_running_stats_untouched_and_outputs_use_batch_stats():
    model = make().train()
    x = torch.randn(16, 3, 6, 6)
    model(x)  # first pass: updates the running statistics (and materialises the lazy layer)
    before = buffers(model)
    out_normal = make().train()
    out_normal.load_state_dict(model.state_dict())
    expected = out_normal(x)
    with fastsam.frozen_running_stats(model):
        got = model(x)
    torch.testing.assert_close(got, expected)  # same batch-statistics normalisation
    after = buffers(model)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed in the frozen pass"
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    model(x)
    assert not torch.equal(buffers(model)["1.running_mean"], before["1.running_mean"])


def test_restored_on_exception_and_functions_pair_up():
    model = make().train()
    model(torch.randn(4, 3, 6, 6))
    try:
        with fastsam.frozen_running_stats(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert model[1].track_running_stats
    fastsam.disable_running_stats(model)
    fastsam.disable_running_stats(model)  # idempotent
    assert not model[1].track_running_stats
    fastsam.enable_running_stats(model)
    assert model[1].track_running_stats and model[5].track_running_stats


def test_eval_mode_unaffected():
    model = make().train()
    model(torch.randn(8, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    ref = model(x)
    with fastsam.frozen_running_stats(model):
        torch.testing.assert_close(model(x), ref)
