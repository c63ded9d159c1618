"""fastbn: fast CPU normalization layers.

One API over NumPy arrays with interchangeable backends:
``"cython"`` (OpenMP kernels, the default where built), ``"numba"`` and
``"numpy"`` (the exact reference).
"""
from fastbn._backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from fastbn._threads import get_num_threads, set_num_threads
from fastbn.batch_norm import batch_norm_backward, batch_norm_forward
from fastbn.evonorm import evonorm_s0_backward, evonorm_s0_forward
from fastbn.frn import filter_response_norm_backward, filter_response_norm_forward
from fastbn.group_norm import group_norm_backward, group_norm_forward
from fastbn.instance_norm import instance_norm_backward, instance_norm_forward
from fastbn.layer_norm import layer_norm_backward, layer_norm_forward
from fastbn.rms_norm import rms_norm_backward, rms_norm_forward

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "batch_norm_backward",
    "batch_norm_forward",
    "evonorm_s0_backward",
    "evonorm_s0_forward",
    "filter_response_norm_backward",
    "filter_response_norm_forward",
    "get_backend",
    "get_num_threads",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm_backward",
    "instance_norm_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "rms_norm_backward",
    "rms_norm_forward",
    "set_backend",
    "set_num_threads",
    "use_backend",
]
