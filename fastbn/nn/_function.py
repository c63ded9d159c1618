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
import torch

import fastbn


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
    """Run `op` on (input, weight, bias), through autograd when `record` (see `needs_grad`)."""
    if record:
        return NormFunction.apply(op, input, weight, bias)
    y, _ = op.forward(as_array(input), as_array(weight), as_array(bias))
    return torch.from_numpy(y)


class NormFunction(torch.autograd.Function):
    """The autograd node of a fastbn op: forward and backward run fastbn's kernels."""

    @staticmethod
    def forward(ctx, op, input, weight, bias):
        y, stats = op.forward(as_array(input), as_array(weight), as_array(bias))
        ctx.op = op
        ctx.stats = stats  # arrays made by the forward: nothing else can change them
        # Saved through autograd, so that an in-place change of the input before the
        # backward raises as it does with torch's ops.
        ctx.save_for_backward(input, weight)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, grad_y):
        input, weight = ctx.saved_tensors
        output_mask = ctx.needs_input_grad[1:4]
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must themselves be differentiable, so they
            # come from torch's ops, given contiguous operands: torch's CPU batch-norm
            # backward misreads channels-last memory when N = 1 (docs/nn.md).
            grads = ctx.op.backward_differentiable(grad_y.contiguous(), input.contiguous(),
                                                   weight, tuple(map(as_tensor, ctx.stats)),
                                                   output_mask)
        else:
            grads = tuple(map(as_tensor, ctx.op.backward(
                as_array(grad_y), as_array(input), as_array(weight), ctx.stats, output_mask)))
        return (None,) + grads


def channel_shape(input):
    """The shape that broadcasts a per-channel vector over `input`: (1, C, 1, ...)."""
    return (1, -1) + (1,) * (input.dim() - 2)


def torch_gradients(torch_forward, grad_y, input, weight, output_mask, parameter_shape):
    """The gradients of ``torch_forward(input, weight, bias)`` for (input, weight, bias) as
    `output_mask` asks, differentiable themselves: for double backward, where ATen's
    backward op of a norm has no derivative of its own. Recomputes torch's forward.

    The gradient of the bias does not depend on its value: a zero bias stands in for it.
    """
    bias = (torch.zeros(parameter_shape, dtype=input.dtype, requires_grad=True)
            if output_mask[2] else None)
    wanted = [tensor for tensor, wanted in zip((input, weight, bias), output_mask) if wanted]
    with torch.enable_grad():
        y = torch_forward(input, weight, bias)
    grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
    return tuple(next(grads) if wanted else None for wanted in output_mask)


class BatchNormOp:
    """Batch normalization for `NormFunction`: `fastbn.batch_norm_forward` / `_backward`."""

    __slots__ = ("running_mean", "running_var", "training", "momentum", "eps", "backend")

    def __init__(self, running_mean, running_var, training, momentum, eps, backend):
        self.running_mean = running_mean
        self.running_var = running_var
        self.training = training
        self.momentum = momentum
        self.eps = eps
        self.backend = backend

    def forward(self, x, weight, bias):
        y, mean, invstd = fastbn.batch_norm_forward(
            x, weight, bias, as_array(self.running_mean), as_array(self.running_var),
            self.training, self.momentum, self.eps, backend=self.backend)
        return y, (mean, invstd)

    def backward(self, grad_y, x, weight, stats, output_mask):
        mean, invstd = stats
        return fastbn.batch_norm_backward(grad_y, x, weight, mean, invstd, self.training,
                                          output_mask=output_mask, backend=self.backend)

    def backward_differentiable(self, grad_y, input, weight, stats, output_mask):
        mean, invstd = stats
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

    def backward(self, grad_y, x, weight, stats, output_mask):
        mean, rstd = stats
        return fastbn.group_norm_backward(grad_y, x, mean, rstd, weight, self.num_groups,
                                          output_mask=output_mask, backend=self.backend)

    def backward_differentiable(self, grad_y, input, weight, stats, output_mask):
        return torch_gradients(
            lambda input, weight, bias: torch.group_norm(input, self.num_groups, weight, bias,
                                                         self.eps),
            grad_y, input, weight, output_mask, input.shape[1])


class LayerNormOp:
    """Layer normalization for `NormFunction`: `fastbn.layer_norm_forward` / `_backward`."""

    __slots__ = ("normalized_shape", "bias", "eps", "backend")

    def __init__(self, normalized_shape, bias, eps, backend):
        self.normalized_shape = normalized_shape
        self.bias = bias  # the backward asks whether there is one (its value is not used)
        self.eps = eps
        self.backend = backend

    def forward(self, x, weight, bias):
        y, mean, rstd = fastbn.layer_norm_forward(x, self.normalized_shape, weight, bias,
                                                  self.eps, backend=self.backend)
        return y, (mean, rstd)

    def backward(self, grad_y, x, weight, stats, output_mask):
        mean, rstd = stats
        return fastbn.layer_norm_backward(grad_y, x, self.normalized_shape, mean, rstd, weight,
                                          as_array(self.bias), output_mask=output_mask,
                                          backend=self.backend)

    def backward_differentiable(self, grad_y, input, weight, stats, output_mask):
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

    def backward(self, grad_y, x, weight, stats, output_mask):
        (rstd,) = stats
        grad_x, grad_weight = fastbn.rms_norm_backward(
            grad_y, x, self.normalized_shape, rstd, weight, output_mask=output_mask[:2],
            backend=self.backend)
        return grad_x, grad_weight, None

    def backward_differentiable(self, grad_y, input, weight, stats, output_mask):
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

    def backward(self, grad_y, x, weight, stats, output_mask):
        mean, rstd = stats
        return fastbn.instance_norm_backward(grad_y, x, mean, rstd, weight, self.use_input_stats,
                                             output_mask=output_mask, backend=self.backend)

    def backward_differentiable(self, grad_y, input, weight, stats, output_mask):
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
