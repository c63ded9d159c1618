"""LayerNorm and RMSNorm training step (forward + backward) against PyTorch on the CPU.

    PYTHONPATH=$PWD python bench/compare_layer_norm.py [--threads 2] [--rounds 300]

Shapes: shapes.LAYER_NORM, (N, 128 tokens, D) as (N * 128, D) float32 rows
normalized over D, D in {256, 768}, N in 1..8 (a transformer's tokens x hidden size). PyTorch runs `torch.native_layer_norm`
then `torch.ops.aten.native_layer_norm_backward` (no autograd overhead), and for
RMSNorm `torch.nn.functional.rms_norm` with autograd (torch 2.13 has no CPU
backward kernel for it). Every implementation's results are checked against
PyTorch's before it is timed. Implementations are timed one call each in
turn (in a rotating order), round after round, and the median per call is kept,
so that the noise of a shared machine hits all of them alike; the table gives speed-ups over PyTorch
(> 1 = fastbn faster) and their geometric means.
"""
import argparse
import math
import statistics
import time

import numpy as np
import torch

import fastbn
from fastbn.benchmarks import shapes

EPS = 1e-5


def layer_norm_steps(x, w, b, dy, backends):
    D = x.shape[1]
    xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))

    def torch_step():
        y, mean, rstd = torch.native_layer_norm(xt, [D], wt, bt, EPS)
        grads = torch.ops.aten.native_layer_norm_backward(dyt, xt, [D], mean, rstd, wt, bt,
                                                          [True, True, True])
        return (y, *grads)

    steps = {"torch": torch_step}
    for backend in backends:
        def step(backend=backend):
            y, mean, rstd = fastbn.layer_norm_forward(x, D, w, b, EPS, backend=backend)
            return (y, *fastbn.layer_norm_backward(dy, x, D, mean, rstd, w, b, backend=backend))
        steps[backend] = step
    return steps


def rms_norm_steps(x, w, b, dy, backends):
    D = x.shape[1]
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(w).requires_grad_()
    dyt = torch.from_numpy(dy)

    def torch_step():
        xt.grad = wt.grad = None
        y = torch.nn.functional.rms_norm(xt, [D], wt)
        y.backward(dyt)
        return y.detach(), xt.grad, wt.grad

    steps = {"torch": torch_step}
    for backend in backends:
        def step(backend=backend):
            y, rstd = fastbn.rms_norm_forward(x, D, w, backend=backend)
            return (y, *fastbn.rms_norm_backward(dy, x, D, rstd, w, backend=backend))
        steps[backend] = step
    return steps


def check_against_torch(steps):
    expected = [np.asarray(t.detach()) for t in steps["torch"]()]
    for name, step in steps.items():
        for got, want in zip(step(), expected):
            # Sums over up to 1024 rows in float32: compare relative to the largest value.
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale,
                                       err_msg=f"{name} disagrees with torch")


def time_alternating(steps, rounds):
    """Median seconds per call of each step: one call of each per round, in turn.

    The order turns round every round: a call right after another library's runs
    while that library's OpenMP threads still spin, and pays for it."""
    for step in steps.values():  # warm up
        step()
    samples = {name: [] for name in steps}
    order = list(steps)
    for round_index in range(rounds):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            steps[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--backends", nargs="+", default=["cython", "numba"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    for op, make_steps in (("LayerNorm", layer_norm_steps), ("RMSNorm", rms_norm_steps)):
        print(f"\n{op} forward + backward, float32, {args.threads} threads: "
              "torch time and speed-up over torch (median of alternating rounds)\n")
        print("| shape | torch us | " + " | ".join(args.backends) + " |")
        print("|---|---|" + "---|" * len(args.backends))
        ratios = {backend: [] for backend in args.backends}
        for tokens, D in shapes.LAYER_NORM.sample_shapes:
            for N in shapes.LAYER_NORM.batch_sizes:
                shape = (N * tokens, D)
                x = (rng.standard_normal(shape) + 1.0).astype(np.float32)
                dy = rng.standard_normal(shape).astype(np.float32)
                w = rng.standard_normal(D).astype(np.float32)
                b = rng.standard_normal(D).astype(np.float32)
                steps = make_steps(x, w, b, dy, args.backends)
                check_against_torch(steps)
                median = time_alternating(steps, args.rounds)
                cells = []
                for backend in args.backends:
                    ratio = median["torch"] / median[backend]
                    ratios[backend].append(ratio)
                    cells.append(f"{ratio:.2f}x")
                print(f"| {shape[0]}x{D} | {median['torch'] * 1e6:.0f} | "
                      + " | ".join(cells) + " |")
        geomeans = [math.exp(statistics.fmean(map(math.log, ratios[b]))) for b in args.backends]
        print("| geometric mean | | " + " | ".join(f"{g:.2f}x" for g in geomeans) + " |")


if __name__ == "__main__":
    main()
