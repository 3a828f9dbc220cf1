"""fastsam in a PyTorch Lightning module (manual optimization), if Lightning is installed.

    pip install lightning
    python examples/sam_lightning.py --max-steps 50

SAM needs two forward/backward passes per step, so the module turns automatic optimization off, runs
the first backward itself and hands the second one to ``optimizer.step(closure)`` through
Lightning's optimizer wrapper. Going through the wrapper matters: it is what advances
``trainer.global_step`` (and so ``max_steps``), and ``self.manual_backward`` keeps Lightning's
precision and strategy plugins in the loop.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastsam

try:
    import lightning as L
except ImportError:  # pragma: no cover - the example is optional
    L = None


def build_module():
    class SAMClassifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()  # Lightning's wrapper around the fastsam optimizer
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)  # gradient at w

            def second_pass():  # fastsam.SAM.step: first_step, this closure at w + e, second_step
                with fastsam.frozen_running_stats(self.net):
                    perturbed_loss = F.cross_entropy(self.net(x), y)
                self.manual_backward(perturbed_loss)
                return perturbed_loss

            opt.step(closure=second_pass)
            opt.zero_grad()
            self.lr_schedulers().step()
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            opt = fastsam.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
            return {"optimizer": opt, "lr_scheduler": sched}

    return SAMClassifier()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=50)
    args = ap.parse_args(argv)
    if L is None:
        raise SystemExit("this example needs Lightning: pip install lightning")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=gen)
    y = (x[:, 0] * x[:, 1] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    module = build_module()
    trainer = L.Trainer(max_steps=args.max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, loader)
    module.eval()
    with torch.no_grad():
        acc = (module.net(x).argmax(1) == y).float().mean().item()
    print(f"Lightning + fastsam.SAM: train accuracy {acc:.3f} after {args.max_steps} steps")
    return acc


if __name__ == "__main__":
    main()
