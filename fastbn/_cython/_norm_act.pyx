"""Filter Response Normalization (+ TLU) and EvoNorm-S0 kernels (Cython + OpenMP).

The caller (fastbn/frn.py, fastbn/evonorm.py) has validated every argument and
hands over 3-D C-contiguous views, (N, C, S) for channels-first memory and
(N, S, C) for channels-last memory, as for GroupNorm (fastbn/_layout.py).

Both ops normalize each (sample, group) by a statistic of its own values and
then apply a per-channel elementwise function (see _norm_act_loops.h):

  FRN:      group = one channel, r = 1 / sqrt(mean(x^2) + eps),
            y = max(x * r * w + b, tau)  (or without the max)
  EvoNorm:  group = D = C / G channels, r = 1 / sqrt(var(x) + eps) (biased),
            y = x * sigmoid(v x) * r * w + b  (or x * r * w + b)

So one set of kernels does both: `centred` says whether the statistic is the
variance (around the mean) or the mean square (around 0), and the element's mode
(NA_PLAIN, NA_TLU, NA_ACT) what follows. The statistics are GroupNorm's, sums of
x - pivot around the group's first value as fastbn's GroupNorm kernels take them
(here every value is widened to float64 before it is added); fused with the
elementwise pass, which GroupNorm's forward cannot be given (docs/frn_evonorm.md
has the measurement).

Work items, fixed by the shape alone, so the result is the same to the bit for any
thread count (each item computes its groups whole, in a fixed order):
  channels-first: one item per (n, g): statistics over its D * S consecutive
      values, then its D runs of S values while they are in cache; backward:
      per-channel sums, then grad_x.
  channels-last:  one item per (n, block of whole groups, >= MIN_BLOCK_CHANNELS
      channels): column sums over the S rows of the tile, then the tile again.
The parameter gradients add the per-(n, c) sums over n afterwards, in order.

Backward, per (n, c) with g the gradient reaching x * s * a + b (FRN: through TLU's
max, torch.maximum's rule) and u = x * s (s = sigmoid(v x), or 1):
  A = sum(g u), B = sum(g), T = sum(gradient reaching tau) or sum(g x^2 s (1 - s));
  per group R = sum_c w_c A_c and k = -R r^3 / (D S);
  grad_x = g a (s + v x s (1 - s)) + (x - m) k   (m = mean, or 0 for FRN; a = r w),
  grad_w = sum_n A r, grad_b = sum_n B, grad_tau = sum_n T, grad_v = sum_n T r w,
  grad_eps = sum_(n, c) -R r^3 / 2  (FRN, D = 1).
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport isfinite, sqrt
from libc.stdlib cimport calloc, free
from fastbn._cython._arrays cimport data
from fastbn._cython._norm_act_loops cimport (NA_ACT, NA_PLAIN, NA_TLU, run_backward_dx,
                                             run_backward_sums, run_forward, run_stats,
                                             tile_backward_dx, tile_backward_sums, tile_forward,
                                             tile_stats)
from fastbn._cython._openmp_helpers cimport effective_threads
from fastbn._cython._simd cimport select_instruction_set

cnp.import_array()

# The instruction set the loops of this module run (see _simd.h, FASTBN_SIMD).
INSTRUCTION_SET = select_instruction_set()

# Channels-last items hold whole groups and at least this many channels (a float32
# AVX-512 vector's worth per row).
cdef Py_ssize_t MIN_BLOCK_CHANNELS = 16

# ---------------------------------------------------------------------------
# The problem and its work items.

cdef struct Problem:
    Py_ssize_t N, C, S, G, D
    bint channels_last
    bint centred   # statistics around the group mean (EvoNorm) or around 0 (FRN)
    int mode       # NA_PLAIN, NA_TLU or NA_ACT
    double eps
    Py_ssize_t width   # channels-last: channels per block (whole groups)
    Py_ssize_t blocks  # channels-last: blocks per sample
    Py_ssize_t items


cdef Problem make_problem(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                          bint channels_last, bint centred, int mode, double eps) noexcept nogil:
    cdef Problem P
    cdef Py_ssize_t groups_per_block
    P.N, P.C, P.S, P.G, P.D = N, C, S, G, C // G
    P.channels_last, P.centred, P.mode, P.eps = channels_last, centred, mode, eps
    if channels_last:
        groups_per_block = (MIN_BLOCK_CHANNELS + P.D - 1) // P.D
        P.width = groups_per_block * P.D
        P.blocks = (G + groups_per_block - 1) // groups_per_block
        P.items = N * P.blocks
    else:
        P.width = 0
        P.blocks = 0
        P.items = N * G
    return P


cdef inline double group_pivot(floating value) noexcept nogil:
    # As GroupNorm's kernels: a non-finite pivot would turn an inf mean into nan.
    return <double>value if isfinite(<double>value) else 0.0


cdef inline void finish_stats(const Problem* P, double sum, double sum_sq, double pivot,
                              floating* mean_out, floating* rstd_out) noexcept nogil:
    """The group's rstd (and mean when centred) from its sums of x - pivot."""
    cdef double count = <double>(P.D * P.S), var
    if P.centred:
        var = (sum_sq - sum * sum / count) / count
        if var < 0.0:  # rounding only; keeps nan as nan
            var = 0.0
        mean_out[0] = <floating>(pivot + sum / count)
    else:
        var = sum_sq / count  # the mean square
    rstd_out[0] = <floating>(1.0 / sqrt(var + P.eps))


cdef inline floating scale_of(double rstd, const floating* w, Py_ssize_t c) noexcept nogil:
    """a = rstd * w_c, rounded to x's type: the forward and the backward (which
    recomputes TLU's comparison) must see the same value."""
    return <floating>(rstd * <double>w[c]) if w != NULL else <floating>rstd


cdef inline floating param(const floating* p, Py_ssize_t c, floating default) noexcept nogil:
    return p[c] if p != NULL else default


cdef inline const floating* shifted(const floating* p, Py_ssize_t c) noexcept nogil:
    return p + c if p != NULL else NULL


cdef void forward_item(const Problem* P, Py_ssize_t item, const floating* x,
                       const floating* w, const floating* b, const floating* v,
                       const floating* tau, floating* y, floating* mean, floating* rstd,
                       double* pivot, double* sums, double* squares,
                       floating* a) noexcept nogil:
    """One item's statistics, then its output. Channels-last: b is never NULL, and pivot,
    sums, squares, a are (N, C) work arrays of which the item uses its own slots."""
    cdef Py_ssize_t C = P.C, S = P.S, G = P.G, D = P.D
    cdef Py_ssize_t n, g, c, c0, c1, off, k
    cdef double s1, s2, r, centre
    cdef floating unused
    if not P.channels_last:
        n, g = item // G, item % G
        off = (n * C + g * D) * S
        centre = group_pivot(x[off]) if P.centred else 0.0
        run_stats(x + off, D * S, centre, &s1, &s2)
        finish_stats(P, s1, s2, centre, &mean[item] if P.centred else &unused, &rstd[item])
        r = <double>rstd[item]
        for c in range(g * D, (g + 1) * D):
            run_forward(x + off, y + off, S, scale_of(r, w, c), param(b, c, 0), param(v, c, 0),
                        param(tau, c, 0), P.mode)
            off += S
        return
    n, c0 = item // P.blocks, item % P.blocks * P.width
    c1 = min(c0 + P.width, C)
    off = n * S * C
    k = n * C
    for c in range(c0, c1):
        pivot[k + c] = group_pivot(x[off + c // D * D]) if P.centred else 0.0
        sums[k + c] = 0.0
        squares[k + c] = 0.0
    tile_stats(x + off + c0, S, C, c1 - c0, pivot + k + c0, sums + k + c0, squares + k + c0)
    for g in range(c0 // D, c1 // D):
        s1 = 0.0
        s2 = 0.0
        for c in range(g * D, (g + 1) * D):
            s1 += sums[k + c]
            s2 += squares[k + c]
        finish_stats(P, s1, s2, pivot[k + g * D], &mean[n * G + g] if P.centred else &unused,
                     &rstd[n * G + g])
        r = <double>rstd[n * G + g]
        for c in range(g * D, (g + 1) * D):
            a[k + c] = scale_of(r, w, c)
    tile_forward(x + off + c0, y + off + c0, S, C, c1 - c0, a + k + c0, b + c0, shifted(v, c0),
                 shifted(tau, c0), P.mode)


cdef void backward_item(const Problem* P, Py_ssize_t item, const floating* dz,
                        const floating* x, const floating* w, const floating* b,
                        const floating* v, const floating* tau, const floating* mean,
                        const floating* rstd, floating* dx, double* sum_gu, double* sum_g,
                        double* sum_third, floating* a, floating* k_coef,
                        floating* m_coef) noexcept nogil:
    """One item's per-(n, c) sums, then its grad_x (unless dx is NULL). Channels-last: b is
    never NULL, and a, k_coef, m_coef are (N, C) work arrays."""
    cdef Py_ssize_t C = P.C, S = P.S, G = P.G, D = P.D
    cdef Py_ssize_t n, g, c, c0, c1, off, kc
    cdef double r, R, k
    cdef floating m
    if not P.channels_last:
        n, g = item // G, item % G
        off = (n * C + g * D) * S
        r = <double>rstd[item]
        R = 0.0
        for c in range(g * D, (g + 1) * D):
            run_backward_sums(dz + off + (c - g * D) * S, x + off + (c - g * D) * S, S,
                              scale_of(r, w, c), param(b, c, 0), param(v, c, 0),
                              param(tau, c, 0), P.mode, &sum_gu[n * C + c], &sum_g[n * C + c],
                              &sum_third[n * C + c])
            R += (<double>w[c] if w != NULL else 1.0) * sum_gu[n * C + c]
        if dx == NULL:
            return
        k = -R * r * r * r / <double>(D * S)
        m = mean[item] if P.centred else 0
        for c in range(g * D, (g + 1) * D):
            run_backward_dx(dz + off, x + off, dx + off, S, scale_of(r, w, c), param(b, c, 0),
                            param(v, c, 0), param(tau, c, 0), <floating>k, m, P.mode)
            off += S
        return
    n, c0 = item // P.blocks, item % P.blocks * P.width
    c1 = min(c0 + P.width, C)
    off = n * S * C + c0
    kc = n * C
    for c in range(c0, c1):
        sum_gu[kc + c] = 0.0
        sum_g[kc + c] = 0.0
        sum_third[kc + c] = 0.0
        a[kc + c] = scale_of(<double>rstd[n * G + c // D], w, c)
    tile_backward_sums(dz + off, x + off, S, C, c1 - c0, a + kc + c0, b + c0, shifted(v, c0),
                       shifted(tau, c0), P.mode, sum_gu + kc + c0, sum_g + kc + c0,
                       sum_third + kc + c0)
    if dx == NULL:
        return
    for g in range(c0 // D, c1 // D):
        r = <double>rstd[n * G + g]
        R = 0.0
        for c in range(g * D, (g + 1) * D):
            R += (<double>w[c] if w != NULL else 1.0) * sum_gu[kc + c]
        k = -R * r * r * r / <double>(D * S)
        m = mean[n * G + g] if P.centred else 0
        for c in range(g * D, (g + 1) * D):
            k_coef[kc + c] = <floating>k
            m_coef[kc + c] = m
    tile_backward_dx(dz + off, x + off, dx + off, S, C, c1 - c0, a + kc + c0, b + c0,
                     shifted(v, c0), shifted(tau, c0), k_coef + kc + c0, m_coef + kc + c0,
                     P.mode)


# ---------------------------------------------------------------------------
# The kernels (argument checks are the caller's job).

cdef int forward(const Problem* P, const floating* x, const floating* w, const floating* b,
                 const floating* v, const floating* tau, floating* y, floating* mean,
                 floating* rstd, int n_threads) noexcept nogil:
    """Returns 0, or -1 when the work arrays cannot be allocated."""
    cdef Py_ssize_t item, NC = P.N * P.C
    cdef int threads = effective_threads(n_threads, NC * P.S, P.items)
    cdef double* work = NULL
    cdef floating* coef = NULL
    if P.channels_last:  # pivots, sums and squares; a, and zeros for a missing bias
        work = <double*>calloc(3 * NC, sizeof(double))
        coef = <floating*>calloc(NC + P.C, sizeof(floating))
        if work == NULL or coef == NULL:
            free(work)
            free(coef)
            return -1
        if b == NULL:
            b = coef + NC
    cdef double* pivot = work
    cdef double* sums = work + NC if work != NULL else NULL
    cdef double* squares = work + 2 * NC if work != NULL else NULL
    if threads == 1:  # no OpenMP region: starting one costs about 0.5 us, on one thread too
        for item in range(P.items):
            forward_item(P, item, x, w, b, v, tau, y, mean, rstd, pivot, sums, squares, coef)
    else:
        for item in prange(P.items, num_threads=threads, schedule="static"):
            forward_item(P, item, x, w, b, v, tau, y, mean, rstd, pivot, sums, squares, coef)
    free(work)
    free(coef)
    return 0


cdef int backward(const Problem* P, const floating* dz, const floating* x, const floating* w,
                  const floating* b, const floating* v, const floating* tau,
                  const floating* mean, const floating* rstd, floating* dx, floating* dw,
                  floating* db, floating* dtau, floating* dv, double* deps,
                  int n_threads) noexcept nogil:
    """Returns 0, or -1 when the work arrays cannot be allocated. dx, dw, db, dtau, dv,
    deps: NULL for the gradients not wanted."""
    cdef Py_ssize_t item, n, c, g, NC = P.N * P.C
    cdef int threads = effective_threads(n_threads, NC * P.S, P.items)
    cdef double total, r, w_c
    cdef double* sums = <double*>calloc(3 * NC, sizeof(double))
    cdef floating* coef = NULL
    if sums == NULL:
        return -1
    if P.channels_last:  # a, k, m, and zeros for a missing bias
        coef = <floating*>calloc(3 * NC + P.C, sizeof(floating))
        if coef == NULL:
            free(sums)
            return -1
        if b == NULL:
            b = coef + 3 * NC
    cdef double* sum_gu = sums
    cdef double* sum_g = sums + NC
    cdef double* sum_third = sums + 2 * NC
    cdef floating* a = coef
    cdef floating* k_coef = coef + NC if coef != NULL else NULL
    cdef floating* m_coef = coef + 2 * NC if coef != NULL else NULL
    if threads == 1:
        for item in range(P.items):
            backward_item(P, item, dz, x, w, b, v, tau, mean, rstd, dx, sum_gu, sum_g,
                          sum_third, a, k_coef, m_coef)
    else:
        for item in prange(P.items, num_threads=threads, schedule="static"):
            backward_item(P, item, dz, x, w, b, v, tau, mean, rstd, dx, sum_gu, sum_g,
                          sum_third, a, k_coef, m_coef)
    # Parameter gradients: sums over the batch in a fixed order.
    for c in range(P.C):
        g = c // P.D
        w_c = <double>w[c] if w != NULL else 1.0
        if dw != NULL:
            total = 0.0
            for n in range(P.N):
                total += sum_gu[n * P.C + c] * <double>rstd[n * P.G + g]
            dw[c] = <floating>total
        if db != NULL:
            total = 0.0
            for n in range(P.N):
                total += sum_g[n * P.C + c]
            db[c] = <floating>total
        if dtau != NULL:
            total = 0.0
            for n in range(P.N):
                total += sum_third[n * P.C + c]
            dtau[c] = <floating>total
        if dv != NULL:
            total = 0.0
            for n in range(P.N):
                total += sum_third[n * P.C + c] * <double>rstd[n * P.G + g]
            dv[c] = <floating>(total * w_c)
    if deps != NULL:  # FRN: the sum over (n, c) of -R r^3 / 2, R = w_c A
        total = 0.0
        for n in range(P.N):
            for c in range(P.C):
                r = <double>rstd[n * P.G + c // P.D]
                total += (<double>w[c] if w != NULL else 1.0) * sum_gu[n * P.C + c] * r * r * r
        deps[0] = -0.5 * total
    free(sums)
    free(coef)
    return 0


# ---------------------------------------------------------------------------
# Python entry points. The caller has checked every argument: one float dtype,
# C-contiguous arrays, 3-D views of x / y. Raw data pointers keep the per-call cost low.

cdef inline void view_sizes(cnp.ndarray x, bint channels_last, Py_ssize_t* N, Py_ssize_t* C,
                            Py_ssize_t* S):
    N[0] = x.shape[0]
    C[0] = x.shape[2] if channels_last else x.shape[1]
    S[0] = x.shape[1] if channels_last else x.shape[2]


cdef run_forward_kernel(Problem* P, cnp.ndarray x, weight, bias, v, tau, cnp.ndarray y, mean,
                        cnp.ndarray rstd, int n_threads):
    cdef void* xp = data(x)
    cdef void* wp = data(weight)
    cdef void* bp = data(bias)
    cdef void* vp = data(v)
    cdef void* tp = data(tau)
    cdef void* yp = data(y)
    cdef void* mp = data(mean)
    cdef void* rp = data(rstd)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = forward(P, <const float*>xp, <const float*>wp, <const float*>bp,
                             <const float*>vp, <const float*>tp, <float*>yp, <float*>mp,
                             <float*>rp, n_threads)
        else:
            status = forward(P, <const double*>xp, <const double*>wp, <const double*>bp,
                             <const double*>vp, <const double*>tp, <double*>yp, <double*>mp,
                             <double*>rp, n_threads)
    if status != 0:
        raise MemoryError()


cdef run_backward_kernel(Problem* P, cnp.ndarray grad_out, cnp.ndarray x, weight, bias, v, tau,
                         mean, cnp.ndarray rstd, grad_x, grad_weight, grad_bias, grad_tau,
                         grad_v, grad_eps, int n_threads):
    cdef void* dzp = data(grad_out)
    cdef void* xp = data(x)
    cdef void* wp = data(weight)
    cdef void* bp = data(bias)
    cdef void* vp = data(v)
    cdef void* tp = data(tau)
    cdef void* mp = data(mean)
    cdef void* rp = data(rstd)
    cdef void* dxp = data(grad_x)
    cdef void* dwp = data(grad_weight)
    cdef void* dbp = data(grad_bias)
    cdef void* dtp = data(grad_tau)
    cdef void* dvp = data(grad_v)
    cdef double* dep = <double*>data(grad_eps)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = backward(P, <const float*>dzp, <const float*>xp, <const float*>wp,
                              <const float*>bp, <const float*>vp, <const float*>tp,
                              <const float*>mp, <const float*>rp, <float*>dxp, <float*>dwp,
                              <float*>dbp, <float*>dtp, <float*>dvp, dep, n_threads)
        else:
            status = backward(P, <const double*>dzp, <const double*>xp, <const double*>wp,
                              <const double*>bp, <const double*>vp, <const double*>tp,
                              <const double*>mp, <const double*>rp, <double*>dxp, <double*>dwp,
                              <double*>dbp, <double*>dtp, <double*>dvp, dep, n_threads)
    if status != 0:
        raise MemoryError()


def filter_response_norm_forward(cnp.ndarray x, weight, bias, tau, double eps, cnp.ndarray y,
                                 cnp.ndarray rstd, bint channels_last, int n_threads):
    cdef Py_ssize_t N, C, S
    view_sizes(x, channels_last, &N, &C, &S)
    cdef Problem P = make_problem(N, C, S, C, channels_last, False,
                                  NA_TLU if tau is not None else NA_PLAIN, eps)
    run_forward_kernel(&P, x, weight, bias, None, tau, y, None, rstd, n_threads)


def filter_response_norm_backward(cnp.ndarray grad_out, cnp.ndarray x, cnp.ndarray rstd,
                                  weight, bias, tau, grad_x, grad_weight, grad_bias, grad_tau,
                                  grad_eps, bint channels_last, int n_threads):
    cdef Py_ssize_t N, C, S
    view_sizes(x, channels_last, &N, &C, &S)
    cdef Problem P = make_problem(N, C, S, C, channels_last, False,
                                  NA_TLU if tau is not None else NA_PLAIN, 0.0)
    run_backward_kernel(&P, grad_out, x, weight, bias, None, tau, None, rstd, grad_x,
                        grad_weight, grad_bias, grad_tau, None, grad_eps, n_threads)


def evonorm_s0_forward(cnp.ndarray x, weight, bias, v, double eps, cnp.ndarray y,
                       cnp.ndarray mean, cnp.ndarray rstd, bint channels_last, int n_threads):
    cdef Py_ssize_t N, C, S
    view_sizes(x, channels_last, &N, &C, &S)
    cdef Problem P = make_problem(N, C, S, mean.shape[1], channels_last, True,
                                  NA_ACT if v is not None else NA_PLAIN, eps)
    run_forward_kernel(&P, x, weight, bias, v, None, y, mean, rstd, n_threads)


def evonorm_s0_backward(cnp.ndarray grad_out, cnp.ndarray x, cnp.ndarray mean,
                        cnp.ndarray rstd, weight, v, grad_x, grad_weight, grad_bias, grad_v,
                        bint channels_last, int n_threads):
    cdef Py_ssize_t N, C, S
    view_sizes(x, channels_last, &N, &C, &S)
    cdef Problem P = make_problem(N, C, S, mean.shape[1], channels_last, True,
                                  NA_ACT if v is not None else NA_PLAIN, 0.0)
    run_backward_kernel(&P, grad_out, x, weight, None, v, None, mean, rstd, grad_x,
                        grad_weight, grad_bias, None, grad_v, None, n_threads)
