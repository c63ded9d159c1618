"""LayerNorm and RMSNorm forward and backward kernels (Cython + OpenMP).

The caller (fastbn/layer_norm.py, fastbn/rms_norm.py) has validated every
argument and hands over C-contiguous (rows, D) views: each row is normalized on
its own. RMSNorm is LayerNorm without centring (mean taken as 0) and without
bias, so both share every loop; a `centred` flag tells them apart.

Work is split into fixed items that depend on (rows, D) only, never on the
thread count, and every sum is added in a fixed order, so the result is the
same to the bit for any number of threads:
  whole rows (the usual case): items are blocks of consecutive rows. An item
      computes its rows' statistics and outputs, and, in the backward, its own
      partial column sums for grad_weight / grad_bias, folded across items in
      item order afterwards;
  few long rows (rows < FEW_ROWS, D > CHUNK_ELEMENTS): each row is cut into
      chunks; the (row, chunk) items write partial row sums, added in chunk
      order, so that a single row still fills every thread. In the backward the
      second pass is split by column chunk, each item owning its columns of
      grad_weight / grad_bias across all rows.

Row sums accumulate in the input's own precision over short blocks of values
(exact enough over a block, and as fast as the vector units go), folded into
float64 after each block; the loops over a row are C, in the block below. The
forward statistics are sums of values shifted by a pivot near the row mean (the mean of
the row's first values), which keeps the one-pass variance accurate on data
with a large mean; y = ((x - pivot) * rstd + offset) * weight + bias keeps that
accuracy in y.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport isfinite, sqrt
from fastbn._cython._openmp_helpers cimport effective_threads
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from fastbn._cython._arrays cimport data

cnp.import_array()

cdef extern from *:
    """
    /* Cython's prange inside a parallel block ends without a barrier (nowait). */
    #ifdef _OPENMP
    #define fastbn_omp_barrier() _Pragma("omp barrier")
    #else
    #define fastbn_omp_barrier()
    #endif
    """
    void omp_barrier "fastbn_omp_barrier"() noexcept nogil

cdef enum:
    # Columns folded together when adding the backward's partial column sums.
    FOLD_COLUMNS = 256

# Rows below which a long row is cut into chunks, and the chunk length.
cdef Py_ssize_t FEW_ROWS = 64
cdef Py_ssize_t CHUNK_ELEMENTS = 4096
# Whole rows: about ITEM_ELEMENTS values per item, and a multiple of ITEM_MULTIPLE items
# (so that 2, 4 or 8 threads get equal shares), with at least MIN_ROWS_PER_ITEM rows per
# item (bounds the backward's partial sums to 1/8 of the input) and at most
# MAX_ROWS_PER_ITEM (a partial column sum adds that many terms in the input's precision).
cdef Py_ssize_t ITEM_ELEMENTS = 16384
cdef Py_ssize_t ITEM_MULTIPLE = 8
cdef Py_ssize_t MIN_ROWS_PER_ITEM = 8
cdef Py_ssize_t MAX_ROWS_PER_ITEM = 64


cdef struct Split:
    Py_ssize_t chunks      # pieces each row is cut into; 1 = whole rows
    Py_ssize_t row_items   # whole rows: blocks of rows; few long rows: 1 (columns are split)
    Py_ssize_t items       # items of the row pass: row_items, or rows * chunks


cdef Split make_split(Py_ssize_t rows, Py_ssize_t D) noexcept nogil:
    cdef Split split
    cdef Py_ssize_t items
    if rows < FEW_ROWS and D > CHUNK_ELEMENTS:
        split.chunks = (D + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
        split.row_items = 1
        split.items = rows * split.chunks
        return split
    items = (rows * D + ITEM_ELEMENTS - 1) // ITEM_ELEMENTS
    items = (items + ITEM_MULTIPLE - 1) // ITEM_MULTIPLE * ITEM_MULTIPLE
    if items > rows // MIN_ROWS_PER_ITEM:
        items = rows // MIN_ROWS_PER_ITEM
    if items < (rows + MAX_ROWS_PER_ITEM - 1) // MAX_ROWS_PER_ITEM:
        items = (rows + MAX_ROWS_PER_ITEM - 1) // MAX_ROWS_PER_ITEM
    split.chunks = 1
    split.row_items = items if items > 1 else 1
    split.items = split.row_items
    return split


cdef inline Py_ssize_t part_start(Py_ssize_t part, Py_ssize_t total,
                                  Py_ssize_t parts) noexcept nogil:
    """Start of piece `part` when `total` is cut into `parts` nearly equal pieces."""
    return part * total // parts


# ---------------------------------------------------------------------------
# Loops over one contiguous run of a row.

cdef extern from *:
    """
    /* The loops over a run of one row, where nearly all the time goes. They are
       C so that `omp simd` can vectorise them: it lets the row sums reassociate
       (inside one block only; the order is fixed when the module is compiled)
       and vectorises the elementwise loops without run-time alias checks. An
       output may be exactly its input (y = x, dx = dy or dx = x: each value is read
       before it is written, at the same index), so those pointers are not
       `restrict`; partial overlaps never reach the kernels (fastbn/_layout.py).
       With GCC on x86-64 each is also compiled for AVX2 and AVX-512 and the best
       one the CPU runs is picked when the module loads, so a portable build still
       gets the wide vectors. A missing weight or bias is a NULL pointer: each loop
       is expanded with and without it (HAS_* constants; the vectoriser takes no
       branch inside a loop), so no array of ones or zeros is ever made. */
    #include <math.h>
    #ifdef _MSC_VER
    #define restrict __restrict
    #endif
    #if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 \
        && defined(__x86_64__) && defined(__ELF__)
    #define FASTBN_CLONES \
        __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
    #else
    #define FASTBN_CLONES
    #endif

    /* Row sums are summed in the input's precision over blocks of this many
       values, then added into float64. */
    #define FASTBN_SUM_BLOCK 512

    /* The terms g of the paired sums, in type U, for d = x[i] - centre. */
    #define FASTBN_G_MOMENT(U, d, i) (d)
    #define FASTBN_G_WEIGHTED(U, d, i) ((U)dy[i] * (U)w[i])
    #define FASTBN_G_UNWEIGHTED(U, d, i) ((U)dy[i])

    /* sum(g) and sum(g * (x - centre)) for g = G(type, d, i), d = x[i] - centre: one
       function per G, since a branch would stop the vectoriser. A float32 block whose
       sums are not finite is added again in float64: squares of float32 values past
       about 1.8e19 overflow float32 (but not float64), and inf / nan in the data stay
       inf / nan either way. The usual block pays one test. */
    #define FASTBN_DEFINE_PAIRED_SUMS(T, NAME, G)                                      \
    FASTBN_CLONES static void NAME(                                                    \
            const T* x, const T* dy, const T* w, Py_ssize_t n, T centre,               \
            double* first_out, double* second_out) {                                  \
        double first = 0.0, second = 0.0;                                              \
        (void)dy; (void)w;                                                             \
        for (Py_ssize_t start = 0; start < n; start += FASTBN_SUM_BLOCK) {             \
            Py_ssize_t stop = n - start > FASTBN_SUM_BLOCK ? start + FASTBN_SUM_BLOCK : n; \
            T block_first = 0, block_second = 0;                                       \
            _Pragma("omp simd reduction(+:block_first, block_second)")                 \
            for (Py_ssize_t i = start; i < stop; i++) {                                \
                T d = x[i] - centre;                                                   \
                T g = G(T, d, i);                                                      \
                block_first += g;                                                      \
                block_second += g * d;                                                 \
            }                                                                          \
            if (sizeof(T) < sizeof(double)                                             \
                    && !(isfinite(block_first) && isfinite(block_second))) {           \
                double wide_first = 0.0, wide_second = 0.0;                            \
                for (Py_ssize_t i = start; i < stop; i++) {                            \
                    double d = (double)x[i] - (double)centre;                          \
                    double g = G(double, d, i);                                        \
                    wide_first += g;                                                   \
                    wide_second += g * d;                                              \
                }                                                                      \
                first += wide_first;                                                   \
                second += wide_second;                                                 \
            } else {                                                                   \
                first += block_first;                                                  \
                second += block_second;                                                \
            }                                                                          \
        }                                                                              \
        *first_out = first;                                                            \
        *second_out = second;                                                          \
    }

    #define FASTBN_NORMALIZE_LOOP(W, B)                                                \
        _Pragma("omp simd")                                                            \
        for (Py_ssize_t i = 0; i < n; i++)                                             \
            y[i] = ((x[i] - pivot) * scale + offset) W B;

    #define FASTBN_DEFINE_ROW_LOOPS(T)                                                 \
    /* The mean of the first (up to) 16 values, in float64. */                        \
    static double fastbn_leading_mean_##T(const T* x, Py_ssize_t n) {                  \
        Py_ssize_t count = n < 16 ? n : 16;                                            \
        double total = 0.0;                                                            \
        _Pragma("omp simd reduction(+:total)")                                         \
        for (Py_ssize_t i = 0; i < count; i++)                                         \
            total += x[i];                                                             \
        return total / count;                                                          \
    }                                                                                  \
                                                                                       \
    FASTBN_DEFINE_PAIRED_SUMS(T, fastbn_moment_sums_##T, FASTBN_G_MOMENT)              \
    FASTBN_DEFINE_PAIRED_SUMS(T, fastbn_grad_sums_##T, FASTBN_G_WEIGHTED)              \
    FASTBN_DEFINE_PAIRED_SUMS(T, fastbn_unweighted_grad_sums_##T, FASTBN_G_UNWEIGHTED) \
                                                                                       \
    /* y = ((x - pivot) * scale + offset) * w + b; w and b may be NULL. */            \
    FASTBN_CLONES static void fastbn_normalize_run_##T(                                \
            const T* x, const T* restrict w, const T* restrict b,                      \
            T* y, Py_ssize_t n, T pivot, T scale, T offset) {                          \
        if (w && b) {                                                                  \
            FASTBN_NORMALIZE_LOOP(* w[i], + b[i])                                      \
        } else if (w) {                                                                \
            FASTBN_NORMALIZE_LOOP(* w[i], )                                            \
        } else if (b) {                                                                \
            FASTBN_NORMALIZE_LOOP(, + b[i])                                            \
        } else {                                                                       \
            FASTBN_NORMALIZE_LOOP(, )                                                  \
        }                                                                              \
    }

    /* The backward's elementwise pass over ROWS rows `stride` apart: dx, and the
       rows' terms of grad_weight / grad_bias added (in row order) into the partial
       column sums, which are so loaded and stored once for all the rows. The loop is
       written once and expanded for each set of wanted outputs and for a weight or
       none (HAS_* constants), as the vectoriser takes no branch inside it; only the
       rare calls without dx keep run-time conditions. */
    #define FASTBN_GRAD_LOOP(T, ROWS, HAS_W, HAS_DX, HAS_DW, HAS_DB)                   \
        _Pragma("omp simd")                                                            \
        for (Py_ssize_t i = 0; i < n; i++) {                                           \
            T sum_w = 0, sum_b = 0;                                                    \
            for (int r = 0; r < ROWS; r++) {                                           \
                T g = dy[r * stride + i];                                              \
                T d = x[r * stride + i] - centre[r];                                   \
                if (HAS_DX) dx[r * stride + i] = (HAS_W ? g * w[i] : g) * a[r]         \
                                                 + d * b[r] + c[r];                    \
                sum_w += g * d * rstd[r];                                              \
                sum_b += g;                                                            \
            }                                                                          \
            if (HAS_DW) dw_part[i] += sum_w;                                           \
            if (HAS_DB) db_part[i] += sum_b;                                           \
        }

    #define FASTBN_GRAD_LOOPS_WITH_DX(T, ROWS, HAS_W)                                  \
        if (dw_part && db_part) {                                                      \
            FASTBN_GRAD_LOOP(T, ROWS, HAS_W, 1, 1, 1)                                  \
        } else if (dw_part) {                                                          \
            FASTBN_GRAD_LOOP(T, ROWS, HAS_W, 1, 1, 0)                                  \
        } else if (db_part) {                                                          \
            FASTBN_GRAD_LOOP(T, ROWS, HAS_W, 1, 0, 1)                                  \
        } else {                                                                       \
            FASTBN_GRAD_LOOP(T, ROWS, HAS_W, 1, 0, 0)                                  \
        }

    #define FASTBN_DEFINE_GRAD_ROWS(T, ROWS)                                           \
    FASTBN_CLONES static void fastbn_grad_rows##ROWS##_##T(                            \
            const T* dy, const T* x, const T* restrict w,                              \
            T* dx, T* restrict dw_part, T* restrict db_part,                           \
            Py_ssize_t stride, Py_ssize_t n, const T* restrict centre,                 \
            const T* restrict rstd, const T* restrict a, const T* restrict b,          \
            const T* restrict c) {                                                     \
        if (!dx) {                                                                     \
            FASTBN_GRAD_LOOP(T, ROWS, 0, 0, dw_part != NULL, db_part != NULL)          \
        } else if (w) {                                                                \
            FASTBN_GRAD_LOOPS_WITH_DX(T, ROWS, 1)                                      \
        } else {                                                                       \
            FASTBN_GRAD_LOOPS_WITH_DX(T, ROWS, 0)                                      \
        }                                                                              \
    }

    FASTBN_DEFINE_ROW_LOOPS(float)
    FASTBN_DEFINE_ROW_LOOPS(double)
    FASTBN_DEFINE_GRAD_ROWS(float, 1)
    FASTBN_DEFINE_GRAD_ROWS(float, 4)
    FASTBN_DEFINE_GRAD_ROWS(double, 1)
    FASTBN_DEFINE_GRAD_ROWS(double, 4)
    """
    double fastbn_leading_mean_float(const float* x, Py_ssize_t n) noexcept nogil
    double fastbn_leading_mean_double(const double* x, Py_ssize_t n) noexcept nogil
    void fastbn_moment_sums_float(const float* x, const float* dy, const float* w, Py_ssize_t n,
                                  float centre, double* first_out,
                                  double* second_out) noexcept nogil
    void fastbn_moment_sums_double(const double* x, const double* dy, const double* w,
                                   Py_ssize_t n, double centre, double* first_out,
                                   double* second_out) noexcept nogil
    void fastbn_grad_sums_float(const float* x, const float* dy, const float* w, Py_ssize_t n,
                                float centre, double* first_out,
                                double* second_out) noexcept nogil
    void fastbn_grad_sums_double(const double* x, const double* dy, const double* w,
                                 Py_ssize_t n, double centre, double* first_out,
                                 double* second_out) noexcept nogil
    void fastbn_unweighted_grad_sums_float(const float* x, const float* dy, const float* w,
                                           Py_ssize_t n, float centre, double* first_out,
                                           double* second_out) noexcept nogil
    void fastbn_unweighted_grad_sums_double(const double* x, const double* dy, const double* w,
                                            Py_ssize_t n, double centre, double* first_out,
                                            double* second_out) noexcept nogil
    void fastbn_normalize_run_float(const float* x, const float* w, const float* b, float* y,
                                    Py_ssize_t n, float pivot, float scale,
                                    float offset) noexcept nogil
    void fastbn_normalize_run_double(const double* x, const double* w, const double* b,
                                     double* y, Py_ssize_t n, double pivot, double scale,
                                     double offset) noexcept nogil
    void fastbn_grad_rows1_float(const float* dy, const float* x, const float* w, float* dx,
                                 float* dw_part, float* db_part, Py_ssize_t stride,
                                 Py_ssize_t n, const float* centre, const float* rstd,
                                 const float* a, const float* b, const float* c) noexcept nogil
    void fastbn_grad_rows4_float(const float* dy, const float* x, const float* w, float* dx,
                                 float* dw_part, float* db_part, Py_ssize_t stride,
                                 Py_ssize_t n, const float* centre, const float* rstd,
                                 const float* a, const float* b, const float* c) noexcept nogil
    void fastbn_grad_rows1_double(const double* dy, const double* x, const double* w,
                                  double* dx, double* dw_part, double* db_part,
                                  Py_ssize_t stride, Py_ssize_t n, const double* centre,
                                  const double* rstd, const double* a, const double* b,
                                  const double* c) noexcept nogil
    void fastbn_grad_rows4_double(const double* dy, const double* x, const double* w,
                                  double* dx, double* dw_part, double* db_part,
                                  Py_ssize_t stride, Py_ssize_t n, const double* centre,
                                  const double* rstd, const double* a, const double* b,
                                  const double* c) noexcept nogil


cdef inline void paired_sums(const floating* x, const floating* dy, const floating* w,
                             Py_ssize_t n, floating centre, bint gradient,
                             double* first_out, double* second_out) noexcept nogil:
    """sum(g) and sum(g * (x - centre)) in float64, where g = dy * w (dy when w is NULL)
    when `gradient`, else g = x - centre (the shifted sum and sum of squares of the
    statistics)."""
    if gradient:
        if w == NULL:
            if floating is float:
                fastbn_unweighted_grad_sums_float(x, dy, w, n, centre, first_out, second_out)
            else:
                fastbn_unweighted_grad_sums_double(x, dy, w, n, centre, first_out, second_out)
        elif floating is float:
            fastbn_grad_sums_float(x, dy, w, n, centre, first_out, second_out)
        else:
            fastbn_grad_sums_double(x, dy, w, n, centre, first_out, second_out)
    elif floating is float:
        fastbn_moment_sums_float(x, dy, w, n, centre, first_out, second_out)
    else:
        fastbn_moment_sums_double(x, dy, w, n, centre, first_out, second_out)


cdef inline void normalize_run(const floating* x, const floating* w, const floating* b,
                               floating* y, Py_ssize_t n, floating pivot, floating scale,
                               floating offset) noexcept nogil:
    """y = ((x - pivot) * scale + offset) * w + b; w and b may be NULL (none)."""
    if floating is float:
        fastbn_normalize_run_float(x, w, b, y, n, pivot, scale, offset)
    else:
        fastbn_normalize_run_double(x, w, b, y, n, pivot, scale, offset)


cdef inline const floating* column(const floating* parameter, Py_ssize_t c0) noexcept nogil:
    """parameter + c0, or NULL for a missing parameter (NULL + c0 is not a pointer)."""
    if parameter == NULL:
        return NULL
    return parameter + c0


# ---------------------------------------------------------------------------
# The phases of both passes, over rows [r0, r1) and columns [c0, c1). Sums go to
# sums[2 * (r * chunks + k)] and the next double, for chunk k of row r; per-row
# scalars are separate arrays, so that each phase runs over many rows at once
# (rows are independent: the CPU overlaps one row's square root with the next
# row's loads, which a row-at-a-time loop would serialise).

cdef void row_pivots(const floating* x, Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1,
                     bint centred, floating* pivot) noexcept nogil:
    """The shift for each row's statistics: the mean of its first values, close to the
    row mean for most data. 0 for RMSNorm, and where that mean is not finite (an inf
    pivot would turn a row's inf mean into nan)."""
    cdef Py_ssize_t r
    cdef double value
    for r in range(r0, r1):
        value = 0.0
        if centred:
            if floating is float:
                value = fastbn_leading_mean_float(x + r * D, D)
            else:
                value = fastbn_leading_mean_double(x + r * D, D)
        pivot[r] = <floating>value if isfinite(value) else 0.0


cdef void row_sums(const floating* x, const floating* dy, const floating* w,
                   const floating* centre, Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1,
                   Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t chunks, Py_ssize_t k,
                   bint gradient, double* sums) noexcept nogil:
    """paired_sums of each row; without `gradient` dy and w are not read (pass x)."""
    cdef Py_ssize_t r
    for r in range(r0, r1):
        paired_sums(x + r * D + c0, dy + r * D + c0, column(w, c0), c1 - c0,
                    centre[r], gradient, &sums[2 * (r * chunks + k)],
                    &sums[2 * (r * chunks + k) + 1])


cdef inline void add_chunks(const double* sums, Py_ssize_t r, Py_ssize_t chunks,
                            double* first, double* second) noexcept nogil:
    """A row's sums: its chunks' partial sums added in chunk order."""
    cdef Py_ssize_t k
    first[0] = sums[2 * r * chunks]
    second[0] = sums[2 * r * chunks + 1]
    for k in range(1, chunks):
        first[0] += sums[2 * (r * chunks + k)]
        second[0] += sums[2 * (r * chunks + k) + 1]


cdef void row_statistics(const double* sums, Py_ssize_t chunks, const floating* pivot,
                         Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1, double eps, bint centred,
                         floating* mean, floating* rstd, floating* scale,
                         floating* offset) noexcept nogil:
    """mean, rstd, and y's coefficients: y = ((x - pivot) * scale + offset) * w + b."""
    cdef Py_ssize_t r
    cdef double sum_shifted, sum_sq, shifted_mean, var, row_rstd
    for r in range(r0, r1):
        add_chunks(sums, r, chunks, &sum_shifted, &sum_sq)
        shifted_mean = sum_shifted / D if centred else 0.0
        var = sum_sq / D - shifted_mean * shifted_mean
        if var < 0.0:  # rounding only; keeps nan as nan
            var = 0.0
        row_rstd = 1.0 / sqrt(var + eps)
        if mean != NULL:
            mean[r] = <floating>(pivot[r] + shifted_mean)
        rstd[r] = <floating>row_rstd
        scale[r] = <floating>row_rstd
        offset[r] = <floating>(-shifted_mean * row_rstd)


cdef void grad_coefficients(const double* sums, Py_ssize_t chunks, const floating* rstd,
                            Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1, bint centred,
                            floating* a, floating* b, floating* c) noexcept nogil:
    """dx = g * a + (x - mean) * b + c, g = dy * w, from sum(g) and sum(g * (x - mean)):
    rstd * (g - mean(g) - x_hat * mean(g * x_hat)), without mean(g) for RMSNorm."""
    cdef Py_ssize_t r
    cdef double sum_g, dot, row_rstd
    for r in range(r0, r1):
        add_chunks(sums, r, chunks, &sum_g, &dot)
        row_rstd = rstd[r]
        a[r] = <floating>row_rstd
        b[r] = <floating>(-row_rstd * row_rstd * row_rstd * dot / D)
        c[r] = <floating>(-row_rstd * sum_g / D) if centred else 0.0


cdef void normalize_rows(const floating* x, const floating* w, const floating* b, floating* y,
                         const floating* pivot, const floating* scale, const floating* offset,
                         Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                         Py_ssize_t c1) noexcept nogil:
    cdef Py_ssize_t r
    for r in range(r0, r1):
        normalize_run(x + r * D + c0, column(w, c0), column(b, c0), y + r * D + c0, c1 - c0,
                      pivot[r],
                      scale[r], offset[r])


cdef enum:
    # Rows whose backward terms are added into the partial column sums together.
    GRAD_ROW_GROUP = 4


cdef void grad_rows(const floating* dy, const floating* x, const floating* w, floating* dx,
                    floating* dw_part, floating* db_part, const floating* centre,
                    const floating* rstd, const floating* a, const floating* b,
                    const floating* c, Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1,
                    Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """dx = dy * w * a + (x - centre) * b + c for the rows, and their terms of grad_weight
    (dy * (x - centre) * rstd) and grad_bias (dy) added into the partial column sums
    dw_part / db_part, GRAD_ROW_GROUP rows at a time, in row order. dx, dw_part and
    db_part may be NULL."""
    cdef Py_ssize_t r, j, group
    cdef floating* dx_row = NULL
    for j in range(c0, c1):
        if dw_part != NULL:
            dw_part[j] = 0.0
        if db_part != NULL:
            db_part[j] = 0.0
    r = r0
    while r < r1:
        group = GRAD_ROW_GROUP if r1 - r >= GRAD_ROW_GROUP else 1
        if dx != NULL:
            dx_row = dx + r * D + c0
        if floating is float:
            if group == GRAD_ROW_GROUP:
                fastbn_grad_rows4_float(dy + r * D + c0, x + r * D + c0, column(w, c0), dx_row,
                                        NULL if dw_part == NULL else dw_part + c0,
                                        NULL if db_part == NULL else db_part + c0, D, c1 - c0,
                                        centre + r, rstd + r, a + r, b + r, c + r)
            else:
                fastbn_grad_rows1_float(dy + r * D + c0, x + r * D + c0, column(w, c0), dx_row,
                                        NULL if dw_part == NULL else dw_part + c0,
                                        NULL if db_part == NULL else db_part + c0, D, c1 - c0,
                                        centre + r, rstd + r, a + r, b + r, c + r)
        else:
            if group == GRAD_ROW_GROUP:
                fastbn_grad_rows4_double(dy + r * D + c0, x + r * D + c0, column(w, c0), dx_row,
                                         NULL if dw_part == NULL else dw_part + c0,
                                         NULL if db_part == NULL else db_part + c0, D, c1 - c0,
                                         centre + r, rstd + r, a + r, b + r, c + r)
            else:
                fastbn_grad_rows1_double(dy + r * D + c0, x + r * D + c0, column(w, c0), dx_row,
                                         NULL if dw_part == NULL else dw_part + c0,
                                         NULL if db_part == NULL else db_part + c0, D, c1 - c0,
                                         centre + r, rstd + r, a + r, b + r, c + r)
        r += group


cdef void fold_partials(const floating* part, Py_ssize_t n_parts, Py_ssize_t D,
                        Py_ssize_t c0, Py_ssize_t c1, floating* out) noexcept nogil:
    """out[c0:c1] = the partial column sums added in item order, in float64."""
    cdef double total[FOLD_COLUMNS]
    cdef Py_ssize_t k, j
    for j in range(c1 - c0):
        total[j] = 0.0
    for k in range(n_parts):
        for j in range(c1 - c0):
            total[j] += part[k * D + c0 + j]
    for j in range(c1 - c0):
        out[c0 + j] = <floating>total[j]


# ---------------------------------------------------------------------------
# Drivers. Whole rows: each item runs every phase on its block of rows. Few long
# rows: each phase runs over all (row, chunk) items before the next starts. On one
# thread every driver runs its items in plain loops, without entering an OpenMP
# region: that costs about 1 us, and in a child forked after the parent's OpenMP
# pool started (fastbn/_threads.py) a region may never return.

cdef void forward_block(const floating* x, const floating* w, const floating* b, floating* y,
                        floating* mean, floating* rstd, Py_ssize_t D, Py_ssize_t r0,
                        Py_ssize_t r1, double eps, bint centred, double* sums, floating* pivot,
                        floating* scale, floating* offset) noexcept nogil:
    """Whole rows: every phase of the forward for rows [r0, r1)."""
    row_pivots(x, D, r0, r1, centred, pivot)
    row_sums(x, x, x, pivot, D, r0, r1, 0, D, 1, 0, False, sums)
    row_statistics(sums, 1, pivot, D, r0, r1, eps, centred, mean, rstd, scale, offset)
    normalize_rows(x, w, b, y, pivot, scale, offset, D, r0, r1, 0, D)


cdef inline void sum_chunk(const floating* x, const floating* pivot, Py_ssize_t D,
                           Py_ssize_t chunks, Py_ssize_t item, double* sums) noexcept nogil:
    """Few long rows: the statistics sums of (row, chunk) item `item`."""
    cdef Py_ssize_t r = item // chunks
    cdef Py_ssize_t k = item - r * chunks
    row_sums(x, x, x, pivot, D, r, r + 1, part_start(k, D, chunks), part_start(k + 1, D, chunks),
             chunks, k, False, sums)


cdef inline void normalize_chunk(const floating* x, const floating* w, const floating* b,
                                 floating* y, const floating* pivot, const floating* scale,
                                 const floating* offset, Py_ssize_t D, Py_ssize_t chunks,
                                 Py_ssize_t item) noexcept nogil:
    """Few long rows: y for (row, chunk) item `item`."""
    cdef Py_ssize_t r = item // chunks
    cdef Py_ssize_t k = item - r * chunks
    normalize_rows(x, w, b, y, pivot, scale, offset, D, r, r + 1, part_start(k, D, chunks),
                   part_start(k + 1, D, chunks))


cdef void forward(const floating* x, const floating* w, const floating* b, floating* y,
                  floating* mean, floating* rstd, Py_ssize_t rows, Py_ssize_t D, double eps,
                  bint centred, Split split, int threads, double* sums,
                  floating* row_scalars) noexcept nogil:
    """sums: 2 * rows * split.chunks doubles; row_scalars: 3 * rows values."""
    cdef Py_ssize_t item, chunks = split.chunks
    cdef floating* pivot = row_scalars
    cdef floating* scale = row_scalars + rows
    cdef floating* offset = row_scalars + 2 * rows
    if chunks == 1:
        if threads == 1:
            for item in range(split.items):
                forward_block(x, w, b, y, mean, rstd, D, part_start(item, rows, split.items),
                              part_start(item + 1, rows, split.items), eps, centred, sums,
                              pivot, scale, offset)
            return
        for item in prange(split.items, nogil=True, num_threads=threads, schedule="static"):
            forward_block(x, w, b, y, mean, rstd, D, part_start(item, rows, split.items),
                          part_start(item + 1, rows, split.items), eps, centred, sums,
                          pivot, scale, offset)
        return
    row_pivots(x, D, 0, rows, centred, pivot)
    if threads == 1:  # the same items in a plain loop: no OpenMP region (see above)
        for item in range(split.items):
            sum_chunk(x, pivot, D, chunks, item, sums)
        row_statistics(sums, chunks, pivot, D, 0, rows, eps, centred, mean, rstd, scale, offset)
        for item in range(split.items):
            normalize_chunk(x, w, b, y, pivot, scale, offset, D, chunks, item)
        return
    for item in prange(split.items, nogil=True, num_threads=threads, schedule="static"):
        sum_chunk(x, pivot, D, chunks, item, sums)
    row_statistics(sums, chunks, pivot, D, 0, rows, eps, centred, mean, rstd, scale, offset)
    for item in prange(split.items, nogil=True, num_threads=threads, schedule="static"):
        normalize_chunk(x, w, b, y, pivot, scale, offset, D, chunks, item)


cdef void backward_block(const floating* dy, const floating* x, const floating* centre,
                         const floating* rstd, const floating* w, floating* dx,
                         floating* dw_part, floating* db_part, Py_ssize_t D, Py_ssize_t rows,
                         Split split, Py_ssize_t item, bint centred, double* sums, floating* a,
                         floating* b, floating* c) noexcept nogil:
    """Whole rows: every phase of the backward for work item `item`."""
    cdef Py_ssize_t r0 = part_start(item, rows, split.items)
    cdef Py_ssize_t r1 = part_start(item + 1, rows, split.items)
    if dx != NULL:
        row_sums(x, dy, w, centre, D, r0, r1, 0, D, 1, 0, True, sums)
        grad_coefficients(sums, 1, rstd, D, r0, r1, centred, a, b, c)
    grad_rows(dy, x, w, dx, NULL if dw_part == NULL else dw_part + item * D,
              NULL if db_part == NULL else db_part + item * D, centre, rstd, a, b, c,
              D, r0, r1, 0, D)


cdef void fold_block(const floating* dw_part, const floating* db_part, Py_ssize_t n_parts,
                     Py_ssize_t D, Py_ssize_t block, floating* dw, floating* db) noexcept nogil:
    """Whole rows: grad_weight / grad_bias for columns block * FOLD_COLUMNS onwards."""
    cdef Py_ssize_t c0 = block * FOLD_COLUMNS
    cdef Py_ssize_t c1 = c0 + FOLD_COLUMNS if c0 + FOLD_COLUMNS < D else D
    if dw_part != NULL:
        fold_partials(dw_part, n_parts, D, c0, c1, dw)
    if db_part != NULL:
        fold_partials(db_part, n_parts, D, c0, c1, db)


cdef inline void grad_sum_chunk(const floating* dy, const floating* x, const floating* w,
                                const floating* centre, Py_ssize_t D, Py_ssize_t chunks,
                                Py_ssize_t item, double* sums) noexcept nogil:
    """Few long rows: the gradient sums of (row, chunk) item `item`."""
    cdef Py_ssize_t r = item // chunks
    cdef Py_ssize_t k = item - r * chunks
    row_sums(x, dy, w, centre, D, r, r + 1, part_start(k, D, chunks), part_start(k + 1, D, chunks),
             chunks, k, True, sums)


cdef void backward(const floating* dy, const floating* x, const floating* centre,
                   const floating* rstd, const floating* w, floating* dx, floating* dw,
                   floating* db, Py_ssize_t rows, Py_ssize_t D, bint centred, Split split,
                   int threads, double* sums, floating* row_scalars, floating* dw_part,
                   floating* db_part) noexcept nogil:
    """centre: the rows' means (zeros for RMSNorm); sums: 2 * rows * split.chunks doubles;
    row_scalars: 3 * rows zeros; dw_part / db_part: split.row_items * D values (whole
    rows), NULL when that gradient is not wanted. dx, dw, db may be NULL. Without dx
    the coefficients stay 0 and the rows only add their column sums."""
    cdef Py_ssize_t item, k, cb, chunks = split.chunks
    # No partial sums to fold: no block (the loops below then do nothing).
    cdef Py_ssize_t fold_blocks = ((D + FOLD_COLUMNS - 1) // FOLD_COLUMNS
                                   if dw_part != NULL or db_part != NULL else 0)
    cdef floating* a = row_scalars
    cdef floating* b = row_scalars + rows
    cdef floating* c = row_scalars + 2 * rows
    if chunks == 1:
        if threads == 1:
            for item in range(split.items):
                backward_block(dy, x, centre, rstd, w, dx, dw_part, db_part, D, rows, split,
                               item, centred, sums, a, b, c)
            for cb in range(fold_blocks):
                fold_block(dw_part, db_part, split.row_items, D, cb, dw, db)
            return
        # One OpenMP region (one wake-up of the threads), the fold after a barrier.
        with parallel(num_threads=threads):
            for item in prange(split.items, schedule="static"):
                backward_block(dy, x, centre, rstd, w, dx, dw_part, db_part, D, rows, split,
                               item, centred, sums, a, b, c)
            omp_barrier()
            for cb in prange(fold_blocks, schedule="static"):
                fold_block(dw_part, db_part, split.row_items, D, cb, dw, db)
        return
    # Each chunk of columns is one item of the second pass: it owns those columns of
    # grad_weight / grad_bias and adds every row's terms into them, in row order.
    if threads == 1:  # the same items in a plain loop: no OpenMP region
        if dx != NULL:
            for item in range(split.items):
                grad_sum_chunk(dy, x, w, centre, D, chunks, item, sums)
            grad_coefficients(sums, chunks, rstd, D, 0, rows, centred, a, b, c)
        for k in range(chunks):
            grad_rows(dy, x, w, dx, dw, db, centre, rstd, a, b, c, D, 0, rows,
                      part_start(k, D, chunks), part_start(k + 1, D, chunks))
        return
    if dx != NULL:
        for item in prange(split.items, nogil=True, num_threads=threads, schedule="static"):
            grad_sum_chunk(dy, x, w, centre, D, chunks, item, sums)
        grad_coefficients(sums, chunks, rstd, D, 0, rows, centred, a, b, c)
    for k in prange(chunks, nogil=True, num_threads=threads, schedule="static"):
        grad_rows(dy, x, w, dx, dw, db, centre, rstd, a, b, c, D, 0, rows,
                  part_start(k, D, chunks), part_start(k + 1, D, chunks))


# ---------------------------------------------------------------------------
# One call: the temporaries, then the driver (argument checks are the caller's
# job; inputs are never empty). weight, bias, mean may be NULL: the loops take a
# missing weight or bias as NULL, so no temporary grows with the row length
# beyond the per-chunk sums.

cdef int forward_call(const floating* x, const floating* weight, const floating* bias,
                      double eps, floating* y, floating* mean, floating* rstd, Py_ssize_t rows,
                      Py_ssize_t D, bint centred, int n_threads) noexcept nogil:
    """Returns 0, or -1 when the temporaries cannot be allocated."""
    cdef Split split = make_split(rows, D)
    cdef int threads = effective_threads(n_threads, rows * D, split.items)
    cdef Py_ssize_t n_sums = 2 * rows * split.chunks
    cdef double* sums = <double*>malloc(n_sums * sizeof(double) + 3 * rows * sizeof(floating))
    if sums == NULL:
        return -1
    cdef floating* row_scalars = <floating*>(sums + n_sums)
    forward(x, weight, bias, y, mean, rstd, rows, D, eps, centred, split, threads, sums,
            row_scalars)
    free(sums)
    return 0


cdef int backward_call(const floating* grad_out, const floating* x, const floating* mean,
                       const floating* rstd, const floating* weight, floating* dx,
                       floating* dw, floating* db, Py_ssize_t rows, Py_ssize_t D,
                       bint centred, int n_threads) noexcept nogil:
    """Returns 0, or -1 when the temporaries cannot be allocated. dx, dw, db: NULL for
    the gradients not wanted; mean NULL (RMSNorm): rows are centred on 0."""
    cdef Split split = make_split(rows, D)
    cdef int threads = effective_threads(n_threads, rows * D, split.items)
    cdef bint whole_rows = split.chunks == 1
    cdef Py_ssize_t n_sums = 2 * rows * split.chunks
    # Whole rows: each item's partial column sums (split rows add into the outputs).
    cdef Py_ssize_t n_parts = 0
    if whole_rows:
        n_parts = split.row_items * D * ((dw != NULL) + (db != NULL))
    cdef double* sums = <double*>malloc(n_sums * sizeof(double)
                                        + (4 * rows + n_parts) * sizeof(floating))
    if sums == NULL:
        return -1
    cdef floating* row_scalars = <floating*>(sums + n_sums)
    cdef floating* centre = row_scalars + 3 * rows
    cdef floating* parts = centre + rows
    cdef floating* dw_part = parts if whole_rows and dw != NULL else NULL
    cdef floating* db_part = NULL
    if whole_rows and db != NULL:
        db_part = parts + (n_parts // 2 if dw != NULL else 0)
    memset(row_scalars, 0, 4 * rows * sizeof(floating))
    backward(grad_out, x, mean if mean != NULL else centre, rstd, weight, dx, dw, db, rows, D,
             centred, split, threads, sums, row_scalars, dw_part, db_part)
    free(sums)
    return 0


# ---------------------------------------------------------------------------
# Python entry points. The caller (fastbn/layer_norm.py, fastbn/rms_norm.py) has
# checked every argument: one float dtype, C-contiguous (rows, D) views. Raw data
# pointers keep the per-call cost low (no buffer acquisition per argument).

cdef run_forward(cnp.ndarray x, weight, bias, double eps, cnp.ndarray y, mean,
                 cnp.ndarray rstd, bint centred, int n_threads):
    cdef Py_ssize_t rows = x.shape[0], D = x.shape[1]
    cdef void* xp = data(x)
    cdef void* wp = data(weight)
    cdef void* bp = data(bias)
    cdef void* yp = data(y)
    cdef void* mp = data(mean)
    cdef void* rp = data(rstd)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = forward_call(<const float*>xp, <const float*>wp, <const float*>bp, eps,
                                  <float*>yp, <float*>mp, <float*>rp, rows, D, centred,
                                  n_threads)
        else:
            status = forward_call(<const double*>xp, <const double*>wp, <const double*>bp,
                                  eps, <double*>yp, <double*>mp, <double*>rp, rows, D,
                                  centred, n_threads)
    if status != 0:
        raise MemoryError()


cdef run_backward(cnp.ndarray grad_out, cnp.ndarray x, mean, cnp.ndarray rstd, weight,
                  grad_x, grad_weight, grad_bias, bint centred, int n_threads):
    cdef Py_ssize_t rows = x.shape[0], D = x.shape[1]
    cdef void* dyp = data(grad_out)
    cdef void* xp = data(x)
    cdef void* mp = data(mean)
    cdef void* rp = data(rstd)
    cdef void* wp = data(weight)
    cdef void* dxp = data(grad_x)
    cdef void* dwp = data(grad_weight)
    cdef void* dbp = data(grad_bias)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = backward_call(<const float*>dyp, <const float*>xp, <const float*>mp,
                                   <const float*>rp, <const float*>wp, <float*>dxp,
                                   <float*>dwp, <float*>dbp, rows, D, centred, n_threads)
        else:
            status = backward_call(<const double*>dyp, <const double*>xp, <const double*>mp,
                                   <const double*>rp, <const double*>wp, <double*>dxp,
                                   <double*>dwp, <double*>dbp, rows, D, centred, n_threads)
    if status != 0:
        raise MemoryError()


def layer_norm_forward(x, weight, bias, double eps, y, mean, rstd, int n_threads):
    run_forward(x, weight, bias, eps, y, mean, rstd, True, n_threads)


def layer_norm_backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias,
                        int n_threads):
    run_backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias, True,
                 n_threads)


def rms_norm_forward(x, weight, double eps, y, rstd, int n_threads):
    run_forward(x, weight, None, eps, y, None, rstd, False, n_threads)


def rms_norm_backward(grad_out, x, rstd, weight, grad_x, grad_weight, int n_threads):
    run_backward(grad_out, x, None, rstd, weight, grad_x, grad_weight, None, False, n_threads)
