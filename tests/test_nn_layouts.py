"""fastbn.nn where torch's own CPU ops are wrong: a batch of one in channels-last memory
(found by bench/torch_layout_bugs.py; docs/nn.md, "Where torch is wrong").

fastbn's kernels, fastbn.nn's default routing and its double backward are compared with
torch's result on contiguous float64 memory, which torch gets right."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastbn.nn as fnn
from conftest import BACKENDS
from fastbn.benchmarks.torch_layouts import laid_out
from fastbn.nn.functional import torch_is_wrong

LAYOUTS = ("contiguous", "channels_last", "channels_last_view")
SHAPES = [(1, 6, 3, 5), (1, 4, 2, 3, 2)]


def ops(f, **backend):
    """name -> (call(input, weight, bias, running_mean, running_var) of namespace `f`,
    passing `backend` on to fastbn.nn.functional)."""
    return {
        "batch_norm_training": lambda x, w, b, rm, rv: f.batch_norm(x, rm, rv, w, b, True,
                                                                    **backend),
        "batch_norm_eval": lambda x, w, b, rm, rv: f.batch_norm(x, rm, rv, w, b, False,
                                                                **backend),
        "instance_norm": lambda x, w, b, rm, rv: f.instance_norm(x, None, None, w, b,
                                                                 **backend),
        "instance_norm_running_stats": lambda x, w, b, rm, rv: f.instance_norm(
            x, rm, rv, w, b, use_input_stats=False, **backend),
        "group_norm": lambda x, w, b, rm, rv: f.group_norm(x, 2, w, b, **backend),
    }


def step(call, x, grad_out, parameters, create_graph=False):
    """y, the gradients of x, weight and bias, and the running statistics after the call.
    create_graph: the gradients of a penalty on grad x instead (double backward), for x
    and the weight (grad x does not depend on the bias)."""
    weight, bias, running_mean, running_var = [p.clone() for p in parameters]
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = call(x, weight, bias, running_mean, running_var)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_out, create_graph=create_graph)
    if create_graph:
        grads = torch.autograd.grad((grads[0] ** 2).sum(), (x, weight),
                                    materialize_grads=True)  # eval: grad x ignores x
    return (y,) + grads + (running_mean, running_var)


def parameters(channels, generator):
    return (torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5,
            torch.randn(channels, generator=generator, dtype=torch.float64),
            torch.randn(channels, generator=generator, dtype=torch.float64),
            torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)


@pytest.mark.parametrize("op", list(ops(F)))
@pytest.mark.parametrize("backend", BACKENDS + [None], ids=lambda b: b or "default")
def test_batch_of_one_in_any_layout_gives_the_contiguous_result(op, backend):
    """Input and output gradient each contiguous, channels-last or a channels-last view
    with another batch stride: fastbn.nn (each backend, and the default routing, which
    must not hand these to torch's op) gives torch's contiguous float64 numbers."""
    generator = torch.Generator().manual_seed(0)
    call = ops(F)[op]
    fastbn_call = ops(fnn.functional, **({"backend": backend} if backend else {}))[op]
    for shape in SHAPES:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
        grad_out = torch.randn(shape, generator=generator, dtype=torch.float64)
        values = parameters(shape[1], generator)
        expected = step(call, x, grad_out, values)
        for x_layout, dy_layout in itertools.product(LAYOUTS, repeat=2):
            got = step(fastbn_call, laid_out(x, x_layout), laid_out(grad_out, dy_layout),
                       values)
            for index, (a, b) in enumerate(zip(got, expected, strict=True)):
                torch.testing.assert_close(
                    a, b, rtol=1e-10, atol=1e-10,
                    msg=lambda m: f"{shape}, x {x_layout}, grad {dy_layout}, output {index} "
                                  f"(y, grads of x, weight, bias, running stats): {m}")


def test_instance_norm_2d_channels_last_batch_of_one_trains_right():
    """The case that made bench/test_nn.py fail: InstanceNorm2d(affine=True) training on
    channels-last input with N = 1, default routing, against torch on contiguous float64."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 7, 7, generator=generator) * 2 + 1
    grad_out = torch.randn(x.shape, generator=generator)
    module = fnn.InstanceNorm2d(16, affine=True)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(generator=generator)
    reference = torch.nn.InstanceNorm2d(16, affine=True, dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    results = []
    for layer, memory_format, dtype in ((module, torch.channels_last, torch.float32),
                                        (reference, torch.contiguous_format, torch.float64)):
        x_in = x.to(dtype=dtype, memory_format=memory_format).requires_grad_()
        y = layer(x_in)
        y.backward(grad_out.to(dtype=dtype, memory_format=memory_format))
        results.append([y, x_in.grad, layer.weight.grad, layer.bias.grad])
    # torch's own channels-last result was off by more than 1 in each gradient.
    for got, expected in zip(*results):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["batch_norm_training", "batch_norm_eval", "instance_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_on_a_batch_of_one_channels_last(op, backend):
    """create_graph=True runs torch's ops for the gradients of the gradients: given
    contiguous operands, so that torch's batch-norm backward does not misread them."""
    generator = torch.Generator().manual_seed(2)
    call, fastbn_call = ops(F)[op], ops(fnn.functional, backend=backend)[op]
    x = torch.randn(1, 6, 3, 5, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    values = parameters(6, generator)
    expected = step(call, x, grad_out, values, create_graph=True)
    for dy_layout in LAYOUTS:
        got = step(fastbn_call, x, laid_out(grad_out, dy_layout), values, create_graph=True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_torch_is_wrong_for_recorded_batch_norm_and_instance_norm_with_one_sample():
    """The rule of docs/nn.md: batch norm and instance norm through autograd, N = 1, 4-D
    or 5-D input with more than one spatial value; nothing else."""
    def wrong(op, shape, record=True):
        return torch_is_wrong(op, torch.empty(shape), record)

    for op in ("batch_norm", "instance_norm"):
        assert wrong(op, (1, 8, 4, 4)) and wrong(op, (1, 8, 2, 1, 3)) and wrong(op, (1, 3, 1, 2))
        assert not wrong(op, (1, 8, 4, 4), record=False)  # no backward: the forward is right
        assert not wrong(op, (2, 8, 4, 4)) and not wrong(op, (1, 8, 1, 1))
        assert not wrong(op, (1, 8, 5)) and not wrong(op, (1, 8))  # no channels-last format
    for op in ("group_norm", "layer_norm", "rms_norm"):
        assert not wrong(op, (1, 8, 4, 4))
