"""SyncBatchNorm that works on CPU tensors: BatchNorm whose training statistics are those of
the whole batch spread over the processes of a torch.distributed process group (gloo).

torch's own ``torch.nn.SyncBatchNorm`` raises for CPU tensors; the algorithm does not
depend on the device. Each call, in training, with more than one process:

- forward: each process computes its part's per-channel (count, mean, M2 = sum of squared
  deviations) with fastbn's BatchNorm kernel (float64 sums around a per-channel pivot);
  one ``all_gather`` collects every process's (count, mean, M2); every process combines
  them in float64 with Chan et al.'s parallel formula (M2 = sum M2_i + sum n_i (mean_i -
  mean)^2), in rank order, so every process holds the same statistics to the last bit,
  accurate for data with a large mean (no sum of squares is formed); the running
  statistics are updated with them as BatchNorm's (unbiased variance, momentum); the
  output is fastbn's eval-mode kernel with the global mean and variance. Processes may
  hold different batch sizes, and a process may hold none (N = 0).
- backward: each process computes its part's per-channel sum(dy) and sum(dy * x_hat)
  (fastbn's backward kernel); one ``all_reduce`` adds them (2 C float64 values); each
  process finishes its own input gradient, ``(dy - sum(dy) / n - x_hat * sum(dy *
  x_hat) / n) * invstd * weight`` with the global sums and count n. Parameter gradients
  are the local sums, as torch's (DistributedDataParallel all-reduces them).

An all_gather rather than an all_reduce in the forward: Chan's combination needs every
part's mean, which a sum cannot carry without either a second round or sums of squares
(catastrophic cancellation for data whose mean is large against its spread). It is
what torch's SyncBatchNorm does too (it gathers mean, invstd and count).

Bytes per layer and training step: the forward all-gathers world_size x (2 C + 1)
float64 values, the backward all-reduces 2 C float64 values.

Without an initialised torch.distributed (or with a process group of one process), as
torch's: local BatchNorm. Eval mode: local BatchNorm with the running statistics.
"""
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

import fastbn
from fastbn.nn import _function, functional
from fastbn.nn._small_batch import RunningState, check_eps, channel_view
from fastbn.nn.modules import FastbnNorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(FastbnNorm, nn.modules.batchnorm._BatchNorm):
    """:class:`torch.nn.SyncBatchNorm` for CPU tensors, on fastbn's kernels; input (N, C, *).

    torch's constructor (plus ``backend=``), ``process_group`` attribute, parameters,
    buffers, state dict and ``convert_sync_batchnorm``; training synchronises the
    statistics over the process group (default: the whole world) with gloo or any
    backend that can all-gather and all-reduce CPU tensors.

    Not a subclass of :class:`torch.nn.SyncBatchNorm`: DistributedDataParallel rejects
    those in CPU models ("SyncBatchNorm layers only work with GPU modules"). Tensors
    fastbn's kernels do not take (CUDA, float16, bfloat16) run torch's SyncBatchNorm
    forward.

    Parameters
    ----------
    num_features : int
    eps, momentum, affine, track_running_stats, process_group, device, dtype, bias
        As :class:`torch.nn.SyncBatchNorm`.
    backend : {"cython", "numba", "numpy"}, optional
        fastbn's backend; None follows :func:`fastbn.get_backend`.

    See docs/small_batch.md.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True, backend=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.process_group = process_group
        self.backend = backend

    def _check_input_dim(self, input):
        nn.SyncBatchNorm._check_input_dim(self, input)

    def _check_non_zero_input_channels(self, input):
        nn.SyncBatchNorm._check_non_zero_input_channels(self, input)

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._sync_group()
        if group is not None and not _function.runs_on_fastbn(
                input, self.weight, self.bias, self.running_mean, self.running_var):
            # CUDA and the other tensors fastbn does not take: torch's SyncBatchNorm.
            return nn.SyncBatchNorm.forward(self, input)
        state = RunningState(self)
        if group is None:
            output = functional.batch_norm(input, state.running_mean, state.running_var,
                                           self.weight, self.bias, state.bn_training,
                                           state.momentum_of_batch(), self.eps,
                                           backend=self.backend)
        else:
            output = sync_batch_norm(input, state.running_mean, state.running_var, self.weight,
                                     self.bias, state.momentum_of_batch(), self.eps, group,
                                     backend=self.backend)
        state.count()
        return output

    def _sync_group(self):
        """The process group to synchronise over in this call, or None for local BatchNorm.

        As torch's SyncBatchNorm: no synchronisation in eval mode, without an initialised
        torch.distributed, or in a group of one process. One difference: a process group
        given explicitly while torch.distributed is not initialised (any more) raises,
        where torch would silently run local BatchNorm.
        """
        if not self.training:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if self.process_group is not None:
                raise RuntimeError(
                    "SyncBatchNorm has a process_group, but torch.distributed is not "
                    "initialised: call torch.distributed.init_process_group first (or set "
                    "process_group=None to run local BatchNorm outside a distributed run)")
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None, *, backend=None):
        """Replace every BatchNorm layer of `module` by a fastbn SyncBatchNorm, as torch's.

        Every :class:`torch.nn.modules.batchnorm._BatchNorm` (torch's BatchNorm*d and
        SyncBatchNorm, fastbn's BatchNorm-family layers) becomes one, sharing its
        parameters and buffers (an optimizer built before still trains them) and keeping
        its training mode.

        Parameters
        ----------
        module : torch.nn.Module
        process_group : optional
            The group to synchronise over; None: the whole world.
        backend : {"cython", "numba", "numpy"}, optional

        Returns
        -------
        torch.nn.Module
            `module` with its BatchNorm layers replaced; a new SyncBatchNorm if `module`
            itself is one.
        """
        module_output = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module_output = cls(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group,
                                bias=module.bias is not None, backend=backend)
            share_state(module, module_output)
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group,
                                                                      backend=backend))
        return module_output

    def extra_repr(self):
        return f"{super().extra_repr()}, process_group={self.process_group!r}"


def share_state(source, target):
    """Make `target` (a BatchNorm-family layer) use `source`'s parameters and buffers (the
    same objects) and training mode."""
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.training = source.training


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, process_group,
                    *, backend=None):
    """Training-mode batch normalization with the statistics of the whole batch held by the
    processes of `process_group` (each calls this with its part). See the module docstring.

    Parameters
    ----------
    input : float32 or float64 CPU Tensor of shape (N, C) or (N, C, *spatial), N >= 0
    running_mean, running_var : Tensor of shape (C,) or None
        Updated in place with the global statistics (the same on every process).
    weight, bias : Tensor of shape (C,) or None
    momentum, eps : float
    process_group : torch.distributed process group
    backend : {"cython", "numba", "numpy"}, optional

    Returns
    -------
    Tensor
        This process's part of the output, in `input`'s memory layout.
    """
    check_eps(eps, True)
    _function.check_channel_vectors(input, (("running_mean", running_mean),
                                            ("running_var", running_var),
                                            ("weight", weight), ("bias", bias)))
    x = _function.as_array(input)
    local = _local_moments(x, eps, backend)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, local, group=process_group)
    gathered = torch.stack(parts).numpy()
    count, mean, var_sum = _combine(gathered)
    if count == 0:  # every process is empty: as BatchNorm on an empty batch (no update)
        return functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps,
                                     backend=backend)
    if count == 1:  # every process raises, from the same gathered numbers
        raise ValueError(f"Expected more than 1 value per channel when training, got "
                         f"{int(count)} over the {gathered.shape[0]} processes of the group")
    if running_mean is not None:
        running_mean.copy_(torch.from_numpy(
            momentum * mean + (1.0 - momentum) * running_mean.double().numpy()))
    if running_var is not None:
        running_var.copy_(torch.from_numpy(
            momentum * (var_sum / (count - 1)) + (1.0 - momentum) * running_var.double().numpy()))
    mean = mean.astype(x.dtype)
    var = (var_sum / count).astype(x.dtype)
    op = _SyncOp(mean, var, count, eps, process_group, backend)
    if _function.needs_grad(input, weight, bias):
        return SyncBatchNormFunction.apply(op, input, weight, bias)
    return torch.from_numpy(op.normalize(x, weight, bias))


def _local_moments(x, eps, backend):
    """This process's (count, mean, M2) per channel, as one float64 tensor [n, mean, M2]."""
    channels = x.shape[1]
    count = x.size // channels
    local = np.zeros(2 * channels + 1)
    local[0] = count
    if count == 1:  # one value per channel: its mean, and no spread
        local[1:channels + 1] = x.reshape(channels)
    elif count > 1:
        # BatchNorm's training kernel with momentum 1 leaves the mean and unbiased variance
        # in the "running" buffers (its output is thrown away).
        mean = np.zeros(channels, x.dtype)
        var = np.zeros(channels, x.dtype)
        fastbn.batch_norm_forward(x, None, None, mean, var, True, 1.0, eps, backend=backend)
        local[1:channels + 1] = mean
        local[channels + 1:] = var.astype(np.float64) * (count - 1)
    return torch.from_numpy(local)


def _combine(gathered):
    """(count, mean, M2) of the whole batch from each process's row [n_i, mean_i, M2_i]."""
    channels = (gathered.shape[1] - 1) // 2
    counts = gathered[:, :1]
    means = gathered[:, 1:channels + 1]
    count = counts.sum()
    if count == 0:
        return 0.0, np.zeros(channels), np.zeros(channels)
    mean = (counts * means).sum(axis=0) / count
    var_sum = gathered[:, channels + 1:].sum(axis=0) + (counts * (means - mean) ** 2).sum(axis=0)
    return count, mean, var_sum


class _SyncOp:
    """The global statistics of one call and what the backward needs to synchronise."""

    __slots__ = ("mean", "var", "count", "eps", "process_group", "backend", "invstd")

    def __init__(self, mean, var, count, eps, process_group, backend):
        self.mean = mean
        self.var = var
        self.count = count
        self.eps = eps
        self.process_group = process_group
        self.backend = backend
        self.invstd = None

    def normalize(self, x, weight, bias):
        """The output: eval-mode BatchNorm with the global mean and (biased) variance."""
        y, _, self.invstd = fastbn.batch_norm_forward(
            x, weight, bias, self.mean, self.var, False, 0.0, self.eps, backend=self.backend)
        return y

    def backward(self, grad_y, input, weight, output_mask):
        want_x, want_weight, want_bias = output_mask
        x = _function.as_array(input)
        # This process's sum(dy * x_hat) and sum(dy): its parameter gradients, and its share
        # of the sums the input gradient needs.
        _, dot, sum_dy = fastbn.batch_norm_backward(
            _function.as_array(grad_y), x, None, self.mean, self.invstd, False,
            output_mask=(False, True, True), backend=self.backend)
        grad_input = None
        if want_x:
            channels = x.shape[1]
            sums = torch.from_numpy(np.concatenate([sum_dy, dot]).astype(np.float64))
            dist.all_reduce(sums, group=self.process_group)
            total_dy, total_dot = sums.numpy()[:channels], sums.numpy()[channels:]
            invstd = self.invstd.astype(np.float64)
            scale = invstd if weight is None else invstd * _function.as_array(weight)
            # dx = scale * (dy - total_dy / n - x_hat * total_dot / n), x_hat = (x - mean) *
            # invstd: the terms in x by an eval-mode pass (x - mean) * scale_x + offset
            # (variance 1, eps 0), then dy * scale added.
            scale_x = -scale * invstd * total_dot / self.count
            offset = -scale * total_dy / self.count
            grad_x, _, _ = fastbn.batch_norm_forward(
                x, scale_x.astype(x.dtype), offset.astype(x.dtype), self.mean,
                np.ones(channels, x.dtype), False, 0.0, 0.0, backend=self.backend)
            grad_input = torch.from_numpy(grad_x)
            grad_input.addcmul_(grad_y, channel_view(torch.from_numpy(scale.astype(x.dtype)),
                                                     input))
        return (grad_input, torch.from_numpy(dot) if want_weight else None,
                torch.from_numpy(sum_dy) if want_bias else None)


class SyncBatchNormFunction(torch.autograd.Function):
    """The autograd node of `sync_batch_norm`: its backward all-reduces (once
    differentiable, as torch's SyncBatchNorm)."""

    @staticmethod
    def forward(ctx, op, input, weight, bias):
        y = op.normalize(_function.as_array(input), _function.as_array(weight),
                         _function.as_array(bias))
        ctx.op = op
        ctx.save_for_backward(input, weight)
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        input, weight = ctx.saved_tensors
        return (None,) + ctx.op.backward(grad_y, input, weight, ctx.needs_input_grad[1:4])
