"""Functional fastbn ops on torch tensors, with the signatures of `torch.nn.functional`.

Each runs fastbn's kernels on float32 and float64 CPU tensors (through autograd
when a gradient is wanted) and hands every other call (float16, bfloat16, mixed
dtypes, other devices, tensor subclasses, torch.compile tracing) to torch's own
op, so the numbers are always torch's or fastbn's float32/float64 ones.

With ``backend=None``, inputs on which torch's op was measured to be faster
(small ones, channels-last ones; see `torch_is_faster`) also run torch's op;
naming a backend always runs fastbn.
"""
import math

import torch
import torch.nn.functional as torch_functional

from fastbn.nn import _function

__all__ = ["batch_norm"]

# With no backend named, fastbn's path runs only where it was measured to beat torch's
# (2 threads on the project machine, bench/compare_nn.py, docs/nn.md). fastbn's path
# costs about 40 us more per training step (forward + backward) than torch's native
# one (the autograd.Function round trip, NumPy views, argument checks) and about 15 us
# more per eval forward. Its kernels win that back from about 64Ki values in training
# (or whenever autograd records the call), but only from about 512Ki values in an
# eval-mode forward, whose single pass torch already runs near memory speed. On
# channels-last memory torch's kernels were as fast or faster at every size measured.
MIN_VALUES = 1 << 16
MIN_VALUES_EVAL_FORWARD = 1 << 19


def torch_is_faster(input, eval_forward):
    """Whether torch's op beats fastbn's path on `input` (rules measured, see above).

    `eval_forward`: an eval-mode call that autograd does not record.
    """
    if input.numel() < (MIN_VALUES_EVAL_FORWARD if eval_forward else MIN_VALUES):
        return True
    # Channels-last (or other strides, which fastbn would copy first); an (N, C) input
    # is contiguous.
    return not input.is_contiguous()


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, backend=None):
    """Batch normalization, as :func:`torch.nn.functional.batch_norm`.

    Parameters
    ----------
    input : Tensor of shape (N, C) or (N, C, *spatial), up to 3 spatial dims
    running_mean, running_var : Tensor of shape (C,) or None
        Updated in place when `training` (with the unbiased batch variance);
        they normalize the input when not.
    weight, bias : Tensor of shape (C,) or None
    training : bool
        Normalize with the batch statistics (True) or the running ones.
    momentum : float
        ``running = (1 - momentum) * running + momentum * batch_statistic``.
    eps : float
        Added to the variance; > 0 in training, >= 0 otherwise (as torch).
    backend : {"cython", "numba", "numpy"}, optional
        fastbn's backend. None uses :func:`fastbn.get_backend`, or torch's op where
        that is faster (`torch_is_faster`).

    Returns
    -------
    Tensor
        Same shape, dtype and memory layout (channels-last or not) as `input`.

    Raises
    ------
    ValueError, TypeError
        On bad arguments, before any running statistic changes.
    """
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if torch.compiler.is_compiling() or not _function.runs_on_fastbn(
            input, weight, bias, running_mean, running_var):
        return torch_functional.batch_norm(input, running_mean, running_var, weight, bias,
                                           training, momentum, eps)
    # torch.nn.functional.batch_norm's checks, with its errors and messages, for both the
    # paths below: plain CPU tensors have no __torch_function__ to honour.
    if training:
        _check_batch_size(input)
    record = _function.needs_grad(input, weight, bias)
    if backend is None and torch_is_faster(input, not (training or record)):
        return torch.batch_norm(input, weight, bias, running_mean, running_var, training,
                                momentum, eps, False)  # False: no cuDNN on the CPU
    _function.check_channel_vectors(input, (("running_mean", running_mean),
                                            ("running_var", running_var),
                                            ("weight", weight), ("bias", bias)))
    op = _function.BatchNormOp(running_mean, running_var, training, momentum, eps, backend)
    return _function.apply(op, input, weight, bias, record)


def _check_batch_size(input):
    size = input.shape
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {size}")
