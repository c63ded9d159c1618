"""The NumPy backend: the exact reference every other backend is tested against.

Short and readable, float64 inside. Every backend module exposes the same
kernel functions with the same calling convention:

- arguments have been validated by the public function (fastbn/batch_norm.py);
- tensors arrive as 3-D C-contiguous views, (N, C, S), or (N, S, C) when
  `channels_last` (see fastbn/_layout.py), never empty; per-channel vectors
  are C-contiguous and of the tensors' dtype (or None where allowed);
- outputs are preallocated and filled in place; running statistics are
  updated in place;
- `n_threads` is the thread count to use (ignored here).
"""
from fastbn._numpy.batch_norm import batch_norm_backward, batch_norm_forward
from fastbn._numpy.group_norm import group_norm_backward, group_norm_forward

__all__ = ["batch_norm_forward", "batch_norm_backward", "group_norm_forward",
           "group_norm_backward"]
