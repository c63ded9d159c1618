"""Compare fastbn's GroupNorm and InstanceNorm with PyTorch's on the CPU (training forward + backward).

    PYTHONPATH=$PWD python bench/compare_group_norm.py [--op group|instance] [--threads 2]
        [--backends cython numba] [--channels-last] [--dtype float32] [--rounds 15]
        [--clock wall|thread] [--estimate median|min] [--quick]

For the batch sizes and ResNet-stage shapes (C, H, W) of shapes.GROUP_NORM_2D it prints
a markdown row: the time of one training step (forward + backward) of torch and
of each fastbn backend, and torch's time / the backend's (above 1: fastbn is
faster); then per backend the geometric mean and the worst shape.

  group:    GroupNorm(32, C). torch: `torch.native_group_norm` +
            `torch.ops.aten.native_group_norm_backward`; fastbn:
            `group_norm_forward` + `group_norm_backward`.
  instance: InstanceNorm2d(C, affine=True). torch: what `torch.instance_norm`
            runs, without autograd: `native_batch_norm` on the (1, N * C, H, W)
            view with the parameters repeated N times, its backward, and the
            sum of the parameter gradients over N; fastbn:
            `instance_norm_forward` + `instance_norm_backward`.

Method
- The same thread count for both (torch.set_num_threads, fastbn.set_num_threads).
  It is set again before every sample: numba's OpenMP threading layer sets the
  calling thread's OpenMP thread count to NUMBA_NUM_THREADS whenever it runs a
  parallel loop, and torch takes its thread count from there.
- Every backend's results are checked against torch's before anything is timed.
- Zero copy: torch's tensors are torch.from_numpy views of fastbn's arrays.
- Interleaved timing: a warm-up, then `--rounds` rounds in which torch and each
  backend run in turn, the order rotating each round; each sample times a loop
  of calls lasting about 2 ms (`--sample-ms`); the table shows the median over
  the rounds. On a shared, busy machine the ratios are steadier than the times;
  where other jobs stall most samples (another process pausing this one, more
  runnable threads than cores), `--estimate min --sample-ms 0.3` reports the
  fastest sample of each implementation instead, as timeit advises: stalls
  only ever add time.
- `--clock thread` (with --threads 1 only) times with the CPU time of the
  calling thread (time.thread_time) instead of the wall clock: time spent
  descheduled by other processes then does not count, which makes single-thread
  ratios usable on a machine other jobs are loading.
"""
import argparse
import itertools
import sys
import time

import numpy as np
import torch

import fastbn
from fastbn.benchmarks import norms, shapes

GRID = shapes.GROUP_NORM_2D
SHAPES = GRID.sample_shapes
BATCHES = GRID.batch_sizes
GROUPS = norms.GROUPS


def channels_last_copy(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def make_case(op, N, C, H, W, dtype, channels_last, rng):
    x = rng.standard_normal((N, C, H, W), dtype=dtype) * 2 + 1
    grad_out = rng.standard_normal((N, C, H, W), dtype=dtype)
    if channels_last:
        x, grad_out = channels_last_copy(x), channels_last_copy(grad_out)
    weight = rng.standard_normal(C, dtype=dtype)
    bias = rng.standard_normal(C, dtype=dtype)
    tx, tdy, tw, tb = (torch.from_numpy(a) for a in (x, grad_out, weight, bias))
    if channels_last:
        # torch's group-norm backward needs grad_out and x in one memory format; as views
        # of the arrays above they are both channels-last.
        assert tx.is_contiguous(memory_format=torch.channels_last)

    if op == "group":
        def torch_step():
            y, mean, rstd = torch.native_group_norm(tx, tw, tb, N, C, H * W, GROUPS, 1e-5)
            grads = torch.ops.aten.native_group_norm_backward(
                tdy, tx, mean, rstd, tw, N, C, H * W, GROUPS, [True, True, True])
            return (y,) + tuple(grads)

        def fastbn_step(backend):
            y, mean, rstd = fastbn.group_norm_forward(x, GROUPS, weight, bias, backend=backend)
            return (y,) + fastbn.group_norm_backward(grad_out, x, mean, rstd, weight, GROUPS,
                                                     backend=backend)
    else:
        tw_repeated, tb_repeated = tw.repeat(N), tb.repeat(N)

        def torch_step():
            x_view = tx.reshape(1, N * C, H, W)
            y, mean, invstd = torch.native_batch_norm(x_view, tw_repeated, tb_repeated, None,
                                                      None, True, 0.1, 1e-5)
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                tdy.reshape(1, N * C, H, W), x_view, tw_repeated, None, None, mean, invstd,
                True, 1e-5, [True, True, True])
            return (y.reshape(N, C, H, W), grad_x.reshape(N, C, H, W),
                    grad_w.reshape(N, C).sum(0), grad_b.reshape(N, C).sum(0))

        def fastbn_step(backend):
            y, mean, rstd = fastbn.instance_norm_forward(x, weight, bias, backend=backend)
            return (y,) + fastbn.instance_norm_backward(grad_out, x, mean, rstd, weight,
                                                        backend=backend)
    return torch_step, fastbn_step


def check(torch_step, fastbn_step, backend, dtype):
    tolerance = dict(rtol=1e-3, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-8, atol=1e-8)
    for name, want, got in zip(("y", "grad_x", "grad_weight", "grad_bias"), torch_step(),
                               fastbn_step(backend)):
        np.testing.assert_allclose(got, want.numpy(), err_msg=f"{backend}: {name}", **tolerance)


def sample(fn, calls, clock=time.perf_counter):
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def alternate(functions, rounds, threads, clock=time.perf_counter, sample_s=2e-3,
              estimate=np.median):
    """Time per call of each function (`estimate` over the rounds), timed in rotating order."""
    for fn in functions.values():  # warm-up (and a first estimate for the loop length)
        fn()
    calls = {name: max(1, int(sample_s / max(sample(fn, 3), 1e-7)))
             for name, fn in functions.items()}
    times = {name: [] for name in functions}
    names = list(functions)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch.set_num_threads(threads)
            times[name].append(sample(functions[name], calls[name], clock))
    return {name: float(estimate(t)) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["group", "instance"], default="group")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["cython", "numba"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--estimate", choices=["median", "min"], default="median")
    parser.add_argument("--sample-ms", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="N = 1 and 8 only, 5 rounds")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    dtype = np.dtype(args.dtype)
    batches = [BATCHES[0], BATCHES[-1]] if args.quick else BATCHES
    rounds = 5 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    layout = "channels-last" if args.channels_last else "contiguous"
    print(f"# {args.op} norm, training forward + backward, {args.dtype}, {layout}, "
          f"{args.threads} threads, {args.clock} clock, torch {torch.__version__}, "
          f"{args.estimate} of {rounds} rounds of {args.sample_ms:g} ms samples\n")
    header = ["N", "C, H, W", "torch us"] + [f"{b} us" for b in args.backends] + \
             [f"{b} speedup" for b in args.backends]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    speedups = {backend: [] for backend in args.backends}
    for N, (C, H, W) in itertools.product(batches, SHAPES):
        torch_step, fastbn_step = make_case(args.op, N, C, H, W, dtype, args.channels_last, rng)
        functions = {"torch": torch_step}
        for backend in args.backends:
            check(torch_step, fastbn_step, backend, dtype)
            functions[backend] = lambda backend=backend: fastbn_step(backend)
        times = alternate(functions, rounds, args.threads, clock, args.sample_ms * 1e-3,
                          np.median if args.estimate == "median" else np.min)
        row = [str(N), f"{C}, {H}, {W}", f"{times['torch'] * 1e6:.1f}"]
        row += [f"{times[b] * 1e6:.1f}" for b in args.backends]
        for backend in args.backends:
            speedups[backend].append(times["torch"] / times[backend])
            row.append(f"{speedups[backend][-1]:.2f}x")
        print("| " + " | ".join(row) + " |", flush=True)
    print()
    for backend, values in speedups.items():
        worst = int(np.argmin(values))
        N, (C, H, W) = list(itertools.product(batches, SHAPES))[worst]
        print(f"{backend}: geometric-mean speedup {np.exp(np.mean(np.log(values))):.2f}x, "
              f"worst {values[worst]:.2f}x at N={N}, ({C}, {H}, {W})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
