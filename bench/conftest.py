"""Options and shared settings of the benchmark suite (not collected by `pytest tests`).

    PYTHONPATH=$PWD python -m pytest bench --benchmark-only [--torch-compile]

Threads: torch and every fastbn backend run with fastbn.get_num_threads()
(FASTBN_NUM_THREADS, else every usable CPU).
"""
import pytest

import fastbn


def pytest_addoption(parser):
    parser.addoption("--torch-compile", action="store_true", default=False,
                     help="also time torch.compile'd (Inductor) versions of the torch ops; "
                          "each case compiles first, which takes seconds")


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
