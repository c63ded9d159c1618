"""The study's PNG plots, drawn on matplotlib's Agg canvas (a `Figure` saved directly: no
display, no pyplot state). Every point is a mean over seeds (rounds, for times) with the
sample standard deviation as its error bar.
"""
import math

from fastbn.study import models
from fastbn.study.report import (EVAL_MODES, NORM_LABELS, cost_rows, group, mean_std,
                                 norm_batch_rows, scale_out_variants, sweep_rows)

def _figure(width=7.0, height=4.5, ncols=1, nrows=1):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the study's plots need matplotlib: pip install fastbn[study]") from exc
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def _errorbar_line(axes, stats, xs, label, **style):
    points = [(x, stats[x]) for x in xs if x in stats]
    if points:
        axes.errorbar([x for x, _ in points], [s[0] for _, s in points],
                      yerr=[0.0 if math.isnan(s[1]) else s[1] for _, s in points],
                      label=label, capsize=3, marker="o", markersize=4, **style)


def _log2_axis(axes, xs, label):
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(xs), [str(x) for x in xs])
    axes.set_xlabel(label)


def plot_sweep(rows, config, path):
    figure, axes = _figure()
    axes = axes[0, 0]
    stats = group(sweep_rows(rows, config), ("norm", "batch_size"), "accuracy")
    for norm in config.norms:
        _errorbar_line(axes, {b: stats[(norm, b)] for b in config.batch_sizes
                              if (norm, b) in stats}, config.batch_sizes, NORM_LABELS[norm])
    _log2_axis(axes, config.batch_sizes, "batch size (learning rate scaled with it)")
    axes.set_ylabel("test accuracy % (eval mode)")
    axes.set_title(f"Batch-size sweep: {config.dataset}, {config.model}, {config.epochs} epochs")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)


def plot_norm_batch(rows, config, path):
    figure, axes = _figure()
    axes = axes[0, 0]
    selected = norm_batch_rows(rows, config)
    for metric, label in EVAL_MODES:
        stats = group(selected, ("virtual_batch_size",), metric)
        _errorbar_line(axes, {k[0]: v for k, v in stats.items()}, config.ghost_sizes, label)
    _log2_axis(axes, config.ghost_sizes, f"normalization batch (SGD batch "
                                         f"{config.norm_batch_sgd_batch})")
    axes.set_ylabel("test accuracy %")
    axes.set_title("Normalization batch sweep (Ghost BatchNorm)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)


def plot_evaluation(rows, config, path):
    norms = [n for n in config.norms if n in models.BATCH_NORMS]
    selected = sweep_rows(rows, config)
    figure, axes = _figure(width=4.0 * max(1, len(norms)), height=4.0, ncols=max(1, len(norms)))
    for column, norm in enumerate(norms):
        subplot = axes[0, column]
        for metric, label in EVAL_MODES:
            stats = group(selected, ("batch_size",), metric, where=lambda r: r["norm"] == norm)
            _errorbar_line(subplot, {k[0]: v for k, v in stats.items()}, config.batch_sizes,
                           label)
        _log2_axis(subplot, config.batch_sizes, "batch size")
        subplot.set_title(NORM_LABELS[norm])
        subplot.set_ylabel("test accuracy %")
        subplot.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    figure.savefig(path, dpi=110)


def plot_scale_out(rows, config, path):
    variants = scale_out_variants(rows, config)
    figure, axes = _figure(width=10.0, height=4.0, ncols=2)
    labels, accuracies, times = [], [], []
    for b, entries in variants.items():
        for label, picked in entries:
            if picked:
                labels.append(label.replace(", ", "\n"))
                accuracies.append(mean_std([r["accuracy"] for r in picked]))
                times.append(mean_std([r["time_per_step_ms"] for r in picked]))
    for subplot, values, title in ((axes[0, 0], accuracies, "test accuracy % (EMA)"),
                                   (axes[0, 1], times, "time per step (ms)")):
        subplot.bar(range(len(values)), [v[0] for v in values],
                    yerr=[0.0 if math.isnan(v[1]) else v[1] for v in values], capsize=3)
        subplot.set_xticks(range(len(labels)), labels, fontsize=6)
        subplot.set_title(title)
        subplot.grid(alpha=0.3, axis="y")
    if accuracies:
        low = min(v[0] for v in accuracies)
        axes[0, 0].set_ylim(max(0.0, low - 5.0), 100.0)
    figure.savefig(path, dpi=110)


def plot_cost(rows, config, path):
    norms = config.norms
    ncols = min(4, len(norms))
    nrows = math.ceil(len(norms) / ncols)
    figure, axes = _figure(width=3.2 * ncols, height=2.8 * nrows, ncols=ncols, nrows=nrows)
    stats = group(cost_rows(rows), ("norm", "implementation", "batch_size"), "time_per_epoch_s")
    for index, norm in enumerate(norms):
        subplot = axes[index // ncols, index % ncols]
        for implementation in models.IMPLEMENTATIONS:
            _errorbar_line(subplot, {k[2]: v for k, v in stats.items()
                                     if k[:2] == (norm, implementation)},
                           config.batch_sizes, implementation,
                           linestyle="-" if implementation == "fastbn" else "--")
        _log2_axis(subplot, config.batch_sizes, "batch size")
        subplot.set_yscale("log")
        subplot.set_title(NORM_LABELS[norm], fontsize=9)
        subplot.set_ylabel("s / epoch")
        subplot.grid(alpha=0.3)
        subplot.legend(fontsize=7)
    for index in range(len(norms), nrows * ncols):
        axes[index // ncols, index % ncols].set_visible(False)
    figure.savefig(path, dpi=110)


