"""What every Numba kernel module shares: jit options and the thread setting.

Kernels are compiled when a kernel module is first imported (fastbn imports it
on the first call that uses the numba backend), with explicit float32/float64
signatures, and cached on disk (numba's `cache=True`) so that a new process
loads them instead of compiling again (see docs/numba.md).
"""
import contextlib

import numba

# The safe part of fast-math: reassociation lets loops vectorise; no
# no-NaN / no-inf assumptions, so NaN and inf propagate as in PyTorch.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# For the compiled entry points: cached on disk.
JIT_OPTIONS = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")
# For functions only called from compiled code: their machine code is part of
# each caller's, and so of the caller's cache entry; caching them as well would
# only write files that are never read.
HELPER_OPTIONS = dict(JIT_OPTIONS, cache=False)


@contextlib.contextmanager
def numba_threads(n_threads):
    """Run the block with numba's thread count set to `n_threads`, then restore it.

    Numba's count is per calling thread; it is capped by NUMBA_NUM_THREADS
    (the size of numba's pool, fixed when the pool starts).
    """
    n_threads = max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    if n_threads == previous:  # the common case: skip two calls into numba's runtime
        yield
        return
    numba.set_num_threads(n_threads)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
