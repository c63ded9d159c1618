"""Module-level benchmark cases: a fastbn.nn module against its torch.nn original.

Same modes as `batch_norm`, through the modules and autograd:

- ``"training"``: one training step of the layer alone: the module's forward,
  then backward through autograd (gradients set to None first, as between the
  steps of a training loop).
- ``"eval"``: the forward of the module in eval mode, under ``torch.no_grad``.

Every module starts from the same random state dict; x and grad_out are
``torch.from_numpy`` views of the case's arrays, so no call converts or copies.
"""
import numpy as np

from fastbn.benchmarks import norms
from fastbn.benchmarks.batch_norm import CaseArrays

# op -> (module class name, its arguments for an input of `shape`).
MODULES = {
    "batch_norm_2d": ("BatchNorm2d", lambda shape: (shape[1],)),
    "group_norm": ("GroupNorm", lambda shape: (norms.GROUPS, shape[1])),
    "layer_norm": ("LayerNorm", lambda shape: (shape[-1],)),
}


class ModuleCase(CaseArrays):
    """One module benchmark input: x, grad_out and the modules' state, made once.

    Parameters
    ----------
    op : {"batch_norm_2d", "group_norm", "layer_norm"}
    shape : tuple of int
        (N, C, H, W); (..., D) for layer_norm, normalized over the last dim.
    dtype : str or dtype
    channels_last : bool
        Channels as the fastest axis (batch_norm_2d and group_norm only).
    seed : int
    """

    def __init__(self, op, shape, dtype="float32", channels_last=False, seed=0):
        import torch

        if op not in MODULES:
            raise ValueError(f"op must be one of {tuple(MODULES)}, got {op!r}")
        if channels_last and op == "layer_norm":
            raise ValueError("channels_last applies to batch_norm_2d and group_norm, "
                             "not layer_norm")
        rng = np.random.default_rng(seed)
        self.op = op
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.channels_last = bool(channels_last)
        self.x = self._array(rng.standard_normal(self.shape) * 2.0 + 1.0)
        self.grad_out = self._array(rng.standard_normal(self.shape))
        # Weights, biases and running statistics away from their defaults (1 and 0),
        # so that a kernel that ignored one would fail the check.
        self.state = {name: torch.from_numpy(rng.uniform(0.5, 1.5, value.shape).astype(self.dtype))
                      if value.is_floating_point() else value
                      for name, value in self._module(torch.nn).state_dict().items()}

    def _module(self, library, **kwargs):
        import torch

        class_name, arguments = MODULES[self.op]
        module_class = getattr(library, class_name)
        torch_dtype = getattr(torch, self.dtype.name)
        return module_class(*arguments(self.shape), dtype=torch_dtype, **kwargs)

    def _step(self, module, mode, compiled=False):
        import torch

        module.load_state_dict(self.state)
        module.train(mode == "training")
        parameters = list(module.parameters())
        if compiled:
            # Forget earlier cases' graphs: past dynamo's recompile limit the same
            # code would silently fall back to eager.
            torch._dynamo.reset()
            module = torch.compile(module, dynamic=False)
        x = torch.from_numpy(self.x).requires_grad_(mode == "training")
        grad_out = torch.from_numpy(self.grad_out)

        if mode == "eval":
            def step():
                with torch.no_grad():
                    return (module(x),)
            return step

        def step():
            x.grad = None
            for parameter in parameters:
                parameter.grad = None
            y = module(x)
            y.backward(grad_out)
            return (y.detach(), x.grad) + tuple(parameter.grad for parameter in parameters)

        return step

    def fastbn_step(self, backend, mode):
        """A callable running one `mode` step of the fastbn.nn module with `backend`."""
        import fastbn.nn

        return self._step(self._module(fastbn.nn, backend=backend), mode)

    def torch_step(self, mode, compiled=False):
        """A callable running one `mode` step of the torch.nn module.

        compiled=True wraps the module in ``torch.compile`` (Inductor's generated
        forward and, through AOTAutograd, backward); the first call compiles, so
        warm up before timing.
        """
        import torch

        return self._step(self._module(torch.nn), mode, compiled)

    # The same outputs as NormCase's (y, then the gradients), checked the same way.
    check = norms.NormCase.check
