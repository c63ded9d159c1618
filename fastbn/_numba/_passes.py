"""The two passes over the data that BatchNorm and GroupNorm (also InstanceNorm) share:
per-run sums, and an elementwise pass with per-run coefficients (Numba).

A 3-D kernel view (N, C, S), or (N, S, C) channels-last, is seen as a matrix of runs:
(N * C, S), one row per (n, c), or (N * S, C), one row per position. Coefficients (the
sums' centres, the elementwise pass's factors) are per channel (BatchNorm: arrays of
length C) or per (sample, channel) (GroupNorm: length N * C, `per_sample`). Work is cut
into fixed items that depend on the shape only (as in the Cython kernels):
  channels-first: a block of whole rows, or one chunk of a long row (S > CHUNK_ELEMENTS);
  channels-last:  a block of rows (within one sample when per_sample) x a block of
                  CHANNEL_BLOCK channels.
Each item writes its sums to its own slots of the partials (`partial_slots`): the op
adds them in a fixed order, so every result is the same to the bit for any thread
count. Channels-first runs are summed by _sums.py (blocks in x's type, then float64),
channels-last tiles in float64 per column. Fast-math "reassoc" lets LLVM split a sum
over several vector accumulators; the order of the additions is fixed when the code is
compiled, so it does not depend on the thread count either.

BatchNorm's fused activation (fastbn/_activations.py) is a run-time code: the forward
applies it to each item's output right after the affine loop, while the item is in
cache; the backward recomputes z = (x - mean) * za + zb for an item into a buffer, turns
it into g = dy * act'(z), and both passes read g where they read dy without activation.

Compile time: numba compiles each `prange` loop as a function of its own, wrapped
twice, and every function a caller links is optimised and turned into machine code
again in each caller: about half a second per `prange` and per caller of the passes'
code. So both passes run through one function (`pass_items`, the kind is an argument),
each op has a single entry point for both directions with a single `prange`
(_runtime.run_items), which runs `pass_items` on one task without a parallel region,
and the fused activation is compiled into a second `pass_items` only for the ops that
ask for it.
"""
import numpy as np
from numba import njit

from fastbn._numba import _activations
from fastbn._numba._runtime import HELPER_OPTIONS, INLINE_OPTIONS
from fastbn._numba._sums import element, exact_sums, grad_sums, shifted_sums

# Values in one work item: big enough to amortise the per-item overhead, small
# enough that N = 1 with few channels still gives every thread work.
CHUNK_ELEMENTS = 4096
# Channels in one channels-last column block.
CHANNEL_BLOCK = 256
# Below this many values per thread, extra threads cost more than they bring.
# An item holds at most CHUNK_ELEMENTS values, so there are always more items
# than the threads this allows.
MIN_ELEMENTS_PER_THREAD = 16384

# The kinds of pass (the first of a pass's arguments).
REDUCE, ELEMENTWISE, NO_PASS = 0, 1, 2

# The rows of the coefficient matrix (one column per channel, or per (sample, channel)):
# the shift (the sums' centre, the elementwise pass's x - SHIFT), SCALE, OFFSET, SCALE2
# of the elementwise formulas, and the fused activation's z = (x - SHIFT) * ZA + ZB.
SHIFT, SCALE, OFFSET, SCALE2, ZA, ZB = range(6)
COEFFICIENT_ROWS = 6

# Where each of a pass's arguments is in their tuple (pass_arguments): the kind; the
# tensors' run matrices (first: x or dy, second: x, out: y or dx; made once per pass, as
# a reshape costs a call); the coefficient matrix; the float64 partials (2, slots);
# BatchNorm's activation code and slope; FLAG: gradient sums (REDUCE) or the backward
# formula (ELEMENTWISE); the layout, the work split and the tensors' N, C, S (a tuple
# inside would not pass through a prange). Few arrays, and each function takes only
# those it uses: every array taken from the tuple costs two atomic reference-count
# updates, which showed in the time of a call on small inputs.
(KIND, FIRST, SECOND, OUT, COEFFICIENTS, PARTIALS, ACT, SLOPE, FLAG, CHANNELS_LAST, PER_SAMPLE,
 CHUNKS, ROWS_PER_ITEM, SAMPLES, CHANNELS, SPATIAL) = range(16)


# ---------------------------------------------------------------------------
# The work split.

@njit(**HELPER_OPTIONS)
def channels_spatial(x, channels_last):
    """(C, S) of a 3-D kernel view."""
    return (x.shape[2], x.shape[1]) if channels_last else (x.shape[1], x.shape[2])


@njit(**HELPER_OPTIONS)
def work_split(N, C, S, channels_last, per_sample):
    """(items, chunks, rows_per_item, row_blocks).

    channels-first: N * C rows of length S, each cut into `chunks` pieces; an item is
    one piece of a long row (chunks > 1) or `rows_per_item` whole rows.
    channels-last: `row_blocks` blocks of `rows_per_item` rows (per sample when
    per_sample: a block does not cross samples), times blocks of CHANNEL_BLOCK channels.
    """
    if not channels_last:
        chunks = (S + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS
        if chunks > 1:
            return N * C * chunks, chunks, 1, 0
        # Several short rows per item: numba's per-item cost (the loop step, the
        # slices) weighs on rows of 49 values (7 x 7 maps).
        rows_per_item = max(1, CHUNK_ELEMENTS // max(S, 1))
        return (N * C + rows_per_item - 1) // rows_per_item, 1, rows_per_item, 0
    rows_per_item = max(1, CHUNK_ELEMENTS // min(C, CHANNEL_BLOCK))
    if per_sample:
        row_blocks = N * ((S + rows_per_item - 1) // rows_per_item)
    else:
        row_blocks = (N * S + rows_per_item - 1) // rows_per_item
    channel_blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    return row_blocks * channel_blocks, 1, rows_per_item, row_blocks


@njit(**HELPER_OPTIONS)
def partial_slots(N, C, S, channels_last, split):
    """The partials' slots (their matrix is (2, slots)): channels-first, slot
    (n * C + c) * chunks + chunk; channels-last, slot row_block * C + c."""
    _, chunks, _, row_blocks = split
    return row_blocks * C if channels_last else N * C * chunks


@njit(**HELPER_OPTIONS)
def exact_run_sums(first, second, n, c, centre, gradient):
    """The sums of the REDUCE pass over the channels-first run of sample n, channel c, each
    value in float64: for totals that failed _sums.kept_precision."""
    return exact_sums(first[n, c], second[n, c], centre, gradient, first.dtype.type(1))


@njit(**HELPER_OPTIONS)
def _item_extent(item, N, C, S, channels_last, per_sample, chunks, rows_per_item):
    """Work item -> (first row, end row, first column, end column, slot, coefficient base)
    in the run matrix. slot: the chunk of a long channels-first row (else 0), or the row
    block of a channels-last tile; coefficient base: where the tile's sample's
    coefficients start (channels-last, per_sample), else 0."""
    if channels_last:
        channel_blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
        block = item // channel_blocks
        c0 = (item - block * channel_blocks) * CHANNEL_BLOCK
        c1 = min(c0 + CHANNEL_BLOCK, C)
        if per_sample:
            blocks_per_sample = (S + rows_per_item - 1) // rows_per_item
            n = block // blocks_per_sample
            r0 = n * S + (block - n * blocks_per_sample) * rows_per_item
            return r0, min(r0 + rows_per_item, (n + 1) * S), c0, c1, block, n * C
        r0 = block * rows_per_item
        return r0, min(r0 + rows_per_item, N * S), c0, c1, block, 0
    if chunks > 1:
        row = item // chunks
        chunk = item - row * chunks
        return row, row + 1, chunk * S // chunks, (chunk + 1) * S // chunks, chunk, 0
    r0 = item * rows_per_item
    return r0, min(r0 + rows_per_item, N * C), 0, S, 0, 0


@njit(**HELPER_OPTIONS)
def _item_capacity(C, S, channels_last, chunks, rows_per_item):
    """The most values a work item holds (the size of its activation buffer)."""
    if channels_last:
        return rows_per_item * min(C, CHANNEL_BLOCK)
    return rows_per_item * -(-S // chunks)


@njit(**HELPER_OPTIONS)
def _next_row(c, period):
    """The coefficient of the next channels-first row: stepped, since a division per row
    of 49 values shows."""
    c += 1
    return c if c < period else 0


# ---------------------------------------------------------------------------
# Loops over one run. Runs are whole rows (`matrix[row]`: a slice with bounds known
# only at run time costs numba more than a 49-value row does) or 1-D slices of rows,
# so that every loop counts from 0 over a contiguous array and LLVM drops numba's
# negative-index handling and vectorises. Coefficients are scalars (channels-first:
# one per run) or arrays (channels-last: one per column), see _sums.element.

@njit(**HELPER_OPTIONS)
def _run_matrix(x, channels_last):
    """The run matrix of a 3-D kernel view: (N * C, S), or (N * S, C) channels-last; a
    (0, 0) matrix for a length-0 stand-in (grad_x not wanted)."""
    if x.size == 0:
        return x.reshape((0, 0))
    N = x.shape[0]
    C, S = channels_spatial(x, channels_last)
    return x.reshape((N * S, C) if channels_last else (N * C, S))


@njit(**HELPER_OPTIONS)
def _source_run(matrix, row_offset, column_offset, row, c0, c1):
    """Columns [c0, c1) of `row` of a run matrix, from `matrix`, which holds the rows from
    row_offset and the columns from column_offset (a work item's activation buffer; 0, 0
    for the tensors): the whole row when the run is one."""
    if c1 - c0 == matrix.shape[1]:
        return matrix[row - row_offset]
    return matrix[row - row_offset, c0 - column_offset:c1 - column_offset]


@njit(**INLINE_OPTIONS)
def _affine_run(x, y, shift, scale, offset):
    """y = (x - shift) * scale + offset."""
    for j in range(x.size):
        y[j] = (x[j] - element(shift, j)) * element(scale, j) + element(offset, j)


@njit(**INLINE_OPTIONS)
def _grad_input_run(g, x, dx, mean, a, b, d):
    """dx = g * a + (x - mean) * b + d."""
    for j in range(g.size):
        dx[j] = g[j] * element(a, j) + (x[j] - element(mean, j)) * element(b, j) + element(d, j)


@njit(**HELPER_OPTIONS)
def _activation_gradient(dy, x, buffer, r0, r1, c0, c1, coef_base, period, coefficients, act,
                         slope, channels_last):
    """g = dy * act'(z), z = (x - SHIFT) * ZA + ZB, on the item's runs [r0, r1) x [c0, c1)
    of the run matrices dy and x: into `buffer`, returned as a (r1 - r0, c1 - c0) matrix."""
    width = c1 - c0
    span = buffer[:(r1 - r0) * width]
    g = span.reshape((r1 - r0, width))
    if channels_last:
        k0, k1 = coef_base + c0, coef_base + c1
        mean, za, zb = coefficients[SHIFT, k0:k1], coefficients[ZA, k0:k1], coefficients[ZB, k0:k1]
        for r in range(r0, r1):
            _affine_run(_source_run(x, 0, 0, r, c0, c1), g[r - r0], mean, za, zb)
    else:
        k = r0 % period
        for r in range(r0, r1):
            _affine_run(_source_run(x, 0, 0, r, c0, c1), g[r - r0], coefficients[SHIFT, k],
                        coefficients[ZA, k], coefficients[ZB, k])
            k = _next_row(k, period)
    _activations.derivative(act, slope, span)
    for r in range(r0, r1):
        dy_run = _source_run(dy, 0, 0, r, c0, c1)
        g_run = g[r - r0]
        for j in range(width):
            g_run[j] *= dy_run[j]
    return g


# ---------------------------------------------------------------------------
# The passes, over a range of work items.

@njit(**INLINE_OPTIONS)
def pass_arguments(kind, first, second, out, coefficients, partials, act, slope, flag,
                   channels_last, per_sample, split):
    """The tuple of a pass's arguments, one type for every pass (see the module's
    docstring). Flags and codes are cast: numba types a bare constant as a literal, a
    type of its own, and would compile the passes once per value."""
    _, chunks, rows_per_item, _ = split
    C, S = channels_spatial(first, channels_last)
    return (np.int64(kind), _run_matrix(first, channels_last), _run_matrix(second, channels_last),
            _run_matrix(out, channels_last), coefficients, partials, np.int64(act),
            np.float64(slope), np.bool_(flag), np.bool_(channels_last), np.bool_(per_sample),
            chunks, rows_per_item, first.shape[0], C, S)


@njit(**HELPER_OPTIONS)
def _reduce_runs(args, values, row_offset, column_offset, first_item, end_item):
    """The sums of the items [first_item, end_item) into their partials (float64,
    (2, slots), see partial_slots): sum(v - centre) and sum((v - centre)**2) of the
    values, centre = SHIFT; or when `gradient`, sum(v) and sum((x - centre) * v),
    x = second (see _source_run).

    Each loop over the rows has a body without branches: numba counts references to
    the arrays that a row's views belong to, and removes that counting (an atomic
    operation per view) only where the view is used in a straight line; a branch per
    row made the passes 3x slower on 7 x 7 maps."""
    x_runs = args[SECOND]
    coefficients = args[COEFFICIENTS]
    partials = args[PARTIALS]
    gradient = args[FLAG]
    channels_last = args[CHANNELS_LAST]
    per_sample = args[PER_SAMPLE]
    chunks = args[CHUNKS]
    rows_per_item = args[ROWS_PER_ITEM]
    N, C, S = args[SAMPLES], args[CHANNELS], args[SPATIAL]
    period = N * C if per_sample else C
    for item in range(first_item, end_item):
        r0, r1, c0, c1, slot, coef_base = _item_extent(item, N, C, S, channels_last,
                                                       per_sample, chunks, rows_per_item)
        if channels_last:
            # Rows outer, channels inner: contiguous reads, and the channel loop vectorises.
            acc_a = partials[0, slot * C + c0:slot * C + c1]
            acc_b = partials[1, slot * C + c0:slot * C + c1]
            tile_centre = coefficients[SHIFT, coef_base + c0:coef_base + c1]
            acc_a.fill(0.0)
            acc_b.fill(0.0)
            if gradient:
                for r in range(r0, r1):
                    v_run = _source_run(values, row_offset, column_offset, r, c0, c1)
                    x_run = _source_run(x_runs, 0, 0, r, c0, c1)
                    for j in range(v_run.size):
                        v = np.float64(v_run[j])
                        acc_a[j] += v
                        acc_b[j] += (np.float64(x_run[j]) - tile_centre[j]) * v
            else:
                for r in range(r0, r1):
                    v_run = _source_run(values, row_offset, column_offset, r, c0, c1)
                    for j in range(v_run.size):
                        d = np.float64(v_run[j]) - tile_centre[j]
                        acc_a[j] += d
                        acc_b[j] += d * d
        elif gradient:
            k = r0 % period
            one = x_runs.dtype.type(1)  # no weight: in x's type, or the sums turn to float64
            for row in range(r0, r1):
                partials[0, row * chunks + slot], partials[1, row * chunks + slot] = grad_sums(
                    _source_run(values, row_offset, column_offset, row, c0, c1),
                    _source_run(x_runs, 0, 0, row, c0, c1), coefficients[SHIFT, k], one)
                k = _next_row(k, period)
        else:
            k = r0 % period
            for row in range(r0, r1):
                partials[0, row * chunks + slot], partials[1, row * chunks + slot] = shifted_sums(
                    _source_run(values, row_offset, column_offset, row, c0, c1),
                    coefficients[SHIFT, k])
                k = _next_row(k, period)


@njit(**HELPER_OPTIONS)
def _elementwise_runs(args, values, row_offset, column_offset, first_item, end_item):
    """The output of the items [first_item, end_item): out = (v - SHIFT) * SCALE + OFFSET;
    or when `backward`, out = v * SCALE + (x - SHIFT) * SCALE2 + OFFSET, x = second (see
    _source_run; branch-free row loops: see _reduce_runs)."""
    x_runs = args[SECOND]
    out_runs = args[OUT]
    coefficients = args[COEFFICIENTS]
    backward = args[FLAG]
    channels_last = args[CHANNELS_LAST]
    per_sample = args[PER_SAMPLE]
    chunks = args[CHUNKS]
    rows_per_item = args[ROWS_PER_ITEM]
    N, C, S = args[SAMPLES], args[CHANNELS], args[SPATIAL]
    period = N * C if per_sample else C
    for item in range(first_item, end_item):
        r0, r1, c0, c1, _, coef_base = _item_extent(item, N, C, S, channels_last, per_sample,
                                                    chunks, rows_per_item)
        if channels_last:
            k0, k1 = coef_base + c0, coef_base + c1
            shift, scale = coefficients[SHIFT, k0:k1], coefficients[SCALE, k0:k1]
            offset, scale2 = coefficients[OFFSET, k0:k1], coefficients[SCALE2, k0:k1]
            if backward:
                for r in range(r0, r1):
                    _grad_input_run(_source_run(values, row_offset, column_offset, r, c0, c1),
                                    _source_run(x_runs, 0, 0, r, c0, c1),
                                    _source_run(out_runs, 0, 0, r, c0, c1),
                                    shift, scale, scale2, offset)
            else:
                for r in range(r0, r1):
                    _affine_run(_source_run(values, row_offset, column_offset, r, c0, c1),
                                _source_run(out_runs, 0, 0, r, c0, c1), shift, scale, offset)
        elif backward:
            k = r0 % period
            for row in range(r0, r1):
                _grad_input_run(_source_run(values, row_offset, column_offset, row, c0, c1),
                                _source_run(x_runs, 0, 0, row, c0, c1),
                                _source_run(out_runs, 0, 0, row, c0, c1),
                                coefficients[SHIFT, k], coefficients[SCALE, k],
                                coefficients[SCALE2, k], coefficients[OFFSET, k])
                k = _next_row(k, period)
        else:
            k = r0 % period
            for row in range(r0, r1):
                _affine_run(_source_run(values, row_offset, column_offset, row, c0, c1),
                            _source_run(out_runs, 0, 0, row, c0, c1), coefficients[SHIFT, k],
                            coefficients[SCALE, k], coefficients[OFFSET, k])
                k = _next_row(k, period)


@njit(**HELPER_OPTIONS)
def _activated_output(args, first_item, end_item):
    """y = act(y) over the output of the items [first_item, end_item), in place."""
    out_runs = args[OUT]
    act = args[ACT]
    slope = args[SLOPE]
    channels_last = args[CHANNELS_LAST]
    per_sample = args[PER_SAMPLE]
    chunks = args[CHUNKS]
    rows_per_item = args[ROWS_PER_ITEM]
    N, C, S = args[SAMPLES], args[CHANNELS], args[SPATIAL]
    n_columns = out_runs.shape[1]
    out_flat = out_runs.reshape(out_runs.size)
    for item in range(first_item, end_item):
        r0, r1, c0, c1, _, _ = _item_extent(item, N, C, S, channels_last, per_sample, chunks,
                                            rows_per_item)
        if c1 - c0 == n_columns:
            _activations.activate(act, slope, out_flat[r0 * n_columns:r1 * n_columns])
        else:
            for r in range(r0, r1):
                _activations.activate(act, slope,
                                      out_flat[r * n_columns + c0:r * n_columns + c1])


@njit(**HELPER_OPTIONS)
def _item_gradient(args, buffer, item):
    """g = dy * act'(z) of one item, z = (x - SHIFT) * ZA + ZB, in `buffer`:
    (g, its first row, its first column) (see _source_run)."""
    channels_last = args[CHANNELS_LAST]
    per_sample = args[PER_SAMPLE]
    N, C, S = args[SAMPLES], args[CHANNELS], args[SPATIAL]
    r0, r1, c0, c1, _, coef_base = _item_extent(item, N, C, S, channels_last, per_sample,
                                                args[CHUNKS], args[ROWS_PER_ITEM])
    g = _activation_gradient(args[FIRST], args[SECOND], buffer, r0, r1, c0, c1, coef_base,
                             N * C if per_sample else C, args[COEFFICIENTS], args[ACT],
                             args[SLOPE], channels_last)
    return g, r0, c0


def _make_pass_items(fused):
    """The function running a pass over the work items [first_item, end_item): `pass_items`,
    and `fused_pass_items` which also does BatchNorm's fused activation. Two functions,
    so that numba compiles the activation's code (about 3 s) only for an op that uses
    it: `fused` is a constant of each, and the branches it rules out are not compiled."""

    @njit(**HELPER_OPTIONS)
    def pass_items(args, first_item, end_item):
        """The pass args[0] (REDUCE or ELEMENTWISE) over the items [first_item, end_item).

        With an activation (fused), item by item: a backward's passes read
        g = dy * act'(z) from the item's buffer where they read dy otherwise, a forward
        applies act to the item's output while it is in cache. Each run function has a
        single call site, so that numba compiles it once (the buffer is writeable, the
        tensors read-only: types that differ)."""
        kind = args[KIND]
        first_runs = args[FIRST]
        act = args[ACT]
        flag = args[FLAG]
        channels_last = args[CHANNELS_LAST]
        chunks = args[CHUNKS]
        rows_per_item = args[ROWS_PER_ITEM]
        reduce = kind == REDUCE
        if not fused:
            if reduce:
                _reduce_runs(args, first_runs, 0, 0, first_item, end_item)
            else:
                _elementwise_runs(args, first_runs, 0, 0, first_item, end_item)
            return
        differentiate = act != 0 and flag  # a backward (a forward's statistics have act = 0)
        C, S = args[CHANNELS], args[SPATIAL]
        buffer = np.empty(_item_capacity(C, S, channels_last, chunks, rows_per_item)
                          if differentiate else 0, first_runs.dtype)
        item = first_item
        while item < end_item:
            stop = end_item if act == 0 else item + 1
            values, row_offset, column_offset = first_runs, 0, 0
            if differentiate:
                values, row_offset, column_offset = _item_gradient(args, buffer, item)
            if reduce:
                _reduce_runs(args, values, row_offset, column_offset, item, stop)
            else:
                _elementwise_runs(args, values, row_offset, column_offset, item, stop)
            if act != 0 and not reduce and not flag:
                _activated_output(args, item, stop)
            item = stop

    return pass_items


pass_items = _make_pass_items(False)
fused_pass_items = _make_pass_items(True)
