"""`fastbn.nn.FilterResponseNorm2d`: Filter Response Normalization with its TLU.

Singh & Krishnan, "Filter Response Normalization Layer: Eliminating Batch Dependence
in the Training of Deep Neural Networks" (CVPR 2020). See docs/frn_evonorm.md.
"""
import torch
from torch import nn

from fastbn.nn._norm_act_functional import filter_response_norm
from fastbn.nn.modules import FastbnNorm

__all__ = ["FilterResponseNorm2d"]

# The learned part of eps starts here (TensorFlow Addons' FilterResponseNormalization,
# learned_epsilon=True).
EPS_LEARNED_INIT = 1e-4


class FilterResponseNorm2d(FastbnNorm, nn.Module):
    """Filter Response Normalization + TLU on fastbn's kernels; input (N, C, H, W).

    Per sample and channel, ``nu2 = mean(x^2)`` over H and W,
    ``y = weight * x / sqrt(nu2 + eps) + bias`` and, with ``tlu``, ``z = max(y, tau)``.
    No batch statistics: training and evaluation compute the same thing, at any
    batch size.

    Parameters
    ----------
    num_features : int
        C.
    eps : float
        ``|eps|`` is added to nu2 (the paper's ``tf.abs(eps)``).
    learnable_eps : bool
        Also learn a non-negative addition to eps: the layer then adds
        ``|eps| + |eps_learned|``, with ``eps_learned`` a parameter of shape (1,)
        starting at 1e-4 (TensorFlow Addons' ``learned_epsilon``; the paper recommends
        a learned eps for layers with 1x1 feature maps, where a fixed small eps turns
        FRN into a sign function).
    tlu : bool
        Apply the thresholded linear unit, with a learned ``tau`` per channel.
    device, dtype
        Of the parameters, as for torch's modules.
    backend : {"cython", "numba", "numpy"} or None
        fastbn's backend (None: :func:`fastbn.get_backend`).

    Attributes
    ----------
    weight, bias, tau : Parameter of shape (C,)
        Initialised to 1, 0 and 0. ``tau`` is None without ``tlu``. The names and
        shapes are those of timm's ``FilterResponseNormTlu2d``, whose state dicts load
        (without ``learnable_eps``, whose ``eps_learned`` timm does not have).
    eps_learned : Parameter of shape (1,), or None without ``learnable_eps``.

    Shape:
        - Input: (N, C, H, W), any memory layout.
        - Output: (N, C, H, W), the input's memory layout (channels-last stays so).
    """

    def __init__(self, num_features, eps=1e-6, learnable_eps=False, tlu=True, device=None,
                 dtype=None, *, backend=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.learnable_eps = learnable_eps
        self.tlu = tlu
        self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        if tlu:
            self.tau = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("tau", None)
        if learnable_eps:
            self.eps_learned = nn.Parameter(torch.empty(1, **factory_kwargs))
        else:
            self.register_parameter("eps_learned", None)
        self.reset_parameters()
        self.backend = backend

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if self.eps_learned is not None:
            nn.init.constant_(self.eps_learned, EPS_LEARNED_INIT)

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        eps = abs(self.eps)
        if self.eps_learned is not None:
            eps = self.eps_learned.abs() + eps
        return filter_response_norm(input, self.weight, self.bias, self.tau, eps,
                                    backend=self.backend)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}, "
                f"tlu={self.tlu}, backend={self.backend!r}")
