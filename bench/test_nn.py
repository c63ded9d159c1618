"""fastbn.nn modules against torch.nn's: BatchNorm2d, GroupNorm(32, C), LayerNorm.

    PYTHONPATH=$PWD python -m pytest bench/test_nn.py --benchmark-only

One training step of the layer alone (module forward, then backward through
autograd) and the eval-mode forward under no_grad, on the float32 quick grids
(the extreme batch sizes and stages: the per-call overhead of the modules shows
at the small end), contiguous and, for BatchNorm2d and GroupNorm,
channels-last. A fastbn implementation is the fastbn.nn module with that
backend named, which always runs fastbn's kernels (bench/compare_nn.py also
times the default, backend=None, which hands some inputs to torch).
bench/conftest.py parametrises over the implementations, checks each result
against torch before timing it, and warms each implementation up first.
"""
import pytest

from fastbn.benchmarks import batch_norm, nn_cases, shapes


@pytest.mark.grid({"float32": shapes.QUICK_GRIDS["batch_norm_2d"]}, channels_last=True,
                  floor=False)
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_batch_norm_2d_module(time_case, mode, implementation, shape, dtype, layout):
    case = nn_cases.ModuleCase("batch_norm_2d", shape, dtype, layout == "channels_last")
    time_case("nn.BatchNorm2d", case, implementation, mode)


@pytest.mark.grid({"float32": shapes.QUICK_GRIDS["group_norm"]}, channels_last=True,
                  floor=False)
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_group_norm_module(time_case, mode, implementation, shape, dtype, layout):
    case = nn_cases.ModuleCase("group_norm", shape, dtype, layout == "channels_last")
    time_case("nn.GroupNorm", case, implementation, mode)


@pytest.mark.grid({"float32": shapes.QUICK_GRIDS["layer_norm"]}, floor=False)
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_layer_norm_module(time_case, mode, implementation, shape, dtype, layout):
    case = nn_cases.ModuleCase("layer_norm", shape, dtype)
    time_case("nn.LayerNorm", case, implementation, mode)
