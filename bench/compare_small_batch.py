"""Compare the small-batch layers' training step with the same layers in plain torch ops.

    PYTHONPATH=$PWD python bench/compare_small_batch.py [--threads 2] [--repeats 30]
        [--layers ghost_batch_norm batch_renorm frozen_batch_norm] [--channels-last]
        [--backend cython]

For each layer of fastbn.benchmarks.small_batch.LAYERS and each shape of the ResNet
BatchNorm grid (fastbn.benchmarks.shapes.BATCH_NORM_2D, float32) it prints a markdown row:
the plain-torch layer's step (what one writes without fastbn: a loop of BatchNorm2d calls
and a cat for Ghost BatchNorm, Ioffe's formula for Batch Renorm, torchvision's
FrozenBatchNorm2d), fastbn.nn's with the backend named, and as built (backend=None:
fastbn.nn's routing), with the speedups; then per fastbn column the geometric-mean
speedup and the worst shape. A step is one training step of the layer alone
(`SmallBatchLayerCase`: gradients set to None, forward, backward).

Method: the same threads for torch and fastbn; each fastbn result checked against the
plain one first; the implementations interleaved (fastbn.benchmarks.timing.alternate,
shuffled rounds); a time is the minimum over rounds (interference only adds time: on the
shared 2-core machine medians moved by 10x between runs). Compare the columns of one run.
"""
import argparse
import math

import torch

import fastbn
from fastbn.benchmarks import shapes, small_batch
from fastbn.benchmarks.timing import alternate


def compare(layer, shape, backend, channels_last, repeats):
    case = small_batch.SmallBatchLayerCase(layer, shape, "float32", channels_last)
    steps = {"torch": case.torch_step("training"),
             backend: case.fastbn_step(backend, "training"),
             "default": case.fastbn_step("default", "training")}
    expected = case.torch_step("training")()
    for name in (backend, "default"):
        case.check(case.fastbn_step(name, "training")(), expected, "training", name)
    return alternate(steps, repeats=repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--layers", nargs="+", default=list(small_batch.LAYERS),
                        choices=small_batch.LAYERS)
    parser.add_argument("--backend", default=fastbn.get_backend())
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    layout = "channels-last" if args.channels_last else "contiguous"
    print(f"{args.threads} threads, float32, {layout}, torch {torch.__version__}, "
          f"per-step times, minimum over {args.repeats} interleaved rounds")
    for layer in args.layers:
        print(f"\n{layer}\n")
        print(f"| input | plain torch | fastbn ({args.backend}) | speedup | fastbn (default) "
              f"| speedup |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        speedups = {args.backend: [], "default": []}
        for shape in shapes.BATCH_NORM_2D.shapes():
            timings = compare(layer, shape, args.backend, args.channels_last, args.repeats)
            torch_s = timings["torch"].min_s
            cells = []
            for name in (args.backend, "default"):
                speedups[name].append((torch_s / timings[name].min_s, shape))
                cells.append(f"{timings[name].min_s * 1e6:.0f} us | "
                             f"{speedups[name][-1][0]:.2f}x")
            print(f"| {shapes.format_shape(shape)} | {torch_s * 1e6:.0f} us | "
                  + " | ".join(cells) + " |", flush=True)
        for name, values in speedups.items():
            geomean = math.exp(sum(math.log(v) for v, _ in values) / len(values))
            worst, worst_shape = min(values)
            print(f"\n{layer}, fastbn ({name}): geometric mean {geomean:.2f}x, worst {worst:.2f}x "
                  f"({shapes.format_shape(worst_shape)})")


if __name__ == "__main__":
    main()
