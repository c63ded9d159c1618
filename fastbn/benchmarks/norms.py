"""GroupNorm, InstanceNorm, LayerNorm and RMSNorm benchmark cases against torch.

Same modes and bytes-moved convention as `batch_norm` ("training": forward then
backward with every gradient; "eval": forward only, which for these ops is the
inference forward as well), and the same zero-copy rule: torch's tensors are
``torch.from_numpy`` views of the arrays fastbn reads.

torch runs:

- group: ``torch.native_group_norm`` + ``aten.native_group_norm_backward``, GroupNorm(32, C).
- instance: what ``torch.instance_norm`` runs, without autograd: ``native_batch_norm``
  on the (1, N * C, *spatial) view with the parameters repeated N times, its
  backward, and the parameter gradients summed over N.
- layer: ``torch.native_layer_norm`` + ``aten.native_layer_norm_backward`` over the last dim.
- rms: ``torch.nn.functional.rms_norm`` with autograd (torch has no CPU
  backward kernel for it to call directly).
"""
import numpy as np

import fastbn
from fastbn import _layout
from fastbn.benchmarks.batch_norm import CaseArrays, assert_outputs_match

OPS = ("group_norm", "instance_norm", "layer_norm", "rms_norm")
GROUPS = 32
EPS = 1e-5
TOLERANCES = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-8}


class NormCase(CaseArrays):
    """One benchmark input of a per-sample normalization: x, grad_out, weight, bias.

    Parameters
    ----------
    op : {"group_norm", "instance_norm", "layer_norm", "rms_norm"}
    shape : tuple of int
        (N, C, *spatial) for group and instance norm; (..., D) for layer and RMS
        norm, normalized over the last dim.
    dtype : str or dtype
    channels_last : bool
        Channels as the fastest axis (group and instance norm only).
    seed : int
    """

    def __init__(self, op, shape, dtype="float32", channels_last=False, seed=0):
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if channels_last and op not in ("group_norm", "instance_norm"):
            raise ValueError(f"channels_last applies to group_norm and instance_norm, not {op}")
        rng = np.random.default_rng(seed)
        self.op = op
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.channels_last = bool(channels_last)
        self.x = self._array(rng.standard_normal(self.shape) * 2.0 + 1.0)
        self.grad_out = self._array(rng.standard_normal(self.shape))
        features = self.shape[-1] if op in ("layer_norm", "rms_norm") else self.shape[1]
        self.weight = rng.uniform(0.5, 1.5, features).astype(self.dtype)
        self.bias = rng.standard_normal(features).astype(self.dtype)

    def fastbn_step(self, backend, mode):
        """A callable running fastbn's `mode` with `backend`; returns y and the gradients."""
        x, grad_out, weight, bias = self.x, self.grad_out, self.weight, self.bias
        training = mode == "training"
        dim = self.shape[-1]

        if self.op == "group_norm":
            def step():
                y, mean, rstd = fastbn.group_norm_forward(x, GROUPS, weight, bias, EPS,
                                                          backend=backend)
                if not training:
                    return (y,)
                return (y,) + tuple(fastbn.group_norm_backward(
                    grad_out, x, mean, rstd, weight, GROUPS, backend=backend))
        elif self.op == "instance_norm":
            def step():
                y, mean, rstd = fastbn.instance_norm_forward(x, weight, bias, eps=EPS,
                                                             backend=backend)
                if not training:
                    return (y,)
                return (y,) + tuple(fastbn.instance_norm_backward(
                    grad_out, x, mean, rstd, weight, backend=backend))
        elif self.op == "layer_norm":
            def step():
                y, mean, rstd = fastbn.layer_norm_forward(x, dim, weight, bias, EPS,
                                                          backend=backend)
                if not training:
                    return (y,)
                return (y,) + tuple(fastbn.layer_norm_backward(
                    grad_out, x, dim, mean, rstd, weight, bias, backend=backend))
        else:
            def step():
                y, rstd = fastbn.rms_norm_forward(x, dim, weight, EPS, backend=backend)
                if not training:
                    return (y,)
                return (y,) + tuple(fastbn.rms_norm_backward(grad_out, x, dim, rstd, weight,
                                                             backend=backend))
        return step

    def torch_step(self, mode, compiled=False):
        """A callable running torch's `mode`; returns y and the gradients as tensors.

        compiled=True runs it through ``torch.compile`` (Inductor's generated
        kernels); the first call compiles, so warm up before timing.
        """
        import torch

        def maybe_compiled(function):
            return torch.compile(function, dynamic=False) if compiled else function

        if compiled:
            # Forget earlier cases' graphs: past dynamo's recompile limit the same
            # code would silently fall back to eager.
            torch._dynamo.reset()
        x, grad_out = torch.from_numpy(self.x), torch.from_numpy(self.grad_out)
        weight, bias = torch.from_numpy(self.weight), torch.from_numpy(self.bias)
        training = mode == "training"
        n, dim = self.shape[0], self.shape[-1]

        if self.op == "group_norm":
            channels, spatial = self.shape[1], _layout.spatial_size(self.shape)

            @maybe_compiled
            def step():
                y, mean, rstd = torch.native_group_norm(x, weight, bias, n, channels, spatial,
                                                        GROUPS, EPS)
                if not training:
                    return (y,)
                return (y,) + tuple(torch.ops.aten.native_group_norm_backward(
                    grad_out, x, mean, rstd, weight, n, channels, spatial, GROUPS,
                    [True, True, True]))
        elif self.op == "instance_norm":
            channels = self.shape[1]
            merged = (1, n * channels) + self.shape[2:]
            weight_repeated, bias_repeated = weight.repeat(n), bias.repeat(n)

            @maybe_compiled
            def step():
                x_view = x.reshape(merged)
                y, mean, invstd = torch.native_batch_norm(
                    x_view, weight_repeated, bias_repeated, None, None, True, 0.1, EPS)
                if not training:
                    return (y.reshape(self.shape),)
                grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                    grad_out.reshape(merged), x_view, weight_repeated, None, None, mean,
                    invstd, True, EPS, [True, True, True])
                return (y.reshape(self.shape), grad_x.reshape(self.shape),
                        grad_w.reshape(n, channels).sum(0), grad_b.reshape(n, channels).sum(0))
        elif self.op == "layer_norm":
            @maybe_compiled
            def step():
                y, mean, rstd = torch.native_layer_norm(x, [dim], weight, bias, EPS)
                if not training:
                    return (y,)
                return (y,) + tuple(torch.ops.aten.native_layer_norm_backward(
                    grad_out, x, [dim], mean, rstd, weight, bias, [True, True, True]))
        else:
            x_leaf = x.detach().requires_grad_(training)
            weight_leaf = weight.detach().requires_grad_(training)
            # The backward comes from autograd: compiling the forward compiles it too.
            rms_norm = maybe_compiled(torch.nn.functional.rms_norm)

            def step():
                if not training:
                    with torch.no_grad():
                        return (rms_norm(x_leaf, [dim], weight_leaf, EPS),)
                x_leaf.grad = weight_leaf.grad = None
                y = rms_norm(x_leaf, [dim], weight_leaf, EPS)
                y.backward(grad_out)
                return y.detach(), x_leaf.grad, weight_leaf.grad
        return step

    def check(self, outputs, expected, mode, label=""):
        """Assert that `outputs` match `expected` (y, then the gradients) within tolerance."""
        assert_outputs_match(
            outputs, expected, TOLERANCES[self.dtype],
            f"{label} {self.op} {mode}", f"(shape {self.shape}, {self.dtype}, "
            f"channels_last={self.channels_last})")


