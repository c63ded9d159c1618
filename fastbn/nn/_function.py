"""The autograd glue shared by every fastbn.nn op: tensors in, fastbn kernels on
their memory, tensors out.

One `torch.autograd.Function`, `NormFunction`, is the graph node of every op.
What differs between ops lives in a small *op object* made per call (see
`BatchNormOp`), which holds the op's non-tensor arguments and says how to call
the op's NumPy-level functions:

- ``op.forward(x, weight, bias) -> (y, stats)``: arrays in, the output array
  and whatever the backward needs (e.g. the batch mean and 1 / std) out;
- ``op.backward(grad_y, x, weight, stats, output_mask) -> grads``: arrays;
- ``op.backward_differentiable(grad_y, input, weight, stats, output_mask)``:
  the same gradients from torch ops, for double backward (``create_graph=True``).

Each op (`BatchNormOp`, `GroupNormOp`, `LayerNormOp`, `RMSNormOp`,
`InstanceNormOp`) is one such class plus a functional wrapper in
`fastbn.nn.functional`.

Memory: tensors reach the kernels as NumPy views (`as_array`), and the kernels'
output arrays become tensors with `torch.from_numpy`: no copies either way, and
the output keeps the input's memory layout (channels-last in, channels-last out).
"""
import numpy as np
import torch

import fastbn
from fastbn import _layout, _threads
from fastbn import batch_norm as _batch_norm
from fastbn._backends import load_backend

# In a torch program, torch.set_num_threads governs fastbn's kernels too (fastbn/_threads.py).
_threads.follow(torch.get_num_threads)


def as_array(tensor):
    """A NumPy view of a CPU tensor's memory (None for None). No copy."""
    # force=True skips the requires_grad check: the views are only read by kernels,
    # and what they write (outputs, running statistics) is not part of the graph.
    return None if tensor is None else tensor.numpy(force=True)


def as_tensor(array):
    return None if array is None else torch.from_numpy(array)


PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
FLOAT_DTYPES = (torch.float32, torch.float64)


def runs_on_fastbn(input, *others, dims=range(2, 6)):
    """Whether the fastbn kernels can take these tensors: plain CPU tensors of one float
    dtype, the input with a number of dims in `dims` (`others` may be None), outside
    torch.compile's tracing.

    Anything else (float16, bfloat16, mixed dtypes, other devices, tensor subclasses
    such as the fake tensors of tracers, the wrapped tensors of torch.func transforms,
    more dims, a graph being traced) goes to torch's own op, so a call never gives
    numbers that differ from torch's.
    """
    if type(input) not in PLAIN_TENSOR_TYPES or torch.compiler.is_compiling():
        return False
    dtype = input.dtype
    if (dtype not in FLOAT_DTYPES
            or not input.is_cpu or input.layout is not torch.strided
            or input.dim() not in dims
            # torch.func's wrappers look like plain tensors but have no memory to hand
            # over (torch.autograd.Function.apply asks the same question).
            or torch._C._are_functorch_transforms_active()):
        return False
    for tensor in others:
        if tensor is not None and (type(tensor) not in PLAIN_TENSOR_TYPES
                                   or tensor.dtype is not dtype or not tensor.is_cpu):
            return False
    return True


def check_channel_vectors(input, named_vectors):
    """Raise torch's error for a per-channel tensor whose length is not input's channels."""
    channels = input.shape[1]
    for name, vector in named_vectors:
        if vector is not None and vector.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not "
                               f"{vector.numel()}")


def needs_grad(input, weight, bias):
    """Whether autograd must record the call: grad mode is on and a tensor requires grad."""
    return torch.is_grad_enabled() and (input.requires_grad
                                        or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def apply(op, input, weight, bias, record):
    """Run `op` on (input, weight, bias), through autograd when `record` (see `needs_grad`).

    Callers have checked `runs_on_fastbn`: plain tensors, no torch.func transform active.
    """
    if record:
        return _record(op, input, weight, bias)
    y, _ = op.forward(as_array(input), as_array(weight), as_array(bias))
    return torch.from_numpy(y)


class NormFunction(torch.autograd.Function):
    """The autograd node of a fastbn op: forward and backward run fastbn's kernels."""

    @staticmethod
    def forward(ctx, op, input, weight, bias):
        arrays = (as_array(input), as_array(weight), as_array(bias))
        y, stats = op.forward(*arrays)
        ctx.op = op
        # Arrays made by the forward (nothing else can change them), and the views of the
        # inputs for the backward: their tensors are saved through autograd too, so that
        # an in-place change before the backward raises as it does with torch's ops.
        ctx.stats = stats
        ctx.arrays = arrays
        ctx.save_for_backward(input, weight, bias)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors  # (raises if one was changed in place since the forward)
        output_mask = ctx.needs_input_grad[1:4]
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must themselves be differentiable, so they
            # come from torch's ops, given contiguous operands: torch's CPU batch-norm
            # backward misreads channels-last memory when N = 1 (docs/nn.md).
            input, weight, bias = saved
            stats = tuple(torch.from_numpy(a) if isinstance(a, np.ndarray) else a
                          for a in ctx.stats)
            grads = ctx.op.backward_differentiable(grad_y.contiguous(), input.contiguous(),
                                                   weight, bias, stats, output_mask)
        else:
            grad_x, grad_weight, grad_bias = ctx.op.backward(
                grad_y.numpy(), *ctx.arrays, ctx.stats, output_mask)
            grads = (None if grad_x is None else torch.from_numpy(grad_x),
                     None if grad_weight is None else torch.from_numpy(grad_weight),
                     None if grad_bias is None else torch.from_numpy(grad_bias))
        return (None,) + grads


# NormFunction.apply without the Python half of torch.autograd.Function.apply, which
# unwraps torch.func's dead wrappers and binds default arguments (3.7 us of a 13 us call,
# measured): `runs_on_fastbn` has ruled out wrappers and transforms, and the forward takes
# no defaults. This is the C implementation that half ends in.
_record = super(torch.autograd.Function, NormFunction).apply


def channel_shape(input):
    """The shape that broadcasts a per-channel vector over `input`: (1, C, 1, ...)."""
    return (1, -1) + (1,) * (input.dim() - 2)


def torch_gradients(torch_forward, grad_y, input, weight, output_mask, parameter_shape,
                    bias=None):
    """The gradients of ``torch_forward(input, weight, bias)`` for (input, weight, bias) as
    `output_mask` asks, differentiable themselves: for double backward, where ATen's
    backward op of a norm has no derivative of its own. Recomputes torch's forward.

    Without an activation the gradient of the bias does not depend on its value: pass no
    `bias` and a zero one stands in for it. With one, pass the forward's bias (its saved
    tensor, so that the gradients depend on it in the graph as they do in value).
    """
    if bias is None and output_mask[2]:
        bias = torch.zeros(parameter_shape, dtype=input.dtype, requires_grad=True)
    wanted = [tensor for tensor, wanted in zip((input, weight, bias), output_mask) if wanted]
    with torch.enable_grad():
        y = torch_forward(input, weight, bias)
    grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
    return tuple(next(grads) if wanted else None for wanted in output_mask)


# torch's activation per code (fastbn/_activations.py), in place when asked: where y is a
# fresh result no one else holds (torch's batch norm's output), one pass and no second
# tensor (an out-of-place ReLU6 after torch's eval batch norm made a converted
# MobileNetV2's eval forward slower than torch's own). Autograd takes each of these in
# place after batch_norm (its backward does not save the output); torch's in-place
# leaky_relu backward refuses a negative slope, so that one stays out of place.
TORCH_ACTIVATIONS = {
    1: lambda y, slope, in_place: torch.nn.functional.relu(y, inplace=in_place),
    2: lambda y, slope, in_place: torch.nn.functional.relu6(y, inplace=in_place),
    3: lambda y, slope, in_place: torch.nn.functional.silu(y, inplace=in_place),
    4: lambda y, slope, in_place: torch.nn.functional.hardswish(y, inplace=in_place),
    5: lambda y, slope, in_place: torch.nn.functional.leaky_relu(
        y, slope, inplace=in_place and slope >= 0.0),
}


def torch_activation(code, y, negative_slope, in_place=False):
    """torch's activation `code` (fastbn/_activations.py) applied to y (0: y itself);
    `in_place`: y is a fresh result that may be overwritten."""
    return TORCH_ACTIVATIONS[code](y, negative_slope, in_place) if code else y


class BatchNormOp:
    """Batch normalization, with a fused activation, for `NormFunction`: the kernels of
    `fastbn.batch_norm_forward` / `_backward`, called after fastbn.nn's own checks
    (`fastbn.batch_norm.run_forward`), so that a call pays for its checks once."""

    __slots__ = ("running_mean", "running_var", "training", "momentum", "eps", "kernels",
                 "activation", "negative_slope", "counter")

    def __init__(self, running_mean, running_var, training, momentum, eps, backend,
                 activation=0, negative_slope=0.0, counter=None):
        self.running_mean = running_mean
        self.running_var = running_var
        self.training = training
        self.momentum = momentum
        self.eps = eps
        self.kernels = load_backend(backend)
        self.activation = activation
        self.negative_slope = negative_slope
        self.counter = counter  # num_batches_tracked, counted by the kernel call

    def forward(self, x, weight, bias):
        layout = _layout.kernel_view(x)
        y, mean, invstd = _batch_norm.run_forward(
            self.kernels, x, contiguous(weight), contiguous(bias), as_array(self.running_mean),
            as_array(self.running_var), self.training, self.momentum, self.eps,
            self.activation, self.negative_slope, as_array(self.counter), layout=layout)
        return y, (mean, invstd, layout)

    def backward(self, grad_y, x, weight, bias, stats, output_mask):
        mean, invstd, layout = stats
        return _batch_norm.run_backward(
            self.kernels, grad_y, x, contiguous(weight), mean, invstd, self.training,
            output_mask, self.activation, self.negative_slope,
            contiguous(bias) if self.activation else None, layout=layout)

    def backward_differentiable(self, grad_y, input, weight, bias, stats, output_mask):
        mean, invstd = stats[:2]
        if self.activation:
            # z recomputed from the saved statistics (constants in eval mode; in training
            # torch's batch statistics, so that their derivative is part of the graph).
            def forward(input, weight, bias):
                if self.training:
                    z = torch.batch_norm(input, weight, bias, None, None, True, 0.0, self.eps,
                                         False)
                else:
                    shape = channel_shape(input)
                    z = (input - mean.view(shape)) * invstd.view(shape)
                    if weight is not None:
                        z = z * weight.view(shape)
                    if bias is not None:
                        z = z + bias.view(shape)
                return torch_activation(self.activation, z, self.negative_slope)
            return torch_gradients(forward, grad_y, input, weight, output_mask, input.shape[1],
                                   bias)
        if self.training:
            # ATen's backward has a derivative (the batch statistics depend on the input).
            return torch.ops.aten.native_batch_norm_backward(
                grad_y, input, weight, None, None, mean, invstd, True, self.eps,
                list(output_mask))
        # Eval mode: the statistics are constants, and the gradients linear in grad_y.
        shape = channel_shape(input)
        dims = [0] + list(range(2, input.dim()))
        scale = invstd if weight is None else invstd * weight
        grad_input = grad_y * scale.view(shape) if output_mask[0] else None
        grad_weight = ((grad_y * (input - mean.view(shape))).sum(dims) * invstd
                       if output_mask[1] else None)
        grad_bias = grad_y.sum(dims) if output_mask[2] else None
        return grad_input, grad_weight, grad_bias


def contiguous(array):
    """A per-channel vector as the kernels read it: C-contiguous and 1-D (None stays None)."""
    if array is None or (array.ndim == 1 and array.flags.c_contiguous):
        return array
    return np.ascontiguousarray(array).reshape(-1)


class GroupNormOp:
    """Group normalization for `NormFunction`: `fastbn.group_norm_forward` / `_backward`."""

    __slots__ = ("num_groups", "eps", "backend")

    def __init__(self, num_groups, eps, backend):
        self.num_groups = num_groups
        self.eps = eps
        self.backend = backend

    def forward(self, x, weight, bias):
        y, mean, rstd = fastbn.group_norm_forward(x, self.num_groups, weight, bias, self.eps,
                                                  backend=self.backend)
        return y, (mean, rstd)

    def backward(self, grad_y, x, weight, bias, stats, output_mask):
        mean, rstd = stats
        return fastbn.group_norm_backward(grad_y, x, mean, rstd, weight, self.num_groups,
                                          output_mask=output_mask, backend=self.backend)

    def backward_differentiable(self, grad_y, input, weight, bias, stats, output_mask):
        return torch_gradients(
            lambda input, weight, bias: torch.group_norm(input, self.num_groups, weight, bias,
                                                         self.eps),
            grad_y, input, weight, output_mask, input.shape[1])


class LayerNormOp:
    """Layer normalization for `NormFunction`: `fastbn.layer_norm_forward` / `_backward`."""

    __slots__ = ("normalized_shape", "eps", "backend")

    def __init__(self, normalized_shape, eps, backend):
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.backend = backend

    def forward(self, x, weight, bias):
        y, mean, rstd = fastbn.layer_norm_forward(x, self.normalized_shape, weight, bias,
                                                  self.eps, backend=self.backend)
        return y, (mean, rstd)

    def backward(self, grad_y, x, weight, bias, stats, output_mask):
        mean, rstd = stats
        # (the backward asks whether there is a bias; its value is not used)
        return fastbn.layer_norm_backward(grad_y, x, self.normalized_shape, mean, rstd, weight,
                                          bias, output_mask=output_mask, backend=self.backend)

    def backward_differentiable(self, grad_y, input, weight, bias, stats, output_mask):
        return torch_gradients(
            lambda input, weight, bias: torch.layer_norm(input, self.normalized_shape, weight,
                                                         bias, self.eps),
            grad_y, input, weight, output_mask, self.normalized_shape)


class RMSNormOp:
    """RMS normalization for `NormFunction`: `fastbn.rms_norm_forward` / `_backward`."""

    __slots__ = ("normalized_shape", "eps", "backend")

    def __init__(self, normalized_shape, eps, backend):
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.backend = backend

    def forward(self, x, weight, bias):
        y, rstd = fastbn.rms_norm_forward(x, self.normalized_shape, weight, self.eps,
                                          backend=self.backend)
        return y, (rstd,)

    def backward(self, grad_y, x, weight, bias, stats, output_mask):
        (rstd,) = stats
        grad_x, grad_weight = fastbn.rms_norm_backward(
            grad_y, x, self.normalized_shape, rstd, weight, output_mask=output_mask[:2],
            backend=self.backend)
        return grad_x, grad_weight, None

    def backward_differentiable(self, grad_y, input, weight, bias, stats, output_mask):
        return torch_gradients(
            lambda input, weight, bias: torch.rms_norm(input, self.normalized_shape, weight,
                                                       self.eps),
            grad_y, input, weight, output_mask, self.normalized_shape)


class InstanceNormOp:
    """Instance normalization for `NormFunction`: `fastbn.instance_norm_forward` / `_backward`."""

    __slots__ = ("running_mean", "running_var", "use_input_stats", "momentum", "eps", "backend")

    def __init__(self, running_mean, running_var, use_input_stats, momentum, eps, backend):
        self.running_mean = running_mean
        self.running_var = running_var
        self.use_input_stats = use_input_stats
        self.momentum = momentum
        self.eps = eps
        self.backend = backend

    def forward(self, x, weight, bias):
        y, mean, rstd = fastbn.instance_norm_forward(
            x, weight, bias, as_array(self.running_mean), as_array(self.running_var),
            self.use_input_stats, self.momentum, self.eps, backend=self.backend)
        return y, (mean, rstd)

    def backward(self, grad_y, x, weight, bias, stats, output_mask):
        mean, rstd = stats
        return fastbn.instance_norm_backward(grad_y, x, mean, rstd, weight, self.use_input_stats,
                                             output_mask=output_mask, backend=self.backend)

    def backward_differentiable(self, grad_y, input, weight, bias, stats, output_mask):
        mean, rstd = stats
        batch, channels = input.shape[:2]
        if self.use_input_stats:
            # No running statistics: the recomputation must not update them again.
            return torch_gradients(
                lambda input, weight, bias: torch.instance_norm(
                    input, weight, bias, None, None, True, 0.0, self.eps, False),
                grad_y, input, weight, output_mask, channels)
        # Running statistics: constants, and the gradients linear in grad_y.
        shape = (batch, channels) + (1,) * (input.dim() - 2)
        dims = [0] + list(range(2, input.dim()))
        scale = rstd if weight is None else rstd * weight
        grad_input = grad_y * scale.view(shape) if output_mask[0] else None
        grad_weight = ((grad_y * (input - mean.view(shape)) * rstd.view(shape)).sum(dims)
                       if output_mask[1] else None)
        grad_bias = grad_y.sum(dims) if output_mask[2] else None
        return grad_input, grad_weight, grad_bias
