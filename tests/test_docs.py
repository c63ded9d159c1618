"""Every benchmark figure in docs/ and the README comes from a recorded results file
(fastbn/benchmarks/docs.py): the pages must match what `python -m fastbn docs` writes."""
import json
import os

import pytest

from fastbn.benchmarks import docs, targets

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
                       ("README.md", "networks")]:
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
