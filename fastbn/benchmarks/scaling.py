"""The thread sweep of `python -m fastbn bench --threads 1 2 4 8 16`: every level (kernel,
module, end to end) and implementation (torch, each fastbn backend) at each thread count,
the ratio to torch, the speed-up over 1 thread and the parallel efficiency, with a plot of
time against threads.

Each thread count is a run of `report.measure` / `report.measure_networks` with torch and
fastbn on that many threads, so the implementations alternate within a count, as in every
other table; the counts follow one another.
"""
import math
import os

from fastbn.benchmarks import shapes

# Issue 17's small-batch grids: BatchNorm2d on the ResNet feature maps at N in 1, 2, 8;
# GroupNorm(32) on the first three; LayerNorm on 64 to 4096 rows of 384 or 768 values.
SWEEP_BATCH_SIZES = (1, 2, 8)
GRIDS = {
    "batch_norm_2d": shapes.ShapeGrid(SWEEP_BATCH_SIZES, shapes.RESNET_FEATURE_MAPS),
    "group_norm": shapes.ShapeGrid(SWEEP_BATCH_SIZES, shapes.RESNET_FEATURE_MAPS[:3]),
    "layer_norm": shapes.ShapeGrid((), (), ((1, 64, 384), (4, 128, 768), (32, 128, 768))),
}
OPS = tuple(GRIDS)
LEVELS = ("kernel", "module")
# The end-to-end cases of the sweep: the network people train on CPUs.
NETWORKS = (("mobilenet_v2", "training", 8),)


def _geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


def summarise(records, network_records):
    """Per (level, op, layout, mode, implementation) and thread count: the geometric mean
    over shapes of the time, the ratio torch / implementation, the speed-up over 1 thread
    and the parallel efficiency (speed-up / threads).

    Returns
    -------
    list of dict
        Keys: level, op, layout, mode, backend, threads, geomean_s, over_torch, speedup,
        efficiency (speedup and efficiency None without a 1-thread run).
    """
    rows = []
    groups = {}
    for r in records:
        if r["backend"] == "floor":
            continue
        key = (r["level"], r["op"], r["layout"], r["mode"])
        groups.setdefault(key, {}).setdefault((r["backend"], r["threads"]), {})[
            tuple(r["shape"])] = r["median_s"]
    for r in network_records:
        key = ("network", r["model"], f"batch {r['batch']}", r["mode"])
        groups.setdefault(key, {}).setdefault((r["backend"], r["threads"]), {})[
            (r["batch"],)] = r["median_s"]
    for (level, op, layout, mode), times in groups.items():
        for (backend, threads), by_shape in times.items():
            torch_times = times.get(("torch", threads), {})
            one = times.get((backend, 1))
            shapes_here = [s for s in by_shape if s in torch_times]
            geomean = _geomean([by_shape[s] for s in by_shape])
            over_torch = (_geomean([torch_times[s] / by_shape[s] for s in shapes_here])
                          if shapes_here else None)
            speedup = (_geomean([one[s] / by_shape[s] for s in by_shape if s in one])
                       if one else None)
            rows.append(dict(level=level, op=op, layout=layout, mode=mode, backend=backend,
                             threads=threads, geomean_s=geomean, over_torch=over_torch,
                             speedup=speedup,
                             efficiency=None if speedup is None else speedup / threads))
    return rows


def table(summary):
    """Markdown lines: a row per (level, op, implementation), a column group per count."""
    if not summary:
        return []
    counts = sorted({r["threads"] for r in summary})
    header = (["level", "op", "mode", "implementation"]
              + [f"{t} thr: x torch / speed-up / eff." for t in counts])
    lines = ["", "## Thread sweep", "",
             "x torch: torch time / this time (geometric mean over the shapes); speed-up: "
             "this implementation's 1-thread time / this time; eff.: speed-up / threads.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keyed = {}
    for r in summary:
        keyed.setdefault((r["level"], r["op"], r["layout"], r["mode"], r["backend"]), {})[
            r["threads"]] = r
    for (level, op, layout, mode, backend), by_count in keyed.items():
        cells = [level, op if layout == "contiguous" else f"{op} ({layout})", mode, backend]
        for t in counts:
            r = by_count.get(t)
            if r is None:
                cells.append("")
                continue
            ratio = "" if r["over_torch"] is None else f"{r['over_torch']:.2f}x"
            speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}"
            efficiency = "" if r["efficiency"] is None else f"{r['efficiency']:.0%}"
            cells.append(f"{ratio} / {speedup} / {efficiency}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(summary, output_dir):
    """``scaling.png``: geometric-mean time against threads, a panel per (level, op, mode),
    a line per implementation (log-log: perfect scaling is a line of slope -1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    panels = list(dict.fromkeys((r["level"], r["op"], r["layout"], r["mode"]) for r in summary))
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        lines = {}
        for r in summary:
            if (r["level"], r["op"], r["layout"], r["mode"]) == panel:
                lines.setdefault(r["backend"], []).append(r)
        for index, (backend, points) in enumerate(lines.items()):
            points.sort(key=lambda r: r["threads"])
            axis.plot([r["threads"] for r in points], [r["geomean_s"] * 1e3 for r in points],
                      marker="o", color=f"C{index}", label=backend)
        counts = sorted({r["threads"] for r in summary})
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(counts)
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.set_xlabel("threads")
        axis.set_ylabel("time, geometric mean over shapes (ms)")
        level, op, layout, mode = panel
        axis.set_title(f"{level}: {op} {mode}" + ("" if layout == "contiguous" else f" {layout}"),
                       fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    path = os.path.join(output_dir, "scaling.png")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
