"""The fused activations of BatchNorm (Numba): codes, formulas and NaN handling are those
of fastbn/_activations.py (the float64 reference) and of the Cython kernels
(fastbn/_cython/_batch_norm_loops.h).

Each function runs over one contiguous span of a work item (up to a few thousand
values, in cache), in place. The activation code is a run-time argument switched on
outside the loops, so each loop is one activation's and vectorises, and the kernels are
compiled once for all six codes: applying the activation in a second loop over the
item's span, rather than inside every pass's loops, keeps one copy of each formula.
Arithmetic is in the array's own type, as in the Cython kernels.
"""
import numpy as np
from numba import njit

from fastbn._numba._runtime import HELPER_OPTIONS


@njit(**HELPER_OPTIONS)
def activate(code, slope, y):
    """y = act(y): 1 relu, 2 relu6, 3 silu, 4 hardswish, 5 leaky_relu (0: unchanged)."""
    cast = y.dtype.type
    zero, one, three, six, y_slope = cast(0), cast(1), cast(3), cast(6), cast(slope)
    if code == 1:
        for i in range(y.size):
            z = y[i]
            y[i] = zero if z < zero else z
    elif code == 2:
        for i in range(y.size):
            z = y[i]
            y[i] = zero if z < zero else (six if z > six else z)
    elif code == 3:
        for i in range(y.size):
            z = y[i]
            y[i] = z / (one + np.exp(-z))
    elif code == 4:
        for i in range(y.size):
            z = y[i]
            t = z + three
            t = zero if t < zero else (six if t > six else t)
            y[i] = z * t / six
    elif code == 5:
        for i in range(y.size):
            z = y[i]
            y[i] = z if z > zero else z * y_slope


@njit(**HELPER_OPTIONS)
def derivative(code, slope, z):
    """z = act'(z), with the comparisons of torch's CPU kernels, so that NaN and inf get
    torch's gradients: relu passes a NaN's gradient, relu6 stops it, hardswish makes it
    NaN (code 0: ones)."""
    cast = z.dtype.type
    zero, half, one, three, six = cast(0), cast(0.5), cast(1), cast(3), cast(6)
    z_slope = cast(slope)
    if code == 1:
        for i in range(z.size):
            z[i] = zero if z[i] <= zero else one
    elif code == 2:
        for i in range(z.size):
            v = z[i]
            z[i] = one if (v > zero) & (v < six) else zero
    elif code == 3:
        for i in range(z.size):
            v = z[i]
            s = one / (one + np.exp(-v))
            z[i] = s * (one + v * (one - s))
    elif code == 4:
        for i in range(z.size):
            v = z[i]
            z[i] = zero if v < -three else (one if v >= three else v / three + half)
    elif code == 5:
        for i in range(z.size):
            z[i] = one if z[i] > zero else z_slope
    else:
        z[:] = one
