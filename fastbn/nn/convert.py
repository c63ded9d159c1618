"""Swap a model's torch normalization layers for fastbn's, and back."""
from torch import nn

from fastbn.nn import modules

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


def convert(model, backend=None):
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

    Returns
    -------
    torch.nn.Module
        `model` itself.
    """
    for module in model.modules():
        fastbn_class = FASTBN_CLASS.get(type(module))
        if fastbn_class is not None:
            module.__class__ = fastbn_class
        if isinstance(module, modules.FastbnNorm):
            module.backend = backend
    return model


def revert(model):
    """Undo :func:`convert`: every fastbn layer of `model` becomes its torch class again.

    Layers built as fastbn modules are reverted too. Returns `model`.
    """
    for module in model.modules():
        torch_class = TORCH_CLASS.get(type(module))
        if torch_class is not None:
            module.__class__ = torch_class
            del module.__dict__["_fastbn_backend"]
    return model
