"""The process body of test_sync_batch_norm (spawned, so importable), and the batches each
scenario splits over the processes (the test builds its single-process reference from the
same functions)."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastbn.nn as fnn

WORLD_SIZE = 3
CHANNELS = 4
STEPS = ("train", "train", "eval")
# name: (samples per rank, shape of a sample after the channels, dtype, memory format, the
# ranks of the process group (None: the whole world), the data's mean (its standard
# deviation is 3), momentum)
SCENARIOS = {
    "even": ((2, 2, 2), (5, 3), torch.float64, torch.contiguous_format, None, 1.0, 0.1),
    "uneven_channels_last": ((1, 4, 3), (3, 5), torch.float64, torch.channels_last, None, 1.0,
                             0.1),
    "empty_rank": ((3, 0, 2), (4, 4), torch.float64, torch.contiguous_format, None, 1.0, 0.1),
    "two_processes": ((3, 2), (4, 4), torch.float64, torch.contiguous_format, (0, 1), 1.0, 0.1),
    "one_value_on_a_rank": ((1, 2, 3), (), torch.float64, torch.contiguous_format, None, 1.0,
                            0.1),
    "float32": ((2, 3, 1), (6, 6), torch.float32, torch.contiguous_format, None, 1.0, 0.1),
    "large_mean": ((2, 2, 3), (4, 4), torch.float64, torch.contiguous_format, None, 1e6, 0.1),
    "momentum_none": ((2, 1, 2), (3, 3), torch.float64, torch.contiguous_format, None, 1.0,
                      None),
    "all_empty": ((0, 0, 0), (3, 3), torch.float64, torch.contiguous_format, None, 1.0, 0.1),
}
# One value per channel over the whole group: every rank raises, nothing changes.
TOO_FEW_VALUES = (1, 0, 0)
DDP_SPLIT = (1, 3, 2)


def batches(name):
    """Per step: (input, output gradient) of the whole batch, and each rank's [start, stop)."""
    sizes, sample, dtype, memory_format, _, mean, _ = SCENARIOS[name]
    generator = torch.Generator().manual_seed(len(name))
    steps = []
    for _ in STEPS:
        shape = (sum(sizes), CHANNELS) + sample
        x = torch.randn(shape, dtype=torch.float64, generator=generator).mul_(3).add_(mean)
        grad_y = torch.randn(shape, dtype=torch.float64, generator=generator)
        if len(shape) == 4:
            x = x.contiguous(memory_format=memory_format)
        steps.append((x.to(dtype), grad_y.to(dtype)))
    bounds = [(sum(sizes[:rank]), sum(sizes[:rank + 1])) for rank in range(len(sizes))]
    return steps, bounds


def initialise(module):
    """The same parameters and running statistics for every rank and the reference."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for tensor in (module.weight, module.bias, module.running_mean):
            tensor.copy_(torch.rand(CHANNELS, generator=generator, dtype=torch.float64) * 2 - 1)
        module.running_var.copy_(torch.rand(CHANNELS, generator=generator,
                                            dtype=torch.float64) + 0.5)
    return module


def ddp_model(batch_norm=nn.BatchNorm2d):
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, CHANNELS, 3, padding=1, bias=False), batch_norm(CHANNELS),
                         nn.ReLU(), nn.Conv2d(CHANNELS, CHANNELS, 3, bias=False),
                         batch_norm(CHANNELS), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(CHANNELS, 2)).double()


def ddp_batches():
    generator = torch.Generator().manual_seed(6)
    batch = sum(DDP_SPLIT)
    return [(torch.randn(batch, 3, 6, 6, dtype=torch.float64, generator=generator),
             torch.randn(batch, 2, dtype=torch.float64, generator=generator)) for _ in range(2)]


def run_scenario(name, rank, group):
    sizes, _, dtype, _, ranks, _, momentum = SCENARIOS[name]
    steps, bounds = batches(name)
    module = initialise(fnn.SyncBatchNorm(CHANNELS, momentum=momentum, dtype=dtype,
                                          process_group=group))
    results = []
    for mode, (x, grad_y) in zip(STEPS, steps):
        module.train(mode == "train")
        start, stop = bounds[rank]
        part = x[start:stop].clone().requires_grad_()
        module.weight.grad = module.bias.grad = None
        y = module(part)
        y.backward(grad_y[start:stop])
        results.append({"y": y.detach(), "grad_x": part.grad,
                        "channels_last": y.is_contiguous(memory_format=torch.channels_last)
                        and not y.is_contiguous(),
                        "grad_weight": module.weight.grad, "grad_bias": module.bias.grad,
                        "running_mean": module.running_mean.clone(),
                        "running_var": module.running_var.clone(),
                        "num_batches_tracked": module.num_batches_tracked.clone()})
    return results


def run_too_few_values(rank):
    module = initialise(fnn.SyncBatchNorm(CHANNELS, dtype=torch.float64))
    before = {key: value.clone() for key, value in module.state_dict().items()}
    x = torch.ones(TOO_FEW_VALUES[rank], CHANNELS, dtype=torch.float64)
    try:
        module(x)
    except ValueError as exc:
        error = str(exc)
    else:
        error = None
    unchanged = all(torch.equal(value, before[key]) for key, value in module.state_dict().items())
    return {"error": error, "unchanged": unchanged}


def run_ddp(rank):
    model = fnn.SyncBatchNorm.convert_sync_batchnorm(ddp_model())
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    start, stop = sum(DDP_SPLIT[:rank]), sum(DDP_SPLIT[:rank + 1])
    outputs = []
    for x, grad_out in ddp_batches():
        optimizer.zero_grad()
        out = ddp(x[start:stop])
        (out * grad_out[start:stop]).sum().backward()
        optimizer.step()
        outputs.append(out.detach())
    return {"outputs": outputs, "state": model.state_dict()}


def run(rank, init_file, result_dir):
    torch.set_num_threads(1)
    # A hung collective (a rank that raised before it) fails the test instead of blocking it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        groups = {ranks: dist.new_group(list(ranks))
                  for ranks in {s[4] for s in SCENARIOS.values() if s[4] is not None}}
        results = {}
        for name, scenario in SCENARIOS.items():
            ranks = scenario[4]
            if ranks is None:
                results[name] = run_scenario(name, rank, None)
            elif rank in ranks:
                results[name] = run_scenario(name, ranks.index(rank), groups[ranks])
        results["too_few_values"] = run_too_few_values(rank)
        results["ddp"] = run_ddp(rank)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
