/* The loops of the BatchNorm kernels over one work item (see _batch_norm.pyx for the
 * work split), written once on _simd.h's generic vectors and compiled for every
 * instruction set there (FASTBN_FOR_EACH_ISA); FASTBN_DISPATCH picks one per call.
 *
 * Sums: a run (or, channels-last, a strip of channels down a block of rows) is summed in
 * the input's own type over blocks of FASTBN_BLOCK values (FASTBN_ROW_BLOCK rows), in two
 * vector accumulators (32 float / 16 double lanes), and each block's lanes are added in
 * float64. A float32 block is 16 values per lane at most: its rounding stays far below
 * the float32 output's, while the loop runs on twice as many lanes as float64 sums would,
 * without a conversion per value. Where a float32 block cannot hold its sums (a square
 * that overflows, as for values near 1e19, or one so small that it loses digits, below
 * 2^-100 per value), the run is summed again value by value in float64 (the *_exact
 * loops), which is how every run was summed before: such inputs keep their accuracy.
 * Every addition's order is fixed by this source and the work split, so the results are
 * the same for any thread count and on every instruction set.
 *
 * Elementwise loops (normalize, grad input): without an activation, native vectors
 * (fastbn_run_elementwise, fastbn_cl_strip_elementwise); with the fused activation
 * (fastbn/_activations.py), plain C that each instruction set's instantiation vectorises.
 */
#ifndef FASTBN_BATCH_NORM_LOOPS_H
#define FASTBN_BATCH_NORM_LOOPS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_simd.h"

/* Values of a run summed in the input's type before float64. */
#define FASTBN_BLOCK 512
/* Channels-last rows summed in the input's type before float64. */
#define FASTBN_ROW_BLOCK 32
/* Native vectors of channels side by side in a channels-last strip: as many as the registers
 * hold. Sums (fastbn_cl_strip_sums): two accumulators and a centre each; the strip is whole
 * 64-byte vectors on every instruction set (4 = one AVX-512 register each, two 64-byte
 * vectors in AVX2 registers, one in SSE2 ones). Elementwise passes
 * (fastbn_cl_strip_elementwise): four coefficients each. */
#define FASTBN_STRIP_VECTORS 4
#define FASTBN_NATIVE_STRIP_baseline 2
#define FASTBN_NATIVE_STRIP_avx2 2
#define FASTBN_NATIVE_STRIP_avx512 4
#define FASTBN_MAX_STRIP 4
/* Inlined into each caller, where the strip width K is a constant: the loops over the K
 * vectors unroll and the vectors stay in registers. */
#define FASTBN_UNROLLED inline __attribute__((always_inline))
/* Below this sum of squares per value, float32 block sums lose digits: sum in float64. */
#define FASTBN_TINY_SQUARES 0x1p-100

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

/* Native vectors and pieces (_simd.h) in the loops below. */
#define FASTBN_NV(T, ISA) fastbn_native_##T##_##ISA
/* Piece q of the 64-byte vector at p. */
#define FASTBN_PIECE(T, ISA, p, q)                                                             \
    FASTBN_NATIVE_LOAD(T, ISA, (p) + (q) * FASTBN_NATIVE_LANES(T, ISA))
#define FASTBN_ZERO_PIECES(ISA, a, b, c, d)                                                    \
    for (int q_ = 0; q_ < FASTBN_PIECES(ISA); q_++) {                                          \
        memset(&(a)[q_], 0, sizeof (a)[q_]);                                                   \
        (b)[q_] = (c)[q_] = (d)[q_] = (a)[q_];                                                 \
    }
/* t += the horizontal sum, in float64, of the 64-byte vector a + b (both held as pieces). */
#define FASTBN_ADD_PIECES(T, ISA, t, a, b)                                                     \
    do {                                                                                       \
        FASTBN_NV(T, ISA) s_[FASTBN_PIECES(ISA)];                                              \
        for (int q_ = 0; q_ < FASTBN_PIECES(ISA); q_++)                                        \
            s_[q_] = (a)[q_] + (b)[q_];                                                        \
        (t) += FASTBN_HSUM_PIECES(T, s_);                                                      \
    } while (0)

/* Piece q of a 64-byte vector (v: that piece) with the vector's lanes before the last
 * `count` (1 <= count < lanes) set to 0, bit for bit (an inf or nan there becomes 0 too):
 * the last vector of a run, loaded so that it ends with the run, holds `count` values not
 * yet added. A load, a compare and an and, where filling a padded vector with memcpy cost a
 * library call and a stalled reload of the stack copy (about a fifth of the time of a
 * GroupNorm backward on 7 x 7 maps). */
typedef int fastbn_mask_float __attribute__((vector_size(FASTBN_VECTOR_BYTES)));
typedef long long fastbn_mask_double __attribute__((vector_size(FASTBN_VECTOR_BYTES)));
static const fastbn_mask_float fastbn_lane_float = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                    14, 15};
static const fastbn_mask_double fastbn_lane_double = {0, 1, 2, 3, 4, 5, 6, 7};
#define FASTBN_LAST_LANES(T, ISA, v, q, count)                                                 \
    ({                                                                                         \
        fastbn_native_mask_##T##_##ISA lane_;                                                  \
        memcpy(&lane_, (const char *)&fastbn_lane_##T + (q) * FASTBN_NATIVE_BYTES_##ISA,       \
               sizeof lane_);                                                                  \
        (FASTBN_NV(T, ISA))((fastbn_native_mask_##T##_##ISA)(v)                                \
                            & (lane_ >= (__typeof__(lane_[0]))(FASTBN_LANES(T) - (count))));   \
    })

/* Piece q of the gradient vector at dy + i: dy, or dy * w where w is not NULL. */
#define FASTBN_GRAD(T, ISA, dy, w, i, q)                                                       \
    ((w) != NULL ? FASTBN_PIECE(T, ISA, (dy) + (i), q) * FASTBN_PIECE(T, ISA, (w) + (i), q)    \
                 : FASTBN_PIECE(T, ISA, (dy) + (i), q))

/* The loop of fastbn_run_elementwise, VALUE the vector of results at j. */
#define FASTBN_RUN_LOOP(T, ISA, VALUE)                                                         \
    do {                                                                                       \
        ptrdiff_t j = 0;                                                                       \
        fastbn_native_##T##_##ISA first = (VALUE), last;                                       \
        j = n - L;                                                                             \
        last = (VALUE);                                                                        \
        for (j = (ptrdiff_t)((FASTBN_NATIVE_BYTES_##ISA                                        \
                              - (uintptr_t)y % FASTBN_NATIVE_BYTES_##ISA)                      \
                             % FASTBN_NATIVE_BYTES_##ISA / sizeof(T));                         \
             j + L <= n; j += L)                                                               \
            FASTBN_NATIVE_STORE(T, ISA, y + j, (VALUE));                                       \
        FASTBN_NATIVE_STORE(T, ISA, y, first);                                                 \
        FASTBN_NATIVE_STORE(T, ISA, y + n - L, last);                                          \
    } while (0)

/* Values per channels-first gradient run taken at once (a work item's run is at most
 * CHUNK_ELEMENTS = 4096 values; see _batch_norm.pyx). */
#define FASTBN_GRAD_BUFFER 4096

/* Whether a float32 run's sums need float64 (see the top of this file). */
#define FASTBN_NEEDS_EXACT_float(sum, sum_sq, n) \
    (!isfinite(sum) || !(fabs(sum_sq) >= FASTBN_TINY_SQUARES * (double)(n)) || !isfinite(sum_sq))
#define FASTBN_NEEDS_EXACT_double(sum, sum_sq, n) 0

#define FASTBN_DEFINE_LOOPS(T, ISA)                                                            \
                                                                                               \
/* sum(x - pivot), sum((x - pivot)^2) over one run, value by value in float64. */              \
FASTBN_TARGET_##ISA static void fastbn_shifted_sums_exact_##T##_##ISA(                         \
        const T *x, ptrdiff_t n, double pivot, double *sum_out, double *sum_sq_out) {          \
    double t1 = 0.0, t2 = 0.0;                                                                 \
    for (ptrdiff_t i = 0; i < n; i++) {                                                        \
        double d = (double)x[i] - pivot;                                                       \
        t1 += d;                                                                               \
        t2 += d * d;                                                                           \
    }                                                                                          \
    *sum_out = t1;                                                                             \
    *sum_sq_out = t2;                                                                          \
}                                                                                              \
                                                                                               \
/* sum(g), sum((x - mean) * g) over one run, g = dy (or dy * w, LayerNorm's, w not NULL),    \
 * value by value in float64. */                                                               \
FASTBN_TARGET_##ISA static void fastbn_grad_sums_exact_##T##_##ISA(                            \
        const T *dy, const T *x, const T *w, ptrdiff_t n, double mean, double *sum_dy_out,     \
        double *dot_out) {                                                                     \
    double t1 = 0.0, t2 = 0.0;                                                                 \
    for (ptrdiff_t i = 0; i < n; i++) {                                                        \
        double g = w != NULL ? (double)dy[i] * (double)w[i] : (double)dy[i];                   \
        t1 += g;                                                                               \
        t2 += ((double)x[i] - mean) * g;                                                       \
    }                                                                                          \
    *sum_dy_out = t1;                                                                          \
    *dot_out = t2;                                                                             \
}                                                                                              \
                                                                                               \
/* sum(x - pivot), sum((x - pivot)^2) over one run, in blocks (see the top of the file), on   \
 * two 64-byte vectors of accumulators held as native pieces (_simd.h). The pivot is a value \
 * of x: exact in T. The last values (fewer than two vectors) go in one or two more vectors,  \
 * the last one ending with the run (its lanes already added masked off, FASTBN_LAST_LANES),  \
 * or in a run shorter than a vector padded with the pivot (which adds 0), so that a run of   \
 * 49 or 16 values (7 x 7 and 4 x 4 maps) costs vectors, not a scalar loop. */                 \
FASTBN_TARGET_##ISA static inline void fastbn_shifted_sums_##T##_##ISA(                        \
        const T *x, ptrdiff_t n, double pivot, double *sum_out, double *sum_sq_out) {          \
    const ptrdiff_t L = FASTBN_LANES(T);                                                       \
    const T p = (T)pivot;                                                                      \
    double t1 = 0.0, t2 = 0.0;                                                                 \
    ptrdiff_t i = 0;                                                                           \
    FASTBN_NV(T, ISA) a0[FASTBN_PIECES(ISA)], a1[FASTBN_PIECES(ISA)];                          \
    FASTBN_NV(T, ISA) b0[FASTBN_PIECES(ISA)], b1[FASTBN_PIECES(ISA)];                          \
    FASTBN_ZERO_PIECES(ISA, a0, a1, b0, b1);                                                   \
    while (n - i >= 2 * L) {                                                                   \
        ptrdiff_t stop = n - i > FASTBN_BLOCK ? i + FASTBN_BLOCK : n;                          \
        for (; i + 2 * L <= stop; i += 2 * L)                                                  \
            for (int q = 0; q < FASTBN_PIECES(ISA); q++) {                                     \
                FASTBN_NV(T, ISA) d0 = FASTBN_PIECE(T, ISA, x + i, q) - p;                     \
                FASTBN_NV(T, ISA) d1 = FASTBN_PIECE(T, ISA, x + i + L, q) - p;                 \
                a0[q] += d0;                                                                   \
                a1[q] += d1;                                                                   \
                b0[q] += d0 * d0;                                                              \
                b1[q] += d1 * d1;                                                              \
            }                                                                                  \
        if (n - i >= 2 * L) { /* a whole block: into float64, and start the next */           \
            FASTBN_ADD_PIECES(T, ISA, t1, a0, a1);                                             \
            FASTBN_ADD_PIECES(T, ISA, t2, b0, b1);                                             \
            FASTBN_ZERO_PIECES(ISA, a0, a1, b0, b1);                                           \
        }                                                                                      \
    }                                                                                          \
    if (n - i >= L) {                                                                          \
        for (int q = 0; q < FASTBN_PIECES(ISA); q++) {                                         \
            FASTBN_NV(T, ISA) d = FASTBN_PIECE(T, ISA, x + i, q) - p;                          \
            a0[q] += d;                                                                        \
            b0[q] += d * d;                                                                    \
        }                                                                                      \
        i += L;                                                                                \
    }                                                                                          \
    if (i < n && n >= L) { /* the run's last vector, less the lanes already added */          \
        for (int q = 0; q < FASTBN_PIECES(ISA); q++) {                                         \
            FASTBN_NV(T, ISA) d = FASTBN_LAST_LANES(                                           \
                T, ISA, FASTBN_PIECE(T, ISA, x + n - L, q) - p, q, n - i);                     \
            a1[q] += d;                                                                        \
            b1[q] += d * d;                                                                    \
        }                                                                                      \
    } else if (i < n) {                                                                        \
        T padded[FASTBN_LANES(T)];                                                             \
        for (ptrdiff_t j = 0; j < L; j++)                                                      \
            padded[j] = j < n - i ? x[i + j] : p;                                              \
        for (int q = 0; q < FASTBN_PIECES(ISA); q++) {                                         \
            FASTBN_NV(T, ISA) d = FASTBN_PIECE(T, ISA, padded, q) - p;                         \
            a1[q] += d;                                                                        \
            b1[q] += d * d;                                                                    \
        }                                                                                      \
    }                                                                                          \
    FASTBN_ADD_PIECES(T, ISA, t1, a0, a1);                                                     \
    FASTBN_ADD_PIECES(T, ISA, t2, b0, b1);                                                     \
    if (FASTBN_NEEDS_EXACT_##T(t1, t2, n)) {                                                   \
        fastbn_shifted_sums_exact_##T##_##ISA(x, n, pivot, sum_out, sum_sq_out);               \
        return;                                                                                \
    }                                                                                          \
    *sum_out = t1;                                                                             \
    *sum_sq_out = t2;                                                                          \
}                                                                                              \
                                                                                               \
/* sum(g), sum((x - mean) * g) over one run, g = dy or dy * w (w NULL: none; a constant      \
 * wherever BatchNorm calls this), in blocks as above; the last values as above, g padded     \
 * with 0. The mean is a value of T. */                                                        \
FASTBN_TARGET_##ISA static inline void fastbn_grad_sums_##T##_##ISA(                           \
        const T *dy, const T *x, const T *w, ptrdiff_t n, double mean, double *sum_dy_out,     \
        double *dot_out) {                                                                     \
    const ptrdiff_t L = FASTBN_LANES(T);                                                       \
    const T m = (T)mean;                                                                       \
    double t1 = 0.0, t2 = 0.0;                                                                 \
    ptrdiff_t i = 0;                                                                           \
    FASTBN_NV(T, ISA) a0[FASTBN_PIECES(ISA)], a1[FASTBN_PIECES(ISA)];                          \
    FASTBN_NV(T, ISA) b0[FASTBN_PIECES(ISA)], b1[FASTBN_PIECES(ISA)];                          \
    FASTBN_ZERO_PIECES(ISA, a0, a1, b0, b1);                                                   \
    while (n - i >= 2 * L) {                                                                   \
        ptrdiff_t stop = n - i > FASTBN_BLOCK ? i + FASTBN_BLOCK : n;                          \
        for (; i + 2 * L <= stop; i += 2 * L)                                                  \
            for (int q = 0; q < FASTBN_PIECES(ISA); q++) {                                     \
                FASTBN_NV(T, ISA) g0 = FASTBN_GRAD(T, ISA, dy, w, i, q);                       \
                FASTBN_NV(T, ISA) g1 = FASTBN_GRAD(T, ISA, dy, w, i + L, q);                   \
                a0[q] += g0;                                                                   \
                a1[q] += g1;                                                                   \
                b0[q] += (FASTBN_PIECE(T, ISA, x + i, q) - m) * g0;                            \
                b1[q] += (FASTBN_PIECE(T, ISA, x + i + L, q) - m) * g1;                        \
            }                                                                                  \
        if (n - i >= 2 * L) {                                                                  \
            FASTBN_ADD_PIECES(T, ISA, t1, a0, a1);                                             \
            FASTBN_ADD_PIECES(T, ISA, t2, b0, b1);                                             \
            FASTBN_ZERO_PIECES(ISA, a0, a1, b0, b1);                                           \
        }                                                                                      \
    }                                                                                          \
    if (n - i >= L) {                                                                          \
        for (int q = 0; q < FASTBN_PIECES(ISA); q++) {                                         \
            FASTBN_NV(T, ISA) g = FASTBN_GRAD(T, ISA, dy, w, i, q);                            \
            a0[q] += g;                                                                        \
            b0[q] += (FASTBN_PIECE(T, ISA, x + i, q) - m) * g;                                 \
        }                                                                                      \
        i += L;                                                                                \
    }                                                                                          \
    if (i < n && n >= L) { /* as in fastbn_shifted_sums */                                    \
        for (int q = 0; q < FASTBN_PIECES(ISA); q++) {                                         \
            FASTBN_NV(T, ISA) g = FASTBN_GRAD(T, ISA, dy, w, n - L, q);                        \
            FASTBN_NV(T, ISA) xv = FASTBN_PIECE(T, ISA, x + n - L, q);                         \
            a1[q] += FASTBN_LAST_LANES(T, ISA, g, q, n - i);                                   \
            b1[q] += FASTBN_LAST_LANES(T, ISA, (xv - m) * g, q, n - i);                        \
        }                                                                                      \
    } else if (i < n) {                                                                        \
        T g_padded[FASTBN_LANES(T)], x_padded[FASTBN_LANES(T)];                                \
        for (ptrdiff_t j = 0; j < L; j++) {                                                    \
            g_padded[j] = j < n - i ? (w != NULL ? dy[i + j] * w[i + j] : dy[i + j]) : (T)0;   \
            x_padded[j] = j < n - i ? x[i + j] : m;                                            \
        }                                                                                      \
        for (int q = 0; q < FASTBN_PIECES(ISA); q++) {                                         \
            FASTBN_NV(T, ISA) g = FASTBN_PIECE(T, ISA, g_padded, q);                           \
            a1[q] += g;                                                                        \
            b1[q] += (FASTBN_PIECE(T, ISA, x_padded, q) - m) * g;                              \
        }                                                                                      \
    }                                                                                          \
    FASTBN_ADD_PIECES(T, ISA, t1, a0, a1);                                                     \
    FASTBN_ADD_PIECES(T, ISA, t2, b0, b1);                                                     \
    if (!isfinite(t1) || !isfinite(t2)) { /* an overflow in T, or a non-finite value */       \
        fastbn_grad_sums_exact_##T##_##ISA(dy, x, w, n, mean, sum_dy_out, dot_out);            \
        return;                                                                                \
    }                                                                                          \
    *sum_dy_out = t1;                                                                          \
    *dot_out = t2;                                                                             \
}                                                                                              \
                                                                                               \
/* Channels-first work item: rows [row0, row1) of the (N * C, S) matrix, columns [start,       \
 * stop) of each; row r is channel r % C. Writes one partial per (row, chunk) to               \
 * part_a/part_b[r * chunks + chunk]: with second == NULL the shifted sums of first (= x),     \
 * else the gradient sums of first (= dy, through the activation's derivative) and second     \
 * (= x). */                                                                                   \
FASTBN_TARGET_##ISA static void fastbn_cf_sums_##T##_##ISA(                                    \
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
                                            part_a + slot, part_b + slot);                     \
        } else if (act == 0) {                                                                 \
            fastbn_grad_sums_##T##_##ISA(first + offset, second + offset, NULL, n, centre[c],  \
                                         part_a + slot, part_b + slot);                        \
        } else {  /* dy through the activation first, into a buffer the sums then read */     \
            const T *dyr = first + offset, *xr = second + offset;                              \
            T m = mean_t[c], zs = za[c], zo = zb[c];                                           \
            FASTBN_ACTIVATION_CASES(T, act, FASTBN_CF_GRAD);                                   \
            fastbn_grad_sums_##T##_##ISA(gbuf, xr, NULL, n, centre[c], part_a + slot,          \
                                         part_b + slot);                                       \
        }                                                                                      \
        if (++c == C)                                                                          \
            c = 0;                                                                             \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* One run of n values without an activation: y = (x - sh) * a + o, or with x2                \
 * y = x * a + (x2 - sh) * b + o. Native vectors: the run's first and last vectors (which may \
 * share lanes with their neighbours) are computed first and stored last, the ones between    \
 * are stored aligned (a store across two cache lines costs about twice one). So a run of 49 \
 * values costs a few vectors and no scalar loop, and y may be x (or x2): every value is read \
 * before a store can reach it, and shared lanes get the same value twice. */                 \
FASTBN_TARGET_##ISA static FASTBN_UNROLLED void fastbn_run_elementwise_##T##_##ISA(            \
        const T *x, const T *x2, T *y, ptrdiff_t n, T sh, T a, T b, T o) {                     \
    const ptrdiff_t L = FASTBN_NATIVE_LANES(T, ISA);                                           \
    ptrdiff_t i;                                                                               \
    if (n < L) {                                                                               \
        for (i = 0; i < n; i++)                                                                \
            y[i] = x2 == NULL ? (x[i] - sh) * a + o : x[i] * a + (x2[i] - sh) * b + o;         \
    } else if (x2 == NULL) {                                                                   \
        FASTBN_RUN_LOOP(T, ISA, (FASTBN_NATIVE_LOAD(T, ISA, x + (j)) - sh) * a + o);           \
    } else {                                                                                   \
        FASTBN_RUN_LOOP(T, ISA, FASTBN_NATIVE_LOAD(T, ISA, x + (j)) * a                        \
                                + (FASTBN_NATIVE_LOAD(T, ISA, x2 + (j)) - sh) * b + o);        \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Channels-first work item, elementwise, per channel c:                                       \
 *   x2 == NULL: y = act((x - shift[c]) * scale[c] + offset[c])                                \
 *   else:       y = g * scale[c] + (x2 - shift[c]) * scale2[c] + offset[c],                   \
 *               g = x * act'((x2 - shift[c]) * za[c] + zb[c])  (g = x without activation)     \
 * (the backward: x = dy, x2 = x, y = dx, shift = the mean). */                                \
FASTBN_TARGET_##ISA static void fastbn_cf_elementwise_##T##_##ISA(                             \
        const T *x, const T *x2, T *y, ptrdiff_t S, ptrdiff_t C, ptrdiff_t row0,               \
        ptrdiff_t row1, ptrdiff_t start, ptrdiff_t stop, const T *shift, const T *scale,       \
        const T *scale2, const T *offset, int act, T slope, const T *za, const T *zb) {        \
    ptrdiff_t c = row0 % C;                                                                    \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        const T *xr = x + r * S;                                                               \
        T *yr = y + r * S;                                                                     \
        T sh = shift[c], a = scale[c], o = offset[c];                                          \
        if (act == 0) {                                                                        \
            fastbn_run_elementwise_##T##_##ISA(xr + start, x2 != NULL ? x2 + r * S + start     \
                                               : NULL, yr + start, stop - start, sh, a,        \
                                               x2 != NULL ? scale2[c] : (T)0, o);              \
        } else if (x2 == NULL) {                                                               \
            FASTBN_ACTIVATION_CASES(T, act, FASTBN_CF_FORWARD);                                \
        } else {                                                                               \
            const T *x2r = x2 + r * S;                                                         \
            T b = scale2[c], zs = za[c], zo = zb[c];                                           \
            FASTBN_ACTIVATION_CASES(T, act, FASTBN_CF_BACKWARD);                               \
        }                                                                                      \
        if (++c == C)                                                                          \
            c = 0;                                                                             \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Channels-last sums of the V * (native lanes) channels from c: a strip of V native vectors  \
 * side by side, summed down FASTBN_ROW_BLOCK rows in T (V independent additions in flight,    \
 * adjacent cache lines of every row), each block then added per channel in float64. A       \
 * channel that needs it (see the top of the file) is summed again value by value in float64, \
 * on its own: the result of a channel does not depend on the strip it was in, nor on the     \
 * instruction set (strips are whole 64-byte vectors of channels on every path). */           \
FASTBN_TARGET_##ISA static FASTBN_UNROLLED void fastbn_cl_strip_sums_##T##_##ISA(              \
        const T *first, const T *second, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,          \
        ptrdiff_t c, const int V, const double *centre, double *acc_a, double *acc_b) {        \
    const ptrdiff_t NL = FASTBN_NATIVE_LANES(T, ISA);                                          \
    FASTBN_NV(T, ISA) m[FASTBN_STRIP_VECTORS], a[FASTBN_STRIP_VECTORS];                        \
    FASTBN_NV(T, ISA) b[FASTBN_STRIP_VECTORS];                                                 \
    T lanes[FASTBN_STRIP_VECTORS * FASTBN_LANES(T)];                                           \
    for (ptrdiff_t j = 0; j < V * NL; j++) {                                                   \
        lanes[j] = (T)centre[c + j];                                                           \
        acc_a[c + j] = acc_b[c + j] = 0.0;                                                     \
    }                                                                                          \
    for (int v = 0; v < V; v++)                                                                \
        m[v] = FASTBN_NATIVE_LOAD(T, ISA, lanes + v * NL);                                     \
    for (ptrdiff_t r0 = row0, r1; r0 < row1; r0 = r1) {                                        \
        r1 = row1 - r0 > FASTBN_ROW_BLOCK ? r0 + FASTBN_ROW_BLOCK : row1;                      \
        for (int v = 0; v < V; v++) {                                                          \
            memset(&a[v], 0, sizeof a[v]);                                                     \
            b[v] = a[v];                                                                       \
        }                                                                                      \
        for (ptrdiff_t r = r0; r < r1; r++) {                                                  \
            const T *f = first + r * C + c;                                                    \
            for (int v = 0; v < V; v++) {                                                      \
                FASTBN_NV(T, ISA) value = FASTBN_NATIVE_LOAD(T, ISA, f + v * NL);              \
                if (second == NULL) {                                                          \
                    value -= m[v];                                                             \
                    a[v] += value;                                                             \
                    b[v] += value * value;                                                     \
                } else {                                                                       \
                    a[v] += value;                                                             \
                    b[v] += (FASTBN_NATIVE_LOAD(T, ISA, second + r * C + c + v * NL) - m[v])   \
                            * value;                                                           \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        /* Through a buffer: the conversion loop vectorises. */                                \
        for (int v = 0; v < V; v++)                                                            \
            FASTBN_NATIVE_STORE(T, ISA, lanes + v * NL, a[v]);                                 \
        for (ptrdiff_t j = 0; j < V * NL; j++)                                                 \
            acc_a[c + j] += (double)lanes[j];                                                  \
        for (int v = 0; v < V; v++)                                                            \
            FASTBN_NATIVE_STORE(T, ISA, lanes + v * NL, b[v]);                                 \
        for (ptrdiff_t j = 0; j < V * NL; j++)                                                 \
            acc_b[c + j] += (double)lanes[j];                                                  \
    }                                                                                          \
    /* One vectorised test for the strip, then the channels' own (x * 0 != 0: inf or nan). */  \
    int exact = 0;                                                                             \
    for (ptrdiff_t j = c; j < c + V * NL; j++)                                                 \
        exact |= (acc_a[j] * 0.0 != 0.0) | (acc_b[j] * 0.0 != 0.0)                            \
                 | (second == NULL && sizeof(T) < sizeof(double)                               \
                    && !(fabs(acc_b[j]) >= FASTBN_TINY_SQUARES * (double)(row1 - row0)));     \
    for (ptrdiff_t j = c; exact && j < c + V * NL; j++)                                        \
        if (second == NULL ? FASTBN_NEEDS_EXACT_##T(acc_a[j], acc_b[j], row1 - row0)           \
                           : !isfinite(acc_a[j]) || !isfinite(acc_b[j]))                       \
            fastbn_cl_sums_exact_##T##_##ISA(first, second, C, row0, row1, j, j + 1, centre,   \
                                             acc_a, acc_b);                                    \
}                                                                                              \
                                                                                               \
/* Channels-last work item: rows [row0, row1) of the (N * S, C) matrix, channels [c0, c1).     \
 * Sets acc_a/acc_b[c] for c in [c0, c1) to the item's sums (shifted sums of first, or         \
 * gradient sums of first = dy and second = x, as above): strips of FASTBN_STRIP_VECTORS       \
 * native vectors (whole 64-byte vectors of channels: 64 float32 channels on AVX-512, 32 on   \
 * AVX2, 16 on SSE2), then of one 64-byte vector; the last channels (fewer than a 64-byte     \
 * vector) value by value in float64. */                                                      \
FASTBN_TARGET_##ISA static void fastbn_cl_sums_##T##_##ISA(                                    \
        const T *first, const T *second, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,          \
        ptrdiff_t c0, ptrdiff_t c1, const double *centre, double *acc_a, double *acc_b) {      \
    const ptrdiff_t L = FASTBN_LANES(T), NL = FASTBN_NATIVE_LANES(T, ISA);                     \
    ptrdiff_t c = c0;                                                                          \
    for (; c + FASTBN_STRIP_VECTORS * NL <= c1; c += FASTBN_STRIP_VECTORS * NL)                \
        fastbn_cl_strip_sums_##T##_##ISA(first, second, C, row0, row1, c,                      \
                                         FASTBN_STRIP_VECTORS, centre, acc_a, acc_b);          \
    for (; c + L <= c1; c += L)                                                                \
        fastbn_cl_strip_sums_##T##_##ISA(first, second, C, row0, row1, c, FASTBN_PIECES(ISA),  \
                                         centre, acc_a, acc_b);                                \
    if (c < c1)                                                                                \
        fastbn_cl_sums_exact_##T##_##ISA(first, second, C, row0, row1, c, c1, centre, acc_a,   \
                                         acc_b);                                               \
}                                                                                              \
                                                                                               \
/* Channels-last work item, gradient sums through an activation (act != 0): acc_a/acc_b[c]    \
 * for c in [c0, c1) = sum(g), sum((x - centre) * g), g = dy * act'((x - mean_t) * za + zb).     \
 * Channels inner, so the loop vectorises across channels with one sum per channel. */         \
FASTBN_TARGET_##ISA static void fastbn_cl_act_grad_sums_##T##_##ISA(                           \
        const T *dy, const T *x, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1, ptrdiff_t c0,    \
        ptrdiff_t c1, const double *centre, double *acc_a, double *acc_b, int act, T slope,    \
        const T *mean_t, const T *za, const T *zb) {                                           \
    for (ptrdiff_t c = c0; c < c1; c++)                                                        \
        acc_a[c] = acc_b[c] = 0.0;                                                             \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        const T *dyr = dy + r * C, *xr = x + r * C;                                            \
        FASTBN_ACTIVATION_CASES(T, act, FASTBN_CL_GRAD_SUMS);                                  \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Channels-last elementwise without an activation, on a strip of K native vectors of        \
 * channels from c: its coefficients loaded once (registers) for all the rows. */              \
FASTBN_TARGET_##ISA static FASTBN_UNROLLED void fastbn_cl_strip_elementwise_##T##_##ISA(       \
        const T *x, const T *x2, T *y, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,            \
        ptrdiff_t c, const int K, const T *shift, const T *scale, const T *scale2,             \
        const T *offset) {                                                                     \
    const ptrdiff_t L = FASTBN_NATIVE_LANES(T, ISA);                                           \
    fastbn_native_##T##_##ISA sh[FASTBN_MAX_STRIP], a[FASTBN_MAX_STRIP];                       \
    fastbn_native_##T##_##ISA b[FASTBN_MAX_STRIP], o[FASTBN_MAX_STRIP];                        \
    for (int k = 0; k < K; k++) {                                                              \
        sh[k] = FASTBN_NATIVE_LOAD(T, ISA, shift + c + k * L);                                 \
        a[k] = FASTBN_NATIVE_LOAD(T, ISA, scale + c + k * L);                                  \
        b[k] = x2 != NULL ? FASTBN_NATIVE_LOAD(T, ISA, scale2 + c + k * L) : a[k];             \
        o[k] = FASTBN_NATIVE_LOAD(T, ISA, offset + c + k * L);                                 \
    }                                                                                          \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        const T *xr = x + r * C + c;                                                           \
        T *yr = y + r * C + c;                                                                 \
        if (x2 == NULL) {                                                                      \
            for (int k = 0; k < K; k++)                                                        \
                FASTBN_NATIVE_STORE(T, ISA, yr + k * L,                                        \
                                    (FASTBN_NATIVE_LOAD(T, ISA, xr + k * L) - sh[k]) * a[k]    \
                                    + o[k]);                                                   \
        } else {                                                                               \
            const T *x2r = x2 + r * C + c;                                                     \
            for (int k = 0; k < K; k++)                                                        \
                FASTBN_NATIVE_STORE(T, ISA, yr + k * L,                                        \
                                    FASTBN_NATIVE_LOAD(T, ISA, xr + k * L) * a[k]              \
                                    + (FASTBN_NATIVE_LOAD(T, ISA, x2r + k * L) - sh[k]) * b[k] \
                                    + o[k]);                                                   \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* Channels-last work item, elementwise (same formulas as the channels-first one). Without an  \
 * activation, strips of vectors as in fastbn_cl_sums (the last channels in the plain loop). */ \
FASTBN_TARGET_##ISA static void fastbn_cl_elementwise_##T##_##ISA(                             \
        const T *x, const T *x2, T *y, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,            \
        ptrdiff_t c0, ptrdiff_t c1, const T *shift, const T *scale, const T *scale2,           \
        const T *offset, int act, T slope, const T *za, const T *zb) {                         \
    if (act == 0) {                                                                            \
        const ptrdiff_t L = FASTBN_NATIVE_LANES(T, ISA), K = FASTBN_NATIVE_STRIP_##ISA;        \
        for (; c0 + K * L <= c1; c0 += K * L)                                                  \
            fastbn_cl_strip_elementwise_##T##_##ISA(x, x2, y, C, row0, row1, c0, K, shift,     \
                                                    scale, scale2, offset);                    \
        for (; c0 + L <= c1; c0 += L)                                                          \
            fastbn_cl_strip_elementwise_##T##_##ISA(x, x2, y, C, row0, row1, c0, 1, shift,     \
                                                    scale, scale2, offset);                    \
        if (c0 == c1)                                                                          \
            return;                                                                            \
    }                                                                                          \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        const T *xr = x + r * C;                                                               \
        T *yr = y + r * C;                                                                     \
        if (x2 == NULL) {                                                                      \
            FASTBN_ACTIVATION_CASES(T, act, FASTBN_CL_FORWARD);                                \
        } else {                                                                               \
            const T *x2r = x2 + r * C;                                                         \
            if (act == 0) {                                                                    \
                for (ptrdiff_t c = c0; c < c1; c++)                                            \
                    yr[c] = xr[c] * scale[c] + (x2r[c] - shift[c]) * scale2[c] + offset[c];    \
            } else {                                                                           \
                FASTBN_ACTIVATION_CASES(T, act, FASTBN_CL_BACKWARD);                           \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

/* Channels-last sums of channels [c0, c1) value by value in float64 (the strips' fallback,
 * and the channels that do not fill a vector). Rows outer: the reads stay contiguous. */
#define FASTBN_DEFINE_EXACT_CL_SUMS(T, ISA)                                                    \
FASTBN_TARGET_##ISA static void fastbn_cl_sums_exact_##T##_##ISA(                              \
        const T *first, const T *second, ptrdiff_t C, ptrdiff_t row0, ptrdiff_t row1,          \
        ptrdiff_t c0, ptrdiff_t c1, const double *centre, double *acc_a, double *acc_b) {      \
    for (ptrdiff_t c = c0; c < c1; c++)                                                        \
        acc_a[c] = acc_b[c] = 0.0;                                                             \
    for (ptrdiff_t r = row0; r < row1; r++) {                                                  \
        const T *fr = first + r * C;                                                           \
        for (ptrdiff_t c = c0; c < c1; c++) {                                                  \
            double f = (double)fr[c];                                                          \
            if (second == NULL) {                                                              \
                f -= centre[c];                                                                \
                acc_a[c] += f;                                                                 \
                acc_b[c] += f * f;                                                             \
            } else {                                                                           \
                acc_a[c] += f;                                                                 \
                acc_b[c] += ((double)second[r * C + c] - centre[c]) * f;                       \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

#define FASTBN_DEFINE_ISA(ISA)                                                                 \
    FASTBN_DEFINE_EXACT_CL_SUMS(float, ISA)                                                    \
    FASTBN_DEFINE_EXACT_CL_SUMS(double, ISA)                                                   \
    FASTBN_DEFINE_LOOPS(float, ISA)                                                            \
    FASTBN_DEFINE_LOOPS(double, ISA)
FASTBN_FOR_EACH_ISA(FASTBN_DEFINE_ISA)

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

FASTBN_DEFINE_ENTRY_POINTS(float)
FASTBN_DEFINE_ENTRY_POINTS(double)

#endif /* FASTBN_BATCH_NORM_LOOPS_H */
