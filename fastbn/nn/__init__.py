"""fastbn for PyTorch: drop-in normalization modules running fastbn's kernels.

Needs torch (``import fastbn`` itself does not). See docs/nn.md.

- `BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d`: subclasses of torch's modules with
  an extra ``backend=`` argument;
- `functional.batch_norm`: :func:`torch.nn.functional.batch_norm` on fastbn's kernels;
- `convert(model)` / `revert(model)`: switch a model's norm layers in place.
"""
from fastbn.nn import functional
from fastbn.nn.convert import convert, revert
from fastbn.nn.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "functional", "revert"]
