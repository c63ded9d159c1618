"""Memory layouts: the 3-D C-contiguous views the kernels read and write.

An (N, C, *spatial) array is handed to the kernels as
  (N, C, S) when it is C-contiguous ("channels-first"), or
  (N, S, C) when its channels are the fastest axis ("channels-last",
            and every C-contiguous array with S = 1, e.g. 2-D input),
where S is the product of the spatial sizes. Both are views, not copies.
An array whose strides fit neither (a slice with steps, a transpose, a
broadcast) is copied to C order first.
"""
import numpy as np


# ndim -> the transpose that moves axis 1 (channels) last, and its inverse. A transpose
# with these costs 0.15 us; np.moveaxis, which normalises its arguments first, 3 us,
# several times per call on the channels-last path.
_CHANNELS_LAST = {ndim: (0,) + tuple(range(2, ndim)) + (1,) for ndim in range(2, 6)}
_CHANNELS_FIRST = {ndim: (0, ndim - 1) + tuple(range(1, ndim - 1)) for ndim in range(2, 6)}


def spatial_size(shape):
    size = 1
    for dim in shape[2:]:
        size *= dim
    return size


def kernel_view(x):
    """(view, channels_last): x as a 3-D C-contiguous view, copied only if it must be."""
    N, C = x.shape[:2]
    S = spatial_size(x.shape)
    if x.flags.c_contiguous:
        if S == 1:
            return x.reshape(N, 1, C), True
        return x.reshape(N, C, S), False
    moved = x.transpose(_CHANNELS_LAST[x.ndim])
    if moved.flags.c_contiguous:
        return moved.reshape(N, S, C), True
    return kernel_view(np.ascontiguousarray(x))


def view_as_layout(a, channels_last):
    """a's 3-D kernel view in the given layout, or None if its memory is not laid out so."""
    N, C = a.shape[:2]
    S = spatial_size(a.shape)
    if channels_last:
        moved = a.transpose(_CHANNELS_LAST[a.ndim])
        return moved.reshape(N, S, C) if moved.flags.c_contiguous else None
    return a.reshape(N, C, S) if a.flags.c_contiguous else None


def empty_like_layout(shape, dtype, channels_last):
    """(array of `shape`, its 3-D kernel view): new memory laid out like the input's."""
    N, C = shape[:2]
    S = spatial_size(shape)
    if channels_last:
        buffer = np.empty((N, S, C), dtype)
        channels_last_shape = (N,) + tuple(shape[2:]) + (C,)
        return buffer.reshape(channels_last_shape).transpose(_CHANNELS_FIRST[len(shape)]), buffer
    buffer = np.empty((N, C, S), dtype)
    return buffer.reshape(shape), buffer


def check_out(name, out, shape, dtype):
    """Raise unless `out` is a writeable ndarray of `shape` and `dtype`."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name} must have shape {tuple(shape)} and dtype {dtype}, "
                         f"got shape {out.shape} and dtype {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only; pass a writeable array")


def output_buffer(name, out, shape, dtype, channels_last):
    """(result array, 3-D kernel view to write into, array to copy into afterwards or None).

    With out=None a new array in the input's layout. With an `out` array whose
    memory fits the layout, the kernel writes into it directly; otherwise into
    a temporary that is then copied into `out`.
    """
    if out is None:
        result, view = empty_like_layout(shape, dtype, channels_last)
        return result, view, None
    check_out(name, out, shape, dtype)
    view = view_as_layout(out, channels_last)
    if view is not None:
        return out, view, None
    result, view = empty_like_layout(shape, dtype, channels_last)
    return out, view, result


def view_or_copy_as_layout(a, channels_last):
    """a's 3-D kernel view in the given layout, copying `a` into that layout if needed
    (e.g. a grad_out laid out unlike x)."""
    view = view_as_layout(a, channels_last)
    if view is None:
        copy, view = empty_like_layout(a.shape, a.dtype, channels_last)
        np.copyto(copy, a)
    return view
