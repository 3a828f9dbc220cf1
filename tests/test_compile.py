"""torch.compile: the optimizer calls trace without graph breaks and compute what eager computes."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam

STEPS = 5

CASES = {
    "sam-sgd": (fastsam.SAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "asam-adamw": (fastsam.ASAM, torch.optim.AdamW, dict(lr=1e-2)),
    "fisher-sgd": (fastsam.FisherSAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "gsam-sgd": (fastsam.GSAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "looksam-sgd": (fastsam.LookSAM, torch.optim.SGD, dict(lr=0.1, k=2)),
    "interval-adamw": (fastsam.SAM, torch.optim.AdamW, dict(lr=1e-2, every=2)),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(STEPS)]


def train(name, compile_backend=None):
    cls, base, kw = CASES[name]
    model = make_model()
    opt = cls(model.parameters(), base, **kw)

    def first():
        opt.first_step()

    def second():
        opt.second_step()

    if compile_backend:
        torch._dynamo.reset()
        first = torch.compile(first, backend=compile_backend, fullgraph=True)
        second = torch.compile(second, backend=compile_backend, fullgraph=True)
    for x, y in data():
        # Gradients kept (set_to_none=False) so that their identity is stable across steps: a compiled
        # region guards on the tensors it reads.
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        first()
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        second()
    return model, opt


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_optimizer_calls_match_eager(name):
    """fullgraph=True: any graph break inside first_step/second_step fails the test."""
    eager, opt_e = train(name)
    compiled, opt_c = train(name, "aot_eager")
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # What a step leaves behind (counters, LookSAM's g_v, ...) survived the compiled calls.
    assert opt_c._step_state.step_count == opt_e._step_state.step_count == STEPS
    assert opt_c.state_dict()["fastsam"].keys() == opt_e.state_dict()["fastsam"].keys()


@pytest.mark.slow
def test_inductor_compiled_sam_step_matches_eager():
    eager, _ = train("sam-sgd")
    compiled, _ = train("sam-sgd", "inductor")
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_graph_break_inside_fastsam_in_a_whole_training_step():
    """Compiling a whole step: graph breaks may come from backward(), never from fastsam's code."""
    model = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = data()[0]

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with fastsam.frozen_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    step()  # state allocated
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)()
    package = os.path.dirname(fastsam.__file__)
    for reason in explanation.break_reasons:
        frames = [f.filename for f in reason.user_stack]
        assert not any(f.startswith(package) for f in frames[-1:]), f"graph break in fastsam: {reason.reason}"
