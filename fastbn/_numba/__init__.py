"""The Numba backend. Kernels compile on first import (and are cached on disk);
validation and dispatch live in fastbn/."""
from fastbn._numba.layer_norm import (
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

__all__ = [
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
]
