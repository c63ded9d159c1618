"""LayerNorm and RMSNorm forward and backward kernels (Numba).

The design of the Cython kernels (see fastbn/_cython/_layer_norm.pyx), with the
same constants: rows of the (rows, D) view are normalized independently;
RMSNorm is LayerNorm without centring and without bias, told apart by a
`centred` flag. Work items depend on (rows, D) only and every sum is added in a
fixed order, so the result is the same to the bit for any thread count:

  whole rows: items are blocks of rows; an item runs every phase on its rows and,
      in the backward, writes its own partial column sums of grad_weight /
      grad_bias, added in item order afterwards (the FOLD pass);
  few long rows (rows < FEW_ROWS, D > CHUNK_ELEMENTS): (row, chunk) items write
      partial row sums, added in chunk order; the backward's second pass is split
      by column chunk, each item owning its columns of the parameter gradients.

Row sums are those of _sums.py (blocks in the input's precision, added in float64;
a row or chunk whose float32 sums lost precision is summed again in float64). Unlike
the Cython kernels, the backward adds each row's column terms on its own (not 4 rows
at a time), so the two backends' parameter gradients may differ in the last bits.
The statistics are shifted by a pivot near the row mean, the mean
of the row's first values, for accuracy on data with a large mean.

A missing weight or bias costs nothing: the kernels take length-0 arrays for them
and run loops without that term; no array of the data's size is made. An output may
be its input itself (out=x, grad_x=grad_out): each row's sums are taken before the
row is written, and each value is read before it is written.

As for BatchNorm (_passes.py on compile time): every pass is one function over a
range of work items (`_pass_items`, the kind is an argument), run directly on one
thread and through a single `prange` on more, from one entry point for both
directions, compiled for a dtype on its first call.
"""
import numpy as np
from numba import njit, types

from fastbn._numba._runtime import (HELPER_OPTIONS, INLINE_OPTIONS, per_dtype, run_items,
                                    run_kernel, writeable)
from fastbn._numba._sums import exact_sums, grad_sums, kept_precision, shifted_sums

# The same constants as the Cython kernels.
FEW_ROWS = 64
CHUNK_ELEMENTS = 4096
ITEM_ELEMENTS = 16384
ITEM_MULTIPLE = 8
MIN_ROWS_PER_ITEM = 8
MAX_ROWS_PER_ITEM = 64
MIN_ELEMENTS_PER_THREAD = 16384
PIVOT_SAMPLE = 16
FOLD_COLUMNS = 256

# The kinds of pass.
ROWS, FOLD, CHUNK_SUMS, CHUNK_OUTPUT, COLUMNS, NO_PASS = 0, 1, 2, 3, 4, 5


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


# ---------------------------------------------------------------------------
# Loops over one run [c0, c1) of a row. A weight or bias is an array or, when the
# kernel got none, a length-0 array: the loops branch on that outside the loop.

@njit(**INLINE_OPTIONS)
def _row_pivot(x, centred):
    """The mean of the row's first values (0 for RMSNorm, and where not finite: an inf
    pivot would turn a row's inf mean into nan)."""
    zero = x.dtype.type(0)
    if not centred:
        return zero
    count = min(x.size, PIVOT_SAMPLE)
    total = 0.0
    for i in range(count):
        total += x[i]
    total /= count
    return x.dtype.type(total) if np.isfinite(total) else zero


@njit(**HELPER_OPTIONS)
def _normalize_run(x, y, r, c0, c1, pivot, scale, offset, weight, bias):
    """y = ((x - pivot) * scale + offset) * w + b on row r, columns [c0, c1), in x's type."""
    x_run, y_run = x[r, c0:c1], y[r, c0:c1]
    cast = x.dtype.type
    pivot, scale, offset = cast(pivot), cast(scale), cast(offset)
    if weight.size > 0:
        w = weight[c0:c1]
        if bias.size > 0:
            b = bias[c0:c1]
            for j in range(x_run.size):
                y_run[j] = ((x_run[j] - pivot) * scale + offset) * w[j] + b[j]
        else:
            for j in range(x_run.size):
                y_run[j] = ((x_run[j] - pivot) * scale + offset) * w[j]
    else:
        for j in range(x_run.size):
            y_run[j] = (x_run[j] - pivot) * scale + offset
        if bias.size > 0:
            b = bias[c0:c1]
            for j in range(x_run.size):
                y_run[j] += b[j]


@njit(**HELPER_OPTIONS)
def _moment_sums(x, r, c0, c1, pivot):
    """sum(x - pivot) and sum((x - pivot)**2) over row r, columns [c0, c1); in float64
    where the float32 blocks lost precision (_sums.kept_precision: a check per row of a
    few hundred values or more costs little)."""
    run = x[r, c0:c1]
    total, products = shifted_sums(run, pivot)
    if kept_precision(total, products, run.size):
        return total, products
    return exact_sums(run, run, pivot, np.bool_(False), x.dtype.type(1))


@njit(**HELPER_OPTIONS)
def _gradient_sums(dy, x, r, c0, c1, centre, weight):
    """sum(g) and sum(g * (x - centre)) over row r, columns [c0, c1), g = dy * w (as
    _moment_sums)."""
    dy_run, x_run = dy[r, c0:c1], x[r, c0:c1]
    if weight.size > 0:
        w = weight[c0:c1]
        total, products = grad_sums(dy_run, x_run, centre, w)
        if kept_precision(total, products, x_run.size):
            return total, products
        return exact_sums(dy_run, x_run, centre, np.bool_(True), w)
    total, products = grad_sums(dy_run, x_run, centre, x.dtype.type(1))
    if kept_precision(total, products, x_run.size):
        return total, products
    return exact_sums(dy_run, x_run, centre, np.bool_(True), x.dtype.type(1))


@njit(**HELPER_OPTIONS)
def _gradient_run(dy, x, dx, r, c0, c1, centre, rstd, a, b, c, weight, dw_part, db_part):
    """Row r, columns [c0, c1): adds the row's terms of grad_weight (dy * (x - centre) *
    rstd) and grad_bias (dy) into the partial column sums (unless they are length 0), then
    dx = dy * w * a + (x - centre) * b + c (unless dx is). One loop per output, with no
    branch inside, so that each vectorises; dx last, as it may be dy itself. In x's type."""
    dy_run, x_run = dy[r, c0:c1], x[r, c0:c1]
    cast = x.dtype.type
    centre, rstd, a, b, c = cast(centre), cast(rstd), cast(a), cast(b), cast(c)
    if dw_part.size > 0:
        for j in range(dy_run.size):
            dw_part[j] += dy_run[j] * (x_run[j] - centre) * rstd
    if db_part.size > 0:
        for j in range(dy_run.size):
            db_part[j] += dy_run[j]
    if dx.size == 0:
        return
    dx_run = dx[r, c0:c1]
    if weight.size > 0:
        w = weight[c0:c1]
        for j in range(dy_run.size):
            dx_run[j] = dy_run[j] * w[j] * a + (x_run[j] - centre) * b + c
    else:
        for j in range(dy_run.size):
            dx_run[j] = dy_run[j] * a + (x_run[j] - centre) * b + c


@njit(**INLINE_OPTIONS)
def _statistics(sum_shifted, sum_sq, D, eps, centred):
    """(shifted mean, rstd) from a row's sums around its pivot."""
    shifted_mean = sum_shifted / D if centred else 0.0
    var = sum_sq / D - shifted_mean * shifted_mean
    if var < 0.0:  # rounding only; keeps nan as nan
        var = 0.0
    return shifted_mean, 1.0 / np.sqrt(var + eps)


@njit(**INLINE_OPTIONS)
def _gradient_coefficients(sum_g, dot, rstd, D, centred):
    """(a, b, c) of dx = g * a + (x - mean) * b + c from sum(g) and sum(g * (x - mean)):
    rstd * (g - mean(g) - x_hat * mean(g * x_hat)), without mean(g) for RMSNorm."""
    return rstd, -rstd * rstd * rstd * dot / D, -rstd * sum_g / D if centred else 0.0


# ---------------------------------------------------------------------------
# The passes, over a range of work items; their arguments are one tuple type
# (_pass_arguments). Arrays: first = x (forward) or dy (backward), x, out = y or dx;
# per row: centre (the pivot, or the mean), rstd, coef_a/b/c (y's or dx's
# coefficients), sums (2 per (row, chunk)); partial column sums (items, D).

@njit(**INLINE_OPTIONS)
def _pass_arguments(kind, backward, centred, first, x, out, weight, bias, centre, rstd, coef_a,
                    coef_b, coef_c, sums, dw_part, db_part, dw, db, eps, chunks, items):
    """Flags and codes are cast: numba types a bare constant as a literal, a type of its
    own, and would compile the passes once per value."""
    return (np.int64(kind), np.bool_(backward), np.bool_(centred), first, x, out, weight, bias,
            centre, rstd, coef_a, coef_b, coef_c, sums, dw_part, db_part, dw, db, eps, chunks,
            items)


@njit(**INLINE_OPTIONS)
def _partial_row(parts, item):
    """The item's row of partial column sums, or a length-0 array where none are kept."""
    return parts[item] if parts.shape[0] > 0 else parts.reshape(0)


@njit(**HELPER_OPTIONS)
def _rows_items(args, first_item, end_item):
    """Whole rows: forward, each row's statistics (into centre = mean, rstd) and y;
    backward, each row's dx and its terms of the item's partial column sums."""
    (_, backward, centred, first, x, out, weight, bias, centre, rstd, _, _, _, _, dw_part,
     db_part, _, _, eps, _, items) = args
    rows, D = x.shape
    first_column = np.int64(0)  # not the constant 0: numba would compile the callees for it
    for item in range(first_item, end_item):
        r0 = item * rows // items
        r1 = (item + 1) * rows // items
        if backward:
            dw_row, db_row = _partial_row(dw_part, item), _partial_row(db_part, item)
            dw_row.fill(0.0)
            db_row.fill(0.0)
            for r in range(r0, r1):
                row_centre = centre[r]
                row_rstd = np.float64(rstd[r])
                a = b = c = 0.0
                if out.size > 0:
                    sum_g, dot = _gradient_sums(first, x, r, first_column, D, row_centre,
                                                 weight)
                    a, b, c = _gradient_coefficients(sum_g, dot, row_rstd, D, centred)
                _gradient_run(first, x, out, r, first_column, D, row_centre, row_rstd, a, b, c,
                              weight, dw_row, db_row)
        else:
            for r in range(r0, r1):
                pivot = _row_pivot(x[r], centred)
                sum_shifted, sum_sq = _moment_sums(x, r, first_column, D, pivot)
                shifted_mean, row_rstd = _statistics(sum_shifted, sum_sq, D, eps, centred)
                centre[r] = pivot + shifted_mean
                rstd[r] = row_rstd
                _normalize_run(x, out, r, first_column, D, pivot, row_rstd,
                               -shifted_mean * row_rstd, weight, bias)


@njit(**HELPER_OPTIONS)
def _fold_columns(parts, total_out, c0, c1):
    """total_out[c0:c1] = the sum of parts[:, c0:c1] over its rows, in row order."""
    total = np.zeros(c1 - c0)
    for k in range(parts.shape[0]):
        part = parts[k, c0:c1]
        for j in range(c1 - c0):
            total[j] += part[j]
    columns = total_out[c0:c1]
    for j in range(c1 - c0):  # a loop: a slice assignment compiles numba's shape checks (2 s)
        columns[j] = total[j]


@njit(**HELPER_OPTIONS)
def _fold_items(args, first_item, end_item):
    """The partial column sums of the whole-row items added in item order, per block of
    FOLD_COLUMNS columns, into dw and db (unless length 0)."""
    (_, _, _, _, x, _, _, _, _, _, _, _, _, _, dw_part, db_part, dw, db, _, _, _) = args
    D = x.shape[1]
    for block in range(first_item, end_item):
        c0 = block * FOLD_COLUMNS
        c1 = min(c0 + FOLD_COLUMNS, D)
        if dw.size > 0:
            _fold_columns(dw_part, dw, c0, c1)
        if db.size > 0:
            _fold_columns(db_part, db, c0, c1)


@njit(**HELPER_OPTIONS)
def _chunk_items(args, first_item, end_item):
    """(row, chunk) items: CHUNK_SUMS, the chunk's sums into sums (forward: around the
    row's pivot, in centre; backward: of g = dy * w and g * (x - mean)); CHUNK_OUTPUT,
    the chunk's y from coef_a/b/c (pivot, scale, offset)."""
    (kind, backward, _, first, x, out, weight, bias, centre, _, coef_a, coef_b, coef_c, sums,
     _, _, _, _, _, chunks, _) = args
    D = x.shape[1]
    for item in range(first_item, end_item):
        r = item // chunks
        k = item - r * chunks
        c0 = k * D // chunks
        c1 = (k + 1) * D // chunks
        if kind == CHUNK_OUTPUT:
            _normalize_run(x, out, r, c0, c1, coef_a[r], np.float64(coef_b[r]),
                           np.float64(coef_c[r]), weight, bias)
        elif backward:
            sums[2 * item], sums[2 * item + 1] = _gradient_sums(first, x, r, c0, c1, centre[r],
                                                                weight)
        else:
            sums[2 * item], sums[2 * item + 1] = _moment_sums(x, r, c0, c1, centre[r])


@njit(**HELPER_OPTIONS)
def _column_items(args, first_item, end_item):
    """Column chunks of the few-long-rows backward: each owns its columns of dw and db
    and adds every row's terms into them, in row order, and writes its columns of dx."""
    (_, _, _, first, x, out, weight, _, centre, rstd, coef_a, coef_b, coef_c, _, _, _, dw, db,
     _, chunks, _) = args
    rows, D = x.shape
    for k in range(first_item, end_item):
        c0 = k * D // chunks
        c1 = (k + 1) * D // chunks
        dw_columns = dw[c0:c1] if dw.size > 0 else dw
        db_columns = db[c0:c1] if db.size > 0 else db
        dw_columns.fill(0.0)
        db_columns.fill(0.0)
        for r in range(rows):
            _gradient_run(first, x, out, r, c0, c1, centre[r], np.float64(rstd[r]),
                          np.float64(coef_a[r]), np.float64(coef_b[r]), np.float64(coef_c[r]),
                          weight, dw_columns, db_columns)


@njit(**HELPER_OPTIONS)
def _pass_items(args, first_item, end_item):
    """The pass args[0] over the work items [first_item, end_item)."""
    kind = args[0]
    if kind == ROWS:
        _rows_items(args, first_item, end_item)
    elif kind == FOLD:
        _fold_items(args, first_item, end_item)
    elif kind == COLUMNS:
        _column_items(args, first_item, end_item)
    else:
        _chunk_items(args, first_item, end_item)


@njit(**HELPER_OPTIONS)
def _add_chunks(sums, r, chunks):
    first = sums[2 * r * chunks]
    second = sums[2 * r * chunks + 1]
    for k in range(1, chunks):
        first += sums[2 * (r * chunks + k)]
        second += sums[2 * (r * chunks + k) + 1]
    return first, second


@njit(**HELPER_OPTIONS)
def _step(step, backward, centred, first, x, out, weight, bias, eps, mean, rstd, dw, db,
          coefficients, sums, dw_part, db_part, chunks, items):
    """(the arguments of the pass `step` of a direction, its work items):
      whole rows:    forward ROWS;                     backward ROWS, FOLD;
      few long rows: forward CHUNK_SUMS, CHUNK_OUTPUT; backward CHUNK_SUMS (for dx), COLUMNS.
    The per-row work between a direction's passes is done here."""
    rows, D = x.shape
    coef_a, coef_b, coef_c = coefficients[0], coefficients[1], coefficients[2]
    kind = NO_PASS
    count = 0
    if chunks == 1:
        if step == 0:
            kind, count = ROWS, items
        elif backward and (dw.size > 0 or db.size > 0):
            kind, count = FOLD, -(-D // FOLD_COLUMNS)
    elif not backward:
        if step == 0:
            for r in range(rows):
                mean[r] = _row_pivot(x[r], centred)  # the pivot, until the statistics
            kind, count = CHUNK_SUMS, items
        else:
            for r in range(rows):
                sum_shifted, sum_sq = _add_chunks(sums, r, chunks)
                shifted_mean, row_rstd = _statistics(sum_shifted, sum_sq, D, eps, centred)
                coef_a[r] = mean[r]
                coef_b[r] = row_rstd
                coef_c[r] = -shifted_mean * row_rstd
                mean[r] = np.float64(mean[r]) + shifted_mean
                rstd[r] = row_rstd
            kind, count = CHUNK_OUTPUT, items
    elif step == 0:
        if out.size > 0:
            kind, count = CHUNK_SUMS, items
    else:
        for r in range(rows):
            a = b = c = 0.0
            if out.size > 0:
                sum_g, dot = _add_chunks(sums, r, chunks)
                a, b, c = _gradient_coefficients(sum_g, dot, np.float64(rstd[r]), D, centred)
            coef_a[r], coef_b[r], coef_c[r] = a, b, c
        kind, count = COLUMNS, chunks
    return _pass_arguments(kind, backward, centred, first, x, out, weight, bias, mean, rstd,
                           coef_a, coef_b, coef_c, sums, dw_part, db_part, dw, db, eps, chunks,
                           items), count


# ---------------------------------------------------------------------------
# The compiled entry point, one for both directions (see _passes.py on compile time).
# Inputs are typed read-only so that read-only arrays are accepted; a length-0 array
# stands for None. `tasks` is the thread count (1: no parallel region).

def _signature(dtype):
    def array(ndim, readonly=False):
        return types.Array(dtype, ndim, "C", readonly=readonly)
    return types.void(types.boolean, types.boolean, array(2, True), array(2, True),
                      array(1, True), array(1, True), types.float64, array(2), array(1),
                      array(1), array(1), array(1), types.int64, types.int64, types.int64,
                      types.int64)


@per_dtype(_signature)
def _kernel(backward, centred, first, x, weight, bias, eps, out, mean, rstd, dw, db, chunks,
            row_items, items, tasks):
    """forward (first = x, out = y; writes mean and rstd) or backward (first = grad_out,
    out = grad_x, dw, db: each length 0 where not wanted; reads mean and rstd).
    RMSNorm: not centred, and mean is scratch (forward) or zeros (backward)."""
    rows, D = x.shape
    coefficients = np.empty((3, rows if chunks > 1 else 0), x.dtype)
    sums = np.empty(2 * rows * chunks if chunks > 1 else 0)
    # The whole-row backward's partial column sums, one row per item.
    partials = row_items if backward and chunks == 1 else 0
    dw_part = np.empty((partials if dw.size > 0 else 0, D), x.dtype)
    db_part = np.empty((partials if db.size > 0 else 0, D), x.dtype)
    # Both passes through one `prange` (run_items), in a loop: see _passes.py.
    for step in range(2):
        args, count = _step(step, backward, centred, first, x, out, weight, bias, eps, mean,
                            rstd, dw, db, coefficients, sums, dw_part, db_part, chunks, items)
        if args[0] != NO_PASS:
            run_items(_pass_items, args, count, tasks)


# ---------------------------------------------------------------------------
# The backend's kernel functions (calling convention: fastbn/_numpy/__init__.py).

# Length-0 stand-ins for None, per dtype: (vector, matrix).
_ABSENT = {np.dtype(t): (np.empty(0, t), np.empty((0, 0), t)) for t in (np.float32, np.float64)}


def _run(backward, centred, first, x, weight, bias, eps, out, mean, rstd, dw, db, n_threads):
    rows, D = x.shape
    if (backward and out is not None and (dw is not None or db is not None)
            and (np.may_share_memory(out, first) or np.may_share_memory(out, x))):
        # grad_x is exactly grad_out or x (fastbn/_rowwise.py lets no partial overlap
        # through), but the backward pass writes dx before it reads dy and x for
        # grad_weight and grad_bias: compute it apart (without them, in place).
        written = np.empty_like(out)
        _run(backward, centred, first, x, weight, bias, eps, written, mean, rstd, dw, db,
             n_threads)
        out[...] = written
        return
    chunks, row_items, items = _split(rows, D)
    absent_vector, absent_matrix = _ABSENT[x.dtype]
    run_kernel(_kernel[x.dtype], _threads(n_threads, rows * D, items), backward, centred,
               first, x, absent_vector if weight is None else weight,
               absent_vector if bias is None else bias, eps,
               absent_matrix if out is None else out, mean, rstd,
               absent_vector if dw is None else dw, absent_vector if db is None else db,
               chunks, row_items, items)


def layer_norm_forward(x, weight, bias, eps, y, mean, rstd, n_threads):
    _run(False, True, x, x, weight, bias, eps, y, mean, rstd, None, None, n_threads)


def layer_norm_backward(grad_out, x, mean, rstd, weight, grad_x, grad_weight, grad_bias,
                        n_threads):
    _run(True, True, grad_out, x, weight, None, 0.0, grad_x, writeable(mean), writeable(rstd),
         grad_weight, grad_bias, n_threads)


def rms_norm_forward(x, weight, eps, y, rstd, n_threads):
    _run(False, False, x, x, weight, None, eps, y, np.empty_like(rstd), rstd, None, None,
         n_threads)


def rms_norm_backward(grad_out, x, rstd, weight, grad_x, grad_weight, n_threads):
    _run(True, False, grad_out, x, weight, None, 0.0, grad_x, np.zeros_like(rstd),
         writeable(rstd), grad_weight, None, n_threads)
