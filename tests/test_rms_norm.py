"""RMSNorm: every backend against PyTorch (rms_norm with autograd) and finite differences."""
import numpy as np
import pytest
import torch

import fastbn
from test_layer_norm import as_tuple, assert_close, two_threads_available

SHAPES = [
    ((5, 7), 7),
    ((3, 4, 10), (10,)),
    ((2, 3, 6, 5), (6, 5)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((300, 96), 96),
    ((3, 9000), 9000),
]


def torch_rms_norm(x, normalized_shape, weight, eps, dy):
    """PyTorch's y, rstd and gradients (x, weight) by autograd."""
    xt = torch.from_numpy(x).requires_grad_()
    wt = None if weight is None else torch.from_numpy(weight).requires_grad_()
    y = torch.nn.functional.rms_norm(xt, as_tuple(normalized_shape), wt, eps)
    y.backward(torch.from_numpy(dy))
    # rstd as torch._fused_rms_norm returns it (x's leading dims, then 1s).
    dims = tuple(range(x.ndim - len(as_tuple(normalized_shape)), x.ndim))
    x64 = x.astype(np.float64)
    eps = np.finfo(x.dtype).eps if eps is None else eps
    rstd = 1.0 / np.sqrt((x64 ** 2).mean(axis=dims, keepdims=True) + eps)
    if hasattr(torch, "_fused_rms_norm"):
        rstd = torch._fused_rms_norm(torch.from_numpy(x), as_tuple(normalized_shape), None,
                                     eps)[1].numpy()
    return y.detach().numpy(), rstd, xt.grad.numpy(), None if wt is None else wt.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, normalized_shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_forward_and_backward_match_torch(backend, rng, shape, normalized_shape, dtype, affine,
                                          eps):
    x = (rng.standard_normal(shape) + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(as_tuple(normalized_shape)).astype(dtype) if affine else None
    ty, trstd, tgrad_x, tgrad_w = torch_rms_norm(x, normalized_shape, w, eps, dy)

    y, rstd = fastbn.rms_norm_forward(x, normalized_shape, w, eps, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype and rstd.shape == trstd.shape
    assert_close(y, ty, dtype, factor=5)
    assert_close(rstd, trstd, dtype)
    grad_x, grad_w = fastbn.rms_norm_backward(dy, x, normalized_shape, rstd, w, backend=backend)
    assert_close(grad_x, tgrad_x, dtype, factor=10)
    if affine:
        assert_close(grad_w, tgrad_w, dtype, factor=10)
    else:
        assert grad_w is None


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_eps_none_is_the_machine_epsilon_of_the_dtype(backend, dtype, rtol):
    x = np.full((2, 4), 1e-4, dtype)  # mean(x**2) = 1e-8, below float32's eps
    mean_square = float(x[0, 0]) ** 2
    _, rstd = fastbn.rms_norm_forward(x, 4, backend=backend)
    np.testing.assert_allclose(rstd, 1.0 / np.sqrt(mean_square + np.finfo(dtype).eps), rtol=rtol)


def test_gradients_match_finite_differences(backend, rng):
    shape, normalized_shape = (2, 3, 4), (3, 4)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    w = rng.standard_normal(normalized_shape)

    def loss(x, w):
        return float((fastbn.rms_norm_forward(x, normalized_shape, w, 1e-3,
                                              backend="numpy")[0] * dy).sum())

    _, rstd = fastbn.rms_norm_forward(x, normalized_shape, w, 1e-3, backend=backend)
    grads = fastbn.rms_norm_backward(dy, x, normalized_shape, rstd, w, backend=backend)
    step = 1e-6
    for which, grad in enumerate(grads):
        args = [x, w]
        numeric = np.empty_like(args[which])
        for index in np.ndindex(args[which].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][index] += step
            minus[which][index] -= step
            numeric[index] = (loss(*plus) - loss(*minus)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not two_threads_available(), reason="needs 2 threads")
@pytest.mark.parametrize("shape", [(256, 300), (3, 20000)])  # whole rows; split within rows
def test_same_bits_for_any_thread_count(fast_backend, rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    results = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            y, rstd = fastbn.rms_norm_forward(x, shape[-1], w, backend=fast_backend)
            grads = fastbn.rms_norm_backward(dy, x, shape[-1], rstd, w, backend=fast_backend)
        finally:
            fastbn.set_num_threads(None)
        results.append((y, rstd) + grads)
    for one_thread, two_threads in zip(*results):
        np.testing.assert_array_equal(one_thread, two_threads)


def test_rows_with_nan_or_inf_give_what_torch_gives(backend):
    x = np.tile(np.linspace(-1.0, 2.0, 6, dtype=np.float32), (5, 1))
    x[0, 2] = np.nan
    x[1, 3] = np.inf
    x[2, 0] = -np.inf
    x[3] = 0.0  # rstd 1 / sqrt(eps)
    y, rstd = fastbn.rms_norm_forward(x, 6, backend=backend)
    ty, trstd = torch._fused_rms_norm(torch.from_numpy(x), (6,), None, None)
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-6)  # nan and 0 where torch has them
    np.testing.assert_allclose(rstd, trstd, rtol=1e-5)


@pytest.mark.parametrize("shape, normalized_shape", [((0, 6), 6), ((3, 0), 0)])
def test_empty_input(backend, shape, normalized_shape):
    x = np.zeros(shape, np.float32)
    w = np.ones(as_tuple(normalized_shape), np.float32)
    y, rstd = fastbn.rms_norm_forward(x, normalized_shape, w, backend=backend)
    trstd = torch._fused_rms_norm(torch.from_numpy(x), as_tuple(normalized_shape), None, None)[1]
    assert y.shape == x.shape
    np.testing.assert_array_equal(rstd, trstd)
    grad_x, grad_w = fastbn.rms_norm_backward(x, x, normalized_shape, rstd, w, backend=backend)
    assert grad_x.shape == x.shape
    np.testing.assert_array_equal(grad_w, np.zeros_like(w))


@pytest.mark.parametrize("arguments, error, message", [
    (dict(normalized_shape=(4, 6)), ValueError, r"Given normalized_shape=\[4, 6\]"),
    (dict(weight=np.ones(5, np.float32)), ValueError, "Expected weight to be of same shape"),
    (dict(eps=[1e-5]), TypeError, "eps must be a real number"),
    (dict(x=np.ones((3, 6), np.int32)), TypeError, "x must be a float32 or float64"),
])
def test_bad_arguments_raise_before_writing(backend, arguments, error, message):
    out = np.full((3, 6), 7.0, np.float32)
    call = dict(x=np.ones((3, 6), np.float32), normalized_shape=6, weight=None, eps=None,
                out=out)
    call.update(arguments)
    with pytest.raises(error, match=message):
        fastbn.rms_norm_forward(call.pop("x"), call.pop("normalized_shape"), backend=backend,
                                **call)
    assert (out == 7.0).all()


def test_bad_backward_arguments(backend):
    x = np.ones((3, 6), np.float32)
    with pytest.raises(ValueError, match=r"rstd must have shape \(3, 1\)"):
        fastbn.rms_norm_backward(x, x, 6, np.ones(4, np.float32), backend=backend)
    with pytest.raises(ValueError, match="output_mask must have 2 entries"):
        fastbn.rms_norm_backward(x, x, 6, np.ones(3, np.float32), backend=backend,
                                 output_mask=(True, True, True))
