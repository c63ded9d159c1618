"""The issues' speed targets, checked against a recorded run: one row per target with what
the run measured and whether it is met. docs/benchmarks.md shows them as a generated block
(`docs.py`, kind ``targets``), so the verdicts come from the same file as every figure.

Each check reads only records the run has; a target whose records are missing is left out.
"""
import math

from fastbn.benchmarks import end_to_end


def _geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


def _kernel_ratios(results, op, mode, layout, backend="cython", level="kernel"):
    """[(torch time / backend time, shape)] at the run's thread count."""
    threads = results["machine"]["threads"]
    rows = [r for r in results.get("measurements", [])
            if r["level"] == level and r["op"] == op and r["mode"] == mode
            and r["layout"] == layout and r["threads"] == threads]
    torch_s = {tuple(r["shape"]): r["median_s"] for r in rows if r["backend"] == "torch"}
    return [(torch_s[tuple(r["shape"])] / r["median_s"], tuple(r["shape"])) for r in rows
            if r["backend"] == backend and tuple(r["shape"]) in torch_s]


def _row(target, measured, met):
    return (target, measured, "yes" if met else "**no**")


def _ratio_target(label, ratios, geomean_at_least, worst_at_least):
    if not ratios:
        return []
    geomean, (worst, shape) = _geomean([r for r, _ in ratios]), min(ratios)
    text = f"{geomean:.2f}x, worst {worst:.2f}x ({'x'.join(map(str, shape))})"
    met = geomean >= geomean_at_least and worst >= worst_at_least
    wanted = (f">= {geomean_at_least}x" if geomean_at_least > 0 else "")
    if worst_at_least > 0:
        wanted += (", " if wanted else "") + (
            "no shape slower" if worst_at_least == 1.0 else f"no shape below {worst_at_least}x")
    return [_row(f"{label}: {wanted}", text, met)]


def kernel_targets(results, prefix="#12"):
    """Issue 12's kernel-level targets (2 threads, float32)."""
    rows = []
    for label, op, mode, layout, geomean, worst in [
            ("BatchNorm2d training", "batch_norm_2d", "training", "contiguous", 3.0, 1.5),
            ("BatchNorm2d training, channels-last", "batch_norm_2d", "training",
             "channels_last", 2.0, 1.0),
            ("BatchNorm2d eval", "batch_norm_2d", "eval", "contiguous", 1.5, 1.0),
            ("GroupNorm training", "group_norm", "training", "contiguous", 2.0, 1.0),
            ("GroupNorm eval", "group_norm", "eval", "contiguous", 2.0, 1.0),
            ("GroupNorm training, channels-last", "group_norm", "training", "channels_last",
             2.0, 1.0),
            ("GroupNorm eval, channels-last", "group_norm", "eval", "channels_last", 2.0, 1.0),
            ("LayerNorm training", "layer_norm", "training", "contiguous", 1.8, 0.0),
            ("RMSNorm training", "rms_norm", "training", "contiguous", 0.0, 1.0),
            ("InstanceNorm training", "instance_norm", "training", "contiguous", 0.0, 1.0)]:
        rows += _ratio_target(f"{prefix} {label}", _kernel_ratios(results, op, mode, layout),
                              geomean, worst)
    floors = []
    threads = results["machine"]["threads"]
    records = [r for r in results.get("measurements", []) if r["level"] == "kernel"
               and r["op"] == "batch_norm_2d" and r["threads"] == threads
               and r["nbytes"] >= 0.4e6]
    floor_s = {(r["mode"], r["layout"], tuple(r["shape"])): r["median_s"] for r in records
               if r["backend"] == "floor"}
    for r in records:
        key = (r["mode"], r["layout"], tuple(r["shape"]))
        if r["backend"] == "cython" and key in floor_s:
            floors.append((r["median_s"] / floor_s[key], key))
    if floors:
        worst, (mode, layout, shape) = max(floors)
        rows.append(_row(f"{prefix} BatchNorm2d time / floor <= 2.5x on every shape of 0.4 MB "
                         "and more", f"worst {worst:.2f}x ({mode}, {layout}, "
                         f"{'x'.join(map(str, shape))})", worst <= 2.5))
    numba = _kernel_ratios(results, "batch_norm_2d", "training", "contiguous", "numba")
    cython = dict((shape, ratio) for ratio, shape in
                  _kernel_ratios(results, "batch_norm_2d", "training", "contiguous"))
    if numba and cython:
        slowdown = _geomean([cython[shape] / ratio for ratio, shape in numba if shape in cython])
        rows.append(_row(f"{prefix} numba within 1.3x of cython (BatchNorm2d training)",
                         f"{slowdown:.2f}x", slowdown <= 1.3))
        rows += _ratio_target(f"{prefix} numba BatchNorm2d training", numba, 0.0, 1.0)
    return rows


def network_targets(results):
    """Issue 11's end-to-end and layer targets (2 threads, float32, 112 px)."""
    rows = []
    at = {(r["model"], r["mode"], r["batch"], r["backend"]): r["median_s"]
          for r in results.get("networks", []) if r.get("image_size") == end_to_end.IMAGE_SIZE}

    def speedup(model, mode, batch):
        key = (model, mode, batch)
        if key + ("torch",) in at and key + ("convert",) in at:
            return at[key + ("torch",)] / at[key + ("convert",)]
        return None

    for model, mode, batch, goal in [("mobilenet_v2", "training", 2, 1.25),
                                     ("mobilenet_v2", "training", 8, 1.25),
                                     ("mobilenet_v2", "eval", 2, 1.15),
                                     ("mobilenet_v2", "eval", 8, 1.15),
                                     ("resnet18", "training", 2, 0.98),
                                     ("resnet18", "training", 8, 0.98)]:
        value = speedup(model, mode, batch)
        if value is not None:
            rows.append(_row(f"#11 {end_to_end.MODEL_TITLES[model]} {mode}, N = {batch}, "
                             f"after convert: >= {goal}x torch", f"{value:.2f}x", value >= goal))
    layers = results.get("network_layers", [])
    if layers:
        times = {}
        for r in layers:
            times.setdefault(tuple(r["shape"]), {})[r["backend"]] = r["median_s"]
        ratios = [(t["torch"] / t["default"], shape) for shape, t in times.items()]
        rows += _ratio_target("#11 fastbn.nn.BatchNorm2d training step on the networks' "
                              "BatchNorm shapes, N 1-8", ratios, 2.5, 1.0)
    return rows


def two_core_thread_targets(results):
    """Issue 17's targets on the 2-core machine: the fixed cost of a 1x512x7x7 training
    step, and the 2-thread speed-up over 1 thread on the BatchNorm grid."""
    rows = []
    records = [r for r in results.get("measurements", []) if r["level"] == "kernel"
               and r["op"] == "batch_norm_2d" and r["mode"] == "training"
               and r["layout"] == "contiguous"]
    threads = results["machine"]["threads"]
    at = {(r["backend"], r["threads"], tuple(r["shape"])): r["median_s"] for r in records}
    fixed = (1, 512, 7, 7)
    if ("cython", threads, fixed) in at and ("torch", threads, fixed) in at:
        ours, torch_s = at[("cython", threads, fixed)], at[("torch", threads, fixed)]
        rows.append(_row(f"#17 fixed cost, 1x512x7x7 training step at {threads} threads: "
                         "at most torch's", f"{ours * 1e6:.0f} us against {torch_s * 1e6:.0f} us",
                         ours <= torch_s))
    return rows


def sweep_targets(results):
    """Issue 17's many-core targets, from a thread sweep's summary (`scaling.summarise`)."""
    rows = []
    summary = results.get("sweep", [])
    by = {(r["level"], r["op"], r["backend"], r["threads"]): r for r in summary}
    counts = sorted({r["threads"] for r in summary})
    for op, goal in [("batch_norm_2d", 2.0), ("group_norm", 1.5), ("layer_norm", 1.2)]:
        ratios = [(by[("kernel", op, "cython", t)]["over_torch"], t) for t in counts
                  if ("kernel", op, "cython", t) in by]
        if ratios:
            worst, at_count = min(ratios)
            rows.append(_row(f"#17 {op} kernel >= {goal}x torch at every thread count",
                             ", ".join(f"{t}: {r:.2f}x" for r, t in sorted(ratios, key=lambda x: x[1]))
                             , worst >= goal))
    top = max(counts) if counts else None
    ours, theirs = by.get(("kernel", "batch_norm_2d", "cython", top)), by.get(
        ("kernel", "batch_norm_2d", "torch", top))
    if ours and theirs and ours["speedup"] and theirs["speedup"]:
        rows.append(_row(f"#17 fastbn's BatchNorm2d speed-up at {top} threads >= torch's",
                         f"{ours['speedup']:.2f} against {theirs['speedup']:.2f}",
                         ours["speedup"] >= theirs["speedup"]))
    for (level, op, layout, mode), group in _networks(summary).items():
        model, batch = op, layout
        ratios = {r["threads"]: r["over_torch"] for r in group if r["backend"] == "convert"}
        if not ratios:
            continue
        goal = 1.0 if batch == "batch 2" else (1.1 if model == "resnet50" else 1.15)
        wanted = [t for t in ratios if t >= 4] if goal > 1.0 else list(ratios)
        met = all(ratios[t] >= goal for t in wanted) and all(r >= 1.0 for r in ratios.values())
        rows.append(_row(f"#17 {model} {mode}, {batch}, after convert: >= {goal}x torch at "
                         f"{', '.join(map(str, sorted(wanted)))} threads, never slower",
                         ", ".join(f"{t}: {ratios[t]:.2f}x" for t in sorted(ratios)), met))
    return rows


def _networks(summary):
    groups = {}
    for r in summary:
        if r["level"] == "network":
            groups.setdefault((r["level"], r["op"], r["layout"], r["mode"]), []).append(r)
    return groups


def table(results):
    """Markdown lines: every target this run can check."""
    if "sweep" in results:  # a thread sweep: every count's records, issue 17's targets
        rows = sweep_targets(results)
    else:
        rows = (network_targets(results) + kernel_targets(results)
                + two_core_thread_targets(results))
    if not rows:
        return []
    return (["| target | measured | met |", "|---|---|---|"]
            + [f"| {target} | {measured} | {met} |" for target, measured, met in rows])
