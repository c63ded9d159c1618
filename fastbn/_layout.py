"""Memory layouts: the 3-D C-contiguous views the kernels read and write.

An (N, C, *spatial) array is handed to the kernels as
  (N, C, S) when it is C-contiguous ("channels-first"), or
  (N, S, C) when its channels are the fastest axis ("channels-last",
            and every C-contiguous array with S = 1, e.g. 2-D input),
where S is the product of the spatial sizes. Both are views, not copies.
An array whose strides fit neither (a slice with steps, a transpose, a
broadcast) is copied to C order first.

Outputs and grad_out have x's shape, so the helpers below take the 3-D shape of
x's kernel view (`view_shape`) rather than working it out again on each call.

An `out=` array is written directly by the kernels only when it shares no memory
with what they read, or is exactly one of the arrays they read elementwise (x, or
grad_out in a backward: the same memory in the same layout, updated in place).
Any other overlap is computed through a temporary and copied into `out`
afterwards, as NumPy's ufuncs do (`writes_through_temporary`).
"""
import math

import numpy as np

from fastbn import _validation


# ndim -> the transpose that moves axis 1 (channels) last, and its inverse. A transpose
# with these costs 0.15 us; np.moveaxis, which normalises its arguments first, 3 us,
# several times per call on the channels-last path.
_CHANNELS_LAST = {ndim: (0,) + tuple(range(2, ndim)) + (1,) for ndim in range(2, 6)}
_CHANNELS_FIRST = {ndim: (0, ndim - 1) + tuple(range(1, ndim - 1)) for ndim in range(2, 6)}


def spatial_size(shape):
    return math.prod(shape[2:])


def kernel_view(x):
    """(view, channels_last): x as a 3-D C-contiguous view, copied only if it must be."""
    shape = x.shape
    N, C = shape[:2]
    S = spatial_size(shape)
    if x.flags.c_contiguous:
        if S == 1:
            return x.reshape(N, 1, C), True
        return x.reshape(N, C, S), False
    moved = x.transpose(_CHANNELS_LAST[x.ndim])
    if moved.flags.c_contiguous:
        return moved.reshape(N, S, C), True
    return kernel_view(np.ascontiguousarray(x))


def view_as_layout(a, view_shape, channels_last):
    """a's 3-D kernel view in the given layout, or None if its memory is not laid out so."""
    if channels_last:
        a = a.transpose(_CHANNELS_LAST[a.ndim])
    return a.reshape(view_shape) if a.flags.c_contiguous else None


def empty_like_layout(shape, dtype, channels_last, view_shape=None):
    """(array of `shape`, its 3-D kernel view): new memory laid out like the input's.

    view_shape, the kernel view's (N, C, S) or (N, S, C), is worked out from `shape`
    unless the caller passes it (the ops do: they have x's kernel view at hand).
    """
    N, C = shape[:2]
    if view_shape is None:
        S = spatial_size(shape)
        view_shape = (N, S, C) if channels_last else (N, C, S)
    buffer = np.empty(view_shape, dtype)
    if channels_last:
        channels_last_shape = (N,) + shape[2:] + (C,)
        return buffer.reshape(channels_last_shape).transpose(_CHANNELS_FIRST[len(shape)]), buffer
    return buffer.reshape(shape), buffer


def check_out(name, out, shape, dtype):
    """Raise unless `out` is a writeable ndarray of `shape` and `dtype`."""
    if not isinstance(out, np.ndarray):
        _validation.reject_tensor(name, out)
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name} must have shape {tuple(shape)} and dtype {dtype}, "
                         f"got shape {out.shape} and dtype {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only; pass a writeable array")


# np.may_share_memory without its __array_function__ dispatch: 0.11 us a call instead of
# 0.34 us (NumPy >= 1.25 exposes the C function as `_implementation`).
_may_share_memory = getattr(np.may_share_memory, "_implementation", np.may_share_memory)


def writes_through_temporary(out_view, in_place_inputs, other_inputs):
    """Whether a kernel must write `out_view` through a temporary.

    in_place_inputs: arrays of out_view's shape that the kernels read elementwise
    (x, grad_out); `out_view` may be exactly one of them (same memory, same layout:
    updated in place). other_inputs: everything else the kernel reads (parameters,
    statistics), which `out_view` must not touch at all. None entries are skipped.

    Every array here is C-contiguous (a kernel view, or a parameter checked to be), so
    it spans one interval of memory and may_share_memory's bounds test is exact.
    """
    for a in other_inputs:
        if a is not None and _may_share_memory(out_view, a):
            return True
    for a in in_place_inputs:
        if a is not None and _may_share_memory(out_view, a) and not (
                a.shape == out_view.shape and a.ctypes.data == out_view.ctypes.data):
            return True  # (ctypes.data: 1 us, half of __array_interface__'s cost)
    return False


def output_buffer(name, out, x, x_view, channels_last, in_place_inputs=(), other_inputs=()):
    """(result array, 3-D kernel view to write into, array to copy into afterwards or None).

    The result has x's shape and dtype. With out=None a new array laid out as
    x_view (x's kernel view). With an `out` array whose memory fits the layout and
    does not partly overlap what the kernel reads (see `writes_through_temporary`,
    which gets `in_place_inputs` and `other_inputs`: kernel views and parameters),
    the kernel writes into it directly; otherwise into a temporary that is then
    copied into `out`.
    """
    if out is None:
        result, view = empty_like_layout(x.shape, x.dtype, channels_last, x_view.shape)
        return result, view, None
    check_out(name, out, x.shape, x.dtype)
    view = view_as_layout(out, x_view.shape, channels_last)
    if view is not None and not writes_through_temporary(view, in_place_inputs, other_inputs):
        return out, view, None
    result, view = empty_like_layout(x.shape, x.dtype, channels_last, x_view.shape)
    return out, view, result


def view_or_copy_as_layout(a, x_view, channels_last):
    """a (of x's shape) as a kernel view laid out as x_view, copying `a` into that
    layout if needed (e.g. a grad_out laid out unlike x)."""
    view = view_as_layout(a, x_view.shape, channels_last)
    if view is None:
        copy, view = empty_like_layout(a.shape, a.dtype, channels_last, x_view.shape)
        np.copyto(copy, a)
    return view
