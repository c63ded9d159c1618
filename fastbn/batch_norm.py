"""BatchNorm over NumPy arrays: argument checks, then dispatch to a backend.

Modelled on ATen's `native_batch_norm` / `native_batch_norm_backward`.
"""
import numpy as np

from fastbn import _activations, _layout, _validation
from fastbn._backends import load_backend
from fastbn._threads import get_num_threads


def _check_input(x):
    x = _validation.check_float_input("x", x)
    _validation.check_ndim(x, 2, 5)
    return x


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                       training=False, momentum=0.1, eps=1e-5, *, activation=None,
                       negative_slope=0.01, num_batches_tracked=None, out=None, backend=None):
    """Batch normalization forward, as ``torch.native_batch_norm``.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C) or (N, C, *spatial) with up to 3 spatial dims
        C-contiguous and channels-last arrays are read in place; any other
        strides are first copied to C order.
    weight, bias : ndarray of shape (C,) and x's dtype, or None
        The affine parameters (None: weight 1, bias 0).
    running_mean, running_var : ndarray of shape (C,) and x's dtype, or None
        In training they are updated in place as PyTorch does:
        ``r = (1 - momentum) * r + momentum * batch_stat``, with the unbiased
        batch variance for ``running_var``. In eval mode they normalize x.
    training : bool
        Normalize with the batch statistics (True) or the running ones (False).
    momentum : float
    eps : float
        Added to the variance. Any real number, as in ATen: a negative eps gives NaN
        where var + eps < 0.
    activation : {None, "identity", "relu", "relu6", "silu", "hardswish", "leaky_relu"}
        Applied to the normalized output in the same pass (fused BatchNorm +
        activation): y = act(BatchNorm(x)), as torch's activation after its BatchNorm.
        Pass the same `activation` to :func:`batch_norm_backward`.
    negative_slope : float
        leaky_relu's slope for negative values (torch's default 0.01); other
        activations ignore it.
    num_batches_tracked : ndarray of one int64, optional
        A batch counter (e.g. a torch module's ``num_batches_tracked`` buffer seen as an
        array), increased by one in training by the same native call that updates the
        running statistics, so that an interrupt (Ctrl-C) cannot leave one updated
        without the other. The numpy backend is plain Python and cannot promise that.
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
    save_mean, save_invstd : ndarray of shape (C,)
        The mean and 1 / sqrt(var + eps) that normalized x: the batch's in
        training, the running ones in eval mode. Pass them to
        :func:`batch_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        On bad input, before any running statistic changes.
    """
    x = _check_input(x)
    N, C = x.shape[:2]
    weight, bias, running_mean, running_var = _validation.check_channel_parameters(
        x, weight, bias, running_mean, running_var)
    eps = _validation.check_eps(eps)
    activation = _activations.activation_code(activation)
    negative_slope = _activations.check_negative_slope(negative_slope) if activation else 0.0
    training = bool(training)
    # Only training reads momentum.
    momentum = _validation.check_real("momentum", momentum) if training else 0.0
    if training:
        why = "training updates the running statistics in place"
        _validation.check_writeable("running_mean", running_mean, why)
        _validation.check_writeable("running_var", running_var, why)
        if x.size == C and x.size > 0:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {x.shape}")
        if num_batches_tracked is not None:
            _validation.check_counter("num_batches_tracked", num_batches_tracked)
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are needed when training=False "
                         "(eval mode normalizes with them); pass both, or training=True")
    else:
        num_batches_tracked = None  # only training counts
    return run_forward(load_backend(backend), x, weight, bias, running_mean, running_var,
                       training, momentum, eps, activation, negative_slope,
                       num_batches_tracked, out)


def run_forward(kernels, x, weight, bias, running_mean, running_var, training, momentum, eps,
                activation=0, negative_slope=0.0, counter=None, out=None, layout=None):
    """`batch_norm_forward` after its checks (arguments as they return them; `activation`
    a code), for callers that have made the same checks themselves (fastbn.nn).

    `layout`: x's ``_layout.kernel_view(x)``, where the caller has it already."""
    C = x.shape[1]
    x_view, channels_last = layout or _layout.kernel_view(x)
    y, y_view, copy_into = _layout.output_buffer("out", out, x, x_view, channels_last, (x_view,),
                                                 (weight, bias, running_mean, running_var))
    save_mean = np.empty(C, x.dtype)
    save_invstd = np.empty(C, x.dtype)
    if x.size == 0:
        # As torch.nn.functional.batch_norm: an empty output, running statistics untouched
        # (torch's module still counts the batch).
        if training:
            save_mean.fill(np.nan)
            save_invstd.fill(np.nan)
            if counter is not None:
                counter += 1
        else:
            save_mean[...] = running_mean
            with np.errstate(divide="ignore", invalid="ignore"):
                save_invstd[...] = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        return y, save_mean, save_invstd
    mean_buffer = _validation.contiguous_buffer(running_mean)
    var_buffer = _validation.contiguous_buffer(running_var)
    kernels.batch_norm_forward(x_view, weight, bias, mean_buffer, var_buffer, training,
                               momentum, eps, y_view, save_mean, save_invstd, channels_last,
                               get_num_threads(), activation, negative_slope, counter)
    if training:  # write a strided running statistic's update back (eval only reads them)
        if mean_buffer is not running_mean:
            np.copyto(running_mean, mean_buffer)
        if var_buffer is not running_var:
            np.copyto(running_var, var_buffer)
    if copy_into is not None:
        np.copyto(y, copy_into)
    return y, save_mean, save_invstd


def batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training, *,
                        output_mask=(True, True, True), activation=None, bias=None,
                        negative_slope=0.01, out=None, backend=None):
    """Batch normalization backward, as ``torch.native_batch_norm_backward``.

    Parameters
    ----------
    grad_out : ndarray, same shape and dtype as x
    x : ndarray
        The forward's input.
    weight : ndarray of shape (C,) or None
    save_mean, save_invstd : ndarray of shape (C,)
        As returned by :func:`batch_norm_forward`.
    training : bool
        As in the forward. In eval mode the statistics are constants:
        grad_x = grad_out * invstd * weight.
    output_mask : three bools
        Which of (grad_x, grad_weight, grad_bias) to compute; the others are
        returned as None and cost nothing.
    activation : str or None
        The forward's fused activation: grad_out is then the gradient of its output
        y = act(z), and z is recomputed from x, the statistics, `weight` and `bias`.
    bias : ndarray of shape (C,) or None
        The forward's bias; read only with an activation (z depends on it).
    negative_slope : float
        The forward's, for leaky_relu.
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
    x = _check_input(x)
    grad_out = _validation.check_grad_out(grad_out, x)
    N, C = x.shape[:2]
    weight = _validation.check_vector("weight", weight, C, x)
    if save_mean is None or save_invstd is None:
        raise ValueError("save_mean and save_invstd are needed: pass the last two results "
                         "of batch_norm_forward")
    save_mean = _validation.check_vector("save_mean", save_mean, C, x)
    save_invstd = _validation.check_vector("save_invstd", save_invstd, C, x)
    want_x, want_weight, want_bias = _validation.check_mask(output_mask, 3)
    activation = _activations.activation_code(activation)
    if activation:
        bias = _validation.check_vector("bias", bias, C, x)
        negative_slope = _activations.check_negative_slope(negative_slope)
    else:
        bias, negative_slope = None, 0.0
    return run_backward(load_backend(backend), grad_out, x, weight, save_mean, save_invstd,
                        bool(training), (want_x, want_weight, want_bias), activation,
                        negative_slope, bias, out)


def run_backward(kernels, grad_out, x, weight, save_mean, save_invstd, training, output_mask,
                 activation=0, negative_slope=0.0, bias=None, out=None, layout=None):
    """`batch_norm_backward` after its checks (see `run_forward`)."""
    want_x, want_weight, want_bias = output_mask
    C = x.shape[1]
    x_view, channels_last = layout or _layout.kernel_view(x)
    grad_out_view = _layout.view_or_copy_as_layout(grad_out, x_view, channels_last)
    grad_x = grad_x_view = copy_into = None
    if want_x:
        grad_x, grad_x_view, copy_into = _layout.output_buffer(
            "out", out, x, x_view, channels_last, (x_view, grad_out_view),
            (weight, save_mean, save_invstd, bias))
    # Sums over an empty batch are 0, as in PyTorch.
    grad_weight = np.zeros(C, x.dtype) if want_weight else None
    grad_bias = np.zeros(C, x.dtype) if want_bias else None
    if x.size == 0:
        return grad_x, grad_weight, grad_bias

    kernels.batch_norm_backward(grad_out_view, x_view, weight, save_mean, save_invstd, training,
                                grad_x_view, grad_weight, grad_bias, channels_last,
                                get_num_threads(), activation, negative_slope, bias)
    if copy_into is not None:
        np.copyto(grad_x, copy_into)
    return grad_x, grad_weight, grad_bias
