"""GroupNorm forward and backward kernels (Cython + OpenMP); instance norm uses them too.

The caller (fastbn/group_norm.py) has validated every argument and hands over
3-D C-contiguous views: (N, C, S) for channels-first memory, (N, S, C) for
channels-last memory (and for 2-D input, where S = 1). Group g of sample n is
channels g * D ... (g + 1) * D - 1, D = C / G; group k = n * G + g.

The loops over memory are BatchNorm's (_batch_norm_loops.h through
_batch_norm_loops.pxd, on _simd.h's vectors: one copy per instruction set, the
module's INSTRUCTION_SET picked at import): sums of a block of rows or columns,
and elementwise passes with per-row or per-column coefficients, which here are
per (sample, channel). Four fixed work splits, chosen from the shape alone (never
from the thread count), so the result is the same to the bit for any number of
threads:

- Group blocks (channels-first, at least MIN_GROUP_ITEMS groups of at most
  MAX_GROUP_ELEMENTS values): an item is a block of consecutive groups (a
  contiguous piece of memory, about ITEM_ELEMENTS values, whole groups). It
  computes their statistics and then normalizes them while they are still in
  cache (backward: per-channel sums, then grad_x), so x comes from memory once
  instead of twice, and many small groups (instance norm) cost one call each
  of the loops, not one per group.
- Sample blocks (channels-last, when S x BLOCK_CHANNELS values fit the same
  bound): an item is the S rows of one sample (of a few, for small samples) on a
  block of whole groups' channels; the same fusion.
- Chunks (channels-first otherwise: few or huge groups): per-(n, c) partial sums
  over fixed pieces (whole rows of S values, or fixed chunks of long rows), then
  an elementwise pass over the same pieces.
- Tiles (channels-last otherwise): per-channel partial sums over tiles of rows of
  one sample x a block of channels, then an elementwise pass over the same tiles.
In the last two, N = 1 with few groups still gives every thread work, and the
partials are added in a fixed order between the passes.

Statistics are float64 sums (summed in the input's type over short blocks first;
see _batch_norm_loops.h) of values shifted by a per-group pivot (the group's first
value), which keeps the one-pass sum / sum-of-squares accurate on data with a
large mean; y = (x - pivot) * scale + offset keeps that accuracy in the output.

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
from libc.stdlib cimport malloc, free
from fastbn._cython._openmp_helpers cimport effective_threads
from fastbn._cython._arrays cimport data
from fastbn._cython._simd cimport select_instruction_set
from fastbn._cython._batch_norm_loops cimport (columns_elementwise, columns_sums,
                                               rows_elementwise, rows_sums)

cnp.import_array()

# The instruction set the loops of this module run (see _simd.h, FASTBN_SIMD).
INSTRUCTION_SET = select_instruction_set()

# Values in one chunk item and one group-block item: big enough to amortise the
# per-item overhead, small enough that N = 1 with few groups still gives every thread
# work.
cdef Py_ssize_t CHUNK_ELEMENTS = 4096
cdef Py_ssize_t ITEM_ELEMENTS = 4096
# Values in one channels-last tile, and its widest block of channels.
cdef Py_ssize_t TILE_ELEMENTS = 8192
cdef Py_ssize_t CHANNEL_BLOCK = 256
# Channels of a sample block (rounded to whole groups): 64 float32 are four cache lines
# of every row.
cdef Py_ssize_t BLOCK_CHANNELS = 64
# Fused items need enough groups to share out, and each group (sample block) small enough
# to stay in cache between its two passes (backward touches dy, x and dx: 3 x 128 KiB in
# float32).
cdef Py_ssize_t MIN_GROUP_ITEMS = 16
cdef Py_ssize_t MAX_GROUP_ELEMENTS = 32768

cdef enum Kind:
    GROUP_BLOCKS
    SAMPLE_BLOCKS
    CHUNKS
    TILES

cdef enum Phase:
    FUSED        # group and sample blocks: sums, coefficients, elementwise
    SUMS         # chunks and tiles, first pass
    ELEMENTWISE  # chunks and tiles, second pass


cdef struct Split:
    Kind kind
    Py_ssize_t items
    # group blocks: groups per item
    Py_ssize_t groups_per_item
    # chunks: `rows_per_item` rows (n, c) of S values per item, or (rows_per_item = 1)
    # each row cut into `chunks` pieces
    Py_ssize_t rows_per_item
    Py_ssize_t chunks
    # sample blocks and tiles: blocks of `width` channels; sample blocks: of
    # samples_per_item samples; tiles: per sample, row_blocks blocks of rows_per_block rows
    Py_ssize_t samples_per_item
    Py_ssize_t width
    Py_ssize_t channel_blocks
    Py_ssize_t rows_per_block
    Py_ssize_t row_blocks
    Py_ssize_t n_partials


cdef Split make_split(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                      bint channels_last) noexcept nogil:
    cdef Split split
    cdef Py_ssize_t D = C // G
    split.groups_per_item = 0
    split.rows_per_item = 0
    split.chunks = 0
    split.samples_per_item = 0
    split.width = 0
    split.channel_blocks = 0
    split.rows_per_block = 0
    split.row_blocks = 0
    split.n_partials = 0
    if not channels_last:
        if N * G >= MIN_GROUP_ITEMS and D * S <= MAX_GROUP_ELEMENTS:
            split.kind = GROUP_BLOCKS
            split.groups_per_item = max(1, ITEM_ELEMENTS // (D * S))
            split.items = (N * G + split.groups_per_item - 1) // split.groups_per_item
            return split
        split.kind = CHUNKS
        if S >= CHUNK_ELEMENTS:
            split.rows_per_item = 1
            split.chunks = (S + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
        else:
            split.rows_per_item = CHUNK_ELEMENTS // S
            split.chunks = 1
        split.items = (N * C + split.rows_per_item - 1) // split.rows_per_item * split.chunks
        split.n_partials = N * C * split.chunks
        return split
    split.width = max(1, BLOCK_CHANNELS // D) * D
    if split.width > C:
        split.width = C
    if S * split.width <= MAX_GROUP_ELEMENTS:
        split.kind = SAMPLE_BLOCKS
        # Small samples (2-D input: S = 1) several to an item.
        split.samples_per_item = max(1, ITEM_ELEMENTS // (S * split.width))
        split.channel_blocks = (C + split.width - 1) // split.width
        split.items = ((N + split.samples_per_item - 1) // split.samples_per_item
                       * split.channel_blocks)
        return split
    split.kind = TILES
    split.width = min(C, CHANNEL_BLOCK)
    split.rows_per_block = max(1, TILE_ELEMENTS // split.width)
    split.row_blocks = (S + split.rows_per_block - 1) // split.rows_per_block
    split.channel_blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    split.items = N * split.row_blocks * split.channel_blocks
    split.n_partials = N * split.row_blocks * C
    return split


# One call's state. Arrays of x's type are void* here (a struct cannot hold a fused
# type); the functions below cast them back. Per-(n, c) arrays have N * C slots,
# slot n * C + c (= k * D + j for channel j of group k); per-group ones N * G.
cdef struct Job:
    Py_ssize_t N, C, S, G, D
    Split split
    bint backward
    # forward: compute the statistics (else normalize with the given mean and rstd);
    # backward: the statistics came from x (grad_x has the terms through them)
    bint stats_from_input
    bint need_sums  # backward: the per-(n, c) sums are wanted
    double eps
    const void* weight  # NULL: 1
    const void* bias    # NULL: 0
    void* mean          # per group
    void* rstd          # per group
    double* var         # per group, or NULL: the biased variance, when computed
    # float64 work arrays: the centres of the sums (forward with group blocks: per group;
    # otherwise per (n, c)), the sums per (n, c) (forward with group blocks: per group),
    # and the partials of chunks and tiles
    double* centre
    double* sum_a
    double* sum_b
    double* part_a
    double* part_b
    # per-(n, c) coefficients of the elementwise pass, x's type
    void* shift
    void* scale
    void* scale2
    void* offset


cdef inline double group_pivot(floating value) noexcept nogil:
    # A non-finite pivot would turn an inf mean into nan; 0 keeps PyTorch's result.
    return <double>value if isfinite(<double>value) else 0.0


cdef inline void set_group(const floating* like, Job* job, Py_ssize_t k, double pivot,
                           double sum_shifted, double sum_sq) noexcept nogil:
    """Forward, group k: its statistics from its shifted sums (or the given ones), then its
    channels' coefficients, y = (x - shift) * scale + offset. `like` only picks the type."""
    cdef const floating* w = <const floating*>job.weight
    cdef const floating* b = <const floating*>job.bias
    cdef floating* mean = <floating*>job.mean
    cdef floating* rstd = <floating*>job.rstd
    cdef floating* shift = <floating*>job.shift
    cdef floating* scale = <floating*>job.scale
    cdef floating* offset = <floating*>job.offset
    cdef Py_ssize_t D = job.D, count = job.D * job.S, c0 = (k % job.G) * job.D, j
    cdef double rstd_g, var, centre_offset = 0.0, alpha
    cdef floating shift_value
    if job.stats_from_input:
        var = (sum_sq - sum_shifted * sum_shifted / count) / count
        if var < 0.0:  # rounding only; keeps nan as nan
            var = 0.0
        # As ATen's group norm: var 0 with eps 0 gives inf.
        rstd_g = 1.0 / sqrt(var + job.eps)
        centre_offset = sum_shifted / count  # mean - pivot
        mean[k] = <floating>(pivot + centre_offset)
        rstd[k] = <floating>rstd_g
        if job.var != NULL:
            job.var[k] = var
        shift_value = <floating>pivot
    else:
        shift_value = mean[k]
        rstd_g = <double>rstd[k]
    for j in range(D):
        alpha = rstd_g * (<double>w[c0 + j] if w != NULL else 1.0)
        shift[k * D + j] = shift_value
        scale[k * D + j] = <floating>alpha
        offset[k * D + j] = <floating>((<double>b[c0 + j] if b != NULL else 0.0)
                                       - centre_offset * alpha)


cdef inline void set_group_grad(const floating* like, Job* job, Py_ssize_t k) noexcept nogil:
    """Backward, group k: its channels' coefficients of grad_x from their sums,
    dx = dy * scale + (x - shift) * scale2 + offset (shift = the mean), or without the
    terms through the statistics dx = (dy - 0) * scale + 0."""
    cdef const floating* w = <const floating*>job.weight
    cdef floating* mean = <floating*>job.mean
    cdef floating* rstd = <floating*>job.rstd
    cdef floating* shift = <floating*>job.shift
    cdef floating* scale = <floating*>job.scale
    cdef floating* scale2 = <floating*>job.scale2
    cdef floating* offset = <floating*>job.offset
    cdef Py_ssize_t D = job.D, c0 = (k % job.G) * job.D, j
    cdef double rstd_g = <double>rstd[k], w_c, weighted_sum_dy = 0.0, weighted_dot = 0.0
    cdef double b = 0.0, d = 0.0
    if job.stats_from_input:
        for j in range(D):
            w_c = <double>w[c0 + j] if w != NULL else 1.0
            weighted_sum_dy += w_c * job.sum_a[k * D + j]
            weighted_dot += w_c * job.sum_b[k * D + j]
        b = -weighted_dot * rstd_g * rstd_g * rstd_g / (D * job.S)
        d = -weighted_sum_dy * rstd_g / (D * job.S)
    for j in range(D):
        shift[k * D + j] = mean[k] if job.stats_from_input else 0.0
        scale[k * D + j] = <floating>(rstd_g * (<double>w[c0 + j] if w != NULL else 1.0))
        scale2[k * D + j] = <floating>b
        offset[k * D + j] = <floating>d


cdef inline void set_groups(const floating* like, Job* job, Py_ssize_t n, Py_ssize_t g0,
                            Py_ssize_t g1) noexcept nogil:
    """Groups g0:g1 of sample n, from per-(n, c) sums: their coefficients (forward: their
    statistics first, the channels' sums added in channel order)."""
    cdef Py_ssize_t g, k, j, D = job.D
    cdef double sum_shifted, sum_sq
    for g in range(g0, g1):
        k = n * job.G + g
        if job.backward:
            set_group_grad(like, job, k)
            continue
        if job.stats_from_input:
            sum_shifted = 0.0
            sum_sq = 0.0
            for j in range(k * D, (k + 1) * D):
                sum_shifted += job.sum_a[j]
                sum_sq += job.sum_b[j]
            set_group(like, job, k, job.centre[k * D], sum_shifted, sum_sq)
        else:
            set_group(like, job, k, 0.0, 0.0, 0.0)


cdef inline bint sums_wanted(Job* job) noexcept nogil:
    return job.need_sums if job.backward else job.stats_from_input


cdef inline const floating* elementwise_second(const floating* second, Job* job) noexcept nogil:
    """What the elementwise pass reads besides first: x in a backward through the
    statistics, else nothing."""
    return second if job.backward and job.stats_from_input else NULL


# ---------------------------------------------------------------------------
# Work items. first, second, out: forward x, NULL, y; backward dy, x, dx (dx NULL
# when not wanted).

cdef void group_block(const floating* first, const floating* second, floating* out, Job* job,
                      Py_ssize_t item) noexcept nogil:
    """Groups k0:k1, a contiguous piece of the (N * C, S) rows: sums, coefficients, out."""
    cdef Py_ssize_t per_item = job.split.groups_per_item, DS = job.D * job.S, k, r
    cdef Py_ssize_t NG = job.N * job.G, NC = job.N * job.C
    cdef Py_ssize_t k0 = item * per_item, k1 = min(k0 + per_item, NG)
    cdef const floating* mean = <const floating*>job.mean
    if sums_wanted(job):
        if not job.backward:
            # One run of D * S values per group, around its pivot.
            for k in range(k0, k1):
                job.centre[k] = group_pivot(first[k * DS])
            rows_sums(first, <const floating*>NULL, DS, NG, k0, k1, 0, DS, 1, 0, job.centre,
                      job.sum_a, job.sum_b)
        else:
            # One run of S values per channel, around its group's mean.
            for k in range(k0, k1):
                for r in range(k * job.D, (k + 1) * job.D):
                    job.centre[r] = <double>mean[k]
            rows_sums(first, second, job.S, NC, k0 * job.D, k1 * job.D, 0, job.S, 1, 0,
                      job.centre, job.sum_a, job.sum_b)
    if out == NULL:
        return
    for k in range(k0, k1):
        if job.backward:
            set_group_grad(first, job, k)
        elif job.stats_from_input:
            set_group(first, job, k, job.centre[k], job.sum_a[k], job.sum_b[k])
        else:
            set_group(first, job, k, 0.0, 0.0, 0.0)
    rows_elementwise(first, elementwise_second(second, job), out, job.S, NC, k0 * job.D,
                     k1 * job.D, 0, job.S, <const floating*>job.shift,
                     <const floating*>job.scale, <const floating*>job.scale2,
                     <const floating*>job.offset)


cdef void sample_block(const floating* first, const floating* second, floating* out, Job* job,
                       Py_ssize_t item) noexcept nogil:
    """Channels-last: channels c0:c1 (whole groups) of samples n0:n1, each sample's S rows in
    turn: sums, coefficients, out."""
    cdef Py_ssize_t block = item // job.split.channel_blocks, D = job.D, C = job.C, S = job.S
    cdef Py_ssize_t n0 = block * job.split.samples_per_item
    cdef Py_ssize_t n1 = min(n0 + job.split.samples_per_item, job.N)
    cdef Py_ssize_t c0 = (item % job.split.channel_blocks) * job.split.width
    cdef Py_ssize_t c1 = min(c0 + job.split.width, C), c, g, n, base, offset
    cdef const floating* mean = <const floating*>job.mean
    cdef const floating* x2 = elementwise_second(second, job)
    cdef double centre
    for n in range(n0, n1):
        base = n * C
        offset = n * S * C
        if sums_wanted(job):
            for g in range(c0 // D, c1 // D):
                # The group's mean, or (forward) its pivot.
                centre = (<double>mean[n * job.G + g] if job.backward
                          else group_pivot(first[offset + g * D]))
                for c in range(base + g * D, base + (g + 1) * D):
                    job.centre[c] = centre
            columns_sums(first + offset, second + offset if job.backward else NULL, C, 0, S,
                         c0, c1, job.centre + base, job.sum_a + base, job.sum_b + base)
        if out == NULL:
            continue
        set_groups(first, job, n, c0 // D, c1 // D)
        columns_elementwise(first + offset, x2 + offset if x2 != NULL else NULL, out + offset,
                            C, 0, S, c0, c1, <const floating*>job.shift + base,
                            <const floating*>job.scale + base,
                            <const floating*>job.scale2 + base,
                            <const floating*>job.offset + base)


cdef void chunk(const floating* first, const floating* second, floating* out, Job* job,
                Phase phase, Py_ssize_t item) noexcept nogil:
    """Channels-first piece: rows (n * C + c) row0:row1, values start:stop of each."""
    cdef Py_ssize_t chunks = job.split.chunks, S = job.S, NC = job.N * job.C
    cdef Py_ssize_t k = item % chunks
    cdef Py_ssize_t row0 = item // chunks * job.split.rows_per_item
    cdef Py_ssize_t row1 = min(row0 + job.split.rows_per_item, NC)
    cdef Py_ssize_t start = k * S // chunks, stop = (k + 1) * S // chunks
    if phase == SUMS:
        rows_sums(first, second, S, NC, row0, row1, start, stop, chunks, k, job.centre,
                  job.part_a, job.part_b)
    else:
        rows_elementwise(first, elementwise_second(second, job), out, S, NC, row0, row1,
                         start, stop, <const floating*>job.shift,
                         <const floating*>job.scale, <const floating*>job.scale2,
                         <const floating*>job.offset)


cdef void tile(const floating* first, const floating* second, floating* out, Job* job,
               Phase phase, Py_ssize_t item) noexcept nogil:
    """Channels-last tile: rows r0:r1 of sample n's (S, C) matrix, channels c0:c1; tile
    number t = n * row_blocks + its block of rows."""
    cdef Py_ssize_t C = job.C, S = job.S
    cdef Py_ssize_t c0 = (item % job.split.channel_blocks) * CHANNEL_BLOCK
    cdef Py_ssize_t c1 = min(c0 + CHANNEL_BLOCK, C)
    cdef Py_ssize_t t = item // job.split.channel_blocks
    cdef Py_ssize_t n = t // job.split.row_blocks
    cdef Py_ssize_t r0 = t % job.split.row_blocks * job.split.rows_per_block
    cdef Py_ssize_t r1 = min(r0 + job.split.rows_per_block, S)
    cdef Py_ssize_t offset = n * S * C, base = n * C
    if phase == SUMS:
        columns_sums(first + offset, second + offset if second != NULL else NULL, C, r0, r1,
                     c0, c1, job.centre + base, job.part_a + t * C, job.part_b + t * C)
    else:
        second = elementwise_second(second, job)
        columns_elementwise(first + offset, second + offset if second != NULL else NULL,
                            out + offset, C, r0, r1, c0, c1,
                            <const floating*>job.shift + base,
                            <const floating*>job.scale + base,
                            <const floating*>job.scale2 + base,
                            <const floating*>job.offset + base)


cdef void run_item(const floating* first, const floating* second, floating* out, Job* job,
                   Phase phase, Py_ssize_t item) noexcept nogil:
    cdef Kind kind = job.split.kind
    if kind == GROUP_BLOCKS:
        group_block(first, second, out, job, item)
    elif kind == SAMPLE_BLOCKS:
        sample_block(first, second, out, job, item)
    elif kind == CHUNKS:
        chunk(first, second, out, job, phase, item)
    else:
        tile(first, second, out, job, phase, item)


cdef void run_pass(const floating* first, const floating* second, floating* out, Job* job,
                   Phase phase, int threads) noexcept nogil:
    """Every item of one phase."""
    cdef Py_ssize_t item
    if threads == 1:  # no OpenMP region: starting one costs about 0.5 us, on one thread too
        for item in range(job.split.items):
            run_item(first, second, out, job, phase, item)
        return
    for item in prange(job.split.items, nogil=True, num_threads=threads, schedule="static"):
        run_item(first, second, out, job, phase, item)


cdef void add_partials(Job* job) noexcept nogil:
    """Chunks and tiles: the per-(n, c) sums from the partials, in a fixed order."""
    cdef Py_ssize_t NC = job.N * job.C, C = job.C, chunks = job.split.chunks
    cdef Py_ssize_t r, k, n, rb, base
    for r in range(NC):
        job.sum_a[r] = 0.0
        job.sum_b[r] = 0.0
    if job.split.kind == CHUNKS:
        for r in range(NC):
            for k in range(chunks):
                job.sum_a[r] += job.part_a[r * chunks + k]
                job.sum_b[r] += job.part_b[r * chunks + k]
        return
    for n in range(job.N):
        for rb in range(job.split.row_blocks):
            base = (n * job.split.row_blocks + rb) * C
            for r in range(C):
                job.sum_a[n * C + r] += job.part_a[base + r]
                job.sum_b[n * C + r] += job.part_b[base + r]


cdef void parameter_gradients(const floating* like, Job* job, floating* dw,
                              floating* db) noexcept nogil:
    """grad_weight and grad_bias from the per-(n, c) sums, added over the batch in a fixed
    order; NULL for one not wanted."""
    cdef const floating* rstd = <const floating*>job.rstd
    cdef Py_ssize_t n, c, C = job.C
    cdef double total
    for c in range(C):
        if dw != NULL:
            total = 0.0
            for n in range(job.N):
                total += job.sum_b[n * C + c] * <double>rstd[n * job.G + c // job.D]
            dw[c] = <floating>total
        if db != NULL:
            total = 0.0
            for n in range(job.N):
                total += job.sum_a[n * C + c]
            db[c] = <floating>total


cdef int run(const floating* first, const floating* second, floating* out, floating* dw,
             floating* db, Job* job, int n_threads) noexcept nogil:
    """The whole op on `job` (its arrays set, except the work arrays): forward x, NULL, y;
    backward dy, x, dx, dw, db (NULL for the gradients not wanted). Returns -1 when the
    work arrays cannot be allocated, else 0."""
    cdef Py_ssize_t NC = job.N * job.C, n, c, k
    cdef double centre
    cdef int threads = effective_threads(n_threads, NC * job.S, job.split.items)
    cdef const floating* mean = <const floating*>job.mean
    # Every slot is written before it is read: malloc, not calloc.
    cdef double* work = <double*>malloc((3 * NC + 2 * job.split.n_partials) * sizeof(double))
    cdef floating* coef = <floating*>malloc(4 * NC * sizeof(floating))
    if work == NULL or coef == NULL:
        free(work)
        free(coef)
        return -1
    job.centre = work
    job.sum_a = work + NC
    job.sum_b = work + 2 * NC
    job.part_a = work + 3 * NC
    job.part_b = job.part_a + job.split.n_partials
    job.shift = coef
    job.scale = coef + NC
    job.scale2 = coef + 2 * NC
    job.offset = coef + 3 * NC
    if job.split.kind == GROUP_BLOCKS or job.split.kind == SAMPLE_BLOCKS:
        run_pass(first, second, out, job, FUSED, threads)
    else:
        if sums_wanted(job):
            for k in range(job.N * job.G):
                # The group's mean, or (forward) its pivot: its first value in memory.
                if job.backward:
                    centre = <double>mean[k]
                elif job.split.kind == TILES:
                    centre = group_pivot(first[k // job.G * job.S * job.C + k % job.G * job.D])
                else:
                    centre = group_pivot(first[k * job.D * job.S])
                for c in range(k * job.D, (k + 1) * job.D):
                    job.centre[c] = centre
            run_pass(first, second, out, job, SUMS, threads)
            add_partials(job)
        if out != NULL:
            for n in range(job.N):
                set_groups(first, job, n, 0, job.G)
            run_pass(first, second, out, job, ELEMENTWISE, threads)
    if job.backward:
        parameter_gradients(first, job, dw, db)
    free(work)
    free(coef)
    return 0


# ---------------------------------------------------------------------------
# Python entry points. The caller (fastbn/group_norm.py) has checked every
# argument: one float dtype, C-contiguous arrays, 3-D views of x / y. Raw data
# pointers keep the per-call cost low (no buffer acquisition per argument).

cdef Job make_job(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, bint channels_last,
                  bint backward, bint stats_from_input, double eps, void* weight, void* bias,
                  void* mean, void* rstd, double* var) noexcept nogil:
    cdef Job job
    job.N = N
    job.C = C
    job.S = S
    job.G = G
    job.D = C // G
    job.split = make_split(N, C, S, G, channels_last)
    job.backward = backward
    job.stats_from_input = stats_from_input
    job.need_sums = False
    job.eps = eps
    job.weight = weight
    job.bias = bias
    job.mean = mean
    job.rstd = rstd
    job.var = var
    return job


def group_norm_forward(cnp.ndarray x, weight, bias, double eps, bint compute_stats,
                       cnp.ndarray y, cnp.ndarray mean, cnp.ndarray rstd, variance,
                       bint channels_last, int n_threads):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[2] if channels_last else x.shape[1]
    cdef Py_ssize_t S = x.shape[1] if channels_last else x.shape[2]
    cdef Job job = make_job(N, C, S, mean.shape[1], channels_last, False, compute_stats, eps,
                            data(weight), data(bias), data(mean), data(rstd),
                            <double*>data(variance))
    cdef void* xp = data(x)
    cdef void* yp = data(y)
    cdef int status
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = run(<const float*>xp, <const float*>NULL, <float*>yp, <float*>NULL,
                         <float*>NULL, &job, n_threads)
        else:
            status = run(<const double*>xp, <const double*>NULL, <double*>yp, <double*>NULL,
                         <double*>NULL, &job, n_threads)
    if status != 0:
        raise MemoryError()


def group_norm_backward(cnp.ndarray grad_out, cnp.ndarray x, weight, cnp.ndarray mean,
                        cnp.ndarray rstd, bint stats_from_input, grad_x, grad_weight,
                        grad_bias, bint channels_last, int n_threads):
    cdef Py_ssize_t N = x.shape[0]
    cdef Py_ssize_t C = x.shape[2] if channels_last else x.shape[1]
    cdef Py_ssize_t S = x.shape[1] if channels_last else x.shape[2]
    cdef Job job = make_job(N, C, S, mean.shape[1], channels_last, True, stats_from_input,
                            0.0, data(weight), NULL, data(mean), data(rstd), NULL)
    cdef void* dyp = data(grad_out)
    cdef void* xp = data(x)
    cdef void* dxp = data(grad_x)
    cdef void* dwp = data(grad_weight)
    cdef void* dbp = data(grad_bias)
    cdef int status
    # The per-(n, c) sums feed the parameter gradients, and grad_x through the statistics.
    job.need_sums = dwp != NULL or dbp != NULL or (dxp != NULL and stats_from_input)
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            status = run(<const float*>dyp, <const float*>xp, <float*>dxp, <float*>dwp,
                         <float*>dbp, &job, n_threads)
        else:
            status = run(<const double*>dyp, <const double*>xp, <double*>dxp, <double*>dwp,
                         <double*>dbp, &job, n_threads)
    if status != 0:
        raise MemoryError()
