"""PyTorch's own test samples for the normalization functionals (the OpInfo entries of
torch.testing._internal.common_methods_invocations.op_db), run through fastbn.nn.functional
with every backend named: each sample input gives torch's output, running statistics and
gradients, and each error input raises torch's error."""
import pytest
import torch

import fastbn.nn as fnn

# torch's test utilities import expecttest (in fastbn's `test` extra).
pytest.importorskip("expecttest")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

FUNCTIONALS = {
    "nn.functional.batch_norm": fnn.functional.batch_norm,
    "nn.functional.group_norm": fnn.functional.group_norm,
    "nn.functional.instance_norm": fnn.functional.instance_norm,
    "nn.functional.layer_norm": fnn.functional.layer_norm,
    "nn.functional.rms_norm": fnn.functional.rms_norm,
}
# The plain variant of each (batch_norm's "without_cudnn" runs the same samples).
OPINFOS = {op.name: op for op in op_db if op.name in FUNCTIONALS and not op.variant_test_name}
assert OPINFOS.keys() == FUNCTIONALS.keys()
DTYPES = [torch.float32, torch.float64]
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: {}}
# Gradients of rows or groups of one value cancel to 0 from terms the size of
# rstd = 1 / sqrt(eps) = 316: float32 leaves 1e-5 there (torch's own: 1e-4).
GRAD_TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: {}}


def copies(sample, dtype=None):
    """(input, args, kwargs) of a sample, every tensor a fresh copy (of `dtype` if given) with
    its requires_grad: torch and fastbn each get their own (batch_norm updates running
    statistics in place)."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to(dtype, copy=True).requires_grad_(value.requires_grad)
        return value
    return (copy(sample.input), [copy(a) for a in sample.args],
            {key: copy(value) for key, value in sample.kwargs.items()})


def tensors(input, args, kwargs):
    return [t for t in [input, *args, *kwargs.values()] if isinstance(t, torch.Tensor)]


@pytest.fixture(autouse=True)
def torch_on_one_thread():
    """torch's ops on tiny tensors stall for milliseconds in parallel regions on a busy
    machine; one thread keeps this file at a few seconds. Restored afterwards (torch's
    count also caps fastbn's: they share the OpenMP runtime)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPINFOS)
def test_opinfo_samples(backend, name, dtype):
    opinfo, functional = OPINFOS[name], FUNCTIONALS[name]
    samples = list(opinfo.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples
    tolerance = TOLERANCES[dtype]
    for index, sample in enumerate(samples):
        def message(error, index=index, sample=sample):  # built only on failure
            return f"sample {index}: {sample}\n{error}"
        # The oracle is torch's op in float64: torch's float32 rounding is no reference
        # (on a one-value row its grad_input is 1e-4 where the exact one is 0).
        theirs, ours = copies(sample, torch.float64), copies(sample)
        expected = opinfo.op(theirs[0], *theirs[1], **theirs[2])
        got = functional(ours[0], *ours[1], backend=backend, **ours[2]).double()
        torch.testing.assert_close(got, expected, equal_nan=True, msg=message, **tolerance)
        # Running statistics updated in place, as torch's.
        for mine, torchs in zip(tensors(*ours), tensors(*theirs)):
            torch.testing.assert_close(mine.detach().double(), torchs.detach(), equal_nan=True,
                                       msg=message, **tolerance)
        wanted = [(m, t) for m, t in zip(tensors(*ours), tensors(*theirs)) if t.requires_grad]
        if not expected.requires_grad or not wanted or expected.numel() == 0:
            continue
        grad_y = torch.randn(expected.shape, dtype=dtype,
                             generator=torch.Generator().manual_seed(index)).double()
        grads = torch.autograd.grad(got, [m for m, _ in wanted], grad_y, allow_unused=True)
        expected_grads = torch.autograd.grad(expected, [t for _, t in wanted], grad_y,
                                             allow_unused=True)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.double(), expected_grad, equal_nan=True, msg=message,
                                       **GRAD_TOLERANCES[dtype])


ERROR_OPINFOS = [name for name, op in OPINFOS.items() if op.error_inputs_func is not None]


@pytest.mark.parametrize("name", ERROR_OPINFOS)
def test_opinfo_error_inputs(backend, name):
    opinfo, functional = OPINFOS[name], FUNCTIONALS[name]
    error_inputs = list(opinfo.error_inputs("cpu"))
    assert error_inputs
    for error_input in error_inputs:
        sample = error_input.sample_input
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            functional(sample.input, *sample.args, backend=backend, **sample.kwargs)
