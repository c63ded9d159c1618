"""fastbn for PyTorch: drop-in normalization modules running fastbn's kernels.

Needs torch (``import fastbn`` itself does not). See docs/nn.md.

- `BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d`: subclasses of torch's modules with
  an extra ``backend=`` argument;
- `GroupNorm`, `LayerNorm`, `RMSNorm`, `InstanceNorm1d/2d/3d`: the same for those ops;
- `functional.batch_norm`, `group_norm`, `layer_norm`, `rms_norm`, `instance_norm`:
  torch.nn.functional's on fastbn's kernels;
- `FilterResponseNorm2d`, `EvoNorm2dS0`: batch-independent normalization-activation
  layers (docs/frn_evonorm.md), with `functional.filter_response_norm` and
  `functional.evonorm_s0`;
- `convert(model)` / `revert(model)`: switch a model's norm layers in place.
"""
from fastbn.nn import functional
from fastbn.nn.convert import convert, revert
from fastbn.nn.evonorm import EvoNorm2dS0
from fastbn.nn.frn import FilterResponseNorm2d
from fastbn.nn.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                               InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm", "convert", "functional",
           "revert"]
__all__ += ["EvoNorm2dS0", "FilterResponseNorm2d"]
