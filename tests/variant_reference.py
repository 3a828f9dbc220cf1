"""Plain references for GSAM, LookSAM and interval SAM, and a training-loop runner for fastsam's.

The references follow the papers' formulas one parameter at a time in fp32, with a stock torch
optimizer (``foreach=False``) as the base; nothing of fastsam is used.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F

from test_sam import make_model


class ReferenceVariant:
    """SAM (kind "sam"), GSAM ("gsam") or LookSAM ("looksam"), with a SAM step every ``every`` steps.

    Interval SAM is kind "sam" with ``every > 1``; LookSAM's ``k`` is ``every``.
    """

    def __init__(self, groups, base_cls, base_kwargs, kind="sam", alpha=0.0, every=1, adaptive=False):
        self.base = base_cls(groups, foreach=False, **base_kwargs)
        self.kind, self.alpha, self.every, self.adaptive = kind, alpha, every, adaptive
        self.t = 0
        self.gv = None
        self.rho_schedule = None  # optional callable: lr -> rho, applied to each group before a step

    def params(self):
        return [p for g in self.base.param_groups for p in g["params"]]

    def step(self, model, x, y, clip=None):
        F.cross_entropy(model(x), y).backward()
        if self.t % self.every == 0:
            self._sam_step(model, x, y, clip)
        else:
            self._cheap_step(clip)
        self.base.step()
        self.base.zero_grad()
        self.t += 1

    @torch.no_grad()
    def _perturb(self):
        g = {p: p.grad.clone() for p in self.params()}
        terms = {p: (p.abs() * g[p] if self.adaptive else g[p]) for p in g}
        norm = sum((t * t).sum() for t in terms.values()).sqrt()
        backup = {}
        for group in self.base.param_groups:
            rho = self.rho_schedule(group["lr"]) if self.rho_schedule else group["rho"]
            for p in group["params"]:
                d = p.abs() * p.abs() * g[p] if self.adaptive else g[p]
                backup[p] = p.clone()
                p.add_(rho / (norm + 1e-12) * d)
        return g, backup

    def _sam_step(self, model, x, y, clip):
        g, backup = self._perturb()
        self.base.zero_grad()
        with torch.enable_grad():
            F.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        with torch.no_grad():
            for p, b in backup.items():
                p.copy_(b)
            ps = self.params()
            if self.kind == "gsam":
                dot = sum((g[p] * p.grad).sum() for p in ps)
                sq = sum((p.grad * p.grad).sum() for p in ps)
                for p in ps:
                    g_perp = g[p] - dot / sq * p.grad
                    p.grad.sub_(self.alpha * g_perp)
            elif self.kind == "looksam":
                dot = sum((g[p] * p.grad).sum() for p in ps)
                sq_g = sum((g[p] * g[p]).sum() for p in ps)
                self.gv = {p: p.grad - dot / sq_g * g[p] for p in ps}

    @torch.no_grad()
    def _cheap_step(self, clip):
        if clip:
            torch.nn.utils.clip_grad_norm_(self.params(), clip)
        if self.kind == "looksam":
            ps = self.params()
            norm_g = sum((p.grad * p.grad).sum() for p in ps).sqrt()
            norm_gv = sum((v * v).sum() for v in self.gv.values()).sqrt()
            for p in ps:
                p.grad.add_(self.alpha * norm_g / norm_gv * self.gv[p])


def run_reference(ref_fn, groups_fn, data, clip=None, sched=False):
    model = make_model()
    ref = ref_fn(groups_fn(model))
    scheduler = torch.optim.lr_scheduler.StepLR(ref.base, step_size=5, gamma=0.5) if sched else None
    for x, y in data:
        ref.step(model, x, y, clip)
        if scheduler:
            scheduler.step()
    return model, ref


def train_step(model, opt, x, y, form="skip", clip=None):
    """One fastsam step in one of the three loop forms a user may write.

    * ``skip``: the second pass only when ``opt.needs_second_pass`` (the saving form);
    * ``both``: first_step / backward / second_step on every step (cheap steps: no saving);
    * ``closure``: ``opt.step(closure)``.
    """
    def loss_backward():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        return loss

    if form == "closure":
        F.cross_entropy(model(x), y).backward()
        if not opt.needs_second_pass and clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step(loss_backward)
        opt.zero_grad()
        return
    if form == "both":
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_backward()
        opt.second_step(zero_grad=True)
        return
    if opt.needs_second_pass:
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_backward()
    else:
        loss_backward()
    opt.second_step(zero_grad=True)


def run_fastsam(opt_fn, groups_fn, data, form="skip", resume_at=None, clip=None, sched=False, hook=None):
    """Train on ``data``; at ``resume_at`` save everything, rebuild from scratch and load."""
    model = make_model()
    opt = opt_fn(groups_fn(model))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5) if sched else None
    for i, (x, y) in enumerate(data):
        if i == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": scheduler.state_dict() if scheduler else None}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            model = make_model(seed=123)
            model.load_state_dict(ckpt["model"])
            opt = opt_fn(groups_fn(model))
            opt.load_state_dict(ckpt["opt"])
            if scheduler:
                scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
                scheduler.load_state_dict(ckpt["sched"])
        if hook:
            hook(i, model, opt)
        train_step(model, opt, x, y, form, clip)
        if scheduler:
            scheduler.step()
    return model, opt
