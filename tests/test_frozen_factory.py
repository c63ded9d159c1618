"""FrozenBatchNorm2d and freeze (torchvision's and timm's semantics), create_norm, swap_norm
and convert(norm=...) / revert."""
import copy

import pytest
import torch
from torch import nn

import fastbn.nn as fnn
from fastbn.benchmarks.models import ResNet
from fastbn.benchmarks.small_batch import plain_layer
from fastbn.nn.factory import NORM_NAMES


def randomise_batch_norms(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-1, 1, generator=generator)
                module.running_mean.uniform_(-1, 1, generator=generator)
                module.running_var.uniform_(0.5, 2, generator=generator)
    return model


def small_resnet():
    torch.manual_seed(0)
    return randomise_batch_norms(ResNet(widths=(4, 8), blocks=(1, 1)))


RESNET_BATCH_NORMS = 6  # the stem's, two per block, the downsampling shortcut's


# ---------------------------------------------------------------------------
# FrozenBatchNorm2d and freeze


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_frozen_matches_torchvision(backend, dtype, memory_format):
    reference = plain_layer("frozen_batch_norm", 6).to(dtype)
    generator = torch.Generator().manual_seed(1)
    for buffer in reference.buffers():
        buffer.uniform_(0.5, 2.0, generator=generator)
    module = fnn.FrozenBatchNorm2d(6, backend=backend).to(dtype)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6, 5, 4, dtype=dtype, generator=generator).contiguous(
        memory_format=memory_format)
    grad_y = torch.randn(3, 6, 5, 4, dtype=dtype, generator=generator)
    for training in (True, False):  # no difference between the modes
        module.train(training)
        x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_new = reference(x_ref), module(x_new)
        y_ref.backward(grad_y)
        y_new.backward(grad_y)
        torch.testing.assert_close(y_new, y_ref)
        torch.testing.assert_close(x_new.grad, x_ref.grad)
    assert y_new.is_contiguous(memory_format=memory_format)
    assert not list(module.parameters())
    assert all(not buffer.requires_grad for buffer in module.buffers())


def test_frozen_state_dict_and_errors():
    batch_norm = randomise_batch_norms(nn.BatchNorm2d(4))
    frozen = fnn.FrozenBatchNorm2d(4)
    frozen.load_state_dict(batch_norm.state_dict())  # num_batches_tracked dropped
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert torch.equal(frozen.running_var, batch_norm.running_var)
    batch_norm.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), batch_norm(x))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        frozen(torch.randn(4, 3, 3))
    assert repr(frozen) == "FrozenBatchNorm2d(4, eps=1e-05, backend=None)"


def test_freeze_gives_the_eval_model():
    model = small_resnet()
    model.head.append(nn.BatchNorm1d(10))  # 1d: left, as timm's freeze_batch_norm_2d
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    frozen = fnn.freeze(model.train())
    assert frozen is model
    kinds = [type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                                 fnn.FrozenBatchNorm2d))]
    assert kinds.count(fnn.FrozenBatchNorm2d) == RESNET_BATCH_NORMS
    assert type(model.head[-1]) is nn.BatchNorm1d
    model.head[-1].eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)  # in training mode: frozen statistics
    untracked = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False))
    assert type(fnn.freeze(untracked)[0]) is nn.BatchNorm2d  # no statistics to freeze
    single = fnn.freeze(nn.BatchNorm2d(3))
    assert type(single) is fnn.FrozenBatchNorm2d


# ---------------------------------------------------------------------------
# create_norm


@pytest.mark.parametrize("name, expected", [
    ("batchnorm", fnn.BatchNorm2d), ("ghost", fnn.GhostBatchNorm2d),
    ("renorm", fnn.BatchRenorm2d), ("sync", fnn.SyncBatchNorm),
    ("frozen", fnn.FrozenBatchNorm2d), ("groupnorm", fnn.GroupNorm),
    ("layernorm", fnn.GroupNorm), ("instancenorm", fnn.InstanceNorm2d)])
def test_create_norm(name, expected):
    kwargs = {"virtual_batch_size": 4} if name == "ghost" else {}
    layer = fnn.create_norm(name.upper(), 48, backend="numpy", **kwargs)
    assert type(layer) is expected and layer.backend == "numpy"
    x = torch.randn(8, 48, 3, 3)
    assert layer(x).shape == x.shape


def test_create_norm_choices():
    assert type(fnn.create_norm("ghost", 8, dim=1, virtual_batch_size=2)) is fnn.GhostBatchNorm1d
    assert type(fnn.create_norm("renorm", 8, dim=3)) is fnn.BatchRenorm3d
    assert type(fnn.create_norm("instancenorm", 8, dim=1)) is fnn.InstanceNorm1d
    assert fnn.create_norm("instancenorm", 8).affine
    assert fnn.create_norm("groupnorm", 64).num_groups == 32
    assert fnn.create_norm("groupnorm", 24).num_groups == 8  # gcd(24, 32)
    assert fnn.create_norm("groupnorm", 24, num_groups=4).num_groups == 4
    layer_norm = fnn.create_norm("layernorm", 6)
    assert layer_norm.num_groups == 1  # over (C, H, W) of each sample
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(layer_norm(x), nn.functional.layer_norm(x, (6, 3, 3)))
    assert type(fnn.create_norm(nn.BatchNorm2d, 8)) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="unknown norm 'batchnorm2'; the names are batchnorm, "
                                         "ghost, renorm"):
        fnn.create_norm("batchnorm2", 8)
    with pytest.raises(ValueError,
                       match=r"'frozen' has no class for dim=1; it takes dim in \(2,\)"):
        fnn.create_norm("frozen", 8, dim=1)
    with pytest.raises(TypeError, match="virtual_batch_size"):
        fnn.create_norm("ghost", 8)
    assert set(NORM_NAMES) >= {"batchnorm", "ghost", "renorm", "frn", "evonorm_s0", "groupnorm",
                               "layernorm", "instancenorm", "frozen", "sync"}


@pytest.mark.parametrize("name, module, cls", [("frn", "frn", "FilterResponseNorm2d"),
                                               ("evonorm_s0", "evonorm", "EvoNorm2dS0")])
def test_create_norm_from_another_module(name, module, cls):
    """frn and evonorm_s0 live in their own modules, imported when asked for."""
    import importlib

    try:
        expected = getattr(importlib.import_module(f"fastbn.nn.{module}"), cls)
    except (ImportError, AttributeError):
        with pytest.raises(ImportError, match=f"fastbn.nn.{module}.{cls} is not available"):
            fnn.create_norm(name, 32)
    else:
        assert type(fnn.create_norm(name, 32)) is expected


# ---------------------------------------------------------------------------
# swap_norm, convert(norm=...), revert


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name, kwargs, cls", [
    ("ghost", dict(virtual_batch_size=2), fnn.GhostBatchNorm2d),
    ("renorm", dict(r_max=2.0), fnn.BatchRenorm2d),
    ("sync", {}, fnn.SyncBatchNorm),
    ("batchnorm", {}, fnn.BatchNorm2d)])
def test_swap_keeps_parameters_and_reverts(name, kwargs, cls):
    """BatchNorm-family swaps share the layers' parameters and buffers (an optimizer built
    before trains the new layers); revert puts BatchNorm back with what was trained."""
    model = small_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parameters = [list(m.parameters()) + list(m.buffers()) for m in batch_norms(model)]
    converted = fnn.convert(model, norm=name, backend="numpy", **kwargs)
    assert converted is model
    swapped = [m for m in model.modules() if isinstance(m, cls)]  # (convert fuses too)
    assert len(swapped) == RESNET_BATCH_NORMS
    assert all(m.backend == "numpy" for m in swapped)
    for module, before in zip(swapped, parameters):
        assert all(a is b for a, b in zip(list(module.parameters()) + list(module.buffers()),
                                          before))
    x = torch.randn(4, 3, 32, 32)
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    trained = copy.deepcopy(model.state_dict())
    assert fnn.revert(model) is model
    assert all(type(m) is nn.BatchNorm2d for m in batch_norms(model))
    torch.testing.assert_close(model.state_dict(), trained, rtol=0, atol=0)


def test_swap_to_frozen_and_back():
    model = small_resnet()
    fnn.convert(model, norm="frozen")
    frozen = [m for m in model.modules() if isinstance(m, fnn.FrozenBatchNorm2d)]
    assert len(frozen) == RESNET_BATCH_NORMS
    with torch.no_grad():
        model.stem[1].running_mean.add_(1.0)
    fnn.revert(model)
    restored = batch_norms(model)
    assert all(type(m) is nn.BatchNorm2d for m in restored) and len(restored) == RESNET_BATCH_NORMS
    assert isinstance(model.stem[1].weight, nn.Parameter)
    assert model.stem[1].weight.requires_grad
    assert model.stem[1].running_mean.min() > 0  # the frozen layer's statistics came back


@pytest.mark.parametrize("name, cls", [("groupnorm", fnn.GroupNorm), ("layernorm", fnn.GroupNorm),
                                       ("instancenorm", fnn.InstanceNorm2d)])
def test_swap_to_other_norms(name, cls):
    model = small_resnet().double()
    fnn.swap_norm(model, name)
    assert not batch_norms(model)
    layers = [m for m in model.modules() if type(m) is cls]
    assert len(layers) == RESNET_BATCH_NORMS
    assert all(m.weight.dtype == torch.float64 for m in layers)
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    fnn.revert(model)  # no running statistics to go back to: they stay (as torch's class)
    assert not batch_norms(model)


def test_failed_swap_changes_nothing():
    model = small_resnet()
    state = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="virtual_batch_size"):
        fnn.convert(model, norm="ghost")
    with pytest.raises(ValueError, match="unknown norm 'ghostnorm'"):
        fnn.convert(model, norm="ghostnorm")
    with pytest.raises(ValueError, match="keeps each layer's affine"):
        fnn.swap_norm(model, "renorm", affine=False)
    with pytest.raises(TypeError, match="arguments for a norm"):
        fnn.convert(model, virtual_batch_size=2)
    last = model.layers[1].downsample[1]
    last.track_running_stats = False
    last.running_mean = last.running_var = None
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        fnn.convert(model, norm="renorm")  # the last layer's replacement fails: none goes in
    assert [type(m) for m in model.modules()] == kinds
    state.pop("layers.1.downsample.1.running_mean")
    state.pop("layers.1.downsample.1.running_var")
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)


def test_swap_the_model_itself():
    layer = nn.BatchNorm1d(4)
    ghost = fnn.swap_norm(layer, "ghost", virtual_batch_size=3)
    assert type(ghost) is fnn.GhostBatchNorm1d and ghost.weight is layer.weight
    assert fnn.revert(ghost) is layer
