"""What every Numba kernel module shares: jit options, lazy compilation per dtype, the
parallel loop and the thread setting.

An op's entry point is compiled for one float dtype when the op is first called with
it (or loaded from numba's on-disk cache, `cache=True`), so that a new process loads
it instead of compiling again (see docs/numba.md). Every pass over the data is a plain
`@njit` function over a range of fixed work items (run_items): a call on one thread
runs it over all items directly, with no parallel region (numba's OpenMP layer stops a
forked child that starts one), a call on more threads through a `prange` that only
splits the items into one contiguous range per thread.
"""
import numba
import numpy as np
from numba import prange

# The safe part of fast-math: reassociation lets loops vectorise; no
# no-NaN / no-inf assumptions, so NaN and inf propagate as in PyTorch.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# For the compiled entry points: cached on disk.
JIT_OPTIONS = dict(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")
# For functions only called from compiled code: their machine code is part of
# each caller's, and so of the caller's cache entry; caching them as well would
# only write files that are never read.
HELPER_OPTIONS = dict(JIT_OPTIONS, cache=False)
# For helpers called once per short run: inlined into the caller's numba IR. LLVM
# leaves a call to a function with a vectorised loop in place, and a call per run
# costs as much as a run of 49 values (7 x 7 maps).
INLINE_OPTIONS = dict(HELPER_OPTIONS, inline="always")
# The entry points' `parallel`: only explicit `prange` loops become parallel regions. By
# default numba also turns array expressions (np.zeros, a[:] = 0, ...) into parallel
# loops, which would start a region on one thread too, and in a forked child.
PARALLEL = dict(prange=True, comprehension=False, setitem=False, reduction=False,
                numpy=False, stencil=False, fusion=False, inplace_binop=False)


class PerDtype:
    """An entry point compiled for one float dtype at a time, on its first call with it.

    ``kernel[dtype]`` is a numba dispatcher with the single explicit signature
    ``make_signature(numba dtype)``: only the dtypes used are compiled (float64 is
    rare), and the signature's read-only input types accept writeable arrays too
    (a dispatcher without signatures would compile a version per combination of
    read-only flags). With NUMBA_DISABLE_JIT=1 it is the Python function itself.
    """

    def __init__(self, py_func, make_signature):
        self.py_func = py_func
        self._make_signature = make_signature
        self._compiled = {}

    def __getitem__(self, dtype):
        function = self._compiled.get(dtype)
        if function is None:
            # Two threads may both get here: each compiles or loads, the last one is kept.
            signature = self._make_signature(numba.from_dtype(dtype))
            function = numba.njit([signature], parallel=PARALLEL, **JIT_OPTIONS)(self.py_func)
            self._compiled[dtype] = function
        return function


def per_dtype(make_signature):
    """Decorator: a PerDtype entry point."""
    return lambda py_func: PerDtype(py_func, make_signature)


@numba.njit(**INLINE_OPTIONS)
def run_items(run, args, items, tasks):
    """``run(args, first, end)`` over the work items [0, items): on one task directly, on
    more split into `tasks` contiguous ranges by a `prange`, one per thread. Inlined into
    an entry point (compiled with PARALLEL): a region starts only where tasks > 1. The
    items, not the tasks, fix every sum's order: the result is the same for any count."""
    if tasks > 1:
        for task in prange(tasks):
            t = np.int64(task)  # a prange index is unsigned: mixed arithmetic turns to float
            run(args, t * items // tasks, (t + 1) * items // tasks)
    else:
        run(args, np.int64(0), items)


def _thread_count_functions():
    """numba's (get, set) of the calling thread's thread count, the cheap pair.

    `numba.get_num_threads` / `set_num_threads` check their argument and the
    pool on every call (about 1 us and 1.7 us from Python); the C functions
    they end in cost 0.1 and 0.35 us through ctypes. Small inputs change the
    count twice per kernel call, so this showed. The C functions are private
    to numba (bound once its pool is started): fall back to the public ones
    where a numba version lacks them. Setting them from compiled code instead
    is as cheap, but makes the function uncacheable (a ctypes pointer).
    """
    numba.get_num_threads()  # starts numba's pool, which binds the C functions
    from numba.np.ufunc import parallel

    get, set_ = (getattr(parallel, name, None) for name in ("_get_num_threads",
                                                             "_set_num_threads"))
    if callable(get) and callable(set_):
        return get, set_
    return numba.get_num_threads, numba.set_num_threads


_get_thread_count, _set_thread_count = _thread_count_functions()


class numba_threads:
    """Context manager: run the block with numba's thread count set to `n_threads`.

    The previous count is restored on leaving the block, also when it raises.
    Numba's count is per calling thread; it is capped by NUMBA_NUM_THREADS
    (the size of numba's pool, fixed when the pool starts). A class rather than
    a generator because it wraps every kernel call: it costs about 1 us less.
    """

    __slots__ = ("n_threads", "previous")

    def __init__(self, n_threads):
        self.n_threads = max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS))

    def __enter__(self):
        self.previous = _get_thread_count()
        if self.n_threads != self.previous:
            _set_thread_count(self.n_threads)

    def __exit__(self, *exc_info):
        if self.n_threads != self.previous:
            _set_thread_count(self.previous)


def writeable(a):
    """a, or a copy where it is read-only (the compiled types of the arrays a kernel may
    update are writeable, and a call that only reads them gets a copy)."""
    return a if a.flags.writeable else a.copy()


def run_kernel(kernel, n_threads, *args):
    """``kernel(*args, tasks)`` on `n_threads` threads (already capped for the input):
    on one, with tasks = 1 (the passes run directly, no parallel region) and numba's
    thread count untouched; on more, with numba's count set to the task count."""
    if n_threads <= 1:
        return kernel(*args, 1)
    threads = numba_threads(n_threads)
    with threads:
        return kernel(*args, threads.n_threads)
