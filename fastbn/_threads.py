"""How many threads the kernels use: one rule shared by every backend.

The count is, in order of precedence, what `set_num_threads` was given, else
FASTBN_NUM_THREADS, else the CPUs this process may run on (its affinity mask).
It is then capped by OpenMP's own limit (omp_get_max_threads, which follows
OMP_NUM_THREADS and `threadpoolctl.threadpool_limits(n, user_api="openmp")`).
"""
import os

_requested = None  # set_num_threads(n); None means "not set"


def _cpus_available():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_openmp_max_threads = None  # the compiled kernels' omp_get_max_threads, looked up on first use


def _openmp_limit():
    global _openmp_max_threads
    if _openmp_max_threads is None:  # import once: this runs on every kernel call
        try:
            from fastbn._cython._openmp_helpers import openmp_enabled, openmp_max_threads
        except ImportError:
            _openmp_max_threads = False
        else:
            _openmp_max_threads = openmp_max_threads if openmp_enabled() else False
    return _openmp_max_threads() if _openmp_max_threads else None


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


def get_num_threads():
    """The number of threads the next kernel call will use."""
    if _requested is not None:
        n = _requested
    elif os.environ.get("FASTBN_NUM_THREADS"):
        n = _parse_thread_count(os.environ["FASTBN_NUM_THREADS"], "FASTBN_NUM_THREADS")
    else:
        n = _cpus_available()
    limit = _openmp_limit()
    return n if limit is None else max(1, min(n, limit))
