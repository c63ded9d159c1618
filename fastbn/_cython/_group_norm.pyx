"""GroupNorm forward and backward kernels (Cython + OpenMP); instance norm uses them too.

The caller (fastbn/group_norm.py) has validated every argument and hands over
3-D C-contiguous views: (N, C, S) for channels-first memory, (N, S, C) for
channels-last memory (and for 2-D input, where S = 1). Group g of sample n is
channels g * D ... (g + 1) * D - 1, D = C / G.

Two fixed work splits, chosen from the shape alone (never from the thread
count), so the result is the same to the bit for any number of threads:

- Whole groups (channels-first, at least MIN_GROUP_ITEMS groups of at most
  MAX_GROUP_ELEMENTS values): one item per (n, g), a contiguous block of D * S
  values. The item computes its statistics and then normalizes the block
  while it is still in cache (backward: per-channel sums, then grad_x), so x
  comes from memory once instead of twice.
- Chunks (everything else: few or huge groups, channels-last): per-(n, c)
  partial sums over fixed pieces -- channels-first, whole rows of S values
  or, for long rows, fixed chunks of a row; channels-last, tiles of
  (rows of one sample) x (block of channels), read row by row -- then the
  partials are added in a fixed order to per-(n, c) and per-(n, g) totals,
  and an elementwise pass over the same pieces applies per-(n, c)
  coefficients. N = 1 with few groups still gives every thread work.

Statistics are float64 sums (blocks of a few hundred values summed in vector
lanes of x's type, then added to float64; see the C loops below) over values
shifted by a per-group pivot (the group's first value), which keeps the
one-pass sum / sum-of-squares accurate on data with a large mean;
y = (x - pivot) * scale + offset keeps that accuracy in the output.

Backward, per group with A = sum_c w_c sum(dy_c), B = sum_c w_c sum((x_c - mean) dy_c)
and n = D * S (as ATen's GroupNormBackward):
  grad_x = dy * rstd * w_c + (x - mean) * (-B rstd^3 / n) + (-A rstd / n),
and with statistics that do not depend on x (instance norm on running
statistics) grad_x = dy * rstd * w_c.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, isfinite
from fastbn._cython._openmp_helpers cimport effective_threads
from libc.stdlib cimport calloc, free
from fastbn._cython._arrays cimport data

cnp.import_array()

# Values in one chunk-split item: big enough to amortise the per-item overhead,
# small enough that N = 1 with few groups still gives every thread work.
cdef Py_ssize_t CHUNK_ELEMENTS = 4096
# Channels in one channels-last column block.
cdef Py_ssize_t CHANNEL_BLOCK = 256
# Whole-group items need enough groups to share out, each small enough to stay in
# cache between its two passes (backward touches dy, x and dx: 3 x 128 KiB in float32).
cdef Py_ssize_t MIN_GROUP_ITEMS = 16
cdef Py_ssize_t MAX_GROUP_ELEMENTS = 32768


cdef struct Split:
    bint whole_groups
    Py_ssize_t items
    # channels-first chunks: `rows_per_item` rows (n, c) of S values per item, or
    # (rows_per_item = 1) each row cut into `chunks` pieces.
    Py_ssize_t rows_per_item
    Py_ssize_t chunks
    # channels-last: per sample, row_blocks x channel_blocks tiles.
    Py_ssize_t rows_per_block
    Py_ssize_t row_blocks
    Py_ssize_t channel_blocks
    Py_ssize_t n_partials


cdef Split make_split(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                      bint channels_last) noexcept nogil:
    cdef Split split
    cdef Py_ssize_t width
    split.whole_groups = (not channels_last and N * G >= MIN_GROUP_ITEMS
                          and (C // G) * S <= MAX_GROUP_ELEMENTS)
    split.rows_per_item = 0
    split.chunks = 0
    split.rows_per_block = 0
    split.row_blocks = 0
    split.channel_blocks = 0
    split.n_partials = 0
    if split.whole_groups:
        split.items = N * G
    elif not channels_last:
        if S >= CHUNK_ELEMENTS:
            split.rows_per_item = 1
            split.chunks = (S + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
        else:
            split.rows_per_item = CHUNK_ELEMENTS // S
            split.chunks = 1
        split.items = (N * C + split.rows_per_item - 1) // split.rows_per_item * split.chunks
        split.n_partials = N * C * split.chunks
    else:
        width = C if C < CHANNEL_BLOCK else CHANNEL_BLOCK
        split.rows_per_block = CHUNK_ELEMENTS // width
        if split.rows_per_block < 1:
            split.rows_per_block = 1
        split.row_blocks = (S + split.rows_per_block - 1) // split.rows_per_block
        split.channel_blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
        split.items = N * split.row_blocks * split.channel_blocks
        split.n_partials = N * split.row_blocks * C
    return split


# ---------------------------------------------------------------------------
# Inner loops, in C: one definition per loop, instantiated for float and double.
#
# Sums are float64, but each block of BLOCK values of a run is first summed in
# the data's type in a 64-byte vector (16 float32 or 8 float64 lanes, GCC/clang
# vector extensions) that is then added up pairwise: full vector width also
# for float32, and a short horizontal sum (runs can be as short as 49 values).
# A float32 block (or tail value) whose sums are not finite is added again in
# float64: squares of float32 values past about 1.8e19 overflow float32 but not
# float64 (inf / nan in the data stay inf / nan either way); the usual block pays
# one test. Squares below float32's range still flush to 0 (as in torch).
# Other compilers get plain loops summing in float64.
# Where GCC or clang can dispatch on the CPU at run time (x86-64 Linux), each
# loop is also compiled for AVX2 and AVX-512 and the widest the CPU has runs;
# elsewhere the build's baseline (SSE2 on x86-64) does. Results are the same
# for any thread count; they may differ in the last bits between CPUs.

cdef extern from *:
    """
    #include <math.h>
    #include <string.h>
    #if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__INTEL_COMPILER)
    #define FASTBN_DISPATCH __attribute__((target_clones("avx512f", "avx2", "default")))
    #else
    #define FASTBN_DISPATCH
    #endif
    #define FASTBN_BLOCK 256
    /* Rows of a channels-last tile summed in the data's type before float64. */
    #define FASTBN_ROW_BLOCK 16
    /* Widest channels-last tile (the kernels' CHANNEL_BLOCK). */
    #define FASTBN_MAX_WIDTH 256

    /* Terms of the sums, on values (scalars or vectors): (x - m, (x - m)^2) and (dy, (x - m) dy). */
    #define FASTBN_SHIFTED(x, dy, m) ((x) - (m))
    #define FASTBN_SHIFTED_SQ(x, dy, m) (((x) - (m)) * ((x) - (m)))
    #define FASTBN_DY(x, dy, m) (dy)
    #define FASTBN_CENTRED_DY(x, dy, m) (((x) - (m)) * (dy))

    #if defined(__GNUC__)
    typedef float fastbn_vec_float __attribute__((vector_size(64)));
    typedef double fastbn_vec_double __attribute__((vector_size(64)));
    typedef float fastbn_float_x8 __attribute__((vector_size(32)));
    typedef float fastbn_float_x4 __attribute__((vector_size(16)));
    typedef double fastbn_double_x4 __attribute__((vector_size(32)));
    typedef double fastbn_double_x2 __attribute__((vector_size(16)));
    /* Horizontal sums by halving (the compiler keeps the halves in registers). */
    static inline float fastbn_hsum_float(const fastbn_vec_float* v) {
        fastbn_float_x8 lo8, hi8, s8;
        fastbn_float_x4 lo4, hi4, s4;
        memcpy(&lo8, v, 32); memcpy(&hi8, (const char*)v + 32, 32); s8 = lo8 + hi8;
        memcpy(&lo4, &s8, 16); memcpy(&hi4, (char*)&s8 + 16, 16); s4 = lo4 + hi4;
        return (s4[0] + s4[2]) + (s4[1] + s4[3]);
    }
    static inline double fastbn_hsum_double(const fastbn_vec_double* v) {
        fastbn_double_x4 lo4, hi4, s4;
        fastbn_double_x2 lo2, hi2, s2;
        memcpy(&lo4, v, 32); memcpy(&hi4, (const char*)v + 32, 32); s4 = lo4 + hi4;
        memcpy(&lo2, &s4, 16); memcpy(&hi2, (char*)&s4 + 16, 16); s2 = lo2 + hi2;
        return s2[0] + s2[1];
    }
    /* fastbn_KIND_T: for each of `runs` runs of n values (run j at x + j * n, dy + j * n,
       centre m[j]): sum_a[j] = sum(TERM_A), sum_b[j] = sum(TERM_B). One call does a whole
       group's rows: per-call costs matter when rows are as short as 49 values. */
    #define FASTBN_DEFINE_RUN_SUMS(KIND, T, TERM_A, TERM_B) \
    FASTBN_DISPATCH static void fastbn_##KIND##_##T( \
            const T* x, const T* dy, Py_ssize_t runs, Py_ssize_t n, const T* m, \
            double* sum_a, double* sum_b) { \
        enum { LANES = sizeof(fastbn_vec_##T) / sizeof(T) }; \
        Py_ssize_t n_main = n - n % LANES, run, start, stop, i; \
        for (run = 0; run < runs; run++, x += n, dy += n) { \
            double total_a = 0.0, total_b = 0.0; \
            T centre = m[run]; \
            for (start = 0; start < n_main; start = stop) { \
                fastbn_vec_##T block_a = {0}, block_b = {0}, xv, dyv; \
                T sum_a, sum_b; \
                stop = start + FASTBN_BLOCK < n_main ? start + FASTBN_BLOCK : n_main; \
                for (i = start; i < stop; i += LANES) { \
                    memcpy(&xv, x + i, sizeof xv); \
                    memcpy(&dyv, dy + i, sizeof dyv); \
                    block_a += TERM_A(xv, dyv, centre); \
                    block_b += TERM_B(xv, dyv, centre); \
                } \
                sum_a = fastbn_hsum_##T(&block_a); \
                sum_b = fastbn_hsum_##T(&block_b); \
                if (sizeof(T) < sizeof(double) && !(isfinite(sum_a) && isfinite(sum_b))) { \
                    for (i = start; i < stop; i++) { \
                        total_a += TERM_A((double)x[i], (double)dy[i], (double)centre); \
                        total_b += TERM_B((double)x[i], (double)dy[i], (double)centre); \
                    } \
                } else { \
                    total_a += sum_a; \
                    total_b += sum_b; \
                } \
            } \
            for (i = n_main; i < n; i++) { \
                T term_a = TERM_A(x[i], dy[i], centre), term_b = TERM_B(x[i], dy[i], centre); \
                if (sizeof(T) < sizeof(double) && !(isfinite(term_a) && isfinite(term_b))) { \
                    total_a += TERM_A((double)x[i], (double)dy[i], (double)centre); \
                    total_b += TERM_B((double)x[i], (double)dy[i], (double)centre); \
                } else { \
                    total_a += term_a; \
                    total_b += term_b; \
                } \
            } \
            sum_a[run] = total_a; \
            sum_b[run] = total_b; \
        } \
    }
    #else
    #define FASTBN_DEFINE_RUN_SUMS(KIND, T, TERM_A, TERM_B) \
    static void fastbn_##KIND##_##T(const T* x, const T* dy, Py_ssize_t runs, Py_ssize_t n, \
                                    const T* m, double* sum_a, double* sum_b) { \
        Py_ssize_t run, i; \
        for (run = 0; run < runs; run++, x += n, dy += n) { \
            double total_a = 0.0, total_b = 0.0; \
            for (i = 0; i < n; i++) { \
                total_a += TERM_A((double)x[i], (double)dy[i], (double)m[run]); \
                total_b += TERM_B((double)x[i], (double)dy[i], (double)m[run]); \
            } \
            sum_a[run] = total_a; \
            sum_b[run] = total_b; \
        } \
    }
    #endif

    /* fastbn_rows_KIND_T: per column c < width of `rows` rows (row r at x + r * stride,
       dy + r * stride), sum_a[c] = sum(TERM_A), sum_b[c] = sum(TERM_B) (the caller
       passes zeros), centre m[c].
       Elementwise across columns, so `omp simd` vectorises it without reassociating. */
    #define FASTBN_DEFINE_ROW_SUMS(KIND, T, TERM_A, TERM_B) \
    FASTBN_DISPATCH static void fastbn_rows_##KIND##_##T( \
            const T* x, const T* dy, Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t width, \
            const T* m, double* sum_a, double* sum_b) { \
        T part_a[FASTBN_MAX_WIDTH], part_b[FASTBN_MAX_WIDTH]; \
        double probe = 0.0; \
        Py_ssize_t r0, r, r1, c; \
        for (r0 = 0; r0 < rows; r0 = r1) { \
            r1 = r0 + FASTBN_ROW_BLOCK < rows ? r0 + FASTBN_ROW_BLOCK : rows; \
            for (c = 0; c < width; c++) { part_a[c] = 0; part_b[c] = 0; } \
            for (r = r0; r < r1; r++) { \
                const T* x_row = x + r * stride; \
                const T* dy_row = dy + r * stride; \
                (void)dy_row; \
                _Pragma("omp simd") \
                for (c = 0; c < width; c++) { \
                    part_a[c] += TERM_A(x_row[c], dy_row[c], m[c]); \
                    part_b[c] += TERM_B(x_row[c], dy_row[c], m[c]); \
                } \
            } \
            for (c = 0; c < width; c++) { sum_a[c] += part_a[c]; sum_b[c] += part_b[c]; } \
        } \
        /* A column whose float32 partials overflowed (or that holds inf / nan) has a \
           total that is not finite: add it again in float64, once per tile, so that the \
           loops above stay as they were. probe is 0, or nan when a total is not finite \
           (t - t); the tile's totals start at 0 (reduce_item zeroes them). */ \
        if (sizeof(T) == sizeof(double)) return; \
        _Pragma("omp simd reduction(+:probe)") \
        for (c = 0; c < width; c++) probe += (sum_a[c] - sum_a[c]) + (sum_b[c] - sum_b[c]); \
        if (probe == 0.0) return; \
        for (c = 0; c < width; c++) { \
            if (isfinite(sum_a[c]) && isfinite(sum_b[c])) continue; \
            sum_a[c] = 0.0; \
            sum_b[c] = 0.0; \
            for (r = 0; r < rows; r++) { \
                double xr = x[r * stride + c], dyr = dy[r * stride + c]; \
                (void)dyr; \
                sum_a[c] += TERM_A(xr, dyr, (double)m[c]); \
                sum_b[c] += TERM_B(xr, dyr, (double)m[c]); \
            } \
        } \
    }

    #define FASTBN_DEFINE_ELEMENTWISE(T) \
    /* y = (x - shift) * scale + offset over `runs` runs of n values, coefficients per run */ \
    FASTBN_DISPATCH static void fastbn_affine_##T( \
            const T* x, T* y, Py_ssize_t runs, Py_ssize_t n, \
            const T* shift, const T* scale, const T* offset) { \
        Py_ssize_t run, i; \
        for (run = 0; run < runs; run++, x += n, y += n) { \
            T s = shift[run], a = scale[run], b = offset[run]; \
            for (i = 0; i < n; i++) y[i] = (x[i] - s) * a + b; \
        } \
    } \
    /* dx = dy * a + (x - mean) * b + d over `runs` runs of n values, coefficients per run */ \
    FASTBN_DISPATCH static void fastbn_grad_input_##T( \
            const T* dy, const T* x, T* dx, Py_ssize_t runs, Py_ssize_t n, \
            const T* mean, const T* a, const T* b, const T* d) { \
        Py_ssize_t run, i; \
        for (run = 0; run < runs; run++, dy += n, x += n, dx += n) { \
            T m = mean[run], ar = a[run], br = b[run], dr = d[run]; \
            for (i = 0; i < n; i++) dx[i] = dy[i] * ar + (x[i] - m) * br + dr; \
        } \
    } \
    /* The same on rows (row r at offset r * stride), coefficients per column */ \
    FASTBN_DISPATCH static void fastbn_rows_affine_##T( \
            const T* x, T* y, Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t width, \
            const T* shift, const T* scale, const T* offset) { \
        Py_ssize_t r, c; \
        for (r = 0; r < rows; r++) { \
            const T* x_row = x + r * stride; \
            T* y_row = y + r * stride; \
            for (c = 0; c < width; c++) \
                y_row[c] = (x_row[c] - shift[c]) * scale[c] + offset[c]; \
        } \
    } \
    FASTBN_DISPATCH static void fastbn_rows_grad_input_##T( \
            const T* dy, const T* x, T* dx, Py_ssize_t rows, Py_ssize_t stride, \
            Py_ssize_t width, const T* mean, const T* a, const T* b, const T* d) { \
        Py_ssize_t r, c; \
        for (r = 0; r < rows; r++) { \
            const T* dy_row = dy + r * stride; \
            const T* x_row = x + r * stride; \
            T* dx_row = dx + r * stride; \
            for (c = 0; c < width; c++) \
                dx_row[c] = dy_row[c] * a[c] + (x_row[c] - mean[c]) * b[c] + d[c]; \
        } \
    }

    FASTBN_DEFINE_RUN_SUMS(shifted_sums, float, FASTBN_SHIFTED, FASTBN_SHIFTED_SQ)
    FASTBN_DEFINE_RUN_SUMS(shifted_sums, double, FASTBN_SHIFTED, FASTBN_SHIFTED_SQ)
    FASTBN_DEFINE_RUN_SUMS(grad_sums, float, FASTBN_DY, FASTBN_CENTRED_DY)
    FASTBN_DEFINE_RUN_SUMS(grad_sums, double, FASTBN_DY, FASTBN_CENTRED_DY)
    FASTBN_DEFINE_ROW_SUMS(shifted_sums, float, FASTBN_SHIFTED, FASTBN_SHIFTED_SQ)
    FASTBN_DEFINE_ROW_SUMS(shifted_sums, double, FASTBN_SHIFTED, FASTBN_SHIFTED_SQ)
    FASTBN_DEFINE_ROW_SUMS(grad_sums, float, FASTBN_DY, FASTBN_CENTRED_DY)
    FASTBN_DEFINE_ROW_SUMS(grad_sums, double, FASTBN_DY, FASTBN_CENTRED_DY)
    FASTBN_DEFINE_ELEMENTWISE(float)
    FASTBN_DEFINE_ELEMENTWISE(double)
    """
    # The sums read x and dy; shifted sums only x (pass x again as dy).
    void fastbn_shifted_sums_float(const float* x, const float* dy, Py_ssize_t runs,
                                   Py_ssize_t n, const float* m,
                                   double* sum_a, double* sum_b) noexcept nogil
    void fastbn_shifted_sums_double(const double* x, const double* dy, Py_ssize_t runs,
                                    Py_ssize_t n, const double* m,
                                    double* sum_a, double* sum_b) noexcept nogil
    void fastbn_grad_sums_float(const float* x, const float* dy, Py_ssize_t runs,
                                Py_ssize_t n, const float* m,
                                double* sum_a, double* sum_b) noexcept nogil
    void fastbn_grad_sums_double(const double* x, const double* dy, Py_ssize_t runs,
                                 Py_ssize_t n, const double* m,
                                 double* sum_a, double* sum_b) noexcept nogil
    void fastbn_rows_shifted_sums_float(const float* x, const float* dy, Py_ssize_t rows,
                                        Py_ssize_t stride, Py_ssize_t width, const float* m,
                                        double* sum_a, double* sum_b) noexcept nogil
    void fastbn_rows_shifted_sums_double(const double* x, const double* dy, Py_ssize_t rows,
                                         Py_ssize_t stride, Py_ssize_t width, const double* m,
                                         double* sum_a, double* sum_b) noexcept nogil
    void fastbn_rows_grad_sums_float(const float* x, const float* dy, Py_ssize_t rows,
                                     Py_ssize_t stride, Py_ssize_t width, const float* m,
                                     double* sum_a, double* sum_b) noexcept nogil
    void fastbn_rows_grad_sums_double(const double* x, const double* dy, Py_ssize_t rows,
                                      Py_ssize_t stride, Py_ssize_t width, const double* m,
                                      double* sum_a, double* sum_b) noexcept nogil
    void fastbn_affine_float(const float* x, float* y, Py_ssize_t runs, Py_ssize_t n,
                             const float* shift, const float* scale,
                             const float* offset) noexcept nogil
    void fastbn_affine_double(const double* x, double* y, Py_ssize_t runs, Py_ssize_t n,
                              const double* shift, const double* scale,
                              const double* offset) noexcept nogil
    void fastbn_grad_input_float(const float* dy, const float* x, float* dx, Py_ssize_t runs,
                                 Py_ssize_t n, const float* mean, const float* a,
                                 const float* b, const float* d) noexcept nogil
    void fastbn_grad_input_double(const double* dy, const double* x, double* dx,
                                  Py_ssize_t runs, Py_ssize_t n, const double* mean,
                                  const double* a, const double* b,
                                  const double* d) noexcept nogil
    void fastbn_rows_affine_float(const float* x, float* y, Py_ssize_t rows, Py_ssize_t stride,
                                  Py_ssize_t width, const float* shift, const float* scale,
                                  const float* offset) noexcept nogil
    void fastbn_rows_affine_double(const double* x, double* y, Py_ssize_t rows,
                                   Py_ssize_t stride, Py_ssize_t width, const double* shift,
                                   const double* scale, const double* offset) noexcept nogil
    void fastbn_rows_grad_input_float(const float* dy, const float* x, float* dx,
                                      Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t width,
                                      const float* mean, const float* a, const float* b,
                                      const float* d) noexcept nogil
    void fastbn_rows_grad_input_double(const double* dy, const double* x, double* dx,
                                       Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t width,
                                       const double* mean, const double* a, const double* b,
                                       const double* d) noexcept nogil


# Fused-type front ends of the C loops.

cdef inline void shifted_sums(const floating* x, Py_ssize_t runs, Py_ssize_t n,
                              const floating* pivot, double* sum_out,
                              double* sum_sq_out) noexcept nogil:
    """Per run j of `runs` consecutive runs of n values: sum(x - pivot[j]) and
    sum((x - pivot[j])**2), in float64. Pivots are values of x's type, so x - pivot
    is exact for values near them."""
    if floating is float:
        fastbn_shifted_sums_float(x, x, runs, n, pivot, sum_out, sum_sq_out)
    else:
        fastbn_shifted_sums_double(x, x, runs, n, pivot, sum_out, sum_sq_out)


cdef inline void grad_sums(const floating* dy, const floating* x, Py_ssize_t runs, Py_ssize_t n,
                           const floating* mean, double* sum_dy_out,
                           double* dot_out) noexcept nogil:
    """Per run j: sum(dy) and sum((x - mean[j]) * dy), in float64."""
    if floating is float:
        fastbn_grad_sums_float(x, dy, runs, n, mean, sum_dy_out, dot_out)
    else:
        fastbn_grad_sums_double(x, dy, runs, n, mean, sum_dy_out, dot_out)


cdef inline void rows_sums(const floating* first, const floating* second, bint gradient,
                           Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t width,
                           const floating* centre, double* sum_a, double* sum_b) noexcept nogil:
    """Per column of a channels-last tile, the sums of shifted_sums(first) or, when
    gradient, grad_sums(dy=first, x=second), added to sum_a, sum_b (zeros: a float32
    column that overflows is summed again from 0 in float64)."""
    if floating is float:
        if gradient:
            fastbn_rows_grad_sums_float(second, first, rows, stride, width, centre, sum_a, sum_b)
        else:
            fastbn_rows_shifted_sums_float(first, first, rows, stride, width, centre, sum_a, sum_b)
    else:
        if gradient:
            fastbn_rows_grad_sums_double(second, first, rows, stride, width, centre, sum_a, sum_b)
        else:
            fastbn_rows_shifted_sums_double(first, first, rows, stride, width, centre, sum_a,
                                            sum_b)


cdef inline void runs_elementwise(const floating* x, const floating* x2, floating* y,
                                  Py_ssize_t runs, Py_ssize_t n,
                                  const floating* shift, const floating* scale,
                                  const floating* offset, const floating* scale2) noexcept nogil:
    """Per run j of `runs` consecutive runs of n values: y = (x - shift) * scale + offset or,
    with x2 (backward), y = x * scale + (x2 - shift) * scale2 + offset; coefficients [j]."""
    if floating is float:
        if x2 == NULL:
            fastbn_affine_float(x, y, runs, n, shift, scale, offset)
        else:
            fastbn_grad_input_float(x, x2, y, runs, n, shift, scale, scale2, offset)
    else:
        if x2 == NULL:
            fastbn_affine_double(x, y, runs, n, shift, scale, offset)
        else:
            fastbn_grad_input_double(x, x2, y, runs, n, shift, scale, scale2, offset)


cdef inline void rows_elementwise(const floating* x, const floating* x2, floating* y,
                                  Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t width,
                                  const floating* shift, const floating* scale,
                                  const floating* offset, const floating* scale2) noexcept nogil:
    """Rows of a channels-last tile: y = (x - shift) * scale + offset or, with x2 (backward),
    y = x * scale + (x2 - shift) * scale2 + offset; coefficients per column."""
    if floating is float:
        if x2 == NULL:
            fastbn_rows_affine_float(x, y, rows, stride, width, shift, scale, offset)
        else:
            fastbn_rows_grad_input_float(x, x2, y, rows, stride, width, shift, scale, scale2,
                                         offset)
    else:
        if x2 == NULL:
            fastbn_rows_affine_double(x, y, rows, stride, width, shift, scale, offset)
        else:
            fastbn_rows_grad_input_double(x, x2, y, rows, stride, width, shift, scale, scale2,
                                          offset)


cdef inline double group_rstd(double sum_shifted, double sum_sq, Py_ssize_t count, double eps,
                              double* var_out) noexcept nogil:
    """1 / sqrt(var + eps) from shifted sums; the biased variance goes to var_out."""
    cdef double var = (sum_sq - sum_shifted * sum_shifted / count) / count
    if var < 0.0:  # rounding only; keeps nan as nan
        var = 0.0
    var_out[0] = var
    # As ATen's group norm: var 0 with eps 0 gives inf.
    return 1.0 / sqrt(var + eps)


cdef inline double group_pivot(floating value) noexcept nogil:
    # A non-finite pivot would turn an inf mean into nan; 0 keeps PyTorch's result.
    return <double>value if isfinite(<double>value) else 0.0


# ---------------------------------------------------------------------------
# Whole-group items (channels-first): item = n * G + g. The pointers are those of
# the whole arrays (w, b, var_out NULL when absent); each function moves them to
# the item's group: its D * S values, its D channels' parameters and its D
# per-channel coefficient slots.

cdef inline void forward_group(Py_ssize_t item, Py_ssize_t G, const floating* x, floating* y,
                               Py_ssize_t D, Py_ssize_t S, const floating* w, const floating* b,
                               bint compute_stats, double eps, floating* mean_out,
                               floating* rstd_out, double* var_out, floating* shift,
                               floating* scale, floating* offset) noexcept nogil:
    cdef Py_ssize_t c, count = D * S, g = item % G
    cdef double sum_shifted, sum_sq, var, rstd, centre_offset = 0.0, alpha
    x += item * count
    y += item * count
    w = w + g * D if w != NULL else NULL
    b = b + g * D if b != NULL else NULL
    mean_out += item
    rstd_out += item
    var_out = var_out + item if var_out != NULL else NULL
    shift += item * D
    scale += item * D
    offset += item * D
    if compute_stats:
        shift[0] = <floating>group_pivot(x[0])
        shifted_sums(x, 1, count, shift, &sum_shifted, &sum_sq)
        rstd = group_rstd(sum_shifted, sum_sq, count, eps, &var)
        centre_offset = sum_shifted / count  # mean - pivot
        mean_out[0] = <floating>(<double>shift[0] + centre_offset)
        rstd_out[0] = <floating>rstd
        if var_out != NULL:
            var_out[0] = var
    else:
        shift[0] = mean_out[0]
        rstd = <double>rstd_out[0]
    for c in range(D):
        alpha = rstd * (<double>w[c] if w != NULL else 1.0)
        shift[c] = shift[0]
        scale[c] = <floating>alpha
        offset[c] = <floating>((<double>b[c] if b != NULL else 0.0) - centre_offset * alpha)
    runs_elementwise(x, NULL, y, D, S, shift, scale, offset, NULL)


cdef inline void backward_group(Py_ssize_t item, Py_ssize_t G, const floating* dy,
                                const floating* x, floating* dx, Py_ssize_t D, Py_ssize_t S,
                                const floating* w, const floating* mean_in,
                                const floating* rstd_in, bint stats_from_input, bint need_sums,
                                double* sum_dy, double* dot, floating* shift,
                                floating* scale_dy, floating* scale_x,
                                floating* offset) noexcept nogil:
    """The group's per-channel sums into sum_dy, dot; then grad_x unless dx is NULL."""
    cdef Py_ssize_t c, g = item % G
    cdef double weighted_sum_dy = 0.0, weighted_dot = 0.0, w_c, b = 0.0, d = 0.0
    cdef floating mean = mean_in[item]
    cdef double rstd = <double>rstd_in[item]
    dy += item * D * S
    x += item * D * S
    dx = dx + item * D * S if dx != NULL else NULL
    w = w + g * D if w != NULL else NULL
    sum_dy += item * D
    dot += item * D
    shift += item * D
    scale_dy += item * D
    scale_x += item * D
    offset += item * D
    for c in range(D):
        shift[c] = mean
    if need_sums:
        grad_sums(dy, x, D, S, shift, sum_dy, dot)
        for c in range(D):
            w_c = <double>w[c] if w != NULL else 1.0
            weighted_sum_dy += w_c * sum_dy[c]
            weighted_dot += w_c * dot[c]
    if dx == NULL:
        return
    if stats_from_input:
        b = -weighted_dot * rstd * rstd * rstd / (D * S)
        d = -weighted_sum_dy * rstd / (D * S)
    for c in range(D):
        scale_dy[c] = <floating>(rstd * (<double>w[c] if w != NULL else 1.0))
        scale_x[c] = <floating>b
        offset[c] = <floating>d
    runs_elementwise(dy, x, dx, D, S, shift, scale_dy, offset, scale_x)


# ---------------------------------------------------------------------------
# Chunk items: passes over the whole tensor with per-(n, c) partials and coefficients.

cdef struct Piece:
    # channels-first: rows (n * C + c) row0:row1, values start:stop of each, chunk `chunk`
    Py_ssize_t row0, row1, chunk, start, stop
    # channels-last: sample n, rows r0:r1 of its (S, C) matrix, channels c0:c1;
    # tile = n * row_blocks + row block
    Py_ssize_t n, tile, r0, r1, c0, c1


cdef inline Piece piece_at(Split split, Py_ssize_t item, Py_ssize_t N, Py_ssize_t C,
                           Py_ssize_t S, bint channels_last) noexcept nogil:
    """What chunk item `item` covers."""
    cdef Piece p
    if not channels_last:
        p.chunk = item % split.chunks
        p.row0 = item // split.chunks * split.rows_per_item
        p.row1 = min(p.row0 + split.rows_per_item, N * C)
        p.start = p.chunk * S // split.chunks
        p.stop = (p.chunk + 1) * S // split.chunks
    else:
        p.c0 = item % split.channel_blocks * CHANNEL_BLOCK
        p.c1 = min(p.c0 + CHANNEL_BLOCK, C)
        p.tile = item // split.channel_blocks
        p.n = p.tile // split.row_blocks
        p.r0 = p.tile % split.row_blocks * split.rows_per_block
        p.r1 = min(p.r0 + split.rows_per_block, S)
    return p


cdef inline void reduce_item(const floating* first, const floating* second,
                             const floating* centre, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                             bint channels_last, bint gradient, Split split, Py_ssize_t item,
                             double* part_a, double* part_b) noexcept nogil:
    """One item's partial sums: shifted_sums(first) or, when gradient,
    grad_sums(dy=first, x=second), around centre[n * C + c]."""
    cdef Piece p = piece_at(split, item, N, C, S, channels_last)
    cdef Py_ssize_t c, part, off
    if not channels_last:
        # Several whole rows (chunks == 1), or a piece of one row: consecutive runs,
        # and their partials consecutive too.
        off = p.row0 * S + p.start
        part = p.row0 * split.chunks + p.chunk
        if gradient:
            grad_sums(first + off, second + off, p.row1 - p.row0, p.stop - p.start,
                      centre + p.row0, &part_a[part], &part_b[part])
        else:
            shifted_sums(first + off, p.row1 - p.row0, p.stop - p.start, centre + p.row0,
                         &part_a[part], &part_b[part])
    else:
        part = p.tile * C + p.c0
        for c in range(p.c1 - p.c0):
            part_a[part + c] = 0.0
            part_b[part + c] = 0.0
        off = (p.n * S + p.r0) * C + p.c0
        rows_sums(first + off, second + off if gradient else NULL, gradient, p.r1 - p.r0, C,
                  p.c1 - p.c0, centre + p.n * C + p.c0, part_a + part, part_b + part)


cdef void reduce_pass(const floating* first, const floating* second, const floating* centre,
                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                      bint gradient, Split split, int n_threads,
                      double* part_a, double* part_b) noexcept nogil:
    """Every item's partial sums (see reduce_item)."""
    cdef Py_ssize_t item
    if n_threads == 1:  # no OpenMP region: starting one costs about 0.5 us, on one thread too
        for item in range(split.items):
            reduce_item(first, second, centre, N, C, S, channels_last, gradient, split, item,
                        part_a, part_b)
        return
    for item in prange(split.items, nogil=True, num_threads=n_threads, schedule="static"):
        reduce_item(first, second, centre, N, C, S, channels_last, gradient, split, item,
                    part_a, part_b)


cdef void sum_partials(const double* part_a, const double* part_b, Py_ssize_t N, Py_ssize_t C,
                       bint channels_last, Split split,
                       double* total_a, double* total_b) noexcept nogil:
    """Per-(n, c) totals of the partials, added in a fixed order (thread-count independent)."""
    cdef Py_ssize_t row, k, n, c, rb, base
    for row in range(N * C):
        total_a[row] = 0.0
        total_b[row] = 0.0
    if not channels_last:
        for row in range(N * C):
            for k in range(split.chunks):
                total_a[row] += part_a[row * split.chunks + k]
                total_b[row] += part_b[row * split.chunks + k]
    else:
        for n in range(N):
            for rb in range(split.row_blocks):
                base = (n * split.row_blocks + rb) * C
                for c in range(C):
                    total_a[n * C + c] += part_a[base + c]
                    total_b[n * C + c] += part_b[base + c]


cdef inline void elementwise_item(const floating* x, const floating* x2, floating* y,
                                  const floating* shift, const floating* scale,
                                  const floating* offset, const floating* scale2,
                                  Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                                  Split split, Py_ssize_t item) noexcept nogil:
    """One item of elementwise_pass."""
    cdef Piece p = piece_at(split, item, N, C, S, channels_last)
    cdef Py_ssize_t off, k
    if not channels_last:
        off = p.row0 * S + p.start
        runs_elementwise(x + off, x2 + off if x2 != NULL else NULL, y + off, p.row1 - p.row0,
                         p.stop - p.start, shift + p.row0, scale + p.row0, offset + p.row0,
                         scale2 + p.row0 if scale2 != NULL else NULL)
    else:
        off = (p.n * S + p.r0) * C + p.c0
        k = p.n * C + p.c0
        rows_elementwise(x + off, x2 + off if x2 != NULL else NULL, y + off, p.r1 - p.r0, C,
                         p.c1 - p.c0, shift + k, scale + k, offset + k,
                         scale2 + k if scale2 != NULL else NULL)


cdef void elementwise_pass(const floating* x, const floating* x2, floating* y,
                           const floating* shift, const floating* scale, const floating* offset,
                           const floating* scale2,
                           Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint channels_last,
                           Split split, int n_threads) noexcept nogil:
    """y = (x - shift) * scale + offset, or with x2 given (backward):
    y = x * scale + (x2 - shift) * scale2 + offset; coefficients per (n, c)."""
    cdef Py_ssize_t item
    if n_threads == 1:  # no OpenMP region, as in reduce_pass
        for item in range(split.items):
            elementwise_item(x, x2, y, shift, scale, offset, scale2, N, C, S, channels_last,
                             split, item)
        return
    for item in prange(split.items, nogil=True, num_threads=n_threads, schedule="static"):
        elementwise_item(x, x2, y, shift, scale, offset, scale2, N, C, S, channels_last, split,
                         item)


# ---------------------------------------------------------------------------
# The kernels (argument checks are the caller's job).

cdef int forward(const floating* xp, const floating* wp, const floating* bp, double eps,
                 bint compute_stats, floating* yp, floating* meanp, floating* rstdp,
                 double* varp, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                 bint channels_last, int n_threads) noexcept nogil:
    """Returns 0, or -1 when the work arrays cannot be allocated."""
    cdef Py_ssize_t D = C // G
    cdef Py_ssize_t item, n, g, c, k
    cdef Split split = make_split(N, C, S, G, channels_last)
    cdef int threads = effective_threads(n_threads, N * C * S, split.items)

    # One allocation for the partials and per-(n, c) totals, one for per-(n, c) coefficients.
    cdef double* work = <double*>calloc(2 * split.n_partials + 2 * N * C, sizeof(double))
    cdef floating* coef = <floating*>calloc(3 * N * C, sizeof(floating))
    if work == NULL or coef == NULL:
        free(work)
        free(coef)
        return -1
    cdef double* part_a = work
    cdef double* part_b = work + split.n_partials
    cdef double* sum_shifted = part_b + split.n_partials
    cdef double* sum_sq = sum_shifted + N * C
    cdef floating* shift = coef  # the group's pivot or mean, also the centre of the sums
    cdef floating* scale = coef + N * C
    cdef floating* offset = coef + 2 * N * C
    cdef double pivot, group_shifted, group_sq, var, rstd_g, centre_offset, alpha
    cdef Py_ssize_t count = D * S
    if split.whole_groups:
        if threads == 1:  # no OpenMP region (see reduce_pass)
            for item in range(N * G):
                forward_group(item, G, xp, yp, D, S, wp, bp, compute_stats, eps, meanp, rstdp,
                              varp, shift, scale, offset)
        else:
            for item in prange(N * G, num_threads=threads, schedule="static"):
                forward_group(item, G, xp, yp, D, S, wp, bp, compute_stats, eps, meanp, rstdp,
                              varp, shift, scale, offset)
    else:
        if compute_stats:
            for n in range(N):
                for g in range(G):
                    pivot = group_pivot(xp[(n * C + g * D) * S] if not channels_last
                                        else xp[n * S * C + g * D])
                    for c in range(g * D, (g + 1) * D):
                        shift[n * C + c] = <floating>pivot
            reduce_pass(xp, NULL, shift, N, C, S, channels_last, False, split, threads,
                        part_a, part_b)
            sum_partials(part_a, part_b, N, C, channels_last, split, sum_shifted, sum_sq)
        for n in range(N):
            for g in range(G):
                k = n * G + g
                if compute_stats:
                    group_shifted = 0.0
                    group_sq = 0.0
                    for c in range(n * C + g * D, n * C + (g + 1) * D):
                        group_shifted += sum_shifted[c]
                        group_sq += sum_sq[c]
                    pivot = <double>shift[n * C + g * D]
                    rstd_g = group_rstd(group_shifted, group_sq, count, eps, &var)
                    centre_offset = group_shifted / count
                    meanp[k] = <floating>(pivot + centre_offset)
                    rstdp[k] = <floating>rstd_g
                    if varp != NULL:
                        varp[k] = var
                else:
                    pivot = <double>meanp[k]
                    rstd_g = <double>rstdp[k]
                    centre_offset = 0.0
                for c in range(g * D, (g + 1) * D):
                    alpha = rstd_g * (<double>wp[c] if wp != NULL else 1.0)
                    shift[n * C + c] = <floating>pivot
                    scale[n * C + c] = <floating>alpha
                    offset[n * C + c] = <floating>((<double>bp[c] if bp != NULL else 0.0)
                                                   - centre_offset * alpha)
        elementwise_pass(xp, NULL, yp, shift, scale, offset, NULL,
                         N, C, S, channels_last, split, threads)
    free(work)
    free(coef)
    return 0


cdef int backward(const floating* dyp, const floating* xp, const floating* wp,
                  const floating* meanp, const floating* rstdp, bint stats_from_input,
                  floating* dxp, floating* dwp, floating* dbp, Py_ssize_t N, Py_ssize_t C,
                  Py_ssize_t S, Py_ssize_t G, bint channels_last, int n_threads) noexcept nogil:
    """Returns 0, or -1 when the work arrays cannot be allocated. dxp, dwp, dbp: NULL
    for the gradients not wanted."""
    cdef Py_ssize_t D = C // G
    cdef Py_ssize_t item, n, g, c, k
    cdef bint want_dw = dwp != NULL, want_db = dbp != NULL
    cdef bint need_sums = want_dw or want_db or (dxp != NULL and stats_from_input)
    cdef Split split = make_split(N, C, S, G, channels_last)
    cdef int threads = effective_threads(n_threads, N * C * S, split.items)

    # Per-(n, c) sum(dy) and sum((x - mean) * dy), then per-(n, c) coefficients of grad_x.
    cdef double* work = <double*>calloc(2 * split.n_partials + 2 * N * C, sizeof(double))
    cdef floating* coef = <floating*>calloc(4 * N * C, sizeof(floating))
    if work == NULL or coef == NULL:
        free(work)
        free(coef)
        return -1
    cdef double* part_a = work
    cdef double* part_b = work + split.n_partials
    cdef double* sum_dy = part_b + split.n_partials
    cdef double* dot = sum_dy + N * C
    cdef floating* shift = coef  # the group's mean, also the centre of the sums
    cdef floating* scale_dy = coef + N * C
    cdef floating* scale_x = coef + 2 * N * C
    cdef floating* offset = coef + 3 * N * C
    cdef double rstd_g, w_c, weighted_sum_dy, weighted_dot, total
    if split.whole_groups:
        if threads == 1:  # no OpenMP region (see reduce_pass)
            for item in range(N * G):
                backward_group(item, G, dyp, xp, dxp, D, S, wp, meanp, rstdp, stats_from_input,
                               need_sums, sum_dy, dot, shift, scale_dy, scale_x, offset)
        else:
            for item in prange(N * G, num_threads=threads, schedule="static"):
                backward_group(item, G, dyp, xp, dxp, D, S, wp, meanp, rstdp, stats_from_input,
                               need_sums, sum_dy, dot, shift, scale_dy, scale_x, offset)
    else:
        if need_sums:
            for n in range(N):
                for c in range(C):
                    shift[n * C + c] = meanp[n * G + c // D]
            reduce_pass(dyp, xp, shift, N, C, S, channels_last, True, split, threads,
                        part_a, part_b)
            sum_partials(part_a, part_b, N, C, channels_last, split, sum_dy, dot)
        if dxp != NULL:
            for n in range(N):
                for g in range(G):
                    k = n * G + g
                    rstd_g = <double>rstdp[k]
                    weighted_sum_dy = 0.0
                    weighted_dot = 0.0
                    for c in range(g * D, (g + 1) * D):
                        w_c = <double>wp[c] if wp != NULL else 1.0
                        weighted_sum_dy += w_c * sum_dy[n * C + c]
                        weighted_dot += w_c * dot[n * C + c]
                    for c in range(g * D, (g + 1) * D):
                        w_c = <double>wp[c] if wp != NULL else 1.0
                        shift[n * C + c] = meanp[k]
                        scale_dy[n * C + c] = <floating>(rstd_g * w_c)
                        if stats_from_input:
                            scale_x[n * C + c] = <floating>(
                                -weighted_dot * rstd_g * rstd_g * rstd_g / (D * S))
                            offset[n * C + c] = <floating>(-weighted_sum_dy * rstd_g / (D * S))
            elementwise_pass(dyp, xp, dxp, shift, scale_dy, offset, scale_x,
                             N, C, S, channels_last, split, threads)
    # Parameter gradients: sums over the batch in a fixed order.
    for c in range(C):
        if want_dw:
            total = 0.0
            for n in range(N):
                total += dot[n * C + c] * <double>rstdp[n * G + c // D]
            dwp[c] = <floating>total
        if want_db:
            total = 0.0
            for n in range(N):
                total += sum_dy[n * C + c]
            dbp[c] = <floating>total
    free(work)
    free(coef)
    return 0


# ---------------------------------------------------------------------------
# Python entry points. The caller (fastbn/group_norm.py) has checked every
# argument: one float dtype, C-contiguous arrays, 3-D views of x / y. Raw data
# pointers keep the per-call cost low (no buffer acquisition per argument).

def group_norm_forward(cnp.ndarray x, weight, bias, double eps, bint compute_stats,
                       cnp.ndarray y, cnp.ndarray mean, cnp.ndarray rstd, variance,
                       bint channels_last, int n_threads):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[2] if channels_last else x.shape[1]
    cdef Py_ssize_t S = x.shape[1] if channels_last else x.shape[2]
    cdef Py_ssize_t G = mean.shape[1]
    cdef void* xp = data(x)
    cdef void* wp = data(weight)
    cdef void* bp = data(bias)
    cdef void* yp = data(y)
    cdef void* mp = data(mean)
    cdef void* rp = data(rstd)
    cdef double* varp = <double*>data(variance)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = forward(<const float*>xp, <const float*>wp, <const float*>bp, eps,
                             compute_stats, <float*>yp, <float*>mp, <float*>rp, varp,
                             N, C, S, G, channels_last, n_threads)
        else:
            status = forward(<const double*>xp, <const double*>wp, <const double*>bp, eps,
                             compute_stats, <double*>yp, <double*>mp, <double*>rp, varp,
                             N, C, S, G, channels_last, n_threads)
    if status != 0:
        raise MemoryError()


def group_norm_backward(cnp.ndarray grad_out, cnp.ndarray x, weight, cnp.ndarray mean,
                        cnp.ndarray rstd, bint stats_from_input, grad_x, grad_weight,
                        grad_bias, bint channels_last, int n_threads):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[2] if channels_last else x.shape[1]
    cdef Py_ssize_t S = x.shape[1] if channels_last else x.shape[2]
    cdef Py_ssize_t G = mean.shape[1]
    cdef void* dyp = data(grad_out)
    cdef void* xp = data(x)
    cdef void* wp = data(weight)
    cdef void* mp = data(mean)
    cdef void* rp = data(rstd)
    cdef void* dxp = data(grad_x)
    cdef void* dwp = data(grad_weight)
    cdef void* dbp = data(grad_bias)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = backward(<const float*>dyp, <const float*>xp, <const float*>wp,
                              <const float*>mp, <const float*>rp, stats_from_input,
                              <float*>dxp, <float*>dwp, <float*>dbp,
                              N, C, S, G, channels_last, n_threads)
        else:
            status = backward(<const double*>dyp, <const double*>xp, <const double*>wp,
                              <const double*>mp, <const double*>rp, stats_from_input,
                              <double*>dxp, <double*>dwp, <double*>dbp,
                              N, C, S, G, channels_last, n_threads)
    if status != 0:
        raise MemoryError()
