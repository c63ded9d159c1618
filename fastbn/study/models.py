"""The study's networks: a small CNN and a small MobileNet-style network, with a norm after
every convolution, built for a norm by name.

The norm layers are fastbn.nn's (`fastbn.nn.create_norm`, ``backend=None``: fastbn's
kernels with fastbn.nn's default routing), or, for the cost experiment, what one writes
without fastbn (`implementation="torch"`): torch.nn's BatchNorm2d / GroupNorm /
InstanceNorm2d, and for the layers torch has not, the plain-torch versions of
`fastbn.benchmarks.small_batch` (Ghost BatchNorm, Batch Renorm) and
`fastbn.benchmarks.norm_act` (FRN + TLU, EvoNorm-S0). Both implementations build the
same parameters in the same order, so a seed gives them the same initial weights.
"""
from torch import nn

import fastbn.nn

# The norms a study trains with. "none" is the floor: no normalization, conv with a bias.
# Not here: "frozen" (fixed statistics: nothing to train from scratch) and "sync" (the
# scale-out experiment's, in processes of its own).
NORMS = ("batchnorm", "ghost", "renorm", "groupnorm", "layernorm", "instancenorm", "frn",
         "evonorm_s0", "none")
# The BatchNorm family: running statistics, hence the evaluation-statistics experiment.
BATCH_NORMS = ("batchnorm", "ghost", "renorm", "sync")
# FRN's TLU and EvoNorm-S0's swish are the activation: no ReLU after them.
WITH_ACTIVATION = ("frn", "evonorm_s0")
MODELS = ("cnn", "mobilenet")
IMPLEMENTATIONS = ("fastbn", "torch")
# Groups of GroupNorm and EvoNorm-S0. Wu & He's 32 would make GroupNorm InstanceNorm on the
# small networks' 16 and 32 channels; 8 groups hold 2, 4 and 8 channels.
GROUPS = 8


def check_norm(name):
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; the study's norms are {', '.join(NORMS)}")
    return name


def _torch_norm(name, channels, virtual_batch_size, groups):
    from fastbn.benchmarks import norm_act, small_batch

    if name == "batchnorm":
        return nn.BatchNorm2d(channels)
    if name == "ghost":
        return small_batch.plain_layer("ghost_batch_norm", channels,
                                       virtual_batch_size=virtual_batch_size)
    if name == "renorm":
        return small_batch.plain_layer("batch_renorm", channels, r_max=1.0, d_max=0.0)
    if name == "groupnorm":
        return nn.GroupNorm(min(groups, channels), channels)
    if name == "layernorm":
        return nn.GroupNorm(1, channels)
    if name == "instancenorm":
        return nn.InstanceNorm2d(channels, affine=True)
    frn, evonorm = norm_act._torch_layers()
    if name == "frn":
        return frn(channels)
    return evonorm(channels, groups=min(groups, channels))


def norm_layer(name, channels, *, virtual_batch_size=None, groups=GROUPS,
               implementation="fastbn"):
    """The norm layer `name` for `channels` channels (None for "none").

    Batch Renorm starts as BatchNorm (r_max 1, d_max 0): the training loop ramps them.
    "sync" is fastbn.nn.SyncBatchNorm (the default process group).
    """
    if name == "none":
        return None
    if implementation == "torch":
        return _torch_norm(name, channels, virtual_batch_size, groups)
    if name == "ghost":
        return fastbn.nn.create_norm(name, channels, virtual_batch_size=virtual_batch_size)
    if name == "renorm":
        return fastbn.nn.create_norm(name, channels, r_max=1.0, d_max=0.0)
    if name == "groupnorm":
        return fastbn.nn.create_norm(name, channels, num_groups=min(groups, channels))
    if name == "evonorm_s0":
        return fastbn.nn.create_norm(name, channels, groups=min(groups, channels))
    return fastbn.nn.create_norm(name, channels)


def conv_norm(in_channels, out_channels, norm, stride=1, kernel_size=3, conv_groups=1,
              activation=True, **norm_kwargs):
    """Conv2d (`conv_groups`: its groups), the norm, ReLU (unless the norm brings its own
    activation, or `activation` is False); the conv has a bias only without a norm."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                        groups=conv_groups, bias=norm == "none")]
    layer = norm_layer(norm, out_channels, **norm_kwargs)
    if layer is not None:
        layers.append(layer)
    if activation and norm not in WITH_ACTIVATION:
        layers.append(nn.ReLU(inplace=True))
    return layers


def strides(image_size, downsamples):
    """The strides of the convolutions after the first: 2 for up to `downsamples` of
    them, fewer on small images (8x8 digits), so that the last map keeps at least 2x2
    values (BatchNorm over one value per channel cannot train at batch 1, nor Ghost
    BatchNorm with virtual batches of 1)."""
    count = 0
    while count < downsamples and image_size // 2 ** (count + 1) >= 2:
        count += 1
    return (1,) * (downsamples - count) + (2,) * count


class SmallCNN(nn.Sequential):
    """Four 3x3 convolutions of 16, 32, 64 and 64 channels, each followed by the norm and a
    ReLU, global average pooling, a linear classifier (61,050 parameters with BatchNorm). Strides
    1, 2, 2, 2: 28x28 images become maps of 28, 14, 7 and 4.

    Three convolutions (16, 32, 64) were measured first: with the pooled 7x7 maps their
    receptive field is small, and after 3 epochs BatchNorm reached 83 % (learning rate
    0.05) or 91.6 % (0.2) and GroupNorm 71.5 %; the fourth layer brings them to 95 % and
    91.5 % at about the same cost (its 4x4 maps are small).
    """

    def __init__(self, norm, num_classes=10, in_channels=1, image_size=28, **norm_kwargs):
        s2, s3, s4 = strides(image_size, 3)
        super().__init__(*conv_norm(in_channels, 16, norm, **norm_kwargs),
                         *conv_norm(16, 32, norm, stride=s2, **norm_kwargs),
                         *conv_norm(32, 64, norm, stride=s3, **norm_kwargs),
                         *conv_norm(64, 64, norm, stride=s4, **norm_kwargs),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


class InvertedResidual(nn.Sequential):
    """MobileNetV2's block without the expansion: 3x3 depthwise, norm, ReLU; 1x1
    projection, norm (no activation: the linear bottleneck); a residual connection where
    the shapes allow."""

    def __init__(self, in_channels, out_channels, stride, norm, **norm_kwargs):
        super().__init__(*conv_norm(in_channels, in_channels, norm, stride=stride,
                                    conv_groups=in_channels, **norm_kwargs),
                         *conv_norm(in_channels, out_channels, norm, kernel_size=1,
                                    activation=False, **norm_kwargs))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        y = super().forward(x)
        return x + y if self.residual else y


class SmallMobileNet(nn.Sequential):
    """A 3x3 stem of 16 channels, then depthwise-separable blocks 16 -> 32 (stride 2),
    32 -> 32, 32 -> 64 (stride 2), 64 -> 64 (stride 2), 64 -> 64, each with a norm after
    both convolutions; pooling and a linear classifier (15,402 parameters with BatchNorm)."""

    def __init__(self, norm, num_classes=10, in_channels=1, image_size=28, **norm_kwargs):
        s1, s2, s3 = strides(image_size, 3)
        blocks = [InvertedResidual(a, b, s, norm, **norm_kwargs)
                  for a, b, s in ((16, 32, s1), (32, 32, 1), (32, 64, s2), (64, 64, s3),
                                  (64, 64, 1))]
        super().__init__(*conv_norm(in_channels, 16, norm, **norm_kwargs), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def build(model, norm, *, num_classes=10, in_channels=1, image_size=28,
          virtual_batch_size=None, groups=GROUPS, implementation="fastbn"):
    """The network `model` ("cnn" or "mobilenet") with `norm` after every convolution.

    Parameters
    ----------
    model : {"cnn", "mobilenet"}
    norm : str
        One of `NORMS`, or "sync".
    image_size : int
        The input's height (and width), which sets the strides (`strides`).
    virtual_batch_size : int, optional
        Ghost BatchNorm's.
    groups : int
        GroupNorm's and EvoNorm-S0's number of groups (at most the channels).
    implementation : {"fastbn", "torch"}
    """
    cls = SmallCNN if model == "cnn" else SmallMobileNet
    return cls(norm, num_classes, in_channels, image_size,
               virtual_batch_size=virtual_batch_size, groups=groups,
               implementation=implementation)


def build_for(cell, image_size, implementation="fastbn"):
    """The network of a run or cost cell (its model, norm, virtual batch and groups)."""
    return build(cell.model, cell.norm, image_size=image_size,
                 virtual_batch_size=cell.virtual_batch_size, groups=cell.groups,
                 implementation=implementation)
