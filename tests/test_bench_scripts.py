"""The benchmark scripts behind docs/small_batch.md and docs/frn_evonorm.md write the
results files their pages are generated from (fastbn/benchmarks/layer_runs.py): tiny runs
(one layer, one small shape, one round), then the file as `python -m fastbn docs` reads it."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fastbn.benchmarks import docs, layer_runs

torch = pytest.importorskip("torch")
pytest.importorskip("fastbn._cython._batch_norm")

TIMING_KEYS = {"median_s", "q1_s", "q3_s", "min_s", "max_s", "rounds", "calls_per_round"}


def script(name):
    """bench/NAME.py as a module (bench/ is not a package)."""
    path = os.path.join(docs.REPOSITORY, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def threads():
    """The scripts set torch's and fastbn's thread counts: put them back afterwards."""
    import fastbn

    before = torch.get_num_threads(), fastbn.get_num_threads()
    yield 1
    torch.set_num_threads(before[0])
    fastbn.set_num_threads(before[1])


def check_file(path, argv, script_name, implementations):
    with open(path) as file:
        results = json.load(file)
    assert set(results) == {"machine", "environment", "command", "settings", "measurements"}
    assert results["machine"]["cpu"] and results["machine"]["threads"] == 1
    assert results["command"] == f"python bench/{script_name}.py " + " ".join(argv)
    assert [r["implementation"] for r in results["measurements"]] == implementations
    return results


def test_compare_small_batch_writes_its_results(tmp_path, threads, capsys):
    path = tmp_path / "small_batch.json"
    argv = ["--threads", "1", "--repeats", "1", "--layers", "batch_renorm", "--backend",
            "cython", "--shapes", "2x16x4x4", "--output", str(path)]
    assert script("compare_small_batch").main(argv) == 0
    results = check_file(path, argv, "compare_small_batch", ["torch", "cython", "default"])
    for record in results["measurements"]:
        assert set(record) == {"layer", "shape", "dtype", "layout", "mode", "threads",
                               "implementation"} | TIMING_KEYS
        assert (record["layer"], record["shape"], record["dtype"], record["layout"],
                record["threads"], record["rounds"]) == (
                    "batch_renorm", [2, 16, 4, 4], "float32", "contiguous", 1, 1)
        assert record["min_s"] > 0
    assert results["settings"]["estimate"] == "min"
    lines = layer_runs.plain_torch_table(results)
    assert any(line.startswith("| Batch Renorm (r_max = 3.0, d_max = 5.0) | contiguous "
                               "| cython |") for line in lines)
    assert "wrote " + str(path) in capsys.readouterr().out


def test_compare_frn_evonorm_writes_its_results(tmp_path, threads):
    path = tmp_path / "frn_evonorm.json"
    argv = ["--threads", "1", "--rounds", "1", "--ops", "evonorm_s0", "--channels-last",
            "--shapes", "1x32x2x2", "--output", str(path)]
    assert script("compare_frn_evonorm").main(argv) == 0
    results = check_file(path, argv, "compare_frn_evonorm", ["torch", "cython"])
    assert {(r["layer"], tuple(r["shape"]), r["layout"]) for r in results["measurements"]} \
        == {("evonorm_s0", (1, 32, 2, 2), "channels_last")}
    assert results["settings"]["estimate"] == "median"
    assert "**EvoNorm-S0 (groups = 32, eps = 1e-05), channels_last**" in \
        layer_runs.plain_torch_table(results)


def test_sync_overhead_writes_its_results(tmp_path):
    """Two gloo processes (a subprocess: mp.spawn needs the script as __main__)."""
    path = tmp_path / "sync.json"
    argv = ["--threads", "1", "--blocks", "2", "--block-ms", "1", "--shapes", "1x16x4x4",
            "--output", str(path)]
    environment = dict(os.environ, PYTHONPATH=docs.REPOSITORY)
    subprocess.run([sys.executable, os.path.join("bench", "sync_overhead.py")] + argv,
                   cwd=docs.REPOSITORY, env=environment, check=True, timeout=300,
                   capture_output=True)
    results = check_file(path, argv, "sync_overhead", ["local", "sync", "collectives"])
    sync = results["measurements"][1]
    assert (sync["bytes_all_gathered"], sync["bytes_all_reduced"]) == (2 * 33 * 8, 32 * 8)
    for record in results["measurements"]:
        assert record["shape"] == [1, 16, 4, 4] and record["processes"] == 2
        assert len(record["block_s"]) == 2 and record["min_s"] == min(record["block_s"])
    assert layer_runs.sync_table(results)[-1].startswith("SyncBatchNorm's overhead")


def test_a_shape_argument_is_sizes_joined_by_x():
    assert layer_runs.parse_shape("1x16x8x8") == (1, 16, 8, 8)
    for text in ["", "1x0x8", "1xx8", "a"]:
        with pytest.raises(ValueError, match="positive sizes joined by 'x'"):
            layer_runs.parse_shape(text)


def test_the_recorded_command_carries_the_settings_it_depends_on(monkeypatch):
    for name in layer_runs.ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert layer_runs.command("bench/x.py", ["--output", "a b.json"]) == (
        "MALLOC_MMAP_THRESHOLD_=1073741824 python bench/x.py --output 'a b.json'")
