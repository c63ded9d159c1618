"""`fastbn.nn.EvoNorm2dS0`: the batch-independent EvoNorm-S0 normalization-activation layer.

Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers" (NeurIPS 2020),
with timm's EvoNorm2dS0 arguments, parameters and formulas. See docs/frn_evonorm.md.
"""
import torch
from torch import nn

from fastbn.nn._norm_act_functional import evonorm_s0
from fastbn.nn.modules import FastbnNorm

__all__ = ["EvoNorm2dS0"]


class EvoNorm2dS0(FastbnNorm, nn.Module):
    """EvoNorm-S0 on fastbn's kernels; input (N, C, H, W).

    ``y = x * sigmoid(v * x) / group_std(x) * weight + bias``, group_std the standard
    deviation (biased variance + eps, square-rooted) of each sample's group of
    C / groups consecutive channels over H and W, as GroupNorm's. No batch statistics.

    Parameters
    ----------
    num_features : int
        C.
    groups : int
        Number of channel groups (a divisor of C); ignored when `group_size` is given.
    group_size : int, optional
        Channels per group (a divisor of C): ``groups = C // group_size``.
    apply_act : bool
        Apply the activation ``x * sigmoid(v * x)``, with a learned ``v`` per channel.
        Without it the layer computes ``x / group_std(x) * weight + bias``: timm's
        EvoNorm2dS0a does the same, while timm's EvoNorm2dS0 then skips the
        normalization as well (``x * weight + bias``).
    eps : float, >= 0
        Added to the variance.
    device, dtype
        Of the parameters, as for torch's modules.
    backend : {"cython", "numba", "numpy"} or None
        fastbn's backend (None: :func:`fastbn.get_backend`).

    Attributes
    ----------
    weight, bias, v : Parameter of shape (C,)
        Initialised to 1, 0 and 1; ``v`` is None without `apply_act`. timm's names and
        shapes: timm's EvoNorm2dS0 and EvoNorm2dS0a state dicts load.

    Shape:
        - Input: (N, C, H, W), any memory layout.
        - Output: (N, C, H, W), the input's memory layout (channels-last stays so).
    """

    def __init__(self, num_features, groups=32, group_size=None, apply_act=True, eps=1e-5,
                 device=None, dtype=None, *, backend=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if group_size:
            if num_features % group_size:
                raise ValueError(f"num_features ({num_features}) must be divisible by "
                                 f"group_size ({group_size})")
            groups = num_features // group_size
        if groups <= 0 or num_features % groups:
            raise ValueError("num_channels must be divisible by num_groups")
        self.num_features = num_features
        self.groups = groups
        self.apply_act = apply_act
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        if apply_act:
            self.v = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("v", None)
        self.reset_parameters()
        self.backend = backend

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        return evonorm_s0(input, self.groups, self.weight, self.bias, self.v, self.eps,
                          backend=self.backend)

    def extra_repr(self):
        return (f"{self.num_features}, groups={self.groups}, apply_act={self.apply_act}, "
                f"eps={self.eps}, backend={self.backend!r}")
