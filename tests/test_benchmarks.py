"""The benchmark building blocks: the copy kernel behind the floor, interleaved timing,
the byte model and the check that guards every benchmark against a wrong result."""
import json

import numpy as np
import pytest

from fastbn.benchmarks import batch_norm, end_to_end, modules, norms, report, shapes
from fastbn.benchmarks.timing import alternate

_memory = pytest.importorskip("fastbn._cython._memory")


@pytest.mark.parametrize("n_threads", [1, 2, 3, 64])
@pytest.mark.parametrize("size", [0, 1, 63, 65, 100_003])
def test_parallel_copy_copies_every_byte(rng, size, n_threads):
    src = rng.standard_normal(size).astype(np.float32)
    dst = np.full_like(src, np.nan)
    _memory.parallel_copy(src, dst, n_threads)
    np.testing.assert_array_equal(dst, src)


def test_parallel_copy_copies_between_dtypes_by_bytes(rng):
    src = rng.standard_normal((4, 5))
    dst = np.zeros(src.nbytes, np.uint8)
    _memory.parallel_copy(src, dst, 2)
    np.testing.assert_array_equal(dst.view(np.float64).reshape(4, 5), src)


@pytest.mark.parametrize("src, dst, message", [
    (np.zeros(8), np.zeros(7), "bytes"),
    (np.zeros((4, 4))[:, ::2], np.zeros(8), "C-contiguous"),
])
def test_parallel_copy_rejects_mismatched_buffers(src, dst, message):
    with pytest.raises(ValueError, match=message):
        _memory.parallel_copy(src, dst, 2)


def test_parallel_copy_rejects_zero_threads():
    with pytest.raises(ValueError, match="n_threads"):
        _memory.parallel_copy(np.zeros(4), np.zeros(4), 0)


def test_alternate_warms_up_then_times_every_implementation():
    calls = {"a": 0, "b": 0}

    def counter(name):
        def call():
            calls[name] += 1
        return call

    timings = alternate({"a": counter("a"), "b": counter("b")}, repeats=5, warmup=2,
                        min_round_s=0.0)
    assert list(timings) == ["a", "b"]
    for name, timing in timings.items():
        assert timing.rounds == 5 and timing.calls_per_round == 1
        assert calls[name] == 2 + 5
        assert 0 < timing.min_s <= timing.q1_s <= timing.median_s <= timing.q3_s <= timing.max_s


def test_alternate_does_not_keep_an_implementation_behind_the_same_one():
    """A call pays for what the one before it left behind: no implementation may always
    follow the same other one (as a rotating fixed order would do)."""
    order = []
    callables = {name: (lambda name=name: order.append(name)) for name in "abcd"}
    alternate(callables, repeats=40, warmup=1, min_round_s=0.0)
    timed = order[len(callables):]  # after the warm-up round
    predecessors = {name: set() for name in callables}
    for before, after in zip(timed, timed[1:]):
        predecessors[after].add(before)
    assert all(len(names - {name}) >= 3 for name, names in predecessors.items())


@pytest.mark.parametrize("channels_last", [False, True])
def test_case_inputs_have_the_requested_layout(channels_last):
    case = batch_norm.BatchNormCase((2, 3, 4, 5), "float64", channels_last)
    for array in (case.x, case.grad_out):
        assert array.shape == (2, 3, 4, 5)
        assert np.moveaxis(array, 1, -1).flags.c_contiguous == channels_last
        assert array.flags.c_contiguous != channels_last


def test_bytes_moved_convention():
    assert batch_norm.bytes_moved(100, "training") == 500
    assert batch_norm.bytes_moved(100, "eval") == 200


def test_grids_hold_the_resnet_shapes():
    assert (8, 64, 56, 56) in shapes.BATCH_NORM_2D.shapes()
    assert (1, 16, 8, 8) in shapes.BATCH_NORM_2D.shapes()
    assert len(shapes.BATCH_NORM_2D.shapes()) == 4 * 4 + 1


@pytest.mark.parametrize("mode", batch_norm.MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_case_check_accepts_a_match_and_rejects_a_wrong_result(mode, channels_last):
    case = batch_norm.BatchNormCase((2, 3, 4, 5), "float32", channels_last)
    outputs = case.fastbn_step("numpy", mode)()
    case.check(outputs, outputs, mode)
    wrong = [np.array(a, copy=True) for a in outputs]
    wrong[0].flat[7] += 1e-2
    with pytest.raises(AssertionError, match="differs from torch"):
        case.check(wrong, outputs, mode)


def test_every_op_grid_has_a_quick_grid_and_the_issue_shapes():
    assert set(shapes.QUICK_GRIDS) == set(shapes.GRIDS)
    assert len(shapes.GROUP_NORM_2D.shapes()) == 4 * 4
    assert (8, 512, 7, 7) in shapes.GROUP_NORM_2D.shapes()
    assert shapes.LAYER_NORM.shapes()[0] == (1, 128, 256)
    assert (8, 128, 768) in shapes.LAYER_NORM.shapes()


@pytest.mark.parametrize("op, shape, channels_last", [
    ("group_norm", (2, 64, 3, 4), False),
    ("group_norm", (2, 64, 3, 4), True),
    ("instance_norm", (2, 3, 4, 5), False),
    ("layer_norm", (2, 3, 16), False),
    ("rms_norm", (2, 3, 16), False),
])
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_norm_case_matches_torch_and_rejects_a_wrong_result(op, shape, channels_last, mode):
    pytest.importorskip("torch")
    case = norms.NormCase(op, shape, "float32", channels_last)
    expected = case.torch_step(mode)()
    outputs = case.fastbn_step("numpy", mode)()
    case.check(outputs, expected, mode)
    wrong = [np.array(a, copy=True) for a in outputs]
    wrong[0].flat[3] += 0.1
    with pytest.raises(AssertionError, match="differs from torch"):
        case.check(wrong, expected, mode)


@pytest.mark.parametrize("op, shape, channels_last", [
    ("batch_norm_2d", (2, 3, 4, 5), False),
    ("batch_norm_2d", (2, 3, 4, 5), True),
    ("group_norm", (2, 64, 3, 4), True),
    ("instance_norm", (2, 3, 4, 5), False),
    ("layer_norm", (2, 3, 16), False),
    ("rms_norm", (2, 3, 16), False),
])
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_module_case_matches_torch_and_rejects_a_wrong_result(op, shape, channels_last, mode):
    pytest.importorskip("torch")
    arrays = (batch_norm.BatchNormCase(shape, "float32", channels_last) if op == "batch_norm_2d"
              else norms.NormCase(op, shape, "float32", channels_last))
    case = modules.ModuleCase(op, arrays)
    expected = case.torch_step(mode)()
    # y; in training also the input's and every parameter's gradient, and the buffers
    parameters = 1 if op == "rms_norm" else 2
    buffers = 3 if op == "batch_norm_2d" else 0
    assert len(expected) == (1 if mode == "eval" else 2 + parameters + buffers)
    for backend in (None, "numpy"):
        outputs = case.fastbn_step(backend, mode)()
        case.check(outputs, expected, mode, str(backend))
    wrong = [output.detach().clone() for output in outputs]
    wrong[0][(0,) * wrong[0].dim()] += 0.1
    with pytest.raises(AssertionError, match="differs from torch"):
        case.check(wrong, expected, mode)


@pytest.mark.parametrize("op", ["instance_norm", "batch_norm_2d"])
def test_module_case_expects_a_float64_oracle_where_torch_is_wrong(op):
    """Training on a batch of one: torch's module step can be wrong there (channels-last
    InstanceNorm is, docs/nn.md), so fastbn is checked against torch on float64
    contiguous copies of the same values."""
    torch = pytest.importorskip("torch")
    case = modules.ModuleCase(op, modules.kernel_case(op, (1, 8, 5, 6), channels_last=True))
    expected = case.expected("training")
    assert all(output.dtype == torch.float64 and output.is_contiguous() for output in expected
               if output.is_floating_point())  # (not BatchNorm's num_batches_tracked)
    case.check(case.fastbn_step("numpy", "training")(), expected, "training")
    if op == "instance_norm":
        with pytest.raises(AssertionError, match="differs"):
            case.check(case.torch_step("training")(), expected, "training", "torch")
    # A batch of two is right in torch: its own result stays the reference.
    case = modules.ModuleCase(op, modules.kernel_case(op, (2, 8, 5, 6), channels_last=True))
    assert case.expected("training")[0].dtype == torch.float32


@pytest.mark.parametrize("model", end_to_end.MODELS)
@pytest.mark.parametrize("mode", end_to_end.MODES)
def test_network_case_checks_the_converted_model_against_torch(model, mode):
    torch = pytest.importorskip("torch")
    import fastbn.nn as fnn

    case = end_to_end.NetworkCase(model, batch=2, mode=mode, image_size=32, small=True)
    case.check()
    results = {name: step() for name, step in case.steps().items()}
    assert list(results) == list(end_to_end.IMPLEMENTATIONS)
    if mode == "training":
        assert all(loss > 0 for loss in results.values())
    else:
        assert all(logits.shape == (2, end_to_end.CLASSES) for logits in results.values())
    assert any(isinstance(m, fnn.BatchNormAct2d) for m in case.models["convert"].modules())
    for name, gone in [("no_batch_norm", (torch.nn.BatchNorm2d,)),
                       ("no_batch_norm_activation", (torch.nn.BatchNorm2d, torch.nn.ReLU,
                                                     torch.nn.ReLU6))]:
        assert not any(isinstance(m, gone) for m in case.models[name].modules())
    # A converted layer that computes something else is caught (the last one: a
    # later BatchNorm would normalize the error away).
    last = [m for m in case.models["convert"].modules() if isinstance(m, fnn.BatchNorm2d)][-1]
    last.register_forward_hook(lambda module, args, y: y + 0.1)
    with pytest.raises(AssertionError, match="differs from torch"):
        case.check()


TINY_GRIDS = {
    "batch_norm_2d": shapes.ShapeGrid((1, 2), ((4, 3, 3),)),
    "group_norm": shapes.ShapeGrid((1,), ((32, 2, 2),)),
    "layer_norm": shapes.ShapeGrid((1,), ((2, 8),)),
}


def test_report_writes_every_measurement_and_the_plots(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    results = report.run_report(threads=2, backends=["cython"], repeats=1, output=tmp_path,
                                grids=TINY_GRIDS, ops=list(TINY_GRIDS),
                                networks=[("resnet18", "training", 2)], network_image_size=32,
                                small_networks=True, cost_batches=(2,), progress=False,
                                print_fn=lambda line: None)
    with open(tmp_path / "results.json") as file:
        saved = json.load(file)
    assert saved == results
    assert saved["environment"]
    records = saved["measurements"]
    # per op and level: layouts x modes x shapes cases; per case torch, cython, cython on
    # 1 thread, floor, and at the module level fastbn.nn's default routing
    cases = 2 * 2 * 2 + 2 * 2 * 1 + 1 * 2 * 1
    assert len(records) == cases * 4 + cases * 5
    keys = {"level", "op", "mode", "layout", "shape", "dtype", "nbytes", "bytes_moved",
            "backend", "threads", "median_s", "q1_s", "q3_s", "min_s", "max_s", "rounds"}
    for record in records:
        assert set(record) == keys
        assert record["op"] in TINY_GRIDS and record["mode"] in batch_norm.MODES
        assert record["backend"] in (("torch", "cython", "floor") if record["level"] == "kernel"
                                     else ("torch", "default", "cython", "floor"))
        assert record["threads"] == 2 or record["backend"] == "cython"
        assert 0 < record["q1_s"] <= record["median_s"] <= record["q3_s"]
    assert {(r["level"], r["op"], r["layout"]) for r in records} == {
        (level, op, layout) for level in report.LEVELS for op, layout in [
            ("batch_norm_2d", "contiguous"), ("batch_norm_2d", "channels_last"),
            ("group_norm", "contiguous"), ("group_norm", "channels_last"),
            ("layer_norm", "contiguous")]}
    assert sum(r["threads"] == 1 for r in records) == 2 * cases
    assert [(r["model"], r["batch"], r["small"], r["backend"]) for r in saved["networks"]] == [
        ("resnet18", 2, True, name) for name in end_to_end.IMPLEMENTATIONS]
    assert set(saved["costs"]) == {"per_call", "mobilenet_v2 batch 2"}
    assert saved["costs"]["per_call"]["fastbn.nn.BatchNorm2d step"] > 0
    parts = saved["costs"]["mobilenet_v2 batch 2"]
    assert parts["kernels forward (ms per step)"] <= parts["run_forward (ms per step)"] <= (
        parts["NormFunction.forward (ms per step)"])
    assert parts["step, convert (ms)"] > 0
    assert saved["machine"]["threads"] == 2
    for name in ["speedup_batch_norm_2d", "speedup_group_norm", "speedup_layer_norm",
                 "time_vs_bytes", "bandwidth"]:
        with open(tmp_path / f"{name}.png", "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_command_runs_the_parts_asked_for(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    assert report.main(["--ops", "layer_norm", "--backends", "cython", "--repeats", "1",
                        "--no-kernels", "--no-networks", "--no-costs", "--output",
                        str(tmp_path)]) == 0
    with open(tmp_path / "results.json") as file:
        saved = json.load(file)
    assert {(r["level"], r["op"]) for r in saved["measurements"]} == {("module", "layer_norm")}
    assert saved["networks"] == []
    assert "### module layer_norm contiguous training" in capsys.readouterr().out
    # no kernel measurements, no plot of kernel time against bytes moved
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "results.json", "speedup_layer_norm.png"]


def _records(level, backends):
    return [dict(level=level, op="layer_norm", mode="eval", layout="contiguous",
                 shape=[1, 2, 8], nbytes=64, backend=backend, threads=threads, median_s=median,
                 q1_s=median * 0.9, q3_s=median * (1.1 + extra_spread))
            for backend, threads, median, extra_spread in backends]


def test_report_tables_give_speedup_and_scaling():
    lines = report.tables(_records("kernel", [
        ("torch", 2, 4e-6, 0.0), ("cython", 2, 1e-6, 0.1), ("cython", 1, 3e-6, 0.0),
        ("floor", 2, 5e-7, 0.0)]), threads=2)
    assert "### kernel layer_norm contiguous eval" in lines
    row = next(line for line in lines if line.startswith("| 1x2x8"))
    assert row.split(" | ")[1:] == ["0.00", "4.0", "1.0", "4.00x", "3.0", "3.00x", "0.5",
                                    "2.00", "30% |"]


def test_report_module_tables_have_a_column_per_implementation():
    lines = report.tables(_records("module", [
        ("torch", 2, 4e-6, 0.0), ("default", 2, 4e-6, 0.0), ("cython", 2, 2e-6, 0.0),
        ("floor", 2, 1e-6, 0.0)]), threads=2)
    assert "## " + report.LEVEL_TITLES["module"] in lines
    header = next(line for line in lines if line.startswith("| shape"))
    assert header.split(" | ")[2:6] == ["torch us", "default us", "cython us", "default speedup"]
    row = next(line for line in lines if line.startswith("| 1x2x8"))
    assert row.split(" | ")[2:7] == ["4.0", "4.0", "2.0", "1.00x", "2.00x"]
    assert "- cython: geometric-mean speedup over torch 2.00x, worst 2.00x" in lines


def test_network_table_gives_the_speedups_and_the_part_of_the_bound_captured():
    records = [dict(model="mobilenet_v2", mode="training", batch=2, image_size=112,
                    dtype="float32", threads=2, backend=backend, median_s=median,
                    q1_s=median, q3_s=median)
               for backend, median in [("torch", 0.06), ("convert", 0.05),
                                       ("no_batch_norm", 0.045),
                                       ("no_batch_norm_activation", 0.04)]]
    lines = end_to_end.table(records)
    assert lines[1].startswith("## End to end: reference networks, 112x112")
    row = next(line for line in lines if line.startswith("| MobileNetV2 "))
    assert row == ("| MobileNetV2 | training | 2 | 60.0 | 50.0 | 1.20x | 45.0 | 1.33x | "
                   "40.0 | 1.50x | 50% | 0% |")
    assert end_to_end.table([]) == []


def test_plan_lays_out_every_level_op_layout_mode_and_shape():
    cases = report.plan(TINY_GRIDS, ops=["batch_norm_2d", "layer_norm"])
    assert cases[0] == ("kernel", "batch_norm_2d", "contiguous", "training", (1, 4, 3, 3))
    assert ("kernel", "batch_norm_2d", "channels_last", "eval", (2, 4, 3, 3)) in cases
    assert ("module", "layer_norm", "contiguous", "eval", (1, 2, 8)) in cases
    assert len(cases) == 2 * (2 * 2 * 2 + 2)
    assert report.plan(TINY_GRIDS, ops=["layer_norm"], levels=["module"]) == [
        ("module", "layer_norm", "contiguous", mode, (1, 2, 8)) for mode in batch_norm.MODES]


def test_thread_sweep_summarises_every_count(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from fastbn.benchmarks import scaling

    results = report.run_sweep([1, 2], backends=["cython"], repeats=1, output=tmp_path,
                               ops=["batch_norm_2d"], levels=["kernel"],
                               networks=[("mobilenet_v2", "training", 2)],
                               grids={"batch_norm_2d": TINY_GRIDS["batch_norm_2d"]},
                               small_networks=True, progress=False, print_fn=lambda line: None)
    with open(tmp_path / "results.json") as file:
        assert json.load(file) == results
    assert {r["threads"] for r in results["measurements"]} == {1, 2}
    assert {(r["mode"], r["layout"]) for r in results["measurements"]} == {
        ("training", "contiguous")}
    summary = {(r["level"], r["backend"], r["threads"]): r for r in results["sweep"]}
    assert set(summary) == {(level, backend, threads) for threads in (1, 2)
                            for level, backend in [("kernel", "torch"), ("kernel", "cython")]
                            + [("network", name) for name in end_to_end.IMPLEMENTATIONS]}
    for (level, backend, threads), row in summary.items():
        if backend == "torch":
            assert row["over_torch"] == pytest.approx(1.0)
        assert row["efficiency"] == pytest.approx(row["speedup"] / threads)
        if threads == 1:
            assert row["speedup"] == pytest.approx(1.0)
    lines = scaling.table(results["sweep"])
    assert "| kernel | batch_norm_2d | training | cython | " in "\n".join(lines)
    with open(tmp_path / "scaling.png", "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_network_layers_are_the_networks_batch_norm_inputs():
    pytest.importorskip("torch")
    samples = end_to_end.batch_norm_sample_shapes(image_size=112)
    assert (96, 56, 56) in samples and (512, 4, 4) in samples and (1280, 4, 4) in samples
    assert len(samples) == len(set(samples))
    records = report.measure_network_layers(2, repeats=1, warmup=1, image_size=32,
                                            batch_sizes=(2,))
    assert {r["backend"] for r in records} == {"torch", report.DEFAULT_ROUTING, "cython"}
    lines = report.network_layers_table(records)
    assert "geometric mean" in lines[-1]
