"""Drop-in subclasses of torch's normalization modules that run fastbn's kernels.

Each class subclasses the torch module of the same name (so ``isinstance(m,
torch.nn.BatchNorm2d)`` holds), takes the installed torch's constructor
arguments plus a keyword-only ``backend=``, and has the same parameters,
buffers, state-dict keys and ``_version``. Only ``forward`` differs: it calls
`fastbn.nn.functional`.

The constructor arguments are not written out here: they differ between torch
releases (``bias=`` of BatchNorm, GroupNorm and InstanceNorm is newer than
torch 2.4), so each class takes them from its torch class when it is defined
(`FastbnNorm.__init_subclass__`) and hands them to torch's constructor as given
(`FastbnNorm.__init__`, which a subclass with arguments of its own can call with
``backend=``).

A new op's module is the torch class plus `FastbnNorm` and a ``forward``.
"""
import inspect

import torch
from torch import nn

from fastbn._activations import ACTIVATIONS, activation_code, check_negative_slope
from fastbn._backends import load_backend
from fastbn.nn import _function, functional

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm"]


def constructor_signature(torch_class, **extra):
    """`torch_class`'s constructor signature (self included) plus the keyword-only
    ``backend=None`` (and `extra`: name=default, keyword-only too): what a fastbn.nn
    subclass of it takes on this torch."""
    parameters = list(inspect.signature(torch_class.__init__).parameters.values())
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in dict(extra, backend=None).items()]
    # A **kwargs, if torch's constructor has one, must stay last.
    position = len(parameters)
    if parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
        position -= 1
    parameters[position:position] = added
    return inspect.Signature(parameters)


def _signed_constructor(cls, torch_class):
    """`cls`'s ``__init__``: `FastbnNorm.__init__` under `torch_class`'s signature plus
    ``backend``, so that ``inspect.signature(cls)`` (and help) shows what it takes."""
    def __init__(self, *args, backend=None, **kwargs):
        FastbnNorm.__init__(self, *args, backend=backend, **kwargs)

    __init__.__signature__ = constructor_signature(torch_class)
    __init__.fastbn_signed = True
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"The installed torch's {torch_class.__name__} arguments, plus backend."
    return __init__


def _own_constructor(cls):
    """The __init__ a fastbn class defines itself or inherits from a fastbn base (None
    if it would only get FastbnNorm's or a signed copy of its torch class's)."""
    for base in cls.__mro__:
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        if base is FastbnNorm or getattr(init, "fastbn_signed", False):
            return None
        return init
    return None


def _torch_class(cls):
    """The torch module class a fastbn.nn class subclasses (None for a mixin)."""
    for base in cls.__mro__:
        if issubclass(base, nn.Module) and not issubclass(base, FastbnNorm):
            return base
    return None


class FastbnNorm:
    """Mixin of every fastbn.nn module: the constructor (torch's arguments plus
    ``backend``), the ``backend`` attribute and its repr."""

    def __init__(self, *args, backend=None, **kwargs):
        """torch's constructor, given the arguments as they came, then ``backend``."""
        try:
            super().__init__(*args, **kwargs)
        except TypeError as error:
            torch_class = _torch_class(type(self))
            try:
                inspect.signature(torch_class).bind(*args, **kwargs)
            except TypeError:
                # An argument this torch does not take (bias= before torch had it):
                # torch's message, plus which torch this is and what it takes.
                signature = constructor_signature(torch_class).replace(
                    return_annotation=inspect.Signature.empty)
                arguments = str(signature).replace("(self, ", "(", 1)
                raise TypeError(f"{error} (fastbn.nn.{type(self).__name__} takes the "
                                f"arguments of the installed torch {torch.__version__}'s "
                                f"{torch_class.__name__}: {arguments})") from None
            raise
        self.backend = backend

    def __init_subclass__(cls, **kwargs):
        # Each class with a torch class gets that class's signature, read from the
        # installed torch; a class that defines its own __init__, or inherits one from a
        # fastbn base other than FastbnNorm (GhostBatchNorm2d's), keeps it.
        super().__init_subclass__(**kwargs)
        torch_class = _torch_class(cls)
        if torch_class is not None and _own_constructor(cls) is None:
            cls.__init__ = _signed_constructor(cls, torch_class)

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
    """BatchNorm*d's forward; the torch class comes second in the bases."""

    # The fused activation (fastbn/_activations.py): none in the plain modules.
    activation = None
    negative_slope = 0.01

    def forward(self, input):
        if torch.compiler.is_compiling():
            # torch's forward, which traces into one graph (see docs/nn.md).
            return _function.torch_activation(activation_code(self.activation),
                                              super().forward(input), self.negative_slope)
        self._check_input_dim(input)
        # As torch's _BatchNorm.forward, except that num_batches_tracked is counted by the
        # kernel call that updates the running statistics: a call that raises counts
        # nothing, and an interrupt cannot leave the two apart. Parameters and buffers
        # are read from their dicts (Module.__getattr__ is a Python call for each).
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        num_batches_tracked = buffers.get("num_batches_tracked")
        training = self.training
        track = training and self.track_running_stats and num_batches_tracked is not None
        momentum = self.momentum
        if momentum is None:  # cumulative moving average over the batches seen
            momentum = 1.0 / float(num_batches_tracked.item() + 1) if track else 0.0
        # Batch statistics in training, and in eval mode when there are no running ones.
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:  # untracked buffers are not updated
            running_mean = running_var = None
        parameters = self._parameters
        return functional.batch_norm(
            input, running_mean, running_var, parameters["weight"], parameters["bias"],
            bn_training, momentum, self.eps, activation=self.activation,
            negative_slope=self.negative_slope,
            num_batches_tracked=num_batches_tracked if track else None, backend=self.backend)


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


class BatchNormAct2d(BatchNorm2d):
    """BatchNorm2d followed by an activation, in the same kernel passes (timm's
    ``BatchNormAct2d`` is the precedent); input (N, C, H, W).

    A subclass of fastbn's and torch's BatchNorm2d: torch's arguments, parameters, buffers
    and state-dict keys (a state dict loads into a ``torch.nn.BatchNorm2d`` and back), plus
    keyword-only ``act``, ``negative_slope`` and ``backend``. The output is
    ``act(batch_norm(input))`` with torch's numbers; the backward recomputes the
    normalized values from the input instead of keeping them.

    Parameters
    ----------
    act : {"relu", "relu6", "silu", "hardswish", "leaky_relu", "identity"}
    negative_slope : float
        leaky_relu's slope for negative values.
    backend : {"cython", "numba", "numpy"} or None
        As in :class:`BatchNorm2d`. See ``docs/nn.md``.
    """

    def __init__(self, *args, act="relu", negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_activation(act, negative_slope)

    __init__.__signature__ = constructor_signature(nn.BatchNorm2d, act="relu",
                                                   negative_slope=0.01)

    def set_activation(self, act, negative_slope=0.01):
        """Set the fused activation (checked now, not at the first call)."""
        if act is None or act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of "
                             f"{', '.join(ACTIVATIONS)}")
        self.activation = act
        self.negative_slope = check_negative_slope(negative_slope)

    def extra_repr(self):
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, act={self.activation!r}{slope}"


class GroupNorm(FastbnNorm, nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` on fastbn's kernels; input (N, C, *spatial).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """

    def forward(self, input):
        return functional.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                                     backend=self.backend)


class LayerNorm(FastbnNorm, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` on fastbn's kernels; input (*, *normalized_shape).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """

    def forward(self, input):
        return functional.layer_norm(input, self.normalized_shape, self.weight, self.bias,
                                     self.eps, backend=self.backend)


class RMSNorm(FastbnNorm, nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` on fastbn's kernels; input (*, *normalized_shape).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """

    def forward(self, input):
        return functional.rms_norm(input, self.normalized_shape, self.weight, self.eps,
                                   backend=self.backend)


class _InstanceNorm(FastbnNorm):
    """InstanceNorm*d's normalization; torch's forward checks the input and handles an
    unbatched one. The torch class comes second in the bases."""

    def _apply_instance_norm(self, input):
        # As torch's: the running statistics are updated in training, and used in eval mode
        # when tracked.
        return functional.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps, backend=self.backend)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    """:class:`torch.nn.InstanceNorm1d` on fastbn's kernels; input (N, C, L) or (C, L).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    """:class:`torch.nn.InstanceNorm2d` on fastbn's kernels; input (N, C, H, W) or (C, H, W).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    """:class:`torch.nn.InstanceNorm3d` on fastbn's kernels; input (N, C, D, H, W) or
    (C, D, H, W).

    Takes torch's arguments plus ``backend`` ({"cython", "numba", "numpy"} or None for
    :func:`fastbn.get_backend`). See ``docs/nn.md``.
    """
