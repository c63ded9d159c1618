"""Every benchmark figure in docs/ and the README comes from a recorded results file
(fastbn/benchmarks/docs.py): the pages must match what `python -m fastbn docs` writes."""
import json
import os

import pytest

from fastbn.benchmarks import docs, layer_runs, targets

RESULTS = os.path.join(docs.REPOSITORY, docs.RESULTS_DIR)


def blocks():
    found = []
    for path in docs._pages(docs.REPOSITORY):
        with open(path) as file:
            found += [(os.path.relpath(path, docs.REPOSITORY), m.group(2), m.group(3))
                      for m in docs.BLOCK.finditer(file.read())]
    return found


def test_every_page_matches_its_results():
    assert docs.regenerate(write=False) == [], (
        "a page's generated figures differ from docs/benchmarks/*.json: "
        "run `python -m fastbn docs`")


def test_the_documented_figures_have_their_blocks():
    """The pages that quote benchmark figures do it through blocks, each naming a results
    file that exists and names its machine."""
    found = blocks()
    kinds = {(page, kind) for page, kind, _ in found}
    for page, kind in [("docs/benchmarks.md", "machine"), ("docs/benchmarks.md", "targets"),
                       ("docs/benchmarks.md", "networks"), ("docs/nn.md", "costs"),
                       ("README.md", "networks"), ("docs/small_batch.md", "plain_torch"),
                       ("docs/small_batch.md", "sync"), ("docs/frn_evonorm.md", "plain_torch")]:
        assert (page, kind) in kinds, f"{page} has no '{kind}' block"
    for _, _, source in found:
        with open(os.path.join(RESULTS, f"{source}.json")) as file:
            assert json.load(file)["machine"]["cpu"]


def test_a_block_is_rewritten_from_its_results(tmp_path):
    (tmp_path / "docs" / "benchmarks").mkdir(parents=True)
    results = {"machine": {"cpu": "Test CPU", "vector_extensions": ["avx2", "fma"],
                           "caches": {"L2": "1024K"}, "usable_cpus": 2, "threads": 2,
                           "torch": "2.13.0"},
               "networks": [dict(model="resnet18", mode="training", batch=2, image_size=112,
                                 dtype="float32", threads=2, backend=name, median_s=median,
                                 q1_s=median, q3_s=median)
                            for name, median in [("torch", 0.1), ("convert", 0.08),
                                                 ("no_batch_norm", 0.07),
                                                 ("no_batch_norm_activation", 0.06)]]}
    with open(tmp_path / "docs" / "benchmarks" / "run.json", "w") as file:
        json.dump(results, file)
    page = tmp_path / "README.md"
    page.write_text("intro\n<!-- fastbn-docs: machine run -->\nstale\n<!-- /fastbn-docs -->\n"
                    "<!-- fastbn-docs: targets run -->\n<!-- /fastbn-docs -->\nend\n")
    assert docs.regenerate(tmp_path, write=False) == ["README.md"]
    assert docs.regenerate(tmp_path) == ["README.md"]
    text = page.read_text()
    assert "Measured on: Test CPU, AVX2 + FMA, L2 1024K, 2 usable CPUs" in text
    assert "| #11 ResNet-18 training, N = 2, after convert: >= 0.98x torch | 1.25x | yes |" in text
    assert "stale" not in text and text.endswith("end\n")
    assert docs.regenerate(tmp_path, write=False) == []


def test_targets_say_no_where_a_target_is_missed():
    results = {"machine": {"threads": 2}, "measurements": [
        dict(level="kernel", op="batch_norm_2d", mode="training", layout="contiguous",
             shape=shape, threads=2, backend=backend, median_s=median, nbytes=8e6)
        for shape, backend, median in [([8, 64, 56, 56], "torch", 3.0),
                                       ([8, 64, 56, 56], "cython", 1.0),
                                       ([1, 512, 7, 7], "torch", 1.0),
                                       ([1, 512, 7, 7], "cython", 1.2)]]}
    rows = {row[0]: row for row in targets.kernel_targets(results)}
    row = rows["#12 BatchNorm2d training: >= 3.0x, no shape below 1.5x"]
    assert row[1].startswith("1.58x, worst 0.83x (1x512x7x7)") and row[2] == "**no**"
    fixed = targets.two_core_thread_targets(results)[0]
    assert fixed[1] == "1200000 us against 1000000 us" and fixed[2] == "**no**"


@pytest.mark.parametrize("argv, code", [(["--check"], 0)])
def test_docs_command(argv, code, capsys):
    assert docs.main(argv) == code


def _plain_torch_results(estimate="min"):
    """A run of two shapes: fastbn's cython 2x / 4x (fastest rounds) over the plain layer,
    the medians telling another story, so the statistic used shows in the table."""
    records = []
    for shape, times in [([1, 16, 8, 8], {"torch": 4e-4, "cython": 2e-4, "default": 5e-4}),
                         ([8, 64, 56, 56], {"torch": 8e-3, "cython": 2e-3, "default": 2e-3})]:
        for name, fastest in times.items():
            median = fastest * (3.0 if name == "torch" else 1.5)
            records.append(dict(layer="ghost_batch_norm", shape=shape, dtype="float32",
                                layout="contiguous", mode="training", threads=2,
                                implementation=name, median_s=median, q1_s=median * 0.9,
                                q3_s=median * 1.2, min_s=fastest, max_s=median * 2,
                                rounds=40, calls_per_round=1))
    return {"machine": {"threads": 2}, "command": "python bench/compare_small_batch.py",
            "environment": ["threads: 2", "CPUs used by other processes: 1.50 of 2 (over 0.5 "
                            "s before the run) -- BUSY MACHINE"],
            "settings": {"threads": 2, "rounds": 40, "estimate": estimate, "clock": "wall",
                         "parameters": {"ghost_batch_norm": {"k": 2}}},
            "measurements": records}


def test_plain_torch_block_gives_geometric_means_worst_shapes_and_every_shape():
    lines = layer_runs.plain_torch_table(_plain_torch_results())
    assert "each time is the fastest of 40 interleaved rounds" in lines[0]
    assert lines[0].endswith("row. CPUs used by other processes: 1.50 of 2 (over 0.5 s before "
                             "the run) -- BUSY MACHINE. Recorded by "
                             "`python bench/compare_small_batch.py`.")
    assert "| Ghost BatchNorm (k = 2) | contiguous | cython | 2.83x, worst 2.00x (1x16x8x8) " \
        "| yes |" in lines
    assert "| Ghost BatchNorm (k = 2) | contiguous | default | 1.79x, worst 0.80x (1x16x8x8) " \
        "| **no** |" in lines
    assert "**Ghost BatchNorm (k = 2), contiguous**" in lines
    assert "| 8x64x56x56 | 8000 us | 2000 us | 4.00x | 2000 us | 4.00x | 30% |" in lines
    medians = layer_runs.plain_torch_table(_plain_torch_results("median"))
    assert "each time is the median of 40 interleaved rounds" in medians[0]
    assert "| 8x64x56x56 | 24000 us | 3000 us | 8.00x | 3000 us | 8.00x | 30% |" in medians


def test_sync_block_gives_the_overhead_per_shape_and_its_range():
    records = []
    for shape, times in [([1, 64, 56, 56], {"local": 1e-3, "sync": 3e-3, "collectives": 5e-4}),
                         ([8, 512, 7, 7], {"local": 2e-3, "sync": 2.5e-3,
                                           "collectives": 7e-4})]:
        for name, best in times.items():
            record = dict(shape=shape, dtype="float32", layout="contiguous", processes=2,
                          threads=1, rank=0, implementation=name, min_s=best,
                          block_s=[best, best * 2], calls_per_block=10)
            if name == "sync":
                record.update(bytes_all_gathered=2 * (2 * shape[1] + 1) * 8,
                              bytes_all_reduced=2 * shape[1] * 8)
            records.append(record)
    lines = layer_runs.sync_table({
        "command": "python bench/sync_overhead.py",
        "settings": {"processes": 2, "threads": 1, "blocks": 7, "backend": "cython"},
        "measurements": records})
    assert lines[0].startswith("2 gloo processes x 1 thread(s), backend cython")
    assert "| 1x64x56x56 | 1000 us | 3000 us | +2000 us (3.00x) | 500 us | 2064 | 1024 |" in lines
    assert "| 8x512x7x7 | 2000 us | 2500 us | +500 us (1.25x) | 700 us | 16400 | 8192 |" in lines
    assert lines[-1] == ("SyncBatchNorm's overhead over the local layer: +500 to +2000 us per "
                         "layer and step (1.25x to 3.00x the local step); the two collectives "
                         "alone: 500 to 700 us.")


def test_a_block_whose_file_is_not_recorded_is_left_and_listed(tmp_path, capsys):
    (tmp_path / "docs" / "benchmarks").mkdir(parents=True)
    with open(tmp_path / "docs" / "benchmarks" / "small_batch.json", "w") as file:
        json.dump(_plain_torch_results(), file)
    page = tmp_path / "docs" / "page.md"
    missing = "<!-- fastbn-docs: sync sync -->\nas written\n<!-- /fastbn-docs -->\n"
    page.write_text(missing + "<!-- fastbn-docs: plain_torch small_batch -->\nstale\n"
                    "<!-- /fastbn-docs -->\n")
    assert docs.unrecorded(tmp_path) == [("docs/page.md", "sync")]
    # the recorded file's block is still compared and rewritten; the other one is kept
    assert docs.regenerate(tmp_path, write=False) == ["docs/page.md"]
    assert docs.regenerate(tmp_path) == ["docs/page.md"]
    text = page.read_text()
    assert text.startswith(missing) and "stale" not in text and "| 8x64x56x56 |" in text
    assert docs.regenerate(tmp_path, write=False) == []
