"""What the compiled kernels know about OpenMP, for fastbn's thread settings."""


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(FASTBN_OPENMP_ENABLED)


def openmp_max_threads():
    """omp_get_max_threads(): OMP_NUM_THREADS or a threadpoolctl limit, else the CPUs."""
    return omp_get_max_threads()
