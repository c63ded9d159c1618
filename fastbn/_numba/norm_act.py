"""Filter Response Normalization (+ TLU) and EvoNorm-S0 kernels (Numba).

The algorithm and work items are those of the Cython kernels (see the docstring of
fastbn/_cython/_norm_act.pyx): one item per (sample, group) for channels-first
memory, one per (sample, block of whole groups) for channels-last memory; each item
computes its groups whole, so the result is the same to the bit for any thread count.
The per-(n, c) sums of the backward are added over the batch afterwards with NumPy
(fixed order).

Self-contained and small to compile: four drivers (forward and backward, channels-first
and channels-last), each compiled on its first call for the dtype it meets, as a
``parallel=True`` function or, for calls that run on one thread, as a plain one (the
same loops without numba's scheduler). A driver compiles in 2-4 s from an empty cache
(docs/frn_evonorm.md); the machine code is cached on disk (``cache=True``).
"""
import math
import types

import numpy as np
from numba import njit, prange

from fastbn._numba._runtime import numba_threads

# The element's kind, as in the Cython kernels (fastbn/_cython/_norm_act_loops.h).
PLAIN, TLU, ACT = 0, 1, 2
# Channels-last items hold whole groups and at least this many channels.
MIN_BLOCK_CHANNELS = 16
# Below this many values per thread, an extra thread costs more than it brings.
MIN_ELEMENTS_PER_THREAD = 16384

# No fast-math: with reassociation (or reciprocal) allowed, LLVM vectorised the sums
# of the serial and the parallel compilation of the same loops differently, and the
# results differed in the last bit between one thread and two.
_OPTIONS = dict(nogil=True, cache=True, error_model="numpy")
_HELPER_OPTIONS = dict(_OPTIONS, cache=False)


@njit(**_HELPER_OPTIONS)
def _sigmoid(t):
    # exp(-|t|) never overflows, and e / (1 + e) keeps small values' relative precision.
    e = math.exp(-abs(t))
    s = 1.0 / (1.0 + e)
    return e * s if t < 0 else s


@njit(**_HELPER_OPTIONS)
def _value(x, a, b, v, tau, mode):
    """The output of one element (see the module docstring of _norm_act.pyx)."""
    if mode == ACT:
        x = x * _sigmoid(v * x)
    y = x * a + b
    if mode == TLU and (y < tau or tau != tau):  # NaN if either is, as torch.maximum
        y = tau
    return y


@njit(**_HELPER_OPTIONS)
def _gates(y, tau):
    """torch.maximum(y, tau)'s gradient fractions (to y, to tau)."""
    if y == tau:
        return 0.5, 0.5
    if y < tau:
        return 0.0, 1.0
    if y > tau:
        return 1.0, 0.0
    return 1.0, 1.0  # a NaN


@njit(**_HELPER_OPTIONS)
def _terms(dz, x, a, b, v, tau, mode):
    """(g u, g, third) of one element: see _norm_act.pyx."""
    if mode == TLU:
        gate_y, gate_tau = _gates(x * a + b, tau)
        return dz * gate_y * x, dz * gate_y, dz * gate_tau
    if mode == ACT:
        s = _sigmoid(v * x)
        return dz * x * s, dz, dz * x * x * (s * (1.0 - s))
    return dz * x, dz, 0.0


@njit(**_HELPER_OPTIONS)
def _grad_x(dz, x, a, b, v, tau, k, m, mode):
    g = dz
    if mode == TLU:
        g = dz * _gates(x * a + b, tau)[0]
    elif mode == ACT:
        s = _sigmoid(v * x)
        g = dz * (s + v * x * (s * (1.0 - s)))
    return g * a + (x - m) * k


@njit(**_HELPER_OPTIONS)
def _param(vector, c, default):
    return vector[c] if vector.size > 0 else default


@njit(**_HELPER_OPTIONS)
def _finish(s1, s2, pivot, count, eps, centred):
    """(rstd, mean) of a group from its sums of x - pivot (mean 0 when not centred)."""
    if not centred:
        return 1.0 / math.sqrt(s2 / count + eps), 0.0
    var = (s2 - s1 * s1 / count) / count
    if var < 0.0:  # rounding only; keeps nan as nan
        var = 0.0
    return 1.0 / math.sqrt(var + eps), pivot + s1 / count


@njit(**_HELPER_OPTIONS)
def _pivot(value, centred):
    value = np.float64(value)
    return value if centred and np.isfinite(value) else 0.0


@njit(**_HELPER_OPTIONS)
def _sizes(x, channels_last, G):
    """(N, C, S, D) of a kernel view."""
    C = x.shape[2] if channels_last else x.shape[1]
    S = x.shape[1] if channels_last else x.shape[2]
    return x.shape[0], C, S, C // G


# The drivers: one per pass and layout (so that a call compiles only the loops it runs),
# each a prange over the items of `_split`.

def _forward_first(x, w, b, v, tau, y, mean, rstd, eps, centred, mode, width, blocks, items,
                   work, scales):
    """Channels-first forward: per (n, g), statistics over its D * S values, then y.
    scales: (N, C), rstd * w in x's type (work, width, blocks: unused)."""
    N, C, S, D = _sizes(x, False, rstd.shape[1])
    G = rstd.shape[1]
    for item in prange(items):
        n, g = item // G, item % G
        pivot = _pivot(x[n, g * D, 0], centred)
        s1 = 0.0
        s2 = 0.0
        for c in range(g * D, (g + 1) * D):
            for i in range(S):
                d = np.float64(x[n, c, i]) - pivot
                s1 += d
                s2 += d * d
        r, m = _finish(s1, s2, pivot, D * S, eps, centred)
        rstd[n, g] = r
        if centred:
            mean[n, g] = m
        for c in range(g * D, (g + 1) * D):
            scales[n, c] = np.float64(rstd[n, g]) * _param(w, c, 1.0)
            a, bc = scales[n, c], _param(b, c, 0.0)
            vc, tc = _param(v, c, 0.0), _param(tau, c, 0.0)
            for i in range(S):
                y[n, c, i] = _value(x[n, c, i], a, bc, vc, tc, mode)


def _forward_last(x, w, b, v, tau, y, mean, rstd, eps, centred, mode, width, blocks, items,
                  work, scales):
    """Channels-last forward: per (n, block of `width` channels), column sums over the S
    rows, then y. work: (3, N, C) float64, the pivots and the sums."""
    N, C, S, D = _sizes(x, True, rstd.shape[1])
    for item in prange(items):
        n, c0 = item // blocks, item % blocks * width
        c1 = min(c0 + width, C)
        for c in range(c0, c1):
            work[0, n, c] = _pivot(x[n, 0, c // D * D], centred)
            work[1, n, c] = 0.0
            work[2, n, c] = 0.0
        for s in range(S):
            for c in range(c0, c1):
                d = np.float64(x[n, s, c]) - work[0, n, c]
                work[1, n, c] += d
                work[2, n, c] += d * d
        for g in range(c0 // D, c1 // D):
            s1 = 0.0
            s2 = 0.0
            for c in range(g * D, (g + 1) * D):
                s1 += work[1, n, c]
                s2 += work[2, n, c]
            r, m = _finish(s1, s2, work[0, n, g * D], D * S, eps, centred)
            rstd[n, g] = r
            if centred:
                mean[n, g] = m
            for c in range(g * D, (g + 1) * D):
                scales[n, c] = np.float64(rstd[n, g]) * _param(w, c, 1.0)
        for s in range(S):
            for c in range(c0, c1):
                y[n, s, c] = _value(x[n, s, c], scales[n, c], _param(b, c, 0.0),
                                    _param(v, c, 0.0), _param(tau, c, 0.0), mode)


def _backward_first(dz, x, w, b, v, tau, mean, rstd, centred, mode, width, blocks, items,
                    want_dx, dx, sums, scales, coefficients):
    """Channels-first backward: per (n, g), the per-(n, c) sums into sums (3, N, C), then
    grad_x when want_dx. scales: (N, C) in x's type (coefficients: unused)."""
    N, C, S, D = _sizes(x, False, rstd.shape[1])
    G = rstd.shape[1]
    for item in prange(items):
        n, g = item // G, item % G
        r = np.float64(rstd[n, g])
        R = 0.0
        for c in range(g * D, (g + 1) * D):
            scales[n, c] = r * _param(w, c, 1.0)
            a, bc = scales[n, c], _param(b, c, 0.0)
            vc, tc = _param(v, c, 0.0), _param(tau, c, 0.0)
            gu = 0.0
            gs = 0.0
            third = 0.0
            for i in range(S):
                t0, t1, t2 = _terms(dz[n, c, i], x[n, c, i], a, bc, vc, tc, mode)
                gu += t0
                gs += t1
                third += t2
            sums[0, n, c] = gu
            sums[1, n, c] = gs
            sums[2, n, c] = third
            R += _param(w, c, 1.0) * gu
        if want_dx:
            k = -R * r * r * r / (D * S)
            m = mean[n, g] if centred else 0.0
            for c in range(g * D, (g + 1) * D):
                a, bc = scales[n, c], _param(b, c, 0.0)
                vc, tc = _param(v, c, 0.0), _param(tau, c, 0.0)
                for i in range(S):
                    dx[n, c, i] = _grad_x(dz[n, c, i], x[n, c, i], a, bc, vc, tc, k, m, mode)


def _backward_last(dz, x, w, b, v, tau, mean, rstd, centred, mode, width, blocks, items,
                   want_dx, dx, sums, scales, coefficients):
    """Channels-last backward: per (n, block), column sums, then grad_x when want_dx.
    coefficients: (2, N, C) float64, grad_x's k and m per column."""
    N, C, S, D = _sizes(x, True, rstd.shape[1])
    for item in prange(items):
        n, c0 = item // blocks, item % blocks * width
        c1 = min(c0 + width, C)
        for c in range(c0, c1):
            scales[n, c] = np.float64(rstd[n, c // D]) * _param(w, c, 1.0)
            sums[0, n, c] = 0.0
            sums[1, n, c] = 0.0
            sums[2, n, c] = 0.0
        for s in range(S):
            for c in range(c0, c1):
                t0, t1, t2 = _terms(dz[n, s, c], x[n, s, c], scales[n, c], _param(b, c, 0.0),
                                    _param(v, c, 0.0), _param(tau, c, 0.0), mode)
                sums[0, n, c] += t0
                sums[1, n, c] += t1
                sums[2, n, c] += t2
        if want_dx:
            for g in range(c0 // D, c1 // D):
                r = np.float64(rstd[n, g])
                R = 0.0
                for c in range(g * D, (g + 1) * D):
                    R += _param(w, c, 1.0) * sums[0, n, c]
                for c in range(g * D, (g + 1) * D):
                    coefficients[0, n, c] = -R * r * r * r / (D * S)
                    coefficients[1, n, c] = mean[n, g] if centred else 0.0
            for s in range(S):
                for c in range(c0, c1):
                    dx[n, s, c] = _grad_x(dz[n, s, c], x[n, s, c], scales[n, c],
                                          _param(b, c, 0.0), _param(v, c, 0.0),
                                          _param(tau, c, 0.0), coefficients[0, n, c],
                                          coefficients[1, n, c], mode)


def _renamed(function, name):
    """`function` under another name: numba names its cache files after the function, and
    a parallel and a serial compilation of one function would share (and overwrite) them."""
    copy = types.FunctionType(function.__code__, function.__globals__, name,
                              function.__defaults__, function.__closure__)
    copy.__qualname__ = name
    return copy


def _compiled(driver):
    """(parallel, serial): `driver` with numba's thread pool, and as plain loops for calls
    on one thread (no scheduler). Each compiles on its first call, per dtype."""
    return (njit(parallel=True, **_OPTIONS)(driver),
            njit(**_OPTIONS)(_renamed(driver, driver.__name__ + "_serial")))


# (pass, channels_last) -> (parallel, serial)
_DRIVERS = {("forward", False): _compiled(_forward_first),
            ("forward", True): _compiled(_forward_last),
            ("backward", False): _compiled(_backward_first),
            ("backward", True): _compiled(_backward_last)}


def _split(x, G, channels_last):
    """(width, blocks, items): channels-last, `blocks` blocks of `width` channels per
    sample (whole groups, at least MIN_BLOCK_CHANNELS); channels-first, N * G items."""
    N, C = x.shape[0], x.shape[2] if channels_last else x.shape[1]
    if not channels_last:
        return 0, 0, N * G
    per_block = -(-MIN_BLOCK_CHANNELS // (C // G))
    blocks = -(-G // per_block)
    return per_block * (C // G), blocks, N * blocks


def _run(drivers, n_threads, x, items, *args):
    """The parallel driver on the threads worth starting, or the serial one on one."""
    parallel, serial = drivers
    threads = min(n_threads, x.size // MIN_ELEMENTS_PER_THREAD, items)
    if threads <= 1:
        serial(*args)
    else:
        with numba_threads(threads):
            parallel(*args)


def _vector(a, like):
    """A parameter, or an empty array standing for None (one compiled signature)."""
    return np.empty(0, like.dtype) if a is None else a


def _forward(x, weight, bias, v, tau, eps, y, mean, rstd, centred, mode, channels_last,
             n_threads):
    N, C = rstd.shape[0], x.shape[2] if channels_last else x.shape[1]
    work = np.empty((3, N, C) if channels_last else (3, 0, 0))
    scales = np.empty((N, C), x.dtype)
    width, blocks, items = _split(x, rstd.shape[1], channels_last)
    _run(_DRIVERS["forward", channels_last], n_threads, x, items, x, _vector(weight, x),
         _vector(bias, x), _vector(v, x), _vector(tau, x), y, mean, rstd, eps, centred, mode,
         width, blocks, items, work, scales)


def _backward(grad_out, x, weight, bias, v, tau, mean, rstd, centred, mode, channels_last,
              grad_x, n_threads):
    """The per-(n, c) sums (3, N, C) and rstd per channel (N, C), float64; grad_x written."""
    N, G = rstd.shape
    C = x.shape[2] if channels_last else x.shape[1]
    sums = np.empty((3, N, C))
    scales = np.empty((N, C), x.dtype)
    coefficients = np.empty((2, N, C) if channels_last else (2, 0, 0))
    want_dx = grad_x is not None
    dx = grad_x if want_dx else np.empty((0, 0, 0), x.dtype)
    width, blocks, items = _split(x, G, channels_last)
    _run(_DRIVERS["backward", channels_last], n_threads, x, items, grad_out, x,
         _vector(weight, x), _vector(bias, x), _vector(v, x), _vector(tau, x), mean, rstd,
         centred, mode, width, blocks, items, want_dx, dx, sums, scales, coefficients)
    return sums, np.repeat(rstd.astype(np.float64), C // G, axis=1)


def filter_response_norm_forward(x, weight, bias, tau, eps, y, rstd, channels_last, n_threads):
    _forward(x, weight, bias, None, tau, eps, y, np.empty((0, 0), x.dtype), rstd, False,
             PLAIN if tau is None else TLU, channels_last, n_threads)


def filter_response_norm_backward(grad_out, x, rstd, weight, bias, tau, grad_x, grad_weight,
                                  grad_bias, grad_tau, grad_eps, channels_last, n_threads):
    sums, r = _backward(grad_out, x, weight, bias, None, tau, np.empty((0, 0), x.dtype), rstd,
                        False, PLAIN if tau is None else TLU, channels_last, grad_x, n_threads)
    if grad_weight is not None:
        grad_weight[...] = (sums[0] * r).sum(axis=0)
    if grad_bias is not None:
        grad_bias[...] = sums[1].sum(axis=0)
    if grad_tau is not None:
        grad_tau[...] = sums[2].sum(axis=0)
    if grad_eps is not None:
        w = 1.0 if weight is None else weight.astype(np.float64)
        grad_eps[...] = -0.5 * (w * sums[0] * r ** 3).sum()


def evonorm_s0_forward(x, weight, bias, v, eps, y, mean, rstd, channels_last, n_threads):
    _forward(x, weight, bias, v, None, eps, y, mean, rstd, True, PLAIN if v is None else ACT,
             channels_last, n_threads)


def evonorm_s0_backward(grad_out, x, mean, rstd, weight, v, grad_x, grad_weight, grad_bias,
                        grad_v, channels_last, n_threads):
    sums, r = _backward(grad_out, x, weight, None, v, None, mean, rstd, True,
                        PLAIN if v is None else ACT, channels_last, grad_x, n_threads)
    if grad_weight is not None:
        grad_weight[...] = (sums[0] * r).sum(axis=0)
    if grad_bias is not None:
        grad_bias[...] = sums[1].sum(axis=0)
    if grad_v is not None:
        w = 1.0 if weight is None else weight.astype(np.float64)
        grad_v[...] = (sums[2] * r).sum(axis=0) * w
