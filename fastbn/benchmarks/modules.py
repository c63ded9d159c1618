"""Module-level benchmark cases: what a user gets, torch.nn layers against fastbn.nn's.

- `ModuleCase`: one norm layer alone. A torch.nn module and fastbn.nn modules
  built with the same parameters and buffers, on the arrays of the kernel-level
  case (`batch_norm.BatchNormCase`, `norms.NormCase`) seen as tensors without a
  copy, so both levels time the same data. "training": one step as in a
  training loop (gradients set to None, module forward, backward of grad_out
  through autograd); "eval": an eval-mode forward under ``torch.no_grad()``.
  fastbn's modules run with ``backend=None`` (fastbn.nn's default routing:
  torch's op where it was measured faster, see `fastbn.nn.functional`) or
  with a backend named (always fastbn's kernels).

torch is imported when a case is built, so this module imports without it.
"""

import copy

import numpy as np

from fastbn.benchmarks import batch_norm, norms

# float32 through autograd: each side rounds its own intermediates.
TOLERANCE = 1e-3


def kernel_case(op, shape, dtype="float32", channels_last=False):
    """The kernel-level case of `op` on `shape`: a `batch_norm.BatchNormCase` or `norms.NormCase`."""
    if op == "batch_norm_2d":
        return batch_norm.BatchNormCase(shape, dtype, channels_last)
    return norms.NormCase(op, shape, dtype, channels_last)


class ModuleCase:
    """One norm layer and its input, as torch.nn and fastbn.nn modules.

    Parameters
    ----------
    op : {"batch_norm_2d", "group_norm", "instance_norm", "layer_norm", "rms_norm"}
    arrays : batch_norm.BatchNormCase or norms.NormCase
        The kernel-level case of `op`: x, grad_out, weight, bias (and BatchNorm's
        running statistics) become the modules' input and parameters.
    """

    def __init__(self, op, arrays):
        self.op = op
        self.arrays = arrays
        self.shape = arrays.shape

    @property
    def nbytes(self):
        return self.arrays.nbytes

    @property
    def dtype(self):
        return self.arrays.dtype

    @property
    def channels_last(self):
        return self.arrays.channels_last

    def _module(self, namespace, **backend):
        """The layer of `op` from `namespace` (torch.nn or fastbn.nn), with the case's values."""
        import torch

        features = self.shape[-1] if self.op in ("layer_norm", "rms_norm") else self.shape[1]
        options = dict(backend, dtype=torch.from_numpy(self.arrays.x).dtype)
        if self.op == "batch_norm_2d":
            module = namespace.BatchNorm2d(features, batch_norm.EPS, batch_norm.MOMENTUM,
                                           **options)
        elif self.op == "group_norm":
            module = namespace.GroupNorm(norms.GROUPS, features, norms.EPS, **options)
        elif self.op == "instance_norm":
            instance_norm = getattr(namespace, f"InstanceNorm{len(self.shape) - 2}d")
            module = instance_norm(features, norms.EPS, affine=True, **options)
        elif self.op == "layer_norm":
            module = namespace.LayerNorm(features, norms.EPS, **options)
        else:
            module = namespace.RMSNorm(features, norms.EPS, **options)
        values = {"weight": self.arrays.weight, "bias": self.arrays.bias,
                  "running_mean": getattr(self.arrays, "running_mean", None),
                  "running_var": getattr(self.arrays, "running_var", None)}
        with torch.no_grad():
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                if values.get(name) is not None:
                    tensor.copy_(torch.from_numpy(values[name]))
        return module

    def _step(self, module, mode, compiled=False):
        import torch

        x = torch.from_numpy(self.arrays.x)  # the array's memory and strides: no copy
        module.train(mode == "training")
        parameters = list(module.parameters())
        buffers = list(module.buffers())  # BatchNorm's running statistics, updated in place
        if compiled:
            # Forget earlier cases' graphs: past dynamo's recompile limit the same
            # code would silently fall back to eager.
            torch._dynamo.reset()
            module = torch.compile(module, dynamic=False)
        if mode == "eval":
            def step():
                with torch.no_grad():
                    return (module(x),)
            return step

        x.requires_grad_()
        grad_out = torch.from_numpy(self.arrays.grad_out)

        def step():
            # Gradients set to None, as between the steps of a training loop: no
            # accumulation pass (in a network the input's gradient flows on instead).
            x.grad = None
            for parameter in parameters:
                parameter.grad = None
            y = module(x)
            y.backward(grad_out)
            return [y, x.grad] + [parameter.grad for parameter in parameters] + buffers
        return step

    def torch_step(self, mode, compiled=False):
        """A callable running torch.nn's layer in `mode`; returns y, the gradients, the buffers.

        compiled=True wraps the module in ``torch.compile`` (Inductor's generated
        forward and, through AOTAutograd, backward); the first call compiles, so
        warm up before timing.
        """
        from torch import nn

        return self._step(self._module(nn), mode, compiled)

    def fastbn_step(self, backend, mode):
        """A callable running fastbn.nn's layer with `backend` (None: default routing) in `mode`."""
        import fastbn.nn

        return self._step(self._module(fastbn.nn, backend=backend), mode)

    def expected(self, mode):
        """What a fastbn step must return in `mode`: torch's, except where torch's op is
        known to be wrong on this input (`fastbn.nn.functional.torch_is_wrong`: a batch of
        one through autograd, whose gradients torch may get wrong in channels-last memory):
        there torch's on float64 contiguous copies of the arrays, which it gets right."""
        import torch

        from fastbn.nn.functional import torch_is_wrong

        op = "batch_norm" if self.op == "batch_norm_2d" else self.op
        if mode == "training" and torch_is_wrong(op, torch.from_numpy(self.arrays.x), True):
            # The same case (a subclass's layer too) on float64 contiguous copies.
            oracle = copy.copy(self)
            oracle.arrays = self.arrays.converted(np.float64)
            return oracle.torch_step(mode)()
        return self.torch_step(mode)()

    def check(self, outputs, expected, mode, label=""):
        """Assert that `outputs` of a step match the `expected` ones within tolerance."""
        batch_norm.assert_outputs_match(
            outputs, expected, TOLERANCE, f"{label} {self.op} module {mode}",
            f"(shape {self.shape}, channels_last={self.arrays.channels_last})")
