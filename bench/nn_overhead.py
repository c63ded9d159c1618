"""Per-call overhead of fastbn.nn: a BatchNorm2d training step on a tiny input, and its parts.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python bench/nn_overhead.py [--threads 2]

On (1, 16, 8, 8) the kernels take a few microseconds, so a step's time is the
Python and autograd machinery around them. The parts are timed alone: an
autograd.Function that does nothing (the floor of any Python autograd op), the
NumPy-level fastbn calls, and the tensor <-> NumPy conversions. Times are the
minimum over many short blocks (interference only adds time), alternating the
cases; the machine is shared, so compare rows of one run.
"""
import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastbn  # noqa: E402
import fastbn.nn as fnn  # noqa: E402
from fastbn import batch_norm  # noqa: E402
from fastbn.nn import _function, functional  # noqa: E402


class DoNothing(torch.autograd.Function):
    """The cheapest Python autograd op: saves its inputs, returns a new tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad_y):
        ctx.saved_tensors
        return grad_y, None, None


def cases(shape):
    torch.manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape, requires_grad=True)
    grad_y = torch.randn(shape)
    reference = torch.nn.BatchNorm2d(channels)
    reference_act = torch.nn.Sequential(torch.nn.BatchNorm2d(channels),
                                        torch.nn.ReLU6(inplace=True))
    named = fnn.BatchNorm2d(channels, backend=fastbn.get_backend())
    default = fnn.BatchNorm2d(channels)
    fused = fnn.BatchNormAct2d(channels, act="relu6", backend=fastbn.get_backend())
    weight, bias = reference.weight, reference.bias
    arrays = [t.detach().numpy() for t in (x, weight, bias, grad_y)]
    x_array, weight_array, bias_array, grad_array = arrays
    running = [reference.running_mean.numpy().copy(), reference.running_var.numpy().copy()]
    running_tensors = [torch.from_numpy(a) for a in running]
    _, mean, invstd = fastbn.batch_norm_forward(x_array, weight_array, bias_array, *running,
                                                training=True)
    kernels = fastbn._backends.load_backend(fastbn.get_backend())
    layout = fastbn._layout.kernel_view(x_array)
    return {
        "torch.nn.BatchNorm2d step": lambda: reference(x).backward(grad_y),
        "torch.nn BatchNorm2d + ReLU6 step": lambda: reference_act(x).backward(grad_y),
        "fastbn.nn.BatchNorm2d step, backend named": lambda: named(x).backward(grad_y),
        "fastbn.nn.BatchNorm2d step, backend=None": lambda: default(x).backward(grad_y),
        "fastbn.nn.BatchNormAct2d(relu6) step, backend named": lambda: fused(x).backward(grad_y),
        "empty autograd.Function step": lambda: DoNothing.apply(x, weight, bias).backward(grad_y),
        "fastbn.batch_norm_forward (NumPy API, checks included)": lambda: fastbn.batch_norm_forward(
            x_array, weight_array, bias_array, *running, training=True),
        "fastbn.batch_norm_backward (NumPy API, checks included)": lambda: fastbn.batch_norm_backward(
            grad_array, x_array, weight_array, mean, invstd, True),
        "batch_norm.run_forward (fastbn.nn's call, no checks)": lambda: batch_norm.run_forward(
            kernels, x_array, weight_array, bias_array, *running, True, 0.1, 1e-5, layout=layout),
        "batch_norm.run_backward (fastbn.nn's call, no checks)": lambda: batch_norm.run_backward(
            kernels, grad_array, x_array, weight_array, mean, invstd, True, (True, True, True),
            layout=layout),
        "routing: runs_on_fastbn + torch_is_faster": lambda: (
            _function.runs_on_fastbn(x, weight, bias, *running_tensors)
            and functional.torch_is_faster("batch_norm", x, False)),
        "tensor.numpy(force=True)": lambda: x.numpy(force=True),
        "torch.from_numpy": lambda: torch.from_numpy(x_array),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 16, 8, 8])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    timed = cases(tuple(args.shape))
    best = dict.fromkeys(timed, float("inf"))
    calls = 10
    for index in range(args.rounds):
        order = list(timed) if index % 2 == 0 else list(timed)[::-1]
        for name in order:
            fn = timed[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    print(f"shape {tuple(args.shape)}, float32, {args.threads} threads, backend "
          f"{fastbn.get_backend()}; minimum over {args.rounds} blocks of {calls} calls\n")
    print("| case | us per call |")
    print("| --- | ---: |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1e6:.1f} |")


if __name__ == "__main__":
    main()
