"""GroupNorm: every backend against PyTorch, the NumPy reference and finite differences."""
import numpy as np
import pytest
import torch

import fastbn
from conftest import tolerance

# (shape, num_groups): 2-D input, 1-3 spatial dims, and shapes that take each
# work split of the compiled kernels: blocks of whole groups (N * G >= 16), chunks of
# whole rows, rows cut into chunks (S > 4096); channels-last, blocks of whole samples'
# channels (S x 64 channels up to 32768 values) and tiles (beyond), of more than one
# block of 256 channels in the last shape.
SHAPES = [
    ((3, 6), 3),
    ((3, 6, 5), 2),
    ((2, 8, 4, 5), 4),
    ((2, 4, 3, 2, 3), 2),
    ((4, 32, 5, 5), 8),
    ((1, 16, 9, 9), 2),
    ((1, 4, 5000), 1),
    ((2, 300, 7), 3),
    ((1, 16, 48, 48), 4),
    ((1, 264, 520), 264),
]
DTYPES = [np.float32, np.float64]


def channels_last_copy(a):
    """a with the same values, its channels the fastest axis in memory."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def in_layout(a, channels_last):
    return channels_last_copy(a) if channels_last else np.ascontiguousarray(a)


def to_torch(a):
    # torch's group-norm backward assumes grad_out and x share one memory format; give it C order.
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def torch_forward(x, num_groups, weight, bias, eps=1e-5):
    N, C = x.shape[:2]
    return [t.numpy() for t in torch.native_group_norm(
        to_torch(x), to_torch(weight), to_torch(bias), N, C, x.size // max(N * C, 1),
        num_groups, eps)]


def torch_backward(grad_out, x, mean, rstd, weight, num_groups, mask=(True, True, True)):
    N, C = x.shape[:2]
    if weight is None:  # ATen computes no weight gradient without a weight; fastbn's is for 1s
        weight = np.ones(C, x.dtype)
    results = torch.ops.aten.native_group_norm_backward(
        to_torch(grad_out), to_torch(x), to_torch(mean), to_torch(rstd), to_torch(weight),
        N, C, x.size // max(N * C, 1), num_groups, list(mask))
    return [None if t is None else t.numpy() for t in results]


def make_inputs(rng, shape, dtype, affine=True, offset=3.0):
    C = shape[1]
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(dtype)
    weight = rng.standard_normal(C).astype(dtype) if affine else None
    bias = rng.standard_normal(C).astype(dtype) if affine else None
    grad_out = rng.standard_normal(shape).astype(dtype)
    return x, weight, bias, grad_out


@pytest.mark.parametrize("shape, num_groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_backward_match_torch(backend, rng, shape, num_groups, dtype, affine,
                                          channels_last):
    x, weight, bias, grad_out = make_inputs(rng, shape, dtype, affine)
    x = in_layout(x, channels_last)
    grad_out = in_layout(grad_out, channels_last)

    y, mean, rstd = fastbn.group_norm_forward(x, num_groups, weight, bias, backend=backend)
    expected = torch_forward(x, num_groups, weight, bias)
    for got, want in zip((y, mean, rstd), expected):
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, **tolerance(dtype))
    assert mean.shape == (shape[0], num_groups)
    # The output keeps the input's memory layout.
    assert y.strides == x.strides

    grads = fastbn.group_norm_backward(grad_out, x, mean, rstd, weight, num_groups,
                                       backend=backend)
    expected = torch_backward(grad_out, x, mean, rstd, weight, num_groups)
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        # Parameter gradients sum N * S products: allow for the rounding of that many terms.
        np.testing.assert_allclose(got, want, **tolerance(dtype, factor=20))
    assert grads[0].strides == x.strides


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True), (False, False, True),
                                  (False, False, False)])
def test_backward_output_mask(backend, rng, mask):
    x, weight, bias, grad_out = make_inputs(rng, (2, 6, 7), np.float64)
    y, mean, rstd = fastbn.group_norm_forward(x, 3, weight, bias, backend=backend)
    grads = fastbn.group_norm_backward(grad_out, x, mean, rstd, weight, 3, output_mask=mask,
                                       backend=backend)
    full = torch_backward(grad_out, x, mean, rstd, weight, 3)
    for wanted, got, want in zip(mask, grads, full):
        if wanted:
            np.testing.assert_allclose(got, want, **tolerance(np.float64))
        else:
            assert got is None


@pytest.mark.parametrize("dtype, offset", [(np.float32, 1e3), (np.float64, 1e7)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape, num_groups", [((4, 32, 5, 5), 8), ((1, 16, 9, 9), 2)])
def test_large_mean_matches_reference(fast_backend, rng, dtype, offset, channels_last, shape,
                                      num_groups):
    """The pivot shift keeps one-pass statistics accurate when the mean dwarfs the spread."""
    x, weight, bias, grad_out = make_inputs(rng, shape, dtype, offset=offset)
    x = in_layout(x, channels_last)
    expected = fastbn.group_norm_forward(x, num_groups, weight, bias, backend="numpy")
    got = fastbn.group_norm_forward(x, num_groups, weight, bias, backend=fast_backend)
    # y is x - mean rounded in x's type at |x| ~ offset: one unit there, in units of the spread.
    y_tol = dict(rtol=0, atol=float(np.spacing(dtype(offset))) * 4)
    np.testing.assert_allclose(got[0], expected[0], **y_tol)
    np.testing.assert_allclose(got[1], expected[1], **tolerance(dtype))
    np.testing.assert_allclose(got[2], expected[2], **tolerance(dtype))
    mean, rstd = expected[1], expected[2]
    expected_grads = fastbn.group_norm_backward(grad_out, x, mean, rstd, weight, num_groups,
                                                backend="numpy")
    got_grads = fastbn.group_norm_backward(grad_out, x, mean, rstd, weight, num_groups,
                                           backend=fast_backend)
    for got_grad, want in zip(got_grads, expected_grads):
        np.testing.assert_allclose(got_grad, want, **tolerance(dtype, factor=50))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_match_finite_differences(backend, rng, channels_last):
    shape, num_groups, step = (2, 4, 3, 2), 2, 1e-6
    x, weight, bias, probe = make_inputs(rng, shape, np.float64)
    x = in_layout(x, channels_last)

    def loss(x, weight, bias):
        y = fastbn.group_norm_forward(x, num_groups, weight, bias, backend=backend)[0]
        return float((y * probe).sum())

    _, mean, rstd = fastbn.group_norm_forward(x, num_groups, weight, bias, backend=backend)
    grads = fastbn.group_norm_backward(probe, x, mean, rstd, weight, num_groups, backend=backend)
    for index, (array, grad) in enumerate(zip((x, weight, bias), grads)):
        for flat in rng.choice(array.size, size=min(array.size, 6), replace=False):
            position = np.unravel_index(flat, array.shape)
            args = [x, weight, bias]
            plus, minus = array.copy(), array.copy()
            plus[position] += step
            minus[position] -= step
            args[index] = plus
            loss_plus = loss(*args)
            args[index] = minus
            numeric = (loss_plus - loss(*args)) / (2 * step)
            np.testing.assert_allclose(grad[position], numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, num_groups, channels_last", [
    ((2, 32, 32, 32), 8, False),   # whole groups
    ((1, 8, 64, 64), 2, False),    # chunks of whole rows
    ((1, 2, 128, 128), 1, False),  # rows cut into chunks
    ((2, 16, 32, 32), 4, True),    # channels-last sample blocks
    ((1, 16, 48, 48), 4, True),    # channels-last tiles
    ((300, 64), 8, False),         # 2-D input: sample blocks of many samples
    ((4, 16, 32, 32), 16, False),  # instance norm's case: one channel per group
])
def test_same_bits_for_any_thread_count(fast_backend, rng, shape, num_groups, channels_last):
    x, weight, bias, grad_out = make_inputs(rng, shape, np.float32)
    x = in_layout(x, channels_last)
    results = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            if fastbn.get_num_threads() != threads:
                pytest.skip("this machine runs fewer than 2 threads")
            y, mean, rstd = fastbn.group_norm_forward(x, num_groups, weight, bias,
                                                      backend=fast_backend)
            grads = fastbn.group_norm_backward(grad_out, x, mean, rstd, weight, num_groups,
                                               backend=fast_backend)
        finally:
            fastbn.set_num_threads(None)
        results.append((y, mean, rstd) + tuple(grads))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("shape", [(0, 6, 4), (0, 6), (2, 6, 0)])
def test_empty_input_as_torch(backend, shape):
    x = np.zeros(shape, np.float32)
    weight = np.ones(6, np.float32)
    y, mean, rstd = fastbn.group_norm_forward(x, 3, weight, backend=backend)
    expected = torch_forward(x, 3, weight, None)
    for got, want in zip((y, mean, rstd), expected):
        np.testing.assert_array_equal(got, want)
    grad_x, grad_weight, grad_bias = fastbn.group_norm_backward(x, x, mean, rstd, weight, 3,
                                                                backend=backend)
    assert grad_x.shape == shape
    # Sums over no values: 0 (ATen gives nan for grad_weight when S = 0, from 0 * rstd = 0 * nan).
    np.testing.assert_array_equal(grad_weight, np.zeros(6))
    np.testing.assert_array_equal(grad_bias, np.zeros(6))


def test_constant_group_as_torch(backend):
    """Zero variance: y = bias with eps > 0; with eps = 0 rstd is inf and y nan, as in ATen."""
    x = np.full((2, 4, 3), 5.0)
    bias = np.arange(4.0)
    y, _, rstd = fastbn.group_norm_forward(x, 2, None, bias, backend=backend)
    np.testing.assert_array_equal(y, np.broadcast_to(bias[None, :, None], x.shape))
    y, mean, rstd = fastbn.group_norm_forward(x, 2, None, bias, eps=0.0, backend=backend)
    expected = torch_forward(x, 2, None, bias, eps=0.0)
    for got, want in zip((y, mean, rstd), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("out_channels_last", [False, True])
def test_out_argument(backend, rng, out_channels_last):
    x, weight, bias, grad_out = make_inputs(rng, (2, 4, 3, 5), np.float64)
    expected = fastbn.group_norm_forward(x, 2, weight, bias, backend="numpy")[0]
    out = in_layout(np.zeros_like(x), out_channels_last)
    y = fastbn.group_norm_forward(x, 2, weight, bias, out=out, backend=backend)[0]
    assert y is out
    np.testing.assert_allclose(out, expected, **tolerance(np.float64))
    # In place: out may be x itself.
    x_copy = x.copy()
    fastbn.group_norm_forward(x_copy, 2, weight, bias, out=x_copy, backend=backend)
    np.testing.assert_allclose(x_copy, expected, **tolerance(np.float64))


def test_strided_and_read_only_input(backend, rng):
    x, weight, bias, _ = make_inputs(rng, (2, 8, 6, 10), np.float32)
    strided = x[:, ::2, :, ::2]
    expected = torch_forward(strided, 2, weight[::2], bias[::2])[0]
    y = fastbn.group_norm_forward(strided, 2, weight[::2], bias[::2], backend=backend)[0]
    np.testing.assert_allclose(y, expected, **tolerance(np.float32))
    read_only = np.ascontiguousarray(strided)
    read_only.setflags(write=False)
    y = fastbn.group_norm_forward(read_only, 2, weight[::2], bias[::2], backend=backend)[0]
    np.testing.assert_allclose(y, expected, **tolerance(np.float32))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_groups=4), ValueError, "divisible by num_groups"),
    (dict(num_groups=0), ValueError, "num_groups must be a positive integer"),
    (dict(num_groups=-2), ValueError, "num_groups must be a positive integer"),
    (dict(num_groups=1.5), TypeError, "num_groups must be an integer"),
    (dict(weight=np.ones(5)), ValueError, r"weight must have shape \(6,\)"),
    (dict(bias=np.ones((6, 1))), ValueError, r"bias must have shape \(6,\)"),
    (dict(weight=np.ones(6, np.float32)), TypeError, "does not mix float32 and float64"),
    (dict(x=np.ones((2, 6, 3), np.int64)), TypeError, "float32 or float64"),
    (dict(x=np.ones(6)), ValueError, "expected 2D to 5D input"),
    (dict(x=np.ones((1, 6, 1, 1, 1, 2))), ValueError, "expected 2D to 5D input"),
    (dict(eps="small"), TypeError, "eps must be a real number"),
])
def test_forward_rejects_bad_input(backend, kwargs, error, match):
    args = dict(x=np.ones((2, 6, 3)), num_groups=3, weight=None, bias=None, eps=1e-5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastbn.group_norm_forward(args.pop("x"), args.pop("num_groups"), **args, backend=backend)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mean=np.zeros((2, 2))), ValueError, r"mean must have shape \(2, 3\)"),
    (dict(rstd=None), ValueError, "rstd is needed"),
    (dict(rstd=np.ones((2, 3), np.float32)), TypeError, "does not mix float32 and float64"),
    (dict(grad_out=np.ones((2, 6, 4))), ValueError, "grad_out must have the input's shape"),
    (dict(num_groups=4), ValueError, "divisible by num_groups"),
    (dict(output_mask=(True, True)), ValueError, "output_mask must have 3 entries"),
])
def test_backward_rejects_bad_input(backend, kwargs, error, match):
    args = dict(grad_out=np.ones((2, 6, 3)), x=np.ones((2, 6, 3)), mean=np.zeros((2, 3)),
                rstd=np.ones((2, 3)), weight=None, num_groups=3)
    args.update(kwargs)
    mask = args.pop("output_mask", (True, True, True))
    with pytest.raises(error, match=match):
        fastbn.group_norm_backward(*args.values(), output_mask=mask, backend=backend)
