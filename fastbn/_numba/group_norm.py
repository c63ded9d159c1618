"""GroupNorm forward and backward kernels (Numba); InstanceNorm uses them too (G = C).

The passes over the data are BatchNorm's (_passes.py) with coefficients per (sample,
channel) (`per_sample`): the statistics' sums per (n, c) run, added in a fixed order per
(n, c) and then per group; an elementwise pass with per-(n, c) coefficients. Channels-last
tiles stay within one sample. Sums are float64 (blocks of values first summed in x's
type, see _sums.py) over values shifted by a per-group pivot (the group's first value),
so the result is the same to the bit for any thread count.

The Cython kernel also has a whole-group split (one item per (n, g) computes its
statistics and normalizes its block in the same parallel region); here every shape
takes the two passes, which numba compiles once for BatchNorm and GroupNorm alike (see
_passes.py on compile time).
"""
import numpy as np
from numba import njit, types

from fastbn._numba._passes import (ELEMENTWISE, MIN_ELEMENTS_PER_THREAD, NO_PASS, OFFSET, REDUCE,
                                   SCALE, SCALE2, SHIFT, channels_spatial, exact_run_sums,
                                   partial_slots, pass_arguments, pass_items, work_split)
from fastbn._numba._runtime import (HELPER_OPTIONS, per_dtype, run_items, run_kernel,
                                    writeable)
from fastbn._numba._sums import kept_precision


@njit(**HELPER_OPTIONS)
def _sample_channel_totals(partials, first, second, centre, gradient, channels_last, split):
    """Per-(n, c) totals (N, C) of a REDUCE pass's partials (_passes.partial_slots), in a
    fixed order; an (n, c) whose totals lost float32 precision (_sums.kept_precision) is
    summed again in float64 (channels-first: channels-last tiles sum in float64 already)."""
    _, chunks, _, row_blocks = split
    N = first.shape[0]
    C, S = channels_spatial(first, channels_last)
    total_a = np.zeros((N, C))
    total_b = np.zeros((N, C))
    blocks_per_sample = row_blocks // N
    for n in range(N):
        for c in range(C):
            if channels_last:
                for block in range(n * blocks_per_sample, (n + 1) * blocks_per_sample):
                    total_a[n, c] += partials[0, block * C + c]
                    total_b[n, c] += partials[1, block * C + c]
            else:
                for k in range((n * C + c) * chunks, (n * C + c + 1) * chunks):
                    total_a[n, c] += partials[0, k]
                    total_b[n, c] += partials[1, k]
            if not channels_last and not kept_precision(total_a[n, c], total_b[n, c], S):
                total_a[n, c], total_b[n, c] = exact_run_sums(first, second, n, c,
                                                              centre[n * C + c], gradient)
    return total_a, total_b


@njit(**HELPER_OPTIONS)
def _param(vector, c, default):
    return np.float64(vector[c]) if vector.size > 0 else default


@njit(**HELPER_OPTIONS)
def _forward_step(step, x, weight, bias, eps, compute_stats, y, mean, rstd, variance,
                  coefficients, partials, channels_last, split):
    """The arguments of the forward's pass `step` (_passes.pass_arguments): 0, the sums
    per (n, c) around the group's pivot (compute_stats only); 1, y. The coefficients
    have a column per (n, c)."""
    N, G = mean.shape
    C, S = channels_spatial(x, channels_last)
    D = C // G
    shift, scale, offset = coefficients[SHIFT], coefficients[SCALE], coefficients[OFFSET]
    if step == 0:
        for n in range(N):
            for g in range(G):
                # The group's pivot, a value of x's type; a non-finite pivot would turn
                # an inf mean into nan, 0 keeps PyTorch's result.
                first = np.float64(x[n, 0, g * D] if channels_last else x[n, g * D, 0])
                shift[n * C + g * D:n * C + (g + 1) * D] = first if np.isfinite(first) else 0.0
        return _group_arguments(np.int64(REDUCE if compute_stats else NO_PASS), x, x, y,
                                coefficients, partials, np.bool_(False), channels_last, split)
    if compute_stats:
        sum_shifted, sum_sq = _sample_channel_totals(partials, x, x, shift, np.bool_(False),
                                                     channels_last, split)
    for n in range(N):
        for g in range(G):
            if compute_stats:
                group_shifted = 0.0
                group_sq = 0.0
                for c in range(g * D, (g + 1) * D):
                    group_shifted += sum_shifted[n, c]
                    group_sq += sum_sq[n, c]
                pivot = np.float64(shift[n * C + g * D])
                count = D * S
                var = (group_sq - group_shifted * group_shifted / count) / count
                if var < 0.0:  # rounding only; keeps nan as nan
                    var = 0.0
                # As ATen's group norm: var 0 with eps 0 gives inf.
                rstd_g = 1.0 / np.sqrt(var + eps)
                centre_offset = group_shifted / count  # mean - pivot
                mean[n, g] = pivot + centre_offset
                rstd[n, g] = rstd_g
                if variance.size > 0:
                    variance[n, g] = var
            else:
                pivot = np.float64(mean[n, g])
                rstd_g = np.float64(rstd[n, g])
                centre_offset = 0.0
            for c in range(g * D, (g + 1) * D):
                alpha = rstd_g * _param(weight, c, 1.0)
                shift[n * C + c] = pivot
                scale[n * C + c] = alpha
                offset[n * C + c] = _param(bias, c, 0.0) - centre_offset * alpha
    return _group_arguments(np.int64(ELEMENTWISE), x, x, y, coefficients, partials,
                            np.bool_(False), channels_last, split)


@njit(**HELPER_OPTIONS)
def _group_arguments(kind, first, second, out, coefficients, partials, flag, channels_last,
                     split):
    """pass_arguments, per (n, c) and without activation. (One call site of the inlined
    pass_arguments: each copy compiles; the callers cast constants, see pass_arguments.)"""
    return pass_arguments(kind, first, second, out, coefficients, partials, 0, 0.0, flag,
                          channels_last, True, split)


@njit(**HELPER_OPTIONS)
def _backward_step(step, grad_out, x, weight, mean, rstd, stats_from_input, grad_x,
                   grad_weight, grad_bias, coefficients, partials, channels_last, split):
    """The arguments of the backward's pass `step`: 0, the sums of dy and (x - mean) * dy
    per (n, c); 1, grad_x. The parameter gradients are written from the sums."""
    N, G = mean.shape
    C, S = channels_spatial(x, channels_last)
    D = C // G
    want_dx = grad_x.size > 0
    need_sums = grad_weight.size > 0 or grad_bias.size > 0 or (want_dx and stats_from_input)
    centre, scale_dy = coefficients[SHIFT], coefficients[SCALE]
    scale_x, offset = coefficients[SCALE2], coefficients[OFFSET]
    if step == 0:
        for n in range(N):
            for c in range(C):
                centre[n * C + c] = mean[n, c // D]
        return _group_arguments(np.int64(REDUCE if need_sums else NO_PASS), grad_out, x,
                                grad_x, coefficients, partials, np.bool_(True), channels_last,
                                split)
    if need_sums:
        sum_dy, dot = _sample_channel_totals(partials, grad_out, x, centre, np.bool_(True),
                                             channels_last, split)
    else:
        sum_dy, dot = np.zeros((N, C)), np.zeros((N, C))
    # Parameter gradients: sums over the batch in a fixed order.
    for c in range(grad_weight.size):
        total = 0.0
        for n in range(N):
            total += dot[n, c] * np.float64(rstd[n, c // D])
        grad_weight[c] = total
    for c in range(grad_bias.size):
        total = 0.0
        for n in range(N):
            total += sum_dy[n, c]
        grad_bias[c] = total
    for n in range(N):
        for g in range(G):
            rstd_g = np.float64(rstd[n, g])
            weighted_sum_dy = 0.0
            weighted_dot = 0.0
            for c in range(g * D, (g + 1) * D):
                weighted_sum_dy += _param(weight, c, 1.0) * sum_dy[n, c]
                weighted_dot += _param(weight, c, 1.0) * dot[n, c]
            for c in range(g * D, (g + 1) * D):
                scale_dy[n * C + c] = rstd_g * _param(weight, c, 1.0)
                if stats_from_input:
                    scale_x[n * C + c] = -weighted_dot * rstd_g * rstd_g * rstd_g / (D * S)
                    offset[n * C + c] = -weighted_sum_dy * rstd_g / (D * S)
                else:
                    scale_x[n * C + c] = offset[n * C + c] = 0.0
    if stats_from_input or not want_dx:
        return _group_arguments(np.int64(ELEMENTWISE if want_dx else NO_PASS), grad_out, x,
                                grad_x, coefficients, partials, np.bool_(True), channels_last,
                                split)
    # Given statistics: dx = (dy - 0) * scale_dy + 0, and x is not read.
    centre.fill(0.0)
    return _group_arguments(np.int64(ELEMENTWISE), grad_out, grad_out, grad_x, coefficients,
                            partials, np.bool_(False), channels_last, split)


# ---------------------------------------------------------------------------
# The compiled entry point, one for both directions (see _passes.py on compile time).
# Inputs are typed read-only so that read-only arrays are accepted; a length-0
# array stands for None. `tasks` is the thread count (1: no parallel region).

def _array(dtype, ndim, readonly=False):
    return types.Array(dtype, ndim, "C", readonly=readonly)


def _signature(dtype):
    tensor_in, vector_in = _array(dtype, 3, readonly=True), _array(dtype, 1, readonly=True)
    vector, stats = _array(dtype, 1), _array(dtype, 2)
    return types.void(types.boolean, tensor_in, tensor_in, vector_in, vector_in, types.float64,
                      types.boolean, _array(dtype, 3), stats, stats, _array(types.float64, 2),
                      vector, vector, types.boolean, types.int64)


@per_dtype(_signature)
def _kernel(backward, first, x, weight, bias, eps, stats_from_input, out, mean, rstd, variance,
            grad_weight, grad_bias, channels_last, tasks):
    """forward (first = x, out = y; writes mean, rstd and variance when stats_from_input,
    else normalizes with them) or backward (first = grad_out, out = grad_x)."""
    N = x.shape[0]
    C, S = channels_spatial(x, channels_last)
    split = work_split(N, C, S, channels_last, np.bool_(True))
    partials = np.empty((2, partial_slots(N, C, S, channels_last, split)))
    # The rows SHIFT, SCALE, OFFSET, SCALE2 (no activation: ZA, ZB are not read).
    coefficients = np.empty((SCALE2 + 1, N * C), x.dtype)
    # Both passes through one `prange` (run_items), in a loop: see _passes.py.
    for step in range(2):
        if backward:
            args = _backward_step(step, first, x, weight, mean, rstd, stats_from_input, out,
                                  grad_weight, grad_bias, coefficients, partials, channels_last,
                                  split)
        else:
            args = _forward_step(step, x, weight, bias, eps, stats_from_input, out, mean, rstd,
                                 variance, coefficients, partials, channels_last, split)
        if args[0] != NO_PASS:
            run_items(pass_items, args, split[0], tasks)


# ---------------------------------------------------------------------------
# The backend's kernel functions (calling convention: fastbn/_numpy/__init__.py).

# Length-0 stand-ins for None, per dtype: (vector, tensor); and for the variance.
_ABSENT = {np.dtype(t): (np.empty(0, t), np.empty((0, 0, 0), t)) for t in (np.float32, np.float64)}
_NO_VARIANCE = np.empty((0, 0))


def _threads(n_threads, x, channels_last):
    N = x.shape[0]
    C, S = (x.shape[2], x.shape[1]) if channels_last else (x.shape[1], x.shape[2])
    items = work_split(N, C, S, channels_last, np.bool_(True))[0]
    return max(1, min(n_threads, x.size // MIN_ELEMENTS_PER_THREAD, items))


def group_norm_forward(x, weight, bias, eps, compute_stats, y, mean, rstd, variance,
                       channels_last, n_threads):
    absent_vector = _ABSENT[x.dtype][0]
    run_kernel(_kernel[x.dtype], _threads(n_threads, x, channels_last), False, x, x,
               absent_vector if weight is None else weight,
               absent_vector if bias is None else bias, eps, compute_stats, y, writeable(mean),
               writeable(rstd), _NO_VARIANCE if variance is None else variance, absent_vector,
               absent_vector, channels_last)


def group_norm_backward(grad_out, x, weight, mean, rstd, stats_from_input,
                        grad_x, grad_weight, grad_bias, channels_last, n_threads):
    absent_vector, absent_tensor = _ABSENT[x.dtype]
    run_kernel(_kernel[x.dtype], _threads(n_threads, x, channels_last), True, grad_out, x,
               absent_vector if weight is None else weight, absent_vector, 0.0, stats_from_input,
               absent_tensor if grad_x is None else grad_x, writeable(mean), writeable(rstd),
               _NO_VARIANCE, absent_vector if grad_weight is None else grad_weight,
               absent_vector if grad_bias is None else grad_bias, channels_last)
