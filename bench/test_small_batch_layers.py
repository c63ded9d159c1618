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

Implementations: "torch" is the plain-torch layer; a backend name is the fastbn.nn layer
with that backend named (always fastbn's kernels); "default" is the layer as built
(backend=None: fastbn.nn's routing, which runs torch's own BatchNorm op on the small
inputs where it measured faster, see fastbn.nn.functional.torch_is_faster). The NumPy
reference backend is not timed (tests/test_ghost_renorm.py compares it). bench/conftest.py
checks each result against the plain-torch one before timing it. SyncBatchNorm's cost is
measured over processes by bench/sync_overhead.py.
"""
import pytest

from fastbn.benchmarks import batch_norm, shapes, small_batch

IMPLEMENTATIONS = batch_norm.backends(include_reference=False) + ["default", "torch"]


def cases(grid):
    return [pytest.param(implementation, shape,
                         id=f"{implementation}-{shapes.format_shape(shape)}")
            for shape in grid.shapes() for implementation in IMPLEMENTATIONS]


def time_layer(time_case, layer, implementation, shape, channels_last):
    case = small_batch.SmallBatchLayerCase(layer, shape, "float32", channels_last)
    time_case(f"nn.{layer}", case, implementation, "training")


@pytest.mark.parametrize("implementation, shape", cases(shapes.BATCH_NORM_2D))
@pytest.mark.parametrize("layer", small_batch.LAYERS)
def test_small_batch_layer(time_case, layer, implementation, shape):
    time_layer(time_case, layer, implementation, shape, channels_last=False)


@pytest.mark.parametrize("implementation, shape", cases(shapes.BATCH_NORM_2D_QUICK))
@pytest.mark.parametrize("layer", small_batch.LAYERS)
def test_small_batch_layer_channels_last(time_case, layer, implementation, shape):
    time_layer(time_case, layer, implementation, shape, channels_last=True)
