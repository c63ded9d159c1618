"""How many threads the kernels use: one rule shared by every backend.

The count is, in order of precedence, what `set_num_threads` was given, else
FASTBN_NUM_THREADS, else torch's count (`torch.get_num_threads()`) once fastbn.nn is
imported (so that `torch.set_num_threads` governs both libraries in a torch program),
else the CPUs this process may run on (its affinity mask). A negative count counts
back from those CPUs (-1 = all; `_parse_thread_count`).
It is then capped by OpenMP's own limit (omp_get_max_threads, which follows
OMP_NUM_THREADS and `threadpoolctl.threadpool_limits(n, user_api="openmp")`; with
torch's Linux wheels, which load the same GNU libgomp, also `torch.set_num_threads`).
FASTBN_NUM_THREADS and the affinity mask are read once, on first use: this
runs on every kernel call.

A child made by os.fork() (multiprocessing's 'fork' start method included)
runs the kernels on one thread until it calls `set_num_threads`: GNU OpenMP's
thread pool does not survive fork(), and a parallel region in a child forked
after the parent's pool started hangs (numba's OpenMP layer aborts the child
instead). On one thread the Cython kernels enter no OpenMP region and the numba
backend runs its serial kernels (not yet its LayerNorm / RMSNorm ones). The
first call that would have used more threads warns once (docs/robustness.md).
"""
import operator
import os
import sys
import warnings

_requested = None  # set_num_threads(n); None means "not set"
_default = None  # FASTBN_NUM_THREADS or the available CPUs, once known
_pinned = False  # the default is not torch's: FASTBN_NUM_THREADS is set, or a forked child
_follow = None  # a callable giving the default count instead of the CPUs (fastbn.nn: torch's)
_forked = False  # in a forked child that has not called set_num_threads yet


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
        goes back to the default (FASTBN_NUM_THREADS, else torch's count under
        fastbn.nn, else all available CPUs). In a child made by fork(), which
        runs on one thread, any call ends that fallback.
        OpenMP's limit (OMP_NUM_THREADS, threadpoolctl) still caps the count.

    Raises
    ------
    ValueError
        For 0 or a value that is not an integer; the setting then stays as it was.
    """
    global _requested, _default, _forked
    requested = None if n is None else _parse_thread_count(n, "set_num_threads(n)")
    if _forked:  # the user takes the threads back: the default is the usual one again
        _forked = False
        _default = None
    _requested = requested


def follow(count):
    """Make `count()` (e.g. torch.get_num_threads) the default thread count, below
    set_num_threads and FASTBN_NUM_THREADS; None goes back to the available CPUs."""
    global _follow
    _follow = count


def get_num_threads():
    """The number of threads the next kernel call will use."""
    # This runs on every kernel call: `_capped` is written out here (a call costs 0.06 us).
    n = _requested
    if n is None:
        n = _default
        if n is None:
            n = _load_default()
        if _follow is not None and not _pinned:
            n = max(1, _follow())
    if _openmp_max_threads is not None:
        limit = _openmp_max_threads()
        if limit < n:  # not min/max: two builtin calls cost 0.15 us
            n = max(1, limit)
    return n


def _capped(n):
    """n capped by OpenMP's limit (omp_get_max_threads), and at least 1."""
    if _openmp_max_threads is not None:
        n = max(1, min(n, _openmp_max_threads()))
    return n


def _load_default():
    """The default thread count, read once: FASTBN_NUM_THREADS or the available CPUs.
    In a forked child, 1 (see the module's docstring) after a warning if that is fewer
    than the parent's rule gives."""
    global _default, _pinned
    env = os.environ.get("FASTBN_NUM_THREADS")
    n = _parse_thread_count(env, "FASTBN_NUM_THREADS") if env else _cpus_available()
    _pinned = bool(env) or _forked
    if _forked:
        would_use = _capped(n if _parent_requested is None else _parent_requested)
        if would_use > 1:
            warnings.warn(
                f"fastbn runs on 1 thread in this process (it would use {would_use}): it was "
                "made by fork(), and OpenMP's thread pool does not survive fork (a parallel "
                "region in the child can hang). Call fastbn.set_num_threads(n) in the child "
                "to use threads again, safe when the parent had not yet run a multi-threaded "
                "OpenMP call; or start workers with the 'spawn' or 'forkserver' method.",
                RuntimeWarning, stacklevel=_first_frame_outside_fastbn())
        n = 1
    _default = n
    return n


def _first_frame_outside_fastbn():
    """The `stacklevel` of the warning, for a warning issued from the caller of this
    function: the first frame outside the fastbn package (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


_parent_requested = None  # set_num_threads of the parent, in a forked child


def _after_fork_in_child():
    """os.fork() hook: one thread until the child calls set_num_threads (warned once,
    by the first call in the child that reaches `_load_default`)."""
    global _requested, _default, _forked, _parent_requested
    _parent_requested = _requested
    _requested = None
    _default = None
    _forked = True


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
