"""The small-batch layers' training step: fastbn.nn's against the same layer in plain torch
ops, grouped `op|shape|dtype`.

    PYTHONPATH=$PWD python -m pytest bench/test_small_batch_layers.py --benchmark-only

One training step of the layer alone (gradients set to None, forward, backward through
autograd; `fastbn.benchmarks.small_batch.SmallBatchLayerCase`) on the ResNet BatchNorm
grid (N = 1, 2, 4, 8 at each stage, and a tiny overhead shape), float32, contiguous; and
channels-last on the quick grid (the extreme batch sizes and stages):

- Ghost BatchNorm (virtual batches of 2): fastbn.nn.GhostBatchNorm2d against a torch
  BatchNorm2d called on each virtual batch and the outputs concatenated (TabNet's GBN);
- Batch Renorm: fastbn.nn.BatchRenorm2d against Ioffe's formula in torch ops;
- FrozenBatchNorm2d: fastbn.nn's against torchvision's (x * scale + shift).

The "torch" implementation is the plain-torch layer; a fastbn implementation is the
fastbn.nn layer with that backend named. bench/conftest.py checks each result against
the plain-torch one before timing it. SyncBatchNorm's cost is measured over processes
by bench/sync_overhead.py.
"""
import pytest

from fastbn.benchmarks import shapes, small_batch


def time_layer(time_case, layer, implementation, shape, dtype, channels_last):
    case = small_batch.SmallBatchLayerCase(layer, shape, dtype, channels_last)
    time_case(f"nn.{layer}", case, implementation, "training")


@pytest.mark.grid({"float32": shapes.BATCH_NORM_2D}, floor=False)
@pytest.mark.parametrize("layer", small_batch.LAYERS)
def test_small_batch_layer(time_case, layer, implementation, shape, dtype, layout):
    time_layer(time_case, layer, implementation, shape, dtype, channels_last=False)


@pytest.mark.grid({"float32": shapes.BATCH_NORM_2D_QUICK}, channels_last=True, floor=False)
@pytest.mark.parametrize("layer", small_batch.LAYERS)
def test_small_batch_layer_channels_last(time_case, layer, implementation, shape, dtype,
                                         layout):
    if layout == "contiguous":
        pytest.skip("contiguous inputs: test_small_batch_layer, on the whole grid")
    time_layer(time_case, layer, implementation, shape, dtype, channels_last=True)
