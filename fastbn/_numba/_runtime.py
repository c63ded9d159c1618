"""What every Numba kernel module shares: jit options and the thread setting.

Kernels are compiled when a kernel module is first imported (fastbn imports it
on the first call that uses the numba backend), with explicit float32/float64
signatures, and cached on disk (numba's `cache=True`) so that a new process
loads them instead of compiling again (see docs/numba.md).
"""
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
# For helpers called once per short run: inlined into the caller's numba IR. LLVM
# leaves a call to a function with a vectorised loop in place, and a call per run
# costs as much as a run of 49 values (7 x 7 maps).
INLINE_OPTIONS = dict(HELPER_OPTIONS, inline="always")


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


def serial(parallel_function):
    """`parallel_function` (a ``parallel=True`` dispatcher) compiled without numba's
    thread pool: its ``prange`` loops run as plain loops, in the same order, so the
    results are the same to the bit. A call on one thread then skips the pool's
    scheduler, which costs about 1 us per parallel loop (four per BatchNorm step).
    (With NUMBA_DISABLE_JIT=1 the "dispatcher" is the Python function itself.)"""
    return numba.njit(**HELPER_OPTIONS)(getattr(parallel_function, "py_func", parallel_function))


def run_kernel(kernel, n_threads, *args):
    """``kernel(*args, parallel)`` on `n_threads` threads (already capped for the input):
    on one, with parallel=False (the serial passes) and numba's thread count untouched;
    on more, with parallel=True inside `numba_threads`."""
    if n_threads <= 1:
        return kernel(*args, False)
    with numba_threads(n_threads):
        return kernel(*args, True)

