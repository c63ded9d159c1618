"""The activations a BatchNorm can apply in its own passes (fused BatchNorm + activation).

One table that the public functions, every backend, the torch glue, the tests and the
benchmarks share: each activation's name, the integer code the kernels switch on, and
its float64 reference (value and derivative), written as torch defines them.

The backward of a fused layer gets dL/dy for y = act(z), z the BatchNorm output. It
recomputes z from x and the saved statistics (z = (x - mean) * invstd * weight + bias),
so that nothing but x has to be kept for it, and multiplies dL/dy by act'(z) before the
BatchNorm backward proper. Where torch's derivative is defined by a comparison, the
comparison is torch's (e.g. ReLU6 passes the gradient where 0 < z < 6, strictly).
"""
import numpy as np

# name -> code. The kernels switch on the code; 0 is "no activation".
ACTIVATION_CODES = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4,
                    "leaky_relu": 5}
ACTIVATIONS = tuple(ACTIVATION_CODES)
DEFAULT_NEGATIVE_SLOPE = 0.01  # torch.nn.LeakyReLU's


def activation_code(activation):
    """The kernels' code of `activation` (a name, or None for none); raises on others."""
    if activation is None:
        return 0
    code = ACTIVATION_CODES.get(activation) if isinstance(activation, str) else None
    if code is None:
        raise ValueError(f"unknown activation {activation!r}; expected None or one of "
                         f"{', '.join(ACTIVATIONS)}")
    return code


def check_negative_slope(negative_slope):
    try:
        return float(negative_slope)
    except (TypeError, ValueError):
        raise TypeError(f"negative_slope must be a real number, got {negative_slope!r}") from None


def apply(code, z, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """act(z) for an array z (float64 reference; returns a new array)."""
    if code == 0:
        return z.copy()
    if code == 1:
        return np.maximum(z, 0.0)
    if code == 2:
        return np.minimum(np.maximum(z, 0.0), 6.0)
    if code == 3:
        return z / (1.0 + np.exp(-z))
    if code == 4:
        return z * np.minimum(np.maximum(z + 3.0, 0.0), 6.0) / 6.0
    if code == 5:
        return np.where(z > 0, z, z * negative_slope)
    raise ValueError(f"unknown activation code {code}")


def derivative(code, z, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """act'(z) as torch's backward uses it (float64 reference; a new array), with the
    comparisons of torch's vectorised CPU kernels, so that NaN and inf get torch's
    gradients: relu passes a NaN's gradient (0 only where z <= 0), relu6 stops it (1 only
    where 0 < z < 6), hardswish makes it NaN (z / 3 + 0.5 unless z < -3 or z >= 3)."""
    if code == 0:
        return np.ones_like(z)
    if code == 1:
        return (~(z <= 0)).astype(z.dtype)
    if code == 2:
        return ((z > 0) & (z < 6)).astype(z.dtype)
    if code == 3:
        sigmoid = 1.0 / (1.0 + np.exp(-z))
        return sigmoid * (1.0 + z * (1.0 - sigmoid))
    if code == 4:
        return np.where(z < -3.0, 0.0, np.where(z >= 3.0, 1.0, z / 3.0 + 0.5))
    if code == 5:
        return np.where(z > 0, 1.0, negative_slope)
    raise ValueError(f"unknown activation code {code}")
