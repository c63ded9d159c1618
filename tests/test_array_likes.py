"""What the NumPy API takes as arrays (docs/ops.md, "Arrays"): NumPy arrays and other
array_likes (lists, ...) for every array argument of every op, forward and backward, but
no torch tensor, which gets a TypeError that points to fastbn.nn.functional."""
import numpy as np
import pytest

import fastbn

N, C, H, W = 2, 4, 3, 5
GROUPS = 2
# Running statistics are updated in place, and `out` is written: NumPy arrays only.
WRITTEN = ("running_mean", "running_var", "out")


def calls(rng):
    """op -> (function, positional argument names, {name: value}), float64, each array
    argument a NumPy array; the statistics come from the forward."""
    x = rng.standard_normal((N, C, H, W))
    grad_out = rng.standard_normal(x.shape)
    weight, bias = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rows, D = x.reshape(N * C, H * W), H * W
    _, save_mean, save_invstd = fastbn.batch_norm_forward(x, training=True)
    _, group_mean, group_rstd = fastbn.group_norm_forward(x, GROUPS)
    _, instance_mean, instance_rstd = fastbn.instance_norm_forward(x)
    _, row_mean, row_rstd = fastbn.layer_norm_forward(rows, D)
    _, rms_rstd = fastbn.rms_norm_forward(rows, D)
    running = dict(running_mean=np.zeros(C), running_var=np.ones(C))
    return {
        "batch_norm_forward": (fastbn.batch_norm_forward,
                               ["x", "weight", "bias", "running_mean", "running_var"],
                               dict(x=x, weight=weight, bias=bias, **running, training=True,
                                    out=np.empty_like(x))),
        "batch_norm_backward": (fastbn.batch_norm_backward,
                                ["grad_out", "x", "weight", "save_mean", "save_invstd"],
                                dict(grad_out=grad_out, x=x, weight=weight, save_mean=save_mean,
                                     save_invstd=save_invstd, training=True,
                                     out=np.empty_like(x))),
        "group_norm_forward": (fastbn.group_norm_forward, ["x", "num_groups", "weight", "bias"],
                               dict(x=x, num_groups=GROUPS, weight=weight, bias=bias,
                                    out=np.empty_like(x))),
        "group_norm_backward": (fastbn.group_norm_backward,
                                ["grad_out", "x", "mean", "rstd", "weight", "num_groups"],
                                dict(grad_out=grad_out, x=x, mean=group_mean, rstd=group_rstd,
                                     weight=weight, num_groups=GROUPS, out=np.empty_like(x))),
        "instance_norm_forward": (fastbn.instance_norm_forward,
                                  ["x", "weight", "bias", "running_mean", "running_var"],
                                  dict(x=x, weight=weight, bias=bias, **running,
                                       out=np.empty_like(x))),
        "instance_norm_backward": (fastbn.instance_norm_backward,
                                   ["grad_out", "x", "mean", "rstd", "weight"],
                                   dict(grad_out=grad_out, x=x, mean=instance_mean,
                                        rstd=instance_rstd, weight=weight,
                                        out=np.empty_like(x))),
        "layer_norm_forward": (fastbn.layer_norm_forward,
                               ["x", "normalized_shape", "weight", "bias"],
                               dict(x=rows, normalized_shape=D, weight=rng.standard_normal(D),
                                    bias=rng.standard_normal(D), out=np.empty_like(rows))),
        "layer_norm_backward": (fastbn.layer_norm_backward,
                                ["grad_out", "x", "normalized_shape", "mean", "rstd", "weight",
                                 "bias"],
                                dict(grad_out=grad_out.reshape(rows.shape), x=rows,
                                     normalized_shape=D, mean=row_mean, rstd=row_rstd,
                                     weight=rng.standard_normal(D), bias=rng.standard_normal(D),
                                     out=np.empty_like(rows))),
        "rms_norm_forward": (fastbn.rms_norm_forward, ["x", "normalized_shape", "weight"],
                             dict(x=rows, normalized_shape=D, weight=rng.standard_normal(D),
                                  out=np.empty_like(rows))),
        "rms_norm_backward": (fastbn.rms_norm_backward,
                              ["grad_out", "x", "normalized_shape", "rstd", "weight"],
                              dict(grad_out=grad_out.reshape(rows.shape), x=rows,
                                   normalized_shape=D, rstd=rms_rstd,
                                   weight=rng.standard_normal(D), out=np.empty_like(rows))),
    }


def array_arguments(arguments):
    return [name for name, value in arguments.items() if isinstance(value, np.ndarray)]


def call(function, positional, arguments, backend):
    arguments = {name: value.copy() if isinstance(value, np.ndarray) else value
                 for name, value in arguments.items()}  # fresh running statistics and out
    args = [arguments.pop(name) for name in positional]
    return function(*args, **arguments, backend=backend)


def results(output):
    return [np.asarray(a) for a in (output if isinstance(output, tuple) else (output,))
            if a is not None]


CASES = [(op, name) for op, (_, _, arguments) in calls(np.random.default_rng(0)).items()
         for name in array_arguments(arguments)]


@pytest.mark.parametrize("op, name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_a_torch_tensor_is_a_type_error_that_points_to_fastbn_nn(op, name, backend):
    torch = pytest.importorskip("torch")
    function, positional, arguments = calls(np.random.default_rng(0))[op]
    for requires_grad in (False, True):
        tensor = torch.from_numpy(arguments[name].copy()).requires_grad_(requires_grad)
        with pytest.raises(TypeError, match=rf"^{name} is a torch.Tensor: fastbn's NumPy API "
                                            r"takes NumPy arrays .* use fastbn.nn.functional"):
            call(function, positional, dict(arguments, **{name: tensor}), backend)


@pytest.mark.parametrize("op, name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_other_array_likes_are_taken_as_numpy_takes_them(op, name, backend):
    """A list gives the result of the array; arrays written to must be NumPy arrays."""
    function, positional, arguments = calls(np.random.default_rng(0))[op]
    as_list = dict(arguments, **{name: arguments[name].tolist()})
    if name in WRITTEN:
        with pytest.raises(TypeError, match=rf"^{name} must be a NumPy array"):
            call(function, positional, as_list, backend)
        return
    expected = results(call(function, positional, arguments, backend))
    for got, want in zip(results(call(function, positional, as_list, backend)), expected,
                         strict=True):
        np.testing.assert_array_equal(got, want)
