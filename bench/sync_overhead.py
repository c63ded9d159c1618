"""What fastbn.nn.SyncBatchNorm costs over a local BatchNorm: a training step (forward +
backward) of one layer in each of 2 gloo processes, on the ResNet BatchNorm shapes.

    PYTHONPATH=$PWD python bench/sync_overhead.py [--processes 2] [--threads 1]

Each process holds N samples (N = 1, 2, 4, 8: the whole batch is processes x N) and runs,
alternating in blocks, the step of fastbn.nn.BatchNorm2d (local statistics) and of
fastbn.nn.SyncBatchNorm (the group's), both with the default backend. A time is the
minimum over blocks of the mean step time in a block (interference only adds time); the
table (printed by rank 0) shows rank 0's. Bytes per layer and step: the forward
all-gathers processes x (2 C + 1) float64 values, the backward all-reduces 2 C; the
"collectives alone" column times just those two calls on tensors of those sizes (the
latency a step cannot avoid, whatever the kernels).

The processes meet through a file in a temporary directory (no port).
"""
import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastbn
import fastbn.nn as fnn
from fastbn.benchmarks import shapes

BLOCKS = 7
BLOCK_SECONDS = 0.1


def step(module, x, grad_y):
    x.grad = None
    module(x).backward(grad_y)


class Collectives:
    """The two collectives of a SyncBatchNorm step, alone, on tensors of their sizes."""

    def __init__(self, channels, processes):
        self.local = torch.zeros(2 * channels + 1, dtype=torch.float64)
        self.parts = [torch.empty_like(self.local) for _ in range(processes)]
        self.sums = torch.zeros(2 * channels, dtype=torch.float64)

    def __call__(self, x, grad_y):
        dist.all_gather(self.parts, self.local)
        dist.all_reduce(self.sums)


def timed_block(module, x, grad_y, calls):
    dist.barrier()  # both processes start the block together
    run = module if isinstance(module, Collectives) else lambda x, grad_y: step(module, x,
                                                                                grad_y)
    start = time.perf_counter()
    for _ in range(calls):
        run(x, grad_y)
    return (time.perf_counter() - start) / calls


def measure(rank, processes, threads, init_file):
    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=processes)
    rows = []
    for shape in shapes.BATCH_NORM_2D.shapes():
        channels = shape[1]
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=generator).requires_grad_()
        grad_y = torch.randn(shape, generator=generator)
        layers = {"local": fnn.BatchNorm2d(channels, backend=fastbn.get_backend()),
                  "sync": fnn.SyncBatchNorm(channels, backend=fastbn.get_backend()),
                  "collectives": Collectives(channels, processes)}
        calls = {}
        for name, module in layers.items():  # warm up, and size a block to BLOCK_SECONDS
            timed_block(module, x, grad_y, 1)
            once = timed_block(module, x, grad_y, 3)
            calls[name] = torch.tensor(max(1, int(BLOCK_SECONDS / once)))
            dist.all_reduce(calls[name], op=dist.ReduceOp.MIN)  # the same count everywhere
        best = {name: float("inf") for name in layers}
        for _ in range(BLOCKS):
            for name, module in layers.items():
                best[name] = min(best[name], timed_block(module, x, grad_y,
                                                         int(calls[name])))
        rows.append((shape, best["local"], best["sync"], best["collectives"],
                     processes * (2 * channels + 1) * 8, 2 * channels * 8))
    if rank == 0:
        print(f"{processes} processes x {threads} thread(s), backend {fastbn.get_backend()}, "
              f"torch {torch.__version__}; times per training step of one layer, rank 0")
        print("| input per process | local BatchNorm2d | SyncBatchNorm | overhead "
              "| collectives alone | bytes all-gathered (forward) "
              "| bytes all-reduced (backward) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for shape, local, sync, collectives, gathered, reduced in rows:
            print(f"| {shapes.format_shape(shape)} | {local * 1e6:.0f} us | {sync * 1e6:.0f} us "
                  f"| {(sync - local) * 1e6:+.0f} us ({sync / local:.2f}x) "
                  f"| {collectives * 1e6:.0f} us | {gathered} | {reduced} |")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(measure, args=(args.processes, args.threads, os.path.join(directory, "init")),
                 nprocs=args.processes, join=True)


if __name__ == "__main__":
    main()
