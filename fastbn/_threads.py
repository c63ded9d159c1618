"""How many threads the kernels use: one rule shared by every backend.

The count is, in order of precedence, what `set_num_threads` was given, else
FASTBN_NUM_THREADS, else the CPUs this process may run on (its affinity mask). A
negative count counts back from those CPUs (-1 = all; `_parse_thread_count`).
It is then capped by OpenMP's own limit (omp_get_max_threads, which follows
OMP_NUM_THREADS and `threadpoolctl.threadpool_limits(n, user_api="openmp")`).
FASTBN_NUM_THREADS and the affinity mask are read once, on first use: this
runs on every kernel call.
"""
import operator
import os

_requested = None  # set_num_threads(n); None means "not set"
_default = None  # FASTBN_NUM_THREADS or the available CPUs, once known


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


RULE = ("a positive count, or a negative one that counts back from the available CPUs "
        "(-1 = all of them, -2 = all but one, ...; never fewer than 1)")


def _parse_thread_count(value, source):
    """The thread count `value` (an int, or a str from the environment) asks for.

    scikit-learn's and joblib's rule: n > 0 is n threads; n < 0 is the available CPUs
    + 1 + n, and at least 1 (so -1 is all of them); 0 is an error.
    """
    try:
        n = int(value) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be an integer, {RULE}; got {value!r}") from None
    if n == 0:
        raise ValueError(f"{source} must not be 0: use {RULE}")
    if n < 0:
        n = max(1, _cpus_available() + 1 + n)
    return n


def set_num_threads(n):
    """Set the number of threads the kernels use.

    Parameters
    ----------
    n : int or None
        A positive count; or a negative one that counts back from the CPUs this
        process may use (its affinity mask): -1 is all of them, -2 all but one, and a
        count below minus the CPUs gives 1 (scikit-learn's and joblib's rule). None
        goes back to the default (FASTBN_NUM_THREADS, else all available CPUs).
        OpenMP's limit (OMP_NUM_THREADS, threadpoolctl) still caps the count.

    Raises
    ------
    ValueError
        For 0 or a value that is not an integer; the setting then stays as it was.
    """
    global _requested
    _requested = None if n is None else _parse_thread_count(n, "set_num_threads(n)")


def get_num_threads():
    """The number of threads the next kernel call will use."""
    global _default
    n = _requested
    if n is None:
        if _default is None:
            env = os.environ.get("FASTBN_NUM_THREADS")
            _default = (_parse_thread_count(env, "FASTBN_NUM_THREADS") if env
                        else _cpus_available())
        n = _default
    if _openmp_max_threads is not None:
        limit = _openmp_max_threads()
        if limit < n:  # not min/max: two builtin calls cost 0.15 us, and this runs on every call
            n = max(1, limit)
    return n
