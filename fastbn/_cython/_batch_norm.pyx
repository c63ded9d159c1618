"""BatchNorm forward and backward kernels (Cython + OpenMP).

The caller (fastbn/batch_norm.py) has validated every argument and hands over
3-D C-contiguous views: (N, C, S) for channels-first memory, (N, S, C) for
channels-last memory (and for 2-D input, where S = 1), and C-contiguous
per-channel vectors.

Work is split into fixed items that do not depend on the thread count:
  channels-first: (n, c, chunk of S)   -- so N = 1 with few channels still fills every thread;
  channels-last:  (block of rows, block of channels).
Each item writes its own partial sums; the partials of a channel are added in a
fixed order afterwards. The result is therefore the same to the bit for any
number of threads.

Statistics accumulate in float64 in 8 explicit SIMD lanes (_simd.h) over values shifted by
a per-channel pivot (the channel's first value), which keeps the one-pass
sum / sum-of-squares accurate on data with a large mean. The normalize pass
computes y = (x - pivot) * scale + offset, which keeps that accuracy in y.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, isfinite
from libc.stdlib cimport calloc, free

cnp.import_array()

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
# Inner loops over one contiguous run of values: C with explicit SIMD lanes
# (see _simd.h for why), one name per dtype, picked here by the fused type.

cdef extern from "_simd.h" nogil:
    void fastbn_shifted_sums_float(const float*, Py_ssize_t, double, double*, double*)
    void fastbn_shifted_sums_double(const double*, Py_ssize_t, double, double*, double*)
    void fastbn_grad_sums_float(const float*, const float*, Py_ssize_t, double, double*, double*)
    void fastbn_grad_sums_double(const double*, const double*, Py_ssize_t, double, double*,
                                 double*)
    void fastbn_affine_float(const float*, float*, Py_ssize_t, float, float, float)
    void fastbn_affine_double(const double*, double*, Py_ssize_t, double, double, double)
    void fastbn_grad_input_float(const float*, const float*, float*, Py_ssize_t,
                                 float, float, float, float)
    void fastbn_grad_input_double(const double*, const double*, double*, Py_ssize_t,
                                  double, double, double, double)
    void fastbn_row_shifted_sums_float(const float*, Py_ssize_t, const double*, double*, double*)
    void fastbn_row_shifted_sums_double(const double*, Py_ssize_t, const double*, double*,
                                        double*)
    void fastbn_row_grad_sums_float(const float*, const float*, Py_ssize_t, const double*,
                                    double*, double*)
    void fastbn_row_grad_sums_double(const double*, const double*, Py_ssize_t, const double*,
                                     double*, double*)
    void fastbn_row_affine_float(const float*, float*, Py_ssize_t, const float*, const float*,
                                 const float*)
    void fastbn_row_affine_double(const double*, double*, Py_ssize_t, const double*,
                                  const double*, const double*)
    void fastbn_row_grad_input_float(const float*, const float*, float*, Py_ssize_t,
                                     const float*, const float*, const float*, const float*)
    void fastbn_row_grad_input_double(const double*, const double*, double*, Py_ssize_t,
                                      const double*, const double*, const double*,
                                      const double*)


cdef inline void shifted_sums(const floating* x, Py_ssize_t n, double pivot,
                              double* sum_out, double* sum_sq_out) noexcept nogil:
    if floating is float:
        fastbn_shifted_sums_float(x, n, pivot, sum_out, sum_sq_out)
    else:
        fastbn_shifted_sums_double(x, n, pivot, sum_out, sum_sq_out)


cdef inline void grad_sums(const floating* dy, const floating* x, Py_ssize_t n, double mean,
                           double* sum_dy_out, double* dot_out) noexcept nogil:
    if floating is float:
        fastbn_grad_sums_float(dy, x, n, mean, sum_dy_out, dot_out)
    else:
        fastbn_grad_sums_double(dy, x, n, mean, sum_dy_out, dot_out)


cdef inline void affine_run(const floating* x, floating* y, Py_ssize_t n,
                            floating shift, floating scale, floating offset) noexcept nogil:
    if floating is float:
        fastbn_affine_float(x, y, n, shift, scale, offset)
    else:
        fastbn_affine_double(x, y, n, shift, scale, offset)


cdef inline void grad_input_run(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                                floating mean, floating a, floating b, floating d) noexcept nogil:
    if floating is float:
        fastbn_grad_input_float(dy, x, dx, n, mean, a, b, d)
    else:
        fastbn_grad_input_double(dy, x, dx, n, mean, a, b, d)


cdef inline void row_shifted_sums(const floating* x, Py_ssize_t n, const double* centre,
                                  double* acc1, double* acc2) noexcept nogil:
    if floating is float:
        fastbn_row_shifted_sums_float(x, n, centre, acc1, acc2)
    else:
        fastbn_row_shifted_sums_double(x, n, centre, acc1, acc2)


cdef inline void row_grad_sums(const floating* dy, const floating* x, Py_ssize_t n,
                               const double* centre, double* acc1, double* acc2) noexcept nogil:
    if floating is float:
        fastbn_row_grad_sums_float(dy, x, n, centre, acc1, acc2)
    else:
        fastbn_row_grad_sums_double(dy, x, n, centre, acc1, acc2)


cdef inline void row_affine(const floating* x, floating* y, Py_ssize_t n, const floating* shift,
                            const floating* scale, const floating* offset) noexcept nogil:
    if floating is float:
        fastbn_row_affine_float(x, y, n, shift, scale, offset)
    else:
        fastbn_row_affine_double(x, y, n, shift, scale, offset)


cdef inline void row_grad_input(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                                const floating* mean, const floating* a, const floating* b,
                                const floating* d) noexcept nogil:
    if floating is float:
        fastbn_row_grad_input_float(dy, x, dx, n, mean, a, b, d)
    else:
        fastbn_row_grad_input_double(dy, x, dx, n, mean, a, b, d)


# ---------------------------------------------------------------------------
# Passes over the whole tensor. `part_a` and `part_b` hold one partial per
# (row, chunk) for channels-first and one per (row block, channel) for channels-last.

cdef void reduce_pass(const floating* first, const floating* second, const double* centre,
                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                      bint gradient, Split split, int n_threads,
                      double* part_a, double* part_b) noexcept nogil:
    """Per-item partial sums: shifted_sums(first) or, when gradient, grad_sums(first=dy, second=x)."""
    cdef Py_ssize_t item, row, chunk, start, stop, c, r, rb, cb, c0, c1, r0, r1
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
                if gradient:
                    row_grad_sums(first + r * C + c0, second + r * C + c0, c1 - c0, centre + c0,
                                  part_a + rb * C + c0, part_b + rb * C + c0)
                else:
                    row_shifted_sums(first + r * C + c0, c1 - c0, centre + c0,
                                     part_a + rb * C + c0, part_b + rb * C + c0)


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
                off = r * C + c0
                if x2 == NULL:
                    row_affine(x + off, y + off, c1 - c0, shift + c0, scale + c0, offset + c0)
                else:
                    row_grad_input(x + off, x2 + off, y + off, c1 - c0, shift + c0, scale + c0,
                                   scale2 + c0, offset + c0)


# ---------------------------------------------------------------------------
# The two ops, on raw pointers. Every per-channel vector is C-contiguous.

cdef int forward(const floating* xp, const floating* w, const floating* b,
                 floating* rm, floating* rv, bint training, double momentum, double eps,
                 floating* yp, floating* save_mean, floating* save_invstd,
                 Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                 int n_threads) noexcept nogil:
    """Returns -1 when out of memory, else 0."""
    cdef Py_ssize_t count = N * S, c
    cdef Split split = make_split(N, C, S, channels_last)
    cdef int threads = effective_threads(n_threads, N * C * S, split.items)
    cdef Py_ssize_t n_partials = split.items if not channels_last else split.row_blocks * C
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
            if rm != NULL:
                rm[c] = <floating>(momentum * mean + (1.0 - momentum) * rm[c])
            if rv != NULL:
                rv[c] = <floating>(momentum * (var_sum / (count - 1)) + (1.0 - momentum) * rv[c])
            alpha = invstd * (<double>w[c] if w != NULL else 1.0)
            shift[c] = <floating>pivot[c]
            offset[c] = <floating>((<double>b[c] if b != NULL else 0.0)
                                   - sum_shifted[c] / count * alpha)
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
                     threads)
    free(work)
    free(coef)
    return 0


cdef int backward(const floating* dyp, const floating* xp, const floating* w,
                  const floating* save_mean, const floating* save_invstd, bint training,
                  floating* dx, floating* dw, floating* db,
                  Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                  int n_threads) noexcept nogil:
    """Outputs that are NULL are skipped. Returns -1 when out of memory, else 0."""
    cdef Py_ssize_t count = N * S, c
    # Pass 1 is needed for the parameter gradients, and for dx in training.
    cdef bint need_sums = dw != NULL or db != NULL or (dx != NULL and training)
    cdef Split split = make_split(N, C, S, channels_last)
    cdef int threads = effective_threads(n_threads, N * C * S, split.items)
    cdef Py_ssize_t n_partials = split.items if not channels_last else split.row_blocks * C
    cdef double* work = <double*>calloc(2 * n_partials + 3 * C, sizeof(double))
    cdef floating* coef = <floating*>calloc(4 * C, sizeof(floating))
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
    cdef double invstd, w_c, k
    for c in range(C):
        centre[c] = <double>save_mean[c]
    if need_sums:
        reduce_pass(dyp, xp, centre, N, C, S, channels_last, True, split, threads,
                    part_a, part_b)
        sum_partials(part_a, part_b, N, C, channels_last, split, sum_dy, dot)
    for c in range(C):
        invstd = <double>save_invstd[c]
        w_c = <double>w[c] if w != NULL else 1.0
        if dw != NULL:
            dw[c] = <floating>(dot[c] * invstd)
        if db != NULL:
            db[c] = <floating>sum_dy[c]
        # training: dx = (dy - sum_dy/n - (x - mean) * dot * invstd^2 / n) * invstd * w
        # eval:     dx = dy * invstd * w
        mean_f[c] = save_mean[c]
        scale_dy[c] = <floating>(invstd * w_c)
        if training:
            k = dot[c] * invstd * invstd / count
            scale_x[c] = <floating>(-k * invstd * w_c)
            offset[c] = <floating>(-sum_dy[c] / count * invstd * w_c)
    if dx != NULL:
        if training:
            elementwise_pass(dyp, xp, dx, mean_f, scale_dy, offset, scale_x,
                             N, C, S, channels_last, split, threads)
        else:
            # scale_x and offset are zero (calloc): dx = (dy - 0) * scale_dy + 0.
            elementwise_pass(dyp, NULL, dx, scale_x, scale_dy, offset, NULL,
                             N, C, S, channels_last, split, threads)
    free(work)
    free(coef)
    return 0


# ---------------------------------------------------------------------------
# Python entry points. The caller (fastbn/batch_norm.py) has checked every
# argument: one float dtype, C-contiguous arrays, 3-D views of x / y. Raw data
# pointers keep the per-call cost low (no buffer acquisition per argument).

cdef inline void* data(object array):
    return NULL if array is None else cnp.PyArray_DATA(<cnp.ndarray>array)


def batch_norm_forward(cnp.ndarray x, weight, bias, running_mean, running_var, bint training,
                       double momentum, double eps, cnp.ndarray y, cnp.ndarray save_mean,
                       cnp.ndarray save_invstd, bint channels_last, int n_threads):
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
                             N, C, S, channels_last, n_threads)
        else:
            status = forward(<const double*>xp, <const double*>wp, <const double*>bp,
                             <double*>rmp, <double*>rvp, training, momentum, eps,
                             <double*>yp, <double*>mp, <double*>ip,
                             N, C, S, channels_last, n_threads)
    if status != 0:
        raise MemoryError()


def batch_norm_backward(cnp.ndarray grad_out, cnp.ndarray x, weight, cnp.ndarray save_mean,
                        cnp.ndarray save_invstd, bint training, grad_x, grad_weight, grad_bias,
                        bint channels_last, int n_threads):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[2] if channels_last else x.shape[1]
    cdef Py_ssize_t S = x.shape[1] if channels_last else x.shape[2]
    cdef void* dyp = data(grad_out)
    cdef void* xp = data(x)
    cdef void* wp = data(weight)
    cdef void* mp = data(save_mean)
    cdef void* ip = data(save_invstd)
    cdef void* dxp = data(grad_x)
    cdef void* dwp = data(grad_weight)
    cdef void* dbp = data(grad_bias)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = backward(<const float*>dyp, <const float*>xp, <const float*>wp,
                              <const float*>mp, <const float*>ip, training,
                              <float*>dxp, <float*>dwp, <float*>dbp,
                              N, C, S, channels_last, n_threads)
        else:
            status = backward(<const double*>dyp, <const double*>xp, <const double*>wp,
                              <const double*>mp, <const double*>ip, training,
                              <double*>dxp, <double*>dwp, <double*>dbp,
                              N, C, S, channels_last, n_threads)
    if status != 0:
        raise MemoryError()
