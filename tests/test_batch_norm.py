"""BatchNorm forward and backward, for every backend: against PyTorch's ATen ops and
the NumPy reference, on every rank, layout and mode, and on the awkward inputs."""
import contextlib
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

import fastbn
from conftest import tolerance

FLOATS = [np.float32, np.float64]


# ---------------------------------------------------------------------------
# Inputs in every memory layout, and the PyTorch results to compare with.

def make_input(rng, shape, layout, dtype, loc=0.0, scale=1.0):
    """Random values of `shape` laid out in memory as `layout` says."""
    return arrange((rng.standard_normal(shape) * scale + loc).astype(dtype), layout)


def arrange(a, layout):
    """a's values in new memory laid out as `layout` says ("broadcast": a[:1] repeated)."""
    shape, dtype = a.shape, a.dtype
    if layout == "contiguous":
        return a.copy()
    if layout == "channels_last":  # NumPy: channels made the fastest axis, then moved back (a view)
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
    if layout == "torch_channels_last":  # what .numpy() gives for a channels_last(_3d) tensor
        memory_format = torch.channels_last if a.ndim == 4 else torch.channels_last_3d
        return torch.from_numpy(a).contiguous(memory_format=memory_format).numpy()
    if layout == "strided":  # every other element of the last axis
        wide = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if layout == "transposed":  # the last two axes swapped in memory (Fortran order for 2-D)
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(a, -1, -2)), -1, -2)
    if layout == "reversed":  # negative strides
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if layout == "broadcast":  # the first sample repeated over the batch with stride 0
        return np.broadcast_to(a[:1], shape)
    raise ValueError(layout)


def memory_layout(a):
    if a.flags.c_contiguous:
        return "C"
    return "channels_last" if np.moveaxis(a, 1, -1).flags.c_contiguous else "other"


def expected_layout(x):
    """fastbn keeps C order and channels-last; any other strides give a C-ordered result."""
    layout = memory_layout(x)
    return "C" if layout == "other" else layout


@contextlib.contextmanager
def torch_one_thread():
    """Run PyTorch single-threaded: its parallel regions stall for scheduler time slices
    on a busy machine, even on tiny tensors. Restored afterwards, because torch and fastbn
    share the OpenMP runtime and torch's count caps fastbn's."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def as_tensor(a):
    return None if a is None else torch.from_numpy(np.array(a))  # a copy


def as_array(t):
    return None if t is None else t.numpy()


def torch_forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """torch.native_batch_norm on copies of the arguments, as NumPy arrays:
    (y, save_mean, save_invstd, running_mean, running_var)."""
    rm, rv = as_tensor(running_mean), as_tensor(running_var)
    with torch_one_thread():
        y, save_mean, save_invstd = torch.native_batch_norm(
            as_tensor(x), as_tensor(weight), as_tensor(bias), rm, rv, training, momentum, eps)
    return y.numpy(), save_mean.numpy(), save_invstd.numpy(), as_array(rm), as_array(rv)


def torch_backward(grad_out, x, weight, running_mean, running_var, save_mean, save_invstd,
                   training, eps):
    with torch_one_thread():
        grads = torch.ops.aten.native_batch_norm_backward(
            as_tensor(grad_out), as_tensor(x), as_tensor(weight), as_tensor(running_mean),
            as_tensor(running_var), as_tensor(save_mean), as_tensor(save_invstd), training, eps,
            [True, True, True])
    return tuple(g.numpy() for g in grads)


def eval_statistics(running_mean, running_var, eps):
    """fastbn's eval-mode save_mean and save_invstd (torch returns empty tensors there)."""
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    return running_mean.copy(), invstd.astype(running_var.dtype)


def forward_and_backward(backend, x, weight, bias, running_mean, running_var, training,
                         momentum, eps, grad_out):
    """fastbn forward then backward on copies of the running statistics:
    dict of y, save_mean, save_invstd, running_mean, running_var, grad_x, grad_weight, grad_bias."""
    rm = None if running_mean is None else running_mean.copy()
    rv = None if running_var is None else running_var.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, weight, bias, rm, rv, training, momentum, eps, backend=backend)
    grad_x, grad_weight, grad_bias = fastbn.batch_norm_backward(
        grad_out, x, weight, save_mean, save_invstd, training, backend=backend)
    return dict(y=y, save_mean=save_mean, save_invstd=save_invstd, running_mean=rm,
                running_var=rv, grad_x=grad_x, grad_weight=grad_weight, grad_bias=grad_bias)


def torch_forward_and_backward(x, weight, bias, running_mean, running_var, training, momentum,
                               eps, grad_out):
    """The same dict from PyTorch, with fastbn's eval-mode save_mean and save_invstd."""
    y, save_mean, save_invstd, rm, rv = torch_forward(
        x, weight, bias, running_mean, running_var, training, momentum, eps)
    grad_x, grad_weight, grad_bias = torch_backward(
        grad_out, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps)
    if not training:
        save_mean, save_invstd = eval_statistics(running_mean, running_var, eps)
    return dict(y=y, save_mean=save_mean, save_invstd=save_invstd, running_mean=rm,
                running_var=rv, grad_x=grad_x, grad_weight=grad_weight, grad_bias=grad_bias)


def parameters(rng, C, dtype, affine=True, running=True):
    """(weight, bias, running_mean, running_var), None where absent."""
    weight = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    bias = rng.standard_normal(C).astype(dtype) if affine else None
    running_mean = rng.standard_normal(C).astype(dtype) if running else None
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype) if running else None
    return weight, bias, running_mean, running_var


def assert_results_close(got, want, dtype, against, sum_factor=1.0):
    """Every result within the dtype's tolerance; `sum_factor` widens it for the
    gradients that sum over the batch (see torch_sum_factor)."""
    for name, value in got.items():
        if want[name] is None:
            assert value is None, f"{name}: expected None"
            continue
        assert value.dtype == dtype, f"{name} has dtype {value.dtype}"
        factor = sum_factor if name in ("grad_weight", "grad_bias") else 1.0
        np.testing.assert_allclose(value, want[name], **tolerance(dtype, factor),
                                   err_msg=f"{name} vs {against}")


def torch_sum_factor(x):
    """PyTorch's float32 eval-mode backward sums in float32 (fastbn sums in float64: checked
    against the NumPy reference at the plain tolerance), so its grad_weight and grad_bias
    drift from the exact values about as sqrt(values summed)."""
    count = x.size // x.shape[1]
    return max(1.0, np.sqrt(count) / 10)


# ---------------------------------------------------------------------------
# 1. Numbers against PyTorch and the NumPy reference.

CASES = [  # (shape, layout): every rank and layout kind, N sampled from 1 to 16
    ((16, 5), "contiguous"),
    ((7, 3), "transposed"),
    ((16, 300), "contiguous"),  # 2-D runs the channels-last kernels; > 256 channels: 2 blocks
    ((2, 4, 9), "contiguous"),
    ((1, 6, 10), "contiguous"),
    ((3, 3, 5), "strided"),
    ((2, 3, 5000), "contiguous"),  # rows longer than one work item: several chunks per row
    ((4, 3, 5, 6), "contiguous"),
    ((2, 3, 4, 5), "torch_channels_last"),
    ((5, 4, 3, 3), "channels_last"),
    ((4, 300, 4, 4), "channels_last"),  # several row blocks and two channel blocks
    ((3, 2, 4, 6), "transposed"),
    ((6, 3, 2, 5), "broadcast"),
    ((2, 3, 4, 5), "reversed"),
    ((9, 2, 2, 3, 4), "contiguous"),
    ((1, 4, 3, 2, 3), "torch_channels_last"),
    ((3, 2, 3, 2, 4), "strided"),
    ((11, 3, 1, 1, 1), "contiguous"),
]

MODES = {  # (training, affine, running statistics); eval mode needs running statistics
    "train": (True, True, True),
    "train-no-affine": (True, False, True),
    "train-no-running": (True, True, False),
    "train-bare": (True, False, False),
    "eval": (False, True, True),
    "eval-no-affine": (False, False, True),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("shape, layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
def test_matches_torch_and_reference(backend, shape, layout, mode, dtype, rng):
    training, affine, running = mode
    x = make_input(rng, shape, layout, dtype)
    grad_out = rng.standard_normal(shape).astype(dtype)
    weight, bias, running_mean, running_var = parameters(rng, shape[1], dtype, affine, running)
    args = (x, weight, bias, running_mean, running_var, training, 0.3, 1e-5, grad_out)

    got = forward_and_backward(backend, *args)
    assert_results_close(got, torch_forward_and_backward(*args), dtype, "torch",
                         torch_sum_factor(x))
    assert_results_close(got, forward_and_backward("numpy", *args), dtype, "numpy backend")
    assert memory_layout(got["y"]) == expected_layout(x)
    assert memory_layout(got["grad_x"]) == expected_layout(x)
    if not training:
        assert got["running_mean"].tobytes() == running_mean.tobytes()
        assert got["running_var"].tobytes() == running_var.tobytes()


@pytest.mark.parametrize("N", range(1, 17))
def test_every_batch_size(backend, N, rng):
    layout = "channels_last" if N % 2 else "contiguous"
    x = make_input(rng, (N, 3, 2, 2), layout, np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    args = (x, *parameters(rng, 3, np.float32), True, 0.1, 1e-5, grad_out)
    got = forward_and_backward(backend, *args)
    assert_results_close(got, torch_forward_and_backward(*args), np.float32, "torch")
    assert memory_layout(got["y"]) == expected_layout(x)


def test_channels_last_output_matches_torch_layout(backend, rng):
    x = make_input(rng, (2, 3, 4, 5), "torch_channels_last", np.float32)
    y, _, _ = fastbn.batch_norm_forward(x, training=True, backend=backend)
    with torch_one_thread():
        y_torch = torch.native_batch_norm(torch.from_numpy(x), None, None, None, None, True,
                                          0.1, 1e-5)[0]
    assert y_torch.is_contiguous(memory_format=torch.channels_last)
    assert y.strides == y_torch.numpy().strides


# ---------------------------------------------------------------------------
# 2. Running statistics over several steps.

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_running_statistics_over_steps(backend, momentum, layout, dtype, rng):
    C = 4
    running_mean, running_var = np.zeros(C, dtype), np.ones(C, dtype)
    torch_mean, torch_var = as_tensor(running_mean), as_tensor(running_var)
    for step in range(5):
        x = make_input(rng, (3, C, 4, 5), layout, dtype, loc=step, scale=step + 1)
        fastbn.batch_norm_forward(x, None, None, running_mean, running_var, True, momentum,
                                  1e-5, backend=backend)
        with torch_one_thread():
            torch.native_batch_norm(torch.from_numpy(x), None, None, torch_mean, torch_var,
                                    True, momentum, 1e-5)
        np.testing.assert_allclose(running_mean, torch_mean.numpy(), **tolerance(dtype))
        np.testing.assert_allclose(running_var, torch_var.numpy(), **tolerance(dtype))
    if momentum == 0.0:  # the statistics stay exactly as they were
        assert np.array_equal(running_mean, np.zeros(C)) and np.array_equal(running_var, np.ones(C))


# ---------------------------------------------------------------------------
# 3. Gradients by central finite differences (float64).

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_match_finite_differences(backend, training, layout, rng):
    x = make_input(rng, (2, 3, 2, 3), layout, np.float64)
    weight, bias, running_mean, running_var = parameters(rng, 3, np.float64)
    g = rng.standard_normal(x.shape)
    if training:  # batch statistics; the running ones would only be updated
        running_mean = running_var = None

    def loss(x, weight, bias):
        y, _, _ = fastbn.batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                                            backend=backend)
        return np.sum(y * g)

    def numerical_gradient(index):
        """d loss / d args[index] by central differences."""
        args = [x.copy(), weight.copy(), bias.copy()]
        gradient = np.zeros_like(args[index])
        h = 1e-6
        for i in np.ndindex(gradient.shape):
            value = args[index][i]
            args[index][i] = value + h
            up = loss(*args)
            args[index][i] = value - h
            down = loss(*args)
            args[index][i] = value
            gradient[i] = (up - down) / (2 * h)
        return gradient

    _, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training, backend=backend)
    analytical = fastbn.batch_norm_backward(g, x, weight, save_mean, save_invstd, training,
                                            backend=backend)
    for index, name in enumerate(["grad_x", "grad_weight", "grad_bias"]):
        np.testing.assert_allclose(analytical[index], numerical_gradient(index), rtol=1e-6,
                                   atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------
# 4. The same bits for any number of threads.

# Big enough that the Cython kernels run 2 threads: at least 2 * MIN_ELEMENTS_PER_THREAD
# (16384) elements, and more work items than threads.
THREAD_CASES = [
    ((2, 3, 100, 110), "contiguous"),  # channels-first, 3 chunks per row
    ((2, 300, 8, 8), "channels_last"),  # 8 row blocks x 2 channel blocks
    ((400, 100), "contiguous"),  # 2-D: channels-last kernels, 10 row blocks
]


@pytest.fixture
def restore_threads():
    yield
    fastbn.set_num_threads(None)


def thread_case_results(backend, shape, layout, dtype):
    rng = np.random.default_rng(7)
    x = make_input(rng, shape, layout, dtype, loc=3.0)
    grad_out = rng.standard_normal(shape).astype(dtype)
    return forward_and_backward(backend, x, *parameters(rng, shape[1], dtype), True, 0.1, 1e-5,
                                grad_out)


def assert_same_bits(a, b):
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape, layout", THREAD_CASES, ids=[str(s) for s, _ in THREAD_CASES])
def test_same_bits_for_one_and_two_threads(backend, shape, layout, dtype, restore_threads):
    fastbn.set_num_threads(2)
    if fastbn.get_num_threads() < 2:
        pytest.skip("one CPU (or OpenMP limited to one thread): nothing to compare")
    two = thread_case_results(backend, shape, layout, dtype)
    fastbn.set_num_threads(1)
    assert fastbn.get_num_threads() == 1
    one = thread_case_results(backend, shape, layout, dtype)
    assert_same_bits(one, two)


def test_threadpool_limits_is_honoured(backend, restore_threads):
    from fastbn._threads import openmp_enabled  # importing loads fastbn's OpenMP runtime
    if not openmp_enabled():
        pytest.skip("fastbn is built without OpenMP")
    shape, layout = THREAD_CASES[0]
    fastbn.set_num_threads(2)
    if fastbn.get_num_threads() < 2:
        pytest.skip("one CPU (or OpenMP limited to one thread): nothing to compare")
    two = thread_case_results(backend, shape, layout, np.float32)
    with threadpool_limits(1, user_api="openmp"):
        assert fastbn.get_num_threads() == 1
        one = thread_case_results(backend, shape, layout, np.float32)
    assert_same_bits(one, two)


# ---------------------------------------------------------------------------
# 5. Accuracy on data with a large mean.

def exact_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """(y, mean, invstd, new running_var) in extended precision.

    Values are shifted by each channel's first element first: x - pivot is exact,
    so even where np.longdouble is only float64 the statistics keep their digits.
    """
    long = np.longdouble
    axes = (0,) + tuple(range(2, x.ndim))
    per_channel = (1, -1) + (1,) * (x.ndim - 2)
    if training:
        pivot = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)[:, 0].astype(long)
        shifted = x.astype(long) - pivot.reshape(per_channel)
        shifted_mean = shifted.mean(axis=axes)
        centred = shifted - shifted_mean.reshape(per_channel)
        count = x.size // x.shape[1]
        var_sum = (centred * centred).sum(axis=axes)
        mean = pivot + shifted_mean
        invstd = 1 / np.sqrt(var_sum / count + eps)
        new_running_var = (momentum * var_sum / (count - 1)
                           + (1 - momentum) * running_var.astype(long))
    else:
        mean = running_mean.astype(long)
        centred = x.astype(long) - mean.reshape(per_channel)
        invstd = 1 / np.sqrt(running_var.astype(long) + eps)
        new_running_var = running_var.astype(long)
    y = (centred * (invstd * weight.astype(long)).reshape(per_channel)
         + bias.astype(long).reshape(per_channel))
    return y, mean, invstd, new_running_var


def max_error(value, exact, relative):
    error = np.abs(value.astype(np.longdouble) - exact)
    return float(np.max(error / np.abs(exact) if relative else error))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype, offset", [(np.float32, 1e4), (np.float64, 1e8)])
def test_accuracy_on_data_with_a_large_mean(backend, dtype, offset, layout, training, rng):
    # The worst of 32 channels: a steadier measure than the worst of a few. Measured over
    # 60 draws of this test, the worst fastbn/PyTorch error ratio was 0.5 for the statistics
    # (float32, where both are within an ulp) and 0.002 for y. With 4 channels, PyTorch's
    # two-pass sums sometimes land closer: the Cython float64 channels-last invstd was then
    # worse in 9% of draws, by up to 2.9x (23 ulps against 8).
    shape = (8, 32, 16, 16)
    x = make_input(rng, shape, layout, dtype, loc=offset)
    weight, bias, _, _ = parameters(rng, shape[1], dtype)
    # Eval mode normalizes with running statistics close to the data's, as after training.
    running_mean = (offset + rng.standard_normal(shape[1]) * 0.1).astype(dtype)
    running_var = rng.uniform(0.8, 1.2, shape[1]).astype(dtype)
    args = (x, weight, bias, running_mean, running_var, training, 0.1, 1e-5)

    exact_y, exact_mean, exact_invstd, exact_running_var = exact_batch_norm(*args)
    rm, rv = running_mean.copy(), running_var.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, weight, bias, rm, rv, training, 0.1, 1e-5, backend=backend)
    y_torch, mean_torch, invstd_torch, _, rv_torch = torch_forward(*args)

    # y: no worse than PyTorch (which computes x * alpha + beta, and loses the digits that
    # beta = b - mean * alpha cancels).
    assert max_error(y, exact_y, False) <= max_error(y_torch, exact_y, False)
    if not training:
        return
    # The statistics: no worse than PyTorch, or within one ulp of the exact value. Both
    # round a float64 result to the dtype; where PyTorch lands on the correctly rounded
    # value, fastbn's (computed in another order, then rounded) may be the neighbouring one.
    ulp = np.finfo(dtype).eps
    for name, value, exact, theirs in [("save_mean", save_mean, exact_mean, mean_torch),
                                       ("save_invstd", save_invstd, exact_invstd, invstd_torch),
                                       ("running_var", rv, exact_running_var, rv_torch)]:
        ours = max_error(value, exact, True)
        assert ours <= max(max_error(theirs, exact, True), ulp), name


# ---------------------------------------------------------------------------
# 6. Bad input: a clear exception, and no state changed.

def valid_forward_arguments(dtype=np.float64):
    rng = np.random.default_rng(3)
    weight, bias, running_mean, running_var = parameters(rng, 3, dtype)
    return dict(x=rng.standard_normal((4, 3, 5)).astype(dtype), weight=weight, bias=bias,
                running_mean=running_mean, running_var=running_var, training=True,
                momentum=0.1, eps=1e-5)


def float32_except(name):
    """Every argument float32 but `name`, which stays float64."""
    arguments = valid_forward_arguments(np.float32)
    arguments[name] = valid_forward_arguments(np.float64)[name]
    return arguments


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def replaced(valid_arguments, **changes):
    """A function giving valid_arguments() with some replaced (a callable is given the
    valid value)."""
    def build():
        arguments = valid_arguments()
        for name, value in changes.items():
            arguments[name] = value(arguments[name]) if callable(value) else value
        return arguments
    return build


changed = functools.partial(replaced, valid_forward_arguments)


FORWARD_ERRORS = {  # id: (arguments, exception, message)
    "int x": (changed(x=lambda x: x.astype(np.int64)), TypeError,
              "x must be a float32 or float64 array, got dtype int64"),
    "bool x": (changed(x=lambda x: x > 0), TypeError, "x must be .* got dtype bool"),
    "complex x": (changed(x=lambda x: x.astype(np.complex128)), TypeError,
                  "x must be .* got dtype complex128"),
    "float16 x": (changed(x=lambda x: x.astype(np.float16)), TypeError,
                  "x must be .* got dtype float16"),
    "1-D x": (changed(x=np.ones(5)), ValueError, r"expected 2D to 5D input \(got 1D input"),
    "6-D x": (changed(x=np.ones((2, 3, 2, 2, 2, 2))), ValueError,
              r"expected 2D to 5D input \(got 6D input"),
    "float64 weight": (lambda: float32_except("weight"), TypeError,
                       "weight has dtype float64 but the input has dtype float32"),
    "float64 bias": (lambda: float32_except("bias"), TypeError,
                     "bias has dtype float64 but the input has dtype float32"),
    "float64 running_mean": (lambda: float32_except("running_mean"), TypeError,
                             "running_mean has dtype float64 but the input has dtype float32"),
    "float64 running_var": (lambda: float32_except("running_var"), TypeError,
                            "running_var has dtype float64 but the input has dtype float32"),
    "weight length": (changed(weight=np.ones(4)), ValueError,
                      r"weight must have shape \(3,\) .*got shape \(4,\)"),
    "bias shape": (changed(bias=np.ones((3, 1))), ValueError,
                   r"bias must have shape \(3,\) .*got shape \(3, 1\)"),
    "running_mean length": (changed(running_mean=np.zeros(2)), ValueError,
                            r"running_mean must have shape \(3,\)"),
    "running_var length": (changed(running_var=np.ones(4)), ValueError,
                           r"running_var must have shape \(3,\)"),
    "int weight": (changed(weight=np.ones(3, np.int64)), TypeError,
                   "weight must be float32 or float64 like the input, got dtype int64"),
    "float16 running_var": (changed(running_var=np.ones(3, np.float16)), TypeError,
                            "running_var must be float32 or float64 .* got dtype float16"),
    "list running_mean": (changed(running_mean=[0.0, 0.0, 0.0]), TypeError,
                          "running_mean must be a NumPy array"),
    "read-only running_mean": (changed(running_mean=read_only), ValueError,
                               "running_mean is read-only, but training updates"),
    "read-only running_var": (changed(running_var=read_only), ValueError,
                              "running_var is read-only, but training updates"),
    "one value per channel 2-D": (changed(x=np.ones((1, 3))), ValueError,
                                  r"^Expected more than 1 value per channel when training, "
                                  r"got input size \(1, 3\)"),
    "one value per channel 4-D": (changed(x=np.ones((1, 3, 1, 1))), ValueError,
                                  "^Expected more than 1 value per channel when training"),
    "None eps": (changed(eps=None), TypeError, "eps must be a real number, got None"),
    "text eps": (changed(eps="small"), TypeError, "eps must be a real number, got 'small'"),
    "text momentum": (changed(momentum="fast"), TypeError, "momentum must be a real number"),
    "eval without running_mean": (changed(training=False, running_mean=None), ValueError,
                                  "^running_mean and running_var are needed when training=False"),
    "eval without running_var": (changed(training=False, running_var=None), ValueError,
                                 "^running_mean and running_var are needed when training=False"),
    "out shape": (changed(out=np.zeros((4, 3, 6))), ValueError,
                  r"out must have shape \(4, 3, 5\) and dtype float64, got shape \(4, 3, 6\)"),
    "out dtype": (changed(out=np.zeros((4, 3, 5), np.float32)), ValueError,
                  "out must have shape .* and dtype float64, got .* dtype float32"),
    "read-only out": (changed(out=read_only(np.zeros((4, 3, 5)))), ValueError, "out is read-only"),
    "list out": (changed(out=[0.0] * 60), TypeError, "out must be a NumPy array, got list"),
    "unknown backend": (changed(backend="cuda"), ValueError,
                        "unknown backend 'cuda'; expected one of cython, numba, numpy"),
}


def array_bytes(arguments):
    return {name: value.tobytes() for name, value in arguments.items()
            if isinstance(value, np.ndarray)}


@pytest.mark.parametrize("build, error, message", FORWARD_ERRORS.values(),
                         ids=FORWARD_ERRORS.keys())
def test_forward_rejects_bad_input(backend, build, error, message):
    arguments = {"backend": backend, **build()}
    before = array_bytes(arguments)  # running statistics and out included
    with pytest.raises(error, match=message):
        fastbn.batch_norm_forward(**arguments)
    assert array_bytes(arguments) == before


def valid_backward_arguments():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 5))
    return dict(grad_out=rng.standard_normal(x.shape), x=x, weight=rng.uniform(0.5, 1.5, 3),
                save_mean=rng.standard_normal(3), save_invstd=rng.uniform(0.5, 2, 3),
                training=True)


backward_changed = functools.partial(replaced, valid_backward_arguments)


BACKWARD_ERRORS = {
    "grad_out shape": (backward_changed(grad_out=np.ones((4, 3, 6))), ValueError,
                       r"grad_out must have the input's shape \(4, 3, 5\), got \(4, 3, 6\)"),
    "float32 grad_out": (backward_changed(grad_out=lambda g: g.astype(np.float32)), TypeError,
                         "grad_out has dtype float32 but the input has dtype float64"),
    "int grad_out": (backward_changed(grad_out=lambda g: g.astype(np.int32)), TypeError,
                     "grad_out must be a float32 or float64 array, got dtype int32"),
    "int x": (backward_changed(x=lambda x: x.astype(np.int64)), TypeError,
              "x must be a float32 or float64 array, got dtype int64"),
    "6-D x": (backward_changed(x=np.ones((2, 3, 2, 2, 2, 2)), grad_out=np.ones((2, 3, 2, 2, 2, 2))),
              ValueError, r"expected 2D to 5D input \(got 6D input"),
    "weight length": (backward_changed(weight=np.ones(2)), ValueError,
                      r"weight must have shape \(3,\)"),
    "float32 weight": (backward_changed(weight=lambda w: w.astype(np.float32)), TypeError,
                       "weight has dtype float32 but the input has dtype float64"),
    "no save_mean": (backward_changed(save_mean=None), ValueError,
                     "save_mean and save_invstd are needed"),
    "save_invstd length": (backward_changed(save_invstd=np.ones(4)), ValueError,
                           r"save_invstd must have shape \(3,\)"),
    "float32 save_mean": (backward_changed(save_mean=lambda m: m.astype(np.float32)), TypeError,
                          "save_mean has dtype float32 but the input has dtype float64"),
    "short output_mask": (backward_changed(output_mask=(True, False)), ValueError,
                          "output_mask must have 3 entries, got 2"),
    "no output_mask": (backward_changed(output_mask=None), TypeError,
                       "output_mask must be a sequence of 3 booleans, got None"),
    "text in output_mask": (backward_changed(output_mask=("yes", True, True)), TypeError,
                            "output_mask must be a sequence of 3 booleans"),
    "out shape": (backward_changed(out=np.zeros((4, 3))), ValueError,
                  r"out must have shape \(4, 3, 5\)"),
    "out dtype": (backward_changed(out=np.zeros((4, 3, 5), np.float32)), ValueError,
                  "out must have shape .* and dtype float64, got .* dtype float32"),
    "read-only out": (backward_changed(out=read_only(np.zeros((4, 3, 5)))), ValueError,
                      "out is read-only"),
    "unknown backend": (backward_changed(backend="gpu"), ValueError, "unknown backend 'gpu'"),
}


@pytest.mark.parametrize("build, error, message", BACKWARD_ERRORS.values(),
                         ids=BACKWARD_ERRORS.keys())
def test_backward_rejects_bad_input(backend, build, error, message):
    arguments = {"backend": backend, **build()}
    before = array_bytes(arguments)  # grad_out and out included
    with pytest.raises(error, match=message):
        fastbn.batch_norm_backward(**arguments)
    assert array_bytes(arguments) == before


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_read_only_inputs_are_accepted(backend, training):
    """Only the running statistics in training are written; everything else may be read-only
    (eval mode reads the running statistics, as torch does with frozen buffers)."""
    arguments = valid_forward_arguments()
    arguments["training"] = training
    for name in ("x", "weight", "bias") + (() if training else ("running_mean", "running_var")):
        arguments[name] = read_only(arguments[name])
    grad_out = read_only(np.random.default_rng(5).standard_normal(arguments["x"].shape))
    want = torch_forward_and_backward(*arguments.values(), grad_out)
    y, save_mean, save_invstd = fastbn.batch_norm_forward(**arguments, backend=backend)
    grads = fastbn.batch_norm_backward(grad_out, arguments["x"], arguments["weight"],
                                       read_only(save_mean), read_only(save_invstd), training,
                                       backend=backend)
    for name, value in zip(["y", "save_mean", "save_invstd", "grad_x", "grad_weight", "grad_bias"],
                           [y, save_mean, save_invstd, *grads]):
        np.testing.assert_allclose(value, want[name], **tolerance(np.float64), err_msg=name)


# ---------------------------------------------------------------------------
# 7. Empty input.

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0, 5), (0, 3)])
def test_empty_input(backend, shape, training, rng):
    weight, bias, running_mean, running_var = parameters(rng, 3, np.float32)
    x = np.zeros(shape, np.float32)
    rm, rv = running_mean.copy(), running_var.copy()
    y, save_mean, save_invstd = fastbn.batch_norm_forward(x, weight, bias, rm, rv, training,
                                                          backend=backend)
    assert y.shape == shape and y.dtype == np.float32
    assert rm.tobytes() == running_mean.tobytes() and rv.tobytes() == running_var.tobytes()

    # torch.nn.functional.batch_norm (native_batch_norm refuses empty input) and autograd.
    x_torch = torch.zeros(shape, requires_grad=True)
    weight_torch = torch.from_numpy(weight).requires_grad_()
    bias_torch = torch.from_numpy(bias).requires_grad_()
    rm_torch, rv_torch = as_tensor(running_mean), as_tensor(running_var)
    with torch_one_thread():
        y_torch = F.batch_norm(x_torch, rm_torch, rv_torch, weight_torch, bias_torch, training)
        y_torch.sum().backward()
    assert y_torch.shape == y.shape
    np.testing.assert_array_equal(rm, rm_torch.numpy())
    np.testing.assert_array_equal(rv, rv_torch.numpy())

    grad_x, grad_weight, grad_bias = fastbn.batch_norm_backward(
        np.ones(shape, np.float32), x, weight, save_mean, save_invstd, training, backend=backend)
    assert grad_x.shape == shape and grad_x.dtype == np.float32
    np.testing.assert_array_equal(grad_weight, weight_torch.grad.numpy())
    np.testing.assert_array_equal(grad_bias, bias_torch.grad.numpy())
    np.testing.assert_array_equal(grad_weight, np.zeros(3))
    np.testing.assert_array_equal(grad_bias, np.zeros(3))


# ---------------------------------------------------------------------------
# 8. NaN and inf propagate per channel as in PyTorch; var == 0 with eps == 0.

def input_with_nan_and_inf(rng, layout, dtype):
    """Channel 0: one NaN. 1: +inf as its first value (the Cython pivot). 2: +inf and -inf.
    3: clean."""
    a = rng.standard_normal((4, 4, 5, 3))
    a[1, 0, 2, 1] = np.nan
    a[0, 1, 0, 0] = np.inf
    a[2, 2, 1, 1] = np.inf
    a[3, 2, 0, 2] = -np.inf
    return arrange(a.astype(dtype), layout)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_and_inf_propagate_as_in_torch(backend, layout, training, dtype, rng):
    x = input_with_nan_and_inf(rng, layout, dtype)
    grad_out = rng.standard_normal(x.shape).astype(dtype)
    args = (x, *parameters(rng, 4, dtype), training, 0.1, 1e-5, grad_out)
    with np.errstate(invalid="ignore"):
        got = forward_and_backward(backend, *args)
        want = torch_forward_and_backward(*args)
    # assert_allclose also checks that NaN and +-inf sit at the same places.
    assert_results_close(got, want, dtype, "torch")
    clean = got["y"][:, 3]
    assert np.isfinite(clean).all()
    if training:
        assert np.isnan(got["save_mean"][[0, 2]]).all() and got["save_mean"][1] == np.inf
        assert np.isnan(got["save_invstd"][:3]).all()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_constant_channel_with_zero_eps(backend, layout, dtype, rng):
    x = make_input(rng, (3, 3, 4, 2), layout, dtype)
    x[:, 1] = 2.5  # exactly representable: the variance is exactly 0
    grad_out = rng.standard_normal(x.shape).astype(dtype)
    args = (x, *parameters(rng, 3, dtype), True, 0.1, 0.0, grad_out)
    got = forward_and_backward(backend, *args)
    assert_results_close(got, forward_and_backward("numpy", *args), dtype, "numpy backend")
    assert_results_close(got, torch_forward_and_backward(*args), dtype, "torch")
    assert got["save_invstd"][1] == 0  # as ATen: 0, not inf
    np.testing.assert_array_equal(got["y"][:, 1], np.broadcast_to(args[2][1], x[:, 1].shape))


# ---------------------------------------------------------------------------
# 9. out= buffers and output_mask.

def other_layout(a):
    """A zeroed array of a's shape in the other layout (C order <-> channels-last)."""
    layout = "contiguous" if memory_layout(a) == "channels_last" else "channels_last"
    return arrange(np.zeros_like(a), layout)


OUT_KINDS = ["same layout", "other layout", "strided", "in place"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_out(backend, layout, out_kind, training, rng):
    x = make_input(rng, (3, 4, 5, 6), layout, np.float32)
    weight, bias, running_mean, running_var = parameters(rng, 4, np.float32)
    expected = fastbn.batch_norm_forward(x, weight, bias, running_mean.copy(), running_var.copy(),
                                         training, backend=backend)
    out = {"same layout": np.empty_like(x), "other layout": other_layout(x),
           "strided": make_input(rng, x.shape, "strided", np.float32),
           "in place": x}[out_kind]
    assert out_kind != "same layout" or memory_layout(out) == memory_layout(x)
    got = fastbn.batch_norm_forward(x, weight, bias, running_mean.copy(), running_var.copy(),
                                    training, out=out, backend=backend)
    assert got[0] is out
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_out(backend, layout, out_kind, training, rng):
    x = make_input(rng, (3, 4, 5, 6), layout, np.float32)
    grad_out = make_input(rng, x.shape, layout, np.float32)
    weight, bias, running_mean, running_var = parameters(rng, 4, np.float32)
    _, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training, backend=backend)
    expected = fastbn.batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training,
                                          backend=backend)
    out = {"same layout": np.empty_like(x), "other layout": other_layout(x),
           "strided": make_input(rng, x.shape, "strided", np.float32),
           "in place": grad_out}[out_kind]
    got = fastbn.batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training,
                                     out=out, backend=backend)
    assert got[0] is out
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


MASKS = [(False, True, True), (True, False, False), (False, False, True), (False, True, False),
         (True, True, False), (False, False, False)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("output_mask", MASKS, ids=[str(m) for m in MASKS])
def test_output_mask_skips_outputs(backend, output_mask, training, rng):
    x = make_input(rng, (3, 4, 5, 6), "channels_last", np.float64)
    grad_out = rng.standard_normal(x.shape)
    weight, _, running_mean, running_var = parameters(rng, 4, np.float64)
    _, save_mean, save_invstd = fastbn.batch_norm_forward(
        x, weight, None, running_mean, running_var, training, backend=backend)
    full = fastbn.batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training,
                                      backend=backend)
    masked = fastbn.batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training,
                                        output_mask=output_mask, backend=backend)
    for wanted, got, complete in zip(output_mask, masked, full):
        if wanted:
            np.testing.assert_array_equal(got, complete)
        else:
            assert got is None
