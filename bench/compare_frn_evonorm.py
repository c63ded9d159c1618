"""Compare fastbn.nn's FilterResponseNorm2d and EvoNorm2dS0 with the same layers in plain
torch ops (timm's formulas): one training step (forward + backward through autograd).

    PYTHONPATH=$PWD python bench/compare_frn_evonorm.py [--ops frn evonorm_s0]
        [--backends cython] [--threads 2] [--rounds 15] [--channels-last] [--quick]
        [--estimate median|min] [--sample-ms 0.5] [--clock wall|thread]

For each shape of fastbn.benchmarks.norm_act.GRID (the ResNet feature maps at N = 1, 2,
4, 8) it prints a markdown row: the median time of one step of the plain-torch layer and
of the fastbn.nn layer with each backend, and the ratio torch / fastbn (above 1: fastbn
is faster); then per op and backend the geometric mean of the ratios and the worst
shape. Each implementation's outputs and gradients are checked against the plain-torch
layer's first. The implementations are timed interleaved, in a shuffled order each
round (fastbn.benchmarks.timing.alternate), with the same thread count for torch and
fastbn; on a shared machine the ratios are steadier than the times. Where other jobs
stall most samples (more runnable threads than cores: a descheduled OpenMP thread holds
up its whole parallel region), `--estimate min` reports each implementation's fastest
sample instead, as timeit advises: stalls only ever add time. `--clock thread` (with
--threads 1 only) times the calling thread's CPU time: time spent descheduled does not
count, which makes one-thread ratios usable on a loaded machine.
"""
import argparse
import math
import time

import torch

import fastbn
from fastbn.benchmarks import norm_act, shapes, timing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(norm_act.OPS), choices=norm_act.OPS)
    parser.add_argument("--backends", nargs="+", default=["cython"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="the extreme batch sizes and stages only")
    parser.add_argument("--estimate", choices=("median", "min"), default="median")
    parser.add_argument("--sample-ms", type=float, default=0.5,
                        help="calls are repeated within a sample up to this long")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: pass --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    threads = args.threads or fastbn.get_num_threads()
    fastbn.set_num_threads(threads)
    torch.set_num_threads(threads)
    grid = norm_act.QUICK_GRID if args.quick else norm_act.GRID
    layout = "channels-last" if args.channels_last else "contiguous"
    print(f"{threads} threads, float32, {layout}, {args.estimate} of {args.rounds} rounds, "
          f"{args.clock} clock\n")
    print("| op | shape | torch ms | " + " | ".join(f"{b} ms | x" for b in args.backends) + " |")
    print("|---|---|---:|" + "---:|---:|" * len(args.backends))
    ratios = {(op, b): [] for op in args.ops for b in args.backends}
    for op in args.ops:
        for shape in grid.shapes():
            case = norm_act.NormActModuleCase(op, shape, "float32", args.channels_last)
            steps = {"torch": case.torch_step("training")}
            expected = steps["torch"]()
            for backend in args.backends:
                steps[backend] = case.fastbn_step(backend, "training")
                case.check(steps[backend](), expected, "training", backend)
            timings = timing.alternate(steps, repeats=args.rounds,
                                       min_round_s=args.sample_ms * 1e-3, clock=clock)
            times = {name: getattr(t, f"{args.estimate}_s") for name, t in timings.items()}
            row = f"| {op} | {shapes.format_shape(shape)} | {times['torch'] * 1e3:.3f} |"
            for backend in args.backends:
                ratio = times["torch"] / times[backend]
                ratios[op, backend].append((ratio, shape))
                row += f" {times[backend] * 1e3:.3f} | {ratio:.2f} |"
            print(row, flush=True)
    print()
    for (op, backend), values in ratios.items():
        geomean = math.exp(sum(math.log(r) for r, _ in values) / len(values))
        worst, worst_shape = min(values)
        print(f"{op} {backend}: geometric mean {geomean:.2f}x, worst {worst:.2f}x "
              f"({shapes.format_shape(worst_shape)})")


if __name__ == "__main__":
    main()
