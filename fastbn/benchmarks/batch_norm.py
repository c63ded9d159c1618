"""BatchNorm benchmark cases: the inputs, the implementations compared, the bytes moved.

Two modes are timed:

- ``"training"``: forward with batch statistics (running statistics updated in
  place, as a training step does), then backward with all three gradients.
- ``"eval"``: forward with the running statistics.

Every implementation is a callable with no arguments over inputs made once, so
a timed call does no conversion: torch's tensors are ``torch.from_numpy`` views
of the very arrays fastbn reads.
"""
import copy

import numpy as np

import fastbn
from fastbn import _layout
from fastbn._backends import load_backend

MODES = ("training", "eval")
MOMENTUM = 0.1
EPS = 1e-5
REFERENCE_BACKEND = "numpy"

# Agreement with torch required before anything is timed (both sides accumulate
# in float64 or better, but torch rounds some intermediates to float32).
# Relative, and absolute times each output's largest value (see assert_outputs_match):
# grad_weight sums dy * x_hat over every sample, and a channel whose terms cancel has
# float32 rounding of the order of the largest terms, in torch's result as in fastbn's
# (8x64x56x56 channels-last: 0.7775 against torch's 0.7777 among values up to 338).
TOLERANCES = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
OUTPUT_NAMES = {
    "training": ("y", "save_mean", "save_invstd", "grad_x", "grad_weight", "grad_bias"),
    "eval": ("y",),
}


def bytes_moved(x_nbytes, mode):
    """Bytes an ideal kernel must read plus write: the bandwidth-floor convention.

    - training (forward + backward): the forward reads x once and writes y
      (2 x nbytes); the backward reads x and grad_out and writes grad_x
      (3 x nbytes): 5 x nbytes, the traffic of a copy of 2.5 x nbytes.
    - eval forward: reads x, writes y: 2 x nbytes, the traffic of a copy of x.

    Per-channel vectors are negligible and not counted. The floor assumes the
    statistics come from the single read of x: a forward that reads x twice
    (statistics, then normalize) moves 6 x nbytes in training, so 1.2 x the
    floor is its best.

    Parameters
    ----------
    x_nbytes : int
        Bytes of the input x.
    mode : {"training", "eval"}
    """
    return {"training": 5, "eval": 2}[mode] * x_nbytes


def backends(include_reference=True):
    """The available fastbn backends that have BatchNorm kernels, fastest first.

    Parameters
    ----------
    include_reference : bool
        Include the NumPy reference (float64 inside: a correctness oracle, slow).
    """
    names = []
    for name in fastbn.available_backends():
        if name == REFERENCE_BACKEND and not include_reference:
            continue
        kernels = load_backend(name)
        if hasattr(kernels, "batch_norm_forward") and hasattr(kernels, "batch_norm_backward"):
            names.append(name)
    return names


def _torch_step(x, grad_out, weight, bias, running_mean, running_var, training):
    # One module-level function, so torch.compile sees the same code as eager.
    import torch

    y, save_mean, save_invstd = torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, training, MOMENTUM, EPS)
    if not training:
        return (y,)
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, weight, running_mean, running_var, save_mean, save_invstd, True, EPS,
        [True, True, True])
    return y, save_mean, save_invstd, grad_x, grad_weight, grad_bias


class CaseArrays:
    """What every benchmark case shares: arrays laid out as the case says, and
    the input's size (subclasses set shape, dtype, channels_last and x)."""

    def _array(self, values):
        array, _ = _layout.empty_like_layout(self.shape, self.dtype, self.channels_last)
        array[...] = values
        return array

    @property
    def nbytes(self):
        return self.x.nbytes

    def expected(self, mode):
        """What a fastbn step must return in `mode`: torch's (its aten ops get x and
        grad_out in one layout, where they are right)."""
        return self.torch_step(mode)()

    def converted(self, dtype, channels_last=False):
        """A copy of this case with every array in `dtype` and the layout asked for: the
        same values (rounded once where `dtype` is the narrower)."""
        case = copy.copy(self)
        case.dtype, case.channels_last = np.dtype(dtype), bool(channels_last)
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray):
                setattr(case, name, case._array(value) if value.shape == self.shape
                        else value.astype(case.dtype))
        return case


class BatchNormCase(CaseArrays):
    """One benchmark input: x, grad_out and the per-channel vectors, made once.

    Parameters
    ----------
    shape : tuple of int
        (N, C, *spatial).
    dtype : str or dtype
    channels_last : bool
        Lay x and grad_out out with the channels as the fastest axis.
    seed : int
    """

    def __init__(self, shape, dtype="float32", channels_last=False, seed=0):
        rng = np.random.default_rng(seed)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.channels_last = bool(channels_last)
        channels = self.shape[1]
        self.x = self._array(rng.standard_normal(self.shape) * 2.0 + 0.5)
        self.grad_out = self._array(rng.standard_normal(self.shape))
        self.weight = rng.uniform(0.5, 1.5, channels).astype(self.dtype)
        self.bias = rng.standard_normal(channels).astype(self.dtype)
        self.running_mean = rng.standard_normal(channels).astype(self.dtype)
        self.running_var = rng.uniform(0.5, 2.0, channels).astype(self.dtype)

    def fastbn_step(self, backend, mode):
        """A callable running fastbn's `mode` with `backend`; returns the outputs."""
        x, grad_out, weight, bias = self.x, self.grad_out, self.weight, self.bias
        running_mean, running_var = self.running_mean.copy(), self.running_var.copy()
        training = mode == "training"

        def step():
            y, save_mean, save_invstd = fastbn.batch_norm_forward(
                x, weight, bias, running_mean, running_var, training, MOMENTUM, EPS,
                backend=backend)
            if not training:
                return (y,)
            grad_x, grad_weight, grad_bias = fastbn.batch_norm_backward(
                grad_out, x, weight, save_mean, save_invstd, True, backend=backend)
            return y, save_mean, save_invstd, grad_x, grad_weight, grad_bias

        return step

    def torch_step(self, mode, compiled=False):
        """A callable running torch's `mode` (aten ops, no autograd); returns tensors.

        compiled=True runs it through ``torch.compile`` (Inductor's generated
        kernels); the first call compiles, so warm up before timing.
        """
        import torch

        to_torch = torch.from_numpy  # shares the arrays' memory and strides: no copy
        args = (to_torch(self.x), to_torch(self.grad_out), to_torch(self.weight),
                to_torch(self.bias), to_torch(self.running_mean.copy()),
                to_torch(self.running_var.copy()), mode == "training")
        function = _torch_step
        if compiled:
            # Forget earlier cases' graphs: past dynamo's recompile limit the same
            # code would silently fall back to eager.
            torch._dynamo.reset()
            function = torch.compile(_torch_step, dynamic=False)

        def step():
            return function(*args)

        return step

    def check(self, outputs, expected, mode, label=""):
        """Assert that `outputs` (arrays or tensors) match `expected` ones within tolerance."""
        assert_outputs_match(
            outputs, expected, TOLERANCES[self.dtype], f"{label} {mode}",
            f"(shape {self.shape}, {self.dtype}, channels_last={self.channels_last})",
            OUTPUT_NAMES[mode])


def assert_outputs_match(outputs, expected, tolerance, label, details="", names=None):
    """Assert that every output (array or tensor) matches the expected one.

    The relative tolerance is `tolerance`, and so is the absolute one times the
    output's largest value: parameter gradients sum over every sample.

    Parameters
    ----------
    outputs, expected : sequence of arrays or tensors
    tolerance : float
    label, details : str
        The message says "<label> <name> differs from torch's <details>".
    names : sequence of str, optional
        The outputs' names (default: "output <i>").
    """
    assert len(outputs) == len(expected), (
        f"{label}: {len(outputs)} outputs, expected {len(expected)}")
    names = names or [f"output {index}" for index in range(len(outputs))]
    for name, got, want in zip(names, outputs, expected):
        got = np.asarray(got.detach() if hasattr(got, "detach") else got)
        want = np.asarray(want.detach() if hasattr(want, "detach") else want)
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(
            got, want, rtol=tolerance, atol=tolerance * scale,
            err_msg=f"{label} {name} differs from torch's {details}")
