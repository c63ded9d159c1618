"""LayerNorm and RMSNorm forward and backward kernels (Cython + OpenMP).

The caller (fastbn/layer_norm.py, fastbn/rms_norm.py) has validated every
argument and hands over C-contiguous (rows, D) views: each row is normalized on
its own. RMSNorm is LayerNorm without centring (mean taken as 0) and without
bias, so both share every loop; a `centred` flag tells them apart.

The loops are C (_layer_norm_loops.h, on _simd.h's vectors: one copy per
instruction set, the module's INSTRUCTION_SET picked at import). Work is split
into fixed items that depend on (rows, D) only, never on the thread count, and
every sum is added in a fixed order, so the result is the same to the bit for
any number of threads:
  whole rows (the usual case): items are blocks of consecutive rows. An item
      does every phase of its rows, a few rows at a time (their values stay in
      cache between the sums and the elementwise pass), and, in the backward,
      adds its own partial column sums for grad_weight / grad_bias, folded
      across items in item order afterwards;
  few long rows (rows < FEW_ROWS, D > CHUNK_ELEMENTS): each row is cut into
      chunks; the (row, chunk) items write partial row sums, added in chunk
      order, so that a single row still fills every thread. In the backward the
      second pass is split by column chunk, each item owning its columns of
      grad_weight / grad_bias across all rows.

Row sums accumulate in the input's own precision over short blocks of values
and in float64 across blocks (BatchNorm's run sums). The forward statistics
are sums of values shifted by a pivot near the row mean (the mean of the row's
first vector of values), which keeps the one-pass variance accurate on data with a large
mean; y = ((x - pivot) * rstd + offset) * weight + bias keeps that accuracy in y.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from fastbn._cython._openmp_helpers cimport effective_threads
from fastbn._cython._arrays cimport data
from fastbn._cython._simd cimport select_instruction_set

cnp.import_array()

# The instruction set the loops of this module run (see _simd.h, FASTBN_SIMD).
INSTRUCTION_SET = select_instruction_set()

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

cdef extern from "_layer_norm_loops.h" nogil:
    void fastbn_ln_forward_rows_float(const float* x, const float* w, const float* b, float* y,
                                      float* mean, float* rstd, Py_ssize_t D, Py_ssize_t r0,
                                      Py_ssize_t r1, double eps, int centred)
    void fastbn_ln_forward_rows_double(const double* x, const double* w, const double* b,
                                       double* y, double* mean, double* rstd, Py_ssize_t D,
                                       Py_ssize_t r0, Py_ssize_t r1, double eps, int centred)
    void fastbn_ln_backward_rows_float(const float* dy, const float* x, const float* w,
                                       float* dx, float* dw_part, float* db_part, Py_ssize_t D,
                                       Py_ssize_t r0, Py_ssize_t r1, const float* centre,
                                       const float* rstd, int centred)
    void fastbn_ln_backward_rows_double(const double* dy, const double* x, const double* w,
                                        double* dx, double* dw_part, double* db_part,
                                        Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1,
                                        const double* centre, const double* rstd, int centred)
    void fastbn_ln_chunk_sums_float(const float* x, const float* dy, const float* w,
                                    Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                                    Py_ssize_t c1, const float* centre, Py_ssize_t chunks,
                                    Py_ssize_t k, double* part_a, double* part_b)
    void fastbn_ln_chunk_sums_double(const double* x, const double* dy, const double* w,
                                     Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                                     Py_ssize_t c1, const double* centre, Py_ssize_t chunks,
                                     Py_ssize_t k, double* part_a, double* part_b)
    void fastbn_ln_normalize_float(const float* x, const float* w, const float* b, float* y,
                                   Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0,
                                   Py_ssize_t c1, const float* pivot, const float* scale,
                                   const float* offset)
    void fastbn_ln_normalize_double(const double* x, const double* w, const double* b,
                                    double* y, Py_ssize_t D, Py_ssize_t r0, Py_ssize_t r1,
                                    Py_ssize_t c0, Py_ssize_t c1, const double* pivot,
                                    const double* scale, const double* offset)
    void fastbn_ln_grad_rows_float(const float* dy, const float* x, const float* w, float* dx,
                                   float* dw_part, float* db_part, Py_ssize_t stride,
                                   Py_ssize_t rows, Py_ssize_t n, const float* centre,
                                   const float* rstd, const float* a, const float* b,
                                   const float* c)
    void fastbn_ln_grad_rows_double(const double* dy, const double* x, const double* w,
                                    double* dx, double* dw_part, double* db_part,
                                    Py_ssize_t stride, Py_ssize_t rows, Py_ssize_t n,
                                    const double* centre, const double* rstd, const double* a,
                                    const double* b, const double* c)
    float fastbn_ln_pivot_float(const float* x, Py_ssize_t n)
    double fastbn_ln_pivot_double(const double* x, Py_ssize_t n)
    void fastbn_ln_statistics_float(double sum_shifted, double sum_sq, Py_ssize_t D, double eps,
                                    int centred, float pivot, float* mean, float* rstd,
                                    float* scale, float* offset)
    void fastbn_ln_statistics_double(double sum_shifted, double sum_sq, Py_ssize_t D,
                                     double eps, int centred, double pivot, double* mean,
                                     double* rstd, double* scale, double* offset)
    void fastbn_ln_grad_coefficients_float(double sum_g, double dot, Py_ssize_t D, int centred,
                                           float rstd, float* a, float* b, float* c)
    void fastbn_ln_grad_coefficients_double(double sum_g, double dot, Py_ssize_t D,
                                            int centred, double rstd, double* a, double* b,
                                            double* c)

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
# Fused-type front ends of the C loops.

cdef inline void forward_rows(const floating* x, const floating* w, const floating* b,
                              floating* y, floating* mean, floating* rstd, Py_ssize_t D,
                              Py_ssize_t r0, Py_ssize_t r1, double eps,
                              bint centred) noexcept nogil:
    """Whole rows r0:r1: statistics and y (mean NULL for RMSNorm)."""
    if floating is float:
        fastbn_ln_forward_rows_float(x, w, b, y, mean, rstd, D, r0, r1, eps, centred)
    else:
        fastbn_ln_forward_rows_double(x, w, b, y, mean, rstd, D, r0, r1, eps, centred)


cdef inline void backward_rows(const floating* dy, const floating* x, const floating* w,
                               floating* dx, floating* dw_part, floating* db_part, Py_ssize_t D,
                               Py_ssize_t r0, Py_ssize_t r1, const floating* centre,
                               const floating* rstd, bint centred) noexcept nogil:
    """Whole rows r0:r1: dx (unless NULL) and the rows' partial column sums of grad_weight
    and grad_bias (set; NULL when not wanted)."""
    if floating is float:
        fastbn_ln_backward_rows_float(dy, x, w, dx, dw_part, db_part, D, r0, r1, centre, rstd,
                                      centred)
    else:
        fastbn_ln_backward_rows_double(dy, x, w, dx, dw_part, db_part, D, r0, r1, centre, rstd,
                                       centred)


cdef inline void chunk_sums(const floating* x, const floating* dy, const floating* w,
                            Py_ssize_t D, Py_ssize_t chunks, Py_ssize_t item,
                            const floating* centre, double* part_a,
                            double* part_b) noexcept nogil:
    """Few long rows, (row, chunk) item `item`: the statistics' shifted sums (dy NULL) or the
    gradient sums, to part_a/part_b[item]."""
    cdef Py_ssize_t r = item // chunks, k = item - r * chunks
    cdef Py_ssize_t c0 = part_start(k, D, chunks), c1 = part_start(k + 1, D, chunks)
    if floating is float:
        fastbn_ln_chunk_sums_float(x, dy, w, D, r, r + 1, c0, c1, centre, chunks, k, part_a,
                                   part_b)
    else:
        fastbn_ln_chunk_sums_double(x, dy, w, D, r, r + 1, c0, c1, centre, chunks, k, part_a,
                                    part_b)


cdef inline void normalize_chunk(const floating* x, const floating* w, const floating* b,
                                 floating* y, const floating* pivot, const floating* scale,
                                 const floating* offset, Py_ssize_t D, Py_ssize_t chunks,
                                 Py_ssize_t item) noexcept nogil:
    """Few long rows: y for (row, chunk) item `item`."""
    cdef Py_ssize_t r = item // chunks, k = item - r * chunks
    cdef Py_ssize_t c0 = part_start(k, D, chunks), c1 = part_start(k + 1, D, chunks)
    if floating is float:
        fastbn_ln_normalize_float(x, w, b, y, D, r, r + 1, c0, c1, pivot, scale, offset)
    else:
        fastbn_ln_normalize_double(x, w, b, y, D, r, r + 1, c0, c1, pivot, scale, offset)


cdef inline const floating* column(const floating* parameter, Py_ssize_t c0) noexcept nogil:
    """parameter + c0, or NULL for a missing parameter (NULL + c0 is not a pointer)."""
    if parameter == NULL:
        return NULL
    return parameter + c0


cdef void grad_columns(const floating* dy, const floating* x, const floating* w, floating* dx,
                       floating* dw, floating* db, const floating* centre,
                       const floating* rstd, const floating* a, const floating* b,
                       const floating* c, Py_ssize_t rows, Py_ssize_t D, Py_ssize_t chunks,
                       Py_ssize_t k) noexcept nogil:
    """Few long rows, column chunk k of every row: dx, and grad_weight / grad_bias of those
    columns (NULL when not wanted) summed over the rows in row order."""
    cdef Py_ssize_t c0 = part_start(k, D, chunks), c1 = part_start(k + 1, D, chunks)
    if dw != NULL:
        memset(dw + c0, 0, (c1 - c0) * sizeof(floating))
    if db != NULL:
        memset(db + c0, 0, (c1 - c0) * sizeof(floating))
    if floating is float:
        fastbn_ln_grad_rows_float(dy + c0, x + c0, column(w, c0),
                                  dx + c0 if dx != NULL else NULL,
                                  dw + c0 if dw != NULL else NULL,
                                  db + c0 if db != NULL else NULL, D, rows, c1 - c0, centre,
                                  rstd, a, b, c)
    else:
        fastbn_ln_grad_rows_double(dy + c0, x + c0, column(w, c0),
                                   dx + c0 if dx != NULL else NULL,
                                   dw + c0 if dw != NULL else NULL,
                                   db + c0 if db != NULL else NULL, D, rows, c1 - c0, centre,
                                   rstd, a, b, c)


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


cdef void fold_block(const floating* dw_part, const floating* db_part, Py_ssize_t n_parts,
                     Py_ssize_t D, Py_ssize_t block, floating* dw, floating* db) noexcept nogil:
    """Whole rows: grad_weight / grad_bias for columns block * FOLD_COLUMNS onwards."""
    cdef Py_ssize_t c0 = block * FOLD_COLUMNS
    cdef Py_ssize_t c1 = c0 + FOLD_COLUMNS if c0 + FOLD_COLUMNS < D else D
    if dw_part != NULL:
        fold_partials(dw_part, n_parts, D, c0, c1, dw)
    if db_part != NULL:
        fold_partials(db_part, n_parts, D, c0, c1, db)


cdef inline void add_chunks(const double* part_a, const double* part_b, Py_ssize_t r,
                            Py_ssize_t chunks, double* first, double* second) noexcept nogil:
    """A row's sums: its chunks' partial sums added in chunk order."""
    cdef Py_ssize_t k
    first[0] = part_a[r * chunks]
    second[0] = part_b[r * chunks]
    for k in range(1, chunks):
        first[0] += part_a[r * chunks + k]
        second[0] += part_b[r * chunks + k]


# ---------------------------------------------------------------------------
# Drivers. Whole rows: each item runs every phase on its block of rows. Few long
# rows: each phase runs over all (row, chunk) items before the next starts. On one
# thread every driver runs its items in plain loops, without entering an OpenMP
# region: that costs about 1 us, and in a child forked after the parent's OpenMP
# pool started (fastbn/_threads.py) a region may never return.

cdef int forward(const floating* x, const floating* w, const floating* b, floating* y,
                 floating* mean, floating* rstd, Py_ssize_t rows, Py_ssize_t D, double eps,
                 bint centred, int n_threads) noexcept nogil:
    """mean NULL for RMSNorm. Returns 0, or -1 when the temporaries cannot be allocated."""
    cdef Split split = make_split(rows, D)
    cdef int threads = effective_threads(n_threads, rows * D, split.items)
    cdef Py_ssize_t item, r, chunks = split.chunks
    cdef double sum_shifted, sum_sq
    if chunks == 1:  # whole rows: no temporaries
        if threads == 1:
            for item in range(split.items):
                forward_rows(x, w, b, y, mean, rstd, D, part_start(item, rows, split.items),
                             part_start(item + 1, rows, split.items), eps, centred)
            return 0
        for item in prange(split.items, nogil=True, num_threads=threads, schedule="static"):
            forward_rows(x, w, b, y, mean, rstd, D, part_start(item, rows, split.items),
                         part_start(item + 1, rows, split.items), eps, centred)
        return 0
    cdef double* part_a = <double*>malloc(2 * rows * chunks * sizeof(double)
                                          + 3 * rows * sizeof(floating))
    if part_a == NULL:
        return -1
    cdef double* part_b = part_a + rows * chunks
    cdef floating* pivot = <floating*>(part_b + rows * chunks)
    cdef floating* scale = pivot + rows
    cdef floating* offset = pivot + 2 * rows
    for r in range(rows):
        if not centred:
            pivot[r] = 0.0
        elif floating is float:
            pivot[r] = fastbn_ln_pivot_float(x + r * D, D)
        else:
            pivot[r] = fastbn_ln_pivot_double(x + r * D, D)
    if threads == 1:  # the same items in a plain loop: no OpenMP region (see above)
        for item in range(split.items):
            chunk_sums(x, <const floating*>NULL, <const floating*>NULL, D, chunks, item, pivot,
                       part_a, part_b)
    else:
        for item in prange(split.items, nogil=True, num_threads=threads, schedule="static"):
            chunk_sums(x, <const floating*>NULL, <const floating*>NULL, D, chunks, item, pivot,
                       part_a, part_b)
    for r in range(rows):
        add_chunks(part_a, part_b, r, chunks, &sum_shifted, &sum_sq)
        if floating is float:
            fastbn_ln_statistics_float(sum_shifted, sum_sq, D, eps, centred, pivot[r],
                                       mean + r if mean != NULL else NULL, rstd + r,
                                       scale + r, offset + r)
        else:
            fastbn_ln_statistics_double(sum_shifted, sum_sq, D, eps, centred, pivot[r],
                                        mean + r if mean != NULL else NULL, rstd + r,
                                        scale + r, offset + r)
    if threads == 1:
        for item in range(split.items):
            normalize_chunk(x, w, b, y, pivot, scale, offset, D, chunks, item)
    else:
        for item in prange(split.items, nogil=True, num_threads=threads, schedule="static"):
            normalize_chunk(x, w, b, y, pivot, scale, offset, D, chunks, item)
    free(part_a)
    return 0


cdef int backward(const floating* dy, const floating* x, const floating* mean,
                  const floating* rstd, const floating* w, floating* dx, floating* dw,
                  floating* db, Py_ssize_t rows, Py_ssize_t D, bint centred,
                  int n_threads) noexcept nogil:
    """mean NULL (RMSNorm): rows are centred on 0. dx, dw, db: NULL for the gradients not
    wanted; without dx the rows only add their column sums. Returns 0, or -1 when the
    temporaries cannot be allocated."""
    cdef Split split = make_split(rows, D)
    cdef int threads = effective_threads(n_threads, rows * D, split.items)
    cdef Py_ssize_t item, r, k, cb, chunks = split.chunks
    cdef bint whole_rows = chunks == 1
    cdef double sum_g, dot
    # Whole rows: each item's partial column sums (split rows add into the outputs); few
    # long rows: the partial row sums and the coefficients of dx. RMSNorm: zeros as centre.
    cdef Py_ssize_t n_parts = 0
    if whole_rows:
        n_parts = split.row_items * D * ((dw != NULL) + (db != NULL))
    cdef Py_ssize_t n_sums = 0 if whole_rows else 2 * rows * chunks
    cdef Py_ssize_t n_coefficients = 0 if whole_rows else 3 * rows
    cdef double* sums = <double*>malloc(n_sums * sizeof(double)
                                        + (n_coefficients + rows + n_parts) * sizeof(floating))
    if sums == NULL:
        return -1
    cdef floating* a = <floating*>(sums + n_sums)
    cdef floating* b = a + rows
    cdef floating* c = a + 2 * rows
    cdef floating* zeros = a + n_coefficients
    cdef floating* dw_part = zeros + rows if whole_rows and dw != NULL else NULL
    cdef floating* db_part = NULL
    if whole_rows and db != NULL:
        db_part = zeros + rows + (n_parts // 2 if dw != NULL else 0)
    # No partial sums to fold: no block (the loops below then do nothing).
    cdef Py_ssize_t fold_blocks = ((D + FOLD_COLUMNS - 1) // FOLD_COLUMNS
                                   if dw_part != NULL or db_part != NULL else 0)
    if mean == NULL:
        memset(zeros, 0, rows * sizeof(floating))
        mean = zeros
    if whole_rows:
        if threads == 1:
            for item in range(split.items):
                backward_rows(dy, x, w, dx, dw_part + item * D if dw_part != NULL else NULL,
                              db_part + item * D if db_part != NULL else NULL, D,
                              part_start(item, rows, split.items),
                              part_start(item + 1, rows, split.items), mean, rstd, centred)
            for cb in range(fold_blocks):
                fold_block(dw_part, db_part, split.row_items, D, cb, dw, db)
        else:
            # One OpenMP region (one wake-up of the threads), the fold after a barrier.
            with parallel(num_threads=threads):
                for item in prange(split.items, schedule="static"):
                    backward_rows(dy, x, w, dx,
                                  dw_part + item * D if dw_part != NULL else NULL,
                                  db_part + item * D if db_part != NULL else NULL, D,
                                  part_start(item, rows, split.items),
                                  part_start(item + 1, rows, split.items), mean, rstd, centred)
                omp_barrier()
                for cb in prange(fold_blocks, schedule="static"):
                    fold_block(dw_part, db_part, split.row_items, D, cb, dw, db)
        free(sums)
        return 0
    # Each chunk of columns is one item of the second pass: it owns those columns of
    # grad_weight / grad_bias and adds every row's terms into them, in row order.
    cdef double* part_b = sums + rows * chunks
    if dx != NULL:
        if threads == 1:  # the same items in a plain loop: no OpenMP region
            for item in range(split.items):
                chunk_sums(x, dy, w, D, chunks, item, mean, sums, part_b)
        else:
            for item in prange(split.items, nogil=True, num_threads=threads, schedule="static"):
                chunk_sums(x, dy, w, D, chunks, item, mean, sums, part_b)
    for r in range(rows):
        a[r] = b[r] = c[r] = 0.0
        if dx == NULL:
            continue
        add_chunks(sums, part_b, r, chunks, &sum_g, &dot)
        if floating is float:
            fastbn_ln_grad_coefficients_float(sum_g, dot, D, centred, rstd[r], a + r, b + r,
                                              c + r)
        else:
            fastbn_ln_grad_coefficients_double(sum_g, dot, D, centred, rstd[r], a + r, b + r,
                                               c + r)
    if threads == 1:
        for k in range(chunks):
            grad_columns(dy, x, w, dx, dw, db, mean, rstd, a, b, c, rows, D, chunks, k)
    else:
        for k in prange(chunks, nogil=True, num_threads=threads, schedule="static"):
            grad_columns(dy, x, w, dx, dw, db, mean, rstd, a, b, c, rows, D, chunks, k)
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
            status = forward(<const float*>xp, <const float*>wp, <const float*>bp,
                             <float*>yp, <float*>mp, <float*>rp, rows, D, eps, centred,
                             n_threads)
        else:
            status = forward(<const double*>xp, <const double*>wp, <const double*>bp,
                             <double*>yp, <double*>mp, <double*>rp, rows, D, eps, centred,
                             n_threads)
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
            status = backward(<const float*>dyp, <const float*>xp, <const float*>mp,
                              <const float*>rp, <const float*>wp, <float*>dxp, <float*>dwp,
                              <float*>dbp, rows, D, centred, n_threads)
        else:
            status = backward(<const double*>dyp, <const double*>xp, <const double*>mp,
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
