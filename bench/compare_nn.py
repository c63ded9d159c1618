"""fastbn.nn against torch.nn, in one run: BatchNorm2d layers alone, and a whole ResNet-18.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python bench/compare_nn.py [--rounds 9]

Layer cases (float32, 2 threads for both libraries), with fastbn's modules as
built by default (backend=None: where torch's op was measured faster, small or
channels-last inputs, it runs; see fastbn/nn/functional.py) and with the
backend named (always fastbn's kernels): one training step of the layer alone
(module forward + backward through autograd) for N in {1, 2, 4, 8} and
(C, H, W) in the ResNet shapes plus a tiny (16, 8, 8); the same with
channels-last input; and eval-mode forward under no_grad. End to end: a
ResNet-18 (fastbn/benchmarks/resnet.py) training step (forward, cross-entropy, backward,
SGD step) on 112x112 images with torch's layers and after fastbn.nn.convert,
alternated on the same model (convert and revert are in place and free).

Timing: each round times a block of calls of every implementation in turn
(order alternating), so both see the same machine state; the tables show the
median over rounds, and the ratio torch / fastbn (> 1: fastbn is faster).
Every case is first checked against torch. The speed goals live here, never in
timed tests: the machine is shared and timings are noisy.
"""
import argparse
import copy
import math
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastbn  # noqa: E402
import fastbn.nn as fnn  # noqa: E402

from fastbn.benchmarks.resnet import ResNet  # noqa: E402

BATCH_SIZES = (1, 2, 4, 8)
FEATURE_SHAPES = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (16, 8, 8))


def time_alternating(callables, rounds, min_block_s):
    """Median seconds per call of each callable, timed in alternating blocks."""
    calls = {}
    for name, fn in callables.items():  # warm up, and size the blocks
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, math.ceil(min_block_s / max(time.perf_counter() - start, 1e-9)))
    per_call = {name: [] for name in callables}
    names = list(callables)
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            fn, n = callables[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            per_call[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(times) for name, times in per_call.items()}


def layer_case(shape, mode, memory_format):
    """{name: step} for one BatchNorm2d case, each checked against torch's."""
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    grad_y = torch.randn(shape).contiguous(memory_format=memory_format)
    modules = {"torch": nn.BatchNorm2d(shape[1]), "fastbn": fnn.BatchNorm2d(shape[1]),
               "named": fnn.BatchNorm2d(shape[1], backend=fastbn.get_backend())}
    outputs = {}
    steps = {}
    for name, module in modules.items():
        if mode == "eval":
            module.eval()
            x_in = x

            def step(module=module, x_in=x_in):
                with torch.no_grad():
                    return module(x_in)
        else:
            x_in = x.clone().requires_grad_()

            def step(module=module, x_in=x_in):
                # Gradients set to None, as between the steps of a training loop: no
                # accumulation pass (in a network the input's gradient flows on instead).
                x_in.grad = None
                module.zero_grad(set_to_none=True)
                y = module(x_in)
                y.backward(grad_y)
                return y
        outputs[name] = (step(), x_in.grad)
        steps[name] = step
    for name in ("fastbn", "named"):
        torch.testing.assert_close(outputs[name][0], outputs["torch"][0], rtol=1e-4, atol=1e-4)
        if mode != "eval":
            torch.testing.assert_close(outputs[name][1], outputs["torch"][1], rtol=1e-3,
                                       atol=1e-4)
    return steps


def layer_table(mode, memory_format, rounds, min_block_s):
    title = {"train": "training step (forward + backward)",
             "eval": "eval forward (no_grad)"}[mode]
    layout = "channels-last" if memory_format == torch.channels_last else "contiguous"
    print(f"\n### BatchNorm2d {title}, {layout}, float32\n")
    print("| N | C, H, W | torch (us) | fastbn (us) | torch / fastbn "
          "| fastbn, backend named (us) | torch / named |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    ratios = {"fastbn": [], "named": []}
    for feature_shape in FEATURE_SHAPES:
        for batch in BATCH_SIZES:
            steps = layer_case((batch,) + feature_shape, mode, memory_format)
            times = time_alternating(steps, rounds, min_block_s)
            row = [str(batch), ", ".join(map(str, feature_shape)), f"{times['torch'] * 1e6:.1f}"]
            for name, values in ratios.items():
                values.append(times["torch"] / times[name])
                row += [f"{times[name] * 1e6:.1f}", f"{values[-1]:.2f}"]
            print(f"| {' | '.join(row)} |", flush=True)
    for name, values in ratios.items():
        geomean = math.exp(sum(map(math.log, values)) / len(values))
        label = "fastbn" if name == "fastbn" else "fastbn with the backend named"
        print(f"\n{label}: geometric mean of torch / fastbn **{geomean:.2f}**, "
              f"lowest {min(values):.2f}", flush=True)


def without_batch_norm(model):
    """A copy of `model` with every BatchNorm2d replaced by the identity."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())
    return model


def train_step(model, optimizer, x, target):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), target).backward()
    optimizer.step()


def resnet_table(rounds, min_block_s):
    print("\n### ResNet-18 training step (forward, loss, backward, SGD step), 112x112, "
          "float32\n")
    print("The last columns bound what any BatchNorm speed-up can give: the same network "
          "with its BatchNorm layers removed.\n")
    print("| batch | torch layers (ms) | fastbn.nn.convert (ms) | torch / fastbn "
          "| no BatchNorm (ms) | torch / no BatchNorm |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for batch in (2, 8):
        torch.manual_seed(0)
        model = ResNet()
        bound = without_batch_norm(model)
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
                      for name, m in (("model", model), ("bound", bound))}
        x = torch.randn(batch, 3, 112, 112)
        target = torch.randint(0, 10, (batch,))
        losses = [nn.functional.cross_entropy(convert_or_revert(model)(x), target).item()
                  for convert_or_revert in (fnn.revert, fnn.convert)]
        assert math.isclose(losses[0], losses[1], rel_tol=1e-4), losses
        # convert and revert switch the layers' classes in place: the same weights and memory.
        steps = {
            "torch": lambda: train_step(fnn.revert(model), optimizers["model"], x, target),
            "fastbn": lambda: train_step(fnn.convert(model), optimizers["model"], x, target),
            "bound": lambda: train_step(bound, optimizers["bound"], x, target),
        }
        times = time_alternating(steps, rounds, min_block_s)
        print(f"| {batch} | {times['torch'] * 1e3:.1f} | {times['fastbn'] * 1e3:.1f} | "
              f"{times['torch'] / times['fastbn']:.2f} | {times['bound'] * 1e3:.1f} | "
              f"{times['torch'] / times['bound']:.2f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per case")
    parser.add_argument("--min-block-ms", type=float, default=20.0,
                        help="each block of calls lasts at least this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["layers", "resnet"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, fastbn {fastbn.__version__} (backend "
          f"{fastbn.get_backend()}), {args.threads} threads, {args.rounds} rounds, "
          f"medians")
    min_block_s = args.min_block_ms / 1e3
    if args.only != "resnet":
        layer_table("train", torch.contiguous_format, args.rounds, min_block_s)
        layer_table("train", torch.channels_last, args.rounds, min_block_s)
        layer_table("eval", torch.contiguous_format, args.rounds, min_block_s)
    if args.only != "layers":
        resnet_table(args.rounds, min_block_s * 10)


if __name__ == "__main__":
    main()
