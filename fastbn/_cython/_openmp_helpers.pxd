# Every omp_* call in fastbn goes through here, so the kernels also build
# without OpenMP (they then run on one thread). Modelled on scikit-learn's
# sklearn/utils/_openmp_helpers.pxd.
cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define FASTBN_OPENMP_ENABLED 1
    #else
        #define FASTBN_OPENMP_ENABLED 0
        #define omp_get_max_threads() 1
        #define omp_get_thread_num() 0
    #endif
    """
    bint FASTBN_OPENMP_ENABLED
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil


# Below this many values per thread, an extra thread costs more than it brings
# (an OpenMP region start and its barrier against a few microseconds of work).
cdef enum:
    MIN_ELEMENTS_PER_THREAD = 16384


cdef inline int effective_threads(int n_threads, Py_ssize_t n_elements,
                                  Py_ssize_t items) noexcept nogil:
    """The threads worth starting for `n_elements` values in `items` work items."""
    cdef Py_ssize_t useful = n_elements // MIN_ELEMENTS_PER_THREAD
    if useful < n_threads:
        n_threads = <int>useful
    if items < n_threads:
        n_threads = <int>items
    return n_threads if n_threads > 1 else 1
