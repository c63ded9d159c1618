"""Batch Renormalization (Ioffe 2017): BatchNorm whose batch statistics are corrected
towards the running ones, so that training normalizes as inference will.

In training, with the batch mean mu_B and sigma_B = sqrt(var_B + eps) (biased
variance, as BatchNorm normalizes with), and the running statistics *before* this
call's update, mu and sigma = sqrt(running_var + eps):

    r = clip(sigma_B / sigma, 1 / r_max, r_max)
    d = clip((mu_B - mu) / sigma, -d_max, d_max)
    y = weight * ((x - mu_B) / sigma_B * r + d) + bias

with r and d constants for the backward (no gradient flows through them). The
running statistics are then updated as BatchNorm's (momentum, unbiased batch
variance, ``momentum=None`` as a cumulative average), so the state dict is
BatchNorm's and eval mode is BatchNorm's. With r_max = 1 and d_max = 0, r = 1 and
d = 0: BatchNorm, gradients included.

sigma is sqrt(running_var + eps), not a separately tracked running standard
deviation (the paper's moving sigma): eval-mode BatchNorm normalizes with exactly
that, which is what r and d steer the training statistics towards.

On fastbn's kernels: since r and d are constants, y = (weight * r) * x_hat +
(bias + weight * d) with x_hat BatchNorm's training normalization, an affine map per
channel. The forward is BatchNorm's training forward without affine (x_hat, mu_B,
1 / sigma_B, and the running update), then an eval-mode BatchNorm pass in place
with weight * r, bias + weight * d and unit statistics (the affine map). The
backward is BatchNorm's training backward with weight * r for the input's
gradient; the parameters' are r * sum(dy * x_hat) + d * sum(dy) and sum(dy).
"""
import numbers

import numpy as np
import torch
from torch import nn

import fastbn
from fastbn.nn import _function, functional
from fastbn.nn._small_batch import RunningState, channel_view, check_batch_size, check_eps
from fastbn.nn.modules import FastbnNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "batch_renorm"]


def check_r_max(r_max):
    r_max = _real("r_max", r_max)
    if not r_max >= 1.0:  # also rejects nan
        raise ValueError(f"r_max must be >= 1 (r is clipped to [1 / r_max, r_max]), got {r_max}")
    return r_max


def check_d_max(d_max):
    d_max = _real("d_max", d_max)
    if not d_max >= 0.0:
        raise ValueError(f"d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
    return d_max


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def batch_renorm(input, running_mean, running_var, weight=None, bias=None, training=False,
                 momentum=0.1, eps=1e-5, r_max=3.0, d_max=5.0, *, backend=None):
    """Batch renormalization (Ioffe 2017); see the module docstring for the formulas.

    Parameters
    ----------
    input : Tensor of shape (N, C) or (N, C, *spatial), up to 3 spatial dims
    running_mean, running_var : Tensor of shape (C,)
        In training, r and d are computed from their values before the call, then they
        are updated as BatchNorm's. In eval mode they normalize the input.
    weight, bias : Tensor of shape (C,) or None
    training : bool
        False: BatchNorm's eval mode (r and d play no part).
    momentum : float
    eps : float
    r_max : float, >= 1
    d_max : float, >= 0
    backend : {"cython", "numba", "numpy"}, optional

    Returns
    -------
    Tensor
        Same shape, dtype and memory layout as `input`.
    """
    r_max, d_max = check_r_max(r_max), check_d_max(d_max)
    if not training:
        return functional.batch_norm(input, running_mean, running_var, weight, bias, False,
                                     momentum, eps, backend=backend)
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running_mean and running_var in training: r and "
                         "d correct the batch statistics towards them")
    check_eps(eps, True)
    check_batch_size(input.shape)
    _function.check_channel_vectors(input, (("running_mean", running_mean),
                                            ("running_var", running_var),
                                            ("weight", weight), ("bias", bias)))
    if not _function.runs_on_fastbn(input, weight, bias, running_mean, running_var):
        return _batch_renorm_torch(input, running_mean, running_var, weight, bias, momentum,
                                   eps, r_max, d_max)
    op = BatchRenormOp(running_mean, running_var, momentum, eps, r_max, d_max, backend)
    return _function.apply(op, input, weight, bias, _function.needs_grad(input, weight, bias))


def _renorm_affine(x_hat, weight, bias, r, d):
    """weight * (x_hat * r + d) + bias, per channel, in torch ops."""
    scale, shift = (r, d) if weight is None else (weight * r, weight * d)
    if bias is not None:
        shift = shift + bias
    return x_hat * channel_view(scale, x_hat) + channel_view(shift, x_hat)


def _batch_renorm_torch(input, running_mean, running_var, weight, bias, momentum, eps, r_max,
                        d_max):
    """The training forward in torch ops, for tensors fastbn's kernels do not take."""
    with torch.no_grad():
        var, mean = torch.var_mean(input, [0] + list(range(2, input.dim())), correction=0)
        sigma = (running_var + eps).sqrt()
        r = ((var + eps).sqrt() / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean - running_mean) / sigma).clamp(-d_max, d_max)
    # After r and d: this updates the running statistics.
    x_hat = torch.batch_norm(input, None, None, running_mean, running_var, True, momentum, eps,
                             False)
    return _renorm_affine(x_hat, weight, bias, r, d)


class BatchRenormOp:
    """Batch renormalization in training for `fastbn.nn._function.NormFunction`."""

    __slots__ = ("running_mean", "running_var", "momentum", "eps", "r_max", "d_max", "backend")

    def __init__(self, running_mean, running_var, momentum, eps, r_max, d_max, backend):
        self.running_mean = running_mean
        self.running_var = running_var
        self.momentum = momentum
        self.eps = eps
        self.r_max = r_max
        self.d_max = d_max
        self.backend = backend

    def forward(self, x, weight, bias):
        running_mean = _function.as_array(self.running_mean)
        running_var = _function.as_array(self.running_var)
        # r and d use the running statistics before the kernel below updates them.
        mean_before = running_mean.astype(np.float64)
        sigma = np.sqrt(running_var.astype(np.float64) + self.eps)
        x_hat, mean, invstd = fastbn.batch_norm_forward(
            x, None, None, running_mean, running_var, True, self.momentum, self.eps,
            backend=self.backend)
        if x.size == 0:  # no statistics (nan): nothing to correct
            r, d = np.ones(x.shape[1]), np.zeros(x.shape[1])
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.clip(1.0 / (invstd.astype(np.float64) * sigma), 1.0 / self.r_max,
                            self.r_max)
                d = np.clip((mean.astype(np.float64) - mean_before) / sigma, -self.d_max,
                            self.d_max)
        w = 1.0 if weight is None else weight.astype(np.float64)
        scale = (w * r).astype(x.dtype)
        shift = w * d if bias is None else w * d + bias
        # The affine map as an eval-mode pass with mean 0, variance 1 and eps 0 (1 / sqrt(1)
        # is exactly 1), in place.
        channels = x.shape[1]
        y, _, _ = fastbn.batch_norm_forward(
            x_hat, scale, shift.astype(x.dtype), np.zeros(channels, x.dtype),
            np.ones(channels, x.dtype), False, 0.0, 0.0, out=x_hat, backend=self.backend)
        return y, (mean, invstd, scale, r.astype(x.dtype), d.astype(x.dtype))

    def backward(self, grad_y, x, weight, bias, stats, output_mask):
        mean, invstd, scale, r, d = stats
        want_x, want_weight, want_bias = output_mask
        # dL/dx is BatchNorm's with weight * r (y = weight * r * x_hat + a constant);
        # the kernel's weight gradient is sum(dy * x_hat), whatever the weight.
        grad_x, grad_x_hat, grad_bias = fastbn.batch_norm_backward(
            grad_y, x, scale, mean, invstd, True,
            output_mask=(want_x, want_weight, want_weight or want_bias), backend=self.backend)
        grad_weight = None
        if want_weight:
            grad_weight = (r.astype(np.float64) * grad_x_hat
                           + d.astype(np.float64) * grad_bias).astype(x.dtype)
        return grad_x, grad_weight, grad_bias if want_bias else None

    def backward_differentiable(self, grad_y, input, weight, bias, stats, output_mask):
        _, _, _, r, d = stats
        return _function.torch_gradients(
            lambda input, weight, bias: _renorm_affine(
                torch.batch_norm(input, None, None, None, None, True, 0.0, self.eps, False),
                weight, bias, r, d),
            grad_y, input, weight, output_mask, input.shape[1])


class _BatchRenorm(FastbnNorm):
    """BatchRenorm*d's constructor and forward; the torch class comes second in the bases."""

    def __init__(self, num_features, r_max=3.0, d_max=5.0, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True, backend=None):
        if not track_running_stats:
            raise ValueError(f"{type(self).__name__} needs track_running_stats=True: r and d "
                             "correct the batch statistics towards the running ones")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.r_max = r_max
        self.d_max = d_max
        self.backend = backend

    @property
    def r_max(self):
        """r's clipping bound (>= 1; 1 disables the scale correction). A schedule may change it
        between calls (the paper ramps it from 1 to 3)."""
        return self.__dict__["_r_max"]

    @r_max.setter
    def r_max(self, value):
        self.__dict__["_r_max"] = check_r_max(value)

    @property
    def d_max(self):
        """d's clipping bound (>= 0; 0 disables the shift correction). The paper ramps it
        from 0 to 5."""
        return self.__dict__["_d_max"]

    @d_max.setter
    def d_max(self, value):
        self.__dict__["_d_max"] = check_d_max(value)

    def forward(self, input):
        self._check_input_dim(input)
        state = RunningState(self)
        output = batch_renorm(input, state.running_mean, state.running_var, self.weight,
                              self.bias, state.bn_training, state.momentum_of_batch(), self.eps,
                              self.r_max, self.d_max, backend=self.backend)
        state.count()
        return output

    def extra_repr(self):
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"


_DOC = """Batch Renormalization (Ioffe 2017) on fastbn's kernels; input {shape}.

    Training normalizes with the batch statistics corrected towards the running ones
    by r = clip(sigma_B / sigma, 1 / r_max, r_max) and d = clip((mu_B - mu) / sigma,
    -d_max, d_max), constants for the backward, sigma = sqrt(running_var + eps). The
    running statistics are updated as :class:`torch.nn.{base}`'s; eval mode, parameters,
    buffers and state dict are its too. With r_max = 1 and d_max = 0 it is BatchNorm.

    Parameters
    ----------
    num_features : int
    r_max : float, >= 1
    d_max : float, >= 0
        Attributes a schedule may change between calls (``m.r_max = 2.0``).
    eps, momentum, affine, device, dtype, bias
        As :class:`torch.nn.{base}`.
    track_running_stats : True
        False raises: r and d need the running statistics.
    backend : {{"cython", "numba", "numpy"}}, optional
        fastbn's backend; None follows :func:`fastbn.get_backend`.

    See docs/small_batch.md.
    """


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    __doc__ = _DOC.format(shape="(N, C) or (N, C, L)", base="BatchNorm1d")


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    __doc__ = _DOC.format(shape="(N, C, H, W)", base="BatchNorm2d")


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    __doc__ = _DOC.format(shape="(N, C, D, H, W)", base="BatchNorm3d")
