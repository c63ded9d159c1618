"""Filter Response Normalization (+ TLU) over NumPy arrays: argument checks, then dispatch.

Singh & Krishnan, "Filter Response Normalization Layer: Eliminating Batch Dependence in
the Training of Deep Neural Networks" (CVPR 2020). Per sample and channel,
nu2 = mean of x^2 over the spatial positions, y = w * x / sqrt(nu2 + eps) + b, and the
thresholded linear unit z = max(y, tau) (TLU) with a learned tau.

The dispatch helpers here are shared with EvoNorm-S0 (fastbn/evonorm.py), whose
kernels take their arguments in the same order.
"""
import numpy as np

from fastbn import _layout, _validation
from fastbn._backends import load_backend
from fastbn._threads import get_num_threads
from fastbn.group_norm import check_input, check_stats


def dispatch_forward(kernel, x, args, stats, out):
    """Run a checked forward: ``kernel(x, *args, y, *stats, channels_last, n_threads)``
    on kernel views; `stats` are the (N, G) arrays it fills. Returns y."""
    x_view, channels_last = _layout.kernel_view(x)
    y, y_view, copy_into = _layout.output_buffer("out", out, x, x_view, channels_last)
    if x.size == 0:
        return y
    kernel(x_view, *args, y_view, *stats, channels_last, get_num_threads())
    if copy_into is not None:
        np.copyto(y, copy_into)
    return y


def dispatch_backward(kernel, grad_out, x, inputs, want_x, parameter_grads, out):
    """Run a checked backward: ``kernel(grad_out, x, *inputs, grad_x, *parameter_grads,
    channels_last, n_threads)`` on kernel views; the parameter gradients (None where not
    wanted) are zero-filled arrays it writes. Returns grad_x (None unless `want_x`)."""
    x_view, channels_last = _layout.kernel_view(x)
    grad_x = grad_x_view = copy_into = None
    if want_x:
        grad_x, grad_x_view, copy_into = _layout.output_buffer("out", out, x, x_view,
                                                               channels_last)
    if x.size == 0 or not (want_x or any(g is not None for g in parameter_grads)):
        return grad_x  # sums over no values are 0, as in PyTorch
    grad_out_view = _layout.view_or_copy_as_layout(grad_out, x_view, channels_last)
    kernel(grad_out_view, x_view, *inputs, grad_x_view, *parameter_grads, channels_last,
           get_num_threads())
    if copy_into is not None:
        np.copyto(grad_x, copy_into)
    return grad_x


def filter_response_norm_forward(x, weight=None, bias=None, tau=None, eps=1e-6, *, out=None,
                                 backend=None):
    """Filter response normalization, then the TLU when `tau` is given.

    ``y = weight * x / sqrt(mean(x^2) + eps) + bias`` with the mean over the spatial
    positions of each (sample, channel), then ``z = maximum(y, tau)`` (NaN where either
    is NaN, as ``torch.maximum``).

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C) or (N, C, *spatial) with up to 3 spatial dims
        C-contiguous and channels-last arrays are read in place; any other
        strides are first copied to C order. (With no spatial dims each value is
        normalized alone: y = x / sqrt(x^2 + eps), the case the paper's learned eps is for.)
    weight, bias : ndarray of shape (C,) and x's dtype, or None
        The per-channel affine parameters (None: weight 1, bias 0).
    tau : ndarray of shape (C,) and x's dtype, or None
        The TLU's thresholds; None: no TLU.
    eps : float, >= 0
        Added to the mean square. (FilterResponseNorm2d passes ``|eps|``, plus
        ``|eps_learned|`` when it learns one.)
    out : ndarray, optional
        Written with the result and returned. Any layout; one other than x's costs a copy.
        It may be x itself.
    backend : {"cython", "numba", "numpy"}, optional
        Defaults to :func:`fastbn.get_backend`.

    Returns
    -------
    y : ndarray
        Same shape, dtype and memory layout as x (unless `out` says otherwise).
    rstd : ndarray of shape (N, C)
        1 / sqrt(mean(x^2) + eps), for :func:`filter_response_norm_backward` (NaN for
        channels of no values).

    Raises
    ------
    TypeError, ValueError
        On bad input.
    """
    x = check_input(x)
    C = x.shape[1]
    weight = _validation.check_vector("weight", weight, C, x)
    bias = _validation.check_vector("bias", bias, C, x)
    tau = _validation.check_vector("tau", tau, C, x)
    eps = _validation.check_nonnegative_eps(eps)
    kernel = load_backend(backend).filter_response_norm_forward
    rstd = np.empty((x.shape[0], C), x.dtype)
    if x.size == 0:
        rstd.fill(np.nan)  # the mean of no squares
    y = dispatch_forward(kernel, x, (weight, bias, tau, eps), (rstd,), out)
    return y, rstd


def filter_response_norm_backward(grad_out, x, rstd, weight=None, bias=None, tau=None, *,
                                  output_mask=(True, True, True, True, True), out=None,
                                  backend=None):
    """Gradients of :func:`filter_response_norm_forward`.

    The TLU's maximum splits the gradient as ``torch.maximum``'s backward does: all
    of it to the larger of y and tau, half to each on a tie.

    Parameters
    ----------
    grad_out : ndarray, same shape and dtype as x
        The gradient of the output (z, or y without a TLU).
    x : ndarray
        The forward's input.
    rstd : ndarray of shape (N, C)
        As returned by :func:`filter_response_norm_forward`.
    weight, bias, tau : ndarray of shape (C,) or None
        The forward's (bias is read only to recompute the TLU's comparison).
    output_mask : five bools
        Which of (grad_x, grad_weight, grad_bias, grad_tau, grad_eps) to compute; the
        others are returned as None and cost nothing (grad_tau is None without tau).
    out : ndarray, optional
        Written with grad_x and returned (any layout; it may be grad_out itself).
    backend : {"cython", "numba", "numpy"}, optional

    Returns
    -------
    grad_x : ndarray or None
        Same layout as x.
    grad_weight, grad_bias, grad_tau : ndarray of shape (C,) or None
    grad_eps : 0-d ndarray of x's dtype, or None
        The gradient with respect to the eps added to the mean square.
    """
    x = check_input(x)
    grad_out = _validation.check_grad_out(grad_out, x)
    C = x.shape[1]
    weight = _validation.check_vector("weight", weight, C, x)
    bias = _validation.check_vector("bias", bias, C, x)
    tau = _validation.check_vector("tau", tau, C, x)
    want_x, want_weight, want_bias, want_tau, want_eps = _validation.check_mask(output_mask, 5)
    rstd = check_stats("rstd", rstd, (x.shape[0], C), x, "filter_response_norm_forward")
    kernel = load_backend(backend).filter_response_norm_backward
    grad_weight = np.zeros(C, x.dtype) if want_weight else None
    grad_bias = np.zeros(C, x.dtype) if want_bias else None
    grad_tau = np.zeros(C, x.dtype) if want_tau and tau is not None else None
    grad_eps = np.zeros(1, np.float64) if want_eps else None
    grad_x = dispatch_backward(kernel, grad_out, x, (rstd, weight, bias, tau), want_x,
                               (grad_weight, grad_bias, grad_tau, grad_eps), out)
    if grad_eps is not None:
        grad_eps = np.asarray(grad_eps[0], dtype=x.dtype)
    return grad_x, grad_weight, grad_bias, grad_tau, grad_eps
