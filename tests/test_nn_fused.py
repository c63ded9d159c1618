"""Fused BatchNorm + activation in fastbn.nn: BatchNormAct2d against torch's BatchNorm2d
followed by torch's activation module, convert()'s fusion rules and revert(), converted
reference networks against torch in float64, and the atomic update of the running
statistics with num_batches_tracked.

Comparisons are against float64 torch, or float32 against float64 with float32's
tolerance: never two float32 results with each other (see test_nn.py's ResNet test).
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fastbn
import fastbn.nn as fnn
from conftest import BACKENDS
from fastbn.benchmarks.models import MobileNetV2, ResNet
from fastbn.nn.convert import FusedActivation

ACTIVATION_MODULES = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "silu": lambda: nn.SiLU(),
    "hardswish": lambda: nn.Hardswish(),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "identity": lambda: nn.Identity(),
}


def fused_pair(act, backend, dtype=torch.float64, channels=6, **kwargs):
    """(torch BatchNorm2d + activation module, fastbn BatchNormAct2d) with the same state."""
    generator = torch.Generator().manual_seed(0)
    norm = nn.BatchNorm2d(channels, dtype=dtype, **kwargs)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.uniform_(-1.5, 1.5, generator=generator)
    fused = fnn.BatchNormAct2d(channels, dtype=dtype, act=act, negative_slope=0.2,
                               backend=backend, **kwargs)
    fused.load_state_dict(norm.state_dict())
    return nn.Sequential(norm, ACTIVATION_MODULES[act]()), fused


@pytest.mark.parametrize("act", list(ACTIVATION_MODULES))
@pytest.mark.parametrize("config", [{}, dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False)],
                         ids=["default", "momentum_none", "affine_false", "untracked"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_batch_norm_act_matches_torch(backend, act, config, memory_format):
    """Train and eval calls in a row: outputs, input and parameter gradients, buffers."""
    reference, fused = fused_pair(act, backend, **config)
    generator = torch.Generator().manual_seed(1)
    for mode in ["train", "train", "eval", "train", "eval"]:
        reference.train(mode == "train")
        fused.train(mode == "train")
        x = (torch.randn(3, 6, 5, 7, generator=generator, dtype=torch.float64) * 2 + 0.5
             ).contiguous(memory_format=memory_format)
        grad_y = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        results = []
        for model in (reference, fused):
            model.zero_grad()
            x_in = x.clone().requires_grad_()
            y = model(x_in)
            y.backward(grad_y)
            results.append([y, x_in.grad] + [p.grad for p in model.parameters()])
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fused.state_dict(), reference[0].state_dict(), rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("act", list(ACTIVATION_MODULES))
@pytest.mark.parametrize("slope", [0.2, -0.3])
def test_batch_norm_act_on_torchs_route_matches_torch(act, slope):
    """With no backend named, small inputs run torch's batch norm and then torch's
    activation in place on its fresh output (fastbn.nn.functional._torch_batch_norm):
    the same outputs, gradients and buffers as the unfused pair, the input untouched,
    in training, in eval with and without autograd; a negative leaky_relu slope, which
    torch's in-place backward refuses, goes out of place."""
    reference, fused = fused_pair(act, None)
    if act == "leaky_relu":
        reference[1] = nn.LeakyReLU(slope)
    fused.negative_slope = slope
    generator = torch.Generator().manual_seed(3)
    for mode, grad in [("train", True), ("eval", True), ("eval", False)]:
        reference.train(mode == "train")
        fused.train(mode == "train")
        x = torch.randn(3, 6, 5, 7, generator=generator, dtype=torch.float64)
        assert fnn.functional.torch_is_faster("batch_norm_activation", x, mode == "eval"
                                              and not grad)
        grad_y = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        results = []
        for model in (reference, fused):
            model.zero_grad()
            x_in = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = model(x_in)
            if grad:
                y.backward(grad_y)
            assert torch.equal(x_in.detach(), x)
            results.append([y] + ([x_in.grad] + [p.grad for p in model.parameters()]
                                  if grad else []))
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fused.state_dict(), reference[0].state_dict(), rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("act", ["relu6", "silu", "hardswish", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_act_gradcheck(backend, act, training):
    """Gradients and gradients of gradients (create_graph) against finite differences.
    Values near a kink of the activation make finite differences wrong for any
    implementation: the input is shifted so that no normalized value is near one."""
    _, fused = fused_pair(act, backend, channels=3)
    fused.train(training)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        z = nn.functional.batch_norm(x, fused.running_mean, fused.running_var, fused.weight,
                                     fused.bias, training)
        kinks = torch.tensor([0.0, 6.0, -3.0, 3.0], dtype=torch.float64)
        near = (z.unsqueeze(-1) - kinks).abs().amin(-1) < 0.05
    x = (x + near * 0.2).requires_grad_()
    running_mean, running_var = fused.running_mean.clone(), fused.running_var.clone()

    def function(x, weight, bias):
        # The functional form: the module's parameters are not gradcheck's inputs.
        return fnn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
                                         activation=act, negative_slope=0.2, backend=backend)

    weight = fused.weight.detach().clone().requires_grad_()
    bias = fused.bias.detach().clone().requires_grad_()
    torch.autograd.gradcheck(function, (x, weight, bias))
    torch.autograd.gradgradcheck(function, (x, weight, bias))


def test_batch_norm_act_state_dict_and_repr(backend):
    reference, fused = fused_pair("relu6", backend)
    assert list(fused.state_dict()) == list(reference[0].state_dict())
    assert isinstance(fused, nn.BatchNorm2d) and isinstance(fused, fnn.BatchNorm2d)
    assert "act='relu6'" in repr(fused)
    plain = nn.BatchNorm2d(6, dtype=torch.float64)
    plain.load_state_dict(fused.state_dict())  # strict, both ways
    copied = pickle.loads(pickle.dumps(fused))
    assert (copied.activation, copied.backend) == ("relu6", backend)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        fnn.BatchNormAct2d(6, act="gelu")


def test_bad_input_through_fused_layer_changes_nothing(backend):
    """The unfused layer's errors, and no running statistic or counter changed."""
    _, fused = fused_pair("relu", backend)
    state = copy.deepcopy(fused.state_dict())
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        fused(torch.randn(2, 6, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="running_mean should contain 5 elements not 6"):
        fused(torch.randn(2, 5, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fused(torch.randn(1, 6, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(fused.state_dict(), state, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# convert(): which pairs are fused, and revert()

def block(act=None):
    act = act or nn.ReLU6(inplace=True)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), act)


def test_convert_fuses_sequential_pairs_and_revert_restores_them():
    torch.manual_seed(0)
    model = nn.Sequential(block(), block(nn.LeakyReLU(0.3)), nn.Conv2d(6, 3, 1))
    model[1][0] = nn.Conv2d(6, 6, 3, padding=1, bias=False)
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    expected = original(x)
    fnn.convert(model, "numpy")
    assert type(model[0][1]) is fnn.BatchNormAct2d and model[0][1].activation == "relu6"
    assert model[1][1].activation == "leaky_relu" and model[1][1].negative_slope == 0.3
    assert isinstance(model[0][2], FusedActivation)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # The state dict is unchanged, and loads both ways.
    assert list(model.state_dict()) == list(original.state_dict())
    original.load_state_dict(model.state_dict())
    fnn.revert(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert model[1][2].negative_slope == 0.3
    assert "_fused_activation" not in model[0][1].__dict__
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_convert_fuse_false_and_what_is_never_fused():
    shared = nn.ReLU()
    hooked = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    hooked[0].register_forward_hook(lambda module, args, output: None)

    class OwnForward(nn.Sequential):
        def forward(self, x):
            return self[1](x) + self[0](x)

    model = nn.Sequential(
        nn.Sequential(nn.BatchNorm2d(3), shared), nn.Sequential(nn.Conv2d(3, 3, 1), shared),
        hooked, OwnForward(nn.BatchNorm2d(3), nn.ReLU()),
        nn.Sequential(nn.BatchNorm2d(3), nn.GELU()), nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))
    fnn.convert(model)
    assert not any(isinstance(m, fnn.BatchNormAct2d) for m in model.modules())
    unfused = fnn.convert(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), fuse=False)
    assert type(unfused[0]) is fnn.BatchNorm2d and type(unfused[1]) is nn.ReLU


def test_converted_model_copies_and_reverts():
    model = fnn.convert(MobileNetV2(num_classes=10))
    copied = copy.deepcopy(model)
    fnn.revert(copied)
    assert not any(isinstance(m, (fnn.BatchNorm2d, FusedActivation)) for m in copied.modules())
    assert sum(type(m) is nn.ReLU6 for m in copied.modules()) == 35
    assert sum(isinstance(m, fnn.BatchNormAct2d) for m in model.modules()) == 35
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert sum(isinstance(m, FusedActivation) for m in loaded.modules()) == 35


# ---------------------------------------------------------------------------
# The reference networks, converted, against torch in float64

def test_converted_resnet18_trains_as_torch(backend):
    """ResNet-18, 5 SGD steps on 16 px images, float64: losses within a relative 1e-9 of
    torch's. The weights are compared more loosely: the last stage's BatchNorms see
    4 values per channel (N = 4, 1 x 1 maps), which amplifies the last bits of either
    implementation's sums about a thousandfold, and momentum carries that forward."""
    torch.manual_seed(0)
    reference = ResNet(num_classes=10).double()
    model = fnn.convert(copy.deepcopy(reference), backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
                  for m in (reference, model)]
    generator = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(4, 3, 16, 16, generator=generator, dtype=torch.float64)
        target = torch.randint(0, 10, (4,), generator=generator)
        losses = []
        for net, optimizer in zip((reference, model), optimizers):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-9)
    # atol: weights are of order 0.1; after 5 steps the numba backend's last-bit
    # differences had grown to 1.3e-9 on one of 294,912 values (a weight of 6e-5).
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=1e-6,
                               atol=1e-8)


def test_converted_mobilenet_v2_gradients_as_torch(backend):
    """MobileNetV2 (BatchNorm + ReLU6 fused), 96 px, N = 4, float64: every parameter's
    gradient after one step within a relative 1e-9 of torch's (dropout off: its random
    mask would differ between the two models).

    Relative to the larger of the parameter's own gradient and 1e-3 of the model's
    largest: the biases of the BatchNorms without an activation have a gradient of
    exactly zero (the next block's BatchNorm removes any per-channel shift), which both
    implementations compute as rounding noise of 1e-16 to 1e-18."""
    torch.manual_seed(0)
    reference = MobileNetV2(num_classes=10, dropout=0.0).double()
    model = fnn.convert(copy.deepcopy(reference), backend)
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    target = torch.arange(4)
    for net in (reference, model):
        nn.functional.cross_entropy(net(x), target).backward()
    largest = max(q.grad.abs().max().item() for q in reference.parameters())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        scale = max(q.grad.abs().max().item(), 1e-3 * largest)
        assert (p.grad - q.grad).abs().max().item() / scale < 1e-9, name


# ---------------------------------------------------------------------------
# Running statistics and num_batches_tracked: updated together, or not at all

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_interrupt_after_the_kernel_keeps_statistics_and_counter_together(
        backend, momentum, monkeypatch):
    """A KeyboardInterrupt delivered right after the kernel returns (where Ctrl-C during a
    long kernel lands) leaves the running statistics and num_batches_tracked consistent:
    both updated, as if the call had finished. (The numpy backend is plain Python: it
    makes no such promise, docs/robustness.md.)"""
    module = fnn.BatchNorm2d(4, momentum=momentum, backend=backend)
    kernels = fastbn._backends.load_backend(backend)
    real_kernel = kernels.batch_norm_forward
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    module(x)  # one ordinary batch first

    def interrupted(*args, **kwargs):
        real_kernel(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "batch_norm_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        module(x)
    monkeypatch.undo()
    reference = nn.BatchNorm2d(4, momentum=momentum)
    reference(x)
    reference(x)
    assert module.num_batches_tracked.item() == 2
    torch.testing.assert_close(module.running_mean, reference.running_mean)
    torch.testing.assert_close(module.running_var, reference.running_var)
