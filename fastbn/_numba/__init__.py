"""The Numba backend. Each op's kernel is compiled for a dtype, or loaded from numba's
cache, when that op is first called with that dtype.

fastbn imports this package on the first call that uses ``backend="numba"``;
validation and dispatch live in fastbn/. The kernel functions are looked up here
lazily (PEP 562): a BatchNorm call loads the BatchNorm kernels only, which saves
about 0.2 s on the first call of a new process per op not used (docs/numba.md).
`precompile` fills the cache ahead of time (e.g. when building a container image).
"""
import importlib

# Each kernel function of the backend's calling convention (fastbn/_numpy/__init__.py),
# and the module of this package that defines it.
_KERNEL_MODULES = {
    "batch_norm_forward": "batch_norm",
    "batch_norm_backward": "batch_norm",
    "group_norm_forward": "group_norm",
    "group_norm_backward": "group_norm",
    "layer_norm_forward": "layer_norm",
    "layer_norm_backward": "layer_norm",
    "rms_norm_forward": "layer_norm",
    "rms_norm_backward": "layer_norm",
    "filter_response_norm_forward": "norm_act",
    "filter_response_norm_backward": "norm_act",
    "evonorm_s0_forward": "norm_act",
    "evonorm_s0_backward": "norm_act",
}

__all__ = list(_KERNEL_MODULES) + ["precompile"]

def precompile(dtypes=("float32", "float64")):
    """Compile every op's kernels for `dtypes` now, or load them from numba's cache, so
    that no later first call pays for it (e.g. when building a container image);
    BatchNorm's fused-activation kernel included. Returns the number of kernels."""
    import numpy as np

    from fastbn._numba._runtime import PerDtype

    kernels = 0
    for module_name in sorted(set(_KERNEL_MODULES.values())):
        module = importlib.import_module(f"{__name__}.{module_name}")
        for entry_point in vars(module).values():
            if isinstance(entry_point, PerDtype):
                for dtype in dtypes:
                    entry_point[np.dtype(dtype)]
                    kernels += 1
    return kernels


def __getattr__(name):
    module = _KERNEL_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    function = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = function  # later lookups find it without calling this again
    return function


def __dir__():
    return sorted(set(globals()) | set(__all__))
