/* Inner loops of the normalization kernels, over one contiguous run of values.
 *
 * The reductions use GCC/Clang vector extensions with explicit lanes: four
 * accumulators of two doubles (8 lanes, the SSE2 register width, so the
 * portable x86-64 build keeps them all in registers). A Cython loop over a
 * lane array was kept in memory and ran at ~2.3 cycles per element; an
 * 8-double vector type was lowered through the stack as well. The order of
 * every floating-point addition is fixed by this source, so the result does
 * not depend on the thread count (or on the instruction set).
 *
 * Every reduction accumulates in float64, whatever the input type. The
 * elementwise loops are plain C that the compiler vectorises at -O3.
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <stddef.h>
#include <string.h>

#define FASTBN_LANES 8
typedef double fastbn_d2 __attribute__((vector_size(2 * sizeof(double))));

/* Four values as two pairs of doubles. GCC lowers a generic float->double
 * vector conversion to scalar converts, so x86 uses the SSE2 instruction. */
#if defined(__SSE2__)
#include <emmintrin.h>
static inline void fastbn_load4_float(const float *p, fastbn_d2 *lo, fastbn_d2 *hi) {
    __m128 v = _mm_loadu_ps(p);
    *lo = (fastbn_d2)_mm_cvtps_pd(v);
    *hi = (fastbn_d2)_mm_cvtps_pd(_mm_movehl_ps(v, v));
}
#else
static inline void fastbn_load4_float(const float *p, fastbn_d2 *lo, fastbn_d2 *hi) {
    fastbn_d2 a = {p[0], p[1]}, b = {p[2], p[3]};
    *lo = a;
    *hi = b;
}
#endif

static inline void fastbn_load4_double(const double *p, fastbn_d2 *lo, fastbn_d2 *hi) {
    memcpy(lo, p, sizeof *lo); /* unaligned loads */
    memcpy(hi, p + 2, sizeof *hi);
}

/* The 8 lanes of four accumulators, folded in a fixed order. */
static inline double fastbn_fold(fastbn_d2 a, fastbn_d2 b, fastbn_d2 c, fastbn_d2 d) {
    fastbn_d2 v = (a + b) + (c + d);
    return v[0] + v[1];
}

#define FASTBN_DEFINE_LOOPS(T)                                                                \
                                                                                              \
/* sum(x - pivot), sum((x - pivot)^2) */                                                      \
static void fastbn_shifted_sums_##T(const T *x, ptrdiff_t n, double pivot,      \
                                                  double *sum_out, double *sum_sq_out) {      \
    fastbn_d2 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}; \
    ptrdiff_t i = 0;                                                                          \
    for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                                        \
        fastbn_d2 d0, d1, d2, d3;                                                             \
        fastbn_load4_##T(x + i, &d0, &d1);                                                    \
        fastbn_load4_##T(x + i + 4, &d2, &d3);                                                \
        d0 -= pivot; d1 -= pivot; d2 -= pivot; d3 -= pivot;                                   \
        a0 += d0; a1 += d1; a2 += d2; a3 += d3;                                               \
        b0 += d0 * d0; b1 += d1 * d1; b2 += d2 * d2; b3 += d3 * d3;                           \
    }                                                                                         \
    double t1 = fastbn_fold(a0, a1, a2, a3), t2 = fastbn_fold(b0, b1, b2, b3);                \
    for (; i < n; i++) {                                                                      \
        double d = (double)x[i] - pivot;                                                      \
        t1 += d;                                                                              \
        t2 += d * d;                                                                          \
    }                                                                                         \
    *sum_out = t1;                                                                            \
    *sum_sq_out = t2;                                                                         \
}                                                                                             \
                                                                                              \
/* sum(dy), sum((x - mean) * dy) */                                                           \
static void fastbn_grad_sums_##T(const T *dy, const T *x, ptrdiff_t n,          \
                                               double mean, double *sum_dy_out,               \
                                               double *dot_out) {                             \
    fastbn_d2 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}; \
    ptrdiff_t i = 0;                                                                          \
    for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                                        \
        fastbn_d2 g0, g1, g2, g3, x0, x1, x2, x3;                                             \
        fastbn_load4_##T(dy + i, &g0, &g1);                                                   \
        fastbn_load4_##T(dy + i + 4, &g2, &g3);                                               \
        fastbn_load4_##T(x + i, &x0, &x1);                                                    \
        fastbn_load4_##T(x + i + 4, &x2, &x3);                                                \
        a0 += g0; a1 += g1; a2 += g2; a3 += g3;                                               \
        b0 += (x0 - mean) * g0; b1 += (x1 - mean) * g1;                                       \
        b2 += (x2 - mean) * g2; b3 += (x3 - mean) * g3;                                       \
    }                                                                                         \
    double t1 = fastbn_fold(a0, a1, a2, a3), t2 = fastbn_fold(b0, b1, b2, b3);                \
    for (; i < n; i++) {                                                                      \
        double g = (double)dy[i];                                                             \
        t1 += g;                                                                              \
        t2 += ((double)x[i] - mean) * g;                                                      \
    }                                                                                         \
    *sum_dy_out = t1;                                                                         \
    *dot_out = t2;                                                                            \
}                                                                                             \
                                                                                              \
/* y = (x - shift) * scale + offset */                                                        \
static void fastbn_affine_##T(const T *x, T *y, ptrdiff_t n, T shift, T scale, \
                                            T offset) {                                       \
    for (ptrdiff_t i = 0; i < n; i++)                                                         \
        y[i] = (x[i] - shift) * scale + offset;                                               \
}                                                                                             \
                                                                                              \
/* dx = dy * a + (x - mean) * b + d */                                                        \
static void fastbn_grad_input_##T(const T *dy, const T *x, T *dx, ptrdiff_t n,  \
                                                T mean, T a, T b, T d) {                      \
    for (ptrdiff_t i = 0; i < n; i++)                                                         \
        dx[i] = dy[i] * a + (x[i] - mean) * b + d;                                            \
}                                                                                             \
                                                                                              \
/* Channels-last rows: acc1[c] += x[c] - centre[c]; acc2[c] += (x[c] - centre[c])^2 */        \
static void fastbn_row_shifted_sums_##T(const T *x, ptrdiff_t n,                \
                                                      const double *centre, double *acc1,     \
                                                      double *acc2) {                         \
    for (ptrdiff_t c = 0; c < n; c++) {                                                       \
        double d = (double)x[c] - centre[c];                                                  \
        acc1[c] += d;                                                                         \
        acc2[c] += d * d;                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Channels-last rows: acc1[c] += dy[c]; acc2[c] += (x[c] - centre[c]) * dy[c] */             \
static void fastbn_row_grad_sums_##T(const T *dy, const T *x, ptrdiff_t n,      \
                                                   const double *centre, double *acc1,        \
                                                   double *acc2) {                            \
    for (ptrdiff_t c = 0; c < n; c++) {                                                       \
        double g = (double)dy[c];                                                             \
        acc1[c] += g;                                                                         \
        acc2[c] += ((double)x[c] - centre[c]) * g;                                            \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Channels-last rows: y[c] = (x[c] - shift[c]) * scale[c] + offset[c] */                     \
static void fastbn_row_affine_##T(const T *x, T *y, ptrdiff_t n, const T *shift, \
                                                const T *scale, const T *offset) {            \
    for (ptrdiff_t c = 0; c < n; c++)                                                         \
        y[c] = (x[c] - shift[c]) * scale[c] + offset[c];                                      \
}                                                                                             \
                                                                                              \
/* Channels-last rows: dx[c] = dy[c] * a[c] + (x[c] - mean[c]) * b[c] + d[c] */               \
static void fastbn_row_grad_input_##T(const T *dy, const T *x, T *dx,           \
                                                    ptrdiff_t n, const T *mean, const T *a,   \
                                                    const T *b, const T *d) {                 \
    for (ptrdiff_t c = 0; c < n; c++)                                                         \
        dx[c] = dy[c] * a[c] + (x[c] - mean[c]) * b[c] + d[c];                                \
}

FASTBN_DEFINE_LOOPS(float)
FASTBN_DEFINE_LOOPS(double)

#endif /* FASTBN_SIMD_H */
