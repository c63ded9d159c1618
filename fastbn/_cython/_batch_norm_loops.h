/* Inner loops of the normalization kernels, over one contiguous run of values.
 *
 * The reductions accumulate in float64, whatever the input type, in 16 lanes:
 * four independent accumulators of four doubles (enough to hide the add
 * latency; two ran at ~1 cycle per value), written with GCC/Clang vector extensions
 * so that the lanes are explicit. The compiler keeps them in registers (a
 * Cython loop over a lane array was kept in memory, ~2.3 cycles per element),
 * and the order of every floating-point addition is fixed by this source: the
 * result does not depend on the thread count.
 *
 * Runtime dispatch: on x86-64 every item function is compiled twice, for
 * AVX2 + FMA and for the portable baseline, and the first call picks one by
 * the CPU (__builtin_cpu_supports). The two copies differ only in how they
 * load four floats as doubles (GCC lowers a generic vector conversion badly,
 * through the stack), so they add in the same order. Measured on the
 * project's 2-core AMD EPYC: the AVX2 copies run the training forward about
 * 2x faster than an SSE2 build (the float64 reductions are compute-bound).
 *
 * The elementwise loops are plain C that the compiler vectorises at -O3.
 *
 * Each item function (fastbn_cf_*, fastbn_cl_*) does one whole work item (see _batch_norm.pyx
 * for the decomposition), so the dispatch and call cost is paid per item, not
 * per row: with 7x7 feature maps a row is only 49 values.
 */
#ifndef FASTBN_BATCH_NORM_LOOPS_H
#define FASTBN_BATCH_NORM_LOOPS_H

#include <stddef.h>
#include <math.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FASTBN_X86_DISPATCH 1
#include <immintrin.h>
#define FASTBN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTBN_X86_DISPATCH 0
#endif

#define FASTBN_LANES 16
typedef double fastbn_d4 __attribute__((vector_size(4 * sizeof(double))));

/* Four values as doubles, from unaligned memory. */
static inline fastbn_d4 fastbn_load4_float_base(const float *p) {
    fastbn_d4 v = {p[0], p[1], p[2], p[3]};
    return v;
}

static inline fastbn_d4 fastbn_load4_double_base(const double *p) {
    fastbn_d4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

#if FASTBN_X86_DISPATCH
FASTBN_TARGET_AVX2 static inline fastbn_d4 fastbn_load4_float_avx2(const float *p) {
    return (fastbn_d4)_mm256_cvtps_pd(_mm_loadu_ps(p));
}

FASTBN_TARGET_AVX2 static inline fastbn_d4 fastbn_load4_double_avx2(const double *p) {
    return (fastbn_d4)_mm256_loadu_pd(p);
}

static int fastbn_avx2_state = -1; /* -1: not asked yet; benign race, same answer */

static inline int fastbn_use_avx2(void) {
    if (fastbn_avx2_state < 0)
        fastbn_avx2_state = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return fastbn_avx2_state;
}
#endif

/* The 16 lanes of four accumulators, folded in a fixed order. */
static inline double fastbn_fold(fastbn_d4 a, fastbn_d4 b, fastbn_d4 c, fastbn_d4 d) {
    fastbn_d4 v = (a + b) + (c + d);
    return (v[0] + v[1]) + (v[2] + v[3]);
}

/* The fused activations (fastbn/_activations.py has the table and the float64 reference),
 * as torch computes them, NaN in NaN out. `code` is a constant wherever these are called
 * (FASTBN_ACTIVATION_CASES), so each loop is compiled for one activation and vectorises. */
#define FASTBN_DEFINE_ACTIVATIONS(T, EXP)                                                      \
static inline T fastbn_act_##T(int code, T z, T slope) {                                       \
    T t;                                                                                       \
    switch (code) {                                                                            \
    case 1: return z < 0 ? (T)0 : z;                                      /* relu */           \
    case 2: return z < 0 ? (T)0 : (z > 6 ? (T)6 : z);                     /* relu6 */          \
    case 3: return z / ((T)1 + EXP(-z));                                  /* silu */           \
    case 4: t = z + 3; t = t < 0 ? (T)0 : (t > 6 ? (T)6 : t);             /* hardswish */      \
            return z * t / 6;                                                                  \
    case 5: return z > 0 ? z : z * slope;                                 /* leaky_relu */     \
    default: return z;                                                                         \
    }                                                                                          \
}                                                                                              \
/* dy * act'(z): the gradient through the activation, with the comparisons of torch's      \
 * vectorised CPU kernels, so that NaN and inf get torch's gradients (relu passes a NaN's,  \
 * relu6 stops it, hardswish makes it NaN). Written as selects between values (not a        \
 * derivative times dy) so that the compiler vectorises them without branches. */           \
static inline T fastbn_act_backprop_##T(int code, T z, T dy, T slope) {                       \
    T s;                                                                                       \
    switch (code) {                                                                            \
    case 1: return z <= 0 ? (T)0 : dy;                                                         \
    case 2: return ((z > 0) & (z < 6)) ? dy : (T)0;                                            \
    case 3: s = (T)1 / ((T)1 + EXP(-z));                                                       \
            return dy * (s * ((T)1 + z * ((T)1 - s)));                                         \
    case 4: return z < -3 ? (T)0 : (z >= 3 ? dy : dy * (z / 3 + (T)0.5));                      \
    case 5: return z > 0 ? dy : dy * slope;                                                    \
    default: return dy;                                                                        \
    }                                                                                          \
}

FASTBN_DEFINE_ACTIVATIONS(float, expf)
FASTBN_DEFINE_ACTIVATIONS(double, exp)

/* Runs LOOP(T, A) with A the constant activation code `code` (0: none). */
#define FASTBN_ACTIVATION_CASES(T, code, LOOP)                                                 \
    switch (code) {                                                                            \
    case 1: LOOP(T, 1); break;                                                                 \
    case 2: LOOP(T, 2); break;                                                                 \
    case 3: LOOP(T, 3); break;                                                                 \
    case 4: LOOP(T, 4); break;                                                                 \
    case 5: LOOP(T, 5); break;                                                                 \
    default: LOOP(T, 0); break;                                                                \
    }

/* The per-element bodies of the activation-aware loops, on the locals of the item
 * functions below: forward y = act(z); backward g = dy * act'(z) with z recomputed as
 * (x - mean) * za + zb, then dx from g as without an activation. */
#define FASTBN_CF_FORWARD(T, A)                                                                   \
    for (ptrdiff_t i = start; i < stop; i++)                                                   \
        yr[i] = fastbn_act_##T(A, (xr[i] - sh) * a + o, slope)
#define FASTBN_CF_BACKWARD(T, A)                                                                  \
    for (ptrdiff_t i = start; i < stop; i++) {                                                 \
        T centred = x2r[i] - sh;                                                               \
        T g = fastbn_act_backprop_##T(A, centred * zs + zo, xr[i], slope);                            \
        yr[i] = g * a + centred * b + o;                                                       \
    }
#define FASTBN_CF_GRAD(T, A)                                                                      \
    for (ptrdiff_t i = 0; i < n; i++)                                                          \
        gbuf[i] = fastbn_act_backprop_##T(A, (xr[i] - m) * zs + zo, dyr[i], slope)
#define FASTBN_CL_FORWARD(T, A)                                                                   \
    for (ptrdiff_t c = c0; c < c1; c++)                                                        \
        yr[c] = fastbn_act_##T(A, (xr[c] - shift[c]) * scale[c] + offset[c], slope)
#define FASTBN_CL_BACKWARD(T, A)                                                                  \
    for (ptrdiff_t c = c0; c < c1; c++) {                                                      \
        T centred = x2r[c] - shift[c];                                                         \
        T g = fastbn_act_backprop_##T(A, centred * za[c] + zb[c], xr[c], slope);                      \
        yr[c] = g * scale[c] + centred * scale2[c] + offset[c];                                \
    }
#define FASTBN_CL_GRAD_SUMS(T, A)                                                                 \
    for (ptrdiff_t c = c0; c < c1; c++) {                                                      \
        T g = fastbn_act_backprop_##T(A, (xr[c] - mean_t[c]) * za[c] + zb[c], dyr[c], slope);         \
        acc_a[c] += (double)g;                                                                 \
        acc_b[c] += ((double)xr[c] - centre[c]) * (double)g;                                   \
    }

/* Values per channels-first gradient run taken at once (a work item's run is at most
 * CHUNK_ELEMENTS = 4096 values; see _batch_norm.pyx). */
#define FASTBN_GRAD_BUFFER 4096

#define FASTBN_DEFINE_LOOPS(T, ISA, ATTR)                                                      \
                                                                                               \
/* sum(x - pivot), sum((x - pivot)^2) over one run */                                          \
ATTR static inline void fastbn_shifted_sums_##T##_##ISA(const T *x, ptrdiff_t n, double pivot, \
                                           double *sum_out, double *sum_sq_out) {              \
    fastbn_d4 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};  \
    ptrdiff_t i = 0;                                                                           \
    for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                                         \
        fastbn_d4 d0 = fastbn_load4_##T##_##ISA(x + i) - pivot;                                \
        fastbn_d4 d1 = fastbn_load4_##T##_##ISA(x + i + 4) - pivot;                            \
        fastbn_d4 d2 = fastbn_load4_##T##_##ISA(x + i + 8) - pivot;                            \
        fastbn_d4 d3 = fastbn_load4_##T##_##ISA(x + i + 12) - pivot;                           \
        a0 += d0;                                                                              \
        a1 += d1;                                                                              \
        a2 += d2;                                                                              \
        a3 += d3;                                                                              \
        b0 += d0 * d0;                                                                         \
        b1 += d1 * d1;                                                                         \
        b2 += d2 * d2;                                                                         \
        b3 += d3 * d3;                                                                         \
    }                                                                                          \
    double t1 = fastbn_fold(a0, a1, a2, a3), t2 = fastbn_fold(b0, b1, b2, b3);                 \
    for (; i < n; i++) {                                                                       \
        double d = (double)x[i] - pivot;                                                       \
        t1 += d;                                                                               \
        t2 += d * d;                                                                           \
    }                                                                                          \
    *sum_out = t1;                                                                             \
    *sum_sq_out = t2;                                                                          \
}                                                                                              \
                                                                                               \
/* sum(dy), sum((x - mean) * dy) over one run */                                               \
ATTR static inline void fastbn_grad_sums_##T##_##ISA(const T *dy, const T *x, ptrdiff_t n, double mean, \
                                        double *sum_dy_out, double *dot_out) {                 \
    fastbn_d4 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};  \
    ptrdiff_t i = 0;                                                                           \
    for (; i + FASTBN_LANES <= n; i += FASTBN_LANES) {                                         \
        fastbn_d4 g0 = fastbn_load4_##T##_##ISA(dy + i), g1 = fastbn_load4_##T##_##ISA(dy + i + 4); \
        fastbn_d4 g2 = fastbn_load4_##T##_##ISA(dy + i + 8), g3 = fastbn_load4_##T##_##ISA(dy + i + 12); \
        a0 += g0;                                                                              \
        a1 += g1;                                                                              \
        a2 += g2;                                                                              \
        a3 += g3;                                                                              \
        b0 += (fastbn_load4_##T##_##ISA(x + i) - mean) * g0;                                   \
        b1 += (fastbn_load4_##T##_##ISA(x + i + 4) - mean) * g1;                               \
        b2 += (fastbn_load4_##T##_##ISA(x + i + 8) - mean) * g2;                               \
        b3 += (fastbn_load4_##T##_##ISA(x + i + 12) - mean) * g3;                              \
    }                                                                                          \
    double t1 = fastbn_fold(a0, a1, a2, a3), t2 = fastbn_fold(b0, b1, b2, b3);                 \
    for (; i < n; i++) {                                                                       \
        double g = (double)dy[i];                                                              \
        t1 += g;                                                                               \
        t2 += ((double)x[i] - mean) * g;                                                       \
    }                                                                                          \
    *sum_dy_out = t1;                                                                          \
    *dot_out = t2;                                                                             \
}                                                                                              \
                                                                                               \
/* Channels-first work item: rows [row0, row1) of the (N * C, S) matrix, columns [start,       \
 * stop) of each; row r is channel r % C. Writes one partial per (row, chunk) to               \
 * part_a/part_b[r * chunks + chunk]: with second == NULL the shifted sums of first (= x),     \
 * else the gradient sums of first (= dy) and second (= x). */                                 \
ATTR static void fastbn_cf_sums_##T##_##ISA(                                                   \
        const T *first, const T *second, ptrdiff_t S, ptrdiff_t C, ptrdiff_t row0,             \
        ptrdiff_t row1, ptrdiff_t start, ptrdiff_t stop, ptrdiff_t chunks, ptrdiff_t chunk,    \
        const double *centre, double *part_a, double *part_b, int act, T slope,                \
        const T *mean_t, const T *za, const T *zb) {                                           \
    T gbuf[FASTBN_GRAD_BUFFER];                                                                \
    ptrdiff_t c = row0 % C, n = stop - start;                                                  \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        ptrdiff_t offset = r * S + start, slot = r * chunks + chunk;                           \
        if (second == NULL) {                                                                  \
            fastbn_shifted_sums_##T##_##ISA(first + offset, n, centre[c],                      \
                                    part_a + slot, part_b + slot);                             \
        } else if (act == 0) {                                                                 \
            fastbn_grad_sums_##T##_##ISA(first + offset, second + offset, n, centre[c],        \
                                 part_a + slot, part_b + slot);                                \
        } else {  /* dy through the activation first, into a buffer the sums then read */     \
            const T *dyr = first + offset, *xr = second + offset;                              \
            T m = mean_t[c], zs = za[c], zo = zb[c];                                           \
            FASTBN_ACTIVATION_CASES(T, act, FASTBN_CF_GRAD);                                      \
            fastbn_grad_sums_##T##_##ISA(gbuf, xr, n, centre[c], part_a + slot, part_b + slot); \
        }                                                                                      \
        if (++c == C)                                                                          \
            c = 0;                                                                             \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Channels-first work item, elementwise, per channel c:                                       \
 *   x2 == NULL: y = act((x - shift[c]) * scale[c] + offset[c])                                \
 *   else:       y = g * scale[c] + (x2 - shift[c]) * scale2[c] + offset[c],                   \
 *               g = x * act'((x2 - shift[c]) * za[c] + zb[c])  (g = x without activation)     \
 * (the backward: x = dy, x2 = x, y = dx, shift = the mean). */                                \
ATTR static void fastbn_cf_elementwise_##T##_##ISA(                                            \
        const T *x, const T *x2, T *y, ptrdiff_t S, ptrdiff_t C, ptrdiff_t row0,               \
        ptrdiff_t row1, ptrdiff_t start, ptrdiff_t stop, const T *shift, const T *scale,       \
        const T *scale2, const T *offset, int act, T slope, const T *za, const T *zb) {        \
    ptrdiff_t c = row0 % C;                                                                    \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        const T *xr = x + r * S;                                                               \
        T *yr = y + r * S;                                                                     \
        T sh = shift[c], a = scale[c], o = offset[c];                                          \
        if (x2 == NULL) {                                                                      \
            FASTBN_ACTIVATION_CASES(T, act, FASTBN_CF_FORWARD);                                   \
        } else {                                                                               \
            const T *x2r = x2 + r * S;                                                         \
            T b = scale2[c];                                                                   \
            if (act == 0) {                                                                    \
                for (ptrdiff_t i = start; i < stop; i++)                                       \
                    yr[i] = xr[i] * a + (x2r[i] - sh) * b + o;                                 \
            } else {                                                                           \
                T zs = za[c], zo = zb[c];                                                      \
                FASTBN_ACTIVATION_CASES(T, act, FASTBN_CF_BACKWARD);                              \
            }                                                                                  \
        }                                                                                      \
        if (++c == C)                                                                          \
            c = 0;                                                                             \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Channels-last work item: rows [row0, row1) of the (N * S, C) matrix, channels [c0, c1).     \
 * Sets acc_a/acc_b[c] for c in [c0, c1) to the item's sums (shifted sums of first, or         \
 * gradient sums of first = dy and second = x, as above). Strips of 16 channels keep           \
 * their sums in registers down all the rows; the last few channels go one by one. */          \
ATTR static void fastbn_cl_sums_##T##_##ISA(                                                   \
        const T *first, const T *second, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,          \
        ptrdiff_t c0, ptrdiff_t c1, const double *centre, double *acc_a, double *acc_b) {      \
    ptrdiff_t c = c0;                                                                          \
    for (; c + 16 <= c1; c += 16) {                                                            \
        fastbn_d4 m0 = fastbn_load4_double_##ISA(centre + c);                                  \
        fastbn_d4 m1 = fastbn_load4_double_##ISA(centre + c + 4);                              \
        fastbn_d4 m2 = fastbn_load4_double_##ISA(centre + c + 8);                              \
        fastbn_d4 m3 = fastbn_load4_double_##ISA(centre + c + 12);                             \
        fastbn_d4 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}; \
        for (ptrdiff_t r = row0; r < row1; r++) {                                              \
            const T *fr = first + r * C + c;                                                   \
            fastbn_d4 f0 = fastbn_load4_##T##_##ISA(fr), f1 = fastbn_load4_##T##_##ISA(fr + 4); \
            fastbn_d4 f2 = fastbn_load4_##T##_##ISA(fr + 8);                                   \
            fastbn_d4 f3 = fastbn_load4_##T##_##ISA(fr + 12);                                  \
            if (second == NULL) {                                                              \
                f0 -= m0; f1 -= m1; f2 -= m2; f3 -= m3;                                        \
                a0 += f0; a1 += f1; a2 += f2; a3 += f3;                                        \
                b0 += f0 * f0; b1 += f1 * f1; b2 += f2 * f2; b3 += f3 * f3;                    \
            } else {                                                                           \
                const T *sr = second + r * C + c;                                              \
                a0 += f0; a1 += f1; a2 += f2; a3 += f3;                                        \
                b0 += (fastbn_load4_##T##_##ISA(sr) - m0) * f0;                                \
                b1 += (fastbn_load4_##T##_##ISA(sr + 4) - m1) * f1;                            \
                b2 += (fastbn_load4_##T##_##ISA(sr + 8) - m2) * f2;                            \
                b3 += (fastbn_load4_##T##_##ISA(sr + 12) - m3) * f3;                           \
            }                                                                                  \
        }                                                                                      \
        memcpy(acc_a + c, &a0, sizeof a0); memcpy(acc_a + c + 4, &a1, sizeof a1);              \
        memcpy(acc_a + c + 8, &a2, sizeof a2); memcpy(acc_a + c + 12, &a3, sizeof a3);         \
        memcpy(acc_b + c, &b0, sizeof b0); memcpy(acc_b + c + 4, &b1, sizeof b1);              \
        memcpy(acc_b + c + 8, &b2, sizeof b2); memcpy(acc_b + c + 12, &b3, sizeof b3);         \
    }                                                                                          \
    for (; c < c1; c++) {                                                                      \
        double sa = 0.0, sb = 0.0;                                                             \
        for (ptrdiff_t r = row0; r < row1; r++) {                                              \
            double f = (double)first[r * C + c];                                               \
            if (second == NULL) {                                                              \
                f -= centre[c];                                                                \
                sa += f;                                                                       \
                sb += f * f;                                                                   \
            } else {                                                                           \
                sa += f;                                                                       \
                sb += ((double)second[r * C + c] - centre[c]) * f;                             \
            }                                                                                  \
        }                                                                                      \
        acc_a[c] = sa;                                                                         \
        acc_b[c] = sb;                                                                         \
    }                                                                                          \
}                                                                                              \
/* Channels-last work item, gradient sums through an activation (act != 0): acc_a/acc_b[c]    \
 * for c in [c0, c1) = sum(g), sum((x - centre) * g), g = dy * act'((x - mean_t) * za + zb).     \
 * Channels inner, so the loop vectorises across channels with one sum per channel. */         \
ATTR static void fastbn_cl_act_grad_sums_##T##_##ISA(                                          \
        const T *dy, const T *x, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1, ptrdiff_t c0,    \
        ptrdiff_t c1, const double *centre, double *acc_a, double *acc_b, int act, T slope,    \
        const T *mean_t, const T *za, const T *zb) {                                           \
    for (ptrdiff_t c = c0; c < c1; c++)                                                        \
        acc_a[c] = acc_b[c] = 0.0;                                                             \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        const T *dyr = dy + r * C, *xr = x + r * C;                                            \
        FASTBN_ACTIVATION_CASES(T, act, FASTBN_CL_GRAD_SUMS);                                     \
    }                                                                                          \
}                                                                                              \
/* Channels-last work item, elementwise (same formulas as the channels-first one). */          \
ATTR static void fastbn_cl_elementwise_##T##_##ISA(                                            \
        const T *x, const T *x2, T *y, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,            \
        ptrdiff_t c0, ptrdiff_t c1, const T *shift, const T *scale, const T *scale2,           \
        const T *offset, int act, T slope, const T *za, const T *zb) {                         \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        const T *xr = x + r * C;                                                               \
        T *yr = y + r * C;                                                                     \
        if (x2 == NULL) {                                                                      \
            FASTBN_ACTIVATION_CASES(T, act, FASTBN_CL_FORWARD);                                   \
        } else {                                                                               \
            const T *x2r = x2 + r * C;                                                         \
            if (act == 0) {                                                                    \
                for (ptrdiff_t c = c0; c < c1; c++)                                            \
                    yr[c] = xr[c] * scale[c] + (x2r[c] - shift[c]) * scale2[c] + offset[c];    \
            } else {                                                                           \
                FASTBN_ACTIVATION_CASES(T, act, FASTBN_CL_BACKWARD);                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}


#define FASTBN_EMPTY

#if FASTBN_X86_DISPATCH
#define FASTBN_DEFINE_ALL(T)                                                                  \
    FASTBN_DEFINE_LOOPS(T, base, FASTBN_EMPTY)                                                \
    FASTBN_DEFINE_LOOPS(T, avx2, FASTBN_TARGET_AVX2)
#define FASTBN_DISPATCH(name, T, args)                                                        \
    (fastbn_use_avx2() ? name##_##T##_avx2 args : name##_##T##_base args)
#else
#define FASTBN_DEFINE_ALL(T) FASTBN_DEFINE_LOOPS(T, base, FASTBN_EMPTY)
#define FASTBN_DISPATCH(name, T, args) name##_##T##_base args
#endif

/* The entry points, one per item function and dtype. */
#define FASTBN_DEFINE_ENTRY_POINTS(T)                                                         \
static void fastbn_cf_sums_##T(                                                               \
        const T *first, const T *second, ptrdiff_t S, ptrdiff_t C, ptrdiff_t row0,            \
        ptrdiff_t row1, ptrdiff_t start, ptrdiff_t stop, ptrdiff_t chunks, ptrdiff_t chunk,   \
        const double *centre, double *part_a, double *part_b, int act, T slope,               \
        const T *mean_t, const T *za, const T *zb) {                                          \
    FASTBN_DISPATCH(fastbn_cf_sums, T, (first, second, S, C, row0, row1, start, stop, chunks, \
                                        chunk, centre, part_a, part_b, act, slope, mean_t,    \
                                        za, zb));                                             \
}                                                                                             \
static void fastbn_cf_elementwise_##T(                                                        \
        const T *x, const T *x2, T *y, ptrdiff_t S, ptrdiff_t C, ptrdiff_t row0,              \
        ptrdiff_t row1, ptrdiff_t start, ptrdiff_t stop, const T *shift, const T *scale,      \
        const T *scale2, const T *offset, int act, T slope, const T *za, const T *zb) {       \
    FASTBN_DISPATCH(fastbn_cf_elementwise, T, (x, x2, y, S, C, row0, row1, start, stop,      \
                                               shift, scale, scale2, offset, act, slope, za,  \
                                               zb));                                          \
}                                                                                             \
static void fastbn_cl_sums_##T(                                                               \
        const T *first, const T *second, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,         \
        ptrdiff_t c0, ptrdiff_t c1, const double *centre, double *acc_a, double *acc_b,       \
        int act, T slope, const T *mean_t, const T *za, const T *zb) {                        \
    if (second != NULL && act != 0)                                                           \
        FASTBN_DISPATCH(fastbn_cl_act_grad_sums, T, (first, second, C, row0, row1, c0, c1,    \
                                                     centre, acc_a, acc_b, act, slope,        \
                                                     mean_t, za, zb));                        \
    else                                                                                      \
        FASTBN_DISPATCH(fastbn_cl_sums, T, (first, second, C, row0, row1, c0, c1, centre,     \
                                            acc_a, acc_b));                                   \
}                                                                                             \
static void fastbn_cl_elementwise_##T(                                                        \
        const T *x, const T *x2, T *y, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,           \
        ptrdiff_t c0, ptrdiff_t c1, const T *shift, const T *scale, const T *scale2,          \
        const T *offset, int act, T slope, const T *za, const T *zb) {                        \
    FASTBN_DISPATCH(fastbn_cl_elementwise, T, (x, x2, y, C, row0, row1, c0, c1, shift, scale, \
                                               scale2, offset, act, slope, za, zb));          \
}

FASTBN_DEFINE_ALL(float)
FASTBN_DEFINE_ALL(double)
FASTBN_DEFINE_ENTRY_POINTS(float)
FASTBN_DEFINE_ENTRY_POINTS(double)

#endif /* FASTBN_BATCH_NORM_LOOPS_H */
