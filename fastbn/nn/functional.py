"""Functional fastbn ops on torch tensors, with the signatures of `torch.nn.functional`.

Each runs fastbn's kernels on float32 and float64 CPU tensors (through autograd
when a gradient is wanted) and hands every other call (float16, bfloat16, mixed
dtypes, other devices, tensor subclasses, torch.compile tracing) to torch's own
op, so the numbers are always torch's or fastbn's float32/float64 ones.

With ``backend=None``, inputs on which torch's op was measured to be faster
(small ones, below a size measured per op, and most channels-last ones; see
`torch_is_faster`) also run torch's op, except where torch's op is known to give
wrong numbers (`torch_is_wrong`). Naming a backend runs fastbn on every call the
kernels can take (the calls listed above still run torch's op).
"""
import math

import torch
import torch.nn.functional as torch_functional

from fastbn import _activations
from fastbn.nn import _function

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"]

# Filter Response Normalization and EvoNorm-S0 live in a module of their own.
from fastbn.nn._norm_act_functional import evonorm_s0, filter_response_norm  # noqa: E402

__all__ += ["evonorm_s0", "filter_response_norm"]

# With no backend named, fastbn's path runs only where it was measured to beat torch's
# (the module-level tables of `python -m fastbn bench`, 2 threads on the project
# machine; docs/nn.md). fastbn's path costs 40-80 us more per training step (forward +
# backward: the autograd.Function round trip, NumPy views, argument checks) and about
# 15 us more per eval forward than torch's native ops; its kernels win that back only
# from some size on, which differs per op with how fast torch's own kernel is:
# op -> (values from which fastbn runs when autograd records the call,
#        values from which it runs in a forward autograd does not record).
MIN_VALUES = {
    "batch_norm": (1 << 16, 1 << 19),  # torch's eval pass already runs near memory speed
    # ... but not its eval pass followed by an activation, which fastbn fuses into one:
    # fastbn's BatchNorm + ReLU6 eval forward won from 226k values (1 thread, MobileNetV2's
    # shapes at N = 2 and 8: 1.0-1.2x at 226-301k, 0.9-1.0x at 123-164k; Xeon, AVX-512).
    "batch_norm_activation": (1 << 16, 1 << 18),
    "group_norm": (1 << 18, 1 << 19),
    "layer_norm": (3 << 17, 3 << 17),  # torch's row kernels are vectorised and parallel
    "instance_norm": (0, 0),  # torch runs it as a batch norm over N * C channels, slowly
    "rms_norm": (0, 0),  # torch 2.13 has no fused CPU kernel: several ops
}
# Channels-last memory runs torch's op, whose channels-last kernels were as fast or
# faster, except GroupNorm through autograd on large feature maps (from this many
# spatial values), where torch's was 1.5-5.7x slower than fastbn's at every batch
# size measured (down to 25k values), so the size rule above does not apply there.
MIN_SPATIAL_GROUP_NORM_CHANNELS_LAST = 28 * 28


def torch_is_faster(op, input, eval_forward):
    """Whether torch's `op` beats fastbn's path on `input` (rules measured, see above).

    `eval_forward`: a forward that autograd does not record.
    """
    if input.is_contiguous():  # (an (N, C) input is both contiguous and channels-last)
        return input.numel() < MIN_VALUES[op][eval_forward]
    return not (op == "group_norm" and not eval_forward and _is_channels_last(input)
                and math.prod(input.shape[2:]) >= MIN_SPATIAL_GROUP_NORM_CHANNELS_LAST)


def torch_is_wrong(op, input, record):
    """Whether torch's CPU `op` may give wrong numbers on `input` (found on torch 2.13 by
    bench/torch_layout_bugs.py; docs/nn.md, "Where torch is wrong").

    torch's batch-norm backward, which InstanceNorm's runs too, misreads channels-last
    memory when N = 1: given an input and an output gradient of different layouts, one
    of them channels-last with a batch stride other than C x spatial (legal when N = 1,
    and what a view or InstanceNorm's own reshape gives), its gradients are wrong.
    Whether the gradient will be laid out so is not known at the forward, so every
    recorded call with N = 1 and more than one spatial value counts.

    `record`: autograd records the call (a backward may follow).
    """
    return (record and op in ("batch_norm", "instance_norm") and input.dim() >= 4
            and input.shape[0] == 1 and math.prod(input.shape[2:]) > 1)


def _is_channels_last(input):
    memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    return memory_format is not None and input.is_contiguous(memory_format=memory_format)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, negative_slope=0.01,
               num_batches_tracked=None, backend=None):
    """Batch normalization, as :func:`torch.nn.functional.batch_norm`, optionally followed
    by an activation computed in the same passes.

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
    activation : {None, "identity", "relu", "relu6", "silu", "hardswish", "leaky_relu"}
        Applied to the output: ``activation(batch_norm(...))`` with torch's numbers,
        fused into fastbn's kernels (torch's functional activation where torch's op runs).
    negative_slope : float
        leaky_relu's slope.
    num_batches_tracked : Tensor of one int64, optional
        A module's batch counter: in training, increased by one together with the
        running statistics (in the same kernel call, so that an interrupt cannot leave
        one updated without the other), and not at all by a call that raises.
    backend : {"cython", "numba", "numpy"}, optional
        fastbn's backend. None uses :func:`fastbn.get_backend`, or torch's op where
        that is faster (`torch_is_faster`) and not known to be wrong (`torch_is_wrong`).

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
    code = _activations.activation_code(activation)
    if code == 5:
        negative_slope = _activations.check_negative_slope(negative_slope)
    counter = num_batches_tracked if training else None
    if not _function.runs_on_fastbn(input, weight, bias, running_mean, running_var):
        return _torch_batch_norm(torch_functional.batch_norm, input, running_mean, running_var,
                                 weight, bias, training, momentum, eps, code, negative_slope,
                                 counter)
    # torch.nn.functional.batch_norm's checks, with its errors and messages, for both the
    # paths below: plain CPU tensors have no __torch_function__ to honour.
    if training:
        _check_batch_size(input)
    _check_channels("batch_norm", input, weight, bias)
    record = _function.needs_grad(input, weight, bias)
    rule = "batch_norm_activation" if code else "batch_norm"
    if (backend is None and torch_is_faster(rule, input, not (training or record))
            and not torch_is_wrong("batch_norm", input, record)):
        return _torch_batch_norm(_aten_batch_norm, input, running_mean, running_var, weight,
                                 bias, training, momentum, eps, code, negative_slope, counter)
    _function.check_channel_vectors(input, (("running_mean", running_mean),
                                            ("running_var", running_var),
                                            ("weight", weight), ("bias", bias)))
    if not training:  # torch's errors
        for name, statistic in (("running_mean", running_mean), ("running_var", running_var)):
            if statistic is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    op = _function.BatchNormOp(running_mean, running_var, training, momentum, eps, backend,
                               code, negative_slope, counter)
    return _function.apply(op, input, weight, bias, record)


def _aten_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    # torch.nn.functional.batch_norm without its Python-level checks, made above.
    return torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum,
                            eps, False)  # False: no cuDNN on the CPU


def _torch_batch_norm(torch_op, input, running_mean, running_var, weight, bias, training,
                      momentum, eps, activation, negative_slope, counter):
    """torch's batch norm (`torch_op`), then torch's activation; the counter counted as
    torch's module counts it (before the call), and uncounted if the call raises."""
    if counter is not None:
        counter.add_(1)
    try:
        output = torch_op(input, running_mean, running_var, weight, bias, training, momentum,
                          eps)
    except Exception:
        if counter is not None:
            counter.sub_(1)
        raise
    return _function.torch_activation(activation, output, negative_slope, in_place=True)


def _check_channels(op, input, weight, bias):
    """torch's batch_norm and instance_norm raise IndexError for an input of no channels
    with a weight or bias (ATen indexes their first value); raise that too, before any
    state changes, with a message that says what is wrong."""
    if input.shape[1] == 0 and (weight is not None or bias is not None):
        raise IndexError(f"{op}: the input has no channels (size {list(input.shape)}), so "
                         "there is nothing for weight and bias to scale: torch raises "
                         "IndexError here (index 0 out of range for a tensor of size [0])")


def _check_batch_size(input):
    size = input.shape
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {size}")


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, backend=None):
    """Group normalization, as :func:`torch.nn.functional.group_norm`.

    Parameters
    ----------
    input : Tensor of shape (N, C, *spatial), 0 to 3 spatial dims
    num_groups : int
        A divisor of C; each group of C / num_groups consecutive channels of a sample
        is normalized with its own mean and biased variance.
    weight, bias : Tensor of shape (C,) or None
    eps : float
        Any real number, as torch (NaN where var + eps < 0).
    backend : {"cython", "numba", "numpy"}, optional
        As in :func:`batch_norm`.

    Returns
    -------
    Tensor
        Same shape, dtype and memory layout (channels-last or not) as `input`.
    """
    if (not _function.runs_on_fastbn(input, weight, bias)
            or not _fits(input.shape[1], weight, bias) or input.shape[1] % num_groups):
        # torch's op, which also raises torch's errors on what does not fit.
        return torch_functional.group_norm(input, num_groups, weight, bias, eps)
    torch_functional._verify_batch_size([input.shape[0] * input.shape[1] // num_groups,
                                         num_groups] + list(input.shape[2:]))
    record = _function.needs_grad(input, weight, bias)
    if backend is None and torch_is_faster("group_norm", input, not record):
        return torch.group_norm(input, num_groups, weight, bias, eps, False)
    op = _function.GroupNormOp(num_groups, eps, backend)
    return _function.apply(op, input, weight, bias, record)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, backend=None):
    """Instance normalization, as :func:`torch.nn.functional.instance_norm`.

    Parameters
    ----------
    input : Tensor of shape (N, C, *spatial), 0 to 3 spatial dims
    running_mean, running_var : Tensor of shape (C,) or None (both or neither)
        With `use_input_stats`, updated in place with the batch average of each
        instance's mean and unbiased variance; they normalize the input otherwise.
    weight, bias : Tensor of shape (C,) or None
    use_input_stats : bool
    momentum : float
    eps : float
        Any real number, as torch (NaN where var + eps < 0).
    backend : {"cython", "numba", "numpy"}, optional
        As in :func:`batch_norm`.

    Returns
    -------
    Tensor
        Same shape, dtype and memory layout (channels-last or not) as `input`.
    """
    if (not _function.runs_on_fastbn(input, weight, bias, running_mean, running_var)
            or not _fits(input.shape[1], weight, bias, running_mean, running_var)
            or (running_mean is None) != (running_var is None)):
        return torch_functional.instance_norm(input, running_mean, running_var, weight, bias,
                                              use_input_stats, momentum, eps)
    if use_input_stats:
        torch_functional._verify_spatial_size(input.shape)
    _check_channels("instance_norm", input, weight, bias)
    record = _function.needs_grad(input, weight, bias)
    if (backend is None and torch_is_faster("instance_norm", input, not record)
            and not torch_is_wrong("instance_norm", input, record)):
        return torch.instance_norm(input, weight, bias, running_mean, running_var,
                                   use_input_stats, momentum, eps, False)
    op = _function.InstanceNormOp(running_mean, running_var, use_input_stats, momentum, eps,
                                  backend)
    return _function.apply(op, input, weight, bias, record)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """Layer normalization, as :func:`torch.nn.functional.layer_norm`.

    Parameters
    ----------
    input : Tensor of shape (*, *normalized_shape)
    normalized_shape : sequence of ints
        The trailing dims normalized together.
    weight, bias : Tensor of shape `normalized_shape` or None
    eps : float
        Any real number, as torch (NaN where var + eps < 0).
    backend : {"cython", "numba", "numpy"}, optional
        As in :func:`batch_norm`.

    Returns
    -------
    Tensor
        `input`'s shape and dtype, contiguous.
    """
    normalized_shape = _as_shape(normalized_shape)
    if (not _function.runs_on_fastbn(input, weight, bias, dims=_row_dims(normalized_shape))
            or not _trailing_fits(input, normalized_shape, weight, bias)):
        return torch_functional.layer_norm(input, normalized_shape, weight, bias, eps)
    record = _function.needs_grad(input, weight, bias)
    if backend is None and torch_is_faster("layer_norm", input, not record):
        return torch.layer_norm(input, normalized_shape, weight, bias, eps, False)
    op = _function.LayerNormOp(normalized_shape, eps, backend)
    return _function.apply(op, input, weight, bias, record)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, backend=None):
    """Root-mean-square normalization, as :func:`torch.nn.functional.rms_norm`.

    Parameters
    ----------
    input : Tensor of shape (*, *normalized_shape)
    normalized_shape : sequence of ints
    weight : Tensor of shape `normalized_shape` or None
    eps : float or None
        Any real number, as torch; None: the machine epsilon of `input`'s dtype.
    backend : {"cython", "numba", "numpy"}, optional
        As in :func:`batch_norm`.

    Returns
    -------
    Tensor
        `input`'s shape and dtype, contiguous.
    """
    normalized_shape = _as_shape(normalized_shape)
    if (not _function.runs_on_fastbn(input, weight, dims=_row_dims(normalized_shape))
            or not _trailing_fits(input, normalized_shape, weight)):
        return torch_functional.rms_norm(input, normalized_shape, weight, eps)
    record = _function.needs_grad(input, weight, None)
    if backend is None and torch_is_faster("rms_norm", input, not record):
        return torch.rms_norm(input, normalized_shape, weight, eps)
    op = _function.RMSNormOp(normalized_shape, eps, backend)
    return _function.apply(op, input, weight, None, record)


def _fits(channels, *vectors):
    """Whether every per-channel tensor given (not None) has `channels` values."""
    return all(vector is None or vector.numel() == channels for vector in vectors)


def _as_shape(normalized_shape):
    return ((normalized_shape,) if isinstance(normalized_shape, int)
            else tuple(normalized_shape))


def _row_dims(normalized_shape):
    """The numbers of input dims fastbn's row kernels are given: the normalized ones, and
    up to 8 in all."""
    return range(len(normalized_shape), 9)


def _trailing_fits(input, normalized_shape, *parameters):
    """Whether `normalized_shape` is not empty, input ends with it, and each parameter given
    has that shape (torch's op raises torch's error on what does not fit)."""
    return (len(normalized_shape) > 0
            and input.shape[input.dim() - len(normalized_shape):] == normalized_shape
            and all(p is None or p.shape == normalized_shape for p in parameters))
