"""SAQ: Sharpness-Aware Quantization (Liu et al., "Sharpness-aware Quantization for Deep Neural
Networks", arXiv:2111.12273) with fastsam.SAM and torch.ao quantization-aware training.

QAT trains float ("latent") weights through fake quantisation: every forward uses ``Q(w)``, the
weights rounded to the int8 grid, and the straight-through estimator passes gradients back to
``w``. SAM over that model seeks a flat minimum *of the quantised network*: the perturbation
moves the latent weights, both passes run through the fake quantisers, so the update is the
gradient of ``L(Q(w + e))``. The quantisation grid (scales, zero points) is frozen during the
second pass (``disable_observer``), so the two passes quantise on the same grid. At the end the
model is converted to a real int8 model and evaluated.

    python examples/sam_saq.py --steps 300
"""

import argparse
import contextlib
import warnings

import torch
import torch.ao.quantization as tq
import torch.nn as nn
import torch.nn.functional as F

import fastsam

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's notice
warnings.filterwarnings("ignore", message=".*quantiz.*")


def make_data(n=2048, dim=16, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 0.5
    y = torch.randint(0, classes, (n,), generator=gen)
    return centers[y] + torch.randn(n, dim, generator=gen), y


class Net(nn.Module):
    def __init__(self, dim=16, hidden=64, classes=4):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.fc1, self.relu, self.fc2 = nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x)))))


def prepare_qat(model, engine="qnnpack"):
    torch.backends.quantized.engine = engine
    model.qconfig = tq.get_default_qat_qconfig(engine)
    return tq.prepare_qat(model.train())


@contextlib.contextmanager
def frozen_quantization_grid(model):
    """The second pass quantises on the first pass's grid: observers off, fake quantisation on."""
    model.apply(tq.disable_observer)
    try:
        yield
    finally:
        model.apply(tq.enable_observer)


def fake_quantizers(model):
    return [m for m in model.modules() if isinstance(m, tq.FakeQuantizeBase)]


def saq_step(model, optimizer, xb, yb):
    loss = F.cross_entropy(model(xb), yb)     # L(Q(w)); the observers track the ranges here
    loss.backward()
    optimizer.first_step(zero_grad=True)      # latent weights w -> w + e
    with frozen_quantization_grid(model):
        F.cross_entropy(model(xb), yb).backward()   # gradient of L(Q(w + e)) on the same grid
    optimizer.second_step(zero_grad=True)
    return loss.detach()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rho", type=float, default=0.05)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    x, y = make_data()
    model = prepare_qat(Net())
    optimizer = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=args.rho, lr=0.05, momentum=0.9)
    for step in range(args.steps):
        i = torch.randint(0, len(y), (args.batch_size,))
        loss = saq_step(model, optimizer, x[i], y[i])
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    print(f"fake-quantised accuracy {accuracy(model, x, y):.3f}")
    int8 = tq.convert(model)
    print(f"int8 accuracy {accuracy(int8, x, y):.3f}")
    return model, int8


if __name__ == "__main__":
    main()
