"""A study's outputs, from its rows: results.csv, results.json, PNG plots, report.md.

Every table gives the mean and the sample standard deviation over the seeds (over the
rounds for times) and their number; every plot draws the standard deviation as error bars.
The plots are drawn on matplotlib's Agg canvas (no display, no pyplot state).
"""
import csv
import dataclasses
import json
import math
import os
import statistics
from collections import defaultdict

from fastbn.study import data as study_data
from fastbn.study import models

PLOTS = {"sweep": "accuracy_vs_batch_size.png", "norm_batch": "accuracy_vs_norm_batch_size.png",
         "evaluation": "evaluation_statistics.png", "scale_out": "scale_out.png",
         "cost": "time_per_epoch.png"}
# The evaluation modes of a BatchNorm-family run: row key and label.
EVAL_MODES = (("accuracy", "EMA (running statistics)"),
              ("accuracy_precise_bn", "PreciseBN (population)"),
              ("accuracy_precise_bn_train_batch", "PreciseBN (training batch)"),
              ("accuracy_batch_stats", "batch statistics"))
NORM_LABELS = {"batchnorm": "BatchNorm", "ghost": "Ghost BatchNorm", "renorm": "Batch Renorm",
               "groupnorm": "GroupNorm", "layernorm": "LayerNorm", "instancenorm": "InstanceNorm",
               "frn": "FRN + TLU", "evonorm_s0": "EvoNorm-S0", "none": "no normalization",
               "sync": "SyncBatchNorm"}
# results.csv's first columns; the others follow in alphabetical order.
FIRST_COLUMNS = ("experiment", "dataset", "model", "norm", "implementation", "batch_size",
                 "virtual_batch_size", "norm_batch_size", "processes", "seed", "repeat",
                 "epochs", "threads", "lr", "accuracy", "accuracy_precise_bn",
                 "accuracy_precise_bn_train_batch", "accuracy_batch_stats",
                 "batch_stats_test_batch_size", "train_loss", "diverged", "time_per_epoch_s",
                 "time_per_step_ms")


def mean_std(values):
    """(mean, sample standard deviation or nan for one value, count); NaNs are kept (a
    diverged run's loss makes its cell's mean NaN, as it should)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan, 0
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


def group(rows, keys, metric, where=None):
    """{tuple of `keys` values: mean_std of `metric`} over the rows matching `where`."""
    groups = defaultdict(list)
    for row in rows:
        if (where is None or where(row)) and row.get(metric) is not None:
            groups[tuple(row.get(key) for key in keys)].append(row[metric])
    return {key: mean_std(values) for key, values in groups.items()}


def cell_text(stats, digits=2):
    if stats is None:
        return "-"
    mean, std, count = stats
    spread = "n/a" if math.isnan(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- selections of the rows each experiment reads -------------------------------------

def sweep_rows(rows, config):
    def where(row):
        return (row["experiment"] == "train" and row["norm"] in config.norms
                and row["batch_size"] in config.batch_sizes
                and (row["norm"] != "ghost" or row["virtual_batch_size"] == config.ghost_size))
    return [row for row in rows if where(row)]


def norm_batch_rows(rows, config):
    return [row for row in rows if row["experiment"] == "train" and row["norm"] == "ghost"
            and row["batch_size"] == config.norm_batch_sgd_batch
            and row["virtual_batch_size"] in config.ghost_sizes]


def cost_rows(rows):
    return [row for row in rows if row["experiment"] == "cost"]


def scale_out_variants(rows, config):
    """{per-process batch b: [(label, rows)]}: BatchNorm at b, local BatchNorm on 2
    processes, SyncBatchNorm on 2 processes, BatchNorm at 2b."""
    variants = {}
    for b in config.scale_out_batch_sizes:
        def pick(norm, batch, processes):
            return [row for row in rows if row["experiment"] in ("train", "scale_out")
                    and row["norm"] == norm and row["batch_size"] == batch
                    and row["processes"] == processes]
        variants[b] = [(f"BatchNorm, 1 process x {b}", pick("batchnorm", b, 1)),
                       (f"BatchNorm, 2 processes x {b} (local statistics)",
                        pick("batchnorm", 2 * b, 2)),
                       (f"SyncBatchNorm, 2 processes x {b}", pick("sync", 2 * b, 2)),
                       (f"BatchNorm, 1 process x {2 * b}", pick("batchnorm", 2 * b, 1))]
    return variants


# --- tables ------------------------------------------------------------------------------

def sweep_table(rows, config):
    stats = group(sweep_rows(rows, config), ("norm", "batch_size"), "accuracy")
    header = ["norm"] + [f"b={b}" for b in config.batch_sizes]
    return markdown_table(header, [[NORM_LABELS[norm]] + [cell_text(stats.get((norm, b)))
                                                          for b in config.batch_sizes]
                                   for norm in config.norms])


def evaluation_table(rows, keys, order, label_of):
    """One line per group of `keys` (in the order of `order`, the groups with rows), the
    four evaluation modes as columns."""
    stats = {metric: group(rows, keys, metric) for metric, _ in EVAL_MODES}
    test_batch = group(rows, keys, "batch_stats_test_batch_size")
    lines = []
    for key in (key for key in order if key in stats["accuracy"]):
        lines.append([label_of(key)] + [cell_text(stats[metric].get(key))
                                        for metric, _ in EVAL_MODES]
                     + [f"{test_batch[key][0]:.0f}" if key in test_batch else "-"])
    return markdown_table(["run"] + [label for _, label in EVAL_MODES]
                          + ["test batch (batch statistics)"], lines)


def scale_out_table(rows, config):
    lines = []
    for b, variants in scale_out_variants(rows, config).items():
        for label, picked in variants:
            if not picked:
                continue
            lines.append([label, cell_text(mean_std([r["accuracy"] for r in picked])),
                          cell_text(mean_std([r["accuracy_precise_bn"] for r in picked])),
                          cell_text(mean_std([r["time_per_step_ms"] for r in picked])),
                          cell_text(mean_std([r["time_per_epoch_s"] for r in picked]))])
    return markdown_table(["run", "accuracy (EMA) %", "accuracy (PreciseBN) %",
                           "time per step (ms)", "time per epoch (s)"], lines)


def cost_table(rows, config):
    stats = group(cost_rows(rows), ("norm", "batch_size", "implementation"), "time_per_epoch_s")
    lines = []
    for norm in config.norms:
        for b in config.batch_sizes:
            ours, theirs = stats.get((norm, b, "fastbn")), stats.get((norm, b, "torch"))
            if ours is None:
                continue
            ratio = theirs[0] / ours[0] if theirs else math.nan
            lines.append([NORM_LABELS[norm], b, cell_text(ours), cell_text(theirs),
                          f"{ratio:.2f}x"])
    return markdown_table(["norm", "batch", "fastbn s/epoch", "torch s/epoch",
                           "torch / fastbn"], lines)


# --- report.md ---------------------------------------------------------------------------

def _sweep_findings(rows, config):
    """Sentences computed from the sweep: each norm's accuracy at the smallest and the
    largest batch, and the best norm at each batch size."""
    stats = group(sweep_rows(rows, config), ("norm", "batch_size"), "accuracy")
    lines = []
    for norm in config.norms:
        present = [b for b in config.batch_sizes if (norm, b) in stats]
        if len(present) > 1:
            low, high = stats[(norm, present[0])], stats[(norm, present[-1])]
            lines.append(f"- {NORM_LABELS[norm]}: {low[0]:.2f} % at batch {present[0]}, "
                         f"{high[0]:.2f} % at batch {present[-1]} "
                         f"({low[0] - high[0]:+.2f} points).")
    for b in config.batch_sizes:
        ranked = sorted(((stats[(norm, b)][0], norm) for norm in config.norms
                         if (norm, b) in stats), reverse=True)
        if ranked:
            lines.append(f"- Best at batch {b}: {NORM_LABELS[ranked[0][1]]} "
                         f"({ranked[0][0]:.2f} %)" + (
                             f", then {NORM_LABELS[ranked[1][1]]} ({ranked[1][0]:.2f} %)."
                             if len(ranked) > 1 else "."))
    diverged = [row for row in sweep_rows(rows, config) if row.get("diverged")]
    if diverged:
        lines.append("- Diverged (a loss that was not finite stopped the run): "
                     + ", ".join(f"{NORM_LABELS[r['norm']]} b={r['batch_size']} seed "
                                 f"{r['seed']}" for r in diverged) + ".")
    return "\n".join(lines)


def _cost_findings(rows, config):
    stats = group(cost_rows(rows), ("norm", "batch_size", "implementation"), "time_per_epoch_s")
    lines = []
    for norm in config.norms:
        ratios = [stats[(norm, b, "torch")][0] / stats[(norm, b, "fastbn")][0]
                  for b in config.batch_sizes
                  if (norm, b, "torch") in stats and (norm, b, "fastbn") in stats]
        if ratios:
            geometric = math.exp(statistics.fmean(math.log(r) for r in ratios))
            lines.append(f"- {NORM_LABELS[norm]}: torch's time / fastbn's, geometric mean "
                         f"{geometric:.2f}x (from {min(ratios):.2f}x to {max(ratios):.2f}x).")
    return "\n".join(lines)


def _images(config):
    train = study_data.TRAIN_IMAGES[config.dataset]
    train = train if config.train_size is None else min(train, config.train_size)
    test = "all" if config.test_size is None else f"at most {config.test_size}"
    return f"{train} training images, {test} test images of the split"


def _time_spent(rows):
    """Minutes of the cells run now, per experiment (a cell shared by two experiments
    counts in the first that planned it)."""
    seconds = defaultdict(float)
    seen = set()
    for row in rows:
        if row.get("cell") not in seen:
            seen.add(row.get("cell"))
            seconds[row["experiment"]] += row.get("cell_time_s", 0.0)
    return ", ".join(f"{name} {value / 60:.1f}" for name, value in seconds.items())


def _seeds_text(config):
    return f"{len(config.seeds)} seed{'s' if len(config.seeds) > 1 else ''}"


def markdown(rows, config, plots, machine_line, elapsed_s, cells_ran, cells_cached):
    """report.md: the setup, then per experiment what it isolates, its table, its plot."""
    seeds = _seeds_text(config)
    training_rows = [row for row in rows if row["experiment"] != "cost"]
    example = training_rows[0] if training_rows else {}
    parts = [
        "# fastbn small-batch study\n",
        "Generated by `python -m fastbn study` (fastbn/study/) from the rows of results.csv. "
        "Accuracies are test accuracies in percent, mean ± sample standard deviation over "
        f"{seeds} ({', '.join(map(str, config.seeds))}); times are means ± standard deviations "
        "over repeated runs and depend on the machine and its load: on a shared machine they "
        "are only indicative.\n",
        f"- data: {config.dataset}, {_images(config)}; model: {config.model}; "
        f"{config.epochs} epoch{'s' if config.epochs > 1 else ''}; SGD, momentum "
        f"{config.momentum}, weight decay {config.weight_decay}, learning rate "
        f"{config.base_lr} x batch / 32 with a linear warm-up over "
        f"{config.warmup_fraction:.0%} of the steps, then a cosine decay",
        f"- threads: {config.threads} (given the seed and the thread count the accuracies "
        "are the same in every rerun)",
        f"- machine: {machine_line}",
        f"- cells: {cells_ran} run now, {cells_cached} from the cache"
        + (f"; {elapsed_s / 60:.1f} minutes" if elapsed_s is not None else ""),
        f"- minutes spent in the cells, as recorded when each ran: {_time_spent(rows)} "
        "(train: the single-process training runs of every experiment)",
    ]
    if example:
        parts.append(f"- study version {example.get('version')}")
    if "sweep" in config.experiments:
        parts += [
            "\n## 1. Batch-size sweep\n",
            "The same network and number of epochs at every batch size, the learning rate "
            "scaled with the batch (Wu & He 2018's protocol): what each norm loses as the "
            "batch shrinks. Accuracy in eval mode (BatchNorm family: the EMA running "
            f"statistics). Ghost BatchNorm normalizes virtual batches of {config.ghost_size} "
            f"(at batch sizes up to {config.ghost_size} it is BatchNorm: not run).\n",
            sweep_table(rows, config), "", _sweep_findings(rows, config), "",
            f"![accuracy against batch size]({plots['sweep']})"]
    if "norm_batch" in config.experiments:
        parts += [
            "\n## 2. Normalization batch sweep\n",
            f"A fixed SGD batch of {config.norm_batch_sgd_batch}; BatchNorm's statistics "
            "over ghost batches of k samples (Wu & Johnson 2021): the normalization batch "
            "without the optimisation. Each evaluation mode as in section 3.\n",
            evaluation_table(norm_batch_rows(rows, config), ("virtual_batch_size",),
                             [(k,) for k in config.ghost_sizes], lambda key: f"k={key[0]}"),
            "", f"![accuracy against normalization batch]({plots['norm_batch']})"]
    if "sweep" in config.experiments:
        parts += [
            "\n## 3. Evaluation statistics (the sweep's BatchNorm-family runs)\n",
            "The same trained network evaluated four ways: the EMA running statistics, "
            "PreciseBN over the training set in batches of 200 (population statistics), "
            "PreciseBN in training-sized batches (the average of the statistics training "
            "saw), and each test batch's own statistics (test batch = the normalization "
            "batch of training, last column).\n",
            evaluation_table([r for r in sweep_rows(rows, config)
                              if r["norm"] in models.BATCH_NORMS],
                             ("norm", "batch_size"),
                             [(n, b) for n in config.norms for b in config.batch_sizes],
                             lambda key: f"{NORM_LABELS[key[0]]} b={key[1]}"),
            "", f"![evaluation statistics]({plots['evaluation']})"]
    if "scale_out" in config.experiments:
        parts += [
            "\n## 4. Scale-out: SyncBatchNorm over 2 processes\n",
            "Data-parallel training (DistributedDataParallel, gloo, 2 processes of "
            f"{config.threads} thread{'s' if config.threads > 1 else ''} on this machine), "
            "b images per process: SyncBatchNorm (statistics over 2b) against local "
            "BatchNorm (statistics over b, the same SGD batch 2b) and single-process "
            "BatchNorm at b and 2b. The processes take the halves of the single-process "
            "run's batches, so SyncBatchNorm computes what BatchNorm at 2b computes, up to "
            "rounding. EMA statistics are process 0's.\n",
            scale_out_table(rows, config), "", f"![scale-out]({plots['scale_out']})"]
    if "cost" in config.experiments:
        parts += [
            "\n## 5. Cost: time per epoch, fastbn's layers against torch's\n",
            f"The network with fastbn.nn's layers and with torch's (torch.nn's BatchNorm2d, "
            "GroupNorm, InstanceNorm2d; the plain-torch Ghost BatchNorm, Batch Renorm, FRN "
            "and EvoNorm of fastbn.benchmarks), alternated in one process: "
            f"{config.cost_rounds} rounds of {config.cost_images} images each (at least "
            "10 steps), the time per epoch scaled from the steps (indicative: see the "
            "machine above).\n",
            cost_table(rows, config), "", _cost_findings(rows, config), "",
            f"![time per epoch]({plots['cost']})"]
    return "\n".join(parts) + "\n"


# --- files -------------------------------------------------------------------------------

def write_csv(rows, path):
    keys = {key for row in rows for key in row}
    columns = [c for c in FIRST_COLUMNS if c in keys] + sorted(keys - set(FIRST_COLUMNS))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})


def _machine(threads):
    from fastbn.benchmarks import machine

    record = machine.describe(threads)
    return record, machine.summary(record)


def write(output, config, rows, elapsed_s=None, cells_ran=None, cells_cached=None):
    """Write results.csv, results.json, the plots and report.md into `output`."""
    from fastbn.study import plots as drawing

    record, machine_line = _machine(config.threads)
    write_csv(rows, os.path.join(output, "results.csv"))
    with open(os.path.join(output, "results.json"), "w") as file:
        json.dump({"config": dataclasses.asdict(config), "machine": record,
                   "elapsed_s": elapsed_s, "cells_ran": cells_ran, "cells_cached": cells_cached,
                   "rows": rows}, file, indent=1)
    drawers = {"sweep": drawing.plot_sweep, "norm_batch": drawing.plot_norm_batch,
               "evaluation": drawing.plot_evaluation, "scale_out": drawing.plot_scale_out,
               "cost": drawing.plot_cost}
    plots = {}
    for name, draw in drawers.items():
        needed = "sweep" if name == "evaluation" else name
        if needed in config.experiments:
            draw(rows, config, os.path.join(output, PLOTS[name]))
            plots[name] = PLOTS[name]
    text = markdown(rows, config, plots, machine_line, elapsed_s, cells_ran, cells_cached)
    with open(os.path.join(output, "report.md"), "w") as file:
        file.write(text)
