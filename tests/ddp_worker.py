"""The process body of test_nn.test_distributed_data_parallel (spawned, so importable)."""
import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastbn.nn as fnn
from fastbn.benchmarks.models import ResNet


def train(model, rank, steps=2):
    """A couple of SGD steps under DDP, each rank on its own half of the batch."""
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(100)
    losses = []
    for _ in range(steps):
        x = torch.randn(2, 4, 3, 16, 16, generator=generator)[rank]
        target = torch.randint(0, 10, (2, 4), generator=generator)[rank]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_both(rank, world_size, port, backend, result_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        torch_model = ResNet(widths=(4, 8), blocks=(1, 1))
        fastbn_model = fnn.convert(copy.deepcopy(torch_model), backend)
        result = {"torch_losses": train(torch_model, rank),
                  "fastbn_losses": train(fastbn_model, rank),
                  "torch_state": torch_model.state_dict(),
                  "fastbn_state": fastbn_model.state_dict()}
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
