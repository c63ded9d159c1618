"""LayerNorm and RMSNorm forward and backward kernels (Numba).

The design of the Cython kernels (see fastbn/_cython/_layer_norm.pyx), with the
same constants: rows of the (rows, D) view are normalized independently;
RMSNorm is LayerNorm without centring and without bias, told apart by a
`centred` flag. Work items depend on (rows, D) only and every sum is added in a
fixed order, so the result is the same to the bit for any thread count:

  whole rows: items are blocks of rows (the `prange` of the drivers); an item
      runs every phase on its rows and, in the backward, writes its own partial
      column sums of grad_weight / grad_bias, added in item order afterwards;
  few long rows (rows < FEW_ROWS, D > CHUNK_ELEMENTS): (row, chunk) items write
      partial row sums, added in chunk order; the backward's second pass is
      split by column chunk, each item owning its columns of the parameter
      gradients.

Row sums are summed in the input's precision over blocks of SUM_BLOCK values
(fast-math reassociation lets LLVM vectorise them), then added into float64.
Unlike the Cython kernels, the backward adds each row's column terms on its
own (not 4 rows at a time), so the two backends' parameter gradients may differ
in the last bits.
The statistics are shifted by a pivot near the row mean, the mean of the row's
first values, for accuracy on data with a large mean.
"""
import numpy as np
from numba import njit, prange, types

from fastbn._numba._runtime import JIT_OPTIONS, numba_threads

# The same constants as the Cython kernels.
FEW_ROWS = 64
CHUNK_ELEMENTS = 4096
ITEM_ELEMENTS = 16384
ITEM_MULTIPLE = 8
MIN_ROWS_PER_ITEM = 8
MAX_ROWS_PER_ITEM = 64
MIN_ELEMENTS_PER_THREAD = 16384
SUM_BLOCK = 512
PIVOT_SAMPLE = 16
FOLD_COLUMNS = 256


def _split(rows, D):
    """(chunks per row, row items, items): the fixed work decomposition."""
    if rows < FEW_ROWS and D > CHUNK_ELEMENTS:
        chunks = -(-D // CHUNK_ELEMENTS)
        return chunks, 1, rows * chunks
    items = -(-rows * D // ITEM_ELEMENTS)
    items = -(-items // ITEM_MULTIPLE) * ITEM_MULTIPLE
    items = max(min(items, rows // MIN_ROWS_PER_ITEM), -(-rows // MAX_ROWS_PER_ITEM), 1)
    return 1, items, items


def _threads(n_threads, n_elements, items):
    return max(1, min(n_threads, n_elements // MIN_ELEMENTS_PER_THREAD, items))


def _signatures(make):
    """One signature per float type: make(array type maker, scalar type)."""
    def maker(dtype):
        def array(ndim, readonly=False):
            return types.Array(dtype, ndim, "C", readonly=readonly)
        return make(array, dtype)
    return [maker(types.float32), maker(types.float64)]


_i = types.intp
_f64 = types.float64
_flag = types.boolean


# ---------------------------------------------------------------------------
# Loops over one run of a row. They take 1-D slices and count from 0: with an
# index LLVM cannot prove non-negative, numba's wraparound check stops the
# vectoriser.

def _make_paired_sums(gradient):
    """sum(g) and sum(g * (x - centre)) in float64, where g = dy * w when `gradient`,
    else g = x - centre (the shifted sum and sum of squares of the statistics).

    `gradient` is a compile-time constant of each variant: a branch in the loop
    would stop LLVM from vectorising it."""
    @njit(_signatures(lambda a, t: types.UniTuple(_f64, 2)(a(1, True), a(1, True), a(1, True),
                                                            t)), **JIT_OPTIONS)
    def paired_sums(x, dy, w, centre):
        first = 0.0
        second = 0.0
        zero = x.dtype.type(0)
        for start in range(0, x.shape[0], SUM_BLOCK):
            # Slices counted from 0: see the note above _make_paired_sums.
            x_block = x[start:start + SUM_BLOCK]
            dy_block = dy[start:start + SUM_BLOCK]
            w_block = w[start:start + SUM_BLOCK]
            block_first = zero
            block_second = zero
            for i in range(x_block.shape[0]):
                d = x_block[i] - centre
                g = dy_block[i] * w_block[i] if gradient else d
                block_first += g
                block_second += g * d
            first += block_first
            second += block_second
        return first, second
    return paired_sums


_moment_sums = _make_paired_sums(False)
_grad_sums = _make_paired_sums(True)


@njit(_signatures(lambda a, t: types.void(a(1, True), a(1, True), a(1, True), a(1), t, t, t)),
      **JIT_OPTIONS)
def _normalize_run(x, w, b, y, pivot, scale, offset):
    for i in range(x.shape[0]):
        y[i] = ((x[i] - pivot) * scale + offset) * w[i] + b[i]


@njit(_signatures(lambda a, t: types.void(a(1, True), a(1, True), a(1, True), a(1), a(1), a(1),
                                          t, t, t, t, t, _flag, _flag, _flag)),
      **JIT_OPTIONS)
def _grad_run(dy, x, w, dx, dw_part, db_part, centre, rstd, a, b, c, want_dx, want_dw,
              want_db):
    """dx = dy * w * a + (x - centre) * b + c; adds the row's terms of grad_weight
    (dy * (x - centre) * rstd) and grad_bias (dy) into the partial column sums.
    One loop per output, with no branch inside, so that each vectorises."""
    n = x.shape[0]
    if want_dx:
        for i in range(n):
            dx[i] = dy[i] * w[i] * a + (x[i] - centre) * b + c
    if want_dw:
        for i in range(n):
            dw_part[i] += dy[i] * (x[i] - centre) * rstd
    if want_db:
        for i in range(n):
            db_part[i] += dy[i]


# ---------------------------------------------------------------------------
# Per-row scalars. sums[2 * (r * chunks + k)] and the next value hold chunk k of row r.

@njit(_signatures(lambda a, t: t(a(2, True), _i, _flag)), **JIT_OPTIONS)
def _row_pivot(x, r, centred):
    """The mean of the row's first values (0 for RMSNorm, and where not finite: an inf
    pivot would turn a row's inf mean into nan)."""
    zero = x.dtype.type(0)
    if not centred:
        return zero
    count = min(x.shape[1], PIVOT_SAMPLE)
    total = 0.0
    for i in range(count):
        total += x[r, i]
    total /= count
    return x.dtype.type(total) if np.isfinite(total) else zero


@njit(types.UniTuple(_f64, 2)(types.Array(_f64, 1, "C", readonly=True), _i, _i), **JIT_OPTIONS)
def _add_chunks(sums, r, chunks):
    first = sums[2 * r * chunks]
    second = sums[2 * r * chunks + 1]
    for k in range(1, chunks):
        first += sums[2 * (r * chunks + k)]
        second += sums[2 * (r * chunks + k) + 1]
    return first, second


@njit(_signatures(lambda a, t: types.void(types.Array(_f64, 1, "C", readonly=True), _i,
                                          a(1, True), _i, _i, _i, _f64, _flag, a(1), a(1), a(1),
                                          a(1))), **JIT_OPTIONS)
def _row_statistics(sums, chunks, pivot, D, r0, r1, eps, centred, mean, rstd, scale, offset):
    """mean, rstd, and y's coefficients: y = ((x - pivot) * scale + offset) * w + b."""
    for r in range(r0, r1):
        sum_shifted, sum_sq = _add_chunks(sums, r, chunks)
        shifted_mean = sum_shifted / D if centred else 0.0
        var = sum_sq / D - shifted_mean * shifted_mean
        if var < 0.0:  # rounding only; keeps nan as nan
            var = 0.0
        row_rstd = 1.0 / np.sqrt(var + eps)
        mean[r] = pivot[r] + shifted_mean
        rstd[r] = row_rstd
        scale[r] = row_rstd
        offset[r] = -shifted_mean * row_rstd


@njit(_signatures(lambda a, t: types.void(types.Array(_f64, 1, "C", readonly=True), _i,
                                          a(1, True), _i, _i, _i, _flag, a(1), a(1), a(1))),
      **JIT_OPTIONS)
def _grad_coefficients(sums, chunks, rstd, D, r0, r1, centred, a, b, c):
    """dx = g * a + (x - mean) * b + c, g = dy * w, from sum(g) and sum(g * (x - mean)):
    rstd * (g - mean(g) - x_hat * mean(g * x_hat)), without mean(g) for RMSNorm."""
    for r in range(r0, r1):
        sum_g, dot = _add_chunks(sums, r, chunks)
        row_rstd = np.float64(rstd[r])
        a[r] = row_rstd
        b[r] = -row_rstd * row_rstd * row_rstd * dot / D
        c[r] = -row_rstd * sum_g / D if centred else 0.0


# ---------------------------------------------------------------------------
# Drivers: `parallel=True` only here; each prange item is one fixed work item.

@njit(_signatures(lambda a, t: types.void(a(2, True), a(1, True), a(1, True), _f64, _flag, _i,
                                          _i, a(2), a(1), a(1))),
      parallel=True, **JIT_OPTIONS)
def _forward(x, w, b, eps, centred, chunks, items, y, mean, rstd):
    rows, D = x.shape
    sums = np.empty(2 * rows * chunks)
    pivot = np.empty(rows, x.dtype)
    scale = np.empty(rows, x.dtype)
    offset = np.empty(rows, x.dtype)
    if chunks == 1:
        for item in prange(items):
            r0 = item * rows // items
            r1 = (item + 1) * rows // items
            for r in range(r0, r1):
                pivot[r] = _row_pivot(x, r, centred)
                sums[2 * r], sums[2 * r + 1] = _moment_sums(x[r], x[r], w, pivot[r])
            _row_statistics(sums, 1, pivot, D, r0, r1, eps, centred, mean, rstd, scale, offset)
            for r in range(r0, r1):
                _normalize_run(x[r], w, b, y[r], pivot[r], scale[r], offset[r])
        return
    for r in range(rows):
        pivot[r] = _row_pivot(x, r, centred)
    for item in prange(items):
        r = item // chunks
        k = item - r * chunks
        c0 = k * D // chunks
        c1 = (k + 1) * D // chunks
        sums[2 * item], sums[2 * item + 1] = _moment_sums(x[r, c0:c1], x[r, c0:c1], w[c0:c1],
                                                          pivot[r])
    _row_statistics(sums, chunks, pivot, D, 0, rows, eps, centred, mean, rstd, scale, offset)
    for item in prange(items):
        r = item // chunks
        k = item - r * chunks
        c0 = k * D // chunks
        c1 = (k + 1) * D // chunks
        _normalize_run(x[r, c0:c1], w[c0:c1], b[c0:c1], y[r, c0:c1], pivot[r], scale[r],
                       offset[r])


@njit(_signatures(lambda a, t: types.void(a(2, True), a(2, True), a(1, True), a(1, True),
                                          a(1, True), _flag, _i, _i, _i, a(2), a(1), a(1),
                                          _flag, _flag, _flag)),
      parallel=True, **JIT_OPTIONS)
def _backward(dy, x, centre, rstd, w, centred, chunks, row_items, items, dx, dw, db,
              want_dx, want_dw, want_db):
    rows, D = x.shape
    sums = np.empty(2 * rows * chunks)
    # Without dx the coefficients stay 0 and the rows only add their column sums.
    a = np.zeros(rows, x.dtype)
    b = np.zeros(rows, x.dtype)
    c = np.zeros(rows, x.dtype)
    no_row = np.empty(0, x.dtype)  # what _grad_run gets for dx when dx is not wanted
    if chunks == 1:
        dw_part = np.empty((row_items, D), x.dtype)
        db_part = np.empty((row_items, D), x.dtype)
        for item in prange(items):
            r0 = item * rows // items
            r1 = (item + 1) * rows // items
            if want_dx:
                for r in range(r0, r1):
                    sums[2 * r], sums[2 * r + 1] = _grad_sums(x[r], dy[r], w, centre[r])
                _grad_coefficients(sums, 1, rstd, D, r0, r1, centred, a, b, c)
            dw_part[item] = 0.0
            db_part[item] = 0.0
            for r in range(r0, r1):
                _grad_run(dy[r], x[r], w, dx[r] if want_dx else no_row, dw_part[item],
                          db_part[item], centre[r], rstd[r], a[r], b[r], c[r], want_dx, want_dw,
                          want_db)
        for block in prange((D + FOLD_COLUMNS - 1) // FOLD_COLUMNS):
            c0 = block * FOLD_COLUMNS
            c1 = min(c0 + FOLD_COLUMNS, D)
            total_w = np.zeros(c1 - c0)
            total_b = np.zeros(c1 - c0)
            for k in range(row_items):  # item order
                for j in range(c0, c1):
                    total_w[j - c0] += dw_part[k, j]
                    total_b[j - c0] += db_part[k, j]
            for j in range(c0, c1):
                if want_dw:
                    dw[j] = total_w[j - c0]
                if want_db:
                    db[j] = total_b[j - c0]
        return
    if want_dx:
        for item in prange(items):
            r = item // chunks
            k = item - r * chunks
            c0 = k * D // chunks
            c1 = (k + 1) * D // chunks
            sums[2 * item], sums[2 * item + 1] = _grad_sums(x[r, c0:c1], dy[r, c0:c1], w[c0:c1],
                                                            centre[r])
        _grad_coefficients(sums, chunks, rstd, D, 0, rows, centred, a, b, c)
    # Each chunk of columns is one item: it owns those columns of grad_weight /
    # grad_bias and adds every row's terms into them, in row order.
    for k in prange(chunks):
        c0 = k * D // chunks
        c1 = (k + 1) * D // chunks
        dw[c0:c1] = 0.0
        db[c0:c1] = 0.0
        for r in range(rows):
            _grad_run(dy[r, c0:c1], x[r, c0:c1], w[c0:c1],
                      dx[r, c0:c1] if want_dx else no_row, dw[c0:c1], db[c0:c1],
                      centre[r], rstd[r], a[r], b[r], c[r], want_dx, want_dw, want_db)


# ---------------------------------------------------------------------------
# Entry points, with the calling convention of fastbn/_numpy/__init__.py.

def _run_forward(x, weight, bias, eps, centred, y, mean, rstd, n_threads):
    rows, D = x.shape
    chunks, _, items = _split(rows, D)
    # Missing parameters become weight 1 / bias 0, so one loop serves every case.
    w = np.ones(D, x.dtype) if weight is None else weight
    b = np.zeros(D, x.dtype) if bias is None else bias
    with numba_threads(_threads(n_threads, rows * D, items)):
        _forward(x, w, b, eps, centred, chunks, items, y, mean, rstd)


def _run_backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias, centred,
                  n_threads):
    rows, D = x.shape
    if grad_x is not None and (np.may_share_memory(grad_x, grad_out)
                               or np.may_share_memory(grad_x, x)):
        # grad_x is exactly grad_out or x (fastbn/_rowwise.py lets no partial overlap
        # through), but _grad_run writes dx before it reads dy and x for grad_weight and
        # grad_bias: compute it apart.
        written = np.empty_like(grad_x)
        _run_backward(grad_out, x, mean, rstd, weight, written, grad_weight, grad_bias,
                      centred, n_threads)
        grad_x[...] = written
        return
    chunks, row_items, items = _split(rows, D)
    w = np.ones(D, x.dtype) if weight is None else weight
    centre = np.zeros(rows, x.dtype) if mean is None else mean
    # Outputs not wanted are written to scratch arrays the kernel is told to skip.
    no_rows = np.empty((0, D), x.dtype)
    no_columns = np.empty(D, x.dtype)
    with numba_threads(_threads(n_threads, rows * D, items)):
        _backward(grad_out, x, centre, rstd, w, centred, chunks, row_items, items,
                  no_rows if grad_x is None else grad_x,
                  no_columns if grad_weight is None else grad_weight,
                  no_columns if grad_bias is None else grad_bias,
                  grad_x is not None, grad_weight is not None, grad_bias is not None)


def layer_norm_forward(x, weight, bias, eps, y, mean, rstd, n_threads):
    _run_forward(x, weight, bias, eps, True, y, mean, rstd, n_threads)


def layer_norm_backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias,
                        n_threads):
    _run_backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias, True,
                  n_threads)


def rms_norm_forward(x, weight, eps, y, rstd, n_threads):
    _run_forward(x, weight, None, eps, False, y, np.empty_like(rstd), rstd, n_threads)


def rms_norm_backward(grad_out, x, rstd, weight, grad_x, grad_weight, n_threads):
    _run_backward(grad_out, x, None, rstd, weight, grad_x, grad_weight, None, False, n_threads)
