"""fastbn for PyTorch: drop-in normalization modules running fastbn's kernels.

Needs torch (``import fastbn`` itself does not). See docs/nn.md.

- `BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d`: subclasses of torch's modules with
  an extra ``backend=`` argument;
- `GroupNorm`, `LayerNorm`, `RMSNorm`, `InstanceNorm1d/2d/3d`: the same for those ops;
- `functional.batch_norm`, `group_norm`, `layer_norm`, `rms_norm`, `instance_norm`:
  torch.nn.functional's on fastbn's kernels;
- `BatchNormAct2d`: BatchNorm2d and an activation in the same kernel passes;
- `FilterResponseNorm2d`, `EvoNorm2dS0`: batch-independent normalization-activation
  layers (docs/frn_evonorm.md), with `functional.filter_response_norm` and
  `functional.evonorm_s0`;
- `convert(model)` / `revert(model)`: switch a model's norm layers in place (fusing a
  BatchNorm2d with the activation that follows it in an ``nn.Sequential``);
- the small-batch layers (docs/small_batch.md): `GhostBatchNorm1d/2d/3d`,
  `BatchRenorm1d/2d/3d`, `FrozenBatchNorm2d` + `freeze(model)`, `SyncBatchNorm` (CPU,
  torch.distributed), `precise_bn(model, batches)`, `create_norm(name, num_features)`
  and `swap_norm(model, name)` (behind ``convert(model, norm=name)``).
"""
from fastbn.nn import functional
from fastbn.nn.convert import convert, revert
from fastbn.nn.evonorm import EvoNorm2dS0
from fastbn.nn.factory import NORM_NAMES, create_norm, swap_norm
from fastbn.nn.frn import FilterResponseNorm2d
from fastbn.nn.frozen import FrozenBatchNorm2d, freeze
from fastbn.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm
from fastbn.nn.modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d, GroupNorm,
                               InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)
from fastbn.nn.precise_bn import precise_bn
from fastbn.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, batch_renorm
from fastbn.nn.sync_batch_norm import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "BatchRenorm1d",
           "BatchRenorm2d", "BatchRenorm3d", "EvoNorm2dS0", "FilterResponseNorm2d",
           "FrozenBatchNorm2d", "GhostBatchNorm1d",
           "GhostBatchNorm2d", "GhostBatchNorm3d", "GroupNorm", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "NORM_NAMES", "RMSNorm",
           "SyncBatchNorm", "batch_renorm", "convert", "create_norm", "freeze", "functional",
           "ghost_batch_norm", "precise_bn", "revert", "swap_norm"]
