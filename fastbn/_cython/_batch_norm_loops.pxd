# The work-item loops of _batch_norm_loops.h (on _simd.h's vectors, one copy per
# instruction set, FASTBN_DISPATCH picking one per call), declared once for every kernel
# module that runs them: BatchNorm (_batch_norm.pyx, with the fused activation) and
# GroupNorm and InstanceNorm (_group_norm.pyx: the same sums and the same elementwise
# passes with per-(sample, channel) or per-group coefficients). The front ends below take
# a fused type and run without a fused activation.
from cython cimport floating

cdef extern from "_batch_norm_loops.h" nogil:
    void fastbn_cf_sums_float(const float*, const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              const double*, double*, double*, int, float, const float*,
                              const float*, const float*)
    void fastbn_cf_sums_double(const double*, const double*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                               Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                               const double*, double*, double*, int, double, const double*,
                               const double*, const double*)
    void fastbn_cf_elementwise_float(const float*, const float*, float*, Py_ssize_t, Py_ssize_t,
                                     Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                     const float*, const float*, const float*, const float*,
                                     int, float, const float*, const float*)
    void fastbn_cf_elementwise_double(const double*, const double*, double*, Py_ssize_t,
                                      Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                      const double*, const double*, const double*,
                                      const double*, int, double, const double*, const double*)
    void fastbn_cl_sums_float(const float*, const float*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                              Py_ssize_t, Py_ssize_t, const double*, double*, double*, int,
                              float, const float*, const float*, const float*)
    void fastbn_cl_sums_double(const double*, const double*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                               Py_ssize_t, Py_ssize_t, const double*, double*, double*, int,
                               double, const double*, const double*, const double*)
    void fastbn_cl_elementwise_float(const float*, const float*, float*, Py_ssize_t, Py_ssize_t,
                                     Py_ssize_t, Py_ssize_t, Py_ssize_t, const float*,
                                     const float*, const float*, const float*, int, float,
                                     const float*, const float*)
    void fastbn_cl_elementwise_double(const double*, const double*, double*, Py_ssize_t,
                                      Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                      const double*, const double*, const double*,
                                      const double*, int, double, const double*, const double*)


cdef inline void rows_sums(const floating* first, const floating* second, Py_ssize_t S,
                           Py_ssize_t C, Py_ssize_t row0, Py_ssize_t row1, Py_ssize_t start,
                           Py_ssize_t stop, Py_ssize_t chunks, Py_ssize_t chunk,
                           const double* centre, double* part_a,
                           double* part_b) noexcept nogil:
    """Rows [row0, row1) of a (rows, S) matrix, values [start, stop) of each; row r has
    centre[r % C]. second NULL: part_a/part_b[r * chunks + chunk] = sum(first - centre),
    sum((first - centre)**2) (centre a value of the input's type); else sum(first) and
    sum((second - centre) * first) (first = dy, second = x)."""
    if floating is float:
        fastbn_cf_sums_float(first, second, S, C, row0, row1, start, stop, chunks, chunk,
                             centre, part_a, part_b, 0, 0.0, NULL, NULL, NULL)
    else:
        fastbn_cf_sums_double(first, second, S, C, row0, row1, start, stop, chunks, chunk,
                              centre, part_a, part_b, 0, 0.0, NULL, NULL, NULL)


cdef inline void rows_elementwise(const floating* x, const floating* x2, floating* y,
                                  Py_ssize_t S, Py_ssize_t C, Py_ssize_t row0, Py_ssize_t row1,
                                  Py_ssize_t start, Py_ssize_t stop, const floating* shift,
                                  const floating* scale, const floating* scale2,
                                  const floating* offset) noexcept nogil:
    """The same rows, with k = r % C: y = (x - shift[k]) * scale[k] + offset[k], or with x2
    (backward: x = dy, x2 = x): y = x * scale[k] + (x2 - shift[k]) * scale2[k] + offset[k]."""
    if floating is float:
        fastbn_cf_elementwise_float(x, x2, y, S, C, row0, row1, start, stop, shift, scale,
                                    scale2, offset, 0, 0.0, NULL, NULL)
    else:
        fastbn_cf_elementwise_double(x, x2, y, S, C, row0, row1, start, stop, shift, scale,
                                     scale2, offset, 0, 0.0, NULL, NULL)


cdef inline void columns_sums(const floating* first, const floating* second, Py_ssize_t C,
                              Py_ssize_t row0, Py_ssize_t row1, Py_ssize_t c0, Py_ssize_t c1,
                              const double* centre, double* acc_a,
                              double* acc_b) noexcept nogil:
    """Columns [c0, c1) of rows [row0, row1) of a (rows, C) matrix: acc_a/acc_b[c] = the sums
    of rows_sums down column c, around centre[c]."""
    if floating is float:
        fastbn_cl_sums_float(first, second, C, row0, row1, c0, c1, centre, acc_a, acc_b, 0,
                             0.0, NULL, NULL, NULL)
    else:
        fastbn_cl_sums_double(first, second, C, row0, row1, c0, c1, centre, acc_a, acc_b, 0,
                              0.0, NULL, NULL, NULL)


cdef inline void columns_elementwise(const floating* x, const floating* x2, floating* y,
                                     Py_ssize_t C, Py_ssize_t row0, Py_ssize_t row1,
                                     Py_ssize_t c0, Py_ssize_t c1, const floating* shift,
                                     const floating* scale, const floating* scale2,
                                     const floating* offset) noexcept nogil:
    """rows_elementwise on columns [c0, c1) of rows [row0, row1), coefficients [c]."""
    if floating is float:
        fastbn_cl_elementwise_float(x, x2, y, C, row0, row1, c0, c1, shift, scale, scale2,
                                    offset, 0, 0.0, NULL, NULL)
    else:
        fastbn_cl_elementwise_double(x, x2, y, C, row0, row1, c0, c1, shift, scale, scale2,
                                     offset, 0, 0.0, NULL, NULL)
