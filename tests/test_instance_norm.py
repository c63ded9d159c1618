"""InstanceNorm: every backend against torch.nn.functional.instance_norm and its autograd."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastbn
from conftest import tolerance
from test_group_norm import in_layout, make_inputs

SHAPES = [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 4, 2), (3, 20, 6, 6)]
DTYPES = [np.float32, np.float64]


def running_stats(rng, C, dtype):
    return (rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2.0, C).astype(dtype))


def torch_instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum,
                        eps=1e-5, grad_out=None):
    """(y, grad_x, grad_weight, grad_bias, running_mean, running_var) from torch."""
    tx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    tw = None if weight is None else torch.tensor(weight, requires_grad=True)
    tb = None if bias is None else torch.tensor(bias, requires_grad=True)
    trm = None if running_mean is None else torch.tensor(running_mean)
    trv = None if running_var is None else torch.tensor(running_var)
    y = F.instance_norm(tx, trm, trv, tw, tb, use_input_stats, momentum, eps)
    grads = [None, None, None]
    if grad_out is not None:
        y.backward(torch.tensor(np.ascontiguousarray(grad_out)))
        grads = [None if t is None else t.grad.numpy() for t in (tx, tw, tb)]
    running = [None if t is None else t.numpy() for t in (trm, trv)]
    return [y.detach().numpy()] + grads + running


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_matches_torch(backend, rng, shape, dtype, affine, track, channels_last):
    x, weight, bias, grad_out = make_inputs(rng, shape, dtype, affine)
    x = in_layout(x, channels_last)
    running_mean, running_var = running_stats(rng, shape[1], dtype) if track else (None, None)
    expected = torch_instance_norm(x, weight, bias, running_mean, running_var, True, 0.3,
                                   grad_out=grad_out)

    y, mean, rstd = fastbn.instance_norm_forward(x, weight, bias, running_mean, running_var,
                                                 use_input_stats=True, momentum=0.3,
                                                 backend=backend)
    assert mean.shape == rstd.shape == shape[:2]
    assert y.strides == x.strides
    np.testing.assert_allclose(y, expected[0], **tolerance(dtype))
    if track:
        np.testing.assert_allclose(running_mean, expected[4], **tolerance(dtype))
        np.testing.assert_allclose(running_var, expected[5], **tolerance(dtype))

    grads = fastbn.instance_norm_backward(grad_out, x, mean, rstd, weight, True,
                                          output_mask=(True, affine, affine), backend=backend)
    for got, want in zip(grads, expected[1:4]):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, **tolerance(dtype, factor=20))


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_running_stats_mode_matches_torch(backend, rng, shape, dtype, channels_last):
    """use_input_stats=False normalizes with the running statistics and leaves them as they are;
    the gradients treat them as constants."""
    x, weight, bias, grad_out = make_inputs(rng, shape, dtype)
    x = in_layout(x, channels_last)
    running_mean, running_var = running_stats(rng, shape[1], dtype)
    before = running_mean.copy(), running_var.copy()
    expected = torch_instance_norm(x, weight, bias, running_mean, running_var, False, 0.3,
                                   grad_out=grad_out)

    y, mean, rstd = fastbn.instance_norm_forward(x, weight, bias, running_mean, running_var,
                                                 use_input_stats=False, momentum=0.3,
                                                 backend=backend)
    np.testing.assert_allclose(y, expected[0], **tolerance(dtype))
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])
    np.testing.assert_array_equal(mean, np.broadcast_to(running_mean, shape[:2]))

    grads = fastbn.instance_norm_backward(grad_out, x, mean, rstd, weight, False,
                                          backend=backend)
    for got, want in zip(grads, expected[1:4]):
        np.testing.assert_allclose(got, want, **tolerance(dtype, factor=20))


def test_unbatched_input_through_a_leading_axis(backend, rng):
    """(C, L) input, as torch's InstanceNorm1d takes it: the caller adds the batch axis."""
    x = rng.standard_normal((3, 7))
    module = torch.nn.InstanceNorm1d(3, track_running_stats=True, momentum=0.2).double()
    expected = module(torch.tensor(x)).detach().numpy()
    running_mean, running_var = np.zeros(3), np.ones(3)
    y = fastbn.instance_norm_forward(x[None], None, None, running_mean, running_var,
                                     momentum=0.2, backend=backend)[0][0]
    np.testing.assert_allclose(y, expected, **tolerance(np.float64))
    np.testing.assert_allclose(running_mean, module.running_mean.numpy(), **tolerance(np.float64))
    np.testing.assert_allclose(running_var, module.running_var.numpy(), **tolerance(np.float64))


def test_empty_batch_leaves_running_stats(backend):
    """An empty batch gives an empty output; the running statistics keep their values
    (PyTorch overwrites them with nan, the mean of no instances)."""
    x = np.zeros((0, 3, 4))
    running_mean, running_var = np.arange(3.0), np.ones(3)
    y, mean, rstd = fastbn.instance_norm_forward(x, None, None, running_mean, running_var,
                                                 backend=backend)
    assert y.shape == x.shape and mean.shape == rstd.shape == (0, 3)
    np.testing.assert_array_equal(running_mean, np.arange(3.0))
    np.testing.assert_array_equal(running_var, np.ones(3))
    grads = fastbn.instance_norm_backward(x, x, mean, rstd, None, backend=backend)
    assert grads[0].shape == x.shape
    np.testing.assert_array_equal(grads[1], np.zeros(3))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=np.ones((2, 3, 1))), ValueError, "Expected more than 1 spatial element"),
    (dict(x=np.ones((2, 3))), ValueError, "Expected more than 1 spatial element"),
    (dict(running_var=None), ValueError, "both be None or neither"),
    (dict(weight=np.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    (dict(running_mean=np.zeros(4)), ValueError, r"running_mean must have shape \(3,\)"),
    (dict(running_var=np.ones(3, np.float32)), TypeError, "does not mix float32 and float64"),
    (dict(running_mean=[0.0, 0.0, 0.0]), TypeError, "it is updated in place"),
    (dict(eps="small"), TypeError, "eps must be a real number"),
    (dict(momentum="fast"), TypeError, "momentum must be a real number"),
    (dict(x=np.ones((2, 3, 4), np.float16)), TypeError, "float32 or float64"),
    (dict(out=np.empty((2, 3))), ValueError, r"out must have shape \(2, 3, 4\)"),
])
def test_bad_input_changes_no_state(backend, kwargs, error, match):
    args = dict(x=np.ones((2, 3, 4)), weight=None, bias=None, running_mean=np.zeros(3),
                running_var=np.ones(3), momentum=0.1, eps=1e-5)
    args.update(kwargs)
    running = [a.copy() if isinstance(a, np.ndarray) else a
               for a in (args["running_mean"], args["running_var"])]
    with pytest.raises(error, match=match):
        fastbn.instance_norm_forward(args.pop("x"), **args, backend=backend)
    for before, after in zip(running, (args["running_mean"], args["running_var"])):
        if isinstance(before, np.ndarray):
            np.testing.assert_array_equal(after, before)


def test_read_only_running_stats(backend):
    running_mean, running_var = np.zeros(3), np.ones(3)
    running_mean.setflags(write=False)
    with pytest.raises(ValueError, match="running_mean is read-only"):
        fastbn.instance_norm_forward(np.ones((2, 3, 4)), None, None, running_mean, running_var,
                                     backend=backend)
    np.testing.assert_array_equal(running_var, np.ones(3))
    # Read only is fine when the statistics are only read.
    fastbn.instance_norm_forward(np.ones((2, 3, 4)), None, None, running_mean, running_var,
                                 use_input_stats=False, backend=backend)


def test_running_stats_needed_without_input_stats(backend):
    with pytest.raises(ValueError, match="running_mean and running_var are needed"):
        fastbn.instance_norm_forward(np.ones((2, 3, 4)), use_input_stats=False, backend=backend)


def test_backward_rejects_statistics_of_another_shape(backend):
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"mean must have shape \(2, 3\)"):
        fastbn.instance_norm_backward(x, x, np.zeros((2, 1)), np.ones((2, 3)), None,
                                      backend=backend)
