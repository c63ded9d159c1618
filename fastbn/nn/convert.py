"""Swap a model's torch normalization layers for fastbn's, and back."""
from torch import nn

from fastbn.nn import modules
from fastbn.nn.factory import restore_norms, swap_norm

__all__ = ["convert", "revert"]

# torch class -> its fastbn subclass. Exact classes only: a user's subclass may
# override forward, and SyncBatchNorm / the Lazy modules behave differently.
FASTBN_CLASS = {
    nn.BatchNorm1d: modules.BatchNorm1d,
    nn.BatchNorm2d: modules.BatchNorm2d,
    nn.BatchNorm3d: modules.BatchNorm3d,
    nn.GroupNorm: modules.GroupNorm,
    nn.InstanceNorm1d: modules.InstanceNorm1d,
    nn.InstanceNorm2d: modules.InstanceNorm2d,
    nn.InstanceNorm3d: modules.InstanceNorm3d,
    nn.LayerNorm: modules.LayerNorm,
    nn.RMSNorm: modules.RMSNorm,
}
TORCH_CLASS = {fastbn_class: torch_class for torch_class, fastbn_class in FASTBN_CLASS.items()}


def convert(model, backend=None, *, norm=None, **norm_kwargs):
    """Make every torch normalization layer of `model` a fastbn one, in place.

    Each layer keeps its identity: its class becomes the fastbn subclass of its
    torch class (as torch's lazy modules become their non-lazy class), so the
    parameters and buffers are the same objects (an optimizer built earlier
    still trains them), and the training/eval mode, device, dtype, hooks and any
    reference to the layer held elsewhere stay as they were.

    Parameters
    ----------
    model : torch.nn.Module
        Converted with all its submodules (the model itself may be a norm layer).
    backend : {"cython", "numba", "numpy"}, optional
        Set on every fastbn layer of the model, including ones already converted;
        None follows :func:`fastbn.get_backend` at each call.
    norm : str, optional
        First replace every BatchNorm layer by this kind of norm
        (:func:`fastbn.nn.factory.swap_norm`, e.g. ``norm="ghost",
        virtual_batch_size=4``), with ``norm_kwargs`` as its arguments.

    Returns
    -------
    torch.nn.Module
        `model` itself (with `norm`: a new layer if `model` is a BatchNorm layer).
    """
    if norm is not None:
        model = swap_norm(model, norm, **norm_kwargs)
    elif norm_kwargs:
        raise TypeError(f"convert() got arguments for a norm ({', '.join(norm_kwargs)}) "
                        "but no norm=")
    for module in model.modules():
        fastbn_class = FASTBN_CLASS.get(type(module))
        if fastbn_class is not None:
            module.__class__ = fastbn_class
        if isinstance(module, modules.FastbnNorm):
            module.backend = backend
    return model


def revert(model):
    """Undo :func:`convert`: every fastbn layer of `model` becomes its torch class again.

    Layers built as fastbn modules are reverted too. Layers that replaced BatchNorm layers
    (``convert(model, norm=...)``, :func:`fastbn.nn.freeze`) give way to them again where
    the state allows (:func:`fastbn.nn.factory.restore_norms`). Returns `model`.
    """
    model = restore_norms(model)
    for module in model.modules():
        torch_class = TORCH_CLASS.get(type(module))
        if torch_class is not None:
            module.__class__ = torch_class
            del module.__dict__["_fastbn_backend"]
    return model
