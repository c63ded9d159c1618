"""Benchmarks of single fastbn.nn layers run by scripts of bench/, the results files they
write, and the tables `python -m fastbn docs` makes of them (fastbn/benchmarks/docs.py).

    bench/compare_small_batch.py  -> docs/benchmarks/small_batch.json  (block kind plain_torch)
    bench/compare_frn_evonorm.py  -> docs/benchmarks/frn_evonorm.json  (block kind plain_torch)
    bench/sync_overhead.py        -> docs/benchmarks/sync.json         (block kind sync)

- `measure_against_plain_torch`: one training step of a fastbn.nn layer against the same
  layer written in plain torch ops (torch has no Ghost BatchNorm, Batch Renorm, FRN or
  EvoNorm-S0, and its FrozenBatchNorm2d is torchvision's formula: what a user runs
  without fastbn), each implementation checked against the plain layer, then all timed
  interleaved (`timing.alternate`).
- `results_file`: what each file holds: the machine (`machine.describe`), the
  environment lines of the main bench (`compare.environment_lines`: versions, the CPUs
  other processes used just before the run), the command that wrote it, the run's
  settings and every measurement.
- `plain_torch_table`, `sync_table`: the blocks' lines.
"""
import dataclasses
import json
import os
import shlex
import time

from fastbn.benchmarks import machine, shapes, targets
from fastbn.benchmarks.timing import alternate

# The environment variables a run's figures depend on beyond the machine record: they are
# written into the recorded command, so that the command reruns the same measurement.
ENVIRONMENT_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "FASTBN_SIMD",
                         "FASTBN_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                         "OPENBLAS_NUM_THREADS")
# Issue 13: each small-batch layer's training step >= 2x the plain-torch layer (geometric
# mean over the grid), no shape slower.
TARGET_GEOMEAN, TARGET_WORST = 2.0, 1.0
TITLES = {"ghost_batch_norm": "Ghost BatchNorm", "batch_renorm": "Batch Renorm",
          "frozen_batch_norm": "FrozenBatchNorm2d", "frn": "FRN + TLU",
          "evonorm_s0": "EvoNorm-S0"}


def parse_shape(text):
    """'1x16x8x8' -> (1, 16, 8, 8): a shape as `shapes.format_shape` writes it (--shapes)."""
    try:
        shape = tuple(int(dim) for dim in text.split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"a shape is positive sizes joined by 'x' (e.g. 1x16x8x8), got {text!r}")
    return shape


def command(script, argv):
    """The command line that reruns this run: the environment variables of
    `ENVIRONMENT_VARIABLES` that are set, then ``python SCRIPT ARGV``."""
    settings = [f"{name}={os.environ[name]}" for name in ENVIRONMENT_VARIABLES
                if name in os.environ]
    return shlex.join(settings + ["python", script] + list(argv))


def measure_against_plain_torch(case, layer, implementations, threads, repeats,
                                min_round_s=5e-4, clock=time.perf_counter):
    """Check, then time one training step of a fastbn.nn layer against the plain-torch one.

    Parameters
    ----------
    case : modules.ModuleCase
        With ``torch_step(mode)`` (the plain layer) and ``fastbn_step(name, mode)``
        (`small_batch.SmallBatchLayerCase`, `norm_act.NormActModuleCase`).
    layer : str
        The layer's name in the records.
    implementations : sequence of str
        fastbn's: backend names, or "default" (the layer as built, backend=None).
    threads : int
        The thread count torch and fastbn were set to (recorded).
    repeats, min_round_s, clock
        Of `timing.alternate`.

    Returns
    -------
    list of dict
        One record per implementation, "torch" (the plain layer) first: layer, shape,
        dtype, layout, mode, threads, implementation and the `timing.Timing` fields.
    """
    # Each step on a layer of its own, built fresh: a step updates running statistics, so
    # the checked layers must not be the timed ones (nor the reference the checked one).
    expected = case.torch_step("training")()
    for name in implementations:
        case.check(case.fastbn_step(name, "training")(), expected, "training", name)
    steps = {"torch": case.torch_step("training")}
    steps.update((name, case.fastbn_step(name, "training")) for name in implementations)
    timings = alternate(steps, repeats=repeats, min_round_s=min_round_s, clock=clock)
    return [dict(layer=layer, shape=list(case.shape), dtype=str(case.dtype),
                 layout="channels_last" if case.channels_last else "contiguous",
                 mode="training", threads=threads, implementation=name,
                 **dataclasses.asdict(timing)) for name, timing in timings.items()]


def environment(threads):
    """The main bench's environment lines (`compare.environment_lines`: versions, OpenMP
    runtimes, the CPUs other processes use, measured now), printed: call it before the
    run."""
    from fastbn.benchmarks.compare import environment_lines

    lines = environment_lines(threads)
    for line in lines:
        print(line)
    return lines


def results_file(threads, script, argv, environment_lines, settings, measurements):
    """The dict a script writes: "machine" (`machine.describe(threads)`), "environment"
    (`environment`'s lines), "command" (`command(script, argv)`), "settings",
    "measurements"."""
    return {"machine": machine.describe(threads), "environment": environment_lines,
            "command": command(script, argv), "settings": settings,
            "measurements": measurements}


def write(results, path):
    """Write `results` as JSON to `path` (its folder created)."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as file:
        json.dump(results, file, indent=1)
        file.write("\n")


def _in_order(values):
    return list(dict.fromkeys(values))


def _title(layer, settings):
    parameters = settings.get("parameters", {}).get(layer)
    title = TITLES.get(layer, layer)
    if parameters:
        title += " (" + ", ".join(f"{name} = {value}" for name, value in parameters.items()) + ")"
    return title


def _shape(shape):
    return shapes.format_shape(shape)


def plain_torch_ratios(results):
    """{(layer, layout, implementation): [(plain torch time / fastbn time, shape)]}, with
    the run's statistic (settings "estimate": "min" or "median")."""
    key = f"{results['settings']['estimate']}_s"
    records = results["measurements"]
    plain = {(r["layer"], r["layout"], tuple(r["shape"])): r[key] for r in records
             if r["implementation"] == "torch"}
    ratios = {}
    for r in records:
        if r["implementation"] != "torch":
            ratios.setdefault((r["layer"], r["layout"], r["implementation"]), []).append(
                (plain[r["layer"], r["layout"], tuple(r["shape"])] / r[key], tuple(r["shape"])))
    return ratios


def speedup_summary(ratios):
    """('1.49x, worst 0.82x (1x16x8x8)', 'yes' or '**no**'): the geometric mean and worst
    of [(speedup, shape)], and whether issue 13's target is met."""
    _, text, met = targets._ratio_target("", ratios, TARGET_GEOMEAN, TARGET_WORST)[0]
    return text, met


def _load(results):
    """' CPUs used by other processes: ...': how busy the machine was before the run, as
    the environment lines recorded it (nothing where they did not measure it)."""
    lines = [line for line in results.get("environment", [])
             if line.startswith("CPUs used by other processes")]
    return "".join(f" {line}." for line in lines)


def _spread(records):
    """The largest interquartile range / median among `records`: how noisy a row was."""
    return max((r["q3_s"] - r["q1_s"]) / r["median_s"] for r in records)


def plain_torch_table(results):
    """Markdown lines: how the run measured; per layer, layout and fastbn implementation
    the geometric-mean speedup over the plain-torch layer, its worst shape and whether
    issue 13's target is met; then per layer and layout every shape's times."""
    settings = results["settings"]
    records = results["measurements"]
    key = f"{settings['estimate']}_s"
    statistic = "fastest" if settings["estimate"] == "min" else "median"
    clock = (" (the calling thread's CPU time)" if settings.get("clock") == "thread" else "")
    lines = [f"One training step of the layer alone (gradients set to None, forward, "
             f"backward), {', '.join(_in_order(r['dtype'] for r in records))}, "
             f"{settings['threads']} threads for torch and fastbn; each time is the "
             f"{statistic} of {settings['rounds']} interleaved rounds{clock}; `spread` is "
             f"the largest interquartile range / median of a row.{_load(results)} "
             f"Recorded by `{results['command']}`.", "",
             "| layer | layout | fastbn | speedup over plain torch: geometric mean, worst "
             f"shape | issue 13's target (>= {TARGET_GEOMEAN:g}x, no shape slower) met |",
             "| --- | --- | --- | --- | --- |"]
    for (layer, layout, name), values in plain_torch_ratios(results).items():
        measured, met = speedup_summary(values)
        lines.append(f"| {_title(layer, settings)} | {layout} | {name} | {measured} | {met} |")
    for layer, layout in _in_order((r["layer"], r["layout"]) for r in records):
        mine = [r for r in records if r["layer"] == layer and r["layout"] == layout]
        names = _in_order(r["implementation"] for r in mine if r["implementation"] != "torch")
        lines += ["", f"**{_title(layer, settings)}, {layout}**", "",
                  "| input | plain torch | "
                  + " | ".join(f"fastbn ({name}) | speedup" for name in names) + " | spread |",
                  "| --- | ---: |" + " ---: | ---: |" * len(names) + " ---: |"]
        for shape in _in_order(tuple(r["shape"]) for r in mine):
            row = [r for r in mine if tuple(r["shape"]) == shape]
            at = {r["implementation"]: r[key] for r in row}
            cells = [f"{at[name] * 1e6:.0f} us | {at['torch'] / at[name]:.2f}x"
                     for name in names]
            lines.append(f"| {_shape(shape)} | {at['torch'] * 1e6:.0f} us | "
                         + " | ".join(cells) + f" | {_spread(row):.0%} |")
    return lines


def sync_table(results):
    """Markdown lines: how the run measured; SyncBatchNorm's step against the local
    BatchNorm2d's and the two collectives alone, per shape; the range of the overhead."""
    settings = results["settings"]
    records = results["measurements"]
    at = {(tuple(r["shape"]), r["implementation"]): r for r in records}
    lines = [f"{settings['processes']} gloo processes x {settings['threads']} thread(s), "
             f"backend {settings['backend']}, float32, contiguous; per layer and training "
             f"step, rank 0's times, each the fastest of {settings['blocks']} blocks' mean "
             f"step time.{_load(results)} Recorded by `{results['command']}`.", "",
             "| input per process | local BatchNorm2d | SyncBatchNorm | overhead "
             "| collectives alone | bytes all-gathered (forward) "
             "| bytes all-reduced (backward) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    overheads, collectives = [], []
    for shape in _in_order(tuple(r["shape"]) for r in records):
        local, sync = at[shape, "local"]["min_s"], at[shape, "sync"]
        alone = at[shape, "collectives"]["min_s"]
        overheads.append((sync["min_s"] - local, sync["min_s"] / local))
        collectives.append(alone)
        lines.append(f"| {_shape(shape)} | {local * 1e6:.0f} us | {sync['min_s'] * 1e6:.0f} us "
                     f"| {(sync['min_s'] - local) * 1e6:+.0f} us ({sync['min_s'] / local:.2f}x) "
                     f"| {alone * 1e6:.0f} us | {sync['bytes_all_gathered']} "
                     f"| {sync['bytes_all_reduced']} |")
    lines += ["", f"SyncBatchNorm's overhead over the local layer: "
              f"{min(overheads)[0] * 1e6:+.0f} to {max(overheads)[0] * 1e6:+.0f} us per layer "
              f"and step ({min(o[1] for o in overheads):.2f}x to "
              f"{max(o[1] for o in overheads):.2f}x the local step); the two collectives "
              f"alone: {min(collectives) * 1e6:.0f} to {max(collectives) * 1e6:.0f} us."]
    return lines
