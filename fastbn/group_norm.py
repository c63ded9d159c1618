"""GroupNorm over NumPy arrays: argument checks, then dispatch to a backend.

Modelled on ATen's `native_group_norm` / `native_group_norm_backward`.
fastbn/instance_norm.py runs through the same kernels with one channel per group.
"""
import operator

import numpy as np

from fastbn import _layout, _validation
from fastbn._backends import load_backend
from fastbn._threads import get_num_threads


def check_input(x):
    x = _validation.check_float_input("x", x)
    _validation.check_ndim(x, 2, 5)
    return x


def check_num_groups(num_groups, x):
    try:
        num_groups = operator.index(num_groups)
    except TypeError:
        raise TypeError(f"num_groups must be an integer, got {num_groups!r}") from None
    if num_groups <= 0:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups}")
    if x.shape[1] % num_groups:
        raise ValueError("Expected number of channels in input to be divisible by num_groups, "
                         f"but got input of shape {list(x.shape)} and num_groups={num_groups}")
    return num_groups


def check_stats(name, a, shape, x, producer):
    """A per-(sample, group) statistic: an array of `shape` (N, G) and x's dtype, C-contiguous."""
    if a is None:
        raise ValueError(f"{name} is needed: pass the {name} returned by {producer}")
    a = _validation.as_array(name, a)
    _validation.check_same_dtype(name, a, x)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape} as returned by {producer}, "
                         f"got shape {a.shape}")
    return np.ascontiguousarray(a)


def check_backward_inputs(grad_out, x, weight, output_mask):
    """(grad_out, x, weight, mask) checked as a backward takes them."""
    x = check_input(x)
    grad_out = _validation.check_grad_out(grad_out, x)
    weight = _validation.check_vector("weight", weight, x.shape[1], x)
    return grad_out, x, weight, _validation.check_mask(output_mask, 3)


def run_forward(x, num_groups, weight, bias, eps, out, backend, given_stats=None, variance=None,
                updated=(), after_kernel=None):
    """Dispatch a checked forward; shared with instance norm.

    given_stats: (mean, rstd) of shape (N, G) to normalize with, or None to
    compute them from x. variance: None, or a float64 (N, G) array the kernel
    writes with the biased group variances it computes. after_kernel: None, or
    a function of the group means that instance norm updates its running
    statistics (`updated`) with; it runs after the kernel and before y is copied
    into an `out` that overlaps them, so that out's values are the ones left there.
    """
    kernels = load_backend(backend)
    x_view, channels_last = _layout.kernel_view(x)
    y, y_view, copy_into = _layout.output_buffer("out", out, x, x_view, channels_last, (x_view,),
                                                 (weight, bias) + tuple(updated))
    if given_stats is None:
        mean = np.empty((x.shape[0], num_groups), x.dtype)
        rstd = np.empty((x.shape[0], num_groups), x.dtype)
    else:
        mean, rstd = given_stats
    if x.size == 0:
        if given_stats is None:  # what torch.native_group_norm returns for groups of no values
            mean.fill(0.0)
            rstd.fill(np.nan)
        return y, mean, rstd
    kernels.group_norm_forward(x_view, weight, bias, eps, given_stats is None, y_view, mean,
                               rstd, variance, channels_last, get_num_threads())
    if after_kernel is not None:
        after_kernel(mean)
    if copy_into is not None:
        np.copyto(y, copy_into)
    return y, mean, rstd


def run_backward(grad_out, x, mean, rstd, weight, stats_from_input, mask, out, backend):
    """Dispatch a checked backward; shared with instance norm."""
    want_x, want_weight, want_bias = mask
    kernels = load_backend(backend)
    C = x.shape[1]
    x_view, channels_last = _layout.kernel_view(x)
    grad_out_view = _layout.view_or_copy_as_layout(grad_out, x_view, channels_last)
    grad_x = grad_x_view = copy_into = None
    if want_x:
        grad_x, grad_x_view, copy_into = _layout.output_buffer(
            "out", out, x, x_view, channels_last, (x_view, grad_out_view), (weight, mean, rstd))
    # Sums over no values are 0, as in PyTorch.
    grad_weight = np.zeros(C, x.dtype) if want_weight else None
    grad_bias = np.zeros(C, x.dtype) if want_bias else None
    if x.size == 0 or not (want_x or want_weight or want_bias):
        return grad_x, grad_weight, grad_bias

    kernels.group_norm_backward(grad_out_view, x_view, weight, mean, rstd, stats_from_input,
                                grad_x_view, grad_weight, grad_bias, channels_last,
                                get_num_threads())
    if copy_into is not None:
        np.copyto(grad_x, copy_into)
    return grad_x, grad_weight, grad_bias


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, out=None,
                       backend=None):
    """Group normalization forward, as ``torch.native_group_norm``.

    The C channels are split into `num_groups` groups of consecutive channels;
    each (sample, group) is normalized with the mean and biased variance of
    its C / num_groups x prod(spatial) values.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C) or (N, C, *spatial) with up to 3 spatial dims
        C-contiguous and channels-last arrays are read in place; any other
        strides are first copied to C order.
    num_groups : int
        A positive divisor of C.
    weight, bias : ndarray of shape (C,) and x's dtype, or None
        The per-channel affine parameters (None: weight 1, bias 0).
    eps : float
        Added to the variance. Any real number, as in ATen: a negative eps gives NaN
        where var + eps < 0.
    out : ndarray, optional
        Written with y and returned. Any layout; one other than x's costs a copy.
        It may be x itself (updated in place); one that partly overlaps an input
        gets the same results, through a temporary (as NumPy's ufuncs).
    backend : {"cython", "numba", "numpy"}, optional
        Defaults to :func:`fastbn.get_backend`.

    Returns
    -------
    y : ndarray
        Same shape, dtype and memory layout as x (unless `out` says otherwise).
    mean, rstd : ndarray of shape (N, num_groups)
        Each group's mean and 1 / sqrt(var + eps). Pass them to
        :func:`group_norm_backward`.

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
    eps = _validation.check_eps(eps)
    return run_forward(x, num_groups, weight, bias, eps, out, backend)


def group_norm_backward(grad_out, x, mean, rstd, weight, num_groups, *,
                        output_mask=(True, True, True), out=None, backend=None):
    """Group normalization backward, as ``torch.ops.aten.native_group_norm_backward``.

    Parameters
    ----------
    grad_out : ndarray, same shape and dtype as x
    x : ndarray
        The forward's input.
    mean, rstd : ndarray of shape (N, num_groups)
        As returned by :func:`group_norm_forward`.
    weight : ndarray of shape (C,) or None
    num_groups : int
    output_mask : three bools
        Which of (grad_x, grad_weight, grad_bias) to compute; the others are
        returned as None and cost nothing.
    out : ndarray, optional
        Written with grad_x and returned (any layout; it may be grad_out or x itself;
        a partial overlap with an input goes through a temporary).
    backend : {"cython", "numba", "numpy"}, optional

    Returns
    -------
    grad_x : ndarray or None
        Same layout as x.
    grad_weight, grad_bias : ndarray of shape (C,) or None
    """
    grad_out, x, weight, mask = check_backward_inputs(grad_out, x, weight, output_mask)
    num_groups = check_num_groups(num_groups, x)
    shape = (x.shape[0], num_groups)
    mean = check_stats("mean", mean, shape, x, "group_norm_forward")
    rstd = check_stats("rstd", rstd, shape, x, "group_norm_forward")
    return run_backward(grad_out, x, mean, rstd, weight, True, mask, out, backend)
