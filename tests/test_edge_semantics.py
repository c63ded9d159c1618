"""torch's edge cases through fastbn.nn.functional, for every backend: every eps torch takes
(negative, zero, nan, inf) gives torch's numbers, exactly the eps torch rejects are
rejected, and an input of no channels raises where torch raises, before any state changes.
(PyTorch's own OpInfo samples run in test_opinfo.py.)"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastbn
import fastbn.nn as fnn

EPS_VALUES = [-0.5, -1e-3, 0.0, float("nan"), float("inf")]


def inputs(shape=(3, 4, 5), seed=0):
    """Groups / rows with variances spread around 0.5, so that an eps of -0.5 gives NaN for
    some and numbers for others."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[:2] + (1,) * (len(shape) - 2), generator=generator) * 1.4
    return torch.randn(shape, generator=generator) * scale


def weight_bias(channels, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return ((torch.rand(channels, generator=generator) + 0.5).to(dtype),
            torch.randn(channels, generator=generator).to(dtype))


def running_stats(dtype):
    """A running mean and variances spread around 0.5."""
    return (torch.zeros(4, dtype=dtype),
            torch.rand(4, generator=torch.Generator().manual_seed(2)).to(dtype))


OPS = {  # name: (fastbn's call, torch's call), each (x, eps, backend=...) -> output
    "group_norm": (
        lambda x, eps, backend: fnn.functional.group_norm(x, 2, *weight_bias(4, x.dtype), eps,
                                                          backend=backend),
        lambda x, eps: F.group_norm(x, 2, *weight_bias(4, x.dtype), eps)),
    "layer_norm": (
        lambda x, eps, backend: fnn.functional.layer_norm(x, (5,), *weight_bias(5, x.dtype), eps,
                                                          backend=backend),
        lambda x, eps: F.layer_norm(x, (5,), *weight_bias(5, x.dtype), eps)),
    "rms_norm": (
        lambda x, eps, backend: fnn.functional.rms_norm(x, (5,), weight_bias(5, x.dtype)[0], eps,
                                                        backend=backend),
        lambda x, eps: F.rms_norm(x, (5,), weight_bias(5, x.dtype)[0], eps)),
    "instance_norm": (
        lambda x, eps, backend: fnn.functional.instance_norm(
            x, None, None, *weight_bias(4, x.dtype), eps=eps, backend=backend),
        lambda x, eps: F.instance_norm(x, None, None, *weight_bias(4, x.dtype), eps=eps)),
    "instance_norm-running_stats": (
        lambda x, eps, backend: fnn.functional.instance_norm(
            x, *running_stats(x.dtype),
            *weight_bias(4, x.dtype), use_input_stats=False, eps=eps, backend=backend),
        lambda x, eps: F.instance_norm(
            x, *running_stats(x.dtype),
            *weight_bias(4, x.dtype), use_input_stats=False, eps=eps)),
    "batch_norm-eval": (
        lambda x, eps, backend: fnn.functional.batch_norm(
            x, *running_stats(x.dtype),
            *weight_bias(4, x.dtype), False, eps=eps, backend=backend),
        lambda x, eps: F.batch_norm(
            x, *running_stats(x.dtype),
            *weight_bias(4, x.dtype), False, eps=eps)),
    "batch_norm-train": (
        lambda x, eps, backend: fnn.functional.batch_norm(
            x, None, None, *weight_bias(4, x.dtype), True, eps=eps, backend=backend),
        lambda x, eps: F.batch_norm(x, None, None, *weight_bias(4, x.dtype), True, eps=eps)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", EPS_VALUES)
@pytest.mark.parametrize("op", OPS)
def test_every_eps_torch_takes_gives_torchs_numbers(backend, op, eps, dtype):
    """torch takes any eps for these ops but BatchNorm's (eps > 0 in training, >= 0 in
    eval mode, nan and inf included), giving NaN where var + eps < 0; fastbn the same,
    forward and backward."""
    fastbn_call, torch_call = OPS[op]
    x = inputs().to(dtype)
    try:
        expected = torch_call(x, eps)
    except ValueError as error:  # where torch rejects, fastbn raises the same
        with pytest.raises(ValueError, match=str(error)):
            fastbn_call(x, eps, backend)
        return
    if eps == -0.5:  # the inputs give NaN for some groups or rows, numbers for others
        assert torch.isnan(expected).any() and not torch.isnan(expected).all()
    got = fastbn_call(x, eps, backend)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, expected, equal_nan=True, **tolerance)
    x_grad, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_y = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    fastbn_call(x_grad, eps, backend).backward(grad_y)
    torch_call(x_torch, eps).backward(grad_y)
    torch.testing.assert_close(x_grad.grad, x_torch.grad, equal_nan=True,
                               **(dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else {}))


def test_the_numpy_functions_take_every_eps(backend):
    """The NumPy-level functions follow ATen's ops, which take any eps: NaN where
    var + eps < 0, rstd 0 for an infinite eps."""
    x = inputs((2, 4, 6)).numpy().astype(np.float64)
    var = x.reshape(2, 2, -1).var(axis=2)
    with np.errstate(invalid="ignore"):
        expected = 1 / np.sqrt(var - 0.5)
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    np.testing.assert_allclose(fastbn.group_norm_forward(x, 2, eps=-0.5, backend=backend)[2],
                               expected, rtol=1e-12)
    np.testing.assert_array_equal(
        fastbn.group_norm_forward(x, 2, eps=np.inf, backend=backend)[2], 0.0)
    for statistic in (fastbn.batch_norm_forward(x, eps=-1.0, training=True, backend=backend)[2],
                      fastbn.layer_norm_forward(x, 6, eps=-1.0, backend=backend)[2],
                      fastbn.rms_norm_forward(x, 6, eps=-10.0, backend=backend)[1],
                      fastbn.instance_norm_forward(x, eps=-1.0, backend=backend)[2]):
        assert np.isnan(statistic).any()
    with pytest.raises(TypeError, match="eps must be a real number, got 'small'"):
        fastbn.layer_norm_forward(x, 6, eps="small", backend=backend)


# ---------------------------------------------------------------------------
# An input of no channels: torch's batch_norm and instance_norm raise IndexError when
# there is a weight or bias (nothing to index), and run without them.

NO_CHANNEL_CALLS = {
    "batch_norm-train": lambda x, w, b, backend: fnn.functional.batch_norm(
        x, None, None, w, b, True, backend=backend),
    "batch_norm-eval": lambda x, w, b, backend: fnn.functional.batch_norm(
        x, torch.zeros(0), torch.ones(0), w, b, False, backend=backend),
    "instance_norm": lambda x, w, b, backend: fnn.functional.instance_norm(
        x, None, None, w, b, backend=backend),
    "instance_norm-running_stats": lambda x, w, b, backend: fnn.functional.instance_norm(
        x, torch.zeros(0), torch.ones(0), w, b, use_input_stats=False, backend=backend),
}
TORCH_NO_CHANNEL_CALLS = {
    "batch_norm-train": lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
    "batch_norm-eval": lambda x, w, b: F.batch_norm(x, torch.zeros(0), torch.ones(0), w, b,
                                                    False),
    "instance_norm": lambda x, w, b: F.instance_norm(x, None, None, w, b),
    "instance_norm-running_stats": lambda x, w, b: F.instance_norm(
        x, torch.zeros(0), torch.ones(0), w, b, use_input_stats=False),
}


@pytest.mark.parametrize("shape", [(2, 0, 3), (0, 0, 3), (2, 0, 2, 2)])
@pytest.mark.parametrize("parameters", ["weight", "bias", "both", "none"])
@pytest.mark.parametrize("op", NO_CHANNEL_CALLS)
def test_no_channels_raise_where_torch_raises(backend, op, parameters, shape):
    x = torch.randn(shape)
    weight = torch.ones(0) if parameters in ("weight", "both") else None
    bias = torch.zeros(0) if parameters in ("bias", "both") else None
    try:
        expected = TORCH_NO_CHANNEL_CALLS[op](x, weight, bias)
    except IndexError:
        with pytest.raises(IndexError, match="the input has no channels"):
            NO_CHANNEL_CALLS[op](x, weight, bias, backend)
        return
    assert parameters == "none"
    assert NO_CHANNEL_CALLS[op](x, weight, bias, backend).shape == expected.shape


@pytest.mark.parametrize("module", ["BatchNorm1d", "BatchNorm2d", "InstanceNorm1d"])
def test_no_channel_modules_raise_and_count_nothing(backend, module):
    """BatchNorm1d(0) raises IndexError as torch's does, but counts no batch (torch counts
    it before it raises); without affine parameters both run and count."""
    shape = (2, 0, 3, 3) if module == "BatchNorm2d" else (2, 0, 3)
    fastbn_module = getattr(fnn, module)(0, affine=True, track_running_stats=True,
                                         backend=backend)
    torch_module = getattr(torch.nn, module)(0, affine=True, track_running_stats=True)
    with pytest.raises(IndexError):
        torch_module(torch.randn(shape))
    with pytest.raises(IndexError, match="the input has no channels"):
        fastbn_module(torch.randn(shape))
    assert int(fastbn_module.num_batches_tracked) == 0
    # Without weight and bias torch runs, and its BatchNorm counts the batch: so does fastbn.
    plain = getattr(fnn, module)(0, affine=False, track_running_stats=True, backend=backend)
    torch_plain = getattr(torch.nn, module)(0, affine=False, track_running_stats=True)
    assert plain(torch.randn(shape)).shape == torch_plain(torch.randn(shape)).shape == shape
    assert int(plain.num_batches_tracked) == int(torch_plain.num_batches_tracked)
