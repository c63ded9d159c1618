/* Inner loops of the normalization kernels, over one contiguous run of values.
 *
 * The reductions accumulate in float64, whatever the input type, in 8 lanes:
 * two accumulators of four doubles, written with GCC/Clang vector extensions
 * so that the lanes are explicit. The compiler keeps them in registers (a
 * Cython loop over a lane array was kept in memory, ~2.3 cycles per element),
 * and the order of every floating-point addition is fixed by this source: the
 * result does not depend on the thread count.
 *
 * Runtime dispatch: on x86-64 Linux, GCC compiles every loop twice, for
 * x86-64-v3 (AVX2 + FMA) and for the portable baseline (SSE2), and picks one
 * at load time by the CPU (target_clones / ifunc). Measured on this project's
 * 2-core AMD EPYC: the AVX2 copies run the training forward about 2x faster
 * (the float64 reductions are compute-bound at SSE2 width). FASTBN_MARCH_NATIVE=1
 * builds for the build machine only, without clones.
 *
 * The elementwise loops are plain C that the compiler vectorises at -O3.
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <stddef.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(__AVX2__)
#define FASTBN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTBN_CLONES
#endif

#define FASTBN_LANES 8
typedef double fastbn_d4 __attribute__((vector_size(4 * sizeof(double))));
typedef float fastbn_f4 __attribute__((vector_size(4 * sizeof(float))));

/* Four values as doubles (unaligned loads). */
static inline fastbn_d4 fastbn_load4_float(const float *p) {
    fastbn_f4 v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, fastbn_d4);
}

static inline fastbn_d4 fastbn_load4_double(const double *p) {
    fastbn_d4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The 8 lanes of two accumulators, folded in a fixed order. */
static inline double fastbn_fold(fastbn_d4 a, fastbn_d4 b) {
    fastbn_d4 v = a + b;
    return (v[0] + v[1]) + (v[2] + v[3]);
}

#define FASTBN_DEFINE_LOOPS(T)                                                                \
                                                                                              \
/* sum(x - pivot), sum((x - pivot)^2) */                                                      \
FASTBN_CLONES static void fastbn_shifted_sums_##T(const T *x, ptrdiff_t n, double pivot,      \
                                                  double *sum_out, double *sum_sq_out) {      \
    fastbn_d4 a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};                                         \
    ptrdiff_t i = 0;                                                                          \
    for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                                        \
        fastbn_d4 d0 = fastbn_load4_##T(x + i) - pivot;                                       \
        fastbn_d4 d1 = fastbn_load4_##T(x + i + 4) - pivot;                                   \
        a0 += d0;                                                                             \
        a1 += d1;                                                                             \
        b0 += d0 * d0;                                                                        \
        b1 += d1 * d1;                                                                        \
    }                                                                                         \
    double t1 = fastbn_fold(a0, a1), t2 = fastbn_fold(b0, b1);                                \
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
FASTBN_CLONES static void fastbn_grad_sums_##T(const T *dy, const T *x, ptrdiff_t n,          \
                                               double mean, double *sum_dy_out,               \
                                               double *dot_out) {                             \
    fastbn_d4 a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};                                         \
    ptrdiff_t i = 0;                                                                          \
    for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                                        \
        fastbn_d4 g0 = fastbn_load4_##T(dy + i), g1 = fastbn_load4_##T(dy + i + 4);           \
        a0 += g0;                                                                             \
        a1 += g1;                                                                             \
        b0 += (fastbn_load4_##T(x + i) - mean) * g0;                                          \
        b1 += (fastbn_load4_##T(x + i + 4) - mean) * g1;                                      \
    }                                                                                         \
    double t1 = fastbn_fold(a0, a1), t2 = fastbn_fold(b0, b1);                                \
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
FASTBN_CLONES static void fastbn_affine_##T(const T *x, T *y, ptrdiff_t n, T shift, T scale, \
                                            T offset) {                                       \
    for (ptrdiff_t i = 0; i < n; i++)                                                         \
        y[i] = (x[i] - shift) * scale + offset;                                               \
}                                                                                             \
                                                                                              \
/* dx = dy * a + (x - mean) * b + d */                                                        \
FASTBN_CLONES static void fastbn_grad_input_##T(const T *dy, const T *x, T *dx, ptrdiff_t n,  \
                                                T mean, T a, T b, T d) {                      \
    for (ptrdiff_t i = 0; i < n; i++)                                                         \
        dx[i] = dy[i] * a + (x[i] - mean) * b + d;                                            \
}                                                                                             \
                                                                                              \
/* Channels-last rows: acc1[c] += x[c] - centre[c]; acc2[c] += (x[c] - centre[c])^2 */        \
FASTBN_CLONES static void fastbn_row_shifted_sums_##T(const T *x, ptrdiff_t n,                \
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
FASTBN_CLONES static void fastbn_row_grad_sums_##T(const T *dy, const T *x, ptrdiff_t n,      \
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
FASTBN_CLONES static void fastbn_row_affine_##T(const T *x, T *y, ptrdiff_t n, const T *shift, \
                                                const T *scale, const T *offset) {            \
    for (ptrdiff_t c = 0; c < n; c++)                                                         \
        y[c] = (x[c] - shift[c]) * scale[c] + offset[c];                                      \
}                                                                                             \
                                                                                              \
/* Channels-last rows: dx[c] = dy[c] * a[c] + (x[c] - mean[c]) * b[c] + d[c] */               \
FASTBN_CLONES static void fastbn_row_grad_input_##T(const T *dy, const T *x, T *dx,           \
                                                    ptrdiff_t n, const T *mean, const T *a,   \
                                                    const T *b, const T *d) {                 \
    for (ptrdiff_t c = 0; c < n; c++)                                                         \
        dx[c] = dy[c] * a[c] + (x[c] - mean[c]) * b[c] + d[c];                                \
}

FASTBN_DEFINE_LOOPS(float)
FASTBN_DEFINE_LOOPS(double)

#endif /* FASTBN_SIMD_H */
