"""Ghost BatchNorm and Batch Renormalization against plain-torch versions written from the
papers (fastbn.benchmarks.small_batch: a loop of torch BatchNorm calls; Ioffe's formula,
differentiated by autograd), for every backend, float32 and float64, contiguous and
channels-last, N = 1 to 16; gradcheck; the BatchNorm special cases; bad input."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fastbn.nn as fnn
from conftest import tolerance
from fastbn.benchmarks.small_batch import plain_layer

DTYPES = [torch.float32, torch.float64]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
# N across 1..16: a single sample, a batch within one virtual batch, uneven last virtual
# batches (7 = 3 + 3 + 1, 16 = 5 x 3 + 1), an even split.
BATCH_SIZES = [1, 2, 7, 12, 16]
VIRTUAL_BATCH_SIZE = 3
CHANNELS = 5
# Train and eval calls in a row: eval reads what training left in the buffers.
MODES = ["train", "train", "eval", "train"]


def assert_close(actual, expected, dtype, factor=1.0):
    torch.testing.assert_close(actual, expected,
                               **tolerance(torch.empty(0, dtype=dtype).numpy().dtype, factor))


def randomise(module, generator, running=True):
    """Parameters and running statistics away from their defaults (and from the batch's, so
    that Batch Renorm's r and d are neither 1 nor 0)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.uniform_(-1.5, 1.5, generator=generator)
        if running:
            module.running_mean.uniform_(-2, 2, generator=generator)
            module.running_var.uniform_(0.2, 4, generator=generator)


def pair(layer, backend, dtype, **config):
    """(plain-torch layer, fastbn layer) with the same parameters and buffers; `config`:
    BatchNorm's arguments. Ghost: virtual batches of VIRTUAL_BATCH_SIZE; renorm: the
    default bounds."""
    if layer == "ghost_batch_norm":
        reference = plain_layer(layer, CHANNELS, virtual_batch_size=VIRTUAL_BATCH_SIZE,
                                dtype=dtype, **config)
        module = fnn.GhostBatchNorm2d(CHANNELS, VIRTUAL_BATCH_SIZE, dtype=dtype,
                                      backend=backend, **config)
    else:
        reference = plain_layer(layer, CHANNELS, dtype=dtype, **config)
        module = fnn.BatchRenorm2d(CHANNELS, reference.r_max, reference.d_max, dtype=dtype,
                                   backend=backend, **config)
    randomise(reference, torch.Generator().manual_seed(0))
    module.load_state_dict(reference.state_dict())
    return reference, module


def compare(reference, module, shape, memory_format, dtype, modes=MODES, seed=0):
    """Both layers on the same inputs and output gradients: outputs (and their layout),
    input and parameter gradients, and buffers after every call."""
    generator = torch.Generator().manual_seed(seed)
    for mode in modes:
        reference.train(mode == "train")
        module.train(mode == "train")
        x = (torch.randn(shape, dtype=dtype, generator=generator) * 3 + 1).contiguous(
            memory_format=memory_format)
        grad_y = torch.randn(shape, dtype=dtype, generator=generator)
        x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
        for parameter in list(reference.parameters()) + list(module.parameters()):
            parameter.grad = None
        y_ref, y_new = reference(x_ref), module(x_new)
        y_ref.backward(grad_y)
        y_new.backward(grad_y)
        assert_close(y_new, y_ref, dtype, factor=5)
        assert y_new.is_contiguous(memory_format=memory_format)
        assert_close(x_new.grad, x_ref.grad, dtype, factor=10)
        for name, parameter in reference.named_parameters():
            assert_close(getattr(module, name).grad, parameter.grad, dtype, factor=10)
        buffers = dict(module.named_buffers())
        for name, buffer in reference.named_buffers():
            assert_close(buffers[name], buffer, dtype)  # num_batches_tracked: exact


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("layer", ["ghost_batch_norm", "batch_renorm"])
def test_matches_the_papers_formula(backend, layer, batch, dtype, memory_format):
    reference, module = pair(layer, backend, dtype)
    compare(reference, module, (batch, CHANNELS, 4, 3), memory_format, dtype)


@pytest.mark.parametrize("config", [dict(momentum=None), dict(affine=False),
                                    dict(eps=1e-3, momentum=0.3)],
                         ids=["momentum_none", "affine_false", "eps_momentum"])
@pytest.mark.parametrize("layer", ["ghost_batch_norm", "batch_renorm"])
def test_configurations(backend, layer, config):
    reference, module = pair(layer, backend, torch.float64, **config)
    compare(reference, module, (8, CHANNELS, 3, 2), torch.contiguous_format, torch.float64)


@pytest.mark.parametrize("shape", [(7, CHANNELS), (7, CHANNELS, 6)], ids=["NC", "NCL"])
def test_ghost_1d(backend, shape):
    reference = nn.BatchNorm1d(CHANNELS, dtype=torch.float64)
    randomise(reference, torch.Generator().manual_seed(1))
    module = fnn.GhostBatchNorm1d(CHANNELS, 2, dtype=torch.float64, backend=backend)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if len(shape) == 2:  # the last virtual batch of (N, C) input has 1 value per channel
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            module(x)
        assert module.num_batches_tracked == 0 and torch.equal(module.running_mean,
                                                               reference.running_mean)
        x = x[:6]
    expected = torch.cat([reference(chunk) for chunk in x.split(2)])
    torch.testing.assert_close(module(x), expected)
    torch.testing.assert_close(module.running_var, reference.running_var)
    assert module.num_batches_tracked == reference.num_batches_tracked


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("virtual_batch_size", [6, 100])
def test_ghost_with_one_virtual_batch_is_batch_norm(backend, virtual_batch_size, memory_format):
    """k >= N: fastbn's BatchNorm2d exactly (the same kernels on the same values), and torch's
    within rounding, outputs, gradients and running statistics."""
    generator = torch.Generator().manual_seed(3)
    torch_bn = nn.BatchNorm2d(CHANNELS)
    randomise(torch_bn, generator)
    fastbn_bn = fnn.BatchNorm2d(CHANNELS, backend=backend)
    ghost = fnn.GhostBatchNorm2d(CHANNELS, virtual_batch_size, backend=backend)
    for module in (fastbn_bn, ghost):
        module.load_state_dict(torch_bn.state_dict())
    x = torch.randn(6, CHANNELS, 5, 5, generator=generator).contiguous(
        memory_format=memory_format)
    grad_y = torch.randn(6, CHANNELS, 5, 5, generator=generator)
    results = []
    for module in (torch_bn, fastbn_bn, ghost):
        x_in = x.clone().requires_grad_()
        y = module(x_in)
        y.backward(grad_y)
        results.append([y, x_in.grad, module.weight.grad, module.bias.grad,
                        module.running_mean, module.running_var, module.num_batches_tracked])
    for got, exact, approximate in zip(results[2], results[1], results[0]):
        assert torch.equal(got, exact)
        torch.testing.assert_close(got, approximate, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("memory_format", LAYOUTS, ids=["contiguous", "channels_last"])
def test_renorm_without_correction_is_batch_norm(backend, memory_format):
    """r_max = 1, d_max = 0: r = 1 and d = 0, so BatchNorm, gradients included, even with
    running statistics far from the batch's."""
    generator = torch.Generator().manual_seed(4)
    torch_bn = nn.BatchNorm2d(CHANNELS, dtype=torch.float64)
    randomise(torch_bn, generator)
    renorm = fnn.BatchRenorm2d(CHANNELS, r_max=1.0, d_max=0.0, dtype=torch.float64,
                               backend=backend)
    renorm.load_state_dict(torch_bn.state_dict())
    compare(torch_bn, renorm, (5, CHANNELS, 4, 4), memory_format, torch.float64)


def test_renorm_correction_is_clipped(backend):
    """With running statistics far from the batch's, r and d sit at their bounds: the output
    is weight * (x_hat * r_max + d_max) + bias, x_hat the batch-normalized input."""
    module = fnn.BatchRenorm2d(CHANNELS, r_max=2.0, d_max=0.5, dtype=torch.float64,
                               backend=backend)
    with torch.no_grad():
        module.running_mean.fill_(-10.0)
        module.running_var.fill_(0.01)
    x = torch.randn(4, CHANNELS, 3, 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5)) + 1
    x_hat = nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(module(x), x_hat * 2.0 + 0.5)


def test_renorm_bounds_are_a_schedule(backend):
    """r_max and d_max are read at each call: a warm-up at (1, 0) is BatchNorm, then the
    correction starts."""
    generator = torch.Generator().manual_seed(6)
    reference = plain_layer("batch_renorm", CHANNELS, r_max=1.0, d_max=0.0,
                            dtype=torch.float64)
    randomise(reference, generator)
    module = fnn.BatchRenorm2d(CHANNELS, 1.0, 0.0, dtype=torch.float64, backend=backend)
    module.load_state_dict(reference.state_dict())
    compare(reference, module, (4, CHANNELS, 3, 3), torch.contiguous_format, torch.float64,
            modes=["train"])
    reference.r_max = module.r_max = 1.5
    reference.d_max = module.d_max = 0.2
    compare(reference, module, (4, CHANNELS, 3, 3), torch.contiguous_format, torch.float64,
            modes=["train", "train"], seed=1)


def gradcheck_functions(backend):
    """Ghost: the functional form without running statistics. Renorm: running statistics so
    far from the batch's that r and d sit at their clipping bounds, where they are locally
    constant and the backward that treats them as constants is the true derivative;
    momentum 0 keeps the running statistics fixed across gradcheck's calls."""
    running_mean = torch.full((3,), -10.0, dtype=torch.float64)
    running_var = torch.full((3,), 0.01, dtype=torch.float64)
    return {
        "ghost": lambda x, w, b: fnn.ghost_batch_norm(x, 2, None, None, w, b, True,
                                                      backend=backend),
        "renorm": lambda x, w, b: fnn.batch_renorm(x, running_mean, running_var, w, b, True,
                                                   0.0, 1e-5, 2.0, 0.5, backend=backend),
    }


def gradcheck_inputs(shape=(5, 3, 2, 2)):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, generator=generator).add_(0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    return x, weight, bias


@pytest.mark.parametrize("layer", ["ghost", "renorm"])
def test_gradcheck(backend, layer):
    """Numerical against analytical gradients in float64 (fastbn's backward kernels)."""
    assert torch.autograd.gradcheck(gradcheck_functions(backend)[layer], gradcheck_inputs())


@pytest.mark.parametrize("layer", ["ghost", "renorm"])
def test_gradgradcheck(layer):
    """Double backward differentiates torch ops (the op's backward_differentiable), whatever
    the backend: one backend."""
    assert torch.autograd.gradgradcheck(gradcheck_functions("numpy")[layer],
                                        gradcheck_inputs((4, 3, 1, 2)), fast_mode=True)


@pytest.mark.parametrize("layer", ["ghost_batch_norm", "batch_renorm"])
def test_half_precision_runs_torch_ops(layer):
    """Tensors fastbn's kernels do not take (bfloat16) run the same layer in torch ops."""
    reference, module = pair(layer, None, torch.float32)
    reference.to(torch.bfloat16)
    module.to(torch.bfloat16)
    x = torch.randn(6, CHANNELS, 4, 4, generator=torch.Generator().manual_seed(8)).to(
        torch.bfloat16)
    torch.testing.assert_close(module(x), reference(x), rtol=0.05, atol=0.05)
    torch.testing.assert_close(module.running_var, reference.running_var, rtol=0.02, atol=0.02)


def test_state_dict_and_repr():
    ghost = fnn.GhostBatchNorm2d(4, 8)
    renorm = fnn.BatchRenorm1d(4, r_max=2.0, d_max=1.0)
    torch_bn = nn.BatchNorm2d(4)
    assert ghost.state_dict().keys() == torch_bn.state_dict().keys()
    assert renorm.state_dict().keys() == nn.BatchNorm1d(4).state_dict().keys()
    ghost.load_state_dict(torch_bn.state_dict())
    torch_bn.load_state_dict(ghost.state_dict())
    assert isinstance(ghost, nn.BatchNorm2d) and isinstance(renorm, nn.BatchNorm1d)
    assert repr(ghost).endswith("backend=None, virtual_batch_size=8)")
    assert repr(renorm).endswith("r_max=2.0, d_max=1.0)")
    copied = copy.deepcopy(renorm)
    assert (copied.r_max, copied.d_max) == (2.0, 1.0)
    ghost.virtual_batch_size = 2
    assert ghost.virtual_batch_size == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="virtual_batch_size must be >= 1, got 0"):
        fnn.GhostBatchNorm2d(4, 0)
    with pytest.raises(TypeError, match="virtual_batch_size must be an int"):
        fnn.GhostBatchNorm2d(4, 2.5)
    with pytest.raises(ValueError, match="virtual_batch_size must be >= 1"):
        fnn.ghost_batch_norm(torch.randn(4, 4), -1, training=True)
    ghost = fnn.GhostBatchNorm2d(4, 2)
    with pytest.raises(ValueError):
        ghost.virtual_batch_size = 0
    assert ghost.virtual_batch_size == 2
    with pytest.raises(ValueError, match=r"r_max must be >= 1 .* got 0.5"):
        fnn.BatchRenorm2d(4, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max must be >= 0 .* got -1.0"):
        fnn.BatchRenorm2d(4, d_max=-1)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        fnn.BatchRenorm2d(4, r_max=float("nan"))
    with pytest.raises(TypeError, match="r_max must be a real number"):
        fnn.BatchRenorm2d(4, r_max="3")
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        fnn.BatchRenorm2d(4, track_running_stats=False)
    renorm = fnn.BatchRenorm2d(4)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        renorm.r_max = 0.9
    assert renorm.r_max == 3.0
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        fnn.batch_renorm(torch.randn(4, 4), None, None, training=True)


@pytest.mark.parametrize("layer", ["ghost", "renorm"])
def test_failed_call_changes_no_state(backend, layer):
    """torch's errors and messages, and no running statistic or batch count changes."""
    module = (fnn.GhostBatchNorm2d(4, 2, backend=backend) if layer == "ghost"
              else fnn.BatchRenorm2d(4, backend=backend))
    randomise(module, torch.Generator().manual_seed(9))
    before = copy.deepcopy(module.state_dict())
    bad_calls = [
        (torch.randn(4, 4, 3), ValueError, "expected 4D input"),
        (torch.randn(4, 5, 3, 3), RuntimeError, "running_mean should contain 5 elements not 4"),
        (torch.randn(1, 4, 1, 1), ValueError, "Expected more than 1 value per channel"),
    ]
    for x, error, message in bad_calls:
        with pytest.raises(error, match=message):
            module(x)
    module.eps = 0.0
    with pytest.raises(ValueError, match="eps must be positive during training"):
        module(torch.randn(4, 4, 3, 3))
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_ghost_keeps_virtual_batch_statistics_apart():
    """A guard on the chunking itself: with virtual batches of 1 sample each normalizes to
    its own statistics, so each sample's output has mean 0 per channel."""
    module = fnn.GhostBatchNorm2d(3, 1, affine=False)
    x = torch.randn(4, 3, 5, 5) * torch.arange(1, 5).view(4, 1, 1, 1) + torch.arange(4).view(
        4, 1, 1, 1)
    y = module(x)
    np.testing.assert_allclose(y.mean(dim=(2, 3)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(dim=(2, 3), unbiased=False).numpy(), 1.0, atol=1e-3)


@pytest.mark.parametrize("layer", ["ghost_batch_norm", "batch_renorm"])
def test_other_strides(backend, layer):
    """An input laid out neither contiguous nor channels-last (a transpose), and the expanded
    output gradient of y.sum(): the same numbers as the plain layer."""
    reference, module = pair(layer, backend, torch.float64)
    x = torch.randn(7, CHANNELS, 4, 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(10)).transpose(2, 3)
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_new = reference(x_ref), module(x_new)
    (y_ref * y_ref.detach()).sum().backward()
    (y_new * y_new.detach()).sum().backward()
    torch.testing.assert_close(y_new, y_ref)
    torch.testing.assert_close(x_new.grad, x_ref.grad)
    x_ref.grad = x_new.grad = None
    reference(x_ref).sum().backward()
    module(x_new).sum().backward()
    torch.testing.assert_close(x_new.grad, x_ref.grad)
