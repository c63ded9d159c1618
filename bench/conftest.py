"""What every benchmark file in bench/ shares (not collected by `pytest tests`).

    PYTHONPATH=$PWD python -m pytest bench --benchmark-only [--torch-compile]

A benchmark marked ``@pytest.mark.grid(grids, channels_last=..., floor=...)`` is
parametrised here over implementation x shape x dtype x layout, and times one
case with the `time_case` fixture. Implementations: every fastbn backend,
"torch" (eager), "torch.compile" with --torch-compile, and "floor" (a parallel
copy moving the bytes an ideal kernel must move,
fastbn.benchmarks.batch_norm.bytes_moved) where the op has one.

Threads: torch and every fastbn backend run with fastbn.get_num_threads()
(FASTBN_NUM_THREADS, else every usable CPU).
"""
import math

import pytest

import fastbn
from fastbn.benchmarks import batch_norm, shapes
from fastbn.benchmarks.timing import bandwidth_floor

# The NumPy reference computes in float64 and is only timed where that takes milliseconds.
REFERENCE_MAX_ELEMENTS = 2 ** 18
# Untimed calls first: numba and torch.compile compile on the first call.
WARMUP_CALLS = 3


def pytest_addoption(parser):
    parser.addoption("--torch-compile", action="store_true", default=False,
                     help="also time torch.compile'd (Inductor) versions of the torch ops; "
                          "each case compiles first, which takes seconds")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "grid(grids, channels_last=False, floor=True): parametrise a benchmark "
                   "over implementation x shape x dtype x layout (bench/conftest.py)")


def _grid_options(grids, channels_last=False, floor=True):
    """The `grid` marker's arguments.

    Parameters
    ----------
    grids : dict of str to fastbn.benchmarks.shapes.ShapeGrid
        dtype name -> shapes, as in ``shapes.GRIDS[op]``.
    channels_last : bool
        Also time channels-last inputs (the op has a channels-last layout).
    floor : bool
        Also time the bandwidth floor of each case.

    Returns
    -------
    grids, layouts, floor
        `layouts`: the names of the layouts to time, contiguous first.
    """
    layouts = ("contiguous", "channels_last") if channels_last else ("contiguous",)
    return grids, layouts, floor


def pytest_generate_tests(metafunc):
    """Parametrise a benchmark marked `grid` over implementation x shape x dtype x layout."""
    marker = metafunc.definition.get_closest_marker("grid")
    if marker is None:
        return
    grids, layouts, floor = _grid_options(*marker.args, **marker.kwargs)
    implementations = batch_norm.backends() + ["torch"]
    if metafunc.config.getoption("--torch-compile"):
        implementations.append("torch.compile")
    if floor:
        implementations.append("floor")
    params = []
    for dtype, grid in grids.items():
        for shape in grid.shapes():
            for layout in layouts:
                for implementation in implementations:
                    if (implementation == batch_norm.REFERENCE_BACKEND
                            and math.prod(shape) > REFERENCE_MAX_ELEMENTS):
                        continue
                    case_id = f"{implementation}-{shapes.format_shape(shape)}-{dtype}-{layout}"
                    params.append(pytest.param(implementation, shape, dtype, layout, id=case_id))
    metafunc.parametrize("implementation,shape,dtype,layout", params)


def _make_step(case, implementation, mode):
    if implementation == "floor":
        return bandwidth_floor(batch_norm.bytes_moved(case.nbytes, mode), fastbn.get_num_threads())
    if implementation.startswith("torch"):
        step = case.torch_step(mode, compiled=implementation == "torch.compile")
        expected = case.torch_step(mode)()  # torch.compile against eager torch
    else:
        step = case.fastbn_step(implementation, mode)
        # torch's result, or a float64 oracle where torch's is known to be wrong.
        expected = case.expected(mode)
    case.check(step(), expected, mode, implementation)
    return step


@pytest.fixture
def time_case(benchmark):
    """``time_case(name, case, implementation, mode)``: check (`case.expected`), warm up, time.

    `case` is a benchmark case of fastbn.benchmarks (fastbn_step, torch_step,
    check, nbytes, shape, dtype, channels_last); the benchmark's group is
    ``{name}_{mode}|{shape} {layout}|{dtype}``.
    """
    def time(name, case, implementation, mode):
        step = _make_step(case, implementation, mode)
        if benchmark.disabled:  # --benchmark-disable (CI): the check above, then one call
            benchmark(step)
            return
        for _ in range(WARMUP_CALLS):
            step()
        layout = "channels_last" if case.channels_last else "contiguous"
        benchmark.group = f"{name}_{mode}|{shapes.format_shape(case.shape)} {layout}|{case.dtype}"
        benchmark.extra_info.update(bytes_moved=batch_norm.bytes_moved(case.nbytes, mode),
                                    threads=fastbn.get_num_threads())
        benchmark(step)

    return time


@pytest.fixture(scope="session", autouse=True)
def torch_threads_as_fastbn():
    import torch

    torch.set_num_threads(fastbn.get_num_threads())


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved with every run, so that `pytest-benchmark compare` shows what was measured."""
    import numpy
    import torch

    machine_info["fastbn"] = {
        "version": fastbn.__version__,
        "threads": fastbn.get_num_threads(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
    }
