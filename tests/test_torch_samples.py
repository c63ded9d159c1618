"""fastbn.nn against PyTorch's own definition of its modules: the installed torch's
constructor arguments, and PyTorch's `module_db` samples
(torch.testing._internal.common_modules, what PyTorch tests these modules with) through
every backend and the default routing, also on channels-last and batch-of-one input."""
import inspect
import re

import pytest
import torch
from torch import nn

import fastbn
from fastbn.nn import modules
from fastbn.nn.convert import FASTBN_CLASS
from conftest import BACKENDS

# Every class of fastbn.nn.modules that stands in for the torch.nn class of its name.
DROP_INS = [cls for name, cls in sorted(vars(modules).items())
            if isinstance(cls, type) and issubclass(cls, modules.FastbnNorm)
            and issubclass(cls, nn.Module) and getattr(nn, name, None) in cls.__mro__]
BACKEND = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None)
# Values for the constructor arguments that have no default.
REQUIRED_ARGUMENTS = {"num_features": 6, "num_groups": 2, "num_channels": 6,
                      "normalized_shape": (6,)}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# float32: parameter gradients sum over every sample, and torch's rounding shows.
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4),
              torch.float64: dict(rtol=1e-10, atol=1e-12)}


def test_every_mirrored_torch_module_has_a_drop_in():
    assert set(DROP_INS) >= set(FASTBN_CLASS.values())


@pytest.mark.parametrize("fastbn_class", DROP_INS, ids=lambda cls: cls.__name__)
def test_constructor_takes_torchs_arguments_and_backend(fastbn_class):
    """The signature is the installed torch's plus a keyword-only backend, and each of
    torch's arguments, given by keyword, builds the module torch builds."""
    torch_class = getattr(nn, fastbn_class.__name__)
    torch_parameters = list(inspect.signature(torch_class).parameters.values())
    assert list(inspect.signature(fastbn_class).parameters.values()) == (
        torch_parameters + [BACKEND])

    required = {p.name: REQUIRED_ARGUMENTS[p.name] for p in torch_parameters
                if p.default is inspect.Parameter.empty}
    variants = [{}]
    for parameter in torch_parameters:  # each switch flipped alone: affine, bias, ...
        if isinstance(parameter.default, bool):
            variants.append({parameter.name: not parameter.default})
    variants.append({p.name: p.default for p in torch_parameters if p.name not in required})
    for variant in variants:
        kwargs = dict(required, **variant)
        module = fastbn_class(**kwargs, backend="numpy")
        reference = torch_class(**kwargs)
        assert module.backend == "numpy"
        assert {k: v.shape for k, v in module.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()}, kwargs
        assert repr(module) == repr(reference)[:-1] + ", backend='numpy')"


def test_an_argument_torch_lacks_fails_with_torchs_error_and_the_torch_version():
    version = re.escape(torch.__version__)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'momentum'.*installed "
                                        rf"torch {version}'s GroupNorm: \(num_groups"):
        fastbn.nn.GroupNorm(2, 6, momentum=0.1)
    with pytest.raises(TypeError, match="positional"):
        fastbn.nn.BatchNorm2d(6, backend=None, *(0.1,) * 8)


class BatchNorm2dBeforeBias(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d with the constructor of a torch without ``bias=`` (2.11 here)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)


def test_the_constructor_follows_the_torch_it_subclasses():
    """fastbn.nn's classes take their arguments from their torch class, so on a torch
    without ``bias=`` they build without it and reject it with a message that says why."""

    class BatchNorm2d(modules._BatchNorm, BatchNorm2dBeforeBias):
        pass

    parameters = inspect.signature(BatchNorm2d).parameters
    assert "bias" not in parameters and parameters["backend"] == BACKEND
    assert list(parameters)[:7] == ["num_features", "eps", "momentum", "affine",
                                    "track_running_stats", "device", "dtype"]
    module = BatchNorm2d(4, 1e-3, momentum=0.3, backend="numpy")
    reference = nn.BatchNorm2d(4, 1e-3, momentum=0.3)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(module(x), reference(x))
    torch.testing.assert_close(module.running_var, reference.running_var)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'bias' \(fastbn.nn."
                                        r"BatchNorm2d takes the arguments of the installed"):
        BatchNorm2d(4, bias=False)


# PyTorch's samples ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def module_infos():
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest "
                                             "(pip install '.[test]')")
    from torch.testing._internal.common_modules import module_db

    threads = torch.get_num_threads()
    yield module_db
    torch.set_num_threads(threads)


def randomise(module, generator):
    """Random parameters and running statistics (positive variances), the same for every
    module that loads this one's state dict."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
                tensor.copy_(values + 0.5 if name.endswith("var") else values * 2 - 1)


def layouts(x, batched):
    """(name, input for fastbn, the same values for torch): the sample as given; for
    batched 4-D and 5-D input also channels-last, and its first sample alone as a
    channels-last view (a batch stride other than C x spatial, where torch's own kernels
    go wrong)."""
    yield "as given", x, x
    memory_format = CHANNELS_LAST.get(x.dim())
    if memory_format is not None and batched and x.shape[0] > 0:
        channels_last = x.to(memory_format=memory_format)
        yield "channels-last", channels_last, x
        yield "one channels-last sample", channels_last[0].unsqueeze(0), x[:1].contiguous()


def run(module, x, grad_out):
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad_out)
    return ([y, x.grad] + [p.grad for p in module.parameters()]
            + [b for b in module.buffers()])


def check_sample(torch_class, fastbn_class, sample, training, backend, dtype):
    """Raise AssertionError unless fastbn's module matches torch's on the sample, in
    each layout of `layouts` (torch's always runs on contiguous input)."""
    # The samples are tiny: on a busy 2-core machine torch's 2-thread regions waited
    # 10 ms per call for a core. Set on every sample: a numba kernel call sets the
    # calling thread's OpenMP count (which torch's follows) back to numba's.
    torch.set_num_threads(1)
    constructor = sample.constructor_input
    (x,) = sample.forward_input.args
    generator = torch.Generator().manual_seed(0)
    # InstanceNorm also takes input without the batch dim: (C, *spatial).
    probe = torch_class(*constructor.args, **constructor.kwargs)
    batched = not hasattr(probe, "_get_no_batch_dim") or x.dim() != probe._get_no_batch_dim()
    for name, fastbn_x, torch_x in layouts(x, batched):
        reference = torch_class(*constructor.args, **constructor.kwargs).to(dtype)
        randomise(reference, generator)
        module = fastbn_class(*constructor.args, **constructor.kwargs, backend=backend).to(dtype)
        module.load_state_dict(reference.state_dict())
        reference.train(training)
        module.train(training)
        grad_out = torch.randn(torch_x.shape, generator=generator, dtype=torch.float64).to(dtype)
        expected = run(reference, torch_x, grad_out)
        memory_format = CHANNELS_LAST.get(x.dim()) if name != "as given" else None
        got = run(module, fastbn_x, grad_out if memory_format is None else
                  grad_out.to(memory_format=memory_format))
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            torch.testing.assert_close(
                a, b, **TOLERANCES[dtype],
                msg=lambda m: f"{name} input, output {index} (y, grad x, parameter grads, "
                              f"buffers): {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS + [None], ids=lambda b: b or "default")
@pytest.mark.parametrize("torch_class", list(FASTBN_CLASS), ids=lambda cls: cls.__name__)
def test_pytorch_module_samples(module_infos, torch_class, backend, dtype):
    """Every sample PyTorch's module tests use for `torch_class`, training and eval:
    fastbn's module gives torch's output, gradients and buffers."""
    infos = [info for info in module_infos if info.module_cls is torch_class]
    assert infos, f"torch has no module_db entry for {torch_class.__name__}"
    failures, count = [], 0
    for info in infos:
        for training in (True, False):
            samples = info.module_inputs_func(info, device="cpu", dtype=dtype,
                                              requires_grad=True, training=training)
            for sample in samples:
                count += 1
                try:
                    check_sample(torch_class, FASTBN_CLASS[torch_class], sample, training,
                                 backend, dtype)
                except AssertionError as error:
                    failures.append(f"{sample.desc or 'default'} (training={training}): "
                                    f"{error}")
    assert count >= 6
    assert not failures, f"{len(failures)} of {count} samples differ:\n" + "\n".join(failures)
