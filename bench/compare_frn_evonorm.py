"""Compare fastbn.nn's FilterResponseNorm2d and EvoNorm2dS0 with the same layers in plain
torch ops (timm's formulas): one training step (forward + backward through autograd).

    PYTHONPATH=$PWD python bench/compare_frn_evonorm.py [--ops frn evonorm_s0]
        [--backends cython] [--threads 2] [--rounds 15] [--channels-last] [--quick]
        [--shapes 1x64x56x56 ...] [--estimate median|min] [--sample-ms 0.5]
        [--clock wall|thread] [--output FILE]

The figures of docs/frn_evonorm.md are recorded with

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        PYTHONPATH=$PWD python bench/compare_frn_evonorm.py --threads 2 --rounds 25 \\
        --estimate min --sample-ms 0.3 --output docs/benchmarks/frn_evonorm.json

then written into the page by `python -m fastbn docs` (the malloc settings keep both
sides from paying page faults for fresh outputs every step: docs/design.md).

For each shape of fastbn.benchmarks.norm_act.GRID (the ResNet feature maps at N = 1, 2,
4, 8; --quick: the extreme ones; --shapes: others) it prints a markdown row: the time of
one step of the plain-torch layer and of the fastbn.nn layer with each backend, and the
ratio torch / fastbn (above 1: fastbn is faster); then per op and backend the geometric
mean of the ratios and the worst shape. --output writes the results file
(`fastbn.benchmarks.layer_runs`: the machine, the command, the settings and every
measurement with its median, quartiles and minimum).

Each implementation's outputs and gradients are checked against the plain-torch
layer's first. The implementations are timed interleaved, in a shuffled order each
round (fastbn.benchmarks.timing.alternate), with the same thread count for torch and
fastbn; on a shared machine the ratios are steadier than the times. Where other jobs
stall most samples (more runnable threads than cores: a descheduled OpenMP thread holds
up its whole parallel region), `--estimate min` reports each implementation's fastest
sample instead of the median, as timeit advises: stalls only ever add time. `--clock
thread` (with --threads 1 only) times the calling thread's CPU time: time spent
descheduled does not count, which makes one-thread ratios usable on a loaded machine.
"""
import argparse
import sys
import time

import torch

import fastbn
from fastbn.benchmarks import layer_runs, norm_act, shapes

SCRIPT = "bench/compare_frn_evonorm.py"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(norm_act.OPS), choices=norm_act.OPS)
    parser.add_argument("--backends", nargs="+", default=["cython"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="the extreme batch sizes and stages only")
    parser.add_argument("--shapes", nargs="+", type=layer_runs.parse_shape,
                        help="(N, C, H, W) inputs, e.g. 1x64x8x8, instead of the grid")
    parser.add_argument("--estimate", choices=("median", "min"), default="median")
    parser.add_argument("--sample-ms", type=float, default=0.5,
                        help="calls are repeated within a sample up to this long")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--output", help="write the results file (JSON) here")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: pass --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    threads = args.threads or fastbn.get_num_threads()
    fastbn.set_num_threads(threads)
    torch.set_num_threads(threads)
    grid = args.shapes or (norm_act.QUICK_GRID if args.quick else norm_act.GRID).shapes()
    layout = "channels-last" if args.channels_last else "contiguous"
    environment = layer_runs.environment(threads)
    print(f"{threads} threads, float32, {layout}, {args.estimate} of {args.rounds} rounds, "
          f"{args.clock} clock\n")
    print("| op | shape | torch ms | " + " | ".join(f"{b} ms | x" for b in args.backends) + " |")
    print("|---|---|---:|" + "---:|---:|" * len(args.backends))
    records = []
    for op in args.ops:
        for shape in grid:
            case = norm_act.NormActModuleCase(op, shape, "float32", args.channels_last)
            measured = layer_runs.measure_against_plain_torch(
                case, op, args.backends, threads, args.rounds,
                min_round_s=args.sample_ms * 1e-3, clock=clock)
            records += measured
            times = {r["implementation"]: r[f"{args.estimate}_s"] for r in measured}
            row = f"| {op} | {shapes.format_shape(shape)} | {times['torch'] * 1e3:.3f} |"
            for backend in args.backends:
                row += f" {times[backend] * 1e3:.3f} | {times['torch'] / times[backend]:.2f} |"
            print(row, flush=True)
    settings = {"threads": threads, "rounds": args.rounds, "estimate": args.estimate,
                "clock": args.clock, "sample_ms": args.sample_ms,
                "implementations": args.backends,
                "parameters": {"frn": {"eps": norm_act.FRN_EPS},
                               "evonorm_s0": {"groups": norm_act.GROUPS,
                                              "eps": norm_act.EVONORM_EPS}}}
    results = layer_runs.results_file(threads, SCRIPT, argv, environment, settings, records)
    print()
    for (op, _, backend), values in layer_runs.plain_torch_ratios(results).items():
        print(f"{op} {backend}: geometric mean {layer_runs.speedup_summary(values)[0]}")
    if args.output:
        layer_runs.write(results, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
