"""LayerNorm over NumPy arrays: argument checks, then dispatch to a backend.

Modelled on ATen's `native_layer_norm` / `native_layer_norm_backward`.
"""
import numpy as np

from fastbn import _rowwise, _validation
from fastbn._backends import load_backend
from fastbn._threads import get_num_threads


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
                       backend=None):
    """Layer normalization forward, as ``torch.native_layer_norm``.

    Each slice over the trailing dims named by `normalized_shape` is normalized
    on its own: ``y = (x - mean) * rstd * weight + bias``, with the biased
    variance and ``rstd = 1 / sqrt(var + eps)``.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (*, *normalized_shape)
        C-contiguous input is read in place; any other strides are first
        copied to C order.
    normalized_shape : int or sequence of ints
        The trailing dims to normalize over (an int means one dim).
    weight, bias : ndarray of shape `normalized_shape` and x's dtype, or None
        The elementwise affine parameters (None: weight 1, bias 0).
    eps : float
        Added to the variance. Any real number, as in ATen: a negative eps gives NaN
        where var + eps < 0.
    out : ndarray, optional
        Written with y and returned. Any strides; it may be x itself (updated in
        place). One that is not C-contiguous, or partly overlaps an input, is written
        through a temporary (the same results, as NumPy's ufuncs).
    backend : {"cython", "numba", "numpy"}, optional
        Defaults to :func:`fastbn.get_backend`.

    Returns
    -------
    y : ndarray
        x's shape and dtype, C-contiguous (unless `out` says otherwise).
    mean, rstd : ndarray of shape (*, 1, ..., 1)
        Per-row statistics shaped as PyTorch's: x's leading dims, then a 1 for
        each normalized dim. Pass them to :func:`layer_norm_backward`. A row of
        no values (a 0 in `normalized_shape`) has mean 0 and rstd nan, as in PyTorch.

    Raises
    ------
    TypeError, ValueError
        On bad input, before anything is written.
    """
    x, normalized_shape, rows, D, stats_shape = _rowwise.check_input(x, normalized_shape)
    weight = _rowwise.check_parameter("weight", weight, normalized_shape, x)
    bias = _rowwise.check_parameter("bias", bias, normalized_shape, x)
    eps = _validation.check_eps(eps)
    kernels = load_backend(backend)

    x_rows = _rowwise.rows_view(x, rows, D)
    y, y_rows, written = _rowwise.output_buffer("out", out, x.shape, x.dtype, rows, D, (x_rows,),
                                                (weight, bias))
    mean = np.empty(stats_shape, x.dtype)
    rstd = np.empty(stats_shape, x.dtype)
    if x.size == 0:
        mean.fill(0.0)
        rstd.fill(np.nan)
        return y, mean, rstd
    kernels.layer_norm_forward(x_rows, weight, bias, eps, y_rows, mean.reshape(rows),
                               rstd.reshape(rows), get_num_threads())
    if written is not None:
        np.copyto(y, written)
    return y, mean, rstd


def layer_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight=None, bias=None, *,
                        output_mask=(True, True, True), out=None, backend=None):
    """Layer normalization backward, as ``torch.ops.aten.native_layer_norm_backward``.

    Parameters
    ----------
    grad_out : ndarray, same shape and dtype as x
    x : ndarray
        The forward's input.
    normalized_shape : int or sequence of ints
    mean, rstd : ndarray
        As returned by :func:`layer_norm_forward` (a flat array of one value
        per row is accepted too).
    weight, bias : ndarray of shape `normalized_shape`, or None
        The forward's parameters. As in ATen, bias is only looked at to know
        whether it exists: its gradient does not depend on its value.
    output_mask : three bools
        Which of (grad_x, grad_weight, grad_bias) to compute; the others are
        returned as None and cost nothing. The gradient of a parameter that is
        None is None.
    out : ndarray, optional
        Written with grad_x and returned (any strides; it may be grad_out or x itself;
        a partial overlap with an input goes through a temporary).
    backend : {"cython", "numba", "numpy"}, optional

    Returns
    -------
    grad_x : ndarray or None
        x's shape, C-contiguous.
    grad_weight, grad_bias : ndarray of shape `normalized_shape`, or None
    """
    x, normalized_shape, rows, D, stats_shape = _rowwise.check_input(x, normalized_shape)
    grad_out = _validation.check_grad_out(grad_out, x)
    mean = _rowwise.check_statistic("mean", mean, stats_shape, rows, x, "layer_norm_forward")
    rstd = _rowwise.check_statistic("rstd", rstd, stats_shape, rows, x, "layer_norm_forward")
    weight = _rowwise.check_parameter("weight", weight, normalized_shape, x)
    bias = _rowwise.check_parameter("bias", bias, normalized_shape, x)
    want_x, want_weight, want_bias = _validation.check_mask(output_mask, 3)
    kernels = load_backend(backend)

    x_rows = _rowwise.rows_view(x, rows, D)
    grad_out_rows = _rowwise.rows_view(grad_out, rows, D)
    grad_x = grad_x_rows = written = None
    if want_x:
        grad_x, grad_x_rows, written = _rowwise.output_buffer(
            "out", out, x.shape, x.dtype, rows, D, (x_rows, grad_out_rows), (weight, mean, rstd))
    # Sums over no rows are 0, as in PyTorch.
    want_weight = want_weight and weight is not None
    want_bias = want_bias and bias is not None
    grad_weight = np.zeros(normalized_shape, x.dtype) if want_weight else None
    grad_bias = np.zeros(normalized_shape, x.dtype) if want_bias else None
    if x.size == 0:
        return grad_x, grad_weight, grad_bias
    kernels.layer_norm_backward(
        grad_out_rows, x_rows, mean, rstd, weight, grad_x_rows,
        None if grad_weight is None else grad_weight.reshape(D),
        None if grad_bias is None else grad_bias.reshape(D), get_num_threads())
    if written is not None:
        np.copyto(grad_x, written)
    return grad_x, grad_weight, grad_bias
