"""The NumPy backend: the exact reference every other backend is tested against.

Short and readable, float64 inside. Every backend module exposes the same
kernel functions with the same calling convention:

- arguments have been validated by the public function (fastbn/batch_norm.py,
  fastbn/group_norm.py, fastbn/instance_norm.py, fastbn/layer_norm.py,
  fastbn/rms_norm.py, fastbn/frn.py, fastbn/evonorm.py);
- BatchNorm, GroupNorm, FRN and EvoNorm tensors arrive as 3-D C-contiguous views, (N, C, S),
  or (N, S, C) when `channels_last` (see fastbn/_layout.py); LayerNorm and
  RMSNorm tensors as 2-D C-contiguous (rows, D) views with per-row statistics
  of shape (rows,) and parameters of shape (D,) (see fastbn/_rowwise.py);
  never empty; per-channel vectors are C-contiguous and of the tensors' dtype
  (or None where allowed);
- outputs are preallocated and filled in place; running statistics are
  updated in place;
- `n_threads` is the thread count to use (ignored here).
"""
from fastbn._numpy.batch_norm import batch_norm_backward, batch_norm_forward
from fastbn._numpy.group_norm import group_norm_backward, group_norm_forward
from fastbn._numpy.layer_norm import (
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)
from fastbn._numpy.norm_act import (
    evonorm_s0_backward,
    evonorm_s0_forward,
    filter_response_norm_backward,
    filter_response_norm_forward,
)

__all__ = [
    "batch_norm_forward",
    "batch_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "filter_response_norm_forward",
    "filter_response_norm_backward",
    "evonorm_s0_forward",
    "evonorm_s0_backward",
]
