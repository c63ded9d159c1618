"""The float64 sums over one run of values that every Numba kernel shares.

Each run is cut into blocks of BLOCK values; a block is summed in x's type and
the block sums are added in float64, as the Cython kernels do. Fast-math
reassociation lets LLVM vectorise a block at full width: 16 float32 lanes
instead of the 8 of a float64 sum, and each lane adds only a few dozen values.
The last block may be short: it is summed the same way, so short runs (S = 49
for 7 x 7 maps) are vectorised too; summing them in float64 instead was 1.3-2x
slower per run (measured on 4096 runs of 49, 196 and 784 float32 values).

A float32 block sum of squares (or products) is only right while it stays a normal
float32: values of 1e19 overflow it (a square is 1e38, the largest float32 3.4e38)
and values of 1e-20 make subnormal squares (below 1.2e-38) that keep few digits. The
ops check the totals they make from these sums (`kept_precision`: finite, and not so
small that subnormal terms could matter) and take the sums of a channel, group or
row whose totals fail again in float64 (`exact_sums`). A check per run instead, in
the run's loop, cost 2-3 us per pass on 512 runs of 49 values (15 %). The float64
sums are also what a non-finite value gives, so NaN and inf propagate as before.

The centre (pivot or mean) is a value of x's type, so x - centre is exact for
values near it, which keeps the sum of squares accurate on data with a large mean.
Both run helpers are inlined into their callers (INLINE_OPTIONS).
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from fastbn._numba._runtime import HELPER_OPTIONS, INLINE_OPTIONS

# Values summed in x's type before the sum goes to float64: LLVM spreads a block
# over 4 vectors of 16 float32 lanes, 16 values per lane.
BLOCK = 1024
# Below this mean square (or product) per value, float32 terms may be subnormal, each
# with an absolute error up to 7e-46: less than 1e-15 of SMALL.
SMALL = 2.0 ** -100


def element(a, i):
    """a[i] for an array, a itself for a scalar: one loop serves a per-value factor (an
    array) and a constant one (a scalar)."""
    return a[i] if isinstance(a, np.ndarray) else a


@overload(element, jit_options=HELPER_OPTIONS, inline="always")
def _element_jit(a, i):
    if isinstance(a, types.Array):
        return lambda a, i: a[i]
    return lambda a, i: a


def part(a, start, stop):
    """a[start:stop] for an array, a itself for a scalar (see element)."""
    return a[start:stop] if isinstance(a, np.ndarray) else a


@overload(part, jit_options=HELPER_OPTIONS, inline="always")
def _part_jit(a, start, stop):
    if isinstance(a, types.Array):
        return lambda a, start, stop: a[start:stop]
    return lambda a, start, stop: a


@njit(**INLINE_OPTIONS)
def kept_precision(total, products, count):
    """Whether totals of `count` values' sums from shifted_sums / grad_sums are right:
    finite, and the sum of squares or products not so small that float32 subnormals
    could have lost its digits (a zero is right when the plain sum is zero too: every
    value at the centre, or every gradient zero)."""
    if products == 0.0 and total == 0.0:
        return True
    return abs(total) < np.inf and SMALL * count <= abs(products) < np.inf


@njit(**HELPER_OPTIONS)
def exact_sums(first, second, centre, gradient, weight):
    """The sums of shifted_sums (gradient False) or grad_sums (True) over the 1-D runs,
    each value in float64."""
    total = 0.0
    products = 0.0
    centre = np.float64(centre)
    for i in range(first.size):
        if gradient:
            g = np.float64(first[i]) * np.float64(element(weight, i))
            total += g
            products += (np.float64(second[i]) - centre) * g
        else:
            d = np.float64(first[i]) - centre
            total += d
            products += d * d
    return total, products


@njit(**INLINE_OPTIONS)
def shifted_sums(x, centre):
    """sum(x - centre) and sum((x - centre)**2) over the 1-D run x, in float64."""
    total = 0.0
    total_sq = 0.0
    for start in range(0, x.size, BLOCK):
        # A slice, so that indices start at 0: LLVM drops numba's negative-index checks.
        block = x[start:start + BLOCK]
        block_sum = x.dtype.type(0)
        block_sq = x.dtype.type(0)
        for i in range(block.size):
            d = block[i] - centre
            block_sum += d
            block_sq += d * d
        total += block_sum
        total_sq += block_sq
    return total, total_sq


@njit(**INLINE_OPTIONS)
def grad_sums(dy, x, mean, weight):
    """sum(g) and sum((x - mean) * g) over the 1-D runs dy and x, g = dy * weight (a run
    of weights, or a constant 1 of x's type, which LLVM folds away: a float64 1.0 would
    turn the block sums to float64), in float64."""
    total = 0.0
    total_dot = 0.0
    for start in range(0, x.size, BLOCK):
        dy_block = dy[start:start + BLOCK]
        x_block = x[start:start + BLOCK]
        w_block = part(weight, start, start + BLOCK)
        block_sum = x.dtype.type(0)
        block_dot = x.dtype.type(0)
        for i in range(x_block.size):
            g = dy_block[i] * element(w_block, i)
            block_sum += g
            block_dot += (x_block[i] - mean) * g
        total += block_sum
        total_dot += block_dot
    return total, total_dot
