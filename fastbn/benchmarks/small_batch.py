"""The small-batch layers as a user writes them without fastbn, in plain torch ops, and
benchmark cases that time fastbn's layers against them (bench/test_small_batch_layers.py).

The plain versions are also the tests' references (tests/test_ghost_renorm.py):
written from the papers' formulas, differentiated by autograd.

- `PlainGhostBatchNorm2d`: a torch BatchNorm2d called on each virtual batch, the outputs
  concatenated (TabNet's GBN, with slices of k samples rather than torch.chunk);
- `PlainBatchRenorm2d`: Ioffe's formula (r and d under no_grad, the running statistics
  updated as BatchNorm's);
- `PlainFrozenBatchNorm2d`: torchvision's FrozenBatchNorm2d forward (x * scale + shift).

torch is imported when a case is built, so this module imports without it.
"""
from fastbn.benchmarks import batch_norm, modules

# Ghost BatchNorm's virtual batch in the benchmarks: at N = 8 four virtual batches,
# at N <= 2 one (BatchNorm itself).
VIRTUAL_BATCH_SIZE = 2
# Batch Renorm's bounds once the paper's warm-up is over.
R_MAX, D_MAX = 3.0, 5.0
LAYERS = ("ghost_batch_norm", "batch_renorm", "frozen_batch_norm")


def _plain_classes():
    """The plain-torch layers (built on first use: torch is imported here)."""
    import torch
    from torch import nn

    class PlainGhostBatchNorm2d(nn.BatchNorm2d):
        """Ghost BatchNorm as a loop of BatchNorm2d calls over slices of k samples."""

        def __init__(self, num_features, virtual_batch_size, **kwargs):
            super().__init__(num_features, **kwargs)
            self.virtual_batch_size = virtual_batch_size

        def forward(self, input):
            if not self.training:
                return super().forward(input)
            return torch.cat([super(PlainGhostBatchNorm2d, self).forward(chunk)
                              for chunk in input.split(self.virtual_batch_size)])

    class PlainBatchRenorm2d(nn.BatchNorm2d):
        """Batch Renormalization from Ioffe (2017), Algorithm 1, in torch ops."""

        def __init__(self, num_features, r_max=R_MAX, d_max=D_MAX, **kwargs):
            super().__init__(num_features, **kwargs)
            self.r_max, self.d_max = r_max, d_max

        def forward(self, input):
            if not self.training:
                return super().forward(input)
            dims = [0] + list(range(2, input.dim()))
            shape = (1, -1) + (1,) * (input.dim() - 2)
            mean = input.mean(dims)
            var = input.var(dims, unbiased=False)
            sigma_batch = (var + self.eps).sqrt()
            with torch.no_grad():
                sigma = (self.running_var + self.eps).sqrt()
                r = (sigma_batch / sigma).clamp(1.0 / self.r_max, self.r_max)
                d = ((mean - self.running_mean) / sigma).clamp(-self.d_max, self.d_max)
                count = input.numel() // input.shape[1]
                self.num_batches_tracked += 1
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
            x_hat = (input - mean.view(shape)) / sigma_batch.view(shape) * r.view(shape) \
                + d.view(shape)
            if self.weight is None:
                return x_hat
            return x_hat * self.weight.view(shape) + self.bias.view(shape)

    class PlainFrozenBatchNorm2d(nn.Module):
        """torchvision.ops.misc.FrozenBatchNorm2d's forward."""

        def __init__(self, num_features, eps=1e-5):
            super().__init__()
            self.eps = eps
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

        def forward(self, x):
            w = self.weight.reshape(1, -1, 1, 1)
            b = self.bias.reshape(1, -1, 1, 1)
            rv = self.running_var.reshape(1, -1, 1, 1)
            rm = self.running_mean.reshape(1, -1, 1, 1)
            scale = w * (rv + self.eps).rsqrt()
            bias = b - rm * scale
            return x * scale + bias

    return PlainGhostBatchNorm2d, PlainBatchRenorm2d, PlainFrozenBatchNorm2d


def plain_layer(layer, num_features, **kwargs):
    """The plain-torch version of `layer` (one of `LAYERS`) with the benchmark's settings."""
    ghost, renorm, frozen = _plain_classes()
    if layer == "ghost_batch_norm":
        return ghost(num_features, kwargs.pop("virtual_batch_size", VIRTUAL_BATCH_SIZE),
                     **kwargs)
    if layer == "batch_renorm":
        return renorm(num_features, **kwargs)
    return frozen(num_features, **kwargs)


def fastbn_layer(layer, num_features, backend):
    import fastbn.nn

    if layer == "ghost_batch_norm":
        return fastbn.nn.GhostBatchNorm2d(num_features, VIRTUAL_BATCH_SIZE, batch_norm.EPS,
                                          batch_norm.MOMENTUM, backend=backend)
    if layer == "batch_renorm":
        return fastbn.nn.BatchRenorm2d(num_features, R_MAX, D_MAX, batch_norm.EPS,
                                       batch_norm.MOMENTUM, backend=backend)
    return fastbn.nn.FrozenBatchNorm2d(num_features, batch_norm.EPS, backend=backend)


class SmallBatchLayerCase(modules.ModuleCase):
    """One training step of a small-batch layer: fastbn's against the plain-torch version,
    on the arrays of the BatchNorm2d benchmark case of `shape` (the same values for both).

    The running statistics start away from the batch's (running_var 0.5): Batch Renorm's
    r and d then differ from 1 and 0 and its correction is exercised.
    """

    def __init__(self, layer, shape, dtype="float32", channels_last=False):
        super().__init__("batch_norm_2d", batch_norm.BatchNormCase(shape, dtype, channels_last))
        self.layer = layer

    def _with_values(self, module):
        import torch

        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(self.arrays.weight))
            module.bias.copy_(torch.from_numpy(self.arrays.bias))
            module.running_mean.copy_(torch.from_numpy(self.arrays.running_mean))
            module.running_var.fill_(0.5)
        return module

    def torch_step(self, mode, compiled=False):
        import torch

        module = plain_layer(self.layer, self.shape[1], eps=batch_norm.EPS).to(
            torch.from_numpy(self.arrays.x).dtype)  # float64 for the oracle (expected)
        if self.layer != "frozen_batch_norm":
            module.momentum = batch_norm.MOMENTUM
        return self._step(self._with_values(module), mode, compiled)

    def fastbn_step(self, backend, mode):
        """The fastbn layer's step with `backend`; "default" (or None) builds it with
        backend=None, fastbn.nn's routing."""
        backend = None if backend == "default" else backend
        return self._step(self._with_values(fastbn_layer(self.layer, self.shape[1], backend)),
                          mode)

    def check(self, outputs, expected, mode, label=""):
        super().check(outputs, expected, mode, f"{label} {self.layer}")
