"""Fused BatchNorm + activation (`activation=` of batch_norm_forward / _backward), every
backend: against torch's BatchNorm followed by torch's activation, in float64, with the
gradients of autograd; NaN handling, thread-count independence and bad arguments.

Each backend decides an activation's kink (relu at 0, relu6 at 0 and 6, hardswish at -3
and 3) from its own rounding of the normalized value z, as torch does from its own: a z
within rounding of a kink may fall on either side in any implementation, float64 ones
included. The inputs are therefore made with no z within 1e-3 of a kink (`away_from_kinks`),
so that every implementation takes the same branch everywhere and the comparison is exact
to the dtype's tolerance.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

import fastbn
from conftest import BACKENDS, tolerance
from fastbn import _activations

TORCH_ACTIVATIONS = {
    "identity": lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "relu6": lambda z, slope: F.relu6(z),
    "silu": lambda z, slope: F.silu(z),
    "hardswish": lambda z, slope: F.hardswish(z),
    "leaky_relu": lambda z, slope: F.leaky_relu(z, slope),
}
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0), "leaky_relu": (0.0,)}
SLOPE = 0.2
EPS = 1e-5

def backends_for(activations):
    """Every (backend, activation) pair."""
    return [pytest.param(backend, activation)
            for backend in BACKENDS for activation in activations]


def layout_as(a, channels_last):
    if not channels_last:
        return np.ascontiguousarray(a)
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def normalized(x, weight, bias, training, running_mean, running_var):
    """z = BatchNorm(x) in float64."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = running_mean, running_var
    return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS) * weight.reshape(shape)
            + bias.reshape(shape))


def away_from_kinks(x, activation, weight, bias, training, running_mean, running_var,
                    margin=1e-3):
    """x with the values whose z lies within `margin` of a kink moved away from it."""
    x = x.copy()
    shape = (1, -1) + (1,) * (x.ndim - 2)
    for _ in range(5):
        z = normalized(x, weight, bias, training, running_mean, running_var)
        near = np.zeros(x.shape, bool)
        for kink in KINKS.get(activation, ()):
            near |= np.abs(z - kink) < margin
        if not near.any():
            return x
        # dz/dx is about weight / std: step x by a few margins' worth of z.
        step = 5 * margin * np.sqrt(x.var(axis=(0,) + tuple(range(2, x.ndim))) + EPS)
        step = step / np.maximum(np.abs(weight), 1e-3)
        x = x + near * step.reshape(shape)
    raise AssertionError("could not move the input away from the kinks")


def torch_reference(x, grad_y, weight, bias, running_mean, running_var, training, activation):
    """y, grad_x, grad_weight, grad_bias and the running statistics from torch, float64."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    rm = torch.tensor(running_mean, dtype=torch.float64)
    rv = torch.tensor(running_var, dtype=torch.float64)
    z = F.batch_norm(xt, rm, rv, wt, bt, training, 0.1, EPS)
    y = TORCH_ACTIVATIONS[activation](z, SLOPE)
    y.backward(torch.tensor(grad_y, dtype=torch.float64))
    return [t.detach().numpy() for t in (y, xt.grad, wt.grad, bt.grad, rm, rv)]


@pytest.mark.parametrize("backend, activation", backends_for(_activations.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 300, 2, 3), (1, 3, 70, 70), (6, 4)])
def test_matches_torch_batch_norm_then_activation(backend, activation, dtype, channels_last,
                                                  training, shape, rng):
    C = shape[1]
    weight = rng.standard_normal(C) + 0.5
    bias = rng.standard_normal(C)
    running_mean, running_var = rng.standard_normal(C), rng.random(C) + 0.5
    x = rng.standard_normal(shape) * 2 + 0.3
    x = away_from_kinks(x, activation, weight, bias, training, running_mean, running_var)
    x = x.astype(dtype).astype(np.float64)  # the values the dtype can hold, in both
    grad_y = rng.standard_normal(shape)
    expected = torch_reference(x, grad_y, weight, bias, running_mean, running_var, training,
                               activation)

    cast = lambda a: a.astype(dtype)
    rm, rv = cast(running_mean), cast(running_var)
    xa = layout_as(cast(x), channels_last)
    y, mean, invstd = fastbn.batch_norm_forward(
        xa, cast(weight), cast(bias), rm, rv, training, 0.1, EPS, activation=activation,
        negative_slope=SLOPE, backend=backend)
    grads = fastbn.batch_norm_backward(
        layout_as(cast(grad_y), channels_last), xa, cast(weight), mean, invstd, training,
        activation=activation, bias=cast(bias), negative_slope=SLOPE, backend=backend)
    tol = tolerance(dtype, 10 if activation == "silu" else 1)
    for name, got, want in zip(("y", "grad_x", "grad_weight", "grad_bias", "running_mean",
                                "running_var"), (y,) + grads + (rm, rv), expected):
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   err_msg=name)
    assert y.flags.c_contiguous != channels_last or len(shape) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_and_none_are_batch_norm(backend, rng):
    """activation=None and "identity" give BatchNorm's numbers to the bit."""
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w, b = np.full(8, 1.5, np.float32), np.full(8, 0.25, np.float32)
    results = []
    for act in (None, "identity"):
        y, m, i = fastbn.batch_norm_forward(x, w, b, training=True, activation=act,
                                            backend=backend)
        results.append((y,) + fastbn.batch_norm_backward(g, x, w, m, i, True, activation=act,
                                                         bias=b, backend=backend))
    for plain, fused in zip(*results):
        np.testing.assert_array_equal(plain, fused)


@pytest.mark.parametrize("backend, activation",
                         backends_for(["relu", "relu6", "hardswish", "leaky_relu", "silu"]))
def test_nan_and_inf_as_torch(backend, activation, rng):
    """A channel holding NaN (or inf) gives what torch's BatchNorm + activation give."""
    x = rng.standard_normal((3, 4, 5, 5))
    x[1, 1, 2, 2] = np.nan
    x[0, 2, 0, 0] = np.inf
    g = rng.standard_normal(x.shape)
    w, b = np.ones(4), np.zeros(4)
    rm, rv = np.zeros(4), np.ones(4)
    expected = torch_reference(x, g, w, b, rm, rv, True, activation)
    y, m, i = fastbn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), True, 0.1, EPS,
                                        activation=activation, negative_slope=SLOPE,
                                        backend=backend)
    grads = fastbn.batch_norm_backward(g, x, w, m, i, True, activation=activation, bias=b,
                                       negative_slope=SLOPE, backend=backend)
    for got, want in zip((y,) + grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("backend, activation", [
    case for case in backends_for(["silu"]) if case.values[0] != "numpy"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_same_bits_for_one_and_two_threads(backend, activation, channels_last, rng):
    x = layout_as(rng.standard_normal((4, 64, 20, 20)).astype(np.float32), channels_last)
    g = layout_as(rng.standard_normal(x.shape).astype(np.float32), channels_last)
    w, b = np.full(64, 0.7, np.float32), np.full(64, 0.1, np.float32)
    results = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            with threadpool_limits(threads, user_api="openmp"):
                y, m, i = fastbn.batch_norm_forward(x, w, b, training=True,
                                                    activation=activation, backend=backend)
                results.append((y,) + fastbn.batch_norm_backward(
                    g, x, w, m, i, True, activation=activation, bias=b, backend=backend))
        finally:
            fastbn.set_num_threads(None)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("activation, error, message", [
    ("gelu", ValueError, "unknown activation 'gelu'; expected None or one of identity, relu"),
    (1, ValueError, "unknown activation 1"),
])
def test_unknown_activation_is_rejected(activation, error, message, rng):
    x = rng.standard_normal((2, 3, 4))
    running_mean = np.zeros(3)
    with pytest.raises(error, match=message):
        fastbn.batch_norm_forward(x, running_mean=running_mean, running_var=np.ones(3),
                                  training=True, activation=activation)
    assert not running_mean.any(), "a failed call changed a running statistic"
    with pytest.raises(error, match=message):
        fastbn.batch_norm_backward(x, x, None, np.zeros(3), np.ones(3), True,
                                   activation=activation)


def test_bad_slope_and_bias_are_rejected(rng):
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(TypeError, match="negative_slope must be a real number, got 'a'"):
        fastbn.batch_norm_forward(x, training=True, activation="leaky_relu",
                                  negative_slope="a")
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        fastbn.batch_norm_backward(x, x, None, np.zeros(3), np.ones(3), True,
                                   activation="relu", bias=np.zeros(4))
