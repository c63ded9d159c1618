"""fastbn against PyTorch through the NumPy API: markdown tables of times and speedups.

Run as ``python bench/compare_batch_norm.py`` (its docstring explains the
method); `compare_batch_norm` is the function behind it.
"""
import argparse
import math
import os
import platform
import sys

import numpy as np

import fastbn
from fastbn._threads import _cpus_available
from fastbn.benchmarks import batch_norm, machine, shapes
from fastbn.benchmarks.timing import alternate, bandwidth_floor

MODE_TITLES = {
    "training": "BatchNorm2d training: forward + backward",
    "eval": "BatchNorm2d eval: forward",
}


def environment_lines(threads):
    """What the numbers depend on: CPU, versions, threads, the OpenMP runtimes loaded and
    the CPUs other processes use (measured over `machine.WINDOW_S` seconds)."""
    import torch

    usable_cpus = _cpus_available()
    lines = [
        f"CPU: {machine.cpu_model()} ({os.cpu_count()} logical CPUs, {usable_cpus} usable)",
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"fastbn {fastbn.__version__}",
        f"threads: {threads} (torch.get_num_threads() = {torch.get_num_threads()}, "
        f"fastbn.get_num_threads() = {fastbn.get_num_threads()})",
    ]
    if "numba" in sys.modules:
        lines.append(f"numba {sys.modules['numba'].__version__}")
    try:
        import threadpoolctl
    except ImportError:  # fastbn needs it, but a checkout run in place may lack it
        runtimes = []
        lines.append("OpenMP runtimes loaded: unknown (threadpoolctl is not installed)")
    else:
        runtimes = [info["filepath"] for info in threadpoolctl.threadpool_info()
                    if info["user_api"] == "openmp"]
        lines.append(f"OpenMP runtimes loaded: {', '.join(runtimes) or 'none'}")
    if len(runtimes) > 1:
        lines.append("WARNING: several OpenMP runtimes: the idle threads of one spin on the "
                     "cores the other needs (docs/design.md, Threads: how to make them one)")
    wait_settings = {name: os.environ[name] for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                     if name in os.environ}
    lines.append(f"OpenMP wait settings: {wait_settings or 'defaults'}")
    other_cpus = machine.measure_other_processes()
    if other_cpus is not None:
        busy = machine.is_busy(other_cpus, threads, usable_cpus)
        lines.append(f"CPUs used by other processes: {other_cpus:.2f} of {usable_cpus} "
                     f"(over {machine.WINDOW_S:g} s before the run)"
                     + (" -- BUSY MACHINE: other processes compete for the cores, "
                        "the timings are unreliable" if busy else ""))
    return lines


def _format_row(cells):
    return "| " + " | ".join(cells) + " |"


def compare_batch_norm(threads=2, quick=False, channels_last=False, backends=None,
                       repeats=None, dtype="float32", print_fn=print):
    """Time BatchNorm2d in fastbn's backends and torch, print markdown tables, return results.

    Every case is first checked against torch (assert_allclose), then the
    implementations and a `parallel_copy` of the case's bytes (the bandwidth
    floor, see `batch_norm.bytes_moved`) are timed interleaved
    (`timing.alternate`), all with `threads` threads.

    Parameters
    ----------
    threads : int
        For torch (torch.set_num_threads) and fastbn (fastbn.set_num_threads).
    quick : bool
        A smoke run: the small grid and few rounds.
    channels_last : bool
        Lay x and grad_out out channels-last instead of C-contiguous.
    backends : list of str, optional
        fastbn backends to time; default every available one but the NumPy reference.
    repeats : int, optional
        Timed rounds per case (default 30, quick 5).
    dtype : str
    print_fn : callable
        Receives each line of the report.

    Returns
    -------
    dict
        mode -> list of (shape, input bytes, {implementation: Timing});
        the implementations are "torch", each backend and "floor".
    """
    import torch

    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    if backends is None:
        backends = batch_norm.backends(include_reference=False)
    grid = shapes.QUICK_GRIDS["batch_norm_2d"] if quick else shapes.GRIDS["batch_norm_2d"][dtype]
    if repeats is None:
        repeats = 5 if quick else 30
    warmup = 2 if quick else 3

    for line in environment_lines(threads):
        print_fn(line)
    print_fn(f"dtype {dtype}, {'channels-last' if channels_last else 'contiguous (NCHW)'}, "
             f"{repeats} interleaved rounds per case, medians")

    results = {}
    for mode in batch_norm.MODES:
        rows = []
        for shape in grid.shapes():
            case = batch_norm.BatchNormCase(shape, dtype, channels_last)
            steps = {"torch": case.torch_step(mode)}
            expected = steps["torch"]()
            for backend in backends:
                steps[backend] = case.fastbn_step(backend, mode)
                case.check(steps[backend](), expected, mode, backend)
            steps["floor"] = bandwidth_floor(batch_norm.bytes_moved(case.nbytes, mode), threads)
            rows.append((shape, case.nbytes, alternate(steps, repeats=repeats, warmup=warmup)))
        results[mode] = rows
        print_fn("")
        for line in _report(MODE_TITLES[mode], rows, backends):
            print_fn(line)
    return results


def _report(title, rows, backends):
    """Markdown table of one mode, then per backend the geometric-mean speedup and the worst."""
    header = (["shape", "N", "MB", "torch us"] + [f"{b} us" for b in backends]
              + [f"{b} speedup" for b in backends] + ["floor us", "torch / floor"]
              + [f"{b} / floor" for b in backends] + ["spread"])
    lines = [f"### {title}", "", _format_row(header), _format_row(["---"] * len(header))]
    speedups = {backend: [] for backend in backends}
    for shape, nbytes, timings in rows:
        torch_s = timings["torch"].median_s
        floor_s = timings["floor"].median_s
        for backend in backends:
            speedups[backend].append((torch_s / timings[backend].median_s, shape))
        spread = max(timing.relative_iqr for timing in timings.values())
        lines.append(_format_row(
            [shapes.format_shape(shape[1:]), str(shape[0]), f"{nbytes / 1e6:.2f}",
             f"{torch_s * 1e6:.1f}"]
            + [f"{timings[b].median_s * 1e6:.1f}" for b in backends]
            + [f"{torch_s / timings[b].median_s:.2f}x" for b in backends]
            + [f"{floor_s * 1e6:.1f}", f"{torch_s / floor_s:.2f}"]
            + [f"{timings[b].median_s / floor_s:.2f}" for b in backends]
            + [f"{spread:.0%}"]))
    lines.append("")
    for backend, values in speedups.items():
        geomean = math.exp(sum(math.log(speedup) for speedup, _ in values) / len(values))
        worst, worst_shape = min(values)
        lines.append(f"- {backend}: geometric-mean speedup over torch {geomean:.2f}x; "
                     f"worst {worst:.2f}x at {shapes.format_shape(worst_shape)}")
    lines.append("")
    lines.append("floor: a parallel copy moving the bytes an ideal kernel moves "
                 "(training 5 x, eval 2 x the input's bytes); spread: the largest "
                 "interquartile range / median of the row's timings.")
    return lines


def main(argv=None):
    """Command line of bench/compare_batch_norm.py (`python -m fastbn bench` is `report`)."""
    parser = argparse.ArgumentParser(
        prog="fastbn bench", description="Time BatchNorm2d in torch and in fastbn's backends; print markdown tables.")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for torch and fastbn (default 2)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last input instead of contiguous NCHW")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="fastbn backends (default: every available one but numpy)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per case (default 30, --quick 5)")
    parser.add_argument("--dtype", choices=sorted(shapes.GRIDS["batch_norm_2d"]),
                        default="float32")
    args = parser.parse_args(argv)
    compare_batch_norm(threads=args.threads, quick=args.quick, channels_last=args.channels_last,
                       backends=args.backends, repeats=args.repeats, dtype=args.dtype)
    return 0
