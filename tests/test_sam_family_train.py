"""fastsam train's registry knows WSAM, FriendlySAM and bSAM, and its loop drives each (one batch)."""

import torch
import torch.nn.functional as F

import fastsam
from fastsam import train


def test_registry_builds_and_drives_wsam_friendlysam_bsam():
    expected = {"wsam": fastsam.WSAM, "friendlysam": fastsam.FriendlySAM, "bsam": fastsam.BSAM}
    for name, cls in expected.items():
        model = train.DigitsNet()
        opt = train.make_optimizer(name, model.parameters(), 0.05, "torch", model=model, num_data=1297)
        assert type(opt) is cls
        entry = train.OPTIMIZERS[name]
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        before = [p.detach().clone() for p in model.parameters()]
        if entry.drive == "loss_closure":
            def closure():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            assert entry.drive == "two_call"
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), name
    assert train.OPTIMIZERS["bsam"].build(list(train.DigitsNet().parameters()),
                                          train.TrainSetup(0.1, "torch", None, 1, 1, 0, num_data=500)).num_data == 500
