"""BatchNorm forward and backward kernels (Cython + OpenMP).

The caller (fastbn/batch_norm.py) has validated every argument and hands over
3-D C-contiguous views: (N, C, S) for channels-first memory, (N, S, C) for
channels-last memory (and for 2-D input, where S = 1).

Work is split into fixed items that do not depend on the thread count:
  channels-first: (n, c, chunk of S)   -- so N = 1 with few channels still fills every thread;
  channels-last:  (block of rows, block of channels).
Each item writes its own partial sums; the partials of a channel are added in a
fixed order afterwards. The result is therefore the same to the bit for any
number of threads.

Statistics accumulate in float64 in LANES independent accumulators (so the
compiler can vectorise the loop without reassociating) over values shifted by
a per-channel pivot (the channel's first value), which keeps the one-pass
sum / sum-of-squares accurate on data with a large mean. The normalize pass
computes y = (x - pivot) * scale + offset, which keeps that accuracy in y.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, isfinite
from libc.stdlib cimport calloc, free

cdef enum:
    # Independent accumulators per reduction: wide enough for an AVX-512 register of doubles.
    LANES = 8

# Elements in one work item: big enough to amortise the per-item overhead,
# small enough that N = 1 with few channels still gives every thread work.
cdef Py_ssize_t CHUNK_ELEMENTS = 4096
# Channels in one channels-last column block.
cdef Py_ssize_t CHANNEL_BLOCK = 256
# Below this many elements per thread, extra threads cost more than they bring.
cdef Py_ssize_t MIN_ELEMENTS_PER_THREAD = 16384


cdef struct Split:
    # channels-first: rows = N * C rows of length S, each cut into `chunks` pieces.
    # channels-last:  row_blocks x channel_blocks tiles of the (N * S, C) matrix.
    Py_ssize_t items
    Py_ssize_t chunks
    Py_ssize_t rows_per_block
    Py_ssize_t row_blocks
    Py_ssize_t channel_blocks


cdef Split make_split(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last) noexcept nogil:
    cdef Split split
    cdef Py_ssize_t width
    if not channels_last:
        split.chunks = (S + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
        split.items = N * C * split.chunks
        split.rows_per_block = 0
        split.row_blocks = 0
        split.channel_blocks = 0
    else:
        width = C if C < CHANNEL_BLOCK else CHANNEL_BLOCK
        split.channel_blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
        split.rows_per_block = CHUNK_ELEMENTS // width
        if split.rows_per_block < 1:
            split.rows_per_block = 1
        split.row_blocks = (N * S + split.rows_per_block - 1) // split.rows_per_block
        split.items = split.row_blocks * split.channel_blocks
        split.chunks = 0
    return split


cdef int effective_threads(int n_threads, Py_ssize_t n_elements, Py_ssize_t items) noexcept nogil:
    cdef Py_ssize_t useful = n_elements // MIN_ELEMENTS_PER_THREAD
    if useful < n_threads:
        n_threads = <int>useful
    if items < n_threads:
        n_threads = <int>items
    return n_threads if n_threads > 1 else 1


# ---------------------------------------------------------------------------
# Inner loops over one contiguous run of values.

cdef inline void shifted_sums(const floating* x, Py_ssize_t n, double pivot,
                              double* sum_out, double* sum_sq_out) noexcept nogil:
    """sum(x - pivot) and sum((x - pivot)**2), float64, LANES accumulators."""
    cdef double s1[LANES]
    cdef double s2[LANES]
    cdef double d
    cdef Py_ssize_t block, i, j, n_main = n - n % LANES
    for j in range(LANES):
        s1[j] = 0.0
        s2[j] = 0.0
    for block in range(n_main // LANES):
        i = block * LANES
        for j in range(LANES):
            d = <double>x[i + j] - pivot
            s1[j] += d
            s2[j] += d * d
    for i in range(n_main, n):
        d = <double>x[i] - pivot
        s1[0] += d
        s2[0] += d * d
    for j in range(1, LANES):
        s1[0] += s1[j]
        s2[0] += s2[j]
    sum_out[0] = s1[0]
    sum_sq_out[0] = s2[0]


cdef inline void grad_sums(const floating* dy, const floating* x, Py_ssize_t n, double mean,
                           double* sum_dy_out, double* dot_out) noexcept nogil:
    """sum(dy) and sum((x - mean) * dy), float64, LANES accumulators."""
    cdef double s1[LANES]
    cdef double s2[LANES]
    cdef double g
    cdef Py_ssize_t block, i, j, n_main = n - n % LANES
    for j in range(LANES):
        s1[j] = 0.0
        s2[j] = 0.0
    for block in range(n_main // LANES):
        i = block * LANES
        for j in range(LANES):
            g = <double>dy[i + j]
            s1[j] += g
            s2[j] += (<double>x[i + j] - mean) * g
    for i in range(n_main, n):
        g = <double>dy[i]
        s1[0] += g
        s2[0] += (<double>x[i] - mean) * g
    for j in range(1, LANES):
        s1[0] += s1[j]
        s2[0] += s2[j]
    sum_dy_out[0] = s1[0]
    dot_out[0] = s2[0]


cdef inline void affine_run(const floating* x, floating* y, Py_ssize_t n,
                            floating shift, floating scale, floating offset) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = (x[i] - shift) * scale + offset


cdef inline void grad_input_run(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                                floating mean, floating a, floating b, floating d) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = dy[i] * a + (x[i] - mean) * b + d


# ---------------------------------------------------------------------------
# Passes over the whole tensor. `part_a` and `part_b` hold one partial per
# (row, chunk) for channels-first and one per (row block, channel) for channels-last.

cdef void reduce_pass(const floating* first, const floating* second, const double* centre,
                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                      bint gradient, Split split, int n_threads,
                      double* part_a, double* part_b) noexcept nogil:
    """Per-item partial sums: shifted_sums(first) or, when gradient, grad_sums(first=dy, second=x)."""
    cdef Py_ssize_t item, row, chunk, start, stop, c, r, rb, cb, c0, c1, r0, r1
    cdef const floating* base
    cdef const floating* base2
    cdef double d, g
    for item in prange(split.items, nogil=True, num_threads=n_threads, schedule="static"):
        if not channels_last:
            row = item // split.chunks
            chunk = item - row * split.chunks
            start = chunk * S // split.chunks
            stop = (chunk + 1) * S // split.chunks
            c = row % C
            if gradient:
                grad_sums(first + row * S + start, second + row * S + start, stop - start,
                          centre[c], &part_a[item], &part_b[item])
            else:
                shifted_sums(first + row * S + start, stop - start, centre[c],
                             &part_a[item], &part_b[item])
        else:
            rb = item // split.channel_blocks
            cb = item - rb * split.channel_blocks
            c0 = cb * CHANNEL_BLOCK
            c1 = c0 + CHANNEL_BLOCK
            if c1 > C:
                c1 = C
            r0 = rb * split.rows_per_block
            r1 = r0 + split.rows_per_block
            if r1 > N * S:
                r1 = N * S
            for c in range(c0, c1):
                part_a[rb * C + c] = 0.0
                part_b[rb * C + c] = 0.0
            # Rows outer, channels inner: contiguous reads, and the channel loop vectorises.
            for r in range(r0, r1):
                base = first + r * C
                if gradient:
                    base2 = second + r * C
                    for c in range(c0, c1):
                        g = <double>base[c]
                        part_a[rb * C + c] += g
                        part_b[rb * C + c] += (<double>base2[c] - centre[c]) * g
                else:
                    for c in range(c0, c1):
                        d = <double>base[c] - centre[c]
                        part_a[rb * C + c] += d
                        part_b[rb * C + c] += d * d


cdef void sum_partials(const double* part_a, const double* part_b, Py_ssize_t N, Py_ssize_t C,
                       bint channels_last, Split split, double* total_a, double* total_b) noexcept nogil:
    """Add each channel's partials in a fixed order (thread-count independent)."""
    cdef Py_ssize_t c, n, k, rb, base
    for c in range(C):
        total_a[c] = 0.0
        total_b[c] = 0.0
    if not channels_last:
        for n in range(N):
            for c in range(C):
                base = (n * C + c) * split.chunks
                for k in range(split.chunks):
                    total_a[c] += part_a[base + k]
                    total_b[c] += part_b[base + k]
    else:
        for rb in range(split.row_blocks):
            for c in range(C):
                total_a[c] += part_a[rb * C + c]
                total_b[c] += part_b[rb * C + c]


cdef void elementwise_pass(const floating* x, const floating* x2, floating* y,
                           const floating* shift, const floating* scale, const floating* offset,
                           const floating* scale2,
                           Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                           Split split, int n_threads) noexcept nogil:
    """y = (x - shift) * scale + offset, or with x2 given (backward):
    y = x * scale + (x2 - shift) * scale2 + offset, all per channel."""
    cdef Py_ssize_t item, row, chunk, start, stop, c, r, rb, cb, c0, c1, r0, r1, off
    for item in prange(split.items, nogil=True, num_threads=n_threads, schedule="static"):
        if not channels_last:
            row = item // split.chunks
            chunk = item - row * split.chunks
            start = chunk * S // split.chunks
            stop = (chunk + 1) * S // split.chunks
            c = row % C
            off = row * S + start
            if x2 == NULL:
                affine_run(x + off, y + off, stop - start, shift[c], scale[c], offset[c])
            else:
                grad_input_run(x + off, x2 + off, y + off, stop - start,
                               shift[c], scale[c], scale2[c], offset[c])
        else:
            rb = item // split.channel_blocks
            cb = item - rb * split.channel_blocks
            c0 = cb * CHANNEL_BLOCK
            c1 = c0 + CHANNEL_BLOCK
            if c1 > C:
                c1 = C
            r0 = rb * split.rows_per_block
            r1 = r0 + split.rows_per_block
            if r1 > N * S:
                r1 = N * S
            for r in range(r0, r1):
                off = r * C
                if x2 == NULL:
                    for c in range(c0, c1):
                        y[off + c] = (x[off + c] - shift[c]) * scale[c] + offset[c]
                else:
                    for c in range(c0, c1):
                        y[off + c] = (x[off + c] * scale[c] + (x2[off + c] - shift[c]) * scale2[c]
                                      + offset[c])


# ---------------------------------------------------------------------------
# Entry points (argument checks are the caller's job).

def batch_norm_forward(const floating[:, :, ::1] x, object weight, object bias,
                       object running_mean, object running_var, bint training,
                       double momentum, double eps,
                       floating[:, :, ::1] y, floating[::1] save_mean, floating[::1] save_invstd,
                       bint channels_last, int n_threads):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[1] if not channels_last else x.shape[2]
    cdef Py_ssize_t S = x.shape[2] if not channels_last else x.shape[1]
    cdef Py_ssize_t count = N * S, c
    cdef const floating[::1] w
    cdef const floating[::1] b
    # Training updates the running statistics; eval mode only reads them, and they may be
    # read-only there (a writeable memoryview refuses a read-only array).
    cdef floating[:] rm
    cdef floating[:] rv
    cdef const floating[:] rm_eval
    cdef const floating[:] rv_eval
    cdef bint has_w = weight is not None, has_b = bias is not None
    cdef bint has_rm = running_mean is not None, has_rv = running_var is not None
    if has_w:
        w = weight
    if has_b:
        b = bias
    if training:
        if has_rm:
            rm = running_mean
        if has_rv:
            rv = running_var
    else:  # the caller checked that eval mode has both
        rm_eval = running_mean
        rv_eval = running_var

    cdef Split split = make_split(N, C, S, channels_last)
    cdef int threads = effective_threads(n_threads, N * C * S, split.items)
    cdef Py_ssize_t n_partials = split.items if not channels_last else split.row_blocks * C
    # One allocation for every temporary: partials, per-channel sums and coefficients.
    cdef double* work = <double*>calloc(2 * n_partials + 3 * C, sizeof(double))
    cdef floating* coef = <floating*>calloc(3 * C, sizeof(floating))
    if work == NULL or coef == NULL:
        free(work)
        free(coef)
        raise MemoryError()
    cdef double* part_a = work
    cdef double* part_b = work + n_partials
    cdef double* pivot = work + 2 * n_partials
    cdef double* sum_shifted = pivot + C
    cdef double* sum_sq = sum_shifted + C
    cdef floating* shift = coef
    cdef floating* scale = coef + C
    cdef floating* offset = coef + 2 * C
    cdef const floating* xp = &x[0, 0, 0]
    cdef double mean, var_sum, invstd, alpha
    try:
        with nogil:
            if training:
                for c in range(C):
                    # A non-finite pivot would turn an inf mean into nan; 0 keeps PyTorch's result.
                    pivot[c] = <double>(xp[c * S] if not channels_last else xp[c])
                    if not isfinite(pivot[c]):
                        pivot[c] = 0.0
                reduce_pass(xp, NULL, pivot, N, C, S, channels_last, False, split, threads,
                            part_a, part_b)
                sum_partials(part_a, part_b, N, C, channels_last, split, sum_shifted, sum_sq)
            for c in range(C):
                if training:
                    mean = pivot[c] + sum_shifted[c] / count
                    var_sum = sum_sq[c] - sum_shifted[c] * sum_shifted[c] / count
                    if var_sum < 0.0:  # rounding only; keeps nan as nan
                        var_sum = 0.0
                    # As ATen: a zero variance with eps == 0 gives invstd 0, not inf.
                    if var_sum == 0.0 and eps == 0.0:
                        invstd = 0.0
                    else:
                        invstd = 1.0 / sqrt(var_sum / count + eps)
                    if has_rm:
                        rm[c] = <floating>(momentum * mean + (1.0 - momentum) * rm[c])
                    if has_rv:
                        rv[c] = <floating>(momentum * (var_sum / (count - 1)) + (1.0 - momentum) * rv[c])
                    alpha = invstd * (<double>w[c] if has_w else 1.0)
                    shift[c] = <floating>pivot[c]
                    offset[c] = <floating>((<double>b[c] if has_b else 0.0)
                                           - sum_shifted[c] / count * alpha)
                else:
                    mean = <double>rm_eval[c]
                    invstd = 1.0 / sqrt(<double>rv_eval[c] + eps)
                    alpha = invstd * (<double>w[c] if has_w else 1.0)
                    shift[c] = rm_eval[c]
                    offset[c] = b[c] if has_b else 0.0
                scale[c] = <floating>alpha
                save_mean[c] = <floating>mean
                save_invstd[c] = <floating>invstd
            elementwise_pass(xp, NULL, &y[0, 0, 0], shift, scale, offset, NULL,
                             N, C, S, channels_last, split, threads)
    finally:
        free(work)
        free(coef)


def batch_norm_backward(const floating[:, :, ::1] grad_out, const floating[:, :, ::1] x,
                        object weight, const floating[::1] save_mean,
                        const floating[::1] save_invstd, bint training,
                        object grad_x, object grad_weight, object grad_bias,
                        bint channels_last, int n_threads):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[1] if not channels_last else x.shape[2]
    cdef Py_ssize_t S = x.shape[2] if not channels_last else x.shape[1]
    cdef Py_ssize_t count = N * S, c
    cdef const floating[::1] w
    cdef floating[:, :, ::1] dx
    cdef floating[::1] dw
    cdef floating[::1] db
    cdef bint has_w = weight is not None
    cdef bint want_dx = grad_x is not None, want_dw = grad_weight is not None
    cdef bint want_db = grad_bias is not None
    # Pass 1 is needed for the parameter gradients, and for dx in training.
    cdef bint need_sums = want_dw or want_db or (want_dx and training)
    if has_w:
        w = weight
    if want_dx:
        dx = grad_x
    if want_dw:
        dw = grad_weight
    if want_db:
        db = grad_bias

    cdef Split split = make_split(N, C, S, channels_last)
    cdef int threads = effective_threads(n_threads, N * C * S, split.items)
    cdef Py_ssize_t n_partials = split.items if not channels_last else split.row_blocks * C
    cdef double* work = <double*>calloc(2 * n_partials + 3 * C, sizeof(double))
    cdef floating* coef = <floating*>calloc(4 * C, sizeof(floating))
    if work == NULL or coef == NULL:
        free(work)
        free(coef)
        raise MemoryError()
    cdef double* part_a = work
    cdef double* part_b = work + n_partials
    cdef double* centre = work + 2 * n_partials
    cdef double* sum_dy = centre + C
    cdef double* dot = sum_dy + C
    cdef floating* mean_f = coef
    cdef floating* scale_dy = coef + C
    cdef floating* scale_x = coef + 2 * C
    cdef floating* offset = coef + 3 * C
    cdef const floating* dyp = &grad_out[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef double invstd, w_c, k
    try:
        with nogil:
            for c in range(C):
                centre[c] = <double>save_mean[c]
            if need_sums:
                reduce_pass(dyp, xp, centre, N, C, S, channels_last, True, split, threads,
                            part_a, part_b)
                sum_partials(part_a, part_b, N, C, channels_last, split, sum_dy, dot)
            for c in range(C):
                invstd = <double>save_invstd[c]
                w_c = <double>w[c] if has_w else 1.0
                if want_dw:
                    dw[c] = <floating>(dot[c] * invstd)
                if want_db:
                    db[c] = <floating>sum_dy[c]
                # training: dx = (dy - sum_dy/n - (x - mean) * dot * invstd^2 / n) * invstd * w
                # eval:     dx = dy * invstd * w
                mean_f[c] = save_mean[c]
                scale_dy[c] = <floating>(invstd * w_c)
                if training:
                    k = dot[c] * invstd * invstd / count
                    scale_x[c] = <floating>(-k * invstd * w_c)
                    offset[c] = <floating>(-sum_dy[c] / count * invstd * w_c)
            if want_dx:
                if training:
                    elementwise_pass(dyp, xp, &dx[0, 0, 0], mean_f, scale_dy, offset, scale_x,
                                     N, C, S, channels_last, split, threads)
                else:
                    # scale_x and offset are zero (calloc): dx = (dy - 0) * scale_dy + 0.
                    elementwise_pass(dyp, NULL, &dx[0, 0, 0], scale_x, scale_dy, offset, NULL,
                                     N, C, S, channels_last, split, threads)
    finally:
        free(work)
        free(coef)
