"""Shared test fixtures: every behaviour is tested once, for every available backend."""
import os

import numpy as np
import pytest

import fastbn

BACKENDS = fastbn.available_backends()

# Per-dtype tolerances against the float64 NumPy reference and PyTorch.
TOLERANCES = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5),
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10),
}


def tolerance(dtype, factor=1.0):
    tol = TOLERANCES[np.dtype(dtype)]
    return dict(rtol=tol["rtol"] * factor, atol=tol["atol"] * factor)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=[b for b in BACKENDS if b != "numpy"])
def fast_backend(request):
    """The compiled backends, compared with the NumPy reference."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# Tests marked `slow` (e.g. arrays past 2^31 values, 8+ GB of memory) run only with
# --run-slow or FASTBN_RUN_SLOW=1: CI's small machines skip them.
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (large memory; see tests/conftest.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs --run-slow or FASTBN_RUN_SLOW=1 to run")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("FASTBN_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or FASTBN_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

