"""Filter Response Normalization (+ TLU) and EvoNorm-S0: every backend against the papers'
formulas written here in plain torch ops (autograd for the gradients), and the modules."""
import copy
import pickle

import numpy as np
import pytest
import torch

import fastbn
import fastbn.nn
from conftest import tolerance

# (shape, num_groups): N = 1..16, 0 to 3 spatial dims, one value per channel, and the
# compiled kernels' cases: channels-first groups of several channels, channels-last
# blocks of whole groups (a last block narrower than the others: C = 40), runs and
# rows shorter and longer than a vector, and one large enough for two threads.
SHAPES = [
    ((1, 4, 5, 3), 2),
    ((2, 6, 7), 3),
    ((3, 8, 1, 1), 8),
    ((4, 6), 2),
    ((5, 12, 3, 2), 4),
    ((7, 40, 3, 3), 20),
    ((16, 4, 2, 3, 2), 1),
    ((2, 64, 17, 16), 32),
]
DTYPES = [np.float32, np.float64]


def channels_last_copy(a):
    """a with the same values, its channels the fastest axis in memory."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def in_layout(a, channels_last):
    return channels_last_copy(a) if channels_last else np.ascontiguousarray(a)


def same_layout(a, b):
    """Whether a and b lay out their values alike (the strides of size-1 dims do not count)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.strides, b.strides) if n > 1)


def make_inputs(rng, shape, dtype, offset=0.5):
    C = shape[1]
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(dtype)
    grad_out = rng.standard_normal(shape).astype(dtype)
    parameters = [rng.standard_normal(C).astype(dtype) for _ in range(3)]
    return x, grad_out, parameters


# ---------------------------------------------------------------------------
# The references: the papers' formulas in float64 torch ops, autograd for the gradients.

def _leaf(a):
    return None if a is None else torch.tensor(np.asarray(a, np.float64), requires_grad=True)


def _per_channel(p, x):
    return p.view((1, -1) + (1,) * (x.dim() - 2))


def _reference(forward, x, grad_out, tensors):
    """forward's output and its gradients for (x, *tensors), None for the tensors that are."""
    x = _leaf(x)
    y = forward(x)
    wanted = [t for t in [x] + tensors if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, torch.tensor(np.asarray(grad_out, np.float64))))
    return y.detach().numpy(), [None if t is None else next(grads).numpy() for t in [x] + tensors]


def frn_reference(x, weight, bias, tau, eps, grad_out):
    """Singh & Krishnan 2020: nu2 = mean(x^2) over the spatial positions,
    y = w x / sqrt(nu2 + eps) + b, z = max(y, tau)."""
    w, b, t = _leaf(weight), _leaf(bias), _leaf(tau)
    e = torch.tensor(float(eps), dtype=torch.float64, requires_grad=True)

    def forward(x):
        dims = tuple(range(2, x.dim()))
        nu2 = (x * x).mean(dim=dims, keepdim=True) if dims else x * x
        y = x / torch.sqrt(nu2 + e)
        if w is not None:
            y = y * _per_channel(w, x)
        if b is not None:
            y = y + _per_channel(b, x)
        return y if t is None else torch.maximum(y, _per_channel(t, x))

    return _reference(forward, x, grad_out, [w, b, t, e])


def evonorm_reference(x, num_groups, weight, bias, v, eps, grad_out):
    """Liu et al. 2020 (timm's EvoNorm2dS0): y = x sigmoid(v x) / group_std * w + b, the
    group's variance biased; without v, x / group_std * w + b."""
    w, b, vv = _leaf(weight), _leaf(bias), _leaf(v)

    def forward(x):
        groups = x.reshape(x.shape[0], num_groups, -1)
        std = torch.sqrt(groups.var(dim=2, unbiased=False, keepdim=True) + eps)
        std = std.expand(groups.shape).reshape(x.shape)
        y = x if vv is None else x * torch.sigmoid(_per_channel(vv, x) * x)
        y = y / std
        if w is not None:
            y = y * _per_channel(w, x)
        if b is not None:
            y = y + _per_channel(b, x)
        return y

    return _reference(forward, x, grad_out, [w, b, vv])


def assert_close(got, want, dtype, factor=1.0):
    if want is None:
        assert got is None
        return
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **tolerance(dtype, factor))


# ---------------------------------------------------------------------------
# The NumPy API, every backend.

@pytest.mark.parametrize("shape, num_groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tlu", [True, False])
def test_frn_matches_reference(backend, rng, shape, num_groups, dtype, channels_last, tlu):
    x, grad_out, (weight, bias, tau) = make_inputs(rng, shape, dtype)
    tau = tau if tlu else None
    x, grad_out = in_layout(x, channels_last), in_layout(grad_out, channels_last)
    eps = 1e-3
    y, rstd = fastbn.filter_response_norm_forward(x, weight, bias, tau, eps, backend=backend)
    want_y, want_grads = frn_reference(x, weight, bias, tau, eps, grad_out)
    assert y.dtype == dtype and same_layout(y, x) and rstd.shape == shape[:2]
    assert_close(y, want_y, dtype)
    grads = fastbn.filter_response_norm_backward(grad_out, x, rstd, weight, bias, tau,
                                                 backend=backend)
    assert same_layout(grads[0], x)
    for got, want in zip(grads, want_grads):
        # Parameter gradients add N * S terms, eps's N * C * S: allow for their rounding.
        assert_close(got, want, dtype, factor=50)


@pytest.mark.parametrize("shape, num_groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", [True, False])
def test_evonorm_matches_reference(backend, rng, shape, num_groups, dtype, channels_last, act):
    x, grad_out, (weight, bias, v) = make_inputs(rng, shape, dtype)
    v = v if act else None
    x, grad_out = in_layout(x, channels_last), in_layout(grad_out, channels_last)
    y, mean, rstd = fastbn.evonorm_s0_forward(x, num_groups, weight, bias, v, backend=backend)
    want_y, want_grads = evonorm_reference(x, num_groups, weight, bias, v, 1e-5, grad_out)
    assert y.dtype == dtype and same_layout(y, x)
    assert mean.shape == rstd.shape == (shape[0], num_groups)
    assert_close(y, want_y, dtype)
    grads = fastbn.evonorm_s0_backward(grad_out, x, mean, rstd, num_groups, weight, v,
                                       backend=backend)
    assert same_layout(grads[0], x)
    for got, want in zip(grads, want_grads):
        assert_close(got, want, dtype, factor=50)


@pytest.mark.parametrize("shape, num_groups", [((3, 12, 5, 4), 4), ((2, 40, 3, 3), 20)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backends_agree_with_numpy(fast_backend, rng, shape, num_groups, channels_last):
    """Without parameters (weight 1, bias 0) and with every output mask entry alone."""
    x, grad_out, (_, _, tau) = make_inputs(rng, shape, np.float64)
    x, grad_out = in_layout(x, channels_last), in_layout(grad_out, channels_last)
    for forward, backward, args, n_grads in (
            (fastbn.filter_response_norm_forward, fastbn.filter_response_norm_backward,
             dict(tau=tau), 5),
            (fastbn.evonorm_s0_forward, fastbn.evonorm_s0_backward, dict(v=tau), 4)):
        groups = () if n_grads == 5 else (num_groups,)
        want = forward(x, *groups, **args, backend="numpy")
        got = forward(x, *groups, **args, backend=fast_backend)
        for a, b in zip(got, want):
            assert_close(a, b, np.float64)
        backward_args = dict(tau=tau) if n_grads == 5 else dict(v=tau)
        full = backward(grad_out, x, *want[1:], *groups, **backward_args, backend="numpy")
        for k in range(n_grads):
            mask = tuple(i == k for i in range(n_grads))
            grads = backward(grad_out, x, *want[1:], *groups, **backward_args, output_mask=mask,
                             backend=fast_backend)
            for i, grad in enumerate(grads):
                if i == k:
                    assert_close(grad, full[i], np.float64, factor=10)
                else:
                    assert grad is None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_for_any_thread_count(fast_backend, rng, channels_last, dtype):
    shape = (4, 64, 12, 12)  # 36,864 values: two threads' worth of work
    x, grad_out, (weight, bias, tau) = make_inputs(rng, shape, dtype)
    x, grad_out = in_layout(x, channels_last), in_layout(grad_out, channels_last)
    results = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            if fastbn.get_num_threads() != threads:
                pytest.skip("this machine runs fewer than 2 threads")
            y, rstd = fastbn.filter_response_norm_forward(x, weight, bias, tau,
                                                          backend=fast_backend)
            frn = fastbn.filter_response_norm_backward(grad_out, x, rstd, weight, bias, tau,
                                                       backend=fast_backend)
            z, mean, rstd_g = fastbn.evonorm_s0_forward(x, 32, weight, bias, tau,
                                                        backend=fast_backend)
            evo = fastbn.evonorm_s0_backward(grad_out, x, mean, rstd_g, 32, weight, tau,
                                             backend=fast_backend)
        finally:
            fastbn.set_num_threads(None)
        results.append((y, rstd) + frn + (z, mean, rstd_g) + evo)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("dtype, offset", [(np.float32, 1e3), (np.float64, 1e7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_evonorm_large_mean(fast_backend, rng, dtype, offset, channels_last):
    """The statistics are shifted by a pivot, as GroupNorm's: accurate when the mean
    dwarfs the spread."""
    x, grad_out, (weight, bias, v) = make_inputs(rng, (2, 32, 5, 5), dtype, offset=offset)
    x = in_layout(x, channels_last)
    want = fastbn.evonorm_s0_forward(x, 8, weight, bias, v * 1e-3, backend="numpy")
    got = fastbn.evonorm_s0_forward(x, 8, weight, bias, v * 1e-3, backend=fast_backend)
    for a, b in zip(got, want):
        assert_close(a, b, dtype, factor=5)


def test_tlu_tie_splits_the_gradient(backend):
    """At a tie (x = 0 with bias = tau, as at initialisation) the TLU's maximum gives half
    the gradient to y and half to tau, as torch.maximum's backward."""
    x = np.zeros((2, 3, 2, 2))
    x[0, 0, 0, 0] = 1.0
    weight, bias, tau = np.ones(3), np.zeros(3), np.zeros(3)
    grad_out = np.ones_like(x)
    _, rstd = fastbn.filter_response_norm_forward(x, weight, bias, tau, backend=backend)
    grads = fastbn.filter_response_norm_backward(grad_out, x, rstd, weight, bias, tau,
                                                 backend=backend)
    _, want = frn_reference(x, weight, bias, tau, 1e-6, grad_out)
    for got, expected in zip(grads, want):
        assert_close(got, expected, np.float64)
    assert grads[3][1] == 4.0  # channel 1: every value ties, half of 8


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_stay_in_their_group(backend, rng, value):
    x, grad_out, (weight, bias, tau) = make_inputs(rng, (2, 4, 3, 3), np.float64)
    x[1, 2, 1, 1] = value
    y, rstd = fastbn.filter_response_norm_forward(x, weight, bias, None, backend=backend)
    want_y, _ = frn_reference(x, weight, bias, None, 1e-6, grad_out)
    assert np.isnan(y[1, 2]).all() == np.isnan(want_y[1, 2]).all()
    finite = np.ones(x.shape, bool)
    finite[1, 2] = False
    np.testing.assert_allclose(y[finite], want_y[finite], **tolerance(np.float64))
    y, mean, rstd = fastbn.evonorm_s0_forward(x, 2, weight, bias, tau, backend=backend)
    want_y, _ = evonorm_reference(x, 2, weight, bias, tau, 1e-5, grad_out)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want_y))
    assert np.isnan(y[1, 2:]).all() and np.isfinite(y[0]).all() and np.isfinite(y[1, :2]).all()
    np.testing.assert_allclose(y[0], want_y[0], **tolerance(np.float64))


def test_nan_tau_gives_nan_as_torch_maximum(backend, rng):
    x, grad_out, (weight, bias, tau) = make_inputs(rng, (2, 4, 3, 3), np.float64)
    tau[1] = np.nan
    x = channels_last_copy(x)  # the tiles read tau per column; the runs per channel
    for layout in (x, np.ascontiguousarray(x)):
        y, _ = fastbn.filter_response_norm_forward(layout, weight, bias, tau, backend=backend)
        assert np.isnan(y[:, 1]).all() and not np.isnan(y[:, [0, 2, 3]]).any()


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (0, 4), (2, 4, 0, 3)])
def test_empty_input(backend, shape):
    x = np.zeros(shape, np.float32)
    weight = np.ones(4, np.float32)
    y, rstd = fastbn.filter_response_norm_forward(x, weight, weight, weight, backend=backend)
    assert y.shape == shape and rstd.shape == shape[:2] and np.isnan(rstd).all()
    grads = fastbn.filter_response_norm_backward(x, x, rstd, weight, weight, weight,
                                                 backend=backend)
    assert grads[0].shape == shape
    for grad in grads[1:]:
        np.testing.assert_array_equal(grad, np.zeros_like(grad))
    y, mean, rstd = fastbn.evonorm_s0_forward(x, 2, weight, weight, weight, backend=backend)
    assert y.shape == shape and mean.shape == (shape[0], 2)
    grads = fastbn.evonorm_s0_backward(x, x, mean, rstd, 2, weight, weight, backend=backend)
    assert grads[0].shape == shape
    for grad in grads[1:]:
        np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_one_value_per_group(backend, rng):
    """FRN on 1x1 maps is x / sqrt(x^2 + eps); EvoNorm with one value per group divides
    by sqrt(eps) (zero variance): both as the formulas, with no error."""
    x, grad_out, (weight, bias, tau) = make_inputs(rng, (3, 4, 1, 1), np.float64)
    y, _ = fastbn.filter_response_norm_forward(x, weight, bias, tau, 1e-2, backend=backend)
    assert_close(y, frn_reference(x, weight, bias, tau, 1e-2, grad_out)[0], np.float64)
    y, _, _ = fastbn.evonorm_s0_forward(x, 4, weight, bias, tau, 1e-2, backend=backend)
    assert_close(y, evonorm_reference(x, 4, weight, bias, tau, 1e-2, grad_out)[0], np.float64)


@pytest.mark.parametrize("out_channels_last", [False, True])
def test_out_argument(backend, rng, out_channels_last):
    x, grad_out, (weight, bias, tau) = make_inputs(rng, (2, 4, 3, 5), np.float64)
    expected = fastbn.filter_response_norm_forward(x, weight, bias, tau, backend="numpy")[0]
    out = in_layout(np.zeros_like(x), out_channels_last)
    assert fastbn.filter_response_norm_forward(x, weight, bias, tau, out=out,
                                               backend=backend)[0] is out
    assert_close(out, expected, np.float64)
    in_place = x.copy()
    fastbn.evonorm_s0_forward(in_place, 2, weight, bias, tau, out=in_place, backend=backend)
    assert_close(in_place, fastbn.evonorm_s0_forward(x, 2, weight, bias, tau,
                                                     backend="numpy")[0], np.float64)


BAD_FORWARD_ARGUMENTS = [
    (dict(x=np.ones(6)), ValueError, "expected 2D to 5D input"),
    (dict(x=np.ones((2, 6, 3), np.int64)), TypeError, "float32 or float64"),
    (dict(weight=np.ones(5)), ValueError, r"weight must have shape \(6,\)"),
    (dict(bias=np.ones(6, np.float32)), TypeError, "does not mix float32 and float64"),
    (dict(extra=np.ones(7)), ValueError, r"must have shape \(6,\)"),
    (dict(eps=-1e-5), ValueError, "eps must be a finite number >= 0"),
    (dict(eps=np.nan), ValueError, "eps must be a finite number >= 0"),
]


GROUP_ARGUMENTS = [
    (dict(num_groups=4), ValueError, "divisible by num_groups"),
    (dict(num_groups=0), ValueError, "num_groups must be a positive integer"),
]


@pytest.mark.parametrize("op, kwargs, error, match",
                         [("frn",) + case for case in BAD_FORWARD_ARGUMENTS]
                         + [("evonorm",) + case for case in BAD_FORWARD_ARGUMENTS + GROUP_ARGUMENTS])
def test_forward_rejects_bad_input_and_writes_nothing(backend, op, kwargs, error, match):
    args = dict(x=np.ones((2, 6, 3)), num_groups=3, weight=None, bias=None, extra=None,
                eps=1e-5)
    args.update(kwargs)
    out = np.full(args["x"].shape, 7.0) if args["x"].dtype == np.float64 else None
    x, num_groups, extra = args.pop("x"), args.pop("num_groups"), args.pop("extra")
    with pytest.raises(error, match=match):
        if op == "frn":
            fastbn.filter_response_norm_forward(x, tau=extra, **args, out=out, backend=backend)
        else:
            fastbn.evonorm_s0_forward(x, num_groups, v=extra, **args, out=out, backend=backend)
    if out is not None:
        assert (out == 7.0).all()  # a failed call changes nothing


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rstd=np.zeros((2, 2))), ValueError, r"rstd must have shape \(2, 6\)"),
    (dict(rstd=None), ValueError, "rstd is needed"),
    (dict(grad_out=np.ones((2, 6, 4))), ValueError, "grad_out must have the input's shape"),
    (dict(grad_out=np.ones((2, 6, 3), np.float32)), TypeError, "does not mix"),
    (dict(output_mask=(True, True, True)), ValueError, "output_mask must have 5 entries"),
])
def test_frn_backward_rejects_bad_input(backend, kwargs, error, match):
    args = dict(grad_out=np.ones((2, 6, 3)), x=np.ones((2, 6, 3)), rstd=np.ones((2, 6)))
    args.update(kwargs)
    mask = args.pop("output_mask", (True,) * 5)
    with pytest.raises(error, match=match):
        fastbn.filter_response_norm_backward(*args.values(), output_mask=mask, backend=backend)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mean=np.zeros((2, 2))), ValueError, r"mean must have shape \(2, 3\)"),
    (dict(num_groups=4), ValueError, "divisible by num_groups"),
    (dict(output_mask=(True, True, True)), ValueError, "output_mask must have 4 entries"),
])
def test_evonorm_backward_rejects_bad_input(backend, kwargs, error, match):
    args = dict(grad_out=np.ones((2, 6, 3)), x=np.ones((2, 6, 3)), mean=np.zeros((2, 3)),
                rstd=np.ones((2, 3)), num_groups=3)
    args.update(kwargs)
    mask = args.pop("output_mask", (True,) * 4)
    with pytest.raises(error, match=match):
        fastbn.evonorm_s0_backward(*args.values(), output_mask=mask, backend=backend)


# ---------------------------------------------------------------------------
# The modules and functional forms.

def frn_module(C, backend, dtype=torch.float64, **kwargs):
    module = fastbn.nn.FilterResponseNorm2d(C, dtype=dtype, backend=backend, **kwargs)
    with torch.no_grad():  # away from the initial values, so that every term shows
        for parameter in module.parameters():
            parameter.add_(torch.rand_like(parameter) * 0.5)
    return module


def evonorm_module(C, backend, dtype=torch.float64, **kwargs):
    module = fastbn.nn.EvoNorm2dS0(C, dtype=dtype, backend=backend, **kwargs)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.rand_like(parameter) * 0.5)
    return module


def module_reference(module, x, grad_out):
    """The module's output and gradients from this file's references."""
    to_numpy = lambda t: None if t is None else t.detach().numpy()  # noqa: E731
    if isinstance(module, fastbn.nn.FilterResponseNorm2d):
        eps = abs(module.eps)
        if module.eps_learned is not None:
            eps += abs(module.eps_learned.item())
        y, grads = frn_reference(to_numpy(x), to_numpy(module.weight), to_numpy(module.bias),
                                 to_numpy(module.tau), eps, grad_out)
        if module.eps_learned is not None:  # d|l| / dl = sign(l)
            grads[4] = grads[4] * np.sign(module.eps_learned.item()).reshape(1)
        else:
            grads.pop()
    else:
        y, grads = evonorm_reference(to_numpy(x), module.groups, to_numpy(module.weight),
                                     to_numpy(module.bias), to_numpy(module.v), module.eps,
                                     grad_out)
    return y, [g for g in grads if g is not None]


@pytest.mark.parametrize("make, kwargs", [
    (frn_module, {}), (frn_module, dict(tlu=False)), (frn_module, dict(learnable_eps=True)),
    (evonorm_module, dict(groups=4)), (evonorm_module, dict(group_size=2, apply_act=False)),
])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_training_step_matches_reference(backend, make, kwargs, channels_last, dtype):
    torch.manual_seed(0)
    module = make(8, backend, dtype, **kwargs)
    x = torch.randn(3, 8, 5, 4, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn(x.shape, dtype=dtype)
    y = module(x)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "NormActFunctionBackward"
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    y.backward(grad_out)
    want_y, want_grads = module_reference(module, x, grad_out.numpy())
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    assert_close(y.detach().numpy(), want_y, np_dtype)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    assert len(grads) == len(want_grads)
    for got, want in zip(grads, want_grads):
        assert_close(got.numpy(), want, np_dtype, factor=50)


@pytest.mark.parametrize("make, kwargs", [
    (frn_module, dict(learnable_eps=True)), (frn_module, dict(tlu=False)),
    (evonorm_module, dict(groups=2)), (evonorm_module, dict(groups=4, apply_act=False)),
])
def test_gradcheck(backend, make, kwargs):
    torch.manual_seed(1)
    module = make(4, backend, **kwargs)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    parameters = tuple(module.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: module(x), (x,) + parameters)
    # Double backward runs the formulas in torch ops under autograd.
    assert torch.autograd.gradgradcheck(lambda x, *p: module(x), (x,) + parameters)


def test_functional_matches_module(rng):
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    frn = frn_module(8, None)
    evonorm = evonorm_module(8, None, groups=4)
    with torch.no_grad():
        torch.testing.assert_close(
            fastbn.nn.functional.filter_response_norm(x, frn.weight, frn.bias, frn.tau, 1e-6),
            frn(x))
        torch.testing.assert_close(
            fastbn.nn.functional.evonorm_s0(x, 4, evonorm.weight, evonorm.bias, evonorm.v),
            evonorm(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_input_runs_the_torch_formula(dtype):
    """fastbn has no 16-bit kernels: the call runs the formulas in torch ops, with
    float32 statistics as timm's."""
    torch.manual_seed(2)
    x = torch.randn(2, 8, 4, 4)
    for module in (frn_module(8, "cython", torch.float32),
                   evonorm_module(8, "cython", torch.float32, groups=4)):
        want = module(x)
        y = module.to(dtype)(x.to(dtype))
        assert y.dtype == dtype and y.grad_fn is not None
        assert type(y.grad_fn).__name__ != "NormActFunctionBackward"
        torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)


def test_mixed_dtypes_cast_the_parameters_as_timm():
    module = frn_module(8, "cython", torch.float32)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    want = module.to(torch.float64)(x)
    y = module.to(torch.float32)(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [frn_module, evonorm_module])
def test_module_errors_change_nothing(make):
    module = make(32, "cython")
    x = torch.randn(2, 32, 3, 3, dtype=torch.float64)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        module(x[0])
    with pytest.raises(RuntimeError, match="Expected weight to be a vector of size equal to the "
                                           "number of channels in input"):
        module(torch.randn(2, 64, 3, 3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(RuntimeError, match="not implemented for torch.int64"):
        module(torch.ones(2, 32, 3, 3, dtype=torch.int64))
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert all(p.grad is None for p in module.parameters())


def test_functional_errors():
    x = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        fastbn.nn.functional.evonorm_s0(x, 4)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        fastbn.nn.functional.filter_response_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="one-element tensor"):
        fastbn.nn.functional.filter_response_norm(x, eps=torch.ones(2))
    with pytest.raises(ValueError, match="at least 2 dims"):
        fastbn.nn.functional.filter_response_norm(torch.randn(6))
    with pytest.raises(RuntimeError, match="Expected tau to be a vector"):
        fastbn.nn.functional.filter_response_norm(x, tau=torch.zeros(5))


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_channels must be divisible by num_groups"):
        fastbn.nn.EvoNorm2dS0(48)  # 32 groups by default
    with pytest.raises(ValueError, match="must be divisible by group_size"):
        fastbn.nn.EvoNorm2dS0(48, group_size=5)
    assert fastbn.nn.EvoNorm2dS0(48, group_size=6).groups == 8
    with pytest.raises(ValueError, match="unknown backend"):
        fastbn.nn.FilterResponseNorm2d(8, backend="cuda")


def test_state_dicts_have_timms_names_and_shapes():
    """timm's FilterResponseNormTlu2d: weight, bias, tau of shape (C,); EvoNorm2dS0:
    weight, bias, v of shape (C,). Their state dicts load strictly."""
    frn = fastbn.nn.FilterResponseNorm2d(8)
    timm_frn = {"weight": torch.rand(8), "bias": torch.rand(8), "tau": torch.rand(8)}
    frn.load_state_dict(timm_frn)
    torch.testing.assert_close(frn.tau.data, timm_frn["tau"])
    assert set(fastbn.nn.FilterResponseNorm2d(8, tlu=False).state_dict()) == {"weight", "bias"}
    learned = fastbn.nn.FilterResponseNorm2d(8, learnable_eps=True)
    assert learned.eps_learned.shape == (1,) and learned.eps_learned.item() == pytest.approx(1e-4)
    evonorm = fastbn.nn.EvoNorm2dS0(64)
    evonorm.load_state_dict({"weight": torch.rand(64), "bias": torch.rand(64),
                             "v": torch.rand(64)})
    assert set(fastbn.nn.EvoNorm2dS0(64, apply_act=False).state_dict()) == {"weight", "bias"}
    assert (evonorm.groups, evonorm.eps) == (32, 1e-5)


def test_repr_copies_and_empty_batch():
    frn = fastbn.nn.FilterResponseNorm2d(4, learnable_eps=True, backend="numpy")
    assert repr(frn) == ("FilterResponseNorm2d(4, eps=1e-06, learnable_eps=True, tlu=True, "
                         "backend='numpy')")
    evonorm = fastbn.nn.EvoNorm2dS0(4, groups=2)
    assert repr(evonorm) == "EvoNorm2dS0(4, groups=2, apply_act=True, eps=1e-05, backend=None)"
    for module in (frn, evonorm):
        for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert clone.backend == module.backend and repr(clone) == repr(module)
        x = torch.zeros(0, 4, 3, 3, requires_grad=True)
        y = module(x)
        y.sum().backward()
        assert y.shape == x.shape and (module.weight.grad == 0).all()
