"""Every normalization layer by name (`create_norm`, as timm's `get_norm_layer` /
`create_norm_layer`), and swapping a model's BatchNorm layers for another kind
(`swap_norm`, behind ``fastbn.nn.convert(model, norm=...)``; `restore_norms` undoes it,
behind ``fastbn.nn.revert``).

Names and what they build (C = num_features; ``dim`` picks the 1d/2d/3d class where
the kind has several):

==============  =====================================================  ===========
name            layer                                                  dim
==============  =====================================================  ===========
"batchnorm"     fastbn.nn.BatchNorm{dim}d                              1, 2, 3
"ghost"         fastbn.nn.GhostBatchNorm{dim}d (needs virtual_batch_size) 1, 2, 3
"renorm"        fastbn.nn.BatchRenorm{dim}d                            1, 2, 3
"sync"          fastbn.nn.SyncBatchNorm                                any
"frozen"        fastbn.nn.FrozenBatchNorm2d                            2
"groupnorm"     fastbn.nn.GroupNorm(num_groups, C); num_groups         any
                defaults to gcd(C, 32) (32 as Wu & He, fewer where C
                is not a multiple of 32)
"layernorm"     fastbn.nn.GroupNorm(1, C): statistics over (C, *spatial)  any
                per sample, the LayerNorm of Wu & He's comparison (for
                (N, C) input: LayerNorm over C). Not ConvNeXt's
                LayerNorm2d (over C alone at each position).
"instancenorm"  fastbn.nn.InstanceNorm{dim}d, affine=True by default   1, 2, 3
"frn"           fastbn.nn.frn.FilterResponseNorm2d                     2
"evonorm_s0"    fastbn.nn.evonorm.EvoNorm2dS0                          2
==============  =====================================================  ===========
"""
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastbn.nn import modules
from fastbn.nn.frozen import FrozenBatchNorm2d, freezable
from fastbn.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from fastbn.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from fastbn.nn.sync_batch_norm import SyncBatchNorm, share_state

__all__ = ["NORM_NAMES", "create_norm", "restore_norms", "swap_norm"]

ALL_DIMS = (1, 2, 3)
# The key under which a replaced layer is kept on its replacement (in __dict__: not a
# submodule, so it is in no state dict and no modules() walk), for restore_norms.
REPLACED = "_fastbn_replaced"


def _per_dim(*classes):
    return lambda num_features, dim, kwargs: classes[dim - 1](num_features, **kwargs)


def _group_norm(num_features, dim, kwargs):
    kwargs = dict(kwargs)
    num_groups = kwargs.pop("num_groups", None)
    if num_groups is None:
        num_groups = math.gcd(num_features, 32)
    return modules.GroupNorm(num_groups, num_features, **kwargs)


def _layer_norm(num_features, dim, kwargs):
    return modules.GroupNorm(1, num_features, **kwargs)


def _instance_norm(num_features, dim, kwargs):
    classes = (modules.InstanceNorm1d, modules.InstanceNorm2d, modules.InstanceNorm3d)
    return classes[dim - 1](num_features, **{"affine": True, **kwargs})


def _lazy(module_name, class_name):
    """A builder for a class of a fastbn.nn module that may not be there (yet)."""
    def build(num_features, dim, kwargs):
        import importlib

        try:
            cls = getattr(importlib.import_module(f"fastbn.nn.{module_name}"), class_name)
        except (ImportError, AttributeError) as exc:
            raise ImportError(f"fastbn.nn.{module_name}.{class_name} is not available in this "
                              f"fastbn ({exc})") from exc
        return cls(num_features, **kwargs)
    return build


class _Kind:
    """One name of `create_norm`: how to build it, for which dims, and how `swap_norm`
    carries a BatchNorm layer over ("batch": the same parameters and buffers; "frozen":
    a copy of them; "fresh": new parameters, the layer's settings in `carried`)."""

    def __init__(self, build, dims, swap, carried=()):
        self.build, self.dims, self.swap, self.carried = build, dims, swap, carried


_BATCH_SETTINGS = ("eps", "momentum")
_STRUCTURE = ("affine", "track_running_stats", "bias")
KINDS = {
    "batchnorm": _Kind(_per_dim(modules.BatchNorm1d, modules.BatchNorm2d, modules.BatchNorm3d),
                       ALL_DIMS, "batch"),
    "ghost": _Kind(_per_dim(GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d), ALL_DIMS,
                   "batch"),
    "renorm": _Kind(_per_dim(BatchRenorm1d, BatchRenorm2d, BatchRenorm3d), ALL_DIMS, "batch"),
    "sync": _Kind(lambda num_features, dim, kwargs: SyncBatchNorm(num_features, **kwargs),
                  None, "batch"),
    "frozen": _Kind(lambda num_features, dim, kwargs: FrozenBatchNorm2d(num_features, **kwargs),
                    (2,), "frozen"),
    "groupnorm": _Kind(_group_norm, None, "fresh", ("eps", "affine")),
    "layernorm": _Kind(_layer_norm, None, "fresh", ("eps", "affine")),
    "instancenorm": _Kind(_instance_norm, ALL_DIMS, "fresh", ("eps", "affine")),
    "frn": _Kind(_lazy("frn", "FilterResponseNorm2d"), (2,), "fresh"),
    "evonorm_s0": _Kind(_lazy("evonorm", "EvoNorm2dS0"), (2,), "fresh"),
}
NORM_NAMES = tuple(KINDS)


def _kind(name):
    kind = KINDS.get(name.lower()) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"unknown norm {name!r}; the names are {', '.join(NORM_NAMES)}")
    return kind


def create_norm(name, num_features, *, dim=2, **kwargs):
    """A normalization layer by name.

    Parameters
    ----------
    name : str or callable
        One of `NORM_NAMES` (see the module docstring for what each builds), any case; or
        a class / callable, called as ``name(num_features, **kwargs)``.
    num_features : int
        The number of channels C.
    dim : {1, 2, 3}
        Which of a kind's classes: the one for BatchNorm1d's input ((N, C) or (N, C, L)),
        2d's (N, C, H, W) or 3d's. Kinds with one class for every rank ignore it; kinds
        with a 2d class only raise for another dim.
    **kwargs
        The class's own arguments (e.g. ``virtual_batch_size`` for "ghost", ``r_max``
        for "renorm", ``process_group`` for "sync", ``backend`` for fastbn's layers).

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    ValueError
        An unknown name (the message lists the valid ones), or a dim the kind has no class for.
    """
    if callable(name) and not isinstance(name, str):
        return name(num_features, **kwargs)
    kind = _kind(name)
    if dim not in ALL_DIMS or (kind.dims is not None and dim not in kind.dims):
        dims = ALL_DIMS if kind.dims is None else kind.dims
        raise ValueError(f"norm {name!r} has no class for dim={dim!r}; it takes dim in {dims}")
    return kind.build(num_features, dim, kwargs)


def _batch_norm_dim(module):
    """1, 2 or 3 for a BatchNorm{1,2,3}d (or subclass); None for a SyncBatchNorm."""
    for dim, cls in enumerate((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), start=1):
        if isinstance(module, cls):
            return dim
    return None


def _replacement(module, kind, kwargs):
    """What `swap_norm` puts in `module`'s place, or None to leave it."""
    if not isinstance(module, _BatchNorm) or nn.parameter.is_lazy(module.running_mean):
        return None
    dim = _batch_norm_dim(module) or 2  # a SyncBatchNorm takes any rank: its 2d class
    if kind.swap == "frozen":
        if not freezable(module):
            return None
        new = FrozenBatchNorm2d.from_batch_norm(module, **kwargs)
    elif kind.dims is not None and dim not in kind.dims:
        return None
    elif kind.swap == "batch":
        settings = {key: getattr(module, key) for key in _BATCH_SETTINGS}
        settings.update(affine=module.affine, track_running_stats=module.track_running_stats,
                        bias=module.bias is not None)
        new = kind.build(module.num_features, dim, {**settings, **kwargs})
        share_state(module, new)
    else:
        like = module.running_mean if module.weight is None else module.weight
        settings = {key: getattr(module, key) for key in kind.carried}
        new = kind.build(module.num_features, dim, {**settings, **kwargs})
        new.to(device=like.device, dtype=like.dtype)
        new.train(module.training)
        return new
    # Kept for restore_norms: the first layer of a chain of swaps.
    new.__dict__[REPLACED] = module.__dict__.get(REPLACED, module)
    return new


def swap_norm(model, norm, **kwargs):
    """Replace every BatchNorm layer of `model` by a layer of kind `norm`, in place.

    Replaced: every :class:`torch.nn.modules.batchnorm._BatchNorm` (torch's and fastbn's
    BatchNorm1d/2d/3d and SyncBatchNorm, Ghost BatchNorm, Batch Renorm), except lazy
    ones not yet built, by ``create_norm(norm, num_features, dim=...)`` with the dim of
    its class (2 for a SyncBatchNorm). Kinds with a 2d class only ("frozen", "frn",
    "evonorm_s0") replace BatchNorm2d (and SyncBatchNorm) layers and leave the others;
    "frozen" also leaves layers without running statistics.

    What a layer carries over:

    - "batchnorm", "ghost", "renorm", "sync": its parameters and buffers themselves (an
      optimizer built before still trains them), eps, momentum, affine,
      track_running_stats, bias and training mode;
    - "frozen": a copy of its statistics and affine parameters, and eps;
    - the others: eps and affine ("groupnorm", "layernorm", "instancenorm"), the device,
      dtype and training mode; new parameters, initialised as the class does.

    Every replacement is built before the first one goes in, so a call that raises (e.g.
    "ghost" without ``virtual_batch_size``) leaves the model as it was. The replaced
    layer is kept on its replacement for :func:`restore_norms` (``fastbn.nn.revert``)
    where the state allows going back: the BatchNorm-family kinds and "frozen".

    Parameters
    ----------
    model : torch.nn.Module
    norm : str
        A name of `NORM_NAMES`.
    **kwargs
        The new layers' arguments (``virtual_batch_size=4``, ``backend="cython"``, ...);
        for the BatchNorm-family kinds they may override eps and momentum, not affine,
        bias or track_running_stats (the shared parameters and buffers are the layer's).

    Returns
    -------
    torch.nn.Module
        `model`; its replacement if `model` itself is a BatchNorm layer.
    """
    kind = _kind(norm)
    fixed = sorted(key for key in _STRUCTURE if key in kwargs)
    if kind.swap == "batch" and fixed:
        raise ValueError(f"swap_norm keeps each layer's {', '.join(fixed)} (the parameters "
                         f"and buffers are shared); do not pass them")
    root = _replacement(model, kind, kwargs)
    if root is not None:
        return root
    replacements = [(parent, name, new) for parent in model.modules()
                    for name, child in parent.named_children()
                    if (new := _replacement(child, kind, kwargs)) is not None]
    for parent, name, new in replacements:
        setattr(parent, name, new)
    return model


def _restored(layer):
    """The layer `layer` replaced, with `layer`'s current state."""
    original = layer.__dict__[REPLACED]
    if isinstance(layer, FrozenBatchNorm2d):
        with torch.no_grad():
            if original.affine:
                original.weight = nn.Parameter(layer.weight.clone(),
                                               original.weight.requires_grad)
                if original.bias is not None:
                    original.bias = nn.Parameter(layer.bias.clone(), original.bias.requires_grad)
            original.running_mean = layer.running_mean.clone()
            original.running_var = layer.running_var.clone()
            if original.num_batches_tracked is not None:
                original.num_batches_tracked = original.num_batches_tracked.to(
                    layer.running_mean.device)
        original.train(layer.training)
    else:
        share_state(layer, original)
    return original


def restore_norms(model):
    """Undo :func:`swap_norm` (and :func:`fastbn.nn.freeze`) where the state allows: every
    layer that replaced a BatchNorm layer and keeps it (the BatchNorm-family kinds and
    FrozenBatchNorm2d) gives way to that layer again, with the current parameters and
    statistics (the same objects for the BatchNorm-family kinds; new parameters from a
    FrozenBatchNorm2d's buffers). Layers of the other kinds stay. Returns `model` (the
    restored layer if `model` itself is one)."""
    if REPLACED in model.__dict__:
        return _restored(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if REPLACED in child.__dict__:
                setattr(parent, name, _restored(child))
    return model
