"""What fastbn.nn.SyncBatchNorm costs over a local BatchNorm: a training step (forward +
backward) of one layer in each of 2 gloo processes, on the ResNet BatchNorm shapes.

    PYTHONPATH=$PWD python bench/sync_overhead.py [--processes 2] [--threads 1]
        [--blocks 7] [--block-ms 100] [--shapes 1x16x8x8 ...] [--output FILE]

The figures of docs/small_batch.md are recorded with

    PYTHONPATH=$PWD python bench/sync_overhead.py --processes 2 --threads 1 \\
        --output docs/benchmarks/sync.json

then written into the page by `python -m fastbn docs`.

Each process holds N samples (N = 1, 2, 4, 8: the whole batch is processes x N; --shapes
for other inputs) and runs, alternating in blocks, the step of fastbn.nn.BatchNorm2d
(local statistics) and of fastbn.nn.SyncBatchNorm (the group's), both with the default
backend. A time is the minimum over blocks of the mean step time in a block
(interference only adds time); the table (printed by rank 0) shows rank 0's. Bytes per
layer and step: the forward all-gathers processes x (2 C + 1) float64 values, the
backward all-reduces 2 C; the "collectives alone" column times just those two calls on
tensors of those sizes (the latency a step cannot avoid, whatever the kernels).
--output makes rank 0 write the results file (`fastbn.benchmarks.layer_runs`: the
machine, the command, the settings and every block's mean time).

The processes meet through a file in a temporary directory (no port).
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastbn
import fastbn.nn as fnn
from fastbn.benchmarks import layer_runs, shapes

SCRIPT = "bench/sync_overhead.py"
BLOCKS = 7
BLOCK_MS = 100.0


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


def measure(rank, args, argv, init_file):
    processes, threads = args.processes, args.threads
    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=processes)
    # Once every process has started (their start-up is not other processes' load), while
    # the others wait at the barrier.
    environment = layer_runs.environment(threads) if rank == 0 else None
    dist.barrier()
    records = []
    for shape in args.shapes:
        channels = shape[1]
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=generator).requires_grad_()
        grad_y = torch.randn(shape, generator=generator)
        layers = {"local": fnn.BatchNorm2d(channels, backend=fastbn.get_backend()),
                  "sync": fnn.SyncBatchNorm(channels, backend=fastbn.get_backend()),
                  "collectives": Collectives(channels, processes)}
        calls = {}
        for name, module in layers.items():  # warm up, and size a block to --block-ms
            timed_block(module, x, grad_y, 1)
            once = timed_block(module, x, grad_y, 3)
            calls[name] = torch.tensor(max(1, int(args.block_ms * 1e-3 / once)))
            dist.all_reduce(calls[name], op=dist.ReduceOp.MIN)  # the same count everywhere
        block_s = {name: [] for name in layers}
        for _ in range(args.blocks):
            for name, module in layers.items():
                block_s[name].append(timed_block(module, x, grad_y, int(calls[name])))
        for name in layers:
            record = dict(shape=list(shape), dtype="float32", layout="contiguous",
                          processes=processes, threads=threads, rank=rank,
                          implementation=name, min_s=min(block_s[name]),
                          block_s=block_s[name], calls_per_block=int(calls[name]))
            if name == "sync":
                record.update(bytes_all_gathered=processes * (2 * channels + 1) * 8,
                              bytes_all_reduced=2 * channels * 8)
            records.append(record)
    if rank == 0:
        settings = {"processes": processes, "threads": threads, "blocks": args.blocks,
                    "block_ms": args.block_ms, "backend": fastbn.get_backend(),
                    "estimate": "min"}
        results = layer_runs.results_file(threads, SCRIPT, argv, environment, settings,
                                          records)
        print(f"{processes} processes x {threads} thread(s), backend {fastbn.get_backend()}, "
              f"torch {torch.__version__}; times per training step of one layer, rank 0")
        for line in layer_runs.sync_table(results)[2:]:
            print(line)
        if args.output:
            layer_runs.write(results, args.output)
            print(f"wrote {args.output}")
    dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument("--blocks", type=int, default=BLOCKS,
                        help="timed blocks per implementation and shape")
    parser.add_argument("--block-ms", type=float, default=BLOCK_MS,
                        help="a block's calls are sized to last about this long")
    parser.add_argument("--shapes", nargs="+", type=layer_runs.parse_shape,
                        default=shapes.BATCH_NORM_2D.shapes(),
                        help="(N, C, H, W) input per process, e.g. 1x16x8x8 (default: the "
                        "ResNet grid)")
    parser.add_argument("--output", help="rank 0 writes the results file (JSON) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(measure, args=(args, argv, os.path.join(directory, "init")),
                 nprocs=args.processes, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
