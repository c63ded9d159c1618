"""fastbn.nn's GroupNorm, LayerNorm, RMSNorm and InstanceNorm*d against torch.nn: the same
numbers, gradients and buffer updates, for every backend (test_nn.py covers BatchNorm and
the machinery all the ops share)."""
import copy

import pytest
import torch
from torch import nn

import fastbn
import fastbn.nn as fnn
from test_nn import MODES, compare_steps, randomise

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}

# name: (fastbn class, torch class, constructor args, input shape, channels-last input)
MODULES = {
    "group_NC": (fnn.GroupNorm, nn.GroupNorm, (2, 6), (4, 6), False),
    "group_1d": (fnn.GroupNorm, nn.GroupNorm, (3, 6), (3, 6, 5), False),
    "group_2d_channels_last": (fnn.GroupNorm, nn.GroupNorm, (2, 6), (3, 6, 4, 5), True),
    "group_3d": (fnn.GroupNorm, nn.GroupNorm, (6, 6), (2, 6, 3, 2, 3), False),
    "layer": (fnn.LayerNorm, nn.LayerNorm, ((4, 5),), (3, 2, 4, 5), False),
    "layer_int": (fnn.LayerNorm, nn.LayerNorm, (7,), (5, 7), False),
    "rms": (fnn.RMSNorm, nn.RMSNorm, (7,), (3, 4, 7), False),
    "rms_2dims": (fnn.RMSNorm, nn.RMSNorm, ((3, 7),), (4, 3, 7), False),
    "instance_1d": (fnn.InstanceNorm1d, nn.InstanceNorm1d, (5,), (3, 5, 7), False),
    "instance_1d_unbatched": (fnn.InstanceNorm1d, nn.InstanceNorm1d, (5,), (5, 7), False),
    "instance_2d_channels_last": (fnn.InstanceNorm2d, nn.InstanceNorm2d, (5,), (3, 5, 4, 3),
                                  True),
    "instance_3d_unbatched": (fnn.InstanceNorm3d, nn.InstanceNorm3d, (5,), (5, 2, 3, 2), False),
}

CONFIGS = {  # module kind: configurations, as constructor keywords
    "group": {"default": {}, "affine_false": dict(affine=False), "eps": dict(eps=1e-2)},
    "layer": {"default": {}, "affine_false": dict(elementwise_affine=False),
              "bias_false": dict(bias=False), "eps": dict(eps=1e-2)},
    "rms": {"default": {},  # eps=None
            "eps": dict(eps=1e-3), "affine_false": dict(elementwise_affine=False)},
    "instance": {"default": {}, "affine": dict(affine=True),
                 "running_stats": dict(affine=True, track_running_stats=True, momentum=0.3),
                 "momentum_none": dict(track_running_stats=True, momentum=None),
                 "eps": dict(eps=1e-2)},
}

CASES = [(name, config) for name in MODULES for config in CONFIGS[name.split("_")[0]]]


def module_pair(name, config, backend, dtype=torch.float32):
    """(torch module, fastbn module) with the same random state (shared via the state dict)."""
    fastbn_class, torch_class, args, _, _ = MODULES[name]
    kwargs = CONFIGS[name.split("_")[0]][config]
    reference = torch_class(*args, dtype=dtype, **kwargs)
    randomise(reference, torch.Generator().manual_seed(0))
    module = fastbn_class(*args, dtype=dtype, backend=backend, **kwargs)
    module.load_state_dict(reference.state_dict())
    return reference, module


@pytest.mark.parametrize("name, config", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_module_matches_torch(backend, name, config):
    reference, module = module_pair(name, config, backend)
    shape, channels_last = MODULES[name][3:]
    # torch's InstanceNorm returns contiguous output for channels-last input; fastbn's keeps
    # the input's layout (no copy).
    compare_steps(reference, module, shape,
                  CHANNELS_LAST[len(shape)] if channels_last else torch.contiguous_format, MODES,
                  same_strides=not (channels_last and name.startswith("instance")))


def functional_case(op, backend):
    """(fastbn function taking (x, weight, bias), input shape, parameter shape) of one op."""
    running = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    cases = {
        "group_norm": (lambda x, w, b, f: f.group_norm(x, 3, w, b), (2, 3, 4), (3,)),
        "layer_norm": (lambda x, w, b, f: f.layer_norm(x, (2, 3), w, b), (4, 2, 3), (2, 3)),
        "rms_norm": (lambda x, w, b, f: f.rms_norm(x, (3,), w) + b, (4, 2, 3), (3,)),
        "instance_norm": (lambda x, w, b, f: f.instance_norm(x, None, None, w, b), (2, 3, 4),
                          (3,)),
        "instance_norm_running": (lambda x, w, b, f: f.instance_norm(
            x, *running, w, b, use_input_stats=False), (2, 3, 4), (3,)),
    }
    call, shape, parameter_shape = cases[op]
    return (lambda x, w, b: call(x, w, b, _Backend(backend))), shape, parameter_shape


class _Backend:
    """fastbn.nn.functional with `backend` named in every call."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        function = getattr(fnn.functional, name)
        return lambda *args, **kwargs: function(*args, **kwargs, backend=self.backend)


FUNCTIONAL_OPS = ["group_norm", "layer_norm", "rms_norm", "instance_norm",
                  "instance_norm_running"]


@pytest.mark.parametrize("op", FUNCTIONAL_OPS)
def test_double_backward(backend, op):
    """Gradients of gradients (create_graph=True) are right: gradgradcheck, float64 (the
    first gradients are compared with torch's in test_module_matches_torch)."""
    fastbn_call, shape, parameter_shape = functional_case(op, backend)
    generator = torch.Generator().manual_seed(5)
    inputs = (torch.randn(shape, dtype=torch.float64, generator=generator),
              torch.rand(parameter_shape, dtype=torch.float64, generator=generator) + 0.5,
              torch.randn(parameter_shape, dtype=torch.float64, generator=generator))
    inputs = tuple(tensor.requires_grad_() for tensor in inputs)
    assert torch.autograd.gradgradcheck(fastbn_call, inputs)


@pytest.mark.parametrize("name, dtype, backend", [
    (name, torch.bfloat16, "numpy") for name in ("group_2d_channels_last", "layer", "rms",
                                                 "instance_1d")] + [
    # Small inputs without a named backend, for the ops where torch's op is faster there
    # (fastbn.nn.functional.torch_is_faster; RMSNorm and InstanceNorm run fastbn's).
    ("group_2d_channels_last", torch.float32, None), ("layer", torch.float32, None)])
def test_half_precision_and_default_backend_give_torchs_numbers(name, dtype, backend):
    """16-bit dtypes run torch's op, and so do small inputs without a named backend."""
    reference, module = module_pair(name, "default", backend, dtype)
    x = torch.randn(MODULES[name][3], generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=0)


def test_failed_call_changes_no_state(backend):
    module = fnn.InstanceNorm2d(5, affine=True, track_running_stats=True, backend=backend)
    module(torch.randn(2, 5, 3, 3))  # some state to keep
    before = copy.deepcopy(module.state_dict())
    module.eps = "small"  # torch's instance_norm raises TypeError too
    with pytest.raises(TypeError, match="eps"):
        module(torch.randn(2, 5, 3, 3, requires_grad=True))
    torch.testing.assert_close(module.state_dict(), before, rtol=0, atol=0)
    module.eps = 1e-5
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        module(torch.randn(2, 5, 1, 1))
    with pytest.raises(ValueError, match="to match num_features"):
        module(torch.randn(2, 4, 3, 3))
    torch.testing.assert_close(module.state_dict(), before, rtol=0, atol=0)


def test_modules_state_dicts_convert_and_revert(backend):
    """Every new module: torch's state dict keys, a repr naming the backend, and convert /
    revert switching the classes of the same layer objects."""
    model = nn.Sequential(*[torch_class(*args) for _, torch_class, args, _, _ in MODULES.values()],
                          nn.InstanceNorm3d(2, track_running_stats=True))
    layers = list(model)
    reference_state = copy.deepcopy(model.state_dict())
    assert fnn.convert(model, backend=backend) is model
    for layer, (fastbn_class, torch_class, args, _, _) in zip(layers, MODULES.values()):
        assert type(layer) is fastbn_class and isinstance(layer, torch_class)
        assert f"backend={backend!r}" in repr(layer)
        built = fastbn_class(*args, backend=backend)
        assert built.state_dict().keys() == torch_class(*args).state_dict().keys()
    assert list(model) == layers
    torch.testing.assert_close(model.state_dict(), reference_state, rtol=0, atol=0)
    fnn.revert(model)
    assert [type(layer) for layer in model] == (
        [torch_class for _, torch_class, _, _, _ in MODULES.values()] + [nn.InstanceNorm3d])
    assert "backend" not in repr(model)


@pytest.mark.parametrize("name", ["group_1d", "layer", "rms", "instance_1d_unbatched"])
def test_module_matches_torch_float64(backend, name):
    config = "running_stats" if name.startswith("instance") else "default"
    reference, module = module_pair(name, config, backend, torch.float64)
    compare_steps(reference, module, MODULES[name][3], torch.contiguous_format, MODES,
                  torch.float64)


NORM_ARGUMENTS = {"group_norm": lambda x, weight: (2, weight),
                  "layer_norm": lambda x, weight: (x.shape[-1:], weight),
                  "rms_norm": lambda x, weight: (x.shape[-1:], weight),
                  "instance_norm": lambda x, weight: (None, None, weight)}


def runs_fastbn(op, x, requires_grad):
    """Whether fnn.functional.`op` with backend=None gave fastbn's bits on x (else torch's)."""
    generator = torch.Generator().manual_seed(3)
    channels = x.shape[-1] if op in ("layer_norm", "rms_norm") else x.shape[1]
    weight = torch.rand(channels, generator=generator).requires_grad_(requires_grad)
    args = NORM_ARGUMENTS[op](x, weight)
    function = getattr(fnn.functional, op)
    y = function(x, *args)
    fastbn_y = function(x, *args, backend=fastbn.get_backend())
    torch_y = getattr(torch.nn.functional, op)(x, *args)
    torch.testing.assert_close(y, torch_y)
    assert not torch.equal(fastbn_y, torch_y), "pick an input where the two differ in bits"
    if torch.equal(y, fastbn_y):
        return True
    assert torch.equal(y, torch_y), "backend=None gave neither fastbn's nor torch's bits"
    return False


@pytest.mark.parametrize("op", ["group_norm", "layer_norm", "rms_norm", "instance_norm"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_functional_without_a_backend_runs_fastbn_from_the_ops_measured_size(op, requires_grad):
    """backend=None: from torch_is_faster's size for the op, fastbn's default backend runs
    (its bits); below it, torch's op (torch's bits)."""
    generator = torch.Generator().manual_seed(7)
    threshold = fnn.functional.MIN_VALUES[op][not requires_grad]
    large = torch.randn(2, 4, max(threshold, 256) // 8 + 3, generator=generator) * 3 + 1
    assert runs_fastbn(op, large, requires_grad)
    if threshold:
        small = torch.randn(2, 4, threshold // 16, generator=generator) * 3 + 1
        assert not runs_fastbn(op, small, requires_grad)


@pytest.mark.parametrize("batch, channels, spatial, expected",
                         [(16, 64, 28, True), (1, 32, 28, True), (64, 64, 14, False)])
def test_channels_last_group_norm_runs_fastbn_through_autograd_on_large_maps(
        batch, channels, spatial, expected):
    """Channels-last memory runs torch's op, except GroupNorm through autograd from 28x28,
    at any size (also below the contiguous crossover: torch's channels-last kernel is slow)."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, channels, spatial, spatial, generator=generator).to(
        memory_format=torch.channels_last) * 3 + 1
    assert runs_fastbn("group_norm", x, requires_grad=True) is expected
    assert not runs_fastbn("group_norm", x, requires_grad=False)
