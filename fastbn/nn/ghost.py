"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017; TabNet's GBN): BatchNorm whose
training statistics come from virtual batches of `virtual_batch_size` samples.

The batch is cut along N into consecutive virtual batches of `virtual_batch_size`
samples (the last one holds what is left, so it may be smaller), and each is
normalized with its own mean and variance, as a BatchNorm call on it alone would.
The running statistics are updated once per virtual batch, in order, each update
being BatchNorm's: a training call is exactly BatchNorm called on each virtual
batch in turn (outputs, gradients, running statistics, ``num_batches_tracked``,
which counts virtual batches). Eval mode is BatchNorm's.

No kernel of its own: BatchNorm's kernels (`fastbn.batch_norm_forward` /
`_backward`) run on each virtual batch, inside one autograd node. A virtual batch
is a slice along N, which is contiguous memory in both the contiguous and the
channels-last layout, so the kernels read and write the input, output and
gradients in place: no copy of x, y or a gradient.
"""
import numbers

import numpy as np
import torch
from torch import nn

import fastbn
from fastbn.nn import _function, functional
from fastbn.nn._small_batch import RunningState, check_batch_size, check_eps
from fastbn.nn.modules import FastbnNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm"]


def check_virtual_batch_size(virtual_batch_size):
    """`virtual_batch_size` as an int >= 1, or a TypeError / ValueError that says why not."""
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size,
                                                              numbers.Integral):
        raise TypeError(f"virtual_batch_size must be an int, got {virtual_batch_size!r}")
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
    return int(virtual_batch_size)


def virtual_batches(batch_size, virtual_batch_size):
    """The slices of N, in order, of a batch's virtual batches (the last may be smaller).

    An empty batch is one empty virtual batch, as it is one (empty) batch to BatchNorm.

    Slices of `virtual_batch_size`, not ``torch.chunk(x, ceil(N / k))`` as TabNet's GBN:
    for N = 9, k = 4 that gives 3, 3, 3 samples where these give 4, 4, 1.
    """
    return [slice(start, min(start + virtual_batch_size, batch_size))
            for start in range(0, max(batch_size, 1), virtual_batch_size)]


def ghost_batch_norm(input, virtual_batch_size, running_mean=None, running_var=None, weight=None,
                     bias=None, training=False, momentum=0.1, eps=1e-5, *, backend=None):
    """Ghost batch normalization: :func:`torch.nn.functional.batch_norm` on each virtual batch.

    Parameters
    ----------
    input : Tensor of shape (N, C) or (N, C, *spatial), up to 3 spatial dims
    virtual_batch_size : int, >= 1
        Samples per virtual batch; the last virtual batch holds the N % k left over.
    running_mean, running_var : Tensor of shape (C,) or None
        In training, updated in place once per virtual batch, in order, as BatchNorm
        does for a batch. In eval mode they normalize the input.
    weight, bias : Tensor of shape (C,) or None
    training : bool
        Normalize each virtual batch with its own statistics (True), or the whole input
        with the running ones (False: BatchNorm's eval mode).
    momentum : float
        The momentum of each virtual batch's update.
    eps : float
    backend : {"cython", "numba", "numpy"}, optional
        fastbn's backend (None: :func:`fastbn.get_backend`).

    Returns
    -------
    Tensor
        Same shape, dtype and memory layout as `input`.
    """
    virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
    if not training:
        return functional.batch_norm(input, running_mean, running_var, weight, bias, False,
                                     momentum, eps, backend=backend)
    chunks = virtual_batches(input.shape[0], virtual_batch_size)
    return _ghost_training(input, chunks, running_mean, running_var, weight, bias,
                           [momentum] * len(chunks), eps, backend)


def _ghost_training(input, chunks, running_mean, running_var, weight, bias, momenta, eps,
                    backend):
    """Training forward over the virtual batches `chunks`, with one momentum per chunk."""
    check_eps(eps, True)
    if len(chunks) == 1:  # N <= k: BatchNorm itself, whatever the path
        return functional.batch_norm(input, running_mean, running_var, weight, bias, True,
                                     momenta[0], eps, backend=backend)
    # Everything that can fail is checked before the first virtual batch updates a running
    # statistic: the last virtual batch is the smallest one.
    last = chunks[-1]
    check_batch_size((last.stop - last.start,) + tuple(input.shape[1:]))
    _function.check_channel_vectors(input, (("running_mean", running_mean),
                                            ("running_var", running_var),
                                            ("weight", weight), ("bias", bias)))
    if not _function.runs_on_fastbn(input, weight, bias, running_mean, running_var):
        # Tensors fastbn's kernels do not take (other dtypes and devices, torch.compile's
        # tracing): BatchNorm per virtual batch through functional.batch_norm, which hands
        # them to torch's op.
        return torch.cat([functional.batch_norm(input[chunk], running_mean, running_var, weight,
                                                bias, True, momentum, eps, backend=backend)
                          for chunk, momentum in zip(chunks, momenta)])
    op = GhostBatchNormOp(running_mean, running_var, chunks, momenta, eps, backend)
    return _function.apply(op, input, weight, bias, _function.needs_grad(input, weight, bias))


class GhostBatchNormOp:
    """Ghost batch normalization for `fastbn.nn._function.NormFunction`: BatchNorm's
    training kernels on each virtual batch (a slice of the arrays along N)."""

    __slots__ = ("running_mean", "running_var", "chunks", "momenta", "eps", "backend")

    def __init__(self, running_mean, running_var, chunks, momenta, eps, backend):
        self.running_mean = running_mean
        self.running_var = running_var
        self.chunks = chunks
        self.momenta = momenta
        self.eps = eps
        self.backend = backend

    def forward(self, x, weight, bias):
        y = np.empty_like(x)  # x's memory layout, so that each chunk of y is x's chunk's
        means = np.empty((len(self.chunks), x.shape[1]), x.dtype)
        invstds = np.empty_like(means)
        running_mean = _function.as_array(self.running_mean)
        running_var = _function.as_array(self.running_var)
        for index, (chunk, momentum) in enumerate(zip(self.chunks, self.momenta)):
            _, means[index], invstds[index] = fastbn.batch_norm_forward(
                x[chunk], weight, bias, running_mean, running_var, True, momentum, self.eps,
                out=y[chunk], backend=self.backend)
        return y, (means, invstds)

    def backward(self, grad_y, x, weight, bias, stats, output_mask):
        means, invstds = stats
        want_x, want_weight, want_bias = output_mask
        grad_x = np.empty_like(x) if want_x else None
        grad_weight = np.zeros(x.shape[1], x.dtype) if want_weight else None
        grad_bias = np.zeros(x.shape[1], x.dtype) if want_bias else None
        for index, chunk in enumerate(self.chunks):
            _, chunk_weight, chunk_bias = fastbn.batch_norm_backward(
                grad_y[chunk], x[chunk], weight, means[index], invstds[index], True,
                output_mask=output_mask, out=None if grad_x is None else grad_x[chunk],
                backend=self.backend)
            if want_weight:
                grad_weight += chunk_weight
            if want_bias:
                grad_bias += chunk_bias
        return grad_x, grad_weight, grad_bias

    def backward_differentiable(self, grad_y, input, weight, bias, stats, output_mask):
        return _function.torch_gradients(
            lambda input, weight, bias: torch.cat([
                torch.batch_norm(input[chunk], weight, bias, None, None, True, 0.0, self.eps,
                                 False) for chunk in self.chunks]),
            grad_y, input, weight, output_mask, input.shape[1])


class _GhostBatchNorm(FastbnNorm):
    """GhostBatchNorm*d's constructor and forward; the torch class comes second in the bases."""

    def __init__(self, num_features, virtual_batch_size, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True, backend=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.virtual_batch_size = virtual_batch_size
        self.backend = backend

    @property
    def virtual_batch_size(self):
        """Samples per virtual batch (int >= 1); may be changed between calls."""
        return self.__dict__["_virtual_batch_size"]

    @virtual_batch_size.setter
    def virtual_batch_size(self, value):
        self.__dict__["_virtual_batch_size"] = check_virtual_batch_size(value)

    def forward(self, input):
        self._check_input_dim(input)
        state = RunningState(self)
        if not state.bn_training:
            return functional.batch_norm(input, state.running_mean, state.running_var,
                                         self.weight, self.bias, False, 0.0, self.eps,
                                         backend=self.backend)
        chunks = virtual_batches(input.shape[0], self.virtual_batch_size)
        output = _ghost_training(input, chunks, state.running_mean, state.running_var,
                                 self.weight, self.bias,
                                 [state.momentum_of_batch(index) for index in range(len(chunks))],
                                 self.eps, self.backend)
        state.count(len(chunks))
        return output

    def extra_repr(self):
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


_DOC = """Ghost BatchNorm on fastbn's kernels; input {shape}.

    BatchNorm whose training statistics come from virtual batches of
    `virtual_batch_size` samples (the last one may be smaller); a training call
    equals :class:`torch.nn.{base}` called on each virtual batch in turn, running
    statistics included (``num_batches_tracked`` counts virtual batches). Eval mode,
    parameters, buffers and state dict are :class:`torch.nn.{base}`'s.

    Parameters
    ----------
    num_features : int
    virtual_batch_size : int, >= 1
        Can be changed later (``m.virtual_batch_size = 8``).
    eps, momentum, affine, track_running_stats, device, dtype, bias
        As :class:`torch.nn.{base}`.
    backend : {{"cython", "numba", "numpy"}}, optional
        fastbn's backend; None follows :func:`fastbn.get_backend`.

    See docs/small_batch.md.
    """


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    __doc__ = _DOC.format(shape="(N, C) or (N, C, L)", base="BatchNorm1d")


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    __doc__ = _DOC.format(shape="(N, C, H, W)", base="BatchNorm2d")


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    __doc__ = _DOC.format(shape="(N, C, D, H, W)", base="BatchNorm3d")
