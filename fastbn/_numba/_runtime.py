"""What every Numba kernel module shares: jit options and the thread setting.

Kernels are compiled when a kernel module is first imported (fastbn imports it
on the first call that uses the numba backend), with explicit float32/float64
signatures, and cached on disk (numba's `cache=True`) so that a new process
loads them instead of compiling again.
"""
import contextlib

import numba

# The safe part of fast-math: reassociation lets loops vectorise; no
# no-NaN / no-inf assumptions, so NaN and inf propagate as in PyTorch.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT_OPTIONS = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")


@contextlib.contextmanager
def numba_threads(n_threads):
    """Run the block with numba's thread count set to fastbn's, then restore it."""
    n_threads = max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    if previous == n_threads:  # the usual case: nothing to set and restore (~2 us saved)
        yield
        return
    numba.set_num_threads(n_threads)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
