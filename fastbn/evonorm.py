"""EvoNorm-S0 over NumPy arrays: argument checks, then dispatch.

Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers" (NeurIPS 2020),
as timm's EvoNorm2dS0 computes it: per sample and group of C / G consecutive channels,
y = x * sigmoid(v * x) / sqrt(var + eps) * w + b with the biased variance of the
group's values; no batch statistics. Without v (no activation), y = x / sqrt(var + eps)
* w + b (timm's EvoNorm2dS0a; timm's EvoNorm2dS0 then skips the normalization too).
"""
import numpy as np

from fastbn import _validation
from fastbn._backends import load_backend
from fastbn.frn import dispatch_backward, dispatch_forward
from fastbn.group_norm import check_input, check_num_groups, check_stats


def evonorm_s0_forward(x, num_groups, weight=None, bias=None, v=None, eps=1e-5, *, out=None,
                       backend=None):
    """EvoNorm-S0 forward.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C) or (N, C, *spatial) with up to 3 spatial dims
        C-contiguous and channels-last arrays are read in place; any other
        strides are first copied to C order.
    num_groups : int
        A positive divisor of C: the groups of consecutive channels whose values
        share a standard deviation (GroupNorm's groups).
    weight, bias : ndarray of shape (C,) and x's dtype, or None
        The per-channel affine parameters (None: weight 1, bias 0).
    v : ndarray of shape (C,) and x's dtype, or None
        The activation's per-channel slopes: x * sigmoid(v * x). None: no activation.
    eps : float, >= 0
        Added to the variance.
    out : ndarray, optional
        Written with y and returned. Any layout; one other than x's costs a copy.
        It may be x itself.
    backend : {"cython", "numba", "numpy"}, optional
        Defaults to :func:`fastbn.get_backend`.

    Returns
    -------
    y : ndarray
        Same shape, dtype and memory layout as x (unless `out` says otherwise).
    mean, rstd : ndarray of shape (N, num_groups)
        Each group's mean and 1 / sqrt(var + eps) (as GroupNorm's), for
        :func:`evonorm_s0_backward`.

    Raises
    ------
    TypeError, ValueError
        On bad input.
    """
    x = check_input(x)
    num_groups = check_num_groups(num_groups, x)
    C = x.shape[1]
    weight = _validation.check_vector("weight", weight, C, x)
    bias = _validation.check_vector("bias", bias, C, x)
    v = _validation.check_vector("v", v, C, x)
    eps = _validation.check_nonnegative_eps(eps)
    kernel = load_backend(backend).evonorm_s0_forward
    mean = np.empty((x.shape[0], num_groups), x.dtype)
    rstd = np.empty((x.shape[0], num_groups), x.dtype)
    if x.size == 0:  # what GroupNorm returns for groups of no values
        mean.fill(0.0)
        rstd.fill(np.nan)
    y = dispatch_forward(kernel, x, (weight, bias, v, eps), (mean, rstd), out)
    return y, mean, rstd


def evonorm_s0_backward(grad_out, x, mean, rstd, num_groups, weight=None, v=None, *,
                        output_mask=(True, True, True, True), out=None, backend=None):
    """Gradients of :func:`evonorm_s0_forward`.

    Parameters
    ----------
    grad_out : ndarray, same shape and dtype as x
    x : ndarray
        The forward's input.
    mean, rstd : ndarray of shape (N, num_groups)
        As returned by :func:`evonorm_s0_forward`.
    num_groups : int
    weight, v : ndarray of shape (C,) or None
        The forward's (the bias does not enter the gradients).
    output_mask : four bools
        Which of (grad_x, grad_weight, grad_bias, grad_v) to compute; the others are
        returned as None and cost nothing (grad_v is None without v).
    out : ndarray, optional
        Written with grad_x and returned (any layout; it may be grad_out itself).
    backend : {"cython", "numba", "numpy"}, optional

    Returns
    -------
    grad_x : ndarray or None
        Same layout as x.
    grad_weight, grad_bias, grad_v : ndarray of shape (C,) or None
    """
    x = check_input(x)
    grad_out = _validation.check_grad_out(grad_out, x)
    num_groups = check_num_groups(num_groups, x)
    C = x.shape[1]
    weight = _validation.check_vector("weight", weight, C, x)
    v = _validation.check_vector("v", v, C, x)
    want_x, want_weight, want_bias, want_v = _validation.check_mask(output_mask, 4)
    shape = (x.shape[0], num_groups)
    mean = check_stats("mean", mean, shape, x, "evonorm_s0_forward")
    rstd = check_stats("rstd", rstd, shape, x, "evonorm_s0_forward")
    kernel = load_backend(backend).evonorm_s0_backward
    grad_weight = np.zeros(C, x.dtype) if want_weight else None
    grad_bias = np.zeros(C, x.dtype) if want_bias else None
    grad_v = np.zeros(C, x.dtype) if want_v and v is not None else None
    grad_x = dispatch_backward(kernel, grad_out, x, (mean, rstd, weight, v), want_x,
                               (grad_weight, grad_bias, grad_v), out)
    return grad_x, grad_weight, grad_bias, grad_v
