"""The Cython/OpenMP backend. Compiled by setup.py; validation and dispatch live in fastbn/."""
from fastbn._cython._batch_norm import batch_norm_backward, batch_norm_forward
from fastbn._cython._group_norm import group_norm_backward, group_norm_forward
from fastbn._cython._layer_norm import (
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)
from fastbn._cython._norm_act import (
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
