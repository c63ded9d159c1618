"""BatchNorm2d benchmarks: every fastbn backend against torch, grouped `op|shape|dtype`.

    PYTHONPATH=$PWD python -m pytest bench/test_batch_norm.py --benchmark-only

Training (forward with batch statistics, running statistics updated, then
backward with all three gradients) and eval (forward with the running
statistics), on the ``batch_norm_2d`` grids, contiguous and channels-last.
bench/conftest.py parametrises over the implementations, checks each result
against torch before timing it, and warms each implementation up first.
"""
import pytest

from fastbn.benchmarks import batch_norm, shapes


@pytest.mark.grid(shapes.GRIDS["batch_norm_2d"], channels_last=True)
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_batch_norm(time_case, mode, implementation, shape, dtype, layout):
    case = batch_norm.BatchNormCase(shape, dtype, layout == "channels_last")
    time_case("batch_norm", case, implementation, mode)
