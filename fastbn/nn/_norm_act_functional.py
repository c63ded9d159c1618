"""`fastbn.nn.functional.filter_response_norm` and `evonorm_s0` (re-exported there).

torch has no op for either: without fastbn they are several torch ops each (timm's
formulas, `fastbn.nn._norm_act`), which is what runs for the calls fastbn's kernels
do not take (16-bit or mixed dtypes, other devices, tensor subclasses, more than 3
spatial dims, torch.compile tracing). Every other call, `backend=None` included, runs
fastbn's kernels: the torch formulas were slower on every shape measured
(docs/frn_evonorm.md).
"""
import torch

from fastbn import _validation
from fastbn.nn import _function, _norm_act

__all__ = ["evonorm_s0", "filter_response_norm"]


def _check_input(input, op):
    if input.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, ...) with at least 2 dims "
                         f"(got {input.dim()}D input)")
    if not input.is_floating_point():  # torch's message for an op without the dtype
        raise RuntimeError(f'"{op}" not implemented for {input.dtype}')


def _check_channel_vectors(input, named_vectors):
    """torch's group_norm error for a per-channel tensor of the wrong size."""
    channels = input.shape[1]
    for name, vector in named_vectors:
        if vector is not None and vector.numel() != channels:
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number "
                               f"of channels in input, but got {name} of shape "
                               f"{list(vector.shape)} and input of shape {list(input.shape)}")


def _check_eps(eps):
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f"eps must be a number or a one-element tensor, got a tensor "
                             f"of shape {list(eps.shape)}")
        return eps
    return _validation.check_nonnegative_eps(eps)


def _records(*tensors):
    """Whether autograd must record the call."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def filter_response_norm(input, weight=None, bias=None, tau=None, eps=1e-6, *, backend=None):
    """Filter Response Normalization (Singh & Krishnan 2020), then the TLU when `tau` is given.

    ``y = weight * input / sqrt(nu2 + eps) + bias`` with nu2 the mean of input^2 over
    the spatial dims of each (sample, channel), then ``maximum(y, tau)``.

    Parameters
    ----------
    input : Tensor of shape (N, C, *spatial)
        With no spatial dims each value is normalized alone (y = w x / sqrt(x^2 + eps) + b).
    weight, bias, tau : Tensor of shape (C,) or None
        None: weight 1, bias 0, no TLU.
    eps : float >= 0, or a one-element Tensor
        Added to nu2 as given; a tensor (e.g. ``abs(eps) + eps_learned.abs()``, what
        :class:`fastbn.nn.FilterResponseNorm2d` passes) gets a gradient.
    backend : {"cython", "numba", "numpy"}, optional
        fastbn's backend; None: :func:`fastbn.get_backend`.

    Returns
    -------
    Tensor
        Same shape, dtype and memory layout (channels-last or not) as `input`.

    Raises
    ------
    ValueError, RuntimeError
        On bad arguments (fewer than 2 dims, a negative eps, a parameter whose size is
        not the channel count).
    """
    _check_input(input, "filter_response_norm")
    _check_channel_vectors(input, (("weight", weight), ("bias", bias), ("tau", tau)))
    eps = _check_eps(eps)
    eps_tensor = eps if isinstance(eps, torch.Tensor) else None
    if not _function.runs_on_fastbn(input, weight, bias, tau, eps_tensor):
        return _norm_act.filter_response_norm_torch(input, weight, bias, tau, eps)
    op = _norm_act.FilterResponseNormOp(None if eps_tensor is not None else eps, backend)
    parameters = (weight, bias, tau, eps_tensor)
    return _norm_act.apply(op, input, parameters, _records(input, *parameters))


def evonorm_s0(input, num_groups, weight=None, bias=None, v=None, eps=1e-5, *, backend=None):
    """EvoNorm-S0 (Liu et al. 2020), as timm's EvoNorm2dS0.

    ``y = input * sigmoid(v * input) / std * weight + bias`` with std the standard
    deviation (biased variance + eps, square-rooted) of each sample's group of
    C / num_groups consecutive channels; without `v`, ``input / std * weight + bias``.

    Parameters
    ----------
    input : Tensor of shape (N, C, *spatial)
    num_groups : int
        A divisor of C.
    weight, bias, v : Tensor of shape (C,) or None
        None: weight 1, bias 0, no activation.
    eps : float >= 0
    backend : {"cython", "numba", "numpy"}, optional
        As in :func:`filter_response_norm`.

    Returns
    -------
    Tensor
        Same shape, dtype and memory layout (channels-last or not) as `input`.

    Raises
    ------
    ValueError, RuntimeError
        On bad arguments (num_groups not dividing C, and as :func:`filter_response_norm`).
    """
    _check_input(input, "evonorm_s0")
    if num_groups <= 0 or input.shape[1] % num_groups:
        raise ValueError("Expected number of channels in input to be divisible by num_groups, "
                         f"but got input of shape {list(input.shape)} and "
                         f"num_groups={num_groups}")
    _check_channel_vectors(input, (("weight", weight), ("bias", bias), ("v", v)))
    eps = _check_eps(eps)
    if isinstance(eps, torch.Tensor):
        raise TypeError("evonorm_s0's eps must be a number")
    if not _function.runs_on_fastbn(input, weight, bias, v):
        return _norm_act.evonorm_s0_torch(input, num_groups, weight, bias, v, eps)
    op = _norm_act.EvoNormS0Op(num_groups, eps, backend)
    parameters = (weight, bias, v)
    return _norm_act.apply(op, input, parameters, _records(input, *parameters))
