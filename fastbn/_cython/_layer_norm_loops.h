/* The loops of the LayerNorm and RMSNorm kernels (see _layer_norm.pyx for the work split),
 * written once on _simd.h's generic vectors and compiled for every instruction set there
 * (FASTBN_FOR_EACH_ISA); FASTBN_DISPATCH picks one per call.
 *
 * A row's sums are BatchNorm's run sums (_batch_norm_loops.h): summed in the input's type
 * over blocks, the blocks added in float64, float64 throughout where a float32 block
 * overflows or loses digits. The forward sums x around a pivot near the row's mean (the mean
 * of its first vector of values; 0 for RMSNorm), the backward g = dy * w and g * (x - mean).
 *
 * Whole rows are done ROW_GROUP rows at a time, every phase before the next rows: the rows'
 * values stay in the first-level cache between the sums and the elementwise pass. The
 * backward's grad_weight / grad_bias terms are added into partial column sums that are loaded
 * and stored once per ROW_GROUP rows. Elementwise loops are on native vectors (_simd.h).
 *
 * An output may be exactly its input (y = x, dx = dy or dx = x): every value is loaded
 * before the value at its index is stored. A missing weight or bias is NULL.
 */
#ifndef FASTBN_LAYER_NORM_LOOPS_H
#define FASTBN_LAYER_NORM_LOOPS_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "_simd.h"
/* BatchNorm's run sums; its work-item functions are not used here. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "_batch_norm_loops.h"
#pragma GCC diagnostic pop

/* Rows taken together: the forward's phases, and the backward's terms added into the partial
 * column sums. */
#define FASTBN_ROW_GROUP 4

#define FASTBN_DEFINE_LAYER_NORM_SCALARS(T)                                                    \
/* A row's statistics from its sums around `pivot` (0 and not centred for RMSNorm), and the   \
 * coefficients of y = ((x - pivot) * scale + offset) * w + b. mean: NULL for RMSNorm. */      \
static inline void fastbn_ln_statistics_##T(                                                   \
        double sum_shifted, double sum_sq, ptrdiff_t D, double eps, int centred, T pivot,      \
        T *mean, T *rstd, T *scale, T *offset) {                                               \
    double shifted_mean = centred ? sum_shifted / D : 0.0;                                     \
    double var = sum_sq / D - shifted_mean * shifted_mean;                                     \
    double row_rstd;                                                                           \
    if (var < 0.0) /* rounding only; keeps nan as nan */                                       \
        var = 0.0;                                                                             \
    row_rstd = 1.0 / sqrt(var + eps);                                                          \
    if (mean != NULL)                                                                          \
        *mean = (T)((double)pivot + shifted_mean);                                             \
    *rstd = (T)row_rstd;                                                                       \
    *scale = (T)row_rstd;                                                                      \
    *offset = (T)(-shifted_mean * row_rstd);                                                   \
}                                                                                              \
                                                                                               \
/* dx = g * a + (x - mean) * b + c from sum(g) and sum(g * (x - mean)), g = dy * w:           \
 * rstd * (g - mean(g) - x_hat * mean(g * x_hat)), without mean(g) for RMSNorm. */             \
static inline void fastbn_ln_grad_coefficients_##T(                                            \
        double sum_g, double dot, ptrdiff_t D, int centred, T rstd, T *a, T *b, T *c) {        \
    double row_rstd = (double)rstd;                                                            \
    *a = (T)row_rstd;                                                                          \
    *b = (T)(-row_rstd * row_rstd * row_rstd * dot / D);                                       \
    *c = centred ? (T)(-row_rstd * sum_g / D) : (T)0;                                          \
}                                                                                              \
                                                                                               \
/* The mean of a row's first vector of values (fewer in a shorter row): the pivot of its     \
 * sums, close to the row's mean for most data; 0 where it is not finite (an inf pivot would  \
 * turn the row's inf mean into nan). A load and a horizontal sum, in a fixed order: the      \
 * same on every instruction set. */                                                           \
static inline T fastbn_ln_pivot_##T(const T *x, ptrdiff_t n) {                                 \
    double mean = 0.0;                                                                         \
    if (n >= FASTBN_LANES(T)) {                                                                \
        mean = fastbn_hsum_##T(FASTBN_LOAD(T, x)) / (double)FASTBN_LANES(T);                   \
    } else {                                                                                   \
        for (ptrdiff_t i = 0; i < n; i++)                                                      \
            mean += (double)x[i];                                                              \
        mean /= (double)n;                                                                     \
    }                                                                                          \
    return isfinite(mean) ? (T)mean : (T)0;                                                    \
}

FASTBN_DEFINE_LAYER_NORM_SCALARS(float)
FASTBN_DEFINE_LAYER_NORM_SCALARS(double)

/* The elementwise loops of ROW_GROUP or one row at a time (ROWS constant): for columns
 * [0, n) of `rows` rows `stride` apart, dx = (dy * w) * a + (x - centre) * b + c, and the
 * rows' terms dy * (x - centre) * rstd of grad_weight and dy of grad_bias added, in row
 * order, into the partial column sums dw_part / db_part. Any of w, dx, dw_part, db_part may
 * be NULL (the tests are the same for every column: -O3 takes them out of the loop). */
/* The vectors of the loops below: native ones (they store). */
#define FASTBN_V(T, ISA) fastbn_native_##T##_##ISA
#define FASTBN_VLOAD(T, ISA, p) FASTBN_NATIVE_LOAD(T, ISA, p)
#define FASTBN_VSTORE(T, ISA, p, v) FASTBN_NATIVE_STORE(T, ISA, p, v)

#define FASTBN_DEFINE_GRAD_BLOCK(T, ISA, ROWS)                                                 \
FASTBN_TARGET_##ISA static inline void fastbn_ln_grad_block##ROWS##_##T##_##ISA(               \
        const T *dy, const T *x, const T *w, T *dx, T *dw_part, T *db_part, ptrdiff_t stride,  \
        ptrdiff_t n, const T *centre, const T *rstd, const T *a, const T *b, const T *c) {     \
    const ptrdiff_t L = FASTBN_NATIVE_LANES(T, ISA);                                           \
    ptrdiff_t i = 0;                                                                           \
    for (; i + L <= n; i += L) {                                                               \
        FASTBN_V(T, ISA) sum_w = {0}, sum_b = {0}, wv = {0};                                   \
        if (w != NULL)                                                                         \
            wv = FASTBN_VLOAD(T, ISA, w + i);                                                  \
        for (int k = 0; k < ROWS; k++) {                                                       \
            FASTBN_V(T, ISA) g = FASTBN_VLOAD(T, ISA, dy + k * stride + i);                    \
            FASTBN_V(T, ISA) d = FASTBN_VLOAD(T, ISA, x + k * stride + i) - centre[k];         \
            if (dx != NULL)                                                                    \
                FASTBN_VSTORE(T, ISA, dx + k * stride + i,                                     \
                              (w != NULL ? g * wv : g) * a[k] + d * b[k] + c[k]);              \
            sum_w += g * d * rstd[k];                                                          \
            sum_b += g;                                                                        \
        }                                                                                      \
        if (dw_part != NULL)                                                                   \
            FASTBN_VSTORE(T, ISA, dw_part + i, FASTBN_VLOAD(T, ISA, dw_part + i) + sum_w);     \
        if (db_part != NULL)                                                                   \
            FASTBN_VSTORE(T, ISA, db_part + i, FASTBN_VLOAD(T, ISA, db_part + i) + sum_b);     \
    }                                                                                          \
    for (; i < n; i++) {                                                                       \
        T sum_w = 0, sum_b = 0;                                                                \
        for (int k = 0; k < ROWS; k++) {                                                       \
            T g = dy[k * stride + i], d = x[k * stride + i] - centre[k];                       \
            if (dx != NULL)                                                                    \
                dx[k * stride + i] = (w != NULL ? g * w[i] : g) * a[k] + d * b[k] + c[k];      \
            sum_w += g * d * rstd[k];                                                          \
            sum_b += g;                                                                        \
        }                                                                                      \
        if (dw_part != NULL)                                                                   \
            dw_part[i] += sum_w;                                                               \
        if (db_part != NULL)                                                                   \
            db_part[i] += sum_b;                                                               \
    }                                                                                          \
}

#define FASTBN_DEFINE_LAYER_NORM_LOOPS(T, ISA)                                                 \
                                                                                               \
/* y = ((x - pivot) * scale + offset) * w + b over one row of n values (w, b: NULL for none). \
 * The tests on w and b are the same for every value: -O3 takes them out of the loop. */       \
FASTBN_TARGET_##ISA static inline void fastbn_ln_normalize_run_##T##_##ISA(                    \
        const T *x, const T *w, const T *b, T *y, ptrdiff_t n, T pivot, T scale, T offset) {   \
    const ptrdiff_t L = FASTBN_NATIVE_LANES(T, ISA);                                           \
    ptrdiff_t i = 0;                                                                           \
    for (; i + L <= n; i += L) {                                                               \
        FASTBN_V(T, ISA) v = (FASTBN_VLOAD(T, ISA, x + i) - pivot) * scale + offset;           \
        if (w != NULL)                                                                         \
            v *= FASTBN_VLOAD(T, ISA, w + i);                                                  \
        if (b != NULL)                                                                         \
            v += FASTBN_VLOAD(T, ISA, b + i);                                                  \
        FASTBN_VSTORE(T, ISA, y + i, v);                                                       \
    }                                                                                          \
    for (; i < n; i++) {                                                                       \
        T v = (x[i] - pivot) * scale + offset;                                                 \
        if (w != NULL)                                                                         \
            v *= w[i];                                                                         \
        if (b != NULL)                                                                         \
            v += b[i];                                                                         \
        y[i] = v;                                                                              \
    }                                                                                          \
}                                                                                              \
                                                                                               \
FASTBN_DEFINE_GRAD_BLOCK(T, ISA, 4)                                                            \
FASTBN_DEFINE_GRAD_BLOCK(T, ISA, 1)                                                            \
                                                                                               \
/* The grad blocks over `rows` rows, ROW_GROUP at a time, then one at a time (row k at        \
 * + k * stride; centre, rstd, a, b, c per row). */                                            \
FASTBN_TARGET_##ISA static void fastbn_ln_grad_rows_##T##_##ISA(                               \
        const T *dy, const T *x, const T *w, T *dx, T *dw_part, T *db_part, ptrdiff_t stride,  \
        ptrdiff_t rows, ptrdiff_t n, const T *centre, const T *rstd, const T *a, const T *b,   \
        const T *c) {                                                                          \
    ptrdiff_t k = 0;                                                                           \
    for (; k + FASTBN_ROW_GROUP <= rows; k += FASTBN_ROW_GROUP)                                \
        fastbn_ln_grad_block4_##T##_##ISA(dy + k * stride, x + k * stride, w,                  \
                                          dx != NULL ? dx + k * stride : NULL, dw_part,        \
                                          db_part, stride, n, centre + k, rstd + k, a + k,     \
                                          b + k, c + k);                                       \
    for (; k < rows; k++)                                                                      \
        fastbn_ln_grad_block1_##T##_##ISA(dy + k * stride, x + k * stride, w,                  \
                                          dx != NULL ? dx + k * stride : NULL, dw_part,        \
                                          db_part, stride, n, centre + k, rstd + k, a + k,     \
                                          b + k, c + k);                                       \
}                                                                                              \
                                                                                               \
/* Forward, whole rows [r0, r1) of the (rows, D) matrix: pivots, sums, statistics (mean NULL \
 * for RMSNorm, centred == 0), then y, ROW_GROUP rows at a time (in cache; the rows' square   \
 * roots and divisions overlap). */                                                            \
FASTBN_TARGET_##ISA static void fastbn_ln_forward_rows_##T##_##ISA(                            \
        const T *x, const T *w, const T *b, T *y, T *mean, T *rstd, ptrdiff_t D, ptrdiff_t r0, \
        ptrdiff_t r1, double eps, int centred) {                                               \
    T pivot[FASTBN_ROW_GROUP], scale[FASTBN_ROW_GROUP], offset[FASTBN_ROW_GROUP];              \
    double sum_shifted[FASTBN_ROW_GROUP], sum_sq[FASTBN_ROW_GROUP];                            \
    for (ptrdiff_t r = r0, rows; r < r1; r += rows) {                                          \
        rows = r1 - r < FASTBN_ROW_GROUP ? r1 - r : FASTBN_ROW_GROUP;                          \
        for (ptrdiff_t k = 0; k < rows; k++) {                                                 \
            const T *row = x + (r + k) * D;                                                    \
            pivot[k] = centred ? fastbn_ln_pivot_##T(row, D) : (T)0;                           \
            fastbn_shifted_sums_##T##_##ISA(row, D, (double)pivot[k], sum_shifted + k,         \
                                            sum_sq + k);                                       \
        }                                                                                      \
        for (ptrdiff_t k = 0; k < rows; k++)                                                   \
            fastbn_ln_statistics_##T(sum_shifted[k], sum_sq[k], D, eps, centred, pivot[k],     \
                                     mean != NULL ? mean + r + k : NULL, rstd + r + k,         \
                                     scale + k, offset + k);                                   \
        for (ptrdiff_t k = 0; k < rows; k++)                                                   \
            fastbn_ln_normalize_run_##T##_##ISA(x + (r + k) * D, w, b, y + (r + k) * D, D,     \
                                                pivot[k], scale[k], offset[k]);                \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Backward, whole rows [r0, r1): per ROW_GROUP rows, their gradient sums and coefficients    \
 * (when dx is wanted), then dx and their terms of the partial column sums dw_part / db_part  \
 * (D values each, set here; NULL when not wanted). centre: the rows' means (zeros for         \
 * RMSNorm). */                                                                                \
FASTBN_TARGET_##ISA static void fastbn_ln_backward_rows_##T##_##ISA(                           \
        const T *dy, const T *x, const T *w, T *dx, T *dw_part, T *db_part, ptrdiff_t D,       \
        ptrdiff_t r0, ptrdiff_t r1, const T *centre, const T *rstd, int centred) {             \
    T a[FASTBN_ROW_GROUP] = {0}, b[FASTBN_ROW_GROUP] = {0}, c[FASTBN_ROW_GROUP] = {0};       \
    if (dw_part != NULL)                                                                       \
        memset(dw_part, 0, (size_t)D * sizeof(T));                                             \
    if (db_part != NULL)                                                                       \
        memset(db_part, 0, (size_t)D * sizeof(T));                                             \
    for (ptrdiff_t r = r0, rows; r < r1; r += rows) {                                          \
        rows = r1 - r >= FASTBN_ROW_GROUP ? FASTBN_ROW_GROUP : 1;                              \
        for (ptrdiff_t k = 0; k < rows && dx != NULL; k++) {                                   \
            double sum_g, dot;                                                                 \
            fastbn_grad_sums_##T##_##ISA(dy + (r + k) * D, x + (r + k) * D, w, D,              \
                                         (double)centre[r + k], &sum_g, &dot);                 \
            fastbn_ln_grad_coefficients_##T(sum_g, dot, D, centred, rstd[r + k], a + k, b + k, \
                                            c + k);                                            \
        }                                                                                      \
        fastbn_ln_grad_rows_##T##_##ISA(dy + r * D, x + r * D, w,                              \
                                        dx != NULL ? dx + r * D : NULL, dw_part, db_part, D,   \
                                        rows, D, centre + r, rstd + r, a, b, c);               \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Few long rows, chunk k (columns [c0, c1)) of rows [r0, r1): the statistics' shifted sums   \
 * (dy == NULL) or the gradient sums (g = dy * w) of each, to part_a/part_b[r * chunks + k]. */ \
FASTBN_TARGET_##ISA static void fastbn_ln_chunk_sums_##T##_##ISA(                              \
        const T *x, const T *dy, const T *w, ptrdiff_t D, ptrdiff_t r0, ptrdiff_t r1,          \
        ptrdiff_t c0, ptrdiff_t c1, const T *centre, ptrdiff_t chunks, ptrdiff_t k,            \
        double *part_a, double *part_b) {                                                      \
    for (ptrdiff_t r = r0; r < r1; r++) {                                                      \
        ptrdiff_t slot = r * chunks + k;                                                       \
        if (dy == NULL)                                                                        \
            fastbn_shifted_sums_##T##_##ISA(x + r * D + c0, c1 - c0, (double)centre[r],        \
                                            part_a + slot, part_b + slot);                     \
        else                                                                                   \
            fastbn_grad_sums_##T##_##ISA(dy + r * D + c0, x + r * D + c0,                      \
                                         w != NULL ? w + c0 : NULL, c1 - c0,                   \
                                         (double)centre[r], part_a + slot, part_b + slot);     \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Few long rows, columns [c0, c1) of rows [r0, r1): y with each row's coefficients. */        \
FASTBN_TARGET_##ISA static void fastbn_ln_normalize_##T##_##ISA(                               \
        const T *x, const T *w, const T *b, T *y, ptrdiff_t D, ptrdiff_t r0, ptrdiff_t r1,     \
        ptrdiff_t c0, ptrdiff_t c1, const T *pivot, const T *scale, const T *offset) {         \
    for (ptrdiff_t r = r0; r < r1; r++)                                                        \
        fastbn_ln_normalize_run_##T##_##ISA(x + r * D + c0, w != NULL ? w + c0 : NULL,         \
                                            b != NULL ? b + c0 : NULL, y + r * D + c0,         \
                                            c1 - c0, pivot[r], scale[r], offset[r]);           \
}

#define FASTBN_DEFINE_LAYER_NORM_ISA(ISA)                                                      \
    FASTBN_DEFINE_LAYER_NORM_LOOPS(float, ISA)                                                 \
    FASTBN_DEFINE_LAYER_NORM_LOOPS(double, ISA)
FASTBN_FOR_EACH_ISA(FASTBN_DEFINE_LAYER_NORM_ISA)

/* The entry points, one per loop and dtype. */
#define FASTBN_DEFINE_LAYER_NORM_ENTRY_POINTS(T)                                               \
static void fastbn_ln_forward_rows_##T(                                                        \
        const T *x, const T *w, const T *b, T *y, T *mean, T *rstd, ptrdiff_t D, ptrdiff_t r0, \
        ptrdiff_t r1, double eps, int centred) {                                               \
    FASTBN_DISPATCH(fastbn_ln_forward_rows, T, (x, w, b, y, mean, rstd, D, r0, r1, eps,        \
                                                centred));                                     \
}                                                                                              \
static void fastbn_ln_backward_rows_##T(                                                       \
        const T *dy, const T *x, const T *w, T *dx, T *dw_part, T *db_part, ptrdiff_t D,       \
        ptrdiff_t r0, ptrdiff_t r1, const T *centre, const T *rstd, int centred) {             \
    FASTBN_DISPATCH(fastbn_ln_backward_rows, T, (dy, x, w, dx, dw_part, db_part, D, r0, r1,    \
                                                 centre, rstd, centred));                      \
}                                                                                              \
static void fastbn_ln_chunk_sums_##T(                                                          \
        const T *x, const T *dy, const T *w, ptrdiff_t D, ptrdiff_t r0, ptrdiff_t r1,          \
        ptrdiff_t c0, ptrdiff_t c1, const T *centre, ptrdiff_t chunks, ptrdiff_t k,            \
        double *part_a, double *part_b) {                                                      \
    FASTBN_DISPATCH(fastbn_ln_chunk_sums, T, (x, dy, w, D, r0, r1, c0, c1, centre, chunks, k,  \
                                              part_a, part_b));                                \
}                                                                                              \
static void fastbn_ln_normalize_##T(                                                           \
        const T *x, const T *w, const T *b, T *y, ptrdiff_t D, ptrdiff_t r0, ptrdiff_t r1,     \
        ptrdiff_t c0, ptrdiff_t c1, const T *pivot, const T *scale, const T *offset) {         \
    FASTBN_DISPATCH(fastbn_ln_normalize, T, (x, w, b, y, D, r0, r1, c0, c1, pivot, scale,      \
                                             offset));                                         \
}                                                                                              \
static void fastbn_ln_grad_rows_##T(                                                           \
        const T *dy, const T *x, const T *w, T *dx, T *dw_part, T *db_part, ptrdiff_t stride,  \
        ptrdiff_t rows, ptrdiff_t n, const T *centre, const T *rstd, const T *a, const T *b,   \
        const T *c) {                                                                          \
    FASTBN_DISPATCH(fastbn_ln_grad_rows, T, (dy, x, w, dx, dw_part, db_part, stride, rows, n,  \
                                             centre, rstd, a, b, c));                          \
}

FASTBN_DEFINE_LAYER_NORM_ENTRY_POINTS(float)
FASTBN_DEFINE_LAYER_NORM_ENTRY_POINTS(double)

#endif /* FASTBN_LAYER_NORM_LOOPS_H */
