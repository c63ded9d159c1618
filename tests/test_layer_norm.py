"""LayerNorm: every backend against PyTorch, the float64 reference and finite differences."""
import numpy as np
import pytest
import torch

import fastbn
from conftest import tolerance

# (input shape, normalized_shape): 1 to 3 normalized dims, few and many rows, and few
# long rows (rows < 64 with D > 4096), which the compiled kernels split within rows.
SHAPES = [
    ((5, 7), 7),
    ((3, 4, 10), (10,)),
    ((2, 3, 6, 5), (6, 5)),
    ((2, 3, 4, 5), [3, 4, 5]),
    ((300, 96), (96,)),
    ((3, 9000), (9000,)),
]
DTYPES = [np.float32, np.float64]


def as_tuple(normalized_shape):
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def make_inputs(rng, shape, normalized_shape, dtype, affine=True, mean=0.5):
    normalized_shape = as_tuple(normalized_shape)
    x = (rng.standard_normal(shape) * 2.0 + mean).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(normalized_shape).astype(dtype) if affine else None
    b = rng.standard_normal(normalized_shape).astype(dtype) if affine else None
    return x, dy, w, b


def torch_or_none(a):
    return None if a is None else torch.from_numpy(a)


def assert_close(got, want, dtype, factor=1.0):
    want = np.asarray(want)
    # Sums over many values: compare relative to the largest value of the result.
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    tol = tolerance(dtype, factor)
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, normalized_shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_and_backward_match_torch(backend, rng, shape, normalized_shape, dtype, affine):
    x, dy, w, b = make_inputs(rng, shape, normalized_shape, dtype, affine)
    y, mean, rstd = fastbn.layer_norm_forward(x, normalized_shape, w, b, 1e-5, backend=backend)
    ty, tmean, trstd = torch.native_layer_norm(torch.from_numpy(x), as_tuple(normalized_shape),
                                               torch_or_none(w), torch_or_none(b), 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    assert mean.shape == tuple(tmean.shape) and rstd.shape == tuple(trstd.shape)
    assert mean.dtype == rstd.dtype == x.dtype
    assert_close(y, ty, dtype, factor=5)
    assert_close(mean, tmean, dtype)
    assert_close(rstd, trstd, dtype)

    grads = fastbn.layer_norm_backward(dy, x, normalized_shape, mean, rstd, w, b,
                                       backend=backend)
    tgrads = torch.ops.aten.native_layer_norm_backward(
        torch.from_numpy(dy), torch.from_numpy(x), as_tuple(normalized_shape), tmean, trstd,
        torch_or_none(w), torch_or_none(b), [True, affine, affine])
    for got, want in zip(grads, tgrads):
        if want is None:
            assert got is None
        else:
            assert got.shape == tuple(want.shape) and got.dtype == x.dtype
            assert_close(got, want, dtype, factor=10)


@pytest.mark.parametrize("dtype, data_mean, tol", [(np.float32, 1e4, 2e-5),
                                                   (np.float64, 1e8, 1e-9)])
def test_accurate_on_data_with_a_large_mean(fast_backend, rng, dtype, data_mean, tol):
    """The one-pass statistics keep their digits where sum(x**2) - sum(x)**2 / n would not."""
    x = (data_mean + rng.standard_normal((40, 700))).astype(dtype)
    # Exact reference: x minus its first value is exact in float64.
    shifted = x.astype(np.float64) - x[:, :1]
    centred = shifted - shifted.mean(axis=1, keepdims=True)
    rstd64 = 1.0 / np.sqrt((centred ** 2).mean(axis=1, keepdims=True) + 1e-5)
    y, mean, rstd = fastbn.layer_norm_forward(x, 700, backend=fast_backend)
    np.testing.assert_allclose(rstd, rstd64, rtol=tol, atol=0)
    np.testing.assert_allclose(y, centred * rstd64, rtol=0, atol=tol * 10)


@pytest.mark.parametrize("shape, normalized_shape", [((3, 5), 5), ((2, 3, 4), (3, 4))])
def test_gradients_match_finite_differences(backend, rng, shape, normalized_shape):
    x, dy, w, b = make_inputs(rng, shape, normalized_shape, np.float64)

    def loss(x, w, b):
        return float((fastbn.layer_norm_forward(x, normalized_shape, w, b,
                                                backend="numpy")[0] * dy).sum())

    _, mean, rstd = fastbn.layer_norm_forward(x, normalized_shape, w, b, backend=backend)
    grads = fastbn.layer_norm_backward(dy, x, normalized_shape, mean, rstd, w, b,
                                       backend=backend)
    step = 1e-6
    for which, grad in enumerate(grads):
        args = [x, w, b]
        numeric = np.empty_like(args[which])
        for index in np.ndindex(args[which].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][index] += step
            minus[which][index] -= step
            numeric[index] = (loss(*plus) - loss(*minus)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


def two_threads_available():
    fastbn.set_num_threads(2)
    try:
        return fastbn.get_num_threads() == 2
    finally:
        fastbn.set_num_threads(None)


@pytest.mark.skipif(not two_threads_available(), reason="needs 2 threads")
@pytest.mark.parametrize("shape", [(256, 300), (3, 20000)])  # whole rows; split within rows
def test_same_bits_for_any_thread_count(fast_backend, rng, shape):
    x, dy, w, b = make_inputs(rng, shape, shape[-1], np.float32)
    results = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            y, mean, rstd = fastbn.layer_norm_forward(x, shape[-1], w, b, backend=fast_backend)
            grads = fastbn.layer_norm_backward(dy, x, shape[-1], mean, rstd, w, b,
                                               backend=fast_backend)
        finally:
            fastbn.set_num_threads(None)
        results.append((y, mean, rstd) + grads)
    for one_thread, two_threads in zip(*results):
        np.testing.assert_array_equal(one_thread, two_threads)


def test_rows_with_nan_or_inf_give_what_torch_gives(backend):
    x = np.tile(np.linspace(-1.0, 2.0, 6, dtype=np.float32), (5, 1))
    x[0, 2] = np.nan
    x[1, 3] = np.inf
    x[2, 0] = -np.inf
    x[3, 1], x[3, 4] = np.inf, -np.inf
    y, mean, rstd = fastbn.layer_norm_forward(x, 6, backend=backend)
    ty, tmean, trstd = torch.native_layer_norm(torch.from_numpy(x), (6,), None, None, 1e-5)
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)  # nan where torch has nan
    np.testing.assert_allclose(rstd, trstd, rtol=1e-5)
    # A row holding inf has a non-finite mean (torch says nan, a plain sum inf).
    np.testing.assert_array_equal(np.isfinite(mean), np.isfinite(tmean.numpy()))
    assert np.isfinite(y[4]).all()


def test_constant_rows_with_zero_eps_give_what_torch_gives(backend):
    x = np.ones((3, 4), np.float64)
    y, mean, rstd = fastbn.layer_norm_forward(x, 4, eps=0.0, backend=backend)
    ty, tmean, trstd = torch.native_layer_norm(torch.from_numpy(x), (4,), None, None, 0.0)
    np.testing.assert_array_equal(y, ty)  # nan: 0 * inf
    np.testing.assert_array_equal(rstd, trstd)
    np.testing.assert_array_equal(mean, tmean)


@pytest.mark.parametrize("shape, normalized_shape", [((0, 6), 6), ((3, 0), 0), ((2, 0, 4), (4,))])
def test_empty_input(backend, shape, normalized_shape):
    x = np.zeros(shape, np.float32)
    w = np.ones(as_tuple(normalized_shape), np.float32)
    y, mean, rstd = fastbn.layer_norm_forward(x, normalized_shape, w, w, backend=backend)
    ty, tmean, trstd = torch.native_layer_norm(torch.from_numpy(x), as_tuple(normalized_shape),
                                               torch.from_numpy(w), torch.from_numpy(w), 1e-5)
    assert y.shape == x.shape
    np.testing.assert_array_equal(mean, tmean)
    np.testing.assert_array_equal(rstd, trstd)
    grad_x, grad_w, grad_b = fastbn.layer_norm_backward(x, x, normalized_shape, mean, rstd, w, w,
                                                        backend=backend)
    assert grad_x.shape == x.shape
    np.testing.assert_array_equal(grad_w, np.zeros_like(w))
    np.testing.assert_array_equal(grad_b, np.zeros_like(w))


def test_strided_input_and_output(backend, rng):
    x, dy, w, b = make_inputs(rng, (12, 10), 12, np.float64)
    x_t, dy_t = x.T, dy.T  # (10, 12), not C-contiguous
    y, mean, rstd = fastbn.layer_norm_forward(np.ascontiguousarray(x_t), 12, w, b,
                                              backend=backend)
    out = np.zeros((12, 10)).T
    result = fastbn.layer_norm_forward(x_t, 12, w, b, out=out, backend=backend)
    assert result[0] is out
    np.testing.assert_array_equal(out, y)
    grad_out = np.zeros((12, 10)).T
    grads = fastbn.layer_norm_backward(dy_t, x_t, 12, mean, rstd, w, b, out=grad_out,
                                       backend=backend)
    expected = fastbn.layer_norm_backward(np.ascontiguousarray(dy_t), np.ascontiguousarray(x_t),
                                          12, mean, rstd, w, b, backend=backend)
    assert grads[0] is grad_out
    for got, want in zip(grads, expected):
        np.testing.assert_array_equal(got, want)


def test_in_place(backend, rng):
    x, dy, w, b = make_inputs(rng, (6, 40), 40, np.float32)
    y, mean, rstd = fastbn.layer_norm_forward(x, 40, w, b, backend=backend)
    grads = fastbn.layer_norm_backward(dy, x, 40, mean, rstd, w, b, backend=backend)
    x_copy = x.copy()
    assert fastbn.layer_norm_forward(x_copy, 40, w, b, out=x_copy, backend=backend)[0] is x_copy
    np.testing.assert_array_equal(x_copy, y)
    grad_x = fastbn.layer_norm_backward(dy, x, 40, mean, rstd, w, b, out=dy,
                                        backend=backend)[0]
    assert grad_x is dy
    np.testing.assert_array_equal(grad_x, grads[0])


def test_read_only_inputs(backend, rng):
    arrays = make_inputs(rng, (6, 40), 40, np.float64)
    for a in arrays:
        a.flags.writeable = False
    x, dy, w, b = arrays
    y, mean, rstd = fastbn.layer_norm_forward(x, 40, w, b, backend=backend)
    mean.flags.writeable = rstd.flags.writeable = False
    grads = fastbn.layer_norm_backward(dy, x, 40, mean, rstd, w, b, backend=backend)
    expected = fastbn.layer_norm_backward(dy.copy(), x.copy(), 40, mean.copy(), rstd.copy(),
                                          w.copy(), b.copy(), backend="numpy")
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 6), (2, 9000)])
def test_output_mask_and_missing_parameters(backend, rng, shape):
    D = shape[-1]
    x, dy, w, b = make_inputs(rng, shape, D, np.float64)
    _, mean, rstd = fastbn.layer_norm_forward(x, D, w, b, backend=backend)
    full = fastbn.layer_norm_backward(dy, x, D, mean, rstd, w, b, backend=backend)
    only_x = fastbn.layer_norm_backward(dy, x, D, mean, rstd, w, b, backend=backend,
                                        output_mask=(True, False, False))
    assert only_x[1] is None and only_x[2] is None
    np.testing.assert_array_equal(only_x[0], full[0])
    for mask in [(False, True, True), (False, True, False), (True, False, True)]:
        grads = fastbn.layer_norm_backward(dy, x, D, mean, rstd, w, b, backend=backend,
                                           output_mask=mask)
        for wanted, got, want in zip(mask, grads, full):
            if wanted:
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
            else:
                assert got is None
    # The gradient of a parameter that was not given is None.
    grad_x, grad_w, grad_b = fastbn.layer_norm_backward(dy, x, D, mean, rstd, w, None,
                                                        backend=backend)
    assert grad_w is not None and grad_b is None


BAD_FORWARD_ARGUMENTS = [
    (dict(normalized_shape=(5, 7)), ValueError,
     r"Given normalized_shape=\[5, 7\], expected input with shape \[\*, 5, 7\], but got input "
     r"of size\[3, 4, 5, 6\]"),
    (dict(normalized_shape=(1, 2, 3, 4, 5, 6)), ValueError, r"Given normalized_shape="),
    (dict(normalized_shape=()), ValueError, "at least 1-dimensional"),
    (dict(normalized_shape=(-6,)), ValueError, "negative"),
    (dict(normalized_shape="6"), TypeError, "normalized_shape must be an int"),
    (dict(weight=np.ones(5, np.float32)), ValueError,
     r"Expected weight to be of same shape as normalized_shape, but got weight of shape \[5\] "
     r"and normalized_shape = \[6\]"),
    (dict(bias=np.ones((6, 1), np.float32)), ValueError, "Expected bias to be of same shape"),
    (dict(weight=np.ones(6, np.float64)), TypeError, "weight has dtype float64"),
    (dict(x=np.ones((3, 4, 5, 6), np.int64)), TypeError, "x must be a float32 or float64"),
    (dict(x=np.ones((3, 4, 5, 6), np.float16)), TypeError, "x must be a float32 or float64"),
    (dict(eps="small"), TypeError, "eps must be a real number"),
    (dict(out=np.zeros((3, 4, 5, 6), np.float64)), ValueError, "out must have shape"),
]


@pytest.mark.parametrize("arguments, error, message", BAD_FORWARD_ARGUMENTS)
def test_bad_forward_arguments_raise_before_writing(backend, arguments, error, message):
    x = np.ones((3, 4, 5, 6), np.float32)
    out = np.full(x.shape, 7.0, np.float32)
    call = dict(x=x, normalized_shape=6, weight=None, bias=None, eps=1e-5, out=out)
    call.update(arguments)
    with pytest.raises(error, match=message):
        fastbn.layer_norm_forward(call.pop("x"), call.pop("normalized_shape"), backend=backend,
                                  **call)
    if "out" not in arguments:
        assert (out == 7.0).all()


@pytest.mark.parametrize("arguments, error, message", [
    (dict(grad_out=np.ones((4, 5), np.float32)), ValueError, "grad_out must have the input's"),
    (dict(grad_out=np.ones((4, 6), np.float64)), TypeError, "grad_out has dtype float64"),
    (dict(mean=np.ones((3, 1), np.float32)), ValueError, r"mean must have shape \(4, 1\)"),
    (dict(rstd=None), ValueError, "rstd is needed"),
    (dict(weight=np.ones(4, np.float32)), ValueError, "Expected weight to be of same shape"),
    (dict(output_mask=(True, True)), ValueError, "output_mask must have 3 entries"),
])
def test_bad_backward_arguments_raise_before_writing(backend, arguments, error, message):
    x = np.ones((4, 6), np.float32)
    out = np.full(x.shape, 7.0, np.float32)
    call = dict(grad_out=x, x=x, normalized_shape=6, mean=np.zeros((4, 1), np.float32),
                rstd=np.ones((4, 1), np.float32), weight=None, bias=None, out=out)
    call.update(arguments)
    with pytest.raises(error, match=message):
        fastbn.layer_norm_backward(call.pop("grad_out"), call.pop("x"),
                                   call.pop("normalized_shape"), call.pop("mean"),
                                   call.pop("rstd"), backend=backend, **call)
    assert (out == 7.0).all()


def test_exported():
    assert {"layer_norm_forward", "layer_norm_backward"} <= set(fastbn.__all__)
