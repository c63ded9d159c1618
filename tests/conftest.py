"""Shared test fixtures: every behaviour is tested once, for every available backend."""
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
