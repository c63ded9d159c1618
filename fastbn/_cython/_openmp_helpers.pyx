"""What the compiled kernels know about OpenMP, for fastbn's thread settings."""


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(FASTBN_OPENMP_ENABLED)


def openmp_max_threads():
    """omp_get_max_threads(): OMP_NUM_THREADS or a threadpoolctl limit, else the CPUs."""
    return omp_get_max_threads()


def threads_for_work(int n_threads, Py_ssize_t n_values, Py_ssize_t items):
    """The threads a kernel call runs on (`effective_threads`, the rule every Cython
    kernel applies): at most `n_threads` (the count asked for), at most one per
    MIN_ELEMENTS_PER_THREAD values (below that an extra thread costs more in starting and
    joining than it saves), at most one per work item, and at least 1. On 1, the kernels
    enter no OpenMP region at all."""
    return effective_threads(n_threads, n_values, items)


MIN_VALUES_PER_THREAD = MIN_ELEMENTS_PER_THREAD
