"""GroupNorm(32, C) and InstanceNorm2d benchmarks: every fastbn backend against torch.

    PYTHONPATH=$PWD python -m pytest bench/test_group_norm.py --benchmark-only

Training (forward, then backward with every gradient) and eval (forward), on
the ``group_norm`` and ``instance_norm`` grids (ResNet feature maps),
contiguous and channels-last; the torch ops are those of
fastbn.benchmarks.norms. bench/conftest.py parametrises over the
implementations, checks each result against torch before timing it, and warms
each implementation up first.
"""
import pytest

from fastbn.benchmarks import batch_norm, norms, shapes


@pytest.mark.grid(shapes.GRIDS["group_norm"], channels_last=True)
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_group_norm(time_case, mode, implementation, shape, dtype, layout):
    case = norms.NormCase("group_norm", shape, dtype, layout == "channels_last")
    time_case("group_norm", case, implementation, mode)


@pytest.mark.grid(shapes.GRIDS["instance_norm"], channels_last=True)
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_instance_norm(time_case, mode, implementation, shape, dtype, layout):
    case = norms.NormCase("instance_norm", shape, dtype, layout == "channels_last")
    time_case("instance_norm", case, implementation, mode)
