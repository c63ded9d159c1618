"""FrozenBatchNorm2d (torchvision's `ops.misc.FrozenBatchNorm2d`) and `freeze` (timm's
`freeze_batch_norm_2d`): BatchNorm with fixed statistics and affine parameters.

Detection and segmentation models fine-tune backbones with a few images per device;
their BatchNorm layers are frozen: normalized with the pretrained statistics,
the affine parameters not trained either (Wu & Johnson 2021, "FrozenBN").
"""
import torch
from torch import nn

from fastbn.nn import functional
from fastbn.nn.modules import FastbnNorm

__all__ = ["FrozenBatchNorm2d", "freeze"]


class FrozenBatchNorm2d(FastbnNorm, nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, on fastbn's eval-mode kernel.

    torchvision's semantics: four buffers (``weight``, ``bias``, ``running_mean``,
    ``running_var``; no parameters), ``y = (x - running_mean) / sqrt(running_var + eps)
    * weight + bias`` in training and eval mode alike, gradients for the input only. A
    :class:`torch.nn.BatchNorm2d` state dict loads into it (its ``num_batches_tracked``
    is dropped, as torchvision does).

    Parameters
    ----------
    num_features : int
    eps : float
    backend : {"cython", "numba", "numpy"}, optional
        fastbn's backend; None follows fastbn.nn's default routing.

    Shape:
        input (N, C, H, W); output the same, in the input's memory layout.
    """

    def __init__(self, num_features, eps=1e-5, *, backend=None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.backend = backend

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        return functional.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                     self.bias, False, 0.0, self.eps, backend=self.backend)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, backend={self.backend!r}"

    @classmethod
    def from_batch_norm(cls, module, *, eps=None, backend=None):
        """A FrozenBatchNorm2d with a copy of a BatchNorm layer's statistics and affine
        parameters (weight 1 and bias 0 where it has none), on its device and dtype, with
        its eps unless `eps` is given."""
        frozen = cls(module.num_features, module.eps if eps is None else eps, backend=backend)
        like = module.running_mean
        with torch.no_grad():
            frozen.weight = (torch.ones_like(like) if module.weight is None
                             else module.weight.detach().clone())
            frozen.bias = (torch.zeros_like(like) if module.bias is None
                           else module.bias.detach().clone())
            frozen.running_mean = module.running_mean.detach().clone()
            frozen.running_var = module.running_var.detach().clone()
        return frozen


def freezable(module):
    """Whether `freeze` replaces `module`: a BatchNorm2d (any subclass, fastbn's included) or a
    SyncBatchNorm, as timm's freeze_batch_norm_2d, that has running statistics to freeze."""
    return (isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))
            and module.running_mean is not None and module.running_var is not None)


def freeze(model, *, backend=None):
    """Replace every BatchNorm2d and SyncBatchNorm layer of `model` by a `FrozenBatchNorm2d`.

    timm's ``freeze_batch_norm_2d``: each layer becomes a FrozenBatchNorm2d holding a copy
    of its running statistics and affine parameters. The replaced layer is kept (out of
    the module tree), so that :func:`fastbn.nn.revert` can put a trainable BatchNorm back.
    Layers built with ``track_running_stats=False`` have no statistics to freeze and are
    left as they are; so are BatchNorm1d and 3d layers (as timm).

    Parameters
    ----------
    model : torch.nn.Module
    backend : {"cython", "numba", "numpy"}, optional
        The new layers' fastbn backend.

    Returns
    -------
    torch.nn.Module
        `model`, changed in place; a new FrozenBatchNorm2d if `model` itself is a
        BatchNorm2d layer.
    """
    from fastbn.nn.factory import swap_norm

    return swap_norm(model, "frozen", backend=backend)
