"""LayerNorm and RMSNorm benchmarks: every fastbn backend against torch.

    PYTHONPATH=$PWD python -m pytest bench/test_layer_norm.py --benchmark-only

Training (forward, then backward with every gradient) and eval (forward), on
the ``layer_norm`` and ``rms_norm`` grids: (N, 128 tokens, D) normalized over
D, rows, so contiguous only; the torch ops are those of
fastbn.benchmarks.norms (RMSNorm's backward through autograd).
bench/conftest.py parametrises over the implementations, checks each result
against torch before timing it, and warms each implementation up first.
"""
import pytest

from fastbn.benchmarks import batch_norm, norms, shapes


@pytest.mark.grid(shapes.GRIDS["layer_norm"])
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_layer_norm(time_case, mode, implementation, shape, dtype, layout):
    case = norms.NormCase("layer_norm", shape, dtype)
    time_case("layer_norm", case, implementation, mode)


@pytest.mark.grid(shapes.GRIDS["rms_norm"])
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_rms_norm(time_case, mode, implementation, shape, dtype, layout):
    case = norms.NormCase("rms_norm", shape, dtype)
    time_case("rms_norm", case, implementation, mode)
