"""Filter Response Normalization (+ TLU) and EvoNorm-S0 reference: float64, the papers'
formulas and their derivatives written out.

FRN (Singh & Krishnan 2020), per (n, c): x_hat = x / sqrt(mean(x^2) + eps),
y = max(w x_hat + b, tau). EvoNorm-S0 (Liu et al. 2020), per (n, group):
y = x * sigmoid(v x) / sqrt(var(x) + eps) * w + b, var biased (timm's EvoNorm2dS0).
Tensors arrive as GroupNorm's do (fastbn/_numpy/group_norm.py); FRN is seen as
groups of one channel.
"""
import numpy as np

from fastbn._numpy.group_norm import _as_groups, _per_channel


def _sigmoid(t):
    with np.errstate(over="ignore"):  # exp(-t) = inf gives 0, the right limit
        return 1.0 / (1.0 + np.exp(-t))


def _tlu_gates(y, tau):
    """torch.maximum(y, tau)'s gradients as fractions of the incoming one: all to the
    larger, half each on a tie, all to both where either is NaN."""
    tie = np.where(y == tau, 0.5, 1.0)
    return np.where(y < tau, 0.0, tie), np.where(y > tau, 0.0, tie)


def _as_float64_groups(a, num_groups, channels_last):
    return _as_groups(a, num_groups, channels_last).astype(np.float64)


def filter_response_norm_forward(x, weight, bias, tau, eps, y, rstd, channels_last,
                                 n_threads):
    C = rstd.shape[1]
    xg = _as_float64_groups(x, C, channels_last)  # (N, C, 1, S)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        r = 1.0 / np.sqrt((xg ** 2).mean(axis=(2, 3), keepdims=True) + eps)
        out = xg * r
        if weight is not None:
            out = out * _per_channel(weight, C)
        if bias is not None:
            out = out + _per_channel(bias, C)
        if tau is not None:
            out = np.maximum(out, _per_channel(tau, C))  # NaN if either is, as torch's
    rstd[...] = r[:, :, 0, 0]
    _as_groups(y, C, channels_last)[...] = out


def filter_response_norm_backward(grad_out, x, rstd, weight, bias, tau, grad_x, grad_weight,
                                  grad_bias, grad_tau, grad_eps, channels_last, n_threads):
    C = rstd.shape[1]
    xg = _as_float64_groups(x, C, channels_last)
    dz = _as_float64_groups(grad_out, C, channels_last)
    r = rstd.astype(np.float64)[:, :, None, None]
    w = np.ones((1, C, 1, 1)) if weight is None else _per_channel(weight, C)
    with np.errstate(invalid="ignore", over="ignore"):
        x_hat = xg * r
        if tau is None:
            g = dz
        else:
            y = x_hat * w + (0.0 if bias is None else _per_channel(bias, C))
            gate_y, gate_tau = _tlu_gates(y, _per_channel(tau, C))
            g = dz * gate_y
            if grad_tau is not None:
                grad_tau[...] = (dz * gate_tau).sum(axis=(0, 3)).reshape(-1)
        if grad_weight is not None:
            grad_weight[...] = (g * x_hat).sum(axis=(0, 3)).reshape(-1)
        if grad_bias is not None:
            grad_bias[...] = g.sum(axis=(0, 3)).reshape(-1)
        d_hat = g * w  # the gradient reaching x_hat
        dot = (d_hat * x_hat).sum(axis=3, keepdims=True)
        if grad_eps is not None:  # d x_hat / d eps = -x_hat r^2 / 2
            grad_eps[...] = -0.5 * (dot * r ** 2).sum()
        if grad_x is not None:
            # d x_hat_i / d x_j = r (delta_ij - x_hat_i x_hat_j / S)
            grad_x_g = r * (d_hat - x_hat * dot / xg.shape[3])
            _as_groups(grad_x, C, channels_last)[...] = grad_x_g


def evonorm_s0_forward(x, weight, bias, v, eps, y, mean, rstd, channels_last, n_threads):
    G = mean.shape[1]
    xg = _as_float64_groups(x, G, channels_last)  # (N, G, D, S)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        group_mean = xg.mean(axis=(2, 3), keepdims=True)
        r = 1.0 / np.sqrt(((xg - group_mean) ** 2).mean(axis=(2, 3), keepdims=True) + eps)
        out = xg if v is None else xg * _sigmoid(_per_channel(v, G) * xg)
        out = out * r
        if weight is not None:
            out = out * _per_channel(weight, G)
        if bias is not None:
            out = out + _per_channel(bias, G)
    mean[...] = group_mean[:, :, 0, 0]
    rstd[...] = r[:, :, 0, 0]
    _as_groups(y, G, channels_last)[...] = out


def evonorm_s0_backward(grad_out, x, mean, rstd, weight, v, grad_x, grad_weight, grad_bias,
                        grad_v, channels_last, n_threads):
    G = mean.shape[1]
    C = x.shape[2] if channels_last else x.shape[1]
    xg = _as_float64_groups(x, G, channels_last)
    dy = _as_float64_groups(grad_out, G, channels_last)
    mu = mean.astype(np.float64)[:, :, None, None]
    r = rstd.astype(np.float64)[:, :, None, None]
    w = np.ones((1, G, C // G, 1)) if weight is None else _per_channel(weight, G)
    with np.errstate(invalid="ignore", over="ignore"):
        if v is None:
            s, d_act = 1.0, 1.0
        else:
            s = _sigmoid(_per_channel(v, G) * xg)
            d_act = s + _per_channel(v, G) * xg * s * (1.0 - s)  # d (x s(v x)) / dx
        u = xg * s
        if grad_weight is not None:
            grad_weight[...] = (dy * u * r).sum(axis=(0, 3)).reshape(-1)
        if grad_bias is not None:
            grad_bias[...] = dy.sum(axis=(0, 3)).reshape(-1)
        if grad_v is not None:
            grad_v[...] = (dy * w * r * xg ** 2 * s * (1.0 - s)).sum(axis=(0, 3)).reshape(-1)
        if grad_x is not None:
            # r depends on x: d r / d x_j = -r^3 (x_j - mean) / (D S)
            dot = (dy * w * u).sum(axis=(2, 3), keepdims=True)
            count = xg.shape[2] * xg.shape[3]
            grad_x_g = dy * w * r * d_act - dot * r ** 3 * (xg - mu) / count
            _as_groups(grad_x, G, channels_last)[...] = grad_x_g
