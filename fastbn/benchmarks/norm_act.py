"""FRN + TLU and EvoNorm-S0 benchmark cases: fastbn.nn's layers against the same layers
written in plain torch ops, as timm writes them.

torch has no op for either layer, so what a user runs without fastbn is timm's
``FilterResponseNormTlu2d`` and ``EvoNorm2dS0``: several torch ops each, differentiated
by autograd. `TorchFilterResponseNormTlu2d` and `TorchEvoNorm2dS0` below are those
forwards op for op (timm's layers/filter_response_norm.py and layers/evo_norm.py; timm
is not a dependency), with the same parameters as the fastbn layers.

`NormActModuleCase` is a `modules.ModuleCase` (one training step: gradients set to
None, forward, backward of grad_out; or an eval forward under no_grad) whose torch side
is those layers.

torch is imported when a case is built, so this module imports without it.
"""
import numpy as np

from fastbn.benchmarks import modules, shapes
from fastbn.benchmarks.batch_norm import CaseArrays

OPS = ("frn", "evonorm_s0")
GROUPS = 32
FRN_EPS = 1e-6
EVONORM_EPS = 1e-5
# The ResNet feature maps at the small batch sizes, as BatchNorm2d's grid.
GRID = shapes.ShapeGrid(shapes.SMALL_BATCH_SIZES, shapes.RESNET_FEATURE_MAPS)
QUICK_GRID = shapes.ShapeGrid(shapes.QUICK_BATCH_SIZES,
                              (shapes.RESNET_FEATURE_MAPS[0], shapes.RESNET_FEATURE_MAPS[-1]))


def _torch_layers():
    """The plain-torch layers (defined on first use: torch is imported here)."""
    import torch
    from torch import nn

    class TorchFilterResponseNormTlu2d(nn.Module):
        """timm's FilterResponseNormTlu2d forward: x * rsqrt(mean(x^2) + eps), affine, max."""

        def __init__(self, num_features, eps=FRN_EPS):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
            self.tau = nn.Parameter(torch.zeros(num_features))

        def forward(self, x):
            v_shape = (1, -1, 1, 1)
            rms = x.square().float().mean(dim=(2, 3), keepdim=True).add(self.eps).rsqrt()
            x = x * rms.to(x.dtype).expand(x.shape)
            x = x * self.weight.view(v_shape) + self.bias.view(v_shape)
            return torch.maximum(x, self.tau.reshape(v_shape))

    class TorchEvoNorm2dS0(nn.Module):
        """timm's EvoNorm2dS0 forward: x * sigmoid(v x) / group_std(x), affine."""

        def __init__(self, num_features, groups=GROUPS, eps=EVONORM_EPS):
            super().__init__()
            self.groups = groups
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
            self.v = nn.Parameter(torch.ones(num_features))

        def forward(self, x):
            v_shape = (1, -1, 1, 1)
            B, C, H, W = x.shape
            grouped = x.reshape(B, self.groups, C // self.groups, H, W)
            std = grouped.float().var(dim=(2, 3, 4), unbiased=False, keepdim=True)
            std = std.add(self.eps).sqrt().to(x.dtype).expand(grouped.shape).reshape(B, C, H, W)
            x = x * (x * self.v.view(v_shape)).sigmoid() / std
            return x * self.weight.view(v_shape) + self.bias.view(v_shape)

    return TorchFilterResponseNormTlu2d, TorchEvoNorm2dS0


class NormActArrays(CaseArrays):
    """x, grad_out and the three per-channel parameters of one case, made once.

    Parameters
    ----------
    shape : tuple of int
        (N, C, H, W).
    dtype : str or dtype
    channels_last : bool
    seed : int
    """

    def __init__(self, shape, dtype="float32", channels_last=False, seed=0):
        rng = np.random.default_rng(seed)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.channels_last = bool(channels_last)
        self.x = self._array(rng.standard_normal(self.shape) * 2.0 + 0.5)
        self.grad_out = self._array(rng.standard_normal(self.shape))
        C = self.shape[1]
        self.weight = rng.uniform(0.5, 1.5, C).astype(self.dtype)
        self.bias = (rng.standard_normal(C) * 0.5).astype(self.dtype)
        # FRN's tau, EvoNorm's v (around 1, its initial value)
        self.extra = {"frn": (rng.standard_normal(C) * 0.5).astype(self.dtype),
                      "evonorm_s0": rng.uniform(0.5, 1.5, C).astype(self.dtype)}


class NormActModuleCase(modules.ModuleCase):
    """One FRN or EvoNorm-S0 layer and its input: fastbn.nn's and the plain-torch one.

    Parameters
    ----------
    op : {"frn", "evonorm_s0"}
    shape : tuple of int
        (N, C, H, W); C a multiple of 32 for EvoNorm-S0 (32 groups, timm's default).
    dtype : str or dtype
    channels_last : bool
    seed : int
    """

    def __init__(self, op, shape, dtype="float32", channels_last=False, seed=0):
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        super().__init__(op, NormActArrays(shape, dtype, channels_last, seed))

    def _module(self, namespace, **backend):
        """fastbn.nn's layer (namespace fastbn.nn) or the plain-torch one (torch.nn)."""
        import torch

        import fastbn.nn

        C = self.shape[1]
        dtype = torch.float32 if self.dtype == np.float32 else torch.float64
        if namespace is fastbn.nn:
            if self.op == "frn":
                module = fastbn.nn.FilterResponseNorm2d(C, FRN_EPS, dtype=dtype, **backend)
            else:
                module = fastbn.nn.EvoNorm2dS0(C, GROUPS, eps=EVONORM_EPS, dtype=dtype,
                                               **backend)
        else:
            frn_layer, evonorm_layer = _torch_layers()
            module = (frn_layer(C) if self.op == "frn" else evonorm_layer(C)).to(dtype)
        extra = "tau" if self.op == "frn" else "v"
        values = {"weight": self.arrays.weight, "bias": self.arrays.bias,
                  extra: self.arrays.extra[self.op]}
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                parameter.copy_(torch.from_numpy(values[name]))
        return module
