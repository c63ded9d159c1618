"""BatchNorm forward and backward kernels (Numba).

The algorithm and the work split are those of the Cython kernels (see the
docstring of fastbn/_cython/_batch_norm.pyx). Work is cut into fixed items that
do not depend on the thread count:
  channels-first (N, C, S): (n, c, chunk of S);
  channels-last  (N, S, C): (block of rows, block of channels) of the (N * S, C) matrix.
Inside `prange` each item writes its partial sums to its own slots of a
partials array; the partials of a channel are then added in a fixed order, so
the result is the same to the bit for any number of threads. Statistics
accumulate in float64 over values shifted by a per-channel pivot (the
channel's first value), and y = (x - pivot) * scale + offset keeps that
accuracy in the output. Channels-first runs are summed by _sums.py (blocks in
x's type, then float64).

The `prange` passes are `parallel=True` functions; the per-item loops are plain
`@njit` helpers inlined into them. Fast-math "reassoc" lets LLVM split a sum
over several vector accumulators, which the Cython kernel spells out by hand
(LANES); the order of the additions is fixed when the code is compiled, so
reassociation does not make results depend on the thread count.

Importing this module compiles the two kernels for float32 and float64, or
loads them from numba's on-disk cache (see docs/numba.md).
"""
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from fastbn._numba._runtime import (HELPER_OPTIONS, INLINE_OPTIONS, JIT_OPTIONS, run_kernel,
                                    serial)
from fastbn._numba._sums import grad_sums, shifted_sums

# Values in one work item: big enough to amortise the per-item overhead, small
# enough that N = 1 with few channels still gives every thread work.
CHUNK_ELEMENTS = 4096
# Channels in one channels-last column block.
CHANNEL_BLOCK = 256
# Below this many values per thread, extra threads cost more than they bring.
# An item holds at most CHUNK_ELEMENTS values, so there are always more items
# than the threads this allows.
MIN_ELEMENTS_PER_THREAD = 16384


# ---------------------------------------------------------------------------
# The work split.

@njit(**HELPER_OPTIONS)
def _channels_spatial(x, channels_last):
    """(C, S) of a 3-D kernel view."""
    return (x.shape[2], x.shape[1]) if channels_last else (x.shape[1], x.shape[2])


@njit(**HELPER_OPTIONS)
def _work_split(N, C, S, channels_last):
    """(items, groups, chunks, rows_per_item).

    channels-first: N * C rows of length S, each cut into `chunks` pieces; an
    item is one piece of a long row (chunks > 1) or `rows_per_item` whole rows.
    channels-last: `groups` row blocks of `rows_per_item` rows, times blocks
    of CHANNEL_BLOCK channels. The partials fill a (groups, C, chunks) array,
    chunks = 1 for channels-last.
    """
    if not channels_last:
        chunks = (S + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
        if chunks > 1:
            return N * C * chunks, N, chunks, 1
        # Several short rows per item: numba's per-item cost (the prange step, the
        # slices) weighs on rows of 49 values (7 x 7 maps).
        rows_per_item = max(1, CHUNK_ELEMENTS // max(S, 1))
        return (N * C + rows_per_item - 1) // rows_per_item, N, 1, rows_per_item
    rows_per_item = max(1, CHUNK_ELEMENTS // min(C, CHANNEL_BLOCK))
    row_blocks = (N * S + rows_per_item - 1) // rows_per_item
    channel_blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    return row_blocks * channel_blocks, row_blocks, 1, rows_per_item


@njit(**INLINE_OPTIONS)
def _row_block(item, rows_per_item, n_rows):
    """Channels-first item of whole rows -> (first row, end row); rows are n * C + c."""
    # (a prange index is unsigned: cast it, or mixed arithmetic turns to float)
    r0 = np.int64(item) * rows_per_item
    return r0, min(r0 + rows_per_item, n_rows)


@njit(**INLINE_OPTIONS)
def _next_channel(c, C):
    """The channel of the next row: stepped, since a division per row of 49 values shows."""
    c += 1
    return c if c < C else 0


@njit(**INLINE_OPTIONS)
def _chunk(item, chunks, S):
    """Channels-first item of a long row -> (row, start, stop) of its piece."""
    item = np.int64(item)
    row = item // chunks
    chunk = item - row * chunks
    return row, chunk * S // chunks, (chunk + 1) * S // chunks


@njit(**INLINE_OPTIONS)
def _tile(item, C, rows_per_item, n_rows):
    """Channels-last item -> (row block, first row, end row, first channel, end channel)."""
    channel_blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    row_block = item // channel_blocks
    c0 = (item - row_block * channel_blocks) * CHANNEL_BLOCK
    r0 = row_block * rows_per_item
    return row_block, r0, min(r0 + rows_per_item, n_rows), c0, min(c0 + CHANNEL_BLOCK, C)


@njit(**HELPER_OPTIONS)
def _sum_partials(part_a, part_b):
    """Per-channel totals of (groups, C, chunks) partials, added in a fixed order."""
    groups, C, chunks = part_a.shape
    total_a = np.zeros(C)
    total_b = np.zeros(C)
    for g in range(groups):
        for c in range(C):
            for k in range(chunks):
                total_a[c] += part_a[g, c, k]
                total_b[c] += part_b[g, c, k]
    return total_a, total_b


# ---------------------------------------------------------------------------
# Loops over one item. Every loop runs over 1-D contiguous slices from index 0,
# so LLVM drops numba's negative-index handling and vectorises. (A 2-D slice
# tile[i, j] is typed non-contiguous and does not vectorise; nor does an index
# like flat[i * C + j]: hence one 1-D slice per row of a channels-last tile.)

def _coef(a, i):
    """a[i] for a per-column array, a itself for a scalar: one loop serves both layouts."""
    return a[i] if isinstance(a, np.ndarray) else a


@overload(_coef, jit_options=HELPER_OPTIONS)
def _coef_jit(a, i):
    if isinstance(a, types.Array):
        return lambda a, i: a[i]
    return lambda a, i: a


@njit(**INLINE_OPTIONS)
def _shifted_sums_tile(x, C, r0, r1, c0, c1, pivot, sum_out, sum_sq_out):
    """Per column of the tile [r0:r1, c0:c1] of the flat (rows, C) matrix x:
    sum(x - pivot) and sum((x - pivot)**2)."""
    sum_out[:] = 0.0
    sum_sq_out[:] = 0.0
    # Rows outer, channels inner: contiguous reads, and the channel loop vectorises.
    for r in range(r0, r1):
        row = x[r * C + c0:r * C + c1]
        for j in range(row.size):
            d = np.float64(row[j]) - pivot[j]
            sum_out[j] += d
            sum_sq_out[j] += d * d


@njit(**INLINE_OPTIONS)
def _grad_sums_tile(dy, x, C, r0, r1, c0, c1, mean, sum_dy_out, dot_out):
    """Per column of the tile [r0:r1, c0:c1] of the flat (rows, C) matrices dy and x:
    sum(dy) and sum((x - mean) * dy)."""
    sum_dy_out[:] = 0.0
    dot_out[:] = 0.0
    for r in range(r0, r1):
        dy_row = dy[r * C + c0:r * C + c1]
        x_row = x[r * C + c0:r * C + c1]
        for j in range(dy_row.size):
            g = np.float64(dy_row[j])
            sum_dy_out[j] += g
            dot_out[j] += (np.float64(x_row[j]) - mean[j]) * g


@njit(**INLINE_OPTIONS)
def _affine_tile(x, y, stride, r0, r1, c0, c1, shift, scale, offset):
    """y = (x - shift) * scale + offset on the tile [r0:r1, c0:c1] of flat (rows, stride)
    matrices; coefficients per column (arrays indexed from c0) or per tile (scalars)."""
    for r in range(r0, r1):
        x_row = x[r * stride + c0:r * stride + c1]
        y_row = y[r * stride + c0:r * stride + c1]
        for j in range(x_row.size):
            y_row[j] = (x_row[j] - _coef(shift, j)) * _coef(scale, j) + _coef(offset, j)


@njit(**INLINE_OPTIONS)
def _grad_input_tile(dy, x, dx, stride, r0, r1, c0, c1, mean, a, b, d):
    """dx = dy * a + (x - mean) * b + d on a tile, as _affine_tile."""
    for r in range(r0, r1):
        start, stop = r * stride + c0, r * stride + c1
        dy_row, x_row, dx_row = dy[start:stop], x[start:stop], dx[start:stop]
        for j in range(dy_row.size):
            dx_row[j] = (dy_row[j] * _coef(a, j) + (x_row[j] - _coef(mean, j)) * _coef(b, j)
                         + _coef(d, j))


# ---------------------------------------------------------------------------
# Passes over the whole tensor: one `prange` over the work items.

@njit(parallel=True, **HELPER_OPTIONS)
def _statistics_partials(x, pivot, channels_last):
    """Per-run sum(x - pivot) and sum((x - pivot)**2), as (groups, C, chunks) arrays."""
    N = x.shape[0]
    C, S = _channels_spatial(x, channels_last)
    items, groups, chunks, rows_per_item = _work_split(N, C, S, channels_last)
    part_sum = np.empty((groups, C, chunks))
    part_sq = np.empty((groups, C, chunks))
    if not channels_last:
        rows = x.reshape(N * C, S)
        flat_sum = part_sum.reshape(N * C * chunks)
        flat_sq = part_sq.reshape(N * C * chunks)
        if chunks == 1:
            # Whole rows, indexed whole: a slice with bounds known only at run time
            # costs numba more than a 49-value row does.
            for item in prange(items):
                r0, r1 = _row_block(item, rows_per_item, N * C)
                c = r0 % C
                for row in range(r0, r1):
                    flat_sum[row], flat_sq[row] = shifted_sums(rows[row], pivot[c])
                    c = _next_channel(c, C)
        else:
            for item in prange(items):
                row, start, stop = _chunk(item, chunks, S)
                flat_sum[item], flat_sq[item] = shifted_sums(rows[row, start:stop],
                                                             pivot[row % C])
    else:
        flat = x.reshape(N * S * C)
        block_sum = part_sum.reshape(groups, C)
        block_sq = part_sq.reshape(groups, C)
        for item in prange(items):
            rb, r0, r1, c0, c1 = _tile(item, C, rows_per_item, N * S)
            _shifted_sums_tile(flat, C, r0, r1, c0, c1, pivot[c0:c1],
                               block_sum[rb, c0:c1], block_sq[rb, c0:c1])
    return part_sum, part_sq


@njit(parallel=True, **HELPER_OPTIONS)
def _gradient_partials(dy, x, mean, channels_last):
    """Per-run sum(dy) and sum((x - mean) * dy), as (groups, C, chunks) arrays."""
    N = x.shape[0]
    C, S = _channels_spatial(x, channels_last)
    items, groups, chunks, rows_per_item = _work_split(N, C, S, channels_last)
    part_dy = np.empty((groups, C, chunks))
    part_dot = np.empty((groups, C, chunks))
    if not channels_last:
        dy_rows = dy.reshape(N * C, S)
        x_rows = x.reshape(N * C, S)
        flat_dy = part_dy.reshape(N * C * chunks)
        flat_dot = part_dot.reshape(N * C * chunks)
        if chunks == 1:  # as in _statistics_partials
            for item in prange(items):
                r0, r1 = _row_block(item, rows_per_item, N * C)
                c = r0 % C
                for row in range(r0, r1):
                    flat_dy[row], flat_dot[row] = grad_sums(dy_rows[row], x_rows[row], mean[c])
                    c = _next_channel(c, C)
        else:
            for item in prange(items):
                row, start, stop = _chunk(item, chunks, S)
                flat_dy[item], flat_dot[item] = grad_sums(dy_rows[row, start:stop],
                                                          x_rows[row, start:stop], mean[row % C])
    else:
        dy_flat = dy.reshape(N * S * C)
        x_flat = x.reshape(N * S * C)
        block_dy = part_dy.reshape(groups, C)
        block_dot = part_dot.reshape(groups, C)
        for item in prange(items):
            rb, r0, r1, c0, c1 = _tile(item, C, rows_per_item, N * S)
            _grad_sums_tile(dy_flat, x_flat, C, r0, r1, c0, c1, mean[c0:c1],
                            block_dy[rb, c0:c1], block_dot[rb, c0:c1])
    return part_dy, part_dot


@njit(parallel=True, **HELPER_OPTIONS)
def _affine_pass(x, y, shift, scale, offset, channels_last):
    """y = (x - shift) * scale + offset with per-channel coefficients."""
    N = x.shape[0]
    C, S = _channels_spatial(x, channels_last)
    items, groups, chunks, rows_per_item = _work_split(N, C, S, channels_last)
    x_flat = x.reshape(N * C * S)
    y_flat = y.reshape(N * C * S)
    if not channels_last and chunks == 1:  # as in _statistics_partials
        x_rows = x.reshape(N * C, S)
        y_rows = y.reshape(N * C, S)
        for item in prange(items):
            r0, r1 = _row_block(item, rows_per_item, N * C)
            c = r0 % C
            for row in range(r0, r1):
                _affine_tile(x_rows[row], y_rows[row], S, 0, 1, 0, S,
                             shift[c], scale[c], offset[c])
                c = _next_channel(c, C)
    elif not channels_last:
        for item in prange(items):
            row, start, stop = _chunk(item, chunks, S)
            c = row % C
            _affine_tile(x_flat, y_flat, S, row, row + 1, start, stop,
                         shift[c], scale[c], offset[c])
    else:
        for item in prange(items):
            rb, r0, r1, c0, c1 = _tile(item, C, rows_per_item, N * S)
            _affine_tile(x_flat, y_flat, C, r0, r1, c0, c1,
                         shift[c0:c1], scale[c0:c1], offset[c0:c1])


@njit(parallel=True, **HELPER_OPTIONS)
def _grad_input_pass(dy, x, dx, mean, a, b, d, channels_last):
    """dx = dy * a + (x - mean) * b + d with per-channel coefficients."""
    N = x.shape[0]
    C, S = _channels_spatial(x, channels_last)
    items, groups, chunks, rows_per_item = _work_split(N, C, S, channels_last)
    dy_flat = dy.reshape(N * C * S)
    x_flat = x.reshape(N * C * S)
    dx_flat = dx.reshape(N * C * S)
    if not channels_last and chunks == 1:  # as in _statistics_partials
        dy_rows = dy.reshape(N * C, S)
        x_rows = x.reshape(N * C, S)
        dx_rows = dx.reshape(N * C, S)
        for item in prange(items):
            r0, r1 = _row_block(item, rows_per_item, N * C)
            c = r0 % C
            for row in range(r0, r1):
                _grad_input_tile(dy_rows[row], x_rows[row], dx_rows[row], S, 0, 1, 0, S,
                                 mean[c], a[c], b[c], d[c])
                c = _next_channel(c, C)
    elif not channels_last:
        for item in prange(items):
            row, start, stop = _chunk(item, chunks, S)
            c = row % C
            _grad_input_tile(dy_flat, x_flat, dx_flat, S, row, row + 1, start, stop,
                             mean[c], a[c], b[c], d[c])
    else:
        for item in prange(items):
            rb, r0, r1, c0, c1 = _tile(item, C, rows_per_item, N * S)
            _grad_input_tile(dy_flat, x_flat, dx_flat, C, r0, r1, c0, c1,
                             mean[c0:c1], a[c0:c1], b[c0:c1], d[c0:c1])


# The same passes for calls on one thread (see _runtime.serial).
_statistics_partials_serial = serial(_statistics_partials)
_gradient_partials_serial = serial(_gradient_partials)
_affine_pass_serial = serial(_affine_pass)
_grad_input_pass_serial = serial(_grad_input_pass)


# ---------------------------------------------------------------------------
# Compiled entry points. Inputs are typed read-only so that read-only arrays
# are accepted (a writeable array converts to that type); a length-0 array
# stands for None.

def _array(dtype, ndim, layout="C", readonly=False):
    return types.Array(dtype, ndim, layout, readonly=readonly)


def _signatures(make):
    return [make(dtype) for dtype in (types.float32, types.float64)]


def _forward_signature(dtype):
    tensor_in, vector_in = _array(dtype, 3, readonly=True), _array(dtype, 1, readonly=True)
    running = _array(dtype, 1, "A")  # updated in place, may be strided
    return types.void(tensor_in, vector_in, vector_in, running, running, types.boolean,
                      types.float64, types.float64, _array(dtype, 3), _array(dtype, 1),
                      _array(dtype, 1), types.boolean, types.boolean)


def _backward_signature(dtype):
    tensor_in, vector_in = _array(dtype, 3, readonly=True), _array(dtype, 1, readonly=True)
    return types.void(tensor_in, tensor_in, vector_in, vector_in, vector_in, types.boolean,
                      _array(dtype, 3), _array(dtype, 1), _array(dtype, 1), types.boolean,
                      types.boolean)


@njit(_signatures(_forward_signature), **JIT_OPTIONS)
def _forward_kernel(x, weight, bias, running_mean, running_var, training, momentum, eps,
                    y, save_mean, save_invstd, channels_last, parallel):
    C, S = _channels_spatial(x, channels_last)
    count = x.shape[0] * S
    has_weight, has_bias = weight.size > 0, bias.size > 0
    shift = np.empty_like(save_mean)
    scale = np.empty_like(save_mean)
    offset = np.empty_like(save_mean)
    if training:
        # The pivot is a value of x's type: the run sums subtract it in that type (_sums.py).
        pivot = np.empty(C, x.dtype)
        for c in range(C):
            first = np.float64(x[0, 0, c] if channels_last else x[0, c, 0])
            # A non-finite pivot would turn an inf mean into nan; 0 keeps PyTorch's result.
            pivot[c] = first if np.isfinite(first) else 0.0
        if parallel:
            partials = _statistics_partials(x, pivot, channels_last)
        else:
            partials = _statistics_partials_serial(x, pivot, channels_last)
        sum_shifted, sum_sq = _sum_partials(*partials)
        for c in range(C):
            mean = pivot[c] + sum_shifted[c] / count
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
            shift[c] = pivot[c]
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
    if parallel:
        _affine_pass(x, y, shift, scale, offset, channels_last)
    else:
        _affine_pass_serial(x, y, shift, scale, offset, channels_last)


@njit(_signatures(_backward_signature), **JIT_OPTIONS)
def _backward_kernel(grad_out, x, weight, save_mean, save_invstd, training,
                     grad_x, grad_weight, grad_bias, channels_last, parallel):
    C, S = _channels_spatial(x, channels_last)
    count = x.shape[0] * S
    has_weight = weight.size > 0
    want_dx, want_dw, want_db = grad_x.size > 0, grad_weight.size > 0, grad_bias.size > 0
    if want_dw or want_db or (want_dx and training):
        if parallel:
            partials = _gradient_partials(grad_out, x, save_mean, channels_last)
        else:
            partials = _gradient_partials_serial(grad_out, x, save_mean, channels_last)
        sum_dy, dot = _sum_partials(*partials)
    else:
        sum_dy, dot = np.zeros(C), np.zeros(C)
    scale_dy = np.empty_like(save_mean)
    scale_x = np.zeros_like(save_mean)
    offset = np.zeros_like(save_mean)
    for c in range(C):
        invstd = np.float64(save_invstd[c])
        w_c = np.float64(weight[c]) if has_weight else 1.0
        if want_dw:
            grad_weight[c] = dot[c] * invstd
        if want_db:
            grad_bias[c] = sum_dy[c]
        # training: dx = (dy - sum_dy/n - (x - mean) * dot * invstd^2 / n) * invstd * w
        # eval:     dx = dy * invstd * w
        scale_dy[c] = invstd * w_c
        if training:
            k = dot[c] * invstd * invstd / count
            scale_x[c] = -k * invstd * w_c
            offset[c] = -sum_dy[c] / count * invstd * w_c
    if want_dx:
        if training:
            if parallel:
                _grad_input_pass(grad_out, x, grad_x, save_mean, scale_dy, scale_x, offset,
                                 channels_last)
            else:
                _grad_input_pass_serial(grad_out, x, grad_x, save_mean, scale_dy, scale_x,
                                        offset, channels_last)
        else:
            # scale_x and offset are zero here: dx = (dy - 0) * scale_dy + 0.
            if parallel:
                _affine_pass(grad_out, grad_x, scale_x, scale_dy, offset, channels_last)
            else:
                _affine_pass_serial(grad_out, grad_x, scale_x, scale_dy, offset, channels_last)


# ---------------------------------------------------------------------------
# The backend's kernel functions (calling convention: fastbn/_numpy/__init__.py).

# Length-0 stand-ins for None, per dtype: (vector, tensor).
_ABSENT = {np.dtype(t): (np.empty(0, t), np.empty((0, 0, 0), t)) for t in (np.float32, np.float64)}


def _threads(n_threads, x):
    return max(1, min(n_threads, x.size // MIN_ELEMENTS_PER_THREAD))


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                       y, save_mean, save_invstd, channels_last, n_threads, activation=0,
                       negative_slope=0.0, counter=None):
    if activation:
        raise NotImplementedError("the numba backend has no fused activation yet")
    absent = _ABSENT[x.dtype][0]
    if not training:
        # Read only here, but the compiled type is writeable (training updates them).
        if not running_mean.flags.writeable:
            running_mean = running_mean.copy()
        if not running_var.flags.writeable:
            running_var = running_var.copy()
    run_kernel(_forward_kernel, _threads(n_threads, x),
               x, absent if weight is None else weight, absent if bias is None else bias,
               absent if running_mean is None else running_mean,
               absent if running_var is None else running_var,
               training, momentum, eps, y, save_mean, save_invstd, channels_last)
    if training and counter is not None:
        counter += 1


def batch_norm_backward(grad_out, x, weight, save_mean, save_invstd, training,
                        grad_x, grad_weight, grad_bias, channels_last, n_threads, activation=0,
                        negative_slope=0.0, bias=None):
    if activation:
        raise NotImplementedError("the numba backend has no fused activation yet")
    absent_vector, absent_tensor = _ABSENT[x.dtype]
    run_kernel(_backward_kernel, _threads(n_threads, x),
               grad_out, x, absent_vector if weight is None else weight,
               save_mean, save_invstd, training,
               absent_tensor if grad_x is None else grad_x,
               absent_vector if grad_weight is None else grad_weight,
               absent_vector if grad_bias is None else grad_bias, channels_last)
