"""The autograd glue of the normalization-activation ops: FRN + TLU and EvoNorm-S0.

The op-object pattern of `fastbn/nn/_function.py`, for ops with more than a weight and
a bias: `NormActFunction` is `NormFunction` with any number of parameter tensors
(FRN: weight, bias, tau and a learned eps; EvoNorm-S0: weight, bias and v), and each
op object says how to call the op's NumPy-level functions:

- ``op.forward(x, *parameters) -> (y, stats)``: arrays;
- ``op.backward(grad_y, x, parameters, stats, output_mask) -> grads``: arrays, one
  gradient (or None) per parameter after the input's;
- ``op.backward_differentiable(grad_y, input, parameters, output_mask)``: the same
  gradients from `op.torch_forward` (the op written in torch ops, timm's formulas),
  for double backward (``create_graph=True``).

`filter_response_norm_torch` and `evonorm_s0_torch` are also what
`fastbn.nn.functional` runs for the calls fastbn's kernels do not take (float16,
other devices, torch.compile tracing, ...).
"""
import torch

import fastbn
from fastbn.nn._function import as_array, as_tensor


def broadcast_shape(input):
    """The shape that broadcasts a per-channel vector over `input`: (1, C, 1, ...)."""
    return (1, -1) + (1,) * (input.dim() - 2)


def statistics_dtype(dtype):
    """float32 for 16-bit inputs (as timm computes their statistics), else the input's."""
    return torch.promote_types(dtype, torch.float32)


def _per_channel(vector, input):
    return vector.view(broadcast_shape(input)).to(input.dtype)


def filter_response_norm_torch(input, weight, bias, tau, eps):
    """FRN + TLU in torch ops, as timm's FilterResponseNormTlu2d (any number of spatial
    dims; the mean square in float32 for 16-bit inputs). `eps` is a float or a tensor."""
    dims = tuple(range(2, input.dim()))
    squares = input.to(statistics_dtype(input.dtype)).square()
    nu2 = squares.mean(dim=dims, keepdim=True) if dims else squares
    y = input * (nu2 + eps).rsqrt().to(input.dtype)
    if weight is not None:
        y = y * _per_channel(weight, input)
    if bias is not None:
        y = y + _per_channel(bias, input)
    return y if tau is None else torch.maximum(y, _per_channel(tau, input))


def evonorm_s0_torch(input, num_groups, weight, bias, v, eps):
    """EvoNorm-S0 in torch ops, as timm's EvoNorm2dS0 (group_std's biased variance, in
    float32 for 16-bit inputs); without v, x / group std (timm's EvoNorm2dS0a)."""
    N = input.shape[0]
    groups = input.reshape(N, num_groups, -1).to(statistics_dtype(input.dtype))
    std = (groups.var(dim=2, unbiased=False, keepdim=True) + eps).sqrt().to(input.dtype)
    std = std.expand(groups.shape).reshape(input.shape)
    y = input if v is None else input * (input * _per_channel(v, input)).sigmoid()
    y = y / std
    if weight is not None:
        y = y * _per_channel(weight, input)
    if bias is not None:
        y = y + _per_channel(bias, input)
    return y


def torch_gradients(forward, grad_y, input, parameters, output_mask):
    """The gradients of ``forward(input, *parameters)`` for the tensors `output_mask` asks
    for, differentiable themselves (for double backward). Recomputes the forward."""
    tensors = (input,) + tuple(parameters)
    wanted = [tensor for tensor, want in zip(tensors, output_mask) if want]
    with torch.enable_grad():
        y = forward(*tensors)
    grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
    return tuple(next(grads) if want else None for want in output_mask)


class NormActFunction(torch.autograd.Function):
    """The autograd node of FRN and EvoNorm-S0: forward and backward run fastbn's kernels."""

    @staticmethod
    def forward(ctx, op, input, *parameters):
        y, stats = op.forward(as_array(input), *map(as_array, parameters))
        ctx.op = op
        ctx.stats = stats  # arrays made by the forward: nothing else can change them
        # Saved through autograd: an in-place change of one before the backward raises.
        ctx.save_for_backward(input, *parameters)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, grad_y):
        input, *parameters = ctx.saved_tensors
        output_mask = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph=True
            grads = ctx.op.backward_differentiable(grad_y, input, parameters, output_mask)
        else:
            grads = tuple(map(as_tensor, ctx.op.backward(
                as_array(grad_y), as_array(input), [as_array(p) for p in parameters],
                ctx.stats, output_mask)))
        return (None,) + grads


def apply(op, input, parameters, record):
    """Run `op` on input and its parameters, through autograd when `record`."""
    if record:
        return NormActFunction.apply(op, input, *parameters)
    y, _ = op.forward(as_array(input), *map(as_array, parameters))
    return torch.from_numpy(y)


class FilterResponseNormOp:
    """FRN + TLU for `NormActFunction`; parameters (weight, bias, tau, eps), where eps is a
    one-element tensor (a learned eps) or None (then the op's float `eps` is used)."""

    __slots__ = ("eps", "backend")

    def __init__(self, eps, backend):
        self.eps = eps
        self.backend = backend

    def _eps(self, eps):
        return self.eps if eps is None else float(eps.reshape(-1)[0])

    def forward(self, x, weight, bias, tau, eps):
        y, rstd = fastbn.filter_response_norm_forward(x, weight, bias, tau, self._eps(eps),
                                                      backend=self.backend)
        return y, (rstd,)

    def backward(self, grad_y, x, parameters, stats, output_mask):
        weight, bias, tau, eps = parameters
        (rstd,) = stats
        grad_x, grad_weight, grad_bias, grad_tau, grad_eps = fastbn.filter_response_norm_backward(
            grad_y, x, rstd, weight, bias, tau, output_mask=output_mask, backend=self.backend)
        if grad_eps is not None:
            grad_eps = grad_eps.reshape(eps.shape)
        return grad_x, grad_weight, grad_bias, grad_tau, grad_eps

    def torch_forward(self, input, weight, bias, tau, eps):
        return filter_response_norm_torch(input, weight, bias, tau,
                                          self.eps if eps is None else eps)

    def backward_differentiable(self, grad_y, input, parameters, output_mask):
        return torch_gradients(self.torch_forward, grad_y, input, parameters, output_mask)


class EvoNormS0Op:
    """EvoNorm-S0 for `NormActFunction`; parameters (weight, bias, v)."""

    __slots__ = ("num_groups", "eps", "backend")

    def __init__(self, num_groups, eps, backend):
        self.num_groups = num_groups
        self.eps = eps
        self.backend = backend

    def forward(self, x, weight, bias, v):
        y, mean, rstd = fastbn.evonorm_s0_forward(x, self.num_groups, weight, bias, v, self.eps,
                                                  backend=self.backend)
        return y, (mean, rstd)

    def backward(self, grad_y, x, parameters, stats, output_mask):
        weight, bias, v = parameters
        mean, rstd = stats
        return fastbn.evonorm_s0_backward(grad_y, x, mean, rstd, self.num_groups, weight, v,
                                          output_mask=output_mask, backend=self.backend)

    def torch_forward(self, input, weight, bias, v):
        return evonorm_s0_torch(input, self.num_groups, weight, bias, v, self.eps)

    def backward_differentiable(self, grad_y, input, parameters, output_mask):
        return torch_gradients(self.torch_forward, grad_y, input, parameters, output_mask)
