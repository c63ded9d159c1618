"""FRN + TLU and EvoNorm-S0: fastbn.nn's layers against the same layers in plain torch ops.

    PYTHONPATH=$PWD python -m pytest bench/test_frn_evonorm.py --benchmark-only

torch has no op for either layer; what a user runs without fastbn is timm's
FilterResponseNormTlu2d / EvoNorm2dS0, several torch ops differentiated by autograd
(`fastbn.benchmarks.norm_act`, written op for op as timm's). One training step of the
layer alone (gradients set to None, forward, backward of grad_out through autograd),
float32, on the ResNet feature maps at N = 1, 2, 4, 8 (channels-last: the extreme
batch sizes and stages). The "torch" implementation is the plain-torch layer; a fastbn
implementation is the fastbn.nn layer with that backend. bench/conftest.py checks each
result against the plain-torch layer's before timing it. The issue's target: the cython
layer >= 2x the plain-torch one, geometric mean over the contiguous grid, no shape
slower (bench/compare_frn_evonorm.py prints the ratios).
"""
import pytest

from fastbn.benchmarks import norm_act


def time_training_step(time_case, op, implementation, shape, dtype, layout):
    case = norm_act.NormActModuleCase(op, shape, dtype, layout == "channels_last")
    time_case(f"nn.{op}", case, implementation, "training")


@pytest.mark.grid({"float32": norm_act.GRID}, floor=False)
@pytest.mark.parametrize("op", norm_act.OPS)
def test_training_step(time_case, op, implementation, shape, dtype, layout):
    time_training_step(time_case, op, implementation, shape, dtype, layout)


@pytest.mark.grid({"float32": norm_act.QUICK_GRID}, channels_last=True, floor=False)
@pytest.mark.parametrize("op", norm_act.OPS)
def test_training_step_channels_last(time_case, op, implementation, shape, dtype, layout):
    if layout == "contiguous":
        pytest.skip("timed by test_training_step")
    time_training_step(time_case, op, implementation, shape, dtype, layout)
