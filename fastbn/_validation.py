"""Argument checks shared by every op. Each raises before any state changes,
with a message that names the argument, what was wrong and what was expected."""
import math
import operator
import sys

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def reject_tensor(name, a):
    """Raise a TypeError if `a` is a torch tensor: the NumPy API would read its memory and
    return ndarrays, outside autograd; fastbn.nn.functional is the API for tensors."""
    torch = sys.modules.get("torch")  # no tensor exists before torch is imported
    if torch is not None and isinstance(a, torch.Tensor):
        raise TypeError(f"{name} is a torch.Tensor: fastbn's NumPy API takes NumPy arrays "
                        "(and array_likes such as lists) and returns arrays; for tensors use "
                        "fastbn.nn.functional (autograd, tensors out), or pass tensor.numpy()")


def as_array(name, a):
    """`a` as an ndarray: an ndarray itself, any other NumPy array_like converted
    (np.asarray, no copy where it can share memory); a torch tensor is a TypeError."""
    if isinstance(a, np.ndarray):
        return a
    reject_tensor(name, a)
    return np.asarray(a)


def check_float_input(name, x):
    """x as an ndarray of float32 or float64 (no copy for arrays)."""
    if not isinstance(x, np.ndarray):
        x = as_array(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def check_ndim(x, min_ndim, max_ndim, name="input"):
    if not min_ndim <= x.ndim <= max_ndim:
        expected = f"{min_ndim}D" if min_ndim == max_ndim else f"{min_ndim}D to {max_ndim}D"
        raise ValueError(f"expected {expected} {name} (got {x.ndim}D {name} of shape {x.shape})")


def check_same_dtype(name, a, x):
    if a.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {a.dtype} but the input has dtype {x.dtype}; "
                        "fastbn does not mix float32 and float64: convert one of them")


def check_grad_out(grad_out, x):
    """grad_out checked as every backward takes it: a float array of x's shape and dtype."""
    grad_out = check_float_input("grad_out", grad_out)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have the input's shape {x.shape}, got {grad_out.shape}")
    check_same_dtype("grad_out", grad_out, x)
    return grad_out


def raise_dtype_error(name, a, x):
    """The TypeError for an `a` whose dtype is not x's: a non-float dtype, or the other float.

    Callers test `a.dtype != x.dtype` first, which is all a call with the right dtype
    costs (x's is float32 or float64, so an equal one is too)."""
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 like the input, got dtype {a.dtype}")
    check_same_dtype(name, a, x)


def check_vector(name, a, length, x, what="one value per channel", contiguous=True):
    """A 1-D array of `length` values of x's dtype, or None.

    contiguous=True returns a C-contiguous array (a copy of a strided one);
    False returns the caller's array itself (for buffers updated in place,
    see `contiguous_buffer`).
    """
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        reject_tensor(name, a)
        if not contiguous:
            raise TypeError(f"{name} must be a NumPy array (it is updated in place), "
                            f"got {type(a).__name__}")
        a = np.asarray(a)
    if a.dtype != x.dtype:
        raise_dtype_error(name, a, x)
    if a.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) ({what}), got shape {a.shape}")
    if contiguous and not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a


def check_channel_parameters(x, weight, bias, running_mean, running_var):
    """(weight, bias, running_mean, running_var) of an op with one value of each per
    channel of x (BatchNorm, InstanceNorm), each checked by `check_vector`; the running
    statistics are returned as given (they are updated in place)."""
    C = x.shape[1]
    return (check_vector("weight", weight, C, x), check_vector("bias", bias, C, x),
            check_vector("running_mean", running_mean, C, x, contiguous=False),
            check_vector("running_var", running_var, C, x, contiguous=False))


def check_writeable(name, a, why):
    if a is not None and not a.flags.writeable:
        raise ValueError(f"{name} is read-only, but {why}; pass a writeable array")


def check_counter(name, counter):
    """A writeable ndarray holding one int64: a counter the kernels increase in place."""
    if (not isinstance(counter, np.ndarray) or counter.dtype != np.int64
            or counter.size != 1):
        raise TypeError(f"{name} must be a NumPy array of one int64 (a batch counter), got "
                        f"{getattr(counter, 'dtype', type(counter).__name__)} of shape "
                        f"{getattr(counter, 'shape', None)}")
    check_writeable(name, counter, "the call counts the batch in it")


def check_eps(eps):
    """eps as a float. Any real number, as ATen's ops take it: a negative eps gives NaN
    where var + eps < 0, inf gives rstd 0, nan gives NaN (torch.nn.functional.batch_norm
    alone rejects some; fastbn.nn.functional applies its rule)."""
    try:
        return float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {eps!r}") from None


def check_nonnegative_eps(eps):
    """eps as a finite float >= 0: for the ops torch has no kernel of (FRN, EvoNorm-S0),
    where a negative or non-finite eps has no torch result to match."""
    eps = check_eps(eps)
    if not eps >= 0.0 or math.isinf(eps):  # also rejects nan
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def check_real(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def check_mask(output_mask, length):
    if output_mask == (True,) * length:  # the default: skip the per-entry checks
        return (True,) * length
    try:
        mask = tuple(bool(operator.index(m) if not isinstance(m, bool) else m) for m in output_mask)
    except TypeError:
        raise TypeError(f"output_mask must be a sequence of {length} booleans, "
                        f"got {output_mask!r}") from None
    if len(mask) != length:
        raise ValueError(f"output_mask must have {length} entries, got {len(mask)}")
    return mask


def contiguous_buffer(a):
    """A C-contiguous array the kernels may update: `a` itself, or a copy to
    write back with `np.copyto(a, copy)` (kernels take contiguous vectors)."""
    if a is None or a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a)
