"""GroupNorm forward and backward kernels (Numba); instance norm uses them too.

The algorithm and the work split are those of the Cython kernels (see the
docstring of fastbn/_cython/_group_norm.pyx). Two fixed splits, chosen from the
shape alone:
  whole groups (channels-first, enough groups, each small enough to stay in
    cache): one item per (n, g) computes its statistics and then normalizes
    its block (backward: per-channel sums, then grad_x);
  chunks (the rest): per-(n, c) partial sums over whole rows of S values or
    fixed chunks of long rows (channels-first), or over tiles of one sample's
    rows x a block of channels (channels-last); the partials are added in a
    fixed order, then an elementwise pass applies per-(n, c) coefficients.
Inside `prange` each item writes only its own slots, so the result is the same
to the bit for any number of threads. Sums are float64 (blocks of values first
summed in x's type, see _sums.py) over values shifted by a per-group pivot (the
group's first value).

The `prange` drivers are `parallel=True` functions and the per-item loops plain
`@njit` helpers, all called from two entry points compiled for float32 and
float64 when this module is imported (or loaded from numba's on-disk cache).
"""
import numpy as np
from numba import njit, prange, types

from fastbn._numba._runtime import HELPER_OPTIONS, JIT_OPTIONS, run_kernel, serial
from fastbn._numba._sums import grad_sums, shifted_sums

# The work split's constants: the same as the Cython kernels'.
CHUNK_ELEMENTS = 4096
CHANNEL_BLOCK = 256
MIN_ELEMENTS_PER_THREAD = 16384
MIN_GROUP_ITEMS = 16
MAX_GROUP_ELEMENTS = 32768


def _split(N, C, S, G, channels_last):
    """(whole_groups, items, rows_per_item, chunks, rows_per_block, row_blocks, channel_blocks),
    all ints (whole_groups 0 or 1)."""
    if not channels_last and N * G >= MIN_GROUP_ITEMS and (C // G) * S <= MAX_GROUP_ELEMENTS:
        return 1, N * G, 0, 0, 0, 0, 0
    if not channels_last:
        if S >= CHUNK_ELEMENTS:
            rows_per_item, chunks = 1, -(-S // CHUNK_ELEMENTS)
        else:
            rows_per_item, chunks = CHUNK_ELEMENTS // S, 1
        return 0, -(-N * C // rows_per_item) * chunks, rows_per_item, chunks, 0, 0, 0
    rows_per_block = max(1, CHUNK_ELEMENTS // min(C, CHANNEL_BLOCK))
    row_blocks = -(-S // rows_per_block)
    channel_blocks = -(-C // CHANNEL_BLOCK)
    return 0, N * row_blocks * channel_blocks, 0, 0, rows_per_block, row_blocks, channel_blocks


# ---------------------------------------------------------------------------
# Loops over one run of values (the sums are shared with BatchNorm: _sums.py).

@njit(**HELPER_OPTIONS)
def _affine(x, y, shift, scale, offset):
    """y = (x - shift) * scale + offset, in x's type (the coefficients are of it)."""
    for i in range(x.size):
        y[i] = (x[i] - shift) * scale + offset


@njit(**HELPER_OPTIONS)
def _grad_input(dy, x, dx, mean, a, b, d):
    """dx = dy * a + (x - mean) * b + d, in x's type."""
    for i in range(dy.size):
        dx[i] = dy[i] * a + (x[i] - mean) * b + d


@njit(**HELPER_OPTIONS)
def _pivot(value):
    # A non-finite pivot would turn an inf mean into nan; 0 keeps PyTorch's result.
    value = np.float64(value)
    return value if np.isfinite(value) else 0.0


@njit(**HELPER_OPTIONS)
def _rstd(sum_shifted, sum_sq, count, eps):
    """(1 / sqrt(var + eps), biased var) from shifted sums."""
    var = (sum_sq - sum_shifted * sum_shifted / count) / count
    if var < 0.0:  # rounding only; keeps nan as nan
        var = 0.0
    # As ATen's group norm: var 0 with eps 0 gives inf.
    return 1.0 / np.sqrt(var + eps), var


@njit(**HELPER_OPTIONS)
def _param(vector, c, default):
    return np.float64(vector[c]) if vector.size > 0 else default


# ---------------------------------------------------------------------------
# Whole-group items: x, y, dy, dx are (N * G, D, S), one (D, S) block per group,
# so that a channel's run is indexed whole (a slice with bounds known only at
# run time costs numba more than a 49-value run does).

@njit(parallel=True, **HELPER_OPTIONS)
def _forward_groups(x, y, G, weight, bias, eps, compute_stats, mean, rstd, variance,
                    shift, scale, offset):
    """Statistics, then y, per group; mean, rstd, variance, shift are (N * G,),
    scale and offset (N * G, D) in x's type."""
    items, D, S = x.shape
    for item in prange(items):
        g = item % G
        if compute_stats:
            block = x[item].reshape(D * S)
            shift[item] = _pivot(block[0])
            sum_shifted, sum_sq = shifted_sums(block, shift[item])
            rstd_g, var = _rstd(sum_shifted, sum_sq, block.size, eps)
            centre_offset = sum_shifted / block.size  # mean - pivot
            mean[item] = np.float64(shift[item]) + centre_offset
            rstd[item] = rstd_g
            if variance.size > 0:
                variance[item] = var
        else:
            rstd_g = np.float64(rstd[item])
            centre_offset = 0.0
            shift[item] = mean[item]
        for c in range(D):
            alpha = rstd_g * _param(weight, g * D + c, 1.0)
            scale[item, c] = alpha
            offset[item, c] = _param(bias, g * D + c, 0.0) - centre_offset * alpha
            _affine(x[item, c], y[item, c], shift[item], scale[item, c], offset[item, c])


@njit(parallel=True, **HELPER_OPTIONS)
def _backward_groups(dy, x, dx, G, weight, mean, rstd, stats_from_input, need_sums,
                     sum_dy, dot, shift, scale_dy, scale_x, offset):
    """Per-channel sums into sum_dy, dot (N * G, D), then grad_x per group (unless dx is empty).
    shift, scale_x, offset are (N * G,), scale_dy (N * G, D) in x's type."""
    items, D, S = x.shape
    for item in prange(items):
        g = item % G
        rstd_g = np.float64(rstd[item])
        weighted_sum_dy = 0.0
        weighted_dot = 0.0
        if need_sums:
            for c in range(D):
                s, t = grad_sums(dy[item, c], x[item, c], mean[item])
                sum_dy[item, c] = s
                dot[item, c] = t
                w_c = _param(weight, g * D + c, 1.0)
                weighted_sum_dy += w_c * s
                weighted_dot += w_c * t
        if dx.size == 0:
            continue
        shift[item] = mean[item]
        scale_x[item] = (-weighted_dot * rstd_g * rstd_g * rstd_g / (D * S)
                         if stats_from_input else 0.0)
        offset[item] = -weighted_sum_dy * rstd_g / (D * S) if stats_from_input else 0.0
        for c in range(D):
            scale_dy[item, c] = rstd_g * _param(weight, g * D + c, 1.0)
            _grad_input(dy[item, c], x[item, c], dx[item, c], shift[item], scale_dy[item, c],
                        scale_x[item], offset[item])


# ---------------------------------------------------------------------------
# Chunk items, channels-first: tensors as (N * C, S) rows, partials (N * C, chunks).

@njit(parallel=True, **HELPER_OPTIONS)
def _reduce_rows(first, second, centre, gradient, rows_per_item, part_a, part_b):
    """Per-(row, chunk) shifted_sums(first) or, when gradient, grad_sums(first=dy, second=x),
    around centre[row]; part_a and part_b are (rows, chunks)."""
    rows, S = first.shape
    chunks = part_a.shape[1]
    items = -(-rows // rows_per_item) * chunks
    for item in prange(items):
        chunk = item % chunks
        row0 = item // chunks * rows_per_item
        start = chunk * S // chunks
        stop = (chunk + 1) * S // chunks
        for row in range(row0, min(row0 + rows_per_item, rows)):
            if gradient:
                part_a[row, chunk], part_b[row, chunk] = grad_sums(
                    first[row, start:stop], second[row, start:stop], centre[row])
            else:
                part_a[row, chunk], part_b[row, chunk] = shifted_sums(
                    first[row, start:stop], centre[row])


@njit(parallel=True, **HELPER_OPTIONS)
def _elementwise_rows(x, x2, y, shift, scale, offset, scale2, backward, rows_per_item, chunks):
    """y = (x - shift) * scale + offset or, when backward,
    y = x * scale + (x2 - shift) * scale2 + offset; coefficients per row."""
    rows, S = x.shape
    items = -(-rows // rows_per_item) * chunks
    for item in prange(items):
        chunk = item % chunks
        row0 = item // chunks * rows_per_item
        start = chunk * S // chunks
        stop = (chunk + 1) * S // chunks
        for row in range(row0, min(row0 + rows_per_item, rows)):
            if backward:
                _grad_input(x[row, start:stop], x2[row, start:stop], y[row, start:stop],
                            shift[row], scale[row], scale2[row], offset[row])
            else:
                _affine(x[row, start:stop], y[row, start:stop], shift[row], scale[row],
                        offset[row])


# ---------------------------------------------------------------------------
# Chunk items, channels-last: tensors (N, S, C), partials (N, row_blocks, C).

@njit(parallel=True, **HELPER_OPTIONS)
def _reduce_tiles(first, second, centre, gradient, rows_per_block, channel_blocks,
                  part_a, part_b):
    """Per tile and channel: sums as _reduce_rows, around centre[n, c]."""
    N, S, C = first.shape
    row_blocks = part_a.shape[1]
    for item in prange(N * row_blocks * channel_blocks):
        c0 = item % channel_blocks * CHANNEL_BLOCK
        c1 = min(c0 + CHANNEL_BLOCK, C)
        rb = item // channel_blocks % row_blocks
        n = item // channel_blocks // row_blocks
        acc_a = part_a[n, rb, c0:c1]
        acc_b = part_b[n, rb, c0:c1]
        centre_n = centre[n, c0:c1]
        acc_a[:] = 0.0
        acc_b[:] = 0.0
        # Rows outer, channels inner: contiguous reads, and the channel loop vectorises.
        for r in range(rb * rows_per_block, min((rb + 1) * rows_per_block, S)):
            row = first[n, r, c0:c1]
            if gradient:
                row2 = second[n, r, c0:c1]
                for j in range(row.size):
                    g = np.float64(row[j])
                    acc_a[j] += g
                    acc_b[j] += (np.float64(row2[j]) - centre_n[j]) * g
            else:
                for j in range(row.size):
                    d = np.float64(row[j]) - centre_n[j]
                    acc_a[j] += d
                    acc_b[j] += d * d


@njit(parallel=True, **HELPER_OPTIONS)
def _elementwise_tiles(x, x2, y, shift, scale, offset, scale2, backward, rows_per_block,
                       channel_blocks):
    """As _elementwise_rows, with coefficients per (n, c)."""
    N, S, C = x.shape
    row_blocks = -(-S // rows_per_block)
    for item in prange(N * row_blocks * channel_blocks):
        c0 = item % channel_blocks * CHANNEL_BLOCK
        c1 = min(c0 + CHANNEL_BLOCK, C)
        rb = item // channel_blocks % row_blocks
        n = item // channel_blocks // row_blocks
        shift_n, scale_n, offset_n = shift[n, c0:c1], scale[n, c0:c1], offset[n, c0:c1]
        scale2_n = scale2[n, c0:c1]
        for r in range(rb * rows_per_block, min((rb + 1) * rows_per_block, S)):
            x_row, y_row = x[n, r, c0:c1], y[n, r, c0:c1]
            if backward:
                x2_row = x2[n, r, c0:c1]
                for j in range(x_row.size):
                    y_row[j] = (x_row[j] * scale_n[j] + (x2_row[j] - shift_n[j]) * scale2_n[j]
                                + offset_n[j])
            else:
                for j in range(x_row.size):
                    y_row[j] = (x_row[j] - shift_n[j]) * scale_n[j] + offset_n[j]


# The same passes for calls on one thread (see _runtime.serial).
_forward_groups_serial = serial(_forward_groups)
_backward_groups_serial = serial(_backward_groups)
_reduce_rows_serial = serial(_reduce_rows)
_elementwise_rows_serial = serial(_elementwise_rows)
_reduce_tiles_serial = serial(_reduce_tiles)
_elementwise_tiles_serial = serial(_elementwise_tiles)


@njit(**HELPER_OPTIONS)
def _channel_sums(first, second, centre, gradient, channels_last, split, parallel):
    """Per-(n, c) sums (N, C) of the chunk split, partials added in a fixed order."""
    _, _, rows_per_item, chunks, rows_per_block, row_blocks, channel_blocks = split
    N, C = centre.shape
    if not channels_last:
        S = first.shape[2]
        part_a = np.empty((N, C, chunks))
        part_b = np.empty((N, C, chunks))
        args = (first.reshape(N * C, S), second.reshape(N * C, S), centre.reshape(N * C),
                gradient, rows_per_item, part_a.reshape(N * C, chunks),
                part_b.reshape(N * C, chunks))
        if parallel:
            _reduce_rows(*args)
        else:
            _reduce_rows_serial(*args)
    else:
        part_a = np.empty((N, row_blocks, C))
        part_b = np.empty((N, row_blocks, C))
        args = (first, second, centre, gradient, rows_per_block, channel_blocks, part_a, part_b)
        if parallel:
            _reduce_tiles(*args)
        else:
            _reduce_tiles_serial(*args)
    total_a = np.zeros((N, C))
    total_b = np.zeros((N, C))
    for n in range(N):
        for c in range(C):
            if channels_last:
                for k in range(row_blocks):
                    total_a[n, c] += part_a[n, k, c]
                    total_b[n, c] += part_b[n, k, c]
            else:
                for k in range(chunks):
                    total_a[n, c] += part_a[n, c, k]
                    total_b[n, c] += part_b[n, c, k]
    return total_a, total_b


@njit(**HELPER_OPTIONS)
def _elementwise(x, x2, y, shift, scale, offset, scale2, backward, channels_last, split,
                 parallel):
    _, _, rows_per_item, chunks, rows_per_block, _, channel_blocks = split
    if not channels_last:
        N, C, S = x.shape
        args = (x.reshape(N * C, S), x2.reshape(N * C, S), y.reshape(N * C, S),
                shift.reshape(N * C), scale.reshape(N * C), offset.reshape(N * C),
                scale2.reshape(N * C), backward, rows_per_item, chunks)
        if parallel:
            _elementwise_rows(*args)
        else:
            _elementwise_rows_serial(*args)
    else:
        args = (x, x2, y, shift, scale, offset, scale2, backward, rows_per_block,
                channel_blocks)
        if parallel:
            _elementwise_tiles(*args)
        else:
            _elementwise_tiles_serial(*args)


# ---------------------------------------------------------------------------
# Compiled entry points. Inputs are typed read-only so that read-only arrays
# are accepted; a length-0 array stands for None.

def _array(dtype, ndim, readonly=False):
    return types.Array(dtype, ndim, "C", readonly=readonly)


def _signatures(make):
    return [make(dtype) for dtype in (types.float32, types.float64)]


_SPLIT = types.UniTuple(types.int64, 7)


def _forward_signature(dtype):
    tensor_in, vector_in = _array(dtype, 3, readonly=True), _array(dtype, 1, readonly=True)
    return types.void(tensor_in, vector_in, vector_in, types.float64, types.boolean,
                      _array(dtype, 3), _array(dtype, 2), _array(dtype, 2),
                      _array(types.float64, 2), types.boolean, _SPLIT, types.boolean)


def _backward_signature(dtype):
    tensor_in, vector_in = _array(dtype, 3, readonly=True), _array(dtype, 1, readonly=True)
    stats_in = _array(dtype, 2, readonly=True)
    return types.void(tensor_in, tensor_in, vector_in, stats_in, stats_in, types.boolean,
                      _array(dtype, 3), _array(dtype, 1), _array(dtype, 1), types.boolean,
                      _SPLIT, types.boolean)


@njit(_signatures(_forward_signature), **JIT_OPTIONS)
def _forward_kernel(x, weight, bias, eps, compute_stats, y, mean, rstd, variance,
                    channels_last, split, parallel):
    N, G = mean.shape
    C = x.shape[2] if channels_last else x.shape[1]
    S = x.size // (N * C)
    D = C // G
    if split[0]:
        args = (x.reshape(N * G, D, S), y.reshape(N * G, D, S), G, weight, bias, eps,
                compute_stats, mean.reshape(N * G), rstd.reshape(N * G),
                variance.reshape(variance.size), np.empty(N * G, x.dtype),
                np.empty((N * G, D), x.dtype), np.empty((N * G, D), x.dtype))
        if parallel:
            _forward_groups(*args)
        else:
            _forward_groups_serial(*args)
        return
    # The sums' centres: each group's pivot, a value of x's type.
    centre = np.empty((N, C), x.dtype)
    sum_shifted = sum_sq = np.zeros((N, C))
    if compute_stats:
        for n in range(N):
            for g in range(G):
                centre[n, g * D:(g + 1) * D] = _pivot(
                    x[n, 0, g * D] if channels_last else x[n, g * D, 0])
        sum_shifted, sum_sq = _channel_sums(x, x, centre, False, channels_last, split, parallel)
    shift = np.empty((N, C), x.dtype)
    scale = np.empty((N, C), x.dtype)
    offset = np.empty((N, C), x.dtype)
    for n in range(N):
        for g in range(G):
            if compute_stats:
                group_shifted = 0.0
                group_sq = 0.0
                for c in range(g * D, (g + 1) * D):
                    group_shifted += sum_shifted[n, c]
                    group_sq += sum_sq[n, c]
                pivot = np.float64(centre[n, g * D])
                rstd_g, var = _rstd(group_shifted, group_sq, D * S, eps)
                centre_offset = group_shifted / (D * S)
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
                shift[n, c] = pivot
                scale[n, c] = alpha
                offset[n, c] = _param(bias, c, 0.0) - centre_offset * alpha
    _elementwise(x, x, y, shift, scale, offset, scale, False, channels_last, split, parallel)


@njit(_signatures(_backward_signature), **JIT_OPTIONS)
def _backward_kernel(grad_out, x, weight, mean, rstd, stats_from_input, grad_x, grad_weight,
                     grad_bias, channels_last, split, parallel):
    N, G = mean.shape
    C = x.shape[2] if channels_last else x.shape[1]
    S = x.size // (N * C)
    D = C // G
    want_dx = grad_x.size > 0
    need_sums = grad_weight.size > 0 or grad_bias.size > 0 or (want_dx and stats_from_input)
    if split[0]:
        sum_dy = np.zeros((N * G, D))
        dot = np.zeros((N * G, D))
        blocks = (N * G, D, S) if want_dx else (0, D, S)
        args = (grad_out.reshape(N * G, D, S), x.reshape(N * G, D, S), grad_x.reshape(blocks),
                G, weight, mean.reshape(N * G), rstd.reshape(N * G), stats_from_input,
                need_sums, sum_dy, dot, np.empty(N * G, x.dtype), np.empty((N * G, D), x.dtype),
                np.empty(N * G, x.dtype), np.empty(N * G, x.dtype))
        if parallel:
            _backward_groups(*args)
        else:
            _backward_groups_serial(*args)
        sum_dy = sum_dy.reshape(N, C)
        dot = dot.reshape(N, C)
    else:
        sum_dy = np.zeros((N, C))
        dot = np.zeros((N, C))
        if need_sums:
            centre = np.empty((N, C), x.dtype)
            for n in range(N):
                for c in range(C):
                    centre[n, c] = mean[n, c // D]
            sum_dy, dot = _channel_sums(grad_out, x, centre, True, channels_last, split,
                                        parallel)
        if want_dx:
            shift = np.empty((N, C), x.dtype)
            scale_dy = np.empty((N, C), x.dtype)
            scale_x = np.zeros((N, C), x.dtype)
            offset = np.zeros((N, C), x.dtype)
            for n in range(N):
                for g in range(G):
                    rstd_g = np.float64(rstd[n, g])
                    weighted_sum_dy = 0.0
                    weighted_dot = 0.0
                    for c in range(g * D, (g + 1) * D):
                        weighted_sum_dy += _param(weight, c, 1.0) * sum_dy[n, c]
                        weighted_dot += _param(weight, c, 1.0) * dot[n, c]
                    for c in range(g * D, (g + 1) * D):
                        shift[n, c] = mean[n, g]
                        scale_dy[n, c] = rstd_g * _param(weight, c, 1.0)
                        if stats_from_input:
                            scale_x[n, c] = -weighted_dot * rstd_g * rstd_g * rstd_g / (D * S)
                            offset[n, c] = -weighted_sum_dy * rstd_g / (D * S)
            _elementwise(grad_out, x, grad_x, shift, scale_dy, offset, scale_x, True,
                         channels_last, split, parallel)
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


# ---------------------------------------------------------------------------
# The backend's kernel functions (calling convention: fastbn/_numpy/__init__.py).

# Length-0 stand-ins for None, per dtype: (vector, tensor); and for the variance.
_ABSENT = {np.dtype(t): (np.empty(0, t), np.empty((0, 0, 0), t)) for t in (np.float32, np.float64)}
_NO_VARIANCE = np.empty((0, 0))


def _shape(x, G, channels_last):
    """(split, threads to use) for a kernel view."""
    N = x.shape[0]
    C, S = (x.shape[2], x.shape[1]) if channels_last else (x.shape[1], x.shape[2])
    return _split(N, C, S, G, channels_last)


def _threads(n_threads, x, items):
    return max(1, min(n_threads, x.size // MIN_ELEMENTS_PER_THREAD, items))


def group_norm_forward(x, weight, bias, eps, compute_stats, y, mean, rstd, variance,
                       channels_last, n_threads):
    absent = _ABSENT[x.dtype][0]
    split = _shape(x, mean.shape[1], channels_last)
    run_kernel(_forward_kernel, _threads(n_threads, x, split[1]),
               x, absent if weight is None else weight, absent if bias is None else bias,
               eps, compute_stats, y, mean, rstd,
               _NO_VARIANCE if variance is None else variance, channels_last, split)


def group_norm_backward(grad_out, x, weight, mean, rstd, stats_from_input,
                        grad_x, grad_weight, grad_bias, channels_last, n_threads):
    absent_vector, absent_tensor = _ABSENT[x.dtype]
    split = _shape(x, mean.shape[1], channels_last)
    run_kernel(_backward_kernel, _threads(n_threads, x, split[1]),
               grad_out, x, absent_vector if weight is None else weight, mean, rstd,
               stats_from_input, absent_tensor if grad_x is None else grad_x,
               absent_vector if grad_weight is None else grad_weight,
               absent_vector if grad_bias is None else grad_bias, channels_last, split)
