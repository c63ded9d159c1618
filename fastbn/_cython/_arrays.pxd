# Raw data pointers of the arrays the Python entry points receive: the callers
# have checked dtype and layout, and a pointer costs nothing per call where a
# typed memoryview acquires a buffer for each argument.
cimport numpy as cnp


cdef inline void* data(object array) noexcept:
    """The array's data pointer, NULL for None."""
    return NULL if array is None else cnp.PyArray_DATA(<cnp.ndarray>array)
