# Declarations of the C loops of _norm_act_loops.h, and their fused-type front ends,
# for _norm_act.pyx (kept apart: they are a long list that says nothing new).
from cython cimport floating

cdef extern from "_norm_act_loops.h":
    enum:
        NA_PLAIN
        NA_TLU
        NA_ACT
    void na_run_stats_float(const float* x, Py_ssize_t n, double pivot, double* sum,
                            double* sum_sq) noexcept nogil
    void na_run_stats_double(const double* x, Py_ssize_t n, double pivot, double* sum,
                             double* sum_sq) noexcept nogil
    void na_run_forward_float(const float* x, float* y, Py_ssize_t n, float a, float b,
                              float v, float tau, int mode) noexcept nogil
    void na_run_forward_double(const double* x, double* y, Py_ssize_t n, double a, double b,
                               double v, double tau, int mode) noexcept nogil
    void na_run_backward_sums_float(const float* dz, const float* x, Py_ssize_t n, float a,
                                    float b, float v, float tau, int mode, double* sum_gu,
                                    double* sum_g, double* sum_third) noexcept nogil
    void na_run_backward_sums_double(const double* dz, const double* x, Py_ssize_t n, double a,
                                     double b, double v, double tau, int mode, double* sum_gu,
                                     double* sum_g, double* sum_third) noexcept nogil
    void na_run_backward_dx_float(const float* dz, const float* x, float* dx, Py_ssize_t n,
                                  float a, float b, float v, float tau, float k, float m,
                                  int mode) noexcept nogil
    void na_run_backward_dx_double(const double* dz, const double* x, double* dx, Py_ssize_t n,
                                   double a, double b, double v, double tau, double k, double m,
                                   int mode) noexcept nogil
    void na_tile_stats_float(const float* x, Py_ssize_t rows, Py_ssize_t stride,
                             Py_ssize_t width, const double* pivot, double* sum,
                             double* sum_sq) noexcept nogil
    void na_tile_stats_double(const double* x, Py_ssize_t rows, Py_ssize_t stride,
                              Py_ssize_t width, const double* pivot, double* sum,
                              double* sum_sq) noexcept nogil
    void na_tile_forward_float(const float* x, float* y, Py_ssize_t rows, Py_ssize_t stride,
                               Py_ssize_t width, const float* a, const float* b, const float* v,
                               const float* tau, int mode) noexcept nogil
    void na_tile_forward_double(const double* x, double* y, Py_ssize_t rows, Py_ssize_t stride,
                                Py_ssize_t width, const double* a, const double* b,
                                const double* v, const double* tau, int mode) noexcept nogil
    void na_tile_backward_sums_float(const float* dz, const float* x, Py_ssize_t rows,
                                     Py_ssize_t stride, Py_ssize_t width, const float* a,
                                     const float* b, const float* v, const float* tau, int mode,
                                     double* sum_gu, double* sum_g,
                                     double* sum_third) noexcept nogil
    void na_tile_backward_sums_double(const double* dz, const double* x, Py_ssize_t rows,
                                      Py_ssize_t stride, Py_ssize_t width, const double* a,
                                      const double* b, const double* v, const double* tau,
                                      int mode, double* sum_gu, double* sum_g,
                                      double* sum_third) noexcept nogil
    void na_tile_backward_dx_float(const float* dz, const float* x, float* dx, Py_ssize_t rows,
                                   Py_ssize_t stride, Py_ssize_t width, const float* a,
                                   const float* b, const float* v, const float* tau,
                                   const float* k, const float* m, int mode) noexcept nogil
    void na_tile_backward_dx_double(const double* dz, const double* x, double* dx,
                                    Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t width,
                                    const double* a, const double* b, const double* v,
                                    const double* tau, const double* k, const double* m,
                                    int mode) noexcept nogil


# Fused-type front ends of the C loops.

cdef inline void run_stats(const floating* x, Py_ssize_t n, double pivot, double* sum,
                           double* sum_sq) noexcept nogil:
    if floating is float:
        na_run_stats_float(x, n, pivot, sum, sum_sq)
    else:
        na_run_stats_double(x, n, pivot, sum, sum_sq)


cdef inline void run_forward(const floating* x, floating* y, Py_ssize_t n, floating a,
                             floating b, floating v, floating tau, int mode) noexcept nogil:
    if floating is float:
        na_run_forward_float(x, y, n, a, b, v, tau, mode)
    else:
        na_run_forward_double(x, y, n, a, b, v, tau, mode)


cdef inline void run_backward_sums(const floating* dz, const floating* x, Py_ssize_t n,
                                   floating a, floating b, floating v, floating tau, int mode,
                                   double* sum_gu, double* sum_g,
                                   double* sum_third) noexcept nogil:
    if floating is float:
        na_run_backward_sums_float(dz, x, n, a, b, v, tau, mode, sum_gu, sum_g, sum_third)
    else:
        na_run_backward_sums_double(dz, x, n, a, b, v, tau, mode, sum_gu, sum_g, sum_third)


cdef inline void run_backward_dx(const floating* dz, const floating* x, floating* dx,
                                 Py_ssize_t n, floating a, floating b, floating v, floating tau,
                                 floating k, floating m, int mode) noexcept nogil:
    if floating is float:
        na_run_backward_dx_float(dz, x, dx, n, a, b, v, tau, k, m, mode)
    else:
        na_run_backward_dx_double(dz, x, dx, n, a, b, v, tau, k, m, mode)


cdef inline void tile_stats(const floating* x, Py_ssize_t rows, Py_ssize_t stride,
                            Py_ssize_t width, const double* pivot, double* sum,
                            double* sum_sq) noexcept nogil:
    if floating is float:
        na_tile_stats_float(x, rows, stride, width, pivot, sum, sum_sq)
    else:
        na_tile_stats_double(x, rows, stride, width, pivot, sum, sum_sq)


cdef inline void tile_forward(const floating* x, floating* y, Py_ssize_t rows,
                              Py_ssize_t stride, Py_ssize_t width, const floating* a,
                              const floating* b, const floating* v, const floating* tau,
                              int mode) noexcept nogil:
    if floating is float:
        na_tile_forward_float(x, y, rows, stride, width, a, b, v, tau, mode)
    else:
        na_tile_forward_double(x, y, rows, stride, width, a, b, v, tau, mode)


cdef inline void tile_backward_sums(const floating* dz, const floating* x, Py_ssize_t rows,
                                    Py_ssize_t stride, Py_ssize_t width, const floating* a,
                                    const floating* b, const floating* v, const floating* tau,
                                    int mode, double* sum_gu, double* sum_g,
                                    double* sum_third) noexcept nogil:
    if floating is float:
        na_tile_backward_sums_float(dz, x, rows, stride, width, a, b, v, tau, mode, sum_gu,
                                    sum_g, sum_third)
    else:
        na_tile_backward_sums_double(dz, x, rows, stride, width, a, b, v, tau, mode, sum_gu,
                                     sum_g, sum_third)


cdef inline void tile_backward_dx(const floating* dz, const floating* x, floating* dx,
                                  Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t width,
                                  const floating* a, const floating* b, const floating* v,
                                  const floating* tau, const floating* k, const floating* m,
                                  int mode) noexcept nogil:
    if floating is float:
        na_tile_backward_dx_float(dz, x, dx, rows, stride, width, a, b, v, tau, k, m, mode)
    else:
        na_tile_backward_dx_double(dz, x, dx, rows, stride, width, a, b, v, tau, k, m, mode)
