"""Every published figure from one recorded run: `python -m fastbn docs`.

The benchmark figures in docs/ and the README live in generated blocks,

    <!-- fastbn-docs: KIND SOURCE -->
    ...
    <!-- /fastbn-docs -->

whose content this module writes from the results files a benchmark run saved under
docs/benchmarks/ (SOURCE names one: ``results`` is docs/benchmarks/results.json). Each
file names the machine it was measured on (`machine.describe`), and every block says it.
So a figure cannot differ between pages: there is one file, and one function per kind
of block. tests/test_docs.py regenerates every block and fails if a page differs.

Kinds:
- ``machine``: the machine line;
- ``kernel`` / ``module``: geometric-mean speedups over torch per op, layout and mode
  (worst shape too) at that level;
- ``networks``: the end-to-end table;
- ``costs``: what each part of fastbn.nn's path costs (per call; inside a network);
- ``targets``: the issues' speed targets this run can check, measured and met or not;
- ``sweep``: the thread-sweep table;
- ``report``: every table of the run (docs/benchmarks/report.md);
- ``plain_torch``: fastbn.nn layers against the same layers in plain torch ops, from the
  files of bench/compare_small_batch.py and bench/compare_frn_evonorm.py
  (`layer_runs.plain_torch_table`);
- ``sync``: SyncBatchNorm against a local BatchNorm, from bench/sync_overhead.py's file
  (`layer_runs.sync_table`).

A block whose results file does not exist (yet: pages name the files before the run that
records them) is left as it is, and `python -m fastbn docs` lists it as not recorded;
tests/test_docs.py fails until every file a page names is recorded. A file that exists
is always rendered and compared.
"""
import argparse
import json
import math
import os
import re
import sys

from fastbn.benchmarks import costs, end_to_end, layer_runs, machine, scaling, targets

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = os.path.join("docs", "benchmarks")
PAGES = ("README.md", "docs")
BLOCK = re.compile(r"(<!-- fastbn-docs: (\w[\w-]*) ([\w.-]+) -->\n)(.*?)(<!-- /fastbn-docs -->)",
                   re.DOTALL)


def source_path(source, root=REPOSITORY):
    """The path of the results file `source` (a name under docs/benchmarks/, without .json)."""
    return os.path.join(root, RESULTS_DIR, f"{source}.json")


def load(source, root=REPOSITORY):
    """The results file `source` (a name under docs/benchmarks/, without .json)."""
    with open(source_path(source, root)) as file:
        return json.load(file)


def _geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


def level_summary(results, level):
    """Markdown lines: per op, layout and mode, each implementation's geometric-mean
    speedup over torch and its worst shape, from the records at the run's thread count."""
    threads = results["machine"]["threads"]
    records = [r for r in results["measurements"]
               if r["level"] == level and r["threads"] == threads]
    torch_s = {(r["op"], r["layout"], r["mode"], tuple(r["shape"])): r["median_s"]
               for r in records if r["backend"] == "torch"}
    groups = {}
    for r in records:
        if r["backend"] in ("torch", "floor"):
            continue
        key = (r["op"], r["layout"], r["mode"], r["backend"])
        shape = tuple(r["shape"])
        groups.setdefault(key, []).append(
            (torch_s[key[:3] + (shape,)] / r["median_s"], shape))
    lines = ["| op | layout | mode | implementation | speedup over torch (geometric mean) "
             "| worst shape |", "|---|---|---|---|---|---|"]
    for (op, layout, mode, backend), ratios in groups.items():
        worst, shape = min(ratios)
        lines.append(f"| {op} | {layout} | {mode} | {backend} | "
                     f"{_geomean([r for r, _ in ratios]):.2f}x | {worst:.2f}x "
                     f"({'x'.join(map(str, shape))}) |")
    return lines


def render(kind, source, root=REPOSITORY):
    """The lines of one block."""
    results = load(source, root)
    if kind == "machine":
        return [f"Measured on: {machine.summary(results['machine'])} "
                f"(`docs/benchmarks/{source}.json`)."]
    if kind in ("kernel", "module"):
        return level_summary(results, kind)
    if kind == "networks":
        return end_to_end.table(results["networks"])[2:]  # the caller's page has a heading
    if kind == "layers":
        from fastbn.benchmarks.report import network_layers_table

        return network_layers_table(results.get("network_layers", []))[2:]
    if kind == "targets":
        return targets.table(results)
    if kind == "costs":
        return costs.table(results["costs"])[2:]
    if kind == "sweep":
        return scaling.table(results["sweep"])[2:]
    if kind == "plain_torch":
        return layer_runs.plain_torch_table(results)
    if kind == "sync":
        return layer_runs.sync_table(results)
    if kind == "report":
        from fastbn.benchmarks.report import tables

        return (tables(results["measurements"], results["machine"]["threads"])
                + end_to_end.table(results["networks"]) + costs.table(results.get("costs", {})))
    raise ValueError(f"unknown block kind {kind!r}")


def _pages(root):
    for page in PAGES:
        path = os.path.join(root, page)
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.endswith(".md"):
                    yield os.path.join(path, name)
            sub = os.path.join(path, "benchmarks")
            if os.path.isdir(sub):
                for name in sorted(os.listdir(sub)):
                    if name.endswith(".md"):
                        yield os.path.join(sub, name)
        elif os.path.exists(path):
            yield path


def regenerate(root=REPOSITORY, write=True):
    """Rewrite every block of every page from its results file. Returns the pages whose
    blocks differed (with `write=False` nothing is written: a check)."""
    changed = []
    for path in _pages(root):
        with open(path) as file:
            text = file.read()

        def fill(match):
            if not os.path.exists(source_path(match.group(3), root)):
                return match.group(0)  # not recorded yet: `unrecorded` lists it
            lines = render(match.group(2), match.group(3), root)
            return match.group(1) + "\n".join(lines) + "\n" + match.group(5)

        new = BLOCK.sub(fill, text)
        if new != text:
            changed.append(os.path.relpath(path, root))
            if write:
                with open(path, "w") as file:
                    file.write(new)
    return changed


def unrecorded(root=REPOSITORY):
    """[(page, source)] for each page and results file it names that does not exist."""
    missing = []
    for path in _pages(root):
        with open(path) as file:
            for match in BLOCK.finditer(file.read()):
                if not os.path.exists(source_path(match.group(3), root)):
                    missing.append((os.path.relpath(path, root), match.group(3)))
    return list(dict.fromkeys(missing))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fastbn docs", description="Regenerate the figures of docs/ and the README from "
        "the results files under docs/benchmarks/ (see fastbn/benchmarks/docs.py).")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a page differs from its results")
    args = parser.parse_args(argv)
    changed = regenerate(write=not args.check)
    for path in changed:
        print(f"{'differs' if args.check else 'rewrote'}: {path}")
    for page, source in unrecorded():
        print(f"not recorded yet, left as it is: {os.path.join(RESULTS_DIR, source)}.json "
              f"(named in {page})")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
