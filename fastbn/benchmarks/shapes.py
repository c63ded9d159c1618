"""Benchmark input grids: the one place where the shapes every benchmark runs on live.

A grid is every batch size times every per-sample shape, plus a few tiny
shapes where per-call overhead, not memory traffic, dominates. Another op gets
its own grid here and its name in `GRIDS` (and a smoke-run grid in `QUICK_GRIDS`).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeGrid:
    """Input shapes of one op's benchmarks.

    Attributes
    ----------
    batch_sizes : tuple of int
    sample_shapes : tuple of tuple of int
        Per-sample shapes, e.g. (C, H, W).
    overhead_shapes : tuple of tuple of int
        Whole input shapes, e.g. (N, C, H, W), small enough that the time is overhead.
    """

    batch_sizes: tuple
    sample_shapes: tuple
    overhead_shapes: tuple = ()

    def shapes(self):
        """Every input shape: per sample shape, each batch size; then the overhead shapes."""
        grid = [(n,) + sample for sample in self.sample_shapes for n in self.batch_sizes]
        return grid + list(self.overhead_shapes)


# BatchNorm2d inputs in ResNet-18/34/50 stages at 224x224 (every stage moves the
# same bytes per sample), at the small batch sizes where CPU training hurts.
RESNET_FEATURE_MAPS = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))
SMALL_BATCH_SIZES = (1, 2, 4, 8)
OVERHEAD_BATCH_NORM_2D = ((1, 16, 8, 8),)

BATCH_NORM_2D = ShapeGrid(SMALL_BATCH_SIZES, RESNET_FEATURE_MAPS, OVERHEAD_BATCH_NORM_2D)
# float64 is rarer in training: the extreme stages at the extreme batch sizes.
BATCH_NORM_2D_FLOAT64 = ShapeGrid((1, 8), (RESNET_FEATURE_MAPS[0], RESNET_FEATURE_MAPS[-1]),
                                  OVERHEAD_BATCH_NORM_2D)
# A quick run: the extreme batch sizes (so plots show a trend), the largest-spatial
# and the most-channels stage.
QUICK_BATCH_SIZES = (SMALL_BATCH_SIZES[0], SMALL_BATCH_SIZES[-1])
BATCH_NORM_2D_QUICK = ShapeGrid(QUICK_BATCH_SIZES, (RESNET_FEATURE_MAPS[0], RESNET_FEATURE_MAPS[-1]),
                                OVERHEAD_BATCH_NORM_2D)

# GroupNorm(32, C) and InstanceNorm2d on the same ResNet feature maps.
GROUP_NORM_2D = ShapeGrid(SMALL_BATCH_SIZES, RESNET_FEATURE_MAPS)
GROUP_NORM_2D_QUICK = ShapeGrid(QUICK_BATCH_SIZES,
                                (RESNET_FEATURE_MAPS[0], RESNET_FEATURE_MAPS[-1]))
# float64: the extreme stages at the extreme batch sizes, as for BatchNorm.
GROUP_NORM_2D_FLOAT64 = ShapeGrid(QUICK_BATCH_SIZES,
                                  (RESNET_FEATURE_MAPS[0], RESNET_FEATURE_MAPS[-1]))

# LayerNorm and RMSNorm: (N, 128 tokens, D) normalized over the hidden size D,
# i.e. N * 128 rows of a transformer block.
TOKENS = 128
HIDDEN_SIZES = (256, 768)
LAYER_NORM = ShapeGrid(tuple(range(1, 9)), tuple((TOKENS, d) for d in HIDDEN_SIZES))
LAYER_NORM_QUICK = ShapeGrid((1, 8), tuple((TOKENS, d) for d in HIDDEN_SIZES))
# float64: the extreme batch sizes.
LAYER_NORM_FLOAT64 = ShapeGrid(QUICK_BATCH_SIZES, tuple((TOKENS, d) for d in HIDDEN_SIZES))

# op -> dtype name -> grid; and op -> the grid of a smoke run.
GRIDS = {
    "batch_norm_2d": {"float32": BATCH_NORM_2D, "float64": BATCH_NORM_2D_FLOAT64},
    "group_norm": {"float32": GROUP_NORM_2D, "float64": GROUP_NORM_2D_FLOAT64},
    "instance_norm": {"float32": GROUP_NORM_2D, "float64": GROUP_NORM_2D_FLOAT64},
    "layer_norm": {"float32": LAYER_NORM, "float64": LAYER_NORM_FLOAT64},
    "rms_norm": {"float32": LAYER_NORM, "float64": LAYER_NORM_FLOAT64},
}
QUICK_GRIDS = {
    "batch_norm_2d": BATCH_NORM_2D_QUICK,
    "group_norm": GROUP_NORM_2D_QUICK,
    "instance_norm": GROUP_NORM_2D_QUICK,
    "layer_norm": LAYER_NORM_QUICK,
    "rms_norm": LAYER_NORM_QUICK,
}


def format_shape(shape):
    """'8x64x56x56': shapes as the benchmark groups and tables name them."""
    return "x".join(str(dim) for dim in shape)
