"""fastbn.nn modules against torch.nn's, one op family per test, grouped `op|shape|dtype`.

    PYTHONPATH=$PWD python -m pytest bench/test_nn.py --benchmark-only

One training step of the layer alone (gradients set to None, module forward,
backward through autograd) and the eval-mode forward under no_grad
(`fastbn.benchmarks.modules.ModuleCase`, also behind the module tables of
``python -m fastbn bench``), on the float32 quick grids: the extreme batch
sizes and stages, where the per-call overhead of the modules shows at the
small end. Contiguous and, for BatchNorm2d, GroupNorm and InstanceNorm,
channels-last. A fastbn implementation is the fastbn.nn module with that
backend named, which always runs fastbn's kernels (the report also times the
default, backend=None, which hands some inputs to torch). bench/conftest.py
parametrises over the implementations, checks each result against torch (or,
where torch's own module is wrong, against torch on float64 contiguous copies:
ModuleCase.expected) before timing it, and warms each implementation up first.
"""
import pytest

from fastbn.benchmarks import batch_norm, modules, shapes

CHANNELS_LAST_OPS = ("batch_norm_2d", "group_norm", "instance_norm")


def module_case(op, shape, dtype, layout):
    arrays = modules.kernel_case(op, shape, dtype, layout == "channels_last")
    return modules.ModuleCase(op, arrays)


@pytest.mark.grid({"float32": shapes.QUICK_GRIDS["batch_norm_2d"]}, channels_last=True,
                  floor=False)
@pytest.mark.parametrize("mode", batch_norm.MODES)
def test_batch_norm_2d_module(time_case, mode, implementation, shape, dtype, layout):
    time_case("nn.BatchNorm2d", module_case("batch_norm_2d", shape, dtype, layout),
              implementation, mode)


@pytest.mark.grid({"float32": shapes.QUICK_GRIDS["group_norm"]}, channels_last=True,
                  floor=False)
@pytest.mark.parametrize("mode", batch_norm.MODES)
@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
def test_group_norm_module(time_case, op, mode, implementation, shape, dtype, layout):
    time_case(f"nn.{op}", module_case(op, shape, dtype, layout), implementation, mode)


@pytest.mark.grid({"float32": shapes.QUICK_GRIDS["layer_norm"]}, floor=False)
@pytest.mark.parametrize("mode", batch_norm.MODES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_layer_norm_module(time_case, op, mode, implementation, shape, dtype, layout):
    time_case(f"nn.{op}", module_case(op, shape, dtype, layout), implementation, mode)
