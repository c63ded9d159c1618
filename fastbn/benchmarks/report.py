"""`python -m fastbn bench`: every op, every fastbn backend against torch, saved and plotted.

For each op (BatchNorm2d, GroupNorm, InstanceNorm, LayerNorm, RMSNorm), layout
(contiguous; channels-last for BatchNorm and GroupNorm), mode ("training":
forward + backward, "eval": forward) and shape of its grid (`shapes`), the
case is checked against torch, then timed interleaved (`timing.alternate`):
torch, each fastbn backend, the cython backend on 1 thread (thread scaling)
and the bandwidth floor (`timing.bandwidth_floor`). It prints one markdown
table per (op, layout, mode) and writes `results.json` and PNG plots.
"""
import argparse
import json
import math
import os
import statistics

import fastbn
from fastbn.benchmarks import batch_norm, norms, shapes
from fastbn.benchmarks.compare import environment_lines
from fastbn.benchmarks.timing import alternate, bandwidth_floor

OPS = ("batch_norm_2d",) + norms.OPS
CHANNELS_LAST_OPS = ("batch_norm_2d", "group_norm")
SCALING_BACKEND = "cython"
DTYPE = "float32"


def plan(grids, ops=OPS):
    """Every case to run, as (op, layout, mode, shape) in report order.

    Parameters
    ----------
    grids : dict of str to shapes.ShapeGrid
        The grid of each op.
    ops : sequence of str
    """
    cases = []
    for op in ops:
        layouts = ("contiguous", "channels_last") if op in CHANNELS_LAST_OPS else ("contiguous",)
        for layout in layouts:
            for mode in batch_norm.MODES:
                cases.extend((op, layout, mode, shape) for shape in grids[op].shapes())
    return cases


def _make_case(op, shape, layout):
    channels_last = layout == "channels_last"
    if op == "batch_norm_2d":
        return batch_norm.BatchNormCase(shape, DTYPE, channels_last)
    return norms.NormCase(op, shape, DTYPE, channels_last)


def _on_threads(step, n_threads, restore_threads):
    """`step` run with fastbn on `n_threads` threads, the count set back after."""
    def call():
        fastbn.set_num_threads(n_threads)
        try:
            return step()
        finally:
            fastbn.set_num_threads(restore_threads)
    return call


def _torch_on_threads(step, n_threads):
    # numba's OpenMP layer sets the calling thread's OpenMP thread count when it
    # runs a parallel loop, and torch takes its count from there: set it each call.
    import torch

    def call():
        torch.set_num_threads(n_threads)
        return step()
    return call


def measure(cases, threads, backends, repeats, warmup, progress=True):
    """Check and time every case; return one record per (case, implementation).

    Parameters
    ----------
    cases : list of (op, layout, mode, shape)
        From `plan`.
    threads : int
        Threads of torch and fastbn; the cython backend is timed on 1 thread as well.
    backends : list of str
    repeats, warmup : int
        For `timing.alternate`.
    progress : bool
        Show a progress bar (tqdm) over the cases.

    Returns
    -------
    list of dict
        Keys: op, mode, layout, shape, dtype, nbytes, bytes_moved, backend
        ("torch", a fastbn backend or "floor"), threads, median_s, q1_s, q3_s,
        min_s, max_s, rounds.
    """
    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    records = []
    bar = tqdm(cases, desc="fastbn bench", unit="case", disable=not progress)
    for op, layout, mode, shape in bar:
        bar.set_postfix_str(f"{op} {layout} {mode} {shapes.format_shape(shape)}")
        case = _make_case(op, shape, layout)
        steps = {("torch", threads): _torch_on_threads(case.torch_step(mode), threads)}
        expected = steps[("torch", threads)]()
        for backend in backends:
            step = case.fastbn_step(backend, mode)
            case.check(step(), expected, mode, backend)
            steps[(backend, threads)] = step
        if SCALING_BACKEND in backends and threads > 1:
            steps[(SCALING_BACKEND, 1)] = _on_threads(
                case.fastbn_step(SCALING_BACKEND, mode), 1, threads)
        moved = batch_norm.bytes_moved(case.nbytes, mode)
        steps[("floor", threads)] = bandwidth_floor(moved, threads)
        timings = alternate(steps, repeats=repeats, warmup=warmup)
        for (name, n_threads), timing in timings.items():
            records.append(dict(
                op=op, mode=mode, layout=layout, shape=list(shape), dtype=DTYPE,
                nbytes=case.nbytes, bytes_moved=moved, backend=name, threads=n_threads,
                median_s=timing.median_s, q1_s=timing.q1_s, q3_s=timing.q3_s,
                min_s=timing.min_s, max_s=timing.max_s, rounds=timing.rounds))
    return records


def _group(records, keys):
    groups = {}
    for record in records:
        groups.setdefault(tuple(_hashable(record[key]) for key in keys), []).append(record)
    return groups


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _by_sample(records):
    """Records grouped by per-sample shape (the shape without N)."""
    groups = {}
    for record in records:
        groups.setdefault(tuple(record["shape"][1:]), []).append(record)
    return groups


def tables(records, threads):
    """Markdown lines: per (op, layout, mode) a row per shape, then geometric-mean speedups."""
    lines = []
    for (op, layout, mode), group in _group(records, ("op", "layout", "mode")).items():
        by_shape = _group(group, ("shape",))
        first = next(iter(by_shape.values()))
        backends = [r["backend"] for r in first
                    if r["backend"] not in ("torch", "floor") and r["threads"] == threads]
        scaling = any(r["threads"] != threads for r in first)
        header = (["shape", "MB", "torch us"] + [f"{b} us" for b in backends]
                  + [f"{b} speedup" for b in backends]
                  + ([f"{SCALING_BACKEND} 1 thread us", f"{SCALING_BACKEND} scaling"]
                     if scaling else [])
                  + ["floor us"] + [f"{b} / floor" for b in backends] + ["spread"])
        lines += ["", f"### {op} {layout} {mode}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        speedups = {b: [] for b in backends}
        for (shape,), rows in by_shape.items():
            at = {(r["backend"], r["threads"]): r["median_s"] for r in rows}
            torch_s, floor_s = at[("torch", threads)], at[("floor", threads)]
            for b in backends:
                speedups[b].append(torch_s / at[(b, threads)])
            cells = ([shapes.format_shape(shape), f"{rows[0]['nbytes'] / 1e6:.2f}",
                      f"{torch_s * 1e6:.1f}"]
                     + [f"{at[(b, threads)] * 1e6:.1f}" for b in backends]
                     + [f"{torch_s / at[(b, threads)]:.2f}x" for b in backends])
            if scaling:
                one = at[(SCALING_BACKEND, 1)]
                cells += [f"{one * 1e6:.1f}", f"{one / at[(SCALING_BACKEND, threads)]:.2f}x"]
            spread = max((r["q3_s"] - r["q1_s"]) / r["median_s"] for r in rows)
            cells += ([f"{floor_s * 1e6:.1f}"]
                      + [f"{at[(b, threads)] / floor_s:.2f}" for b in backends]
                      + [f"{spread:.0%}"])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for b, values in speedups.items():
            geomean = math.exp(sum(map(math.log, values)) / len(values))
            lines.append(f"- {b}: geometric-mean speedup over torch {geomean:.2f}x, "
                         f"worst {min(values):.2f}x")
    lines += ["", f"speedup: torch time / fastbn time on {threads} threads; scaling: "
              f"{SCALING_BACKEND} time on 1 thread / on {threads}; floor: a parallel copy "
              "moving the bytes an ideal kernel moves (training 5 x, eval 2 x the input's); spread: the "
              "largest interquartile range / median of the row's timings."]
    return lines


def write_json(records, path, environment):
    """Write `records` and the environment lines as JSON to `path`."""
    with open(path, "w") as file:
        json.dump({"environment": environment, "measurements": records}, file, indent=1)


def plot(records, output_dir, threads):
    """Write the PNG plots into `output_dir`; return their paths.

    - ``speedup_<op>.png``: torch time / fastbn time against the batch size,
      one panel per mode, a line per (sample shape, layout, backend).
    - ``time_vs_bytes.png``: per-call time against bytes moved (log-log) for
      torch and every backend, with the bandwidth floor: its measurements and
      the line of their median bandwidth.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.5, 2, 4 rather than 5x10^-1

    paths = []
    at_threads = [r for r in records if r["threads"] == threads]
    for (op,), op_records in _group(at_threads, ("op",)).items():
        modes = list(dict.fromkeys(r["mode"] for r in op_records))
        figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5),
                                    squeeze=False, sharey=True)
        for axis, mode in zip(axes[0], modes):
            torch_s = {(tuple(r["shape"]), r["layout"]): r["median_s"] for r in op_records
                       if r["mode"] == mode and r["backend"] == "torch"}
            lines = _group([r for r in op_records if r["mode"] == mode
                            and r["backend"] not in ("torch", "floor")],
                           ("backend", "layout"))
            sample_shapes = list(dict.fromkeys(tuple(r["shape"][1:]) for r in op_records))
            colors = {s: f"C{i}" for i, s in enumerate(sample_shapes)}
            # colour: sample shape; marker: backend; line style: layout
            backends = list(dict.fromkeys(backend for backend, _ in lines))
            markers = {b: "osD^v"[i % 5] for i, b in enumerate(backends)}
            styles = {"contiguous": "-", "channels_last": ":"}
            for (backend, layout), rows in lines.items():
                for sample, sample_rows in _by_sample(rows).items():
                    sample_rows.sort(key=lambda r: r["shape"][0])
                    axis.plot([r["shape"][0] for r in sample_rows],
                              [torch_s[(tuple(r["shape"]), layout)] / r["median_s"]
                               for r in sample_rows],
                              styles[layout], marker=markers[backend], color=colors[sample],
                              label=f"{backend} {layout} {shapes.format_shape(sample)}")
            axis.axhline(1.0, color="grey", linewidth=0.8)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")  # ratios: 2x faster and 2x slower sit equally far from 1
            axis.set_xticks(sorted({r["shape"][0] for r in op_records}))
            axis.xaxis.set_major_formatter(ScalarFormatter())
            axis.yaxis.set_major_formatter(plain)
            axis.yaxis.set_minor_formatter(plain)
            axis.set_xlabel("batch size N")
            axis.set_title(f"{op} {mode}")
            axis.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("speedup over torch (> 1: fastbn faster)")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        figure.suptitle(f"{op}: torch time / fastbn time, {threads} threads, {DTYPE}")
        path = os.path.join(output_dir, f"speedup_{op}.png")
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)

    figure, axis = plt.subplots(figsize=(7, 5))
    by_backend = _group(at_threads, ("backend",))
    for index, ((backend,), rows) in enumerate(by_backend.items()):
        if backend == "floor":
            # The measured floors, and as a line the copy bandwidth they share
            # (the median over cases, so a case a neighbour disturbed does not bend it).
            moved = [r["bytes_moved"] for r in rows]
            axis.scatter(moved, [r["median_s"] for r in rows], s=20, marker="x",
                         color="black", label="floor (parallel copy)")
            bandwidth = statistics.median(r["bytes_moved"] / r["median_s"] for r in rows)
            ends = [min(moved), max(moved)]
            axis.plot(ends, [b / bandwidth for b in ends], color="black", linewidth=1.2,
                      label=f"floor at the median bandwidth, {bandwidth / 1e9:.1f} GB/s")
        else:
            axis.scatter([r["bytes_moved"] for r in rows], [r["median_s"] for r in rows],
                         s=14, alpha=0.7, color=f"C{index}", label=backend)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("bytes moved by an ideal kernel")
    axis.set_ylabel("time per call (s)")
    axis.set_title(f"time against bytes moved, every op and mode, {threads} threads")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    path = os.path.join(output_dir, "time_vs_bytes.png")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    paths.append(path)
    return paths


def run_report(full=False, threads=None, backends=None, repeats=None, output="bench-results",
               grids=None, ops=OPS, progress=True, print_fn=print):
    """Run the benchmark, print the tables, write results.json and the plots into `output`.

    Parameters
    ----------
    full : bool
        The whole grid (`shapes.GRIDS`) and 30 rounds per case, instead of the
        quick grid (`shapes.QUICK_GRIDS`) and 10 rounds.
    threads : int, optional
        Threads of torch and fastbn (default `fastbn.get_num_threads()`: every usable CPU).
    backends : list of str, optional
        fastbn backends (default every available one but the NumPy reference).
    repeats : int, optional
        Timed rounds per case.
    output : str or None
        Directory for results.json and the PNGs (created); None writes nothing.
    grids : dict of str to shapes.ShapeGrid, optional
        A grid per op, overriding the quick / full one (e.g. a tiny grid in tests).
    ops : sequence of str
    progress : bool
    print_fn : callable

    Returns
    -------
    list of dict
        The records of `measure`.
    """
    if threads is None:
        threads = fastbn.get_num_threads()
    if backends is None:
        backends = batch_norm.backends(include_reference=False)
    if repeats is None:
        repeats = 30 if full else 10
    chosen = {op: shapes.GRIDS[op][DTYPE] if full else shapes.QUICK_GRIDS[op] for op in ops}
    chosen.update(grids or {})
    environment = environment_lines(threads)
    for line in environment:
        print_fn(line)
    records = measure(plan(chosen, ops), threads, backends, repeats,
                      warmup=3 if full else 2, progress=progress)
    for line in tables(records, threads):
        print_fn(line)
    if output is not None:
        os.makedirs(output, exist_ok=True)
        write_json(records, os.path.join(output, "results.json"), environment)
        for path in plot(records, output, threads):
            print_fn(f"wrote {path}")
        print_fn(f"wrote {os.path.join(output, 'results.json')}")
    return records


def main(argv=None):
    """Command line of `python -m fastbn bench`."""
    parser = argparse.ArgumentParser(
        prog="fastbn bench", description="Time every op in torch and in fastbn's backends: "
        "markdown tables, results.json and PNG plots.")
    parser.add_argument("--full", action="store_true",
                        help="the whole grid, 30 rounds per case (default: a quick run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and fastbn (default: every usable CPU)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="fastbn backends (default: every available one but numpy)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS),
                        help="the ops to run (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per case (default 10, --full 30)")
    parser.add_argument("--output", default="bench-results",
                        help="directory for results.json and the plots (default bench-results/)")
    args = parser.parse_args(argv)
    run_report(full=args.full, threads=args.threads, backends=args.backends,
               repeats=args.repeats, output=args.output, ops=args.ops)
    return 0
