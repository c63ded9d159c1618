/* fastbn's one SIMD and dispatch layer, shared by the Cython kernels.
 *
 * Which instruction sets are compiled: every kernel loop that includes this header is
 * written once, as a macro of (T, ISA, ATTR), and instantiated for each entry of
 * FASTBN_FOR_EACH_ISA: the build's baseline (SSE2 on x86-64), AVX2 + FMA, and AVX-512
 * (F, DQ, BW, VL), the latter two with GCC/Clang target attributes, so the build needs
 * no -march flag and the package runs on any x86-64 CPU. Elsewhere (or with another
 * compiler) only the baseline is compiled.
 *
 * How one is chosen: at import, each kernel module calls fastbn_simd_select(limit), which
 * takes the widest set the CPU supports, capped by `limit` (from the FASTBN_SIMD
 * environment variable, read and checked in Python: fastbn/_cython/_simd.pxd). The
 * choice is one global per module, read by FASTBN_DISPATCH on every call.
 *
 * One way of writing a vector loop: generic vectors of FASTBN_VECTOR_BYTES = 64 bytes
 * (fastbn_vec_float: 16 floats, fastbn_vec_double: 8 doubles) whatever the instruction
 * set. The compiler maps one to a zmm register, two ymm or four xmm registers. So a
 * reduction written with them adds its values in the same order on every path, and the
 * paths differ only where the compiler contracts a multiply and an add into one FMA
 * (AVX2 and AVX-512, not SSE2): a last bit. Elementwise loops, whose values do not depend
 * on the width, are on native vectors (one register: FASTBN_NATIVE_*), or plain C that each
 * instantiation's target vectorises. For a given path, results do not depend on the
 * thread count.
 */
#ifndef FASTBN_SIMD_H
#define FASTBN_SIMD_H

#include <stddef.h>
#include <string.h>

#define FASTBN_ISA_BASELINE 0
#define FASTBN_ISA_AVX2 1
#define FASTBN_ISA_AVX512 2

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FASTBN_X86 1
#define FASTBN_TARGET_baseline
#define FASTBN_TARGET_avx2 __attribute__((target("avx2,fma")))
#define FASTBN_TARGET_avx512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
/* X(isa) for each compiled instruction set. */
#define FASTBN_FOR_EACH_ISA(X) X(baseline) X(avx2) X(avx512)
#else
#define FASTBN_X86 0
#define FASTBN_TARGET_baseline
#define FASTBN_FOR_EACH_ISA(X) X(baseline)
#endif

/* The instruction set this module's kernels run (FASTBN_ISA_*), set by fastbn_simd_select. */
static int fastbn_isa = FASTBN_ISA_BASELINE;

/* The widest instruction set this CPU runs that was compiled. */
static int fastbn_simd_supported(void) {
#if FASTBN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return FASTBN_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return FASTBN_ISA_AVX2;
#endif
    return FASTBN_ISA_BASELINE;
}

/* Use the widest supported set, at most `limit` (a FASTBN_ISA_*); returns the choice. */
static int fastbn_simd_select(int limit) {
    int supported = fastbn_simd_supported();
    fastbn_isa = limit < supported ? limit : supported;
    return fastbn_isa;
}

/* name##_##T##_##isa args, for the selected isa. */
#if FASTBN_X86
#define FASTBN_DISPATCH(name, T, args)                                                       \
    do {                                                                                     \
        if (fastbn_isa == FASTBN_ISA_AVX512) name##_##T##_avx512 args;                       \
        else if (fastbn_isa == FASTBN_ISA_AVX2) name##_##T##_avx2 args;                      \
        else name##_##T##_baseline args;                                                     \
    } while (0)
#else
#define FASTBN_DISPATCH(name, T, args) name##_##T##_baseline args
#endif

/* Generic vectors (GCC/Clang vector extensions; the baseline of other compilers is not
 * supported by the kernels that include this header). */
#define FASTBN_VECTOR_BYTES 64
typedef float fastbn_vec_float __attribute__((vector_size(FASTBN_VECTOR_BYTES)));
typedef double fastbn_vec_double __attribute__((vector_size(FASTBN_VECTOR_BYTES)));
typedef float fastbn_half_float __attribute__((vector_size(FASTBN_VECTOR_BYTES / 2)));
typedef double fastbn_half_double __attribute__((vector_size(FASTBN_VECTOR_BYTES / 2)));
typedef float fastbn_quarter_float __attribute__((vector_size(FASTBN_VECTOR_BYTES / 4)));
typedef double fastbn_quarter_double __attribute__((vector_size(FASTBN_VECTOR_BYTES / 4)));
#define FASTBN_LANES(T) ((ptrdiff_t)(FASTBN_VECTOR_BYTES / sizeof(T)))

/* Unaligned load and store (memcpy of a vector compiles to one move per register). */
#define FASTBN_LOAD(T, p) ({ fastbn_vec_##T v_; memcpy(&v_, (p), sizeof v_); v_; })
#define FASTBN_STORE(T, p, v) do { fastbn_vec_##T v_ = (v); memcpy((p), &v_, sizeof v_); } while (0)

/* Native vectors: one register of each instruction set (16, 32, 64 bytes), for the loops
 * that store vectors (elementwise passes). A value's result there does not depend on the
 * width, so these give the same numbers on every path; and GCC lowers an unaligned store of
 * a 64-byte vector through the stack where the registers are narrower (AVX2, SSE2). */
#define FASTBN_NATIVE_BYTES_baseline 16
#define FASTBN_NATIVE_BYTES_avx2 32
#define FASTBN_NATIVE_BYTES_avx512 64
#define FASTBN_DEFINE_NATIVE_VECTORS(isa)                                                     \
    typedef float fastbn_native_float_##isa                                                 \
        __attribute__((vector_size(FASTBN_NATIVE_BYTES_##isa)));                            \
    typedef double fastbn_native_double_##isa                                               \
        __attribute__((vector_size(FASTBN_NATIVE_BYTES_##isa)));
FASTBN_FOR_EACH_ISA(FASTBN_DEFINE_NATIVE_VECTORS)
#define FASTBN_NATIVE_LANES(T, isa) ((ptrdiff_t)(FASTBN_NATIVE_BYTES_##isa / sizeof(T)))
/* Integer vectors of the same lanes, for masks (a comparison gives -1 where true, 0 where
 * false). */
#define FASTBN_DEFINE_NATIVE_MASKS(isa)                                                       \
    typedef int fastbn_native_mask_float_##isa                                              \
        __attribute__((vector_size(FASTBN_NATIVE_BYTES_##isa)));                            \
    typedef long long fastbn_native_mask_double_##isa                                       \
        __attribute__((vector_size(FASTBN_NATIVE_BYTES_##isa)));
FASTBN_FOR_EACH_ISA(FASTBN_DEFINE_NATIVE_MASKS)

/* A 64-byte vector held as FASTBN_PIECES native vectors (one AVX-512 register, two AVX2
 * ones, four SSE2 ones), for values carried from one iteration of a loop to the next:
 * GCC keeps a 64-byte vector variable in memory where no register holds one (AVX2, SSE2;
 * measured: a run's sums 3-5x slower on the AVX2 path). Lane j of the 64-byte vector is
 * lane j % lanes of piece j / lanes, so the same arithmetic per piece, and
 * FASTBN_HSUM_PIECES, give the numbers of the 64-byte vector on every path. */
#define FASTBN_PIECES(isa) (FASTBN_VECTOR_BYTES / FASTBN_NATIVE_BYTES_##isa)
#define FASTBN_NATIVE_LOAD(T, isa, p)                                                         \
    ({ fastbn_native_##T##_##isa v_; memcpy(&v_, (p), sizeof v_); v_; })
#define FASTBN_NATIVE_STORE(T, isa, p, v)                                                     \
    do { fastbn_native_##T##_##isa v_ = (v); memcpy((p), &v_, sizeof v_); } while (0)

/* Horizontal sums by halving, in a fixed order, returned as double. The halves stay in
 * registers. */
static inline double fastbn_hsum_float(fastbn_vec_float v) {
    fastbn_half_float lo8, hi8;
    fastbn_quarter_float lo4, hi4;
    memcpy(&lo8, &v, 32); memcpy(&hi8, (const char *)&v + 32, 32); lo8 += hi8;
    memcpy(&lo4, &lo8, 16); memcpy(&hi4, (const char *)&lo8 + 16, 16); lo4 += hi4;
    return ((double)lo4[0] + (double)lo4[2]) + ((double)lo4[1] + (double)lo4[3]);
}
static inline double fastbn_hsum_double(fastbn_vec_double v) {
    fastbn_half_double lo4, hi4;
    fastbn_quarter_double lo2, hi2;
    memcpy(&lo4, &v, 32); memcpy(&hi4, (const char *)&v + 32, 32); lo4 += hi4;
    memcpy(&lo2, &lo4, 16); memcpy(&hi2, (const char *)&lo4 + 16, 16); lo2 += hi2;
    return lo2[0] + lo2[1];
}

/* fastbn_hsum_T of the 64-byte vector held as native pieces v[0 .. FASTBN_PIECES). */
#define FASTBN_HSUM_PIECES(T, v)                                                              \
    ({ fastbn_vec_##T w_; memcpy(&w_, (v), sizeof w_); fastbn_hsum_##T(w_); })

#endif /* FASTBN_SIMD_H */
