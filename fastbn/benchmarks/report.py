"""`python -m fastbn bench`: every op, every fastbn backend against torch, saved and plotted.

Two levels, one table format:

- kernel: the NumPy API (`fastbn.batch_norm_forward`, ...) against torch's aten
  ops on the same memory (`batch_norm`, `norms`).
- module: what a user gets, fastbn.nn layers against torch.nn's through autograd
  (`modules.ModuleCase`): fastbn.nn's default routing (``backend=None``) and
  each backend named.

For each level, op (BatchNorm2d, GroupNorm, InstanceNorm, LayerNorm, RMSNorm),
layout (contiguous; channels-last for BatchNorm and GroupNorm), mode
("training": forward + backward, "eval": forward) and shape of its grid
(`shapes`), the case is checked against torch, then timed interleaved
(`timing.alternate`): torch, each fastbn implementation, the cython backend on
1 thread (thread scaling) and the bandwidth floor (`timing.bandwidth_floor`).
End to end (`end_to_end`), MobileNetV2 and ResNet-18 training steps and eval forwards
with torch's layers, after ``fastbn.nn.convert`` and without BatchNorm (and activation).
It prints markdown tables and writes `results.json` and PNG plots.
"""
import argparse
import json
import math
import os
import statistics
import sys

import fastbn
from fastbn.benchmarks import (batch_norm, costs, end_to_end, machine, modules, norms, scaling,
                               shapes)
from fastbn.benchmarks.compare import environment_lines
from fastbn.benchmarks.timing import alternate, bandwidth_floor

OPS = ("batch_norm_2d",) + norms.OPS
CHANNELS_LAST_OPS = ("batch_norm_2d", "group_norm")
LEVELS = ("kernel", "module")
SCALING_BACKEND = "cython"
# fastbn.nn's modules with backend=None: torch's op where it was measured faster.
DEFAULT_ROUTING = "default"
DTYPE = "float32"
# The batch sizes of the parts' costs inside a converted MobileNetV2 step (`costs`).
COST_BATCHES = (2, 8)
# The end-to-end cases: every (model, mode, batch).
NETWORKS = tuple((model, mode, batch) for model in end_to_end.MODELS
                 for mode in end_to_end.MODES for batch in end_to_end.BATCH_SIZES)


def plan(grids, ops=OPS, levels=LEVELS, modes=batch_norm.MODES, channels_last=True):
    """Every case to run, as (level, op, layout, mode, shape) in report order.

    Parameters
    ----------
    grids : dict of str to shapes.ShapeGrid
        The grid of each op.
    ops : sequence of str
    levels : sequence of {"kernel", "module"}
    modes : sequence of {"training", "eval"}
    channels_last : bool
        Also channels-last memory, for the ops that have it.
    """
    cases = []
    for level in levels:
        for op in ops:
            layouts = (("contiguous", "channels_last")
                       if channels_last and op in CHANNELS_LAST_OPS else ("contiguous",))
            for layout in layouts:
                for mode in modes:
                    cases.extend((level, op, layout, mode, shape)
                                 for shape in grids[op].shapes())
    return cases


def _make_case(level, op, shape, layout):
    arrays = modules.kernel_case(op, shape, DTYPE, layout == "channels_last")
    return arrays if level == "kernel" else modules.ModuleCase(op, arrays)


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


def _timing_record(timing, **keys):
    return dict(keys, median_s=timing.median_s, q1_s=timing.q1_s, q3_s=timing.q3_s,
                min_s=timing.min_s, max_s=timing.max_s, rounds=timing.rounds)


def measure(cases, threads, backends, repeats, warmup, bar=None, one_thread=True):
    """Check and time every case; return one record per (case, implementation).

    Parameters
    ----------
    cases : list of (level, op, layout, mode, shape)
        From `plan`.
    threads : int
        Threads of torch and fastbn; the cython backend is timed on 1 thread as well.
    backends : list of str
        fastbn backends; the module level also runs fastbn.nn's default routing.
    repeats, warmup : int
        For `timing.alternate`.
    bar : tqdm progress bar, optional
        Advanced by one per case.
    one_thread : bool
        Also time the cython backend on 1 thread (a thread sweep times every count).

    Returns
    -------
    list of dict
        Keys: level, op, mode, layout, shape, dtype, nbytes, bytes_moved, backend
        ("torch", a fastbn backend, "default" (module level: ``backend=None``)
        or "floor"), threads, median_s, q1_s, q3_s, min_s, max_s, rounds.
    """
    import torch

    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    records = []
    for level, op, layout, mode, shape in cases:
        if bar is not None:
            bar.set_postfix_str(f"{level} {op} {layout} {mode} {shapes.format_shape(shape)}")
        case = _make_case(level, op, shape, layout)
        implementations = {backend: backend for backend in backends}
        if level == "module":
            implementations = {DEFAULT_ROUTING: None, **implementations}
        steps = {("torch", threads): _torch_on_threads(case.torch_step(mode), threads)}
        # torch's result, or a float64 oracle where torch's is known to be wrong.
        expected = case.expected(mode)
        for name, backend in implementations.items():
            step = case.fastbn_step(backend, mode)
            if level == "module":
                # Through autograd torch runs ops on fastbn's side too (and all of
                # them where the default routing picks torch's op).
                step = _torch_on_threads(step, threads)
            case.check(step(), expected, mode, name)
            steps[(name, threads)] = step
        if one_thread and SCALING_BACKEND in backends and threads > 1:
            # fastbn's kernels on 1 thread; at the module level torch's ops keep `threads`.
            steps[(SCALING_BACKEND, 1)] = _on_threads(steps[(SCALING_BACKEND, threads)], 1,
                                                      threads)
        moved = batch_norm.bytes_moved(case.nbytes, mode)
        steps[("floor", threads)] = bandwidth_floor(moved, threads)
        timings = alternate(steps, repeats=repeats, warmup=warmup)
        for (name, n_threads), timing in timings.items():
            records.append(_timing_record(
                timing, level=level, op=op, mode=mode, layout=layout, shape=list(shape),
                dtype=DTYPE, nbytes=case.nbytes, bytes_moved=moved, backend=name,
                threads=n_threads))
        if bar is not None:
            bar.update()
    return records


def measure_networks(networks, threads, repeats, warmup, image_size=end_to_end.IMAGE_SIZE,
                     small=False, bar=None):
    """Check and time the end-to-end cases (`end_to_end.NetworkCase`).

    Parameters
    ----------
    networks : sequence of (model, mode, batch)
        model in `end_to_end.MODELS`, mode in `end_to_end.MODES`.
    threads : int
    repeats, warmup : int
        For `timing.alternate`.
    image_size : int
    small : bool
        Narrow networks (a smoke run).
    bar : tqdm progress bar, optional
        Advanced by one per case.

    Returns
    -------
    list of dict
        Keys: model, mode, batch, image_size, small, dtype, backend (an
        `end_to_end.IMPLEMENTATIONS` name), threads, median_s, q1_s, q3_s, min_s,
        max_s, rounds.
    """
    import torch

    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    records = []
    for model, mode, batch in networks:
        if bar is not None:
            bar.set_postfix_str(f"{end_to_end.MODEL_TITLES[model]} {mode}, batch {batch}")
        case = end_to_end.NetworkCase(model, batch, mode, image_size, small)
        case.check()
        steps = {name: _torch_on_threads(step, threads) for name, step in case.steps().items()}
        for name, timing in alternate(steps, repeats=repeats, warmup=warmup).items():
            records.append(_timing_record(
                timing, model=model, mode=mode, batch=batch, image_size=image_size,
                small=small, dtype=DTYPE, backend=name, threads=threads))
        if bar is not None:
            bar.update()
    return records


def measure_network_layers(threads, repeats, warmup, image_size=end_to_end.IMAGE_SIZE,
                           batch_sizes=end_to_end.LAYER_BATCH_SIZES, bar=None):
    """Module level on the reference networks' own BatchNorm2d shapes (issue 11's layer
    target): a fastbn.nn.BatchNorm2d training step (default routing, and the cython
    backend named: where the routing's sizes come from) against a torch.nn.BatchNorm2d
    one, each checked, then alternated.

    Returns
    -------
    list of dict
        Keys: shape, image_size, backend ("torch", "default" or "cython"), threads,
        median_s, ...
    """
    import torch

    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)
    records = []
    for sample in end_to_end.batch_norm_sample_shapes(image_size=image_size):
        for batch in batch_sizes:
            shape = (batch,) + sample
            if bar is not None:
                bar.set_postfix_str(f"network layer {shapes.format_shape(shape)}")
            case = modules.ModuleCase("batch_norm_2d", modules.kernel_case("batch_norm_2d",
                                                                           shape, DTYPE))
            expected = case.expected("training")
            steps = {"torch": _torch_on_threads(case.torch_step("training"), threads),
                     DEFAULT_ROUTING: _torch_on_threads(case.fastbn_step(None, "training"),
                                                        threads),
                     SCALING_BACKEND: _torch_on_threads(
                         case.fastbn_step(SCALING_BACKEND, "training"), threads)}
            for name in (DEFAULT_ROUTING, SCALING_BACKEND):
                case.check(steps[name](), expected, "training", name)
            for name, timing in alternate(steps, repeats=repeats, warmup=warmup).items():
                records.append(_timing_record(timing, shape=list(shape), image_size=image_size,
                                              dtype=DTYPE, backend=name, threads=threads))
            if bar is not None:
                bar.update()
    return records


def network_layers_table(records):
    """Markdown lines: the geometric-mean and worst speedup of fastbn.nn.BatchNorm2d over
    torch.nn.BatchNorm2d on the networks' BatchNorm shapes (records of
    `measure_network_layers`)."""
    if not records:
        return []
    ratios = []
    for (shape,), rows in _group(records, ("shape",)).items():
        at = {r["backend"]: r["median_s"] for r in rows}
        ratios.append((at["torch"] / at[DEFAULT_ROUTING], shape))
    worst, worst_shape = min(ratios)
    return ["", "## Module level on the networks' own BatchNorm shapes", "",
            f"fastbn.nn.BatchNorm2d (default routing) over torch.nn.BatchNorm2d, training step, "
            f"the BatchNorm2d input shapes of MobileNetV2 and ResNet-18 at "
            f"{records[0]['image_size']} px, N in {', '.join(map(str, end_to_end.LAYER_BATCH_SIZES))}"
            f" ({len(ratios)} shapes): geometric mean {_geomean([r for r, _ in ratios]):.2f}x, "
            f"worst {worst:.2f}x ({shapes.format_shape(worst_shape)})."]


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


LEVEL_TITLES = {
    "kernel": "Kernel level: the NumPy API against torch's aten ops",
    "module": "Module level: fastbn.nn against torch.nn, through autograd",
}


def tables(records, threads):
    """Markdown lines: per (level, op, layout, mode) a row per shape, then mean speedups."""
    lines = []
    for (level,), level_records in _group(records, ("level",)).items():
        lines += ["", f"## {LEVEL_TITLES[level]}"]
        for (op, layout, mode), group in _group(level_records, ("op", "layout", "mode")).items():
            lines += _table(f"{level} {op} {layout} {mode}", group, threads)
        lines += ["", f"speedup: torch time / fastbn time on {threads} threads; scaling: "
                  f"{SCALING_BACKEND} time on 1 thread / on {threads}; floor: a parallel copy "
                  "moving the bytes an ideal kernel moves (training 5 x, eval 2 x the input's); "
                  "spread: the largest interquartile range / median of the row's timings."]
        if level == "module":
            lines.append(f"{DEFAULT_ROUTING}: fastbn.nn with backend=None (torch's op on the "
                         "inputs where it was measured faster: small or channels-last ones); "
                         "a backend's name: the modules with that backend named.")
    return lines


def _table(title, records, threads):
    """Lines of one table: a row per shape, then each backend's geometric-mean speedup."""
    by_shape = _group(records, ("shape",))
    first = next(iter(by_shape.values()))
    backends = [r["backend"] for r in first
                if r["backend"] not in ("torch", "floor") and r["threads"] == threads]
    scaling = any(r["threads"] != threads for r in first)
    header = (["shape", "MB", "torch us"] + [f"{b} us" for b in backends]
              + [f"{b} speedup" for b in backends]
              + ([f"{SCALING_BACKEND} 1 thread us", f"{SCALING_BACKEND} scaling"]
                 if scaling else [])
              + ["floor us"] + [f"{b} / floor" for b in backends] + ["spread"])
    lines = ["", f"### {title}", "", "| " + " | ".join(header) + " |",
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
        cells += ([f"{floor_s * 1e6:.1f}"]
                  + [f"{at[(b, threads)] / floor_s:.2f}" for b in backends]
                  + [f"{_spread(rows):.0%}"])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for b, values in speedups.items():
        lines.append(f"- {b}: geometric-mean speedup over torch {_geomean(values):.2f}x, "
                     f"worst {min(values):.2f}x")
    return lines


def _spread(records):
    return max((r["q3_s"] - r["q1_s"]) / r["median_s"] for r in records)


def _geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


class _Counter:
    """A progress bar's stand-in without tqdm: one line per finished case."""

    def __init__(self, total, description, shown):
        self.total, self.done, self.description, self.shown = total, 0, description, shown
        self.text = ""

    def set_postfix_str(self, text):
        self.text = text

    def update(self):
        self.done += 1
        if self.shown:
            print(f"{self.description}: {self.done}/{self.total} {self.text}", file=sys.stderr,
                  flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def progress_bar(total, description, shown=True):
    """tqdm's bar over `total` cases (where tqdm is installed: `pip install fastbn[bench]`),
    else a line per case on stderr; nothing when not `shown`."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, description, shown)
    return tqdm(total=total, desc=description, unit="case", disable=not shown)


def _have_matplotlib(print_fn):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print_fn("no plots: matplotlib is not installed (pip install fastbn[bench])")
        return False
    return True


def write_json(results, path):
    """Write `results` (the dict `run_report` returns) as JSON to `path`."""
    with open(path, "w") as file:
        json.dump(results, file, indent=1)


def plot(records, output_dir, threads):
    """Write the PNG plots into `output_dir`; return their paths.

    - ``speedup_<op>.png``: torch time / fastbn time against the batch size,
      a row of panels per level (kernel, module), a panel per mode, a line per
      (sample shape, layout, fastbn implementation).
    - ``time_vs_bytes.png`` (kernel level): per-call time against bytes moved
      (log-log) for torch and every backend, with the bandwidth floor: its
      measurements and the line of their median bandwidth.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.5, 2, 4 rather than 5x10^-1

    paths = []
    at_threads = [r for r in records if r["threads"] == threads]
    for (op,), op_records in _group(at_threads, ("op",)).items():
        levels = list(dict.fromkeys(r["level"] for r in op_records))
        modes = list(dict.fromkeys(r["mode"] for r in op_records))
        figure, axes = plt.subplots(len(levels), len(modes),
                                    figsize=(6 * len(modes), 4.5 * len(levels)),
                                    squeeze=False, sharey=True)
        # colour: sample shape; marker: implementation; line style: layout
        sample_shapes = list(dict.fromkeys(tuple(r["shape"][1:]) for r in op_records))
        colors = {s: f"C{i}" for i, s in enumerate(sample_shapes)}
        backends = list(dict.fromkeys(r["backend"] for r in op_records
                                      if r["backend"] not in ("torch", "floor")))
        markers = {b: "osD^v"[i % 5] for i, b in enumerate(backends)}
        styles = {"contiguous": "-", "channels_last": ":"}
        for row, level in zip(axes, levels):
            for axis, mode in zip(row, modes):
                panel = [r for r in op_records if r["level"] == level and r["mode"] == mode]
                torch_s = {(tuple(r["shape"]), r["layout"]): r["median_s"] for r in panel
                           if r["backend"] == "torch"}
                lines = _group([r for r in panel if r["backend"] not in ("torch", "floor")],
                               ("backend", "layout"))
                for (backend, layout), rows in lines.items():
                    for sample, sample_rows in _by_sample(rows).items():
                        sample_rows.sort(key=lambda r: r["shape"][0])
                        axis.plot([r["shape"][0] for r in sample_rows],
                                  [torch_s[(tuple(r["shape"]), layout)] / r["median_s"]
                                   for r in sample_rows],
                                  styles[layout], marker=markers[backend],
                                  color=colors[sample],
                                  label=f"{backend} {layout} {shapes.format_shape(sample)}")
                axis.axhline(1.0, color="grey", linewidth=0.8)
                axis.set_xscale("log", base=2)
                axis.set_yscale("log")  # ratios: 2x faster and 2x slower sit equally far from 1
                axis.set_xticks(sorted({r["shape"][0] for r in op_records}))
                axis.xaxis.set_major_formatter(ScalarFormatter())
                axis.yaxis.set_major_formatter(plain)
                axis.yaxis.set_minor_formatter(plain)
                axis.set_xlabel("batch size N")
                axis.set_title(f"{op} {mode}, {level} level")
                axis.grid(True, alpha=0.3)
            row[0].set_ylabel("speedup over torch (> 1: fastbn faster)")
            row[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        figure.suptitle(f"{op}: torch time / fastbn time, {threads} threads, {DTYPE}")
        path = os.path.join(output_dir, f"speedup_{op}.png")
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)

    kernel_records = [r for r in at_threads if r["level"] == "kernel"]
    if not kernel_records:
        return paths
    paths.append(_plot_bandwidth(kernel_records, output_dir, threads, plt))
    figure, axis = plt.subplots(figsize=(7, 5))
    by_backend = _group(kernel_records, ("backend",))
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
    axis.set_title(f"kernels: time against bytes moved, every op and mode, {threads} threads")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    path = os.path.join(output_dir, "time_vs_bytes.png")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    paths.append(path)
    return paths


def _plot_bandwidth(records, output_dir, threads, plt):
    """``bandwidth.png``: per kernel-level case, the GB/s each implementation achieves
    (bytes an ideal kernel moves / time) against the copy floor's, shape by shape."""
    panels = _group(records, ("op", "layout", "mode"))
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows),
                                squeeze=False)
    for axis, ((op, layout, mode), panel) in zip(axes.flat, panels.items()):
        shape_names = list(dict.fromkeys(shapes.format_shape(r["shape"]) for r in panel))
        for index, ((backend,), rows_) in enumerate(_group(panel, ("backend",)).items()):
            by_shape = {shapes.format_shape(r["shape"]): r["bytes_moved"] / r["median_s"] / 1e9
                        for r in rows_}
            axis.plot(range(len(shape_names)), [by_shape.get(name) for name in shape_names],
                      marker="o", markersize=3, color="black" if backend == "floor" else f"C{index}",
                      linestyle="--" if backend == "floor" else "-", label=backend)
        axis.set_xticks(range(len(shape_names)))
        axis.set_xticklabels(shape_names, rotation=90, fontsize=6)
        axis.set_ylabel("GB/s")
        axis.set_title(f"{op} {layout} {mode}", fontsize=8)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(f"achieved GB/s against the copy floor's, kernel level, {threads} threads")
    path = os.path.join(output_dir, "bandwidth.png")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def run_report(full=False, threads=None, backends=None, repeats=None, output="bench-results",
               grids=None, ops=OPS, levels=LEVELS, networks=NETWORKS,
               network_image_size=end_to_end.IMAGE_SIZE, small_networks=False,
               cost_batches=COST_BATCHES, network_layers=False, progress=True,
               print_fn=print):
    """Run the benchmark, print the tables, write results.json and the plots into `output`.

    Parameters
    ----------
    full : bool
        The whole grid (`shapes.GRIDS`) and 30 rounds per case, instead of the
        quick grid (`shapes.QUICK_GRIDS`) and 20 rounds.
    threads : int, optional
        Threads of torch and fastbn (default `fastbn.get_num_threads()`: every usable CPU).
    backends : list of str, optional
        fastbn backends (default every available one but the NumPy reference).
    repeats : int, optional
        Timed rounds per case; the end-to-end cases, 20-500 ms each, get half as many (at
        least 3).
    output : str or None
        Directory for results.json and the PNGs (created); None writes nothing.
    grids : dict of str to shapes.ShapeGrid, optional
        A grid per op, overriding the quick / full one (e.g. a tiny grid in tests).
    ops : sequence of str
    levels : sequence of {"kernel", "module"}
        The levels of the per-op tables.
    networks : sequence of (model, mode, batch)
        The end-to-end cases (`NETWORKS`; empty: none).
    network_image_size : int
    small_networks : bool
        Narrow networks (a smoke run).
    network_layers : bool
        Also the module level on the networks' own BatchNorm shapes
        (`measure_network_layers`; --full turns it on).
    cost_batches : sequence of int
        Batch sizes at which to measure what each part of fastbn.nn's path costs inside a
        converted MobileNetV2 step (`costs.network_parts`), after the per-call parts on a
        tiny input (`costs.per_call_parts`); empty: neither.
    progress : bool
        Show a progress bar (tqdm) over the cases.
    print_fn : callable

    Returns
    -------
    dict
        What results.json holds: "machine" (`machine.describe`), "environment" (lines),
        "measurements" (the records of `measure`) and "networks" (those of
        `measure_networks`).
    """
    if threads is None:
        threads = fastbn.get_num_threads()
    if backends is None:
        backends = batch_norm.backends(include_reference=False)
    if repeats is None:
        repeats = 30 if full else 20
    warmup = 3 if full else 2
    chosen = {op: shapes.GRIDS[op][DTYPE] if full else shapes.QUICK_GRIDS[op] for op in ops}
    chosen.update(grids or {})
    environment = environment_lines(threads)
    for line in environment:
        print_fn(line)
    cases = plan(chosen, ops, levels)
    with progress_bar(len(cases) + len(networks), "fastbn bench", progress) as bar:
        records = measure(cases, threads, backends, repeats, warmup, bar)
        network_records = measure_networks(networks, threads, max(3, repeats // 2), warmup=1,
                                           image_size=network_image_size,
                                           small=small_networks, bar=bar)
    layer_records = (measure_network_layers(threads, max(5, repeats // 2), warmup)
                     if network_layers else [])
    cost_records = {}
    if cost_batches:
        cost_records["per_call"] = costs.per_call_parts(threads)
        for batch in cost_batches:
            cost_records[f"mobilenet_v2 batch {batch}"] = costs.network_parts(
                "mobilenet_v2", batch, network_image_size, threads, steps=max(3, repeats // 3),
                small=small_networks)
    for line in (tables(records, threads) + end_to_end.table(network_records)
                 + network_layers_table(layer_records) + costs.table(cost_records)):
        print_fn(line)
    results = {"machine": machine.describe(threads), "environment": environment,
               "measurements": records, "networks": network_records,
               "network_layers": layer_records, "costs": cost_records}
    if output is not None:
        os.makedirs(output, exist_ok=True)
        write_json(results, os.path.join(output, "results.json"))
        for path in plot(records, output, threads) if _have_matplotlib(print_fn) else ():
            print_fn(f"wrote {path}")
        print_fn(f"wrote {os.path.join(output, 'results.json')}")
    return results


def run_sweep(thread_counts, backends=None, repeats=10, output="bench-results",
              ops=scaling.OPS, levels=scaling.LEVELS, networks=scaling.NETWORKS,
              grids=None, image_size=end_to_end.IMAGE_SIZE, small_networks=False,
              progress=True, print_fn=print):
    """The thread sweep (`scaling`): the training cases of `scaling.GRIDS` (contiguous
    memory) and the end-to-end `networks` at each count of `thread_counts`; prints the
    sweep table and writes results.json (with a "sweep" summary) and scaling.png.

    `grids` overrides `scaling.GRIDS` per op and `small_networks` narrows the networks
    (smoke runs).

    Returns
    -------
    dict
        "environment", "measurements", "networks" (every count's records, each with its
        "threads") and "sweep" (`scaling.summarise`).
    """
    if backends is None:
        backends = batch_norm.backends(include_reference=False)
    environment = environment_lines(max(thread_counts))
    environment.append(f"thread sweep: {', '.join(map(str, thread_counts))}")
    for line in environment:
        print_fn(line)
    grids = {**scaling.GRIDS, **(grids or {})}
    cases = plan({op: grids[op] for op in ops}, ops, levels, modes=("training",),
                 channels_last=False)
    records, network_records = [], []
    with progress_bar((len(cases) + len(networks)) * len(thread_counts), "thread sweep",
                      progress) as bar:
        for threads in thread_counts:
            records += measure(cases, threads, backends, repeats, warmup=2, bar=bar,
                               one_thread=False)
            network_records += measure_networks(networks, threads, max(3, repeats // 2),
                                                warmup=1, image_size=image_size,
                                                small=small_networks, bar=bar)
    summary = scaling.summarise(records, network_records)
    for line in scaling.table(summary):
        print_fn(line)
    results = {"machine": machine.describe(max(thread_counts)), "environment": environment,
               "measurements": records, "networks": network_records, "sweep": summary}
    if output is not None:
        os.makedirs(output, exist_ok=True)
        write_json(results, os.path.join(output, "results.json"))
        if _have_matplotlib(print_fn):
            print_fn(f"wrote {scaling.plot(summary, output)}")
        print_fn(f"wrote {os.path.join(output, 'results.json')}")
    return results


def _parse_networks(parser, specs):
    networks = []
    for spec in specs:
        model, _, rest = spec.partition(":")
        mode, _, batch = rest.partition(":")
        if (model not in end_to_end.MODEL_TITLES or mode not in end_to_end.MODES
                or not batch.isdigit() or int(batch) < 1):
            parser.error(f"--networks: {spec!r} is not MODEL:MODE:BATCH with MODEL in "
                         f"{', '.join(end_to_end.MODEL_TITLES)}, MODE in "
                         f"{', '.join(end_to_end.MODES)} and BATCH >= 1")
        networks.append((model, mode, int(batch)))
    return networks


def main(argv=None):
    """Command line of `python -m fastbn bench`."""
    parser = argparse.ArgumentParser(
        prog="fastbn bench", description="Time every op in torch and in fastbn's backends, "
        "through the NumPy API (kernel level) and through fastbn.nn and autograd (module "
        "level), and MobileNetV2 and ResNet-18 training steps and eval forwards with "
        "torch's layers and after fastbn.nn.convert (end to end): markdown tables, "
        "results.json and PNG plots.")
    parser.add_argument("--full", action="store_true",
                        help="the whole grid, 30 rounds per case (default: a quick run, "
                        "1-2 minutes on 2 cores)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="threads for torch and fastbn (default: every usable CPU); "
                        "several counts (e.g. 1 2 4 8 16) run the thread sweep instead: the "
                        "training cases of BatchNorm2d, GroupNorm and LayerNorm at the kernel "
                        "and module level and a MobileNetV2 training step at each count, "
                        "10 rounds each unless --repeats says otherwise")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="fastbn backends (default: every available one but numpy)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS),
                        help="the ops of the kernel and module tables (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per case (default 20, --full 30; the end-to-end "
                        "cases get half)")
    parser.add_argument("--no-kernels", action="store_true",
                        help="skip the kernel-level tables (the NumPy API)")
    parser.add_argument("--no-modules", action="store_true",
                        help="skip the module-level tables (fastbn.nn through autograd)")
    parser.add_argument("--no-networks", action="store_true",
                        help="skip the end-to-end networks (MobileNetV2, ResNet-18)")
    parser.add_argument("--no-costs", action="store_true",
                        help="skip what each part of fastbn.nn's path costs (a tiny input's "
                        "step and its parts; a converted MobileNetV2 step's BatchNorm time)")
    parser.add_argument("--networks", nargs="+", default=None, metavar="MODEL:MODE:BATCH",
                        help="the end-to-end cases, e.g. mobilenet_v2:training:8 "
                        "resnet50:eval:2 (models: " + ", ".join(end_to_end.MODEL_TITLES)
                        + "; default: the report's, or the sweep's)")
    parser.add_argument("--image-size", type=int, default=end_to_end.IMAGE_SIZE,
                        help=f"image size of the end-to-end cases (default "
                        f"{end_to_end.IMAGE_SIZE})")
    parser.add_argument("--output", default="bench-results",
                        help="directory for results.json and the plots (default bench-results/)")
    args = parser.parse_args(argv)
    levels = [level for level, skip in (("kernel", args.no_kernels), ("module", args.no_modules))
              if not skip]
    sweep = args.threads is not None and len(args.threads) > 1
    networks = (() if args.no_networks
                else _parse_networks(parser, args.networks) if args.networks
                else scaling.NETWORKS if sweep else NETWORKS)
    if sweep:
        run_sweep(args.threads, backends=args.backends, repeats=args.repeats or 10,
                  output=args.output, ops=[op for op in args.ops if op in scaling.OPS],
                  levels=levels, networks=networks, image_size=args.image_size)
        return 0
    run_report(full=args.full, threads=args.threads and args.threads[0], backends=args.backends,
               repeats=args.repeats, output=args.output, ops=args.ops, levels=levels,
               networks=networks, network_image_size=args.image_size,
               cost_batches=() if args.no_costs else COST_BATCHES,
               network_layers=args.full and not args.no_modules)
    return 0
