"""Compare the small-batch layers' training step with the same layers in plain torch ops.

    PYTHONPATH=$PWD python bench/compare_small_batch.py [--threads 2] [--repeats 30]
        [--layers ghost_batch_norm batch_renorm frozen_batch_norm] [--channels-last]
        [--backend cython] [--shapes 1x16x8x8 ...] [--output FILE]

The figures of docs/small_batch.md are recorded with

    PYTHONPATH=$PWD python bench/compare_small_batch.py --threads 2 --repeats 40 \\
        --output docs/benchmarks/small_batch.json

then written into the page by `python -m fastbn docs`.

For each layer of fastbn.benchmarks.small_batch.LAYERS and each shape of the ResNet
BatchNorm grid (fastbn.benchmarks.shapes.BATCH_NORM_2D, float32; --shapes for others) it
prints a markdown row: the plain-torch layer's step (what one writes without fastbn: a
loop of BatchNorm2d calls and a cat for Ghost BatchNorm, Ioffe's formula for Batch
Renorm, torchvision's FrozenBatchNorm2d), fastbn.nn's with the backend named, and as
built (backend=None: fastbn.nn's routing), with the speedups; then per fastbn column the
geometric-mean speedup and the worst shape. A step is one training step of the layer
alone (`SmallBatchLayerCase`: gradients set to None, forward, backward). --output
writes the results file (`fastbn.benchmarks.layer_runs`: the machine, the command, the
settings and every measurement with its median, quartiles and minimum).

Method: the same threads for torch and fastbn; each fastbn result checked against the
plain one first; the implementations interleaved (fastbn.benchmarks.timing.alternate,
shuffled rounds); a time is the minimum over rounds (interference only adds time: on the
shared 2-core machine medians moved by 10x between runs). Compare the columns of one run.
"""
import argparse
import sys

import torch

import fastbn
from fastbn.benchmarks import layer_runs, shapes, small_batch

SCRIPT = "bench/compare_small_batch.py"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--layers", nargs="+", default=list(small_batch.LAYERS),
                        choices=small_batch.LAYERS)
    parser.add_argument("--backend", default=fastbn.get_backend())
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--shapes", nargs="+", type=layer_runs.parse_shape,
                        default=shapes.BATCH_NORM_2D.shapes(),
                        help="(N, C, H, W) inputs, e.g. 1x16x8x8 (default: the ResNet grid)")
    parser.add_argument("--output", help="write the results file (JSON) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    layout = "channels-last" if args.channels_last else "contiguous"
    environment = layer_runs.environment(args.threads)
    print(f"{args.threads} threads, float32, {layout}, torch {torch.__version__}, "
          f"per-step times, minimum over {args.repeats} interleaved rounds")
    implementations = [args.backend, "default"]
    records = []
    for layer in args.layers:
        print(f"\n{layer}\n")
        print(f"| input | plain torch | fastbn ({args.backend}) | speedup | fastbn (default) "
              f"| speedup |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for shape in args.shapes:
            case = small_batch.SmallBatchLayerCase(layer, shape, "float32", args.channels_last)
            measured = layer_runs.measure_against_plain_torch(
                case, layer, implementations, args.threads, args.repeats)
            records += measured
            at = {r["implementation"]: r["min_s"] for r in measured}
            print(f"| {shapes.format_shape(shape)} | {at['torch'] * 1e6:.0f} us | "
                  + " | ".join(f"{at[name] * 1e6:.0f} us | {at['torch'] / at[name]:.2f}x"
                               for name in implementations) + " |", flush=True)
    settings = {"threads": args.threads, "rounds": args.repeats, "estimate": "min",
                "clock": "wall", "implementations": implementations,
                "parameters": {"ghost_batch_norm": {"k": small_batch.VIRTUAL_BATCH_SIZE},
                               "batch_renorm": {"r_max": small_batch.R_MAX,
                                                "d_max": small_batch.D_MAX}}}
    results = layer_runs.results_file(args.threads, SCRIPT, argv, environment, settings,
                                      records)
    print()
    for (layer, _, name), values in layer_runs.plain_torch_ratios(results).items():
        print(f"{layer}, fastbn ({name}): geometric mean "
              f"{layer_runs.speedup_summary(values)[0]}")
    if args.output:
        layer_runs.write(results, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
