/* Inner loops of the normalization-activation kernels (_norm_act.pyx): Filter Response
 * Normalization + TLU and EvoNorm-S0.
 *
 * Both ops are, per (sample, group) -- FRN's group is one channel -- a statistics pass and
 * an elementwise pass, and their backward a pass of sums and an elementwise pass. The
 * loops are written once, in _norm_act_template.h, for an element whose kind is a
 * compile-time mode:
 *
 *   NA_PLAIN  y = x * a + b                 (FRN without TLU, EvoNorm without activation)
 *   NA_TLU    y = max(x * a + b, tau)       (FRN + TLU)
 *   NA_ACT    y = x * sigmoid(v * x) * a + b  (EvoNorm-S0)
 *
 * with a = rstd * weight of the element's (sample, channel). Two shapes of loop:
 * runs (n consecutive values sharing their coefficients: channels-first memory) and
 * tiles (rows of `width` channels, one coefficient per column: channels-last memory).
 *
 * Vectors: GCC/Clang vector extensions at the instruction set's native width
 * (64 bytes with AVX-512, 32 with AVX2, 16 otherwise), so that comparisons and
 * selects stay vector instructions (wider-than-native vectors made GCC 12 compare
 * lane by lane: 7x slower). On x86-64 the template is compiled for each of the three
 * instruction sets of _simd.h, and _simd.h's dispatch runs the one the module selected
 * at import (the widest the CPU has, capped by FASTBN_SIMD), as every Cython kernel.
 * Other compilers get one-lane "vectors" (plain scalar code) from the same template;
 * FASTBN_NO_VECTOR_EXTENSIONS forces that build, to test it.
 *
 * Sums are float64 whatever the data's type (float32 values are widened before they
 * are added, so squares cannot overflow), in a fixed lane order: the result does not
 * depend on the thread count. It may differ in the last bits between instruction sets.
 *
 * sigmoid(t) = 1 / (1 + e) for t >= 0 and e / (1 + e) for t < 0, e = exp(-|t|), so that
 * exp never overflows and small values keep their relative precision; exp is Cephes'
 * (expf: degree-6 polynomial; exp: Pade approximant, both after a Cody-Waite reduction by
 * ln 2), vectorised; e below the smallest normal number is taken as 0.
 */
#ifndef FASTBN_NORM_ACT_LOOPS_H
#define FASTBN_NORM_ACT_LOOPS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_simd.h"

enum { NA_PLAIN = 0, NA_TLU = 1, NA_ACT = 2 };

#define NA_CAT3_(a, b, c) a##_##b##_##c
#define NA_CAT3(a, b, c) NA_CAT3_(a, b, c)

#if (defined(__GNUC__) || defined(__clang__)) && !defined(FASTBN_NO_VECTOR_EXTENSIONS)
#define NA_VECTORS 1
#define NA_INLINE static inline __attribute__((always_inline))
#else
#define NA_VECTORS 0
#define NA_INLINE static inline
#endif

#define NA_X86_DISPATCH (NA_VECTORS && FASTBN_X86)

/* ---- instantiations: (type, instruction set, vector bytes, function attributes) ---- */

#define NA_T float
#define NA_IS_DOUBLE 0
#define NA_ISA baseline
#define NA_BYTES 16
#define NA_ATTR
#include "_norm_act_template.h"
#define NA_T double
#define NA_IS_DOUBLE 1
#define NA_ISA baseline
#define NA_BYTES 16
#define NA_ATTR
#include "_norm_act_template.h"

#if NA_X86_DISPATCH
#define NA_T float
#define NA_IS_DOUBLE 0
#define NA_ISA avx2
#define NA_BYTES 32
#define NA_ATTR FASTBN_TARGET_avx2
#include "_norm_act_template.h"
#define NA_T double
#define NA_IS_DOUBLE 1
#define NA_ISA avx2
#define NA_BYTES 32
#define NA_ATTR FASTBN_TARGET_avx2
#include "_norm_act_template.h"
#define NA_T float
#define NA_IS_DOUBLE 0
#define NA_ISA avx512
#define NA_BYTES 64
#define NA_ATTR FASTBN_TARGET_avx512
#include "_norm_act_template.h"
#define NA_T double
#define NA_IS_DOUBLE 1
#define NA_ISA avx512
#define NA_BYTES 64
#define NA_ATTR FASTBN_TARGET_avx512
#include "_norm_act_template.h"

#endif

/* ---- the entry points the kernels call: na_<loop>_<type>(...) ---- */

#if NA_X86_DISPATCH
#define NA_DEFINE_ENTRY(name, T, params, args) \
    static void na_##name##_##T params { FASTBN_DISPATCH(na_##name, T, args); }
#else
#define NA_DEFINE_ENTRY(name, T, params, args) \
    static void na_##name##_##T params { na_##name##_##T##_baseline args; }
#endif

#define NA_DEFINE_ENTRIES(T) \
    NA_DEFINE_ENTRY(run_stats, T, \
        (const T* x, ptrdiff_t n, double pivot, double* sum, double* sum_sq), \
        (x, n, pivot, sum, sum_sq)) \
    NA_DEFINE_ENTRY(run_forward, T, \
        (const T* x, T* y, ptrdiff_t n, T a, T b, T v, T tau, int mode), \
        (x, y, n, a, b, v, tau, mode)) \
    NA_DEFINE_ENTRY(run_backward_sums, T, \
        (const T* dz, const T* x, ptrdiff_t n, T a, T b, T v, T tau, int mode, \
         double* sum_gu, double* sum_g, double* sum_third), \
        (dz, x, n, a, b, v, tau, mode, sum_gu, sum_g, sum_third)) \
    NA_DEFINE_ENTRY(run_backward_dx, T, \
        (const T* dz, const T* x, T* dx, ptrdiff_t n, T a, T b, T v, T tau, T k, T m, \
         int mode), \
        (dz, x, dx, n, a, b, v, tau, k, m, mode)) \
    NA_DEFINE_ENTRY(tile_stats, T, \
        (const T* x, ptrdiff_t rows, ptrdiff_t stride, ptrdiff_t width, const double* pivot, \
         double* sum, double* sum_sq), \
        (x, rows, stride, width, pivot, sum, sum_sq)) \
    NA_DEFINE_ENTRY(tile_forward, T, \
        (const T* x, T* y, ptrdiff_t rows, ptrdiff_t stride, ptrdiff_t width, const T* a, \
         const T* b, const T* v, const T* tau, int mode), \
        (x, y, rows, stride, width, a, b, v, tau, mode)) \
    NA_DEFINE_ENTRY(tile_backward_sums, T, \
        (const T* dz, const T* x, ptrdiff_t rows, ptrdiff_t stride, ptrdiff_t width, \
         const T* a, const T* b, const T* v, const T* tau, int mode, double* sum_gu, \
         double* sum_g, double* sum_third), \
        (dz, x, rows, stride, width, a, b, v, tau, mode, sum_gu, sum_g, sum_third)) \
    NA_DEFINE_ENTRY(tile_backward_dx, T, \
        (const T* dz, const T* x, T* dx, ptrdiff_t rows, ptrdiff_t stride, ptrdiff_t width, \
         const T* a, const T* b, const T* v, const T* tau, const T* k, const T* m, int mode), \
        (dz, x, dx, rows, stride, width, a, b, v, tau, k, m, mode))

NA_DEFINE_ENTRIES(float)
NA_DEFINE_ENTRIES(double)

#endif
