"""GroupNorm reference: two-pass statistics in float64, formulas as in ATen.

Instance norm is group norm with one channel per group; it reaches these
kernels with statistics given (its running ones) when it does not use the
input's.
"""
import numpy as np


def _as_groups(a, num_groups, channels_last):
    """View of a 3-D kernel view as (N, G, C // G, S), whatever its memory layout."""
    if channels_last:
        N, S, C = a.shape
        return a.reshape(N, S, num_groups, C // num_groups).transpose(0, 2, 3, 1)
    N, C, S = a.shape
    return a.reshape(N, num_groups, C // num_groups, S)


def _per_channel(v, num_groups):
    """A (C,) parameter as float64 of shape (1, G, C // G, 1), to broadcast over groups."""
    return v.astype(np.float64).reshape(1, num_groups, -1, 1)


def group_norm_forward(x, weight, bias, eps, compute_stats, y, mean, rstd, variance,
                       channels_last, n_threads):
    G = mean.shape[1]
    xg = _as_groups(x, G, channels_last).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if compute_stats:
            group_mean = xg.mean(axis=(2, 3))
            group_var = ((xg - group_mean[:, :, None, None]) ** 2).mean(axis=(2, 3))
            group_rstd = 1.0 / np.sqrt(group_var + eps)
            mean[...] = group_mean
            rstd[...] = group_rstd
            if variance is not None:
                variance[...] = group_var
        else:
            group_mean = mean.astype(np.float64)
            group_rstd = rstd.astype(np.float64)
        yg = (xg - group_mean[:, :, None, None]) * group_rstd[:, :, None, None]
        if weight is not None:
            yg = yg * _per_channel(weight, G)
        if bias is not None:
            yg = yg + _per_channel(bias, G)
    _as_groups(y, G, channels_last)[...] = yg


def group_norm_backward(grad_out, x, weight, mean, rstd, stats_from_input,
                        grad_x, grad_weight, grad_bias, channels_last, n_threads):
    G = mean.shape[1]
    dy = _as_groups(grad_out, G, channels_last).astype(np.float64)
    x_hat = ((_as_groups(x, G, channels_last) - mean.astype(np.float64)[:, :, None, None])
             * rstd.astype(np.float64)[:, :, None, None])
    with np.errstate(invalid="ignore", over="ignore"):
        if grad_weight is not None:
            grad_weight[...] = (dy * x_hat).sum(axis=(0, 3)).reshape(-1)
        if grad_bias is not None:
            grad_bias[...] = dy.sum(axis=(0, 3)).reshape(-1)
        if grad_x is None:
            return
        dy_hat = dy if weight is None else dy * _per_channel(weight, G)
        if stats_from_input:
            # The mean and variance depend on x: subtract the projections onto 1 and x_hat.
            dy_hat = (dy_hat - dy_hat.mean(axis=(2, 3), keepdims=True)
                      - x_hat * (dy_hat * x_hat).mean(axis=(2, 3), keepdims=True))
        _as_groups(grad_x, G, channels_last)[...] = dy_hat * rstd.astype(np.float64)[:, :, None, None]
