"""The small-batch study (fastbn/study/, `python -m fastbn study`): a tiny study end to end,
its outputs, reruns with the same seed, --resume, and the errors for bad options.

The tiny study trains on 256 of scikit-learn's 8x8 digits for one epoch, so the whole
file takes seconds, most of them the two processes of the scale-out run starting.
"""
import csv
import dataclasses
import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import fastbn.study  # noqa: E402
from fastbn.__main__ import main as fastbn_main  # noqa: E402
from fastbn.study import data, experiments, runner  # noqa: E402

TINY = dict(dataset="digits", train_size=256, test_size=128, epochs=1, seeds=(0, 1),
            norms=("batchnorm", "ghost", "groupnorm", "none"), batch_sizes=(8, 32),
            ghost_size=8, norm_batch_sgd_batch=16, ghost_sizes=(1, 16),
            scale_out_batch_sizes=(8,), cost_rounds=2, cost_images=32)
OUTPUTS = ("results.csv", "results.json", "report.md", "accuracy_vs_batch_size.png",
           "accuracy_vs_norm_batch_size.png", "evaluation_statistics.png", "scale_out.png",
           "time_per_epoch.png")
# What a rerun may change: the clocks.
TIMES = ("train_time_s", "time_per_epoch_s", "time_per_step_ms", "cell_time_s")


def numbers(row):
    return {key: value for key, value in row.items() if key not in TIMES}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    output = tmp_path_factory.mktemp("study")
    return output, fastbn.study.run(output, progress=False, **TINY)


def test_tiny_study_writes_every_output(tiny):
    output, result = tiny
    config = experiments.StudyConfig(**TINY)
    cells = experiments.plan(config)
    assert len(result.ran) == len(cells) and not result.cached
    for name in OUTPUTS:
        path = output / name
        assert path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(output / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(result.rows)
    # one row per run: sweep (ghost only above its virtual batch), normalization-batch,
    # the 2-process runs and their references, and per cost cell 2 implementations x rounds
    experiments_run = [row["experiment"] for row in rows]
    assert experiments_run.count("cost") == 2 * 2 * len(TINY["norms"]) * len(TINY["batch_sizes"])
    assert experiments_run.count("scale_out") == 2 * len(TINY["seeds"])
    for row in rows:
        if row["experiment"] == "train" and row["norm"] in ("batchnorm", "ghost"):
            for column in ("accuracy", "accuracy_precise_bn", "accuracy_batch_stats"):
                assert 0.0 <= float(row[column]) <= 100.0
        if row["experiment"] == "train":
            assert row["dataset"] == "digits" and row["seed"] in ("0", "1")
    stored = json.loads((output / "results.json").read_text())
    assert stored["config"]["norms"] == list(TINY["norms"])
    assert stored["machine"]["cpu"]
    report = (output / "report.md").read_text()
    for heading in ("## 1. Batch-size sweep", "## 2. Normalization batch sweep",
                    "## 3. Evaluation statistics", "## 4. Scale-out", "## 5. Cost"):
        assert heading in report
    assert "Ghost BatchNorm b=32" in report and "SyncBatchNorm, 2 processes x 8" in report
    # the cells are cached and nothing is left of the process group's store
    cached = sorted(os.listdir(output / runner.CELLS_DIRECTORY))
    assert cached == sorted(experiments.cell_key(cell) + ".json" for cell in cells)


def test_sync_batch_norm_run_is_the_single_process_run_at_twice_the_batch(tiny):
    """2 processes x 8 with SyncBatchNorm take the images of the 1-process run at 16 and
    compute the same statistics: the same numbers up to rounding (the gradient is averaged
    over processes); local BatchNorm normalizes over 8 and differs."""
    _, result = tiny
    by = {(r["norm"], r["batch_size"], r["processes"], r["seed"]): r for r in result.rows
          if r["experiment"] in ("train", "scale_out")}
    for seed in TINY["seeds"]:
        sync, single = by[("sync", 16, 2, seed)], by[("batchnorm", 16, 1, seed)]
        local = by[("batchnorm", 16, 2, seed)]
        assert sync["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
        assert abs(sync["train_loss"] - local["train_loss"]) > 1e-3
        assert sync["norm_batch_size"] == 16 and local["norm_batch_size"] == 8


def test_same_seed_same_numbers(tiny):
    _, result = tiny
    dataset = data.load("digits", TINY["train_size"], TINY["test_size"])
    config = experiments.StudyConfig(**TINY)
    for norm, extra in (("batchnorm", {}), ("ghost", {"virtual_batch_size": 1})):
        cell = config.run(norm, 16, 0, **extra)
        first = experiments.run_training_cell(cell, dataset)[0]
        again = experiments.run_training_cell(cell, dataset)[0]
        assert numbers(first) == numbers(again)
    # and the same as the study's run of that cell, in another process order
    stored = [r for r in result.rows if r["experiment"] == "train" and r["norm"] == "ghost"
              and r["virtual_batch_size"] == 1 and r["seed"] == 0]
    assert numbers(first) == {k: v for k, v in numbers(stored[0]).items() if k != "cell"}
    other = experiments.run_training_cell(dataclasses.replace(cell, seed=5), dataset)[0]
    assert other["train_loss"] != first["train_loss"]


def test_resume_reruns_nothing_that_finished_and_runs_what_is_missing(tiny):
    output, result = tiny
    again = fastbn.study.run(output, resume=True, progress=False, **TINY)
    assert again.ran == [] and sorted(again.cached) == sorted(result.ran)
    assert [numbers(r) for r in again.rows] == [numbers(r) for r in result.rows]
    missing = next(r["cell"] for r in result.rows
                   if r["experiment"] == "train" and r["norm"] == "groupnorm")
    os.remove(output / runner.CELLS_DIRECTORY / (missing + ".json"))
    third = fastbn.study.run(output, resume=True, progress=False, **TINY)
    assert third.ran == [missing]
    assert [numbers(r) for r in third.rows] == [numbers(r) for r in result.rows]
    # a changed setting is another cell: no training cell of the cache matches it; the
    # cost cells, which do not depend on the epochs, still do
    cells_directory = output / runner.CELLS_DIRECTORY
    for cell in experiments.plan(experiments.StudyConfig(**dict(TINY, epochs=2))):
        cached = experiments.read_cell(cells_directory, cell)
        assert (cached is None) == (cell.experiment != "cost")


@pytest.mark.parametrize("settings, message", [
    ({"norms": ("batchnorm", "bogus")},
     "unknown norm 'bogus'; the study's norms are batchnorm, ghost, renorm, groupnorm, "
     "layernorm, instancenorm, frn, evonorm_s0, none"),
    ({"batch_sizes": (8, 0)}, "batch sizes must be >= 1, got 0 (batch_sizes)"),
    ({"ghost_sizes": (-1,)}, "batch sizes must be >= 1, got -1 (ghost_sizes)"),
    ({"dataset": "cifar10"},
     "unknown dataset 'cifar10'; the datasets are mnist, mnist-affine, digits"),
    ({"model": "resnet"}, "unknown model 'resnet'; the models are cnn, mobilenet"),
    ({"experiments": ("sweep", "nope")}, "unknown experiment 'nope'"),
    ({"seeds": ()}, "seeds is empty"),
    ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ({"dataset": "digits", "batch_sizes": (2, 2048)},
     "batch size 2048 is larger than the 1438 training images of 'digits'"),
])
def test_bad_options_raise_before_anything_runs(tmp_path, settings, message):
    output = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        fastbn.study.run(output, progress=False, **settings)
    assert message in str(error.value)
    assert not output.exists()


def test_output_path_that_is_a_file(tmp_path):
    path = tmp_path / "results"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        fastbn.study.run(path, quick=True, progress=False)
    assert path.read_text() == "not a directory"


def test_command_line_errors(tmp_path, capsys):
    for argv, message in (
            (["--norms", "batchnorm,nonorm"], "unknown norm 'nonorm'; the study's norms are "),
            (["--batch-sizes", "0,4"], "batch sizes must be >= 1, got 0"),
            (["--batch-sizes", "4,x"], "expected comma-separated integers, got '4,x'"),
            (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
            (["--output", str(tmp_path / "file")], "exists and is not a directory")):
        (tmp_path / "file").write_text("")
        with pytest.raises(SystemExit) as exit_:
            fastbn_main(["study", "--quick", "--no-progress", "--output",
                         str(tmp_path / "out")] + argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_train_images_table_matches_the_datasets():
    """The table that refuses batches larger than the training set before anything loads
    (MNIST's, 80 % of 500 images per digit, is not loaded here: seconds of CSV parsing)."""
    assert data.load("digits").train_x.shape[0] == data.TRAIN_IMAGES["digits"]
    assert data.TRAIN_IMAGES["mnist"] == data.TRAIN_IMAGES["mnist-affine"] == 10 * 400


def test_mobilenet_and_torch_implementation_build_and_agree_at_initialisation():
    from fastbn.study import models

    x = torch.randn(4, 1, 28, 28)
    for model in models.MODELS:
        for norm in models.NORMS:
            outputs = []
            for implementation in models.IMPLEMENTATIONS:
                torch.manual_seed(3)
                net = models.build(model, norm, virtual_batch_size=2,
                                   implementation=implementation)
                outputs.append(net(x))
            # the same initial weights and the same layers: the same outputs in training mode
            torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
