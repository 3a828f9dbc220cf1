"""Data-parallel SAM with DistributedDataParallel, launched with torchrun.

    torchrun --nproc_per_node 2 examples/sam_ddp.py --steps 50                      # CPU (gloo)
    torchrun --nproc_per_node 8 examples/sam_ddp.py --steps 50 --perturbation local # GPUs (nccl)

``--perturbation global`` (default) averages the first-pass gradient across ranks before perturbing:
one step equals single-process SAM on the concatenated batch. ``local`` lets every rank perturb with
its own gradient (mSAM with one shard per rank) and skips one gradient all-reduce per step.
``fastsam.distributed.first_pass`` / ``second_pass`` make the DDP model do the right thing.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fastsam


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--perturbation", default="global", choices=["global", "local"])
    args = ap.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    optimizer = fastsam.SAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                            dp_perturbation=args.perturbation)

    gen = torch.Generator().manual_seed(1 + rank)  # every rank draws its own data
    for step in range(args.steps):
        x = torch.randn(32, 16, generator=gen).to(device)
        y = (x[:, 0] * x[:, 1] > 0).long()
        with fastsam.distributed.first_pass(ddp, optimizer):
            F.cross_entropy(ddp(x), y).backward()
        optimizer.first_step(zero_grad=True)
        with fastsam.distributed.second_pass(ddp):
            F.cross_entropy(ddp(x), y).backward()
        optimizer.second_step(zero_grad=True)

    # Every rank ends with identical weights (the second backward always averages).
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        print(f"{world} ranks, {args.perturbation} perturbation, {args.steps} steps: weights identical on all "
              f"ranks: {same}")
    dist.barrier()
    dist.destroy_process_group()
    if not same:
        raise SystemExit("ranks diverged")


if __name__ == "__main__":
    main()
