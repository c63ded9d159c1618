"""Swap a model's torch normalization layers for fastbn's, and back."""
from collections import Counter

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
TORCH_CLASS[modules.BatchNormAct2d] = nn.BatchNorm2d

# Activation modules convert() fuses into the BatchNorm2d before them (exact classes, as
# above), and the name of each in fastbn/_activations.py.
FUSED_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu",
                     nn.Hardswish: "hardswish", nn.LeakyReLU: "leaky_relu"}


class FusedActivation(nn.Identity):
    """Where `convert` took an activation module out of an ``nn.Sequential``: the
    BatchNormAct2d before it applies the activation; `revert` puts the module back."""

    def extra_repr(self):
        return "fused into the BatchNormAct2d before it"


def convert(model, backend=None, *, fuse=True, norm=None, **norm_kwargs):
    """Make every torch normalization layer of `model` a fastbn one, in place.

    Each layer keeps its identity: its class becomes the fastbn subclass of its
    torch class (as torch's lazy modules become their non-lazy class), so the
    parameters and buffers are the same objects (an optimizer built earlier
    still trains them), and the training/eval mode, device, dtype, hooks and any
    reference to the layer held elsewhere stay as they were.

    With `fuse`, a BatchNorm2d directly followed by an activation module (ReLU, ReLU6,
    SiLU, Hardswish, LeakyReLU) inside an ``nn.Sequential`` (as in torchvision's and
    timm's Conv-BN-activation blocks) becomes a `BatchNormAct2d` that applies the
    activation in its own kernel passes, and the activation's place in the Sequential
    holds a `FusedActivation` (an identity). Never fused: a BatchNorm or an activation
    module that appears more than once in the model, or that has hooks (they would see
    other values), or a Sequential subclass with a forward of its own. The state dict
    does not change (activations have no parameters): it loads into the original model
    and back.

    Parameters
    ----------
    model : torch.nn.Module
        Converted with all its submodules (the model itself may be a norm layer).
    backend : {"cython", "numba", "numpy"}, optional
        Set on every fastbn layer of the model, including ones already converted;
        None follows :func:`fastbn.get_backend` at each call.
    fuse : bool
        Fuse BatchNorm2d + activation as said above.
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
    if fuse:
        _fuse_activations(model)
    for module in model.modules():
        fastbn_class = FASTBN_CLASS.get(type(module))
        if fastbn_class is not None:
            module.__class__ = fastbn_class
        if isinstance(module, modules.FastbnNorm):
            module.backend = backend
    return model


def revert(model):
    """Undo :func:`convert`: every fastbn layer of `model` becomes its torch class again,
    and every activation `convert` fused goes back to its place.

    Layers built as fastbn modules are reverted too, except a `BatchNormAct2d` built as
    such (no torch module computes BatchNorm and activation in one). Layers that replaced
    BatchNorm layers (``convert(model, norm=...)``, :func:`fastbn.nn.freeze`) give way to
    them again where the state allows (:func:`fastbn.nn.factory.restore_norms`). Returns
    `model`.
    """
    for parent in model.modules():
        for name, module in parent._modules.items():
            if isinstance(module, FusedActivation):
                norm = _previous_module(parent, name)
                parent._modules[name] = norm.__dict__.pop("_fused_activation")
                del norm.__dict__["activation"], norm.__dict__["negative_slope"]
    model = restore_norms(model)
    for module in model.modules():
        torch_class = TORCH_CLASS.get(type(module))
        if torch_class is None or (type(module) is modules.BatchNormAct2d
                                   and "activation" in module.__dict__):
            continue
        module.__class__ = torch_class
        del module.__dict__["_fastbn_backend"]
    return model


def _fuse_activations(model):
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
            continue
        names = list(parent._modules)
        for name, next_name in zip(names, names[1:]):
            norm, activation = parent._modules[name], parent._modules[next_name]
            act = FUSED_ACTIVATIONS.get(type(activation))
            if (act is None or type(norm) not in (nn.BatchNorm2d, modules.BatchNorm2d)
                    or uses[id(norm)] != 1 or uses[id(activation)] != 1
                    or _has_hooks(norm) or _has_hooks(activation)):
                continue
            backend = norm.__dict__.get("_fastbn_backend")
            norm.__class__ = modules.BatchNormAct2d
            norm.backend = backend
            norm.set_activation(act, getattr(activation, "negative_slope", 0.01))
            norm.__dict__["_fused_activation"] = activation
            parent._modules[next_name] = FusedActivation()


def _has_hooks(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _previous_module(parent, name):
    names = list(parent._modules)
    return parent._modules[names[names.index(name) - 1]]
