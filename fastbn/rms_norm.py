"""RMSNorm over NumPy arrays: argument checks, then dispatch to a backend.

Modelled on ATen's `_fused_rms_norm` / `_fused_rms_norm_backward` (the latter
has no CPU kernel in torch 2.13: PyTorch differentiates `rms_norm` through
autograd there).
"""
import numpy as np

from fastbn import _rowwise, _validation
from fastbn._backends import load_backend
from fastbn._threads import get_num_threads


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, out=None, backend=None):
    """Root-mean-square normalization forward, as ``torch.nn.functional.rms_norm``.

    Each slice over the trailing dims named by `normalized_shape` is scaled on
    its own: ``y = x * rstd * weight`` with ``rstd = 1 / sqrt(mean(x**2) + eps)``.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (*, *normalized_shape)
        C-contiguous input is read in place; any other strides are first
        copied to C order.
    normalized_shape : int or sequence of ints
    weight : ndarray of shape `normalized_shape` and x's dtype, or None (weight 1)
    eps : float or None
        Added to the mean square; any real number, as in PyTorch (a negative eps gives
        NaN where mean(x**2) + eps < 0). None means the machine epsilon of x's dtype,
        ``np.finfo(x.dtype).eps``, as in PyTorch.
    out : ndarray, optional
        Written with y and returned. Any strides; it may be x itself (updated in
        place). One that is not C-contiguous, or partly overlaps an input, is written
        through a temporary (the same results, as NumPy's ufuncs).
    backend : {"cython", "numba", "numpy"}, optional

    Returns
    -------
    y : ndarray
        x's shape and dtype, C-contiguous (unless `out` says otherwise).
    rstd : ndarray of shape (*, 1, ..., 1)
        x's leading dims, then a 1 for each normalized dim, as
        ``torch._fused_rms_norm``. Pass it to :func:`rms_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        On bad input, before anything is written.
    """
    x, normalized_shape, rows, D, stats_shape = _rowwise.check_input(x, normalized_shape)
    weight = _rowwise.check_parameter("weight", weight, normalized_shape, x)
    eps = float(np.finfo(x.dtype).eps) if eps is None else _validation.check_eps(eps)
    kernels = load_backend(backend)

    x_rows = _rowwise.rows_view(x, rows, D)
    y, y_rows, written = _rowwise.output_buffer("out", out, x.shape, x.dtype, rows, D, (x_rows,),
                                                (weight,))
    rstd = np.empty(stats_shape, x.dtype)
    if x.size == 0:
        rstd.fill(np.nan)  # as PyTorch, for rows of no values
        return y, rstd
    kernels.rms_norm_forward(x_rows, weight, eps, y_rows, rstd.reshape(rows), get_num_threads())
    if written is not None:
        np.copyto(y, written)
    return y, rstd


def rms_norm_backward(grad_out, x, normalized_shape, rstd, weight=None, *,
                      output_mask=(True, True), out=None, backend=None):
    """Root-mean-square normalization backward, the gradients of :func:`rms_norm_forward`.

    The signature of ``torch.ops.aten._fused_rms_norm_backward``.

    Parameters
    ----------
    grad_out : ndarray, same shape and dtype as x
    x : ndarray
        The forward's input.
    normalized_shape : int or sequence of ints
    rstd : ndarray
        As returned by :func:`rms_norm_forward` (a flat array of one value per
        row is accepted too).
    weight : ndarray of shape `normalized_shape`, or None
    output_mask : two bools
        Which of (grad_x, grad_weight) to compute; the other is returned as
        None. grad_weight is None when weight is None.
    out : ndarray, optional
        Written with grad_x and returned (any strides; it may be grad_out or x itself;
        a partial overlap with an input goes through a temporary).
    backend : {"cython", "numba", "numpy"}, optional

    Returns
    -------
    grad_x : ndarray or None
        x's shape, C-contiguous.
    grad_weight : ndarray of shape `normalized_shape`, or None
    """
    x, normalized_shape, rows, D, stats_shape = _rowwise.check_input(x, normalized_shape)
    grad_out = _validation.check_grad_out(grad_out, x)
    rstd = _rowwise.check_statistic("rstd", rstd, stats_shape, rows, x, "rms_norm_forward")
    weight = _rowwise.check_parameter("weight", weight, normalized_shape, x)
    want_x, want_weight = _validation.check_mask(output_mask, 2)
    kernels = load_backend(backend)

    x_rows = _rowwise.rows_view(x, rows, D)
    grad_out_rows = _rowwise.rows_view(grad_out, rows, D)
    grad_x = grad_x_rows = written = None
    if want_x:
        grad_x, grad_x_rows, written = _rowwise.output_buffer(
            "out", out, x.shape, x.dtype, rows, D, (x_rows, grad_out_rows), (weight, rstd))
    want_weight = want_weight and weight is not None
    grad_weight = np.zeros(normalized_shape, x.dtype) if want_weight else None
    if x.size == 0:
        return grad_x, grad_weight
    kernels.rms_norm_backward(
        grad_out_rows, x_rows, rstd, weight, grad_x_rows,
        None if grad_weight is None else grad_weight.reshape(D), get_num_threads())
    if written is not None:
        np.copyto(grad_x, written)
    return grad_x, grad_weight
