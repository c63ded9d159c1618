"""InstanceNorm over NumPy arrays: group norm with one channel per group, plus running statistics.

Modelled on ``torch.nn.functional.instance_norm``; the kernels are the group-norm ones.

Input without a batch dimension, (C, *spatial), is for the modules to handle,
as in PyTorch (``_InstanceNorm._handle_no_batch_input``): only a module knows
its number of spatial dims, so only it can tell (C, L) from (N, C). It calls
these functions with ``x[None]`` and takes ``[0]`` of the results.
"""
import numpy as np

from fastbn import _layout, _validation
from fastbn.group_norm import (check_backward_inputs, check_input, check_stats, run_backward,
                               run_forward)


def instance_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, *, out=None,
                          backend=None):
    """Instance normalization forward, as ``torch.nn.functional.instance_norm``.

    Each (sample, channel) is normalized with the mean and biased variance of
    its prod(spatial) values, or with the running statistics.

    Parameters
    ----------
    x : ndarray, float32 or float64, shape (N, C) or (N, C, *spatial) with up to 3 spatial dims
        C-contiguous and channels-last arrays are read in place; any other
        strides are first copied to C order. With ``use_input_stats`` it needs
        more than one spatial value.
    weight, bias : ndarray of shape (C,) and x's dtype, or None
        The affine parameters (None: weight 1, bias 0).
    running_mean, running_var : ndarray of shape (C,) and x's dtype, or None (both or neither)
        With ``use_input_stats`` they are updated in place as PyTorch does, with
        the batch averages of the per-instance mean and unbiased variance:
        ``r = (1 - momentum) * r + momentum * mean_over_batch(stat)``.
        Otherwise they normalize x. An empty batch leaves them unchanged
        (PyTorch fills them with nan).
    use_input_stats : bool
        Normalize with each instance's statistics (True) or the running ones (False).
    momentum : float
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
    mean, rstd : ndarray of shape (N, C)
        The mean and 1 / sqrt(var + eps) that normalized each instance (the
        running ones, repeated, when not ``use_input_stats``). Pass them to
        :func:`instance_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        On bad input, before any running statistic changes.
    """
    x = check_input(x)
    N, C = x.shape[:2]
    weight, bias, running_mean, running_var = _validation.check_channel_parameters(
        x, weight, bias, running_mean, running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    eps = _validation.check_eps(eps)
    use_input_stats = bool(use_input_stats)
    spatial_size = _layout.spatial_size(x.shape)
    if not use_input_stats:
        if running_mean is None:
            raise ValueError("running_mean and running_var are needed when use_input_stats=False "
                             "(they normalize the input); pass both, or use_input_stats=True")
        with np.errstate(divide="ignore", invalid="ignore"):
            rstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        given_stats = (np.repeat(running_mean[None, :].astype(x.dtype), N, axis=0),
                       np.repeat(rstd[None, :].astype(x.dtype), N, axis=0))
        return run_forward(x, C, weight, bias, eps, out, backend, given_stats=given_stats)

    if spatial_size == 1:
        raise ValueError("Expected more than 1 spatial element when training, "
                         f"got input size {list(x.shape)}")
    if running_mean is None:
        return run_forward(x, C, weight, bias, eps, out, backend)
    momentum = _validation.check_real("momentum", momentum)
    why = "use_input_stats updates the running statistics in place"
    _validation.check_writeable("running_mean", running_mean, why)
    _validation.check_writeable("running_var", running_var, why)
    variance = np.empty((N, C))

    def update_running_stats(mean):
        # PyTorch updates a copy of the running statistics per instance and then
        # averages the copies: the same as updating with the averages.
        batch_mean = mean.astype(np.float64).mean(axis=0)
        batch_unbiased_var = variance.mean(axis=0) * (spatial_size / (spatial_size - 1))
        running_mean[...] = ((1.0 - momentum) * running_mean.astype(np.float64)
                             + momentum * batch_mean)
        running_var[...] = ((1.0 - momentum) * running_var.astype(np.float64)
                            + momentum * batch_unbiased_var)
    return run_forward(x, C, weight, bias, eps, out, backend, variance=variance,
                       updated=(running_mean, running_var), after_kernel=update_running_stats)


def instance_norm_backward(grad_out, x, mean, rstd, weight, use_input_stats=True, *,
                           output_mask=(True, True, True), out=None, backend=None):
    """Instance normalization backward: the gradients autograd gives through
    ``torch.nn.functional.instance_norm``.

    Parameters
    ----------
    grad_out : ndarray, same shape and dtype as x
    x : ndarray
        The forward's input.
    mean, rstd : ndarray of shape (N, C)
        As returned by :func:`instance_norm_forward`.
    weight : ndarray of shape (C,) or None
    use_input_stats : bool
        As in the forward. With False the statistics are constants:
        grad_x = grad_out * rstd * weight.
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
    shape = x.shape[:2]
    mean = check_stats("mean", mean, shape, x, "instance_norm_forward")
    rstd = check_stats("rstd", rstd, shape, x, "instance_norm_forward")
    return run_backward(grad_out, x, mean, rstd, weight, bool(use_input_stats), mask, out,
                        backend)
