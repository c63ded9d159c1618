"""BatchNorm forward and backward kernels (Cython + OpenMP).

The caller (fastbn/batch_norm.py) has validated every argument and hands over
3-D C-contiguous views: (N, C, S) for channels-first memory, (N, S, C) for
channels-last memory (and for 2-D input, where S = 1), and C-contiguous
per-channel vectors.

Work is split into fixed items that do not depend on the thread count
(see `Split`): channels-first, blocks of (n, c) rows, long rows cut into
chunks so that N = 1 with few channels still fills every thread;
channels-last, blocks of rows x blocks of channels.
Each item writes its own partial sums; the partials of a channel are added in a
fixed order afterwards. The result is therefore the same to the bit for any
number of threads.

Statistics are summed over values shifted by a per-channel pivot (the channel's first
value), in blocks in the input's type added in float64 (_batch_norm_loops.h), which keeps
the one-pass sum / sum-of-squares accurate on data with a large mean. The normalize pass
computes y = (x - pivot) * scale + offset, which keeps that accuracy in y.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, isfinite
from fastbn._cython._openmp_helpers cimport effective_threads
from libc.stdlib cimport calloc, free
from fastbn._cython._arrays cimport data
from fastbn._cython._simd cimport select_instruction_set

cnp.import_array()

# The instruction set the loops of this module run (see _simd.h, FASTBN_SIMD).
INSTRUCTION_SET = select_instruction_set()

# Elements in one work item: big enough to amortise the per-item overhead,
# small enough that N = 1 with few channels still gives every thread work.
cdef Py_ssize_t CHUNK_ELEMENTS = 4096
# Channels in one channels-last column block.
cdef Py_ssize_t CHANNEL_BLOCK = 256


cdef struct Split:
    # The tensor as a matrix of `rows` rows: (N * C, S) channels-first, (N * S, C)
    # channels-last. Items are (block of rows_per_block rows, inner part), where the
    # inner part is a chunk of S (channels-first: long rows are cut into `inner`
    # chunks) or a block of channels (channels-last: `inner` channel blocks).
    Py_ssize_t rows
    Py_ssize_t rows_per_block
    Py_ssize_t blocks
    Py_ssize_t inner
    Py_ssize_t items


cdef Split make_split(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last) noexcept nogil:
    cdef Split split
    cdef Py_ssize_t row_length
    if not channels_last:
        split.rows = N * C
        row_length = S
        split.inner = (S + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
    else:
        split.rows = N * S
        row_length = min(C, CHANNEL_BLOCK)
        split.inner = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    # Short rows are grouped so that an item still holds about CHUNK_ELEMENTS values.
    split.rows_per_block = max(1, CHUNK_ELEMENTS // row_length)
    split.blocks = (split.rows + split.rows_per_block - 1) // split.rows_per_block
    split.items = split.blocks * split.inner
    return split


# ---------------------------------------------------------------------------
# The loops over one work item are C (_batch_norm_loops.h, on _simd.h's vectors, compiled
# for each instruction set); one name per dtype, picked here by the fused type.

from fastbn._cython._batch_norm_loops cimport (
    fastbn_cf_elementwise_double, fastbn_cf_elementwise_float, fastbn_cf_sums_double,
    fastbn_cf_sums_float, fastbn_cl_elementwise_double, fastbn_cl_elementwise_float,
    fastbn_cl_sums_double, fastbn_cl_sums_float)


# The fused activation of a pass (fastbn/_activations.py): its code (0: none), leaky_relu's
# slope and, in the backward, what recomputes the BatchNorm output z from x:
# z = (x - mean) * za + zb per channel (mean: the forward's save_mean).
cdef struct Activation:
    int code
    double slope
    const void* mean
    const void* za
    const void* zb


cdef Activation NO_ACTIVATION = Activation(0, 0.0, NULL, NULL, NULL)


# ---------------------------------------------------------------------------
# Passes over the whole tensor: the work items in parallel. `part_a` and
# `part_b` hold one partial per (row, chunk) for channels-first and one per
# (row block, channel) for channels-last.

cdef struct Item:
    Py_ssize_t block, row0, row1  # the item's block of rows [row0, row1)
    Py_ssize_t chunk, start, stop  # channels-first: chunk `chunk` of a row, values start:stop
    Py_ssize_t c0, c1  # channels-last: channels c0:c1


cdef inline Item item_at(Split split, Py_ssize_t item, Py_ssize_t C, Py_ssize_t S,
                         bint channels_last) noexcept nogil:
    """What work item `item` covers."""
    cdef Item it
    it.block = item // split.inner
    it.chunk = item - it.block * split.inner
    it.row0 = it.block * split.rows_per_block
    it.row1 = min(it.row0 + split.rows_per_block, split.rows)
    if not channels_last:
        it.start = it.chunk * S // split.inner
        it.stop = (it.chunk + 1) * S // split.inner
    else:
        it.c0 = it.chunk * CHANNEL_BLOCK
        it.c1 = min(it.c0 + CHANNEL_BLOCK, C)
    return it


cdef inline void reduce_item(const floating* first, const floating* second,
                             const double* centre, Py_ssize_t C, Py_ssize_t S,
                             bint channels_last, Split split, Py_ssize_t item,
                             double* part_a, double* part_b, Activation act) noexcept nogil:
    """One item's sums: shifted sums of first (second == NULL) or gradient sums (dy, x),
    dy first taken through the activation's derivative."""
    cdef Item it = item_at(split, item, C, S, channels_last)
    if not channels_last:
        if floating is float:
            fastbn_cf_sums_float(first, second, S, C, it.row0, it.row1, it.start, it.stop,
                                 split.inner, it.chunk, centre, part_a, part_b, act.code,
                                 <float>act.slope, <const float*>act.mean,
                                 <const float*>act.za, <const float*>act.zb)
        else:
            fastbn_cf_sums_double(first, second, S, C, it.row0, it.row1, it.start, it.stop,
                                  split.inner, it.chunk, centre, part_a, part_b, act.code,
                                  act.slope, <const double*>act.mean, <const double*>act.za,
                                  <const double*>act.zb)
    else:
        if floating is float:
            fastbn_cl_sums_float(first, second, C, it.row0, it.row1, it.c0, it.c1, centre,
                                 part_a + it.block * C, part_b + it.block * C, act.code,
                                 <float>act.slope, <const float*>act.mean,
                                 <const float*>act.za, <const float*>act.zb)
        else:
            fastbn_cl_sums_double(first, second, C, it.row0, it.row1, it.c0, it.c1, centre,
                                  part_a + it.block * C, part_b + it.block * C, act.code,
                                  act.slope, <const double*>act.mean, <const double*>act.za,
                                  <const double*>act.zb)


cdef void reduce_pass(const floating* first, const floating* second, const double* centre,
                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                      Split split, int n_threads, double* part_a, double* part_b,
                      Activation act) noexcept nogil:
    """Every item's sums (see reduce_item)."""
    cdef Py_ssize_t item
    if n_threads == 1:  # no OpenMP region: starting one costs about 0.5 us, on one thread too
        for item in range(split.items):
            reduce_item(first, second, centre, C, S, channels_last, split, item, part_a, part_b,
                        act)
        return
    # Guided: items go to threads as they come free, so a thread the machine deschedules
    # (a vCPU of a busy host) holds up only the item it is on, where a static split would
    # hold up its whole share. Each item writes its own partials: the bits do not depend
    # on which thread ran what.
    for item in prange(split.items, nogil=True, num_threads=n_threads, schedule="guided"):
        reduce_item(first, second, centre, C, S, channels_last, split, item, part_a, part_b, act)


cdef void sum_partials(const double* part_a, const double* part_b, Py_ssize_t N, Py_ssize_t C,
                       bint channels_last, Split split, double* total_a, double* total_b) noexcept nogil:
    """Add each channel's partials in a fixed order (thread-count independent)."""
    cdef Py_ssize_t c, n, k, block, base
    for c in range(C):
        total_a[c] = 0.0
        total_b[c] = 0.0
    if not channels_last:
        for n in range(N):
            for c in range(C):
                base = (n * C + c) * split.inner
                for k in range(split.inner):
                    total_a[c] += part_a[base + k]
                    total_b[c] += part_b[base + k]
    else:
        for block in range(split.blocks):
            for c in range(C):
                total_a[c] += part_a[block * C + c]
                total_b[c] += part_b[block * C + c]


cdef inline void elementwise_item(const floating* x, const floating* x2, floating* y,
                                  const floating* shift, const floating* scale,
                                  const floating* offset, const floating* scale2,
                                  Py_ssize_t C, Py_ssize_t S, bint channels_last, Split split,
                                  Py_ssize_t item, Activation act) noexcept nogil:
    """One item of elementwise_pass."""
    cdef Item it = item_at(split, item, C, S, channels_last)
    if not channels_last:
        if floating is float:
            fastbn_cf_elementwise_float(x, x2, y, S, C, it.row0, it.row1, it.start, it.stop,
                                        shift, scale, scale2, offset, act.code,
                                        <float>act.slope, <const float*>act.za,
                                        <const float*>act.zb)
        else:
            fastbn_cf_elementwise_double(x, x2, y, S, C, it.row0, it.row1, it.start, it.stop,
                                         shift, scale, scale2, offset, act.code, act.slope,
                                         <const double*>act.za, <const double*>act.zb)
    else:
        if floating is float:
            fastbn_cl_elementwise_float(x, x2, y, C, it.row0, it.row1, it.c0, it.c1, shift,
                                        scale, scale2, offset, act.code, <float>act.slope,
                                        <const float*>act.za, <const float*>act.zb)
        else:
            fastbn_cl_elementwise_double(x, x2, y, C, it.row0, it.row1, it.c0, it.c1, shift,
                                         scale, scale2, offset, act.code, act.slope,
                                         <const double*>act.za, <const double*>act.zb)


cdef void elementwise_pass(const floating* x, const floating* x2, floating* y,
                           const floating* shift, const floating* scale, const floating* offset,
                           const floating* scale2,
                           Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                           Split split, int n_threads, Activation act) noexcept nogil:
    """y = act((x - shift) * scale + offset), or with x2 given (backward):
    y = g * scale + (x2 - shift) * scale2 + offset, g = x * act'(z), all per channel."""
    cdef Py_ssize_t item
    if n_threads == 1:  # no OpenMP region, as in reduce_pass (and guided, as there)
        for item in range(split.items):
            elementwise_item(x, x2, y, shift, scale, offset, scale2, C, S, channels_last, split,
                             item, act)
        return
    for item in prange(split.items, nogil=True, num_threads=n_threads, schedule="guided"):
        elementwise_item(x, x2, y, shift, scale, offset, scale2, C, S, channels_last, split,
                         item, act)


# ---------------------------------------------------------------------------
# The two ops, on raw pointers. Every per-channel vector is C-contiguous.

cdef int forward(const floating* xp, const floating* w, const floating* b,
                 floating* rm, floating* rv, bint training, double momentum, double eps,
                 floating* yp, floating* save_mean, floating* save_invstd,
                 Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                 int n_threads, int activation, double slope) noexcept nogil:
    """Returns -1 when out of memory, else 0."""
    cdef Py_ssize_t count = N * S, c
    cdef Split split = make_split(N, C, S, channels_last)
    cdef int threads = effective_threads(n_threads, N * C * S, split.items)
    cdef Py_ssize_t n_partials = split.rows * split.inner if not channels_last else split.blocks * C
    # One allocation for every temporary: partials, per-channel sums and coefficients.
    cdef double* work = <double*>calloc(2 * n_partials + 3 * C, sizeof(double))
    cdef floating* coef = <floating*>calloc(3 * C, sizeof(floating))
    if work == NULL or coef == NULL:
        free(work)
        free(coef)
        return -1
    cdef double* part_a = work
    cdef double* part_b = work + n_partials
    cdef double* pivot = work + 2 * n_partials
    cdef double* sum_shifted = pivot + C
    cdef double* sum_sq = sum_shifted + C
    cdef floating* shift = coef
    cdef floating* scale = coef + C
    cdef floating* offset = coef + 2 * C
    cdef double mean, var_sum, invstd, alpha
    # Multiplying by these instead of dividing per channel: the divider was the
    # bottleneck of this loop with hundreds of channels and small maps.
    cdef double inv_count = 1.0 / count
    cdef double inv_count_unbiased = 1.0 / (count - 1) if count > 1 else 0.0
    if training:
        for c in range(C):
            # A non-finite pivot would turn an inf mean into nan; 0 keeps PyTorch's result.
            pivot[c] = <double>(xp[c * S] if not channels_last else xp[c])
            if not isfinite(pivot[c]):
                pivot[c] = 0.0
        reduce_pass(xp, <const floating*>NULL, pivot, N, C, S, channels_last, split, threads,
                    part_a, part_b, NO_ACTIVATION)
        sum_partials(part_a, part_b, N, C, channels_last, split, sum_shifted, sum_sq)
    for c in range(C):
        if training:
            mean = pivot[c] + sum_shifted[c] * inv_count
            var_sum = sum_sq[c] - sum_shifted[c] * sum_shifted[c] * inv_count
            if var_sum < 0.0:  # rounding only; keeps nan as nan
                var_sum = 0.0
            # As ATen: a zero variance with eps == 0 gives invstd 0, not inf.
            if var_sum == 0.0 and eps == 0.0:
                invstd = 0.0
            else:
                invstd = 1.0 / sqrt(var_sum * inv_count + eps)
            if rm != NULL:
                rm[c] = <floating>(momentum * mean + (1.0 - momentum) * rm[c])
            if rv != NULL:
                rv[c] = <floating>(momentum * (var_sum * inv_count_unbiased)
                                   + (1.0 - momentum) * rv[c])
            alpha = invstd * (<double>w[c] if w != NULL else 1.0)
            shift[c] = <floating>pivot[c]
            offset[c] = <floating>((<double>b[c] if b != NULL else 0.0)
                                   - sum_shifted[c] * inv_count * alpha)
        else:
            mean = <double>rm[c]
            invstd = 1.0 / sqrt(<double>rv[c] + eps)
            alpha = invstd * (<double>w[c] if w != NULL else 1.0)
            shift[c] = rm[c]
            offset[c] = b[c] if b != NULL else 0.0
        scale[c] = <floating>alpha
        save_mean[c] = <floating>mean
        save_invstd[c] = <floating>invstd
    elementwise_pass(xp, NULL, yp, shift, scale, offset, NULL, N, C, S, channels_last, split,
                     threads, Activation(activation, slope, NULL, NULL, NULL))
    free(work)
    free(coef)
    return 0


cdef int backward(const floating* dyp, const floating* xp, const floating* w,
                  const floating* bias, const floating* save_mean, const floating* save_invstd,
                  bint training, floating* dx, floating* dw, floating* db,
                  Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                  int n_threads, int activation, double slope) noexcept nogil:
    """Outputs that are NULL are skipped. Returns -1 when out of memory, else 0.

    With an activation, dyp is the gradient of act(z) and z = (x - mean) * invstd * w + b is
    recomputed from x: both passes take dy through act'(z) first."""
    cdef Py_ssize_t count = N * S, c
    # Pass 1 is needed for the parameter gradients, and for dx in training.
    cdef bint need_sums = dw != NULL or db != NULL or (dx != NULL and training)
    cdef Split split = make_split(N, C, S, channels_last)
    cdef int threads = effective_threads(n_threads, N * C * S, split.items)
    cdef Py_ssize_t n_partials = split.rows * split.inner if not channels_last else split.blocks * C
    cdef double* work = <double*>calloc(2 * n_partials + 3 * C, sizeof(double))
    cdef floating* coef = <floating*>calloc(6 * C, sizeof(floating))
    if work == NULL or coef == NULL:
        free(work)
        free(coef)
        return -1
    cdef double* part_a = work
    cdef double* part_b = work + n_partials
    cdef double* centre = work + 2 * n_partials
    cdef double* sum_dy = centre + C
    cdef double* dot = sum_dy + C
    cdef floating* mean_f = coef
    cdef floating* scale_dy = coef + C
    cdef floating* scale_x = coef + 2 * C
    cdef floating* offset = coef + 3 * C
    cdef floating* z_scale = coef + 4 * C
    cdef floating* z_offset = coef + 5 * C
    cdef double invstd, w_c, k
    cdef double inv_count = 1.0 / count
    cdef Activation act = Activation(activation, slope, mean_f, z_scale, z_offset)
    for c in range(C):
        centre[c] = <double>save_mean[c]
        mean_f[c] = save_mean[c]
        if activation:
            z_scale[c] = <floating>(<double>save_invstd[c] * (<double>w[c] if w != NULL else 1.0))
            z_offset[c] = bias[c] if bias != NULL else 0.0
    if need_sums:
        reduce_pass(dyp, xp, centre, N, C, S, channels_last, split, threads,
                    part_a, part_b, act)
        sum_partials(part_a, part_b, N, C, channels_last, split, sum_dy, dot)
    for c in range(C):
        invstd = <double>save_invstd[c]
        w_c = <double>w[c] if w != NULL else 1.0
        if dw != NULL:
            dw[c] = <floating>(dot[c] * invstd)
        if db != NULL:
            db[c] = <floating>sum_dy[c]
        # training: dx = (g - sum_g/n - (x - mean) * dot * invstd^2 / n) * invstd * w
        # eval:     dx = g * invstd * w          (g = dy, or dy * act'(z))
        scale_dy[c] = <floating>(invstd * w_c)
        if training:
            k = dot[c] * invstd * invstd * inv_count
            scale_x[c] = <floating>(-k * invstd * w_c)
            offset[c] = <floating>(-sum_dy[c] * inv_count * invstd * w_c)
    if dx != NULL:
        if training or activation:
            # In eval mode scale_x and offset are zero (calloc): x is read only for z.
            elementwise_pass(dyp, xp, dx, mean_f, scale_dy, offset, scale_x,
                             N, C, S, channels_last, split, threads, act)
        else:
            # scale_x and offset are zero (calloc): dx = (dy - 0) * scale_dy + 0.
            elementwise_pass(dyp, NULL, dx, scale_x, scale_dy, offset, NULL,
                             N, C, S, channels_last, split, threads, NO_ACTIVATION)
    free(work)
    free(coef)
    return 0


# ---------------------------------------------------------------------------
# Python entry points. The caller (fastbn/batch_norm.py) has checked every
# argument: one float dtype, C-contiguous arrays, 3-D views of x / y. Raw data
# pointers keep the per-call cost low (no buffer acquisition per argument).


def batch_norm_forward(cnp.ndarray x, weight, bias, running_mean, running_var, bint training,
                       double momentum, double eps, cnp.ndarray y, cnp.ndarray save_mean,
                       cnp.ndarray save_invstd, bint channels_last, int n_threads,
                       int activation=0, double negative_slope=0.0, counter=None):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[2] if channels_last else x.shape[1]
    cdef Py_ssize_t S = x.shape[1] if channels_last else x.shape[2]
    cdef void* xp = data(x)
    cdef void* wp = data(weight)
    cdef void* bp = data(bias)
    cdef void* rmp = data(running_mean)
    cdef void* rvp = data(running_var)
    cdef void* yp = data(y)
    cdef void* mp = data(save_mean)
    cdef void* ip = data(save_invstd)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = forward(<const float*>xp, <const float*>wp, <const float*>bp,
                             <float*>rmp, <float*>rvp, training, momentum, eps,
                             <float*>yp, <float*>mp, <float*>ip,
                             N, C, S, channels_last, n_threads, activation, negative_slope)
        else:
            status = forward(<const double*>xp, <const double*>wp, <const double*>bp,
                             <double*>rmp, <double*>rvp, training, momentum, eps,
                             <double*>yp, <double*>mp, <double*>ip,
                             N, C, S, channels_last, n_threads, activation, negative_slope)
    if status != 0:
        raise MemoryError()
    if training and counter is not None:
        # Counted here, in the call that updated the running statistics: no Python code
        # runs in between, so an interrupt cannot separate the two.
        (<cnp.int64_t*>data(counter))[0] += 1


def batch_norm_backward(cnp.ndarray grad_out, cnp.ndarray x, weight, cnp.ndarray save_mean,
                        cnp.ndarray save_invstd, bint training, grad_x, grad_weight, grad_bias,
                        bint channels_last, int n_threads, int activation=0,
                        double negative_slope=0.0, bias=None):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[2] if channels_last else x.shape[1]
    cdef Py_ssize_t S = x.shape[1] if channels_last else x.shape[2]
    cdef void* dyp = data(grad_out)
    cdef void* xp = data(x)
    cdef void* wp = data(weight)
    cdef void* bp = data(bias)
    cdef void* mp = data(save_mean)
    cdef void* ip = data(save_invstd)
    cdef void* dxp = data(grad_x)
    cdef void* dwp = data(grad_weight)
    cdef void* dbp = data(grad_bias)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = backward(<const float*>dyp, <const float*>xp, <const float*>wp,
                              <const float*>bp, <const float*>mp, <const float*>ip, training,
                              <float*>dxp, <float*>dwp, <float*>dbp,
                              N, C, S, channels_last, n_threads, activation, negative_slope)
        else:
            status = backward(<const double*>dyp, <const double*>xp, <const double*>wp,
                              <const double*>bp, <const double*>mp, <const double*>ip,
                              training, <double*>dxp, <double*>dwp, <double*>dbp,
                              N, C, S, channels_last, n_threads, activation, negative_slope)
    if status != 0:
        raise MemoryError()
