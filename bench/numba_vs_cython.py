"""Numba vs Cython backend (and torch's aten ops): BatchNorm2d training forward + backward, float32.

Usage: PYTHONPATH=. python bench/numba_vs_cython.py [--threads 2] [--repeats 15] [--channels-last]
                                                    [--torch]

The implementations are timed alternately on the same arrays (median of
`repeats` rounds, each the best of a few calls) and the ratio numba / cython
is printed per shape, with the geometric mean; with --torch also torch's
native_batch_norm + native_batch_norm_backward on the same memory, and torch's
time over numba's (above 1: numba is faster). Timings on a shared machine are
noisy: quote ratios, not absolute numbers.
"""
import argparse
import math
import time

import numpy as np

import fastbn

BATCHES = (1, 2, 4, 8)
CHW = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))
BACKENDS = ("cython", "numba")


def train_step(x, grad_out, weight, bias, running_mean, running_var, y, grad_x, backend):
    # Outputs preallocated: a fresh large array costs page faults that swamp the kernels.
    _, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training=True, out=y, backend=backend)
    fastbn.batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, True, out=grad_x,
                               backend=backend)


def torch_step(x, grad_out, weight, bias, running_mean, running_var):
    import torch

    _, save_mean, save_invstd = torch.native_batch_norm(x, weight, bias, running_mean,
                                                        running_var, True, 0.1, 1e-5)
    torch.ops.aten.native_batch_norm_backward(grad_out, x, weight, running_mean, running_var,
                                              save_mean, save_invstd, True, 1e-5,
                                              [True, True, True])


def best_time_s(step, calls):
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5, help="calls per round (best is kept)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--torch", action="store_true", help="also time torch's aten ops")
    args = parser.parse_args()
    fastbn.set_num_threads(args.threads)
    implementations = BACKENDS
    if args.torch:
        import torch

        torch.set_num_threads(args.threads)
        implementations = BACKENDS + ("torch",)
    rng = np.random.default_rng(0)
    ratios = []
    torch_ratios = []
    print(f"threads={args.threads} channels_last={args.channels_last}")
    print(f"{'shape':>20s} {'cython ms':>10s} {'numba ms':>10s} {'numba/cython':>13s}"
          + (f" {'torch ms':>10s} {'torch/numba':>12s}" if args.torch else ""))
    for N in BATCHES:
        for C, H, W in CHW:
            x = rng.standard_normal((N, C, H, W), dtype=np.float32)
            grad_out = rng.standard_normal((N, C, H, W), dtype=np.float32)
            if args.channels_last:
                x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
                grad_out = np.moveaxis(np.ascontiguousarray(np.moveaxis(grad_out, 1, -1)), -1, 1)
            params = [rng.standard_normal(C, dtype=np.float32) for _ in range(2)]
            stats = [np.zeros(C, np.float32), np.ones(C, np.float32)]
            outputs = [np.empty_like(x), np.empty_like(x)]
            steps = {b: (lambda b=b: train_step(x, grad_out, *params, *stats, *outputs, b))
                     for b in BACKENDS}
            if args.torch:
                tensors = [torch.from_numpy(a) for a in [x, grad_out, *params, *stats]]
                if args.channels_last:
                    tensors[:2] = [t.contiguous(memory_format=torch.channels_last)
                                   for t in tensors[:2]]
                steps["torch"] = lambda: torch_step(*tensors)
            for step in steps.values():  # warm-up: compile, page in, thread pools
                step()
            times = {b: [] for b in implementations}
            for _ in range(args.repeats):
                for b in implementations:
                    times[b].append(best_time_s(steps[b], args.calls))
            median = {b: float(np.median(times[b])) for b in implementations}
            ratio = median["numba"] / median["cython"]
            ratios.append(ratio)
            line = (f"{str((N, C, H, W)):>20s} {median['cython'] * 1e3:10.3f} "
                    f"{median['numba'] * 1e3:10.3f} {ratio:13.2f}")
            if args.torch:
                torch_ratios.append(median["torch"] / median["numba"])
                line += f" {median['torch'] * 1e3:10.3f} {torch_ratios[-1]:12.2f}"
            print(line, flush=True)
    print(f"geometric mean numba/cython: {math.exp(np.mean(np.log(ratios))):.2f}")
    if args.torch:
        print(f"geometric mean torch/numba: {math.exp(np.mean(np.log(torch_ratios))):.2f}, "
              f"lowest {min(torch_ratios):.2f}")


if __name__ == "__main__":
    main()
