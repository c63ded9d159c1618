"""BatchNorm forward and backward kernels (Numba), with the fused activation.

The algorithm and the work split are those of the Cython kernels (see the
docstring of fastbn/_cython/_batch_norm.pyx); the passes over the data are in
_passes.py (shared with GroupNorm): work items that depend on the shape only, and
partial sums added in a fixed order, so the result is the same to the bit for any
number of threads. Statistics accumulate in float64 over values shifted by a
per-channel pivot (the channel's first value), and y = (x - pivot) * scale + offset
keeps that accuracy in the output.

One entry point, `_kernel`, does both directions, each in two passes (the sums, then
y or grad_x) through a single `prange` (see _passes.py on compile time); the
per-channel work between the passes is `_forward_step` / `_backward_step`.
`_fused_kernel` is the same with the fused activation (fastbn/_activations.py) compiled
in: its code costs compile time, paid only on the first call that asks for an
activation. The forward applies it to each item's output while the item is in cache;
the backward recomputes z = (x - mean) * invstd * w + b per item and takes dy through
act'(z) in both passes.

Each entry point is compiled for a dtype on the first call with it, or loaded from
numba's on-disk cache (see docs/numba.md).
"""
import numpy as np
from numba import njit, types

from fastbn._numba._passes import (COEFFICIENT_ROWS, ELEMENTWISE, MIN_ELEMENTS_PER_THREAD,
                                   NO_PASS, OFFSET, REDUCE, SCALE, SCALE2, SHIFT, ZA, ZB,
                                   channels_spatial, exact_run_sums, fused_pass_items,
                                   partial_slots, pass_arguments, pass_items, work_split)
from fastbn._numba._runtime import (HELPER_OPTIONS, PerDtype, run_items, run_kernel,
                                    writeable)
from fastbn._numba._sums import kept_precision


@njit(**HELPER_OPTIONS)
def _channel_totals(partials, first, second, centre, gradient, redo, channels_last, split):
    """Per-channel totals of a REDUCE pass's partials (_passes.partial_slots), added in a
    fixed order; with `redo`, a channel whose totals lost float32 precision
    (_sums.kept_precision) is summed again in float64 (channels-first: the channels-last
    tiles sum in float64 already). (Not the sums of a fused
    activation's g = dy * act'(z): for those the totals stand.) The flags come as
    np.bool_ values: as constants, each would compile a copy (see pass_arguments)."""
    _, chunks, _, row_blocks = split
    N = first.shape[0]
    C, S = channels_spatial(first, channels_last)
    total_a = np.zeros(C)
    total_b = np.zeros(C)
    if channels_last:
        for block in range(row_blocks):
            for c in range(C):
                total_a[c] += partials[0, block * C + c]
                total_b[c] += partials[1, block * C + c]
    else:
        for n in range(N):
            for c in range(C):
                for k in range((n * C + c) * chunks, (n * C + c + 1) * chunks):
                    total_a[c] += partials[0, k]
                    total_b[c] += partials[1, k]
    for c in range(C):
        if redo and not channels_last and not kept_precision(total_a[c], total_b[c], N * S):
            total_a[c] = total_b[c] = 0.0
            for n in range(N):
                a, b = exact_run_sums(first, second, n, c, centre[c], gradient)
                total_a[c] += a
                total_b[c] += b
    return total_a, total_b


# ---------------------------------------------------------------------------
# The two directions' passes.

@njit(**HELPER_OPTIONS)
def _forward_step(step, x, weight, bias, running_mean, running_var, training, momentum, eps, y,
                  save_mean, save_invstd, coefficients, partials, channels_last, activation,
                  slope, split):
    """The arguments of the forward's pass `step` (_passes.pass_arguments): 0, the
    statistics' sums around each channel's pivot (training only); 1, y from them."""
    N = x.shape[0]
    C, S = channels_spatial(x, channels_last)
    count = N * S
    shift, scale, offset = coefficients[SHIFT], coefficients[SCALE], coefficients[OFFSET]
    if step == 0:
        for c in range(C):
            # The pivot, a value of x's type: the run sums subtract it in that type (_sums.py).
            first = np.float64(x[0, 0, c] if channels_last else x[0, c, 0])
            # A non-finite pivot would turn an inf mean into nan; 0 keeps PyTorch's result.
            shift[c] = first if np.isfinite(first) else 0.0
        # One pass_arguments call per function: each is inlined, and each copy compiles.
        return _forward_arguments(np.int64(REDUCE if training else NO_PASS), x, y,
                                  coefficients, partials, np.int64(0), slope, channels_last,
                                  split)
    has_weight, has_bias = weight.size > 0, bias.size > 0
    if training:
        sum_shifted, sum_sq = _channel_totals(partials, x, x, shift, np.bool_(False),
                                              np.bool_(True), channels_last, split)
        for c in range(C):
            mean = shift[c] + sum_shifted[c] / count
            var_sum = sum_sq[c] - sum_shifted[c] * sum_shifted[c] / count
            if var_sum < 0.0:  # rounding only; keeps nan as nan
                var_sum = 0.0
            # As ATen: a zero variance with eps == 0 gives invstd 0, not inf.
            if var_sum == 0.0 and eps == 0.0:
                invstd = 0.0
            else:
                invstd = 1.0 / np.sqrt(var_sum / count + eps)
            if running_mean.size > 0:
                running_mean[c] = momentum * mean + (1.0 - momentum) * np.float64(running_mean[c])
            if running_var.size > 0:
                running_var[c] = (momentum * (var_sum / (count - 1))
                                  + (1.0 - momentum) * np.float64(running_var[c]))
            alpha = invstd * (np.float64(weight[c]) if has_weight else 1.0)
            offset[c] = (np.float64(bias[c]) if has_bias else 0.0) - sum_shifted[c] / count * alpha
            scale[c] = alpha
            save_mean[c] = mean
            save_invstd[c] = invstd
    else:
        for c in range(C):
            invstd = 1.0 / np.sqrt(np.float64(running_var[c]) + eps)
            alpha = invstd * (np.float64(weight[c]) if has_weight else 1.0)
            shift[c] = running_mean[c]
            offset[c] = bias[c] if has_bias else 0.0
            scale[c] = alpha
            save_mean[c] = running_mean[c]
            save_invstd[c] = invstd
    return _forward_arguments(np.int64(ELEMENTWISE), x, y, coefficients, partials, activation,
                              slope, channels_last, split)


@njit(**HELPER_OPTIONS)
def _forward_arguments(kind, x, y, coefficients, partials, activation, slope, channels_last,
                       split):
    """pass_arguments of the forward. The callers cast constants, as pass_arguments does
    (one compiled copy per literal value otherwise)."""
    return pass_arguments(kind, x, x, y, coefficients, partials, activation, slope, False,
                          channels_last, False, split)


@njit(**HELPER_OPTIONS)
def _backward_step(step, grad_out, x, weight, bias, save_mean, save_invstd, training, grad_x,
                   grad_weight, grad_bias, coefficients, partials, channels_last, activation,
                   slope, split):
    """The arguments of the backward's pass `step`: 0, the sums of dy and (x - mean) * dy
    (of g = dy * act'(z) with an activation); 1, grad_x. The parameter gradients are
    written from the sums."""
    N = x.shape[0]
    C, S = channels_spatial(x, channels_last)
    count = N * S
    has_weight = weight.size > 0
    want_dx, want_dw, want_db = grad_x.size > 0, grad_weight.size > 0, grad_bias.size > 0
    need_sums = want_dw or want_db or (want_dx and training)
    mean, za, zb = coefficients[SHIFT], coefficients[ZA], coefficients[ZB]
    if step == 0:
        for c in range(C):
            mean[c] = save_mean[c]
            # z = (x - mean) * za + zb, the forward's output before its activation.
            za[c] = np.float64(save_invstd[c]) * (np.float64(weight[c]) if has_weight else 1.0)
            zb[c] = bias[c] if bias.size > 0 else 0.0
        return _backward_arguments(np.int64(REDUCE if need_sums else NO_PASS), grad_out, x,
                                   grad_x, coefficients, partials, activation, slope,
                                   np.bool_(True), channels_last, split)
    if need_sums:
        sum_dy, dot = _channel_totals(partials, grad_out, x, mean, np.bool_(True),
                                      activation == 0, channels_last, split)
    else:
        sum_dy, dot = np.zeros(C), np.zeros(C)
    scale_dy, scale_x = coefficients[SCALE], coefficients[SCALE2]
    offset = coefficients[OFFSET]
    for c in range(C):
        invstd = np.float64(save_invstd[c])
        w_c = np.float64(weight[c]) if has_weight else 1.0
        if want_dw:
            grad_weight[c] = dot[c] * invstd
        if want_db:
            grad_bias[c] = sum_dy[c]
        # training: dx = (g - sum_g/n - (x - mean) * dot * invstd^2 / n) * invstd * w
        # eval:     dx = g * invstd * w          (g = dy, or dy * act'(z))
        scale_dy[c] = invstd * w_c
        if training:
            k = dot[c] * invstd * invstd / count
            scale_x[c] = -k * invstd * w_c
            offset[c] = -sum_dy[c] / count * invstd * w_c
        else:
            scale_x[c] = offset[c] = 0.0
    if training or activation or not want_dx:
        # In eval mode scale_x and offset are zero: x is read for z only.
        return _backward_arguments(np.int64(ELEMENTWISE if want_dx else NO_PASS), grad_out, x,
                                   grad_x, coefficients, partials, activation, slope,
                                   np.bool_(True), channels_last, split)
    # dx = (dy - 0) * scale_dy + 0: the forward's formula, and x is not read.
    mean.fill(0.0)
    return _backward_arguments(np.int64(ELEMENTWISE), grad_out, grad_out, grad_x, coefficients,
                               partials, np.int64(0), slope, np.bool_(False), channels_last,
                               split)


@njit(**HELPER_OPTIONS)
def _backward_arguments(kind, grad_out, x, grad_x, coefficients, partials, activation, slope,
                        backward, channels_last, split):
    return pass_arguments(kind, grad_out, x, grad_x, coefficients, partials, activation, slope,
                          backward, channels_last, False, split)


# ---------------------------------------------------------------------------
# The compiled entry point, one for both directions (see _passes.py on compile time).
# Inputs are typed read-only so that read-only arrays are accepted (a writeable
# array converts to that type); a length-0 array stands for None. `tasks` is the
# thread count (1: no parallel region).

def _array(dtype, ndim, layout="C", readonly=False):
    return types.Array(dtype, ndim, layout, readonly=readonly)


def _signature(dtype):
    tensor_in, vector_in = _array(dtype, 3, readonly=True), _array(dtype, 1, readonly=True)
    running = _array(dtype, 1, "A")  # updated in place, may be strided
    vector = _array(dtype, 1)
    return types.void(types.boolean, tensor_in, tensor_in, vector_in, vector_in, running, running,
                      types.boolean, types.float64, types.float64, _array(dtype, 3), vector,
                      vector, vector, vector, types.boolean, types.int64, types.float64,
                      _array(types.int64, 1, "A"), types.int64)


def _make_kernel(fused):
    """The entry point, for both directions; with `fused`, with the fused activation's code
    (see _passes._make_pass_items)."""

    def kernel(backward, first, x, weight, bias, running_mean, running_var, training, momentum,
               eps, out, save_mean, save_invstd, grad_weight, grad_bias, channels_last,
               activation, slope, counter, tasks):
        """forward (first = x, out = y; writes save_mean, save_invstd and the running
        statistics) or backward (first = grad_out, out = grad_x; reads save_mean and
        save_invstd)."""
        N = x.shape[0]
        C, S = channels_spatial(x, channels_last)
        split = work_split(N, C, S, channels_last, np.bool_(False))
        partials = np.empty((2, partial_slots(N, C, S, channels_last, split)))
        coefficients = np.empty((COEFFICIENT_ROWS, C), x.dtype)
        # Both passes through one `prange` (run_items), in a loop: see _passes.py.
        for step in range(2):
            if backward:
                args = _backward_step(step, first, x, weight, bias, save_mean, save_invstd,
                                      training, out, grad_weight, grad_bias, coefficients,
                                      partials, channels_last, activation, slope, split)
            else:
                args = _forward_step(step, x, weight, bias, running_mean, running_var, training,
                                     momentum, eps, out, save_mean, save_invstd, coefficients,
                                     partials, channels_last, activation, slope, split)
            if args[0] != NO_PASS:
                if fused:
                    run_items(fused_pass_items, args, split[0], tasks)
                else:
                    run_items(pass_items, args, split[0], tasks)
        # The batch counter (num_batches_tracked) changes in the same native call as the
        # running statistics: an interrupt cannot leave one updated without the other.
        if not backward and training and counter.size > 0:
            counter[0] += 1

    return kernel


_kernel = PerDtype(_make_kernel(False), _signature)
_fused_kernel = PerDtype(_make_kernel(True), _signature)


# ---------------------------------------------------------------------------
# The backend's kernel functions (calling convention: fastbn/_numpy/__init__.py).

# Length-0 stand-ins for None, per dtype: (vector, tensor).
_ABSENT = {np.dtype(t): (np.empty(0, t), np.empty((0, 0, 0), t)) for t in (np.float32, np.float64)}


# A length-0 counter: no batch counter to increase.
_NO_COUNTER = np.empty(0, np.int64)


def _threads(n_threads, x):
    return max(1, min(n_threads, x.size // MIN_ELEMENTS_PER_THREAD))


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       y, save_mean, save_invstd, channels_last, n_threads, activation=0,
                       negative_slope=0.0, counter=None):
    absent_vector, absent_tensor = _ABSENT[x.dtype]
    if not training:  # read only here, but training updates them
        running_mean, running_var = writeable(running_mean), writeable(running_var)
    kernel = _fused_kernel if activation else _kernel
    run_kernel(kernel[x.dtype], _threads(n_threads, x), False, x, x,
               absent_vector if weight is None else weight,
               absent_vector if bias is None else bias,
               absent_vector if running_mean is None else running_mean,
               absent_vector if running_var is None else running_var,
               training, momentum, eps, y, save_mean, save_invstd, absent_vector, absent_vector,
               channels_last, activation, negative_slope,
               _NO_COUNTER if counter is None else counter.reshape(1))


def batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training,
                        grad_x, grad_weight, grad_bias, channels_last, n_threads, activation=0,
                        negative_slope=0.0, bias=None):
    absent_vector, absent_tensor = _ABSENT[x.dtype]
    kernel = _fused_kernel if activation else _kernel
    run_kernel(kernel[x.dtype], _threads(n_threads, x), True, grad_out, x,
               absent_vector if weight is None else weight,
               absent_vector if bias is None else bias, absent_vector, absent_vector, training,
               0.0, 0.0, absent_tensor if grad_x is None else grad_x, writeable(save_mean),
               writeable(save_invstd), absent_vector if grad_weight is None else grad_weight,
               absent_vector if grad_bias is None else grad_bias, channels_last, activation,
               negative_slope, _NO_COUNTER)
