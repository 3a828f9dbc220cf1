"""fastsam.integrations.transformers: the Trainer's steps equal a hand-written two-pass loop.

A tiny BertForSequenceClassification built from a config (no download), on CPU, no dropout, the
data in a fixed order. After N optimizer steps with gradient accumulation, clipping, weight decay
groups and a warm-up + linear LR schedule, every parameter of the Trainer's model equals the one
trained by the plain loop written here from fastsam's documented API.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fastsam  # noqa: E402
from fastsam.integrations.transformers import SAMTrainer, per_sample_losses_from_logits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, ACCUM, STEPS, LR, WARMUP, CLIP, DECAY = 4, 2, 4, 3e-3, 1, 0.05, 0.01


def tiny_bert(seed=0, attn_implementation=None):
    torch.manual_seed(seed)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    config = transformers.BertConfig(**extra, vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def dataset(n=BATCH * ACCUM * STEPS, length=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, length), generator=g)
    labels = (ids[:, 0] % 3).long()  # learnable: the first token decides
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


class InOrder(SAMTrainer):
    """The data in dataset order, so that the hand-written loop sees the same micro-batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def trainer_for(model, data, tmp_path, **kwargs):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                   max_steps=STEPS, learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="linear",
                   max_grad_norm=CLIP, weight_decay=DECAY, optim="adamw_torch", report_to=[], use_cpu=True,
                   save_strategy="no", logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    args = transformers.TrainingArguments(**{**options, **kwargs.pop("args", {})})
    return InOrder(model=model, args=args, train_dataset=data, **kwargs)


def micro_batches(data):
    for i in range(0, len(data), BATCH):
        chunk = data[i:i + BATCH]
        yield {k: torch.stack([d[k] for d in chunk]) for k in chunk[0]}


def reference_optimizer(model, sam_class, steps=STEPS, **sam_kwargs):
    """AdamW over the Trainer's two groups (no decay on biases and LayerNorm), wrapped by fastsam."""
    no_decay = [n for n, _ in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    groups = [{"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": DECAY},
              {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0}]
    opt = sam_class(groups, torch.optim.AdamW, lr=LR, **sam_kwargs)
    sched = transformers.get_linear_schedule_with_warmup(opt, WARMUP, steps)
    return opt, sched


def assert_same_parameters(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def moved(a, b):
    return max((p.detach() - q.detach()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("sam_class, sam_kwargs", [(fastsam.SAM, dict(rho=0.05)),
                                                    (fastsam.ASAM, dict(rho=0.5)),
                                                    (fastsam.LookSAM, dict(rho=0.05, k=2, alpha=0.5))],
                         ids=["SAM", "ASAM", "LookSAM"])
def test_two_pass_trainer_equals_hand_written_loop(tmp_path, sam_class, sam_kwargs):
    data = dataset()
    start = tiny_bert()
    model = copy.deepcopy(start)
    trainer = trainer_for(model, data, tmp_path, sam_class=sam_class, sam_kwargs=sam_kwargs)
    trainer.train()
    assert isinstance(trainer.sam_optimizer, sam_class)

    ref = copy.deepcopy(start)
    ref.train()
    opt, sched = reference_optimizer(ref, sam_class, **sam_kwargs)
    batches = list(micro_batches(data))
    for step in range(STEPS):
        window = batches[step * ACCUM:(step + 1) * ACCUM]
        for mb in window:
            (ref(**mb).loss / ACCUM).backward()
        if opt.needs_second_pass:
            opt.first_step(zero_grad=True)
            for mb in window:
                (ref(**mb).loss / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.second_step(zero_grad=True)
        sched.step()
    assert moved(ref, start) > 1e-3, "the steps must move the weights"
    assert_same_parameters(model, ref)
    # The scheduler acted on fastsam's param groups: the last LR is the schedule's.
    assert trainer.sam_optimizer.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert trainer.sam_optimizer.state_dict()["state"], "the base optimizer's moments live in fastsam's state"


def test_clipping_changes_the_result(tmp_path):
    """Clipping is on (the test above would notice it in the wrong place): without it the weights differ."""
    data = dataset()
    start = tiny_bert()
    clipped, free = copy.deepcopy(start), copy.deepcopy(start)
    trainer_for(clipped, data, tmp_path / "a", sam_class=fastsam.SAM).train()
    trainer_for(free, data, tmp_path / "b", sam_class=fastsam.SAM, args=dict(max_grad_norm=0.0)).train()
    assert moved(clipped, free) > 1e-4


DRIVERS = [("ESAM", dict(rho=0.05, beta=0.6, gamma=0.5, seed=123), 1),
           ("ESAM", dict(rho=0.05, beta=0.6, gamma=0.5, seed=123), ACCUM),
           ("MSAM", dict(rho=0.05, micro_batches=2), ACCUM),
           ("DeltaSAM", dict(rho=0.05), ACCUM),
           ("KSAM", dict(rho=0.05), ACCUM),
           ("HERO", dict(rho=0.05, lmbda=1.0), ACCUM)]


@pytest.mark.parametrize("name, sam_kwargs, accum", [d for d in DRIVERS if hasattr(fastsam, d[0])],
                         ids=[f"{d[0]}-accum{d[2]}" for d in DRIVERS if hasattr(fastsam, d[0])])
def test_pass_driver_gets_per_sample_losses_from_logits(tmp_path, name, sam_kwargs, accum):
    sam_class = getattr(fastsam, name)
    data = dataset()
    # HERO differentiates twice; torch's CPU flash attention (SDPA) has no second derivative.
    start = tiny_bert(attn_implementation="eager" if name == "HERO" else None)
    model = copy.deepcopy(start)
    steps = len(data) // (BATCH * accum)
    trainer = trainer_for(model, data, tmp_path, sam_class=sam_class, sam_kwargs=sam_kwargs,
                          args=dict(gradient_accumulation_steps=accum, max_steps=steps))
    trainer.train()

    ref = copy.deepcopy(start)
    ref.train()
    opt, sched = reference_optimizer(ref, sam_class, steps, **sam_kwargs)
    opt.register_base_step_pre_hook(lambda o: torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP))
    for step in range(steps):
        chunk = data[step * BATCH * accum:(step + 1) * BATCH * accum]
        batch = {k: torch.stack([d[k] for d in chunk]) for k in chunk[0]}

        def closure(indices=None):
            b = batch if indices is None else {k: v[indices] for k, v in batch.items()}
            logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return F.cross_entropy(logits, b["labels"], reduction="none")

        if isinstance(opt, fastsam.MSAM):
            opt.step(closure, batch_size=len(chunk))
        else:
            opt.step(closure)
        sched.step()
    assert moved(ref, start) > 1e-3
    assert_same_parameters(model, ref, atol=2e-6)


@pytest.mark.parametrize("name,sam_kwargs", [("ESAM", dict(rho=0.05, beta=0.6, gamma=0.5, seed=7)),
                                              ("MSAM", dict(rho=0.05, micro_batches=2)), ("KSAM", dict(rho=0.05)),
                                              ("DeltaSAM", dict(rho=0.05)), ("HERO", dict(rho=0.05, lmbda=1.0))])
def test_fp16_loss_scaling_of_pass_driving_optimizers_matches_the_unscaled_run(tmp_path, name, sam_kwargs):
    """The pass-driving path under the Trainer's GradScaler (what fp16=True gives on a GPU; a CPU GradScaler
    stands in for it, as accelerate turns fp16 on only on GPUs): the scaled losses are unscaled where each
    variant needs it (clipping, DeltaSAM's weights, HERO's penalty), so with a power-of-two scale the run
    equals the unscaled one. These optimizers create the scale on the first step themselves (the plain
    Trainer does it in its backward, which they never call). The two-call path's fp16 handling is
    accelerate's own (unscale before clipping in its fp16 mode) and needs a GPU to run."""
    data = dataset()
    start = tiny_bert(attn_implementation="eager" if name == "HERO" else None)
    runs = []
    for scaled in (False, True):
        model = copy.deepcopy(start)
        trainer = trainer_for(model, data, tmp_path / str(scaled), sam_class=getattr(fastsam, name),
                              sam_kwargs=sam_kwargs)
        if scaled:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
        trainer.train()
        runs.append(model)
        if scaled:
            assert trainer.accelerator.scaler.get_scale() > 2.0 ** 12  # it grew: steps were not skipped
    assert moved(runs[0], start) > 1e-3
    assert_same_parameters(runs[1], runs[0], atol=2e-6)


def test_bf16_autocast_trains(tmp_path):
    data = dataset()
    start = tiny_bert()
    model = copy.deepcopy(start)
    trainer = trainer_for(model, data, tmp_path, sam_class=fastsam.SAM, args=dict(bf16=True))
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss)) and moved(model, start) > 1e-3


def test_rejects_a_plain_optimizer(tmp_path):
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = trainer_for(model, dataset(), tmp_path, optimizers=(opt, None))
    with pytest.raises(TypeError, match="needs a fastsam optimizer"):
        trainer.train()
    with pytest.raises(TypeError, match="sam_class must be a fastsam optimizer class"):
        trainer_for(model, dataset(), tmp_path, sam_class=torch.optim.SGD)


def test_per_sample_losses_from_logits():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 3), torch.randint(0, 3, (5,))
    torch.testing.assert_close(per_sample_losses_from_logits(logits, labels),
                               torch.stack([F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(5)]))
    tokens, tok_labels = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    tok_labels[1, 2:] = -100
    got = per_sample_losses_from_logits(tokens, tok_labels)
    want = torch.stack([F.cross_entropy(tokens[0], tok_labels[0]), F.cross_entropy(tokens[1, :2], tok_labels[1, :2])])
    torch.testing.assert_close(got, want)
    shifted = per_sample_losses_from_logits(tokens, tok_labels, shift=True)
    torch.testing.assert_close(shifted[0], F.cross_entropy(tokens[0, :-1], tok_labels[0, 1:]))
    reg = per_sample_losses_from_logits(torch.randn(4, 1), torch.randn(4))
    assert reg.shape == (4,) and (reg >= 0).all()


def test_example_script_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "examples/sam_transformers.py", "--max-steps", "30"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    acc = float(out.stdout.strip().splitlines()[-1].split("accuracy")[-1].split()[0])
    assert acc > 0.6, out.stdout[-1000:]
