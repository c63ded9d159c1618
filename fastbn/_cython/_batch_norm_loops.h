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
 *
 * Each FASTBN_CLONES function does one whole work item (see _batch_norm.pyx
 * for the decomposition), so the dispatch and call cost is paid per item, not
 * per row: with 7x7 feature maps a row is only 49 values.
 */
#ifndef FASTBN_BATCH_NORM_LOOPS_H
#define FASTBN_BATCH_NORM_LOOPS_H

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
/* sum(x - pivot), sum((x - pivot)^2) over one run */                                         \
static inline void fastbn_shifted_sums_##T(const T *x, ptrdiff_t n, double pivot,             \
                                           double *sum_out, double *sum_sq_out) {             \
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
/* sum(dy), sum((x - mean) * dy) over one run */                                              \
static inline void fastbn_grad_sums_##T(const T *dy, const T *x, ptrdiff_t n, double mean,    \
                                        double *sum_dy_out, double *dot_out) {                \
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
/* Channels-first work item: rows [row0, row1) of the (N * C, S) matrix, columns [start,     \
 * stop) of each; row r is channel r % C. Writes one partial per (row, chunk) to             \
 * part_a/part_b[r * chunks + chunk]: with second == NULL the shifted sums of first (= x),   \
 * else the gradient sums of first (= dy) and second (= x). */                                \
FASTBN_CLONES static void fastbn_cf_sums_##T(                                                 \
        const T *first, const T *second, ptrdiff_t S, ptrdiff_t C, ptrdiff_t row0,            \
        ptrdiff_t row1, ptrdiff_t start, ptrdiff_t stop, ptrdiff_t chunks, ptrdiff_t chunk,   \
        const double *centre, double *part_a, double *part_b) {                               \
    ptrdiff_t c = row0 % C;                                                                   \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                 \
        ptrdiff_t offset = r * S + start, slot = r * chunks + chunk;                          \
        if (second == NULL)                                                                   \
            fastbn_shifted_sums_##T(first + offset, stop - start, centre[c],                  \
                                    part_a + slot, part_b + slot);                            \
        else                                                                                  \
            fastbn_grad_sums_##T(first + offset, second + offset, stop - start, centre[c],    \
                                 part_a + slot, part_b + slot);                               \
        if (++c == C)                                                                         \
            c = 0;                                                                            \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Channels-first work item, elementwise, per channel c:                                     \
 *   x2 == NULL: y = (x - shift[c]) * scale[c] + offset[c]                                    \
 *   else:       y = x * scale[c] + (x2 - shift[c]) * scale2[c] + offset[c]                   \
 * (the backward: x = dy, x2 = x, y = dx). */                                                 \
FASTBN_CLONES static void fastbn_cf_elementwise_##T(                                          \
        const T *x, const T *x2, T *y, ptrdiff_t S, ptrdiff_t C, ptrdiff_t row0,              \
        ptrdiff_t row1, ptrdiff_t start, ptrdiff_t stop, const T *shift, const T *scale,      \
        const T *scale2, const T *offset) {                                                   \
    ptrdiff_t c = row0 % C;                                                                   \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                 \
        const T *xr = x + r * S;                                                              \
        T *yr = y + r * S;                                                                    \
        T sh = shift[c], a = scale[c], o = offset[c];                                         \
        if (x2 == NULL) {                                                                     \
            for (ptrdiff_t i = start; i < stop; i++)                                          \
                yr[i] = (xr[i] - sh) * a + o;                                                 \
        } else {                                                                              \
            const T *x2r = x2 + r * S;                                                        \
            T b = scale2[c];                                                                  \
            for (ptrdiff_t i = start; i < stop; i++)                                          \
                yr[i] = xr[i] * a + (x2r[i] - sh) * b + o;                                    \
        }                                                                                     \
        if (++c == C)                                                                         \
            c = 0;                                                                            \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Channels-last work item: rows [row0, row1) of the (N * S, C) matrix, channels [c0, c1).   \
 * Sets acc_a/acc_b[c] for c in [c0, c1) to the item's sums (shifted sums of first, or       \
 * gradient sums of first = dy and second = x, as above). */                                  \
FASTBN_CLONES static void fastbn_cl_sums_##T(                                                 \
        const T *first, const T *second, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,         \
        ptrdiff_t c0, ptrdiff_t c1, const double *centre, double *acc_a, double *acc_b) {     \
    for (ptrdiff_t c = c0; c < c1; c++)                                                       \
        acc_a[c] = acc_b[c] = 0.0;                                                            \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                 \
        const T *fr = first + r * C;                                                          \
        if (second == NULL) {                                                                 \
            for (ptrdiff_t c = c0; c < c1; c++) {                                             \
                double d = (double)fr[c] - centre[c];                                         \
                acc_a[c] += d;                                                                \
                acc_b[c] += d * d;                                                            \
            }                                                                                 \
        } else {                                                                              \
            const T *sr = second + r * C;                                                     \
            for (ptrdiff_t c = c0; c < c1; c++) {                                             \
                double g = (double)fr[c];                                                     \
                acc_a[c] += g;                                                                \
                acc_b[c] += ((double)sr[c] - centre[c]) * g;                                  \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
                                                                                              \
/* Channels-last work item, elementwise (same formulas as the channels-first one). */         \
FASTBN_CLONES static void fastbn_cl_elementwise_##T(                                          \
        const T *x, const T *x2, T *y, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,           \
        ptrdiff_t c0, ptrdiff_t c1, const T *shift, const T *scale, const T *scale2,          \
        const T *offset) {                                                                    \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                 \
        const T *xr = x + r * C;                                                              \
        T *yr = y + r * C;                                                                    \
        if (x2 == NULL) {                                                                     \
            for (ptrdiff_t c = c0; c < c1; c++)                                               \
                yr[c] = (xr[c] - shift[c]) * scale[c] + offset[c];                            \
        } else {                                                                              \
            const T *x2r = x2 + r * C;                                                        \
            for (ptrdiff_t c = c0; c < c1; c++)                                               \
                yr[c] = xr[c] * scale[c] + (x2r[c] - shift[c]) * scale2[c] + offset[c];       \
        }                                                                                     \
    }                                                                                         \
}

FASTBN_DEFINE_LOOPS(float)
FASTBN_DEFINE_LOOPS(double)

#endif /* FASTBN_BATCH_NORM_LOOPS_H */
