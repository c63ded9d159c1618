"""A multi-threaded memory copy: the bandwidth floor the benchmarks compare kernels with.

NumPy's copy runs on one thread, which on most machines does not saturate
memory bandwidth; the kernels use several. This copy splits the buffer into
one contiguous chunk per thread, as a streaming kernel would, so its time is
what moving those bytes costs with that many threads.
"""
from cython.parallel cimport prange
from libc.string cimport memcpy

import numpy as np

# Chunk boundaries fall on cache lines, so two threads never write the same line.
cdef Py_ssize_t CACHE_LINE = 64


def _flat_bytes(name, array):
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return array.reshape(-1).view(np.uint8)


def parallel_copy(src, dst, int n_threads):
    """Copy the bytes of `src` into `dst` on `n_threads` OpenMP threads.

    Parameters
    ----------
    src : ndarray, C-contiguous, any dtype
    dst : ndarray, C-contiguous and writeable, with as many bytes as `src`
    n_threads : int, >= 1
        Each thread copies one contiguous chunk (glibc's memcpy, which may use
        non-temporal stores for large chunks).
    """
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    src_flat = _flat_bytes("src", src)
    dst_flat = _flat_bytes("dst", dst)
    if src_flat.shape[0] != dst_flat.shape[0]:
        raise ValueError(f"src has {src_flat.shape[0]} bytes but dst has {dst_flat.shape[0]}")
    cdef const unsigned char[::1] src_bytes = src_flat
    cdef unsigned char[::1] dst_bytes = dst_flat
    cdef Py_ssize_t n = src_bytes.shape[0]
    if n == 0:
        return
    cdef Py_ssize_t chunk = (n + n_threads - 1) // n_threads
    chunk = (chunk + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE
    cdef Py_ssize_t thread, start, stop
    for thread in prange(n_threads, nogil=True, num_threads=n_threads, schedule="static"):
        start = thread * chunk
        stop = start + chunk
        if stop > n:
            stop = n
        if start < stop:
            memcpy(&dst_bytes[start], &src_bytes[start], stop - start)
