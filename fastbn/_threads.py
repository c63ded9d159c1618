"""How many threads the kernels use: one rule shared by every backend.

The count is, in order of precedence, what `set_num_threads` was given, else
FASTBN_NUM_THREADS, else torch's count (`torch.get_num_threads()`) once fastbn.nn is
imported (so that `torch.set_num_threads` governs both libraries in a torch program),
else the CPUs this process may run on (its affinity mask).
It is then capped by OpenMP's own limit (omp_get_max_threads, which follows
OMP_NUM_THREADS and `threadpoolctl.threadpool_limits(n, user_api="openmp")`; with
torch's Linux wheels, which load the same GNU libgomp, also `torch.set_num_threads`).
FASTBN_NUM_THREADS and the affinity mask are read once, on first use: this
runs on every kernel call.
"""
import os

_requested = None  # set_num_threads(n); None means "not set"
_default = None  # FASTBN_NUM_THREADS or the available CPUs, once known
_environment = None  # FASTBN_NUM_THREADS, once read (0: not set)
_follow = None  # a callable giving the default count instead of the CPUs (fastbn.nn: torch's)


def _cpus_available():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _load_openmp_limit():
    """omp_get_max_threads of the compiled kernels, or None without them / OpenMP."""
    try:
        from fastbn._cython._openmp_helpers import openmp_enabled, openmp_max_threads
    except ImportError:
        return None
    return openmp_max_threads if openmp_enabled() else None


_openmp_max_threads = _load_openmp_limit()


def openmp_enabled():
    """True when the compiled kernels run with OpenMP (and its limit applies)."""
    return _openmp_max_threads is not None


def _parse_thread_count(value, source):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a positive integer, got {value!r}") from None
    if n == 0:
        raise ValueError(f"{source} must not be 0: use a positive count, or a negative one to "
                         "count back from the available CPUs (-1 = all)")
    if n < 0:  # scikit-learn's rule: -1 is all CPUs, -2 all but one, ...
        n = max(1, _cpus_available() + 1 + n)
    return n


def set_num_threads(n):
    """Set the number of threads the kernels use.

    Parameters
    ----------
    n : int or None
        A positive count; a negative one counts back from the available CPUs
        (-1 = all of them); None goes back to the default.
    """
    global _requested
    _requested = None if n is None else _parse_thread_count(n, "set_num_threads(n)")


def follow(count):
    """Make `count()` (e.g. torch.get_num_threads) the default thread count, below
    set_num_threads and FASTBN_NUM_THREADS; None goes back to the available CPUs."""
    global _follow
    _follow = count


def get_num_threads():
    """The number of threads the next kernel call will use."""
    global _default, _environment
    n = _requested
    if n is None:
        if _default is None:
            env = os.environ.get("FASTBN_NUM_THREADS")
            _environment = _parse_thread_count(env, "FASTBN_NUM_THREADS") if env else 0
            _default = _environment or _cpus_available()
        n = _default if _environment or _follow is None else max(1, _follow())
    if _openmp_max_threads is not None:
        limit = _openmp_max_threads()
        if limit < n:  # not min/max: two builtin calls cost 0.15 us, and this runs on every call
            n = max(1, limit)
    return n
