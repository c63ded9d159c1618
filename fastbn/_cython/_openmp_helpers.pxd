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
