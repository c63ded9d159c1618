"""BatchNorm benchmarks: every fastbn backend against torch, grouped `op|shape|dtype`.

    PYTHONPATH=$PWD python -m pytest bench --benchmark-only              # run
    PYTHONPATH=$PWD python -m pytest bench --benchmark-only --benchmark-save=NAME
    pytest-benchmark compare 0001 0002                                   # two saved runs
    PYTHONPATH=$PWD python -m pytest bench --benchmark-only --torch-compile

Each group holds the implementations of one case: the fastbn backends, torch
eager (aten ops, no autograd), torch.compile with --torch-compile, and "floor",
a parallel copy moving the bytes an ideal kernel must move
(fastbn.benchmarks.batch_norm.bytes_moved). Every result is checked against
torch before it is timed, and a few untimed calls warm up each implementation
(numba and torch.compile compile on the first).
"""
import math

import pytest

import fastbn
from fastbn.benchmarks import batch_norm, shapes
from fastbn.benchmarks.timing import bandwidth_floor

LAYOUTS = {"contiguous": False, "channels_last": True}
# The NumPy reference computes in float64 and is only timed where that takes milliseconds.
REFERENCE_MAX_ELEMENTS = 2 ** 18
WARMUP_CALLS = 3


def pytest_generate_tests(metafunc):
    """Parametrise over implementation x shape x dtype x layout, from the shared grids."""
    if "implementation" not in metafunc.fixturenames:
        return
    implementations = batch_norm.backends() + ["torch"]
    if metafunc.config.getoption("--torch-compile"):
        implementations.append("torch.compile")
    implementations.append("floor")
    params = []
    for dtype, grid in shapes.GRIDS["batch_norm_2d"].items():
        for shape in grid.shapes():
            for layout in LAYOUTS:
                for implementation in implementations:
                    if (implementation == batch_norm.REFERENCE_BACKEND
                            and math.prod(shape) > REFERENCE_MAX_ELEMENTS):
                        continue
                    case_id = f"{implementation}-{shapes.format_shape(shape)}-{dtype}-{layout}"
                    params.append(pytest.param(implementation, shape, dtype, layout, id=case_id))
    metafunc.parametrize("implementation,shape,dtype,layout", params)


def make_step(case, implementation, mode):
    if implementation == "floor":
        return bandwidth_floor(batch_norm.bytes_moved(case.nbytes, mode), fastbn.get_num_threads())
    if implementation.startswith("torch"):
        step = case.torch_step(mode, compiled=implementation == "torch.compile")
    else:
        step = case.fastbn_step(implementation, mode)
    case.check(step(), case.torch_step(mode)(), mode, implementation)
    return step


@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_batch_norm(benchmark, mode, implementation, shape, dtype, layout):
    case = batch_norm.BatchNormCase(shape, dtype, LAYOUTS[layout])
    step = make_step(case, implementation, mode)
    for _ in range(WARMUP_CALLS):
        step()
    benchmark.group = f"batch_norm_{mode}|{shapes.format_shape(shape)} {layout}|{dtype}"
    benchmark.extra_info.update(bytes_moved=batch_norm.bytes_moved(case.nbytes, mode),
                                threads=fastbn.get_num_threads())
    benchmark(step)
