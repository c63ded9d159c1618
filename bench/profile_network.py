"""Where a converted network's training step spends its time, against torch's layers:
one process, variants alternated, medians; then torch.profiler's top ops per variant.

    PYTHONPATH=$PWD python bench/profile_network.py --model mobilenet_v2 --batch 2 \\
        --image-size 224 --threads 16

Variants: torch's layers; fastbn.nn.convert with its defaults; convert with every layer
on fastbn's kernels (backend="cython"); convert without fusing activations; convert with
fastbn's kernels capped at --fastbn-threads threads while torch keeps --threads.
Written to find why a converted model slowed down at 16 threads (docs/benchmarks.md).
"""
import argparse
import copy
import random
import statistics
import time

import torch
from torch import nn

import fastbn
import fastbn.nn
from fastbn.benchmarks import end_to_end


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fastbn-threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--layers", action="store_true",
                        help="also time each BatchNorm input shape of the network alone, "
                        "kernel level (fastbn's NumPy API against torch's aten ops)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = end_to_end.build_model(args.model)
    models = {
        "torch": reference,
        "convert": fastbn.nn.convert(copy.deepcopy(reference)),
        "convert_cython": fastbn.nn.convert(copy.deepcopy(reference), backend="cython"),
        "convert_nofuse": fastbn.nn.convert(copy.deepcopy(reference), fuse=False),
        "convert_capped": fastbn.nn.convert(copy.deepcopy(reference)),
        "no_bn_act": end_to_end.without(reference, activations=True),
    }
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    target = torch.randint(0, end_to_end.CLASSES, (args.batch,))

    def step(name):
        fastbn.set_num_threads(args.fastbn_threads if name == "convert_capped" else None)
        torch.set_num_threads(args.threads)
        optimizers[name].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(models[name](x), target).backward()
        optimizers[name].step()

    for name in models:
        step(name)
        step(name)
    times = {name: [] for name in models}
    order = random.Random(0)
    for _ in range(args.rounds):
        for name in order.sample(list(models), len(models)):
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch"])
    print(f"{args.model} N={args.batch} {args.image_size}px, torch threads {args.threads}, "
          f"fastbn threads {fastbn.get_num_threads()} (capped variant {args.fastbn_threads})")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:15s} {median * 1e3:8.1f} ms  x torch {base / median:5.2f}  "
              f"spread {(max(values) - min(values)) / median:.0%}")
    if args.layers:
        time_layers(reference, x, args.threads)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name in ("torch", "convert"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step(name)
            print(f"== {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def time_layers(model, x, threads):
    """Each BatchNorm2d input shape of `model` on `x`: torch's and fastbn's training step
    (forward + backward) at kernel level, alternated, on `threads` threads."""
    from fastbn.benchmarks.batch_norm import BatchNormCase
    from fastbn.benchmarks.timing import alternate

    shapes = []
    hooks = [m.register_forward_hook(lambda m, inputs, y: shapes.append(tuple(inputs[0].shape)))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    fastbn.set_num_threads(threads)
    torch.set_num_threads(threads)
    total = {"torch": 0.0, "cython": 0.0}
    print("  layer shape            count   torch us  cython us   ratio")
    for shape in sorted(set(shapes), key=lambda s: -s[0] * s[1] * s[2] * s[3]):
        case = BatchNormCase(shape)
        timings = alternate({"torch": case.torch_step("training"),
                             "cython": case.fastbn_step("cython", "training")}, repeats=15)
        count = shapes.count(shape)
        for name in total:
            total[name] += timings[name].median_s * count
        print(f"  {'x'.join(map(str, shape)):20s} {count:5d} {timings['torch'].median_s * 1e6:10.1f} "
              f"{timings['cython'].median_s * 1e6:10.1f} "
              f"{timings['torch'].median_s / timings['cython'].median_s:7.2f}")
    print(f"  all layers: torch {total['torch'] * 1e3:.2f} ms, cython {total['cython'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
