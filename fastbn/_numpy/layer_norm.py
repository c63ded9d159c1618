"""LayerNorm and RMSNorm reference: two-pass statistics in float64, one row at a time.

Both take the (rows, D) view of the input: each row is normalized on its own.
RMSNorm is LayerNorm without centring (the mean is taken to be 0) and without bias.
"""
import numpy as np


def _affine(normalized, weight, bias):
    if weight is not None:
        normalized = normalized * weight.astype(np.float64)
    if bias is not None:
        normalized = normalized + bias.astype(np.float64)
    return normalized


def _forward(x, weight, bias, eps, centred, y, mean, rstd):
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        row_mean = x64.mean(axis=1) if centred else np.zeros(len(x64))
        centred_x = x64 - row_mean[:, None]
        row_rstd = 1.0 / np.sqrt((centred_x ** 2).mean(axis=1) + eps)
        y[...] = _affine(centred_x * row_rstd[:, None], weight, bias)
    if mean is not None:
        mean[...] = row_mean
    rstd[...] = row_rstd


def _backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias):
    dy = grad_out.astype(np.float64)
    row_rstd = rstd.astype(np.float64)[:, None]
    centred_x = x.astype(np.float64)
    if mean is not None:
        centred_x = centred_x - mean.astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        x_hat = centred_x * row_rstd
        if grad_x is not None:
            g = dy if weight is None else dy * weight.astype(np.float64)
            # d/dx of (x - mean) * rstd: the mean term only where the forward centred.
            projected = g - x_hat * (g * x_hat).mean(axis=1, keepdims=True)
            if mean is not None:
                projected -= g.mean(axis=1, keepdims=True)
            grad_x[...] = projected * row_rstd
        if grad_weight is not None:
            grad_weight[...] = (dy * x_hat).sum(axis=0)
        if grad_bias is not None:
            grad_bias[...] = dy.sum(axis=0)


def layer_norm_forward(x, weight, bias, eps, y, mean, rstd, n_threads):
    _forward(x, weight, bias, eps, True, y, mean, rstd)


def layer_norm_backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias,
                        n_threads):
    _backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias)


def rms_norm_forward(x, weight, eps, y, rstd, n_threads):
    _forward(x, weight, None, eps, False, y, None, rstd)


def rms_norm_backward(grad_out, x, rstd, weight, grad_x, grad_weight, n_threads):
    _backward(grad_out, x, None, rstd, weight, grad_x, grad_weight, None)
