"""Drop-in subclasses of torch's normalization modules that run fastbn's kernels.

Each class subclasses the torch module of the same name (so ``isinstance(m,
torch.nn.BatchNorm2d)`` holds), takes the same constructor arguments plus
``backend=``, and has the same parameters, buffers, state-dict keys and
``_version``. Only ``forward`` differs: it calls `fastbn.nn.functional`.

A new op's module is the torch class plus `FastbnNorm` and a ``forward``.
"""
import torch
from torch import nn

from fastbn._backends import load_backend
from fastbn.nn import functional

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class FastbnNorm:
    """Mixin of every fastbn.nn module: the ``backend`` attribute and its repr."""

    @property
    def backend(self):
        """fastbn's backend for this module; None follows :func:`fastbn.get_backend`."""
        return self.__dict__["_fastbn_backend"]

    @backend.setter
    def backend(self, name):
        if name is not None:
            load_backend(name)  # an unknown or missing backend fails now, not at the first call
        self.__dict__["_fastbn_backend"] = name

    def extra_repr(self):
        return f"{super().extra_repr()}, backend={self.backend!r}"


class _BatchNorm(FastbnNorm):
    """BatchNorm*d's constructor and forward; the torch class comes second in the bases."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True, backend=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.backend = backend

    def forward(self, input):
        if torch.compiler.is_compiling():
            # torch's forward, which traces into one graph (see docs/nn.md).
            return super().forward(input)
        self._check_input_dim(input)
        # As torch's _BatchNorm.forward, except that num_batches_tracked is counted after
        # the call succeeded: a call that raises changes no state. Each attribute is read
        # once (parameters and buffers are looked up through Module.__getattr__).
        training = self.training
        running_mean, running_var = self.running_mean, self.running_var
        num_batches_tracked = self.num_batches_tracked
        track = training and self.track_running_stats and num_batches_tracked is not None
        momentum = self.momentum
        if momentum is None:  # cumulative moving average over the batches seen
            momentum = 1.0 / float(num_batches_tracked.item() + 1) if track else 0.0
        # Batch statistics in training, and in eval mode when there are no running ones.
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:  # untracked buffers are not updated
            running_mean = running_var = None
        output = functional.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                       bn_training, momentum, self.eps, backend=self.backend)
        if track:
            num_batches_tracked.add_(1)
        return output


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` on fastbn's kernels; input (N, C) or (N, C, L).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` on fastbn's kernels; input (N, C, H, W).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` on fastbn's kernels; input (N, C, D, H, W).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """
