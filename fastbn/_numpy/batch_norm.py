"""BatchNorm reference: two-pass statistics in float64, formulas as in ATen; the fused
activation (fastbn/_activations.py) applied to the normalized output."""
import numpy as np

from fastbn import _activations


def _layout(channels_last):
    """(axes to reduce, shape that broadcasts a per-channel vector) for a 3-D kernel view."""
    return ((0, 1), (1, 1, -1)) if channels_last else ((0, 2), (1, -1, 1))


def _invstd(var, eps):
    # As ATen: a zero variance with eps == 0 gives 0, not inf.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((var == 0) & (eps == 0), 0.0, 1.0 / np.sqrt(var + eps))


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       y, save_mean, save_invstd, channels_last, n_threads, activation=0,
                       negative_slope=0.0, counter=None):
    axes, per_channel = _layout(channels_last)
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if training:
            count = x.size // len(save_mean)  # N * S values per channel
            # Shift each channel by one of its values (x - pivot is exact for values within
            # a factor 2 of it), so data with a large mean keeps its digits in the mean, the
            # variance and y. A non-finite pivot would turn an inf mean into nan: use 0.
            pivot = x64[0, 0] if channels_last else x64[0, :, 0]
            pivot = np.where(np.isfinite(pivot), pivot, 0.0)
            shifted = x64 - pivot.reshape(per_channel)
            shifted_mean = shifted.mean(axis=axes)
            centred = shifted - shifted_mean.reshape(per_channel)
            mean = pivot + shifted_mean
            var_sum = (centred ** 2).sum(axis=axes)
            invstd = _invstd(var_sum / count, eps)
            if running_mean is not None:
                running_mean[...] = momentum * mean + (1 - momentum) * running_mean.astype(np.float64)
            if running_var is not None:
                unbiased_var = var_sum / (count - 1)
                running_var[...] = momentum * unbiased_var + (1 - momentum) * running_var.astype(np.float64)
        else:
            mean = running_mean.astype(np.float64)
            centred = x64 - mean.reshape(per_channel)
            invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        channels = len(save_mean)
        w = np.ones(channels) if weight is None else weight.astype(np.float64)
        b = np.zeros(channels) if bias is None else bias.astype(np.float64)
        z = centred * (invstd * w).reshape(per_channel) + b.reshape(per_channel)
        y[...] = _activations.apply(activation, z, negative_slope) if activation else z
    save_mean[...] = mean
    save_invstd[...] = invstd
    if training and counter is not None:  # (not atomic with the update above: plain Python)
        counter += 1


def batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training,
                        grad_x, grad_weight, grad_bias, channels_last, n_threads, activation=0,
                        negative_slope=0.0, bias=None):
    axes, per_channel = _layout(channels_last)
    dy = grad_out.astype(np.float64)
    centred = x.astype(np.float64) - save_mean.astype(np.float64).reshape(per_channel)
    invstd = save_invstd.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        if activation:  # dL/dz from dL/dy, with z (the normalized x) recomputed
            w = 1.0 if weight is None else weight.astype(np.float64).reshape(per_channel)
            b = 0.0 if bias is None else bias.astype(np.float64).reshape(per_channel)
            z = centred * invstd.reshape(per_channel) * w + b
            dy = dy * _activations.derivative(activation, z, negative_slope)
        sum_dy = dy.sum(axis=axes)
        dot = (dy * centred).sum(axis=axes)
        if grad_x is not None:
            scale = invstd if weight is None else invstd * weight.astype(np.float64)
            if training:
                count = x.size // len(invstd)  # N * S values per channel
                k = dot * invstd ** 2 / count
                dy = dy - (sum_dy / count).reshape(per_channel) - centred * k.reshape(per_channel)
            grad_x[...] = dy * scale.reshape(per_channel)
        if grad_weight is not None:
            grad_weight[...] = dot * invstd
        if grad_bias is not None:
            grad_bias[...] = sum_dy
