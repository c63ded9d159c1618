"""fastbn for PyTorch: drop-in normalization modules running fastbn's kernels.

Needs torch (``import fastbn`` itself does not). See docs/nn.md.

- `BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d`: subclasses of torch's modules with
  an extra ``backend=`` argument;
- `BatchNormAct2d`: BatchNorm2d and an activation in the same kernel passes;
- `GroupNorm`, `LayerNorm`, `RMSNorm`, `InstanceNorm1d/2d/3d`: the same for those ops;
- `functional.batch_norm`, `group_norm`, `layer_norm`, `rms_norm`, `instance_norm`:
  torch.nn.functional's on fastbn's kernels;
- `convert(model)` / `revert(model)`: switch a model's norm layers in place (fusing a
  BatchNorm2d with the activation that follows it in an ``nn.Sequential``).
"""
from fastbn.nn import functional
from fastbn.nn.convert import convert, revert
from fastbn.nn.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d, GroupNorm,
                               InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "GroupNorm",
           "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm", "convert", "functional",
           "revert"]
