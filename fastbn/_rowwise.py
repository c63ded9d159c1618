"""What LayerNorm and RMSNorm share: normalized_shape checks and the (rows, D) layout.

Both normalize over the trailing dims named by `normalized_shape`, so a
C-contiguous input is a (rows, D) matrix, D = prod(normalized_shape), whose
rows are normalized independently. The kernels get that 2-D view; an input
with any other strides is copied to C order first. Outputs are C-contiguous.
"""
import math
import operator

import numpy as np

from fastbn import _layout, _validation


def check_input(x, normalized_shape):
    """(x, normalized_shape, rows, D, stats_shape) after the checks on them.

    stats_shape is that of PyTorch's mean / rstd: x's leading dims, then a 1 per
    normalized dim."""
    x = _validation.check_float_input("x", x)
    normalized_shape = check_normalized_shape(normalized_shape, x)
    leading = x.shape[:x.ndim - len(normalized_shape)]
    stats_shape = leading + (1,) * len(normalized_shape)
    return x, normalized_shape, math.prod(leading), math.prod(normalized_shape), stats_shape


def check_normalized_shape(normalized_shape, x):
    """normalized_shape as a tuple of ints that x's trailing dims match (an int is a 1-tuple)."""
    if isinstance(normalized_shape, (int, np.integer)):
        normalized_shape = (operator.index(normalized_shape),)
    else:
        try:  # map, not a generator expression: 0.25 us less on every call
            normalized_shape = tuple(map(operator.index, normalized_shape))
        except TypeError:
            raise TypeError("normalized_shape must be an int or a sequence of ints, "
                            f"got {normalized_shape!r}") from None
    if not normalized_shape:
        raise ValueError("Expected normalized_shape to be at least 1-dimensional, i.e., "
                         "containing at least one element, but got normalized_shape = []")
    # x's trailing dims, or all of its dims when it has fewer than len(normalized_shape).
    if x.shape[-len(normalized_shape):] != normalized_shape:
        # Only a normalized_shape that does not match x can hold a negative size.
        if min(normalized_shape) < 0:
            raise ValueError("normalized_shape must not hold negative sizes, "
                             f"got {list(normalized_shape)}")
        # PyTorch's message, word for word.
        raise ValueError(f"Given normalized_shape={list(normalized_shape)}, expected input with "
                         f"shape [*, {', '.join(map(str, normalized_shape))}], but got input of "
                         f"size{list(x.shape)}")
    return normalized_shape


def check_parameter(name, a, normalized_shape, x):
    """weight or bias: None, or an array of x's dtype shaped like normalized_shape, as (D,)."""
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        a = _validation.as_array(name, a)
    if a.dtype != x.dtype:
        _validation.raise_dtype_error(name, a, x)
    if a.shape != normalized_shape:
        raise ValueError(f"Expected {name} to be of same shape as normalized_shape, but got "
                         f"{name} of shape {list(a.shape)} and normalized_shape = "
                         f"{list(normalized_shape)}")
    if a.ndim == 1 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a).reshape(-1)


def check_statistic(name, a, stats_shape, rows, x, returned_by):
    """A per-row statistic from the forward (shape `stats_shape`, or flat), as (rows,)."""
    if a is None:
        raise ValueError(f"{name} is needed: pass the one {returned_by} returned")
    if not isinstance(a, np.ndarray):
        a = _validation.as_array(name, a)
    if a.dtype != x.dtype:
        _validation.raise_dtype_error(name, a, x)
    if a.shape != stats_shape and a.shape != (rows,):
        raise ValueError(f"{name} must have shape {stats_shape} (one value per row, as "
                         f"{returned_by} returns it), got shape {a.shape}")
    return rows_view(a, rows)


def rows_view(a, *shape):
    """a as a C-contiguous array of `shape`: a view, or a C-order copy for other strides."""
    return (a if a.flags.c_contiguous else np.ascontiguousarray(a)).reshape(shape)


def output_buffer(name, out, shape, dtype, rows, D, in_place_inputs, other_inputs=()):
    """(result, the (rows, D) view the kernel writes, array to copy into `out` after, or None).

    The kernels write `out` itself when it is C-contiguous and either shares no memory
    with what they read or is exactly one of `in_place_inputs` (the (rows, D) views of
    x, and of grad_out in a backward), which is then updated in place; any other `out`
    gets a temporary, copied into it afterwards (see `_layout.writes_through_temporary`;
    `other_inputs` are the parameters and statistics the kernel reads)."""
    if out is None:
        result = np.empty(shape, dtype)
        return result, result.reshape(rows, D), None  # new memory is C-contiguous
    _layout.check_out(name, out, shape, dtype)
    if out.flags.c_contiguous:
        view = out.reshape(rows, D)
        if not _layout.writes_through_temporary(view, in_place_inputs, other_inputs):
            return out, view, None
    buffer = np.empty(shape, dtype)
    return out, rows_view(buffer, rows, D), buffer
