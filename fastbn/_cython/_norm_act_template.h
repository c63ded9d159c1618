/* One instantiation of the loops of _norm_act_loops.h, which includes this file once per
 * (type, instruction set) after defining:
 *   NA_T          float or double
 *   NA_IS_DOUBLE  0 or 1
 *   NA_ISA        the instruction set, as _simd.h names it (baseline, avx2, avx512)
 *   NA_BYTES      the vector width in bytes
 *   NA_ATTR       the function attributes that select the instruction set (or nothing)
 * Every function is named NA_F(name) = name_<type>_<isa>. The macros are undefined at
 * the end, ready for the next instantiation.
 */
#define NA_F(name) NA_CAT3(name, NA_T, NA_ISA)

#if NA_IS_DOUBLE
#define NA_INT int64_t
#define NA_UINT uint64_t
#define NA_SIGN_BIT INT64_MIN
#define NA_SIGN_SHIFT 63
#else
#define NA_INT int32_t
#define NA_UINT uint32_t
#define NA_SIGN_BIT INT32_MIN
#define NA_SIGN_SHIFT 31
#endif

#if NA_VECTORS
/* NA_VT: values; NA_VI / NA_VU: their bits; NA_VD: float64 accumulators, as many lanes as
   fit the width (half of NA_VT's for float32, which is widened in two halves, NA_VH). */
#define NA_LANES ((ptrdiff_t)(NA_BYTES / sizeof(NA_T)))
#define NA_D_LANES ((ptrdiff_t)(NA_BYTES / sizeof(double)))
typedef NA_T NA_F(na_vt) __attribute__((vector_size(NA_BYTES)));
typedef NA_INT NA_F(na_vi) __attribute__((vector_size(NA_BYTES)));
typedef NA_UINT NA_F(na_vu) __attribute__((vector_size(NA_BYTES)));
typedef double NA_F(na_vd) __attribute__((vector_size(NA_BYTES)));
#define NA_VT NA_F(na_vt)
#define NA_VI NA_F(na_vi)
#define NA_VU NA_F(na_vu)
#define NA_VD NA_F(na_vd)
#if !NA_IS_DOUBLE
typedef float NA_F(na_vh) __attribute__((vector_size(NA_BYTES / 2)));
#define NA_VH NA_F(na_vh)
#endif
#define NA_SPLAT(s) ((NA_VT){0} + (NA_T)(s))
#define NA_SPLAT_D(s) ((NA_VD){0} + (double)(s))
#define NA_BITS(v) ((NA_VI)(v))
#define NA_FROM_BITS(i) ((NA_VT)(i))
#define NA_SHL(i, s) ((NA_VI)((NA_VU)(i) << (s)))
/* comparisons: all bits set where true */
#define NA_LT(a, b) ((a) < (b))
#define NA_GT(a, b) ((a) > (b))
#define NA_EQ(a, b) ((a) == (b))
#define NA_NE(a, b) ((a) != (b))
#else
#define NA_LANES ((ptrdiff_t)1)
#define NA_D_LANES ((ptrdiff_t)1)
#define NA_VT NA_T
#define NA_VI NA_INT
#define NA_VD double
#define NA_SPLAT(s) ((NA_T)(s))
#define NA_SPLAT_D(s) ((double)(s))
NA_INLINE NA_INT NA_F(na_bits)(NA_T v) { NA_INT i; memcpy(&i, &v, sizeof i); return i; }
NA_INLINE NA_T NA_F(na_from_bits)(NA_INT i) { NA_T v; memcpy(&v, &i, sizeof v); return v; }
#define NA_BITS(v) NA_F(na_bits)(v)
#define NA_FROM_BITS(i) NA_F(na_from_bits)(i)
#define NA_SHL(i, s) ((NA_INT)((NA_UINT)(i) << (s)))
#define NA_LT(a, b) (-(NA_INT)((a) < (b)))
#define NA_GT(a, b) (-(NA_INT)((a) > (b)))
#define NA_EQ(a, b) (-(NA_INT)((a) == (b)))
#define NA_NE(a, b) (-(NA_INT)((a) != (b)))
#endif
/* m ? a : b, lane by lane, for a mask m from the comparisons above */
#define NA_SEL(m, a, b) NA_FROM_BITS(((m) & NA_BITS(a)) | (~(m) & NA_BITS(b)))

/* ---- loads and stores; the _n forms move the first n lanes only (n < NA_LANES at the
   end of a run or a row), filling the others with `fill` ---- */

NA_INLINE NA_VT NA_ATTR NA_F(na_load)(const NA_T* p) {
    NA_VT v;
    memcpy(&v, p, sizeof v);
    return v;
}

NA_INLINE NA_VT NA_ATTR NA_F(na_load_n)(const NA_T* p, ptrdiff_t n, NA_T fill) {
    NA_T lanes[NA_LANES];
    ptrdiff_t i;
    if (n >= NA_LANES) return NA_F(na_load)(p);
    for (i = 0; i < NA_LANES; i++) lanes[i] = i < n ? p[i] : fill;
    return NA_F(na_load)(lanes);
}

NA_INLINE void NA_ATTR NA_F(na_store)(NA_T* p, NA_VT v) {
    memcpy(p, &v, sizeof v);
}

NA_INLINE void NA_ATTR NA_F(na_store_n)(NA_T* p, NA_VT v, ptrdiff_t n) {
    NA_T lanes[NA_LANES];
    ptrdiff_t i;
    /* a copy of variable size made GCC send every vector through the stack */
    if (n >= NA_LANES) {
        NA_F(na_store)(p, v);
        return;
    }
    NA_F(na_store)(lanes, v);
    for (i = 0; i < n; i++) p[i] = lanes[i];
}

/* v's lanes as float64: *lo gets the first NA_D_LANES, *hi the others (float32 only). */
NA_INLINE void NA_ATTR NA_F(na_widen)(NA_VT v, NA_VD* lo, NA_VD* hi) {
#if NA_IS_DOUBLE
    *lo = v;
    (void)hi;
#elif NA_VECTORS
    NA_VH half;
    memcpy(&half, &v, sizeof half);
    *lo = __builtin_convertvector(half, NA_VD);
    memcpy(&half, (const char*)&v + sizeof half, sizeof half);
    *hi = __builtin_convertvector(half, NA_VD);
#else
    *lo = (double)v;
    (void)hi;
#endif
}

/* Parts of a widened vector: 2 for float32 vectors, 1 otherwise. */
#if !NA_IS_DOUBLE && NA_VECTORS
#define NA_PARTS 2
#else
#define NA_PARTS 1
#endif

/* The first n lanes of float64 memory (the others 0), and p[0:n] += v's first n lanes. */
NA_INLINE NA_VD NA_ATTR NA_F(na_load_d_n)(const double* p, ptrdiff_t n) {
    double lanes[NA_D_LANES];
    NA_VD v;
    ptrdiff_t i;
    if (n >= NA_D_LANES) {
        memcpy(&v, p, sizeof v);
        return v;
    }
    for (i = 0; i < NA_D_LANES; i++) lanes[i] = i < n ? p[i] : 0.0;
    memcpy(&v, lanes, sizeof v);
    return v;
}

NA_INLINE void NA_ATTR NA_F(na_add_d_n)(double* p, NA_VD v, ptrdiff_t n) {
    double lanes[NA_D_LANES];
    ptrdiff_t i;
    v += NA_F(na_load_d_n)(p, n);
    if (n >= NA_D_LANES) {
        memcpy(p, &v, sizeof v);
        return;
    }
    memcpy(lanes, &v, sizeof v);
    for (i = 0; i < n; i++) p[i] = lanes[i];
}

/* sums[0:n] += v's first n lanes, in float64 */
NA_INLINE void NA_ATTR NA_F(na_accumulate)(double* sums, NA_VT v, ptrdiff_t n) {
    NA_VD part[2];
    ptrdiff_t p;
    NA_F(na_widen)(v, &part[0], &part[1]);
    for (p = 0; p < NA_PARTS && p * NA_D_LANES < n; p++)
        NA_F(na_add_d_n)(sums + p * NA_D_LANES, part[p], n - p * NA_D_LANES);
}

/* The lanes' total, added pairwise (a fixed order, and log2(lanes) adds deep: adding
   them one after another was latency-bound, 20 ns per 49-value run). */
NA_INLINE double NA_ATTR NA_F(na_hsum)(NA_VD v) {
    double lanes[NA_D_LANES];
    ptrdiff_t width, i;
    memcpy(lanes, &v, sizeof lanes);
    for (width = NA_D_LANES / 2; width >= 1; width /= 2)
        for (i = 0; i < width; i++) lanes[i] += lanes[i + width];
    return lanes[0];
}

/* ---- sigmoid (see _norm_act_loops.h) ---- */

NA_INLINE NA_VT NA_ATTR NA_F(na_sigmoid)(NA_VT t) {
#if NA_IS_DOUBLE
    const double lowest = -708.39;  /* exp(lowest) > the smallest normal double */
    const double magic = 6755399441055744.0;  /* 1.5 * 2^52: adding it rounds to an integer */
    const int exponent_bias = 1023, mantissa_bits = 52;
#else
    const float lowest = -87.33f;
    const float magic = 12582912.0f;  /* 1.5 * 2^23 */
    const int exponent_bias = 127, mantissa_bits = 23;
#endif
    NA_VT a = NA_FROM_BITS(NA_BITS(t) | NA_SIGN_BIT);  /* -|t| */
    NA_VI underflow = NA_LT(a, NA_SPLAT(lowest));
    NA_VT clamped = NA_SEL(underflow, NA_SPLAT(lowest), a);
    /* a = n ln2 + r, |r| <= ln2 / 2; the rounded n sits in the low bits of `shifted` */
    NA_VT shifted = clamped * (NA_T)1.44269504088896340736 + magic;
    NA_VT n = shifted - magic;
#if NA_IS_DOUBLE
    NA_VT r = clamped - n * 6.93145751953125E-1 - n * 1.42860682030941723212E-6;
    NA_VT rr = r * r;
    NA_VT px = r * ((1.26177193074810590878E-4 * rr + 3.02994407707441961300E-2) * rr
                    + 9.99999999999999999910E-1);
    NA_VT qx = ((3.00198505138664455042E-6 * rr + 2.52448340349684104192E-3) * rr
                + 2.27265548208155028766E-1) * rr + 2.00000000000000000009E0;
    NA_VT p = 1.0 + 2.0 * px / (qx - px);
#else
    NA_VT r = clamped - n * 0.693359375f - n * -2.12194440e-4f;
    NA_VT p = 1.9875691500E-4f * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
#endif
    /* 2^n, built in the exponent field */
    NA_VI scale = NA_SHL(NA_BITS(shifted) - NA_BITS(NA_SPLAT(magic)) + exponent_bias,
                         mantissa_bits);
    NA_VT e = p * NA_FROM_BITS(scale);
    e = NA_FROM_BITS(~underflow & NA_BITS(e));  /* 0 below the normal range */
    NA_VT s = (NA_T)1 / ((NA_T)1 + e);
    NA_VI negative = NA_BITS(t) >> NA_SIGN_SHIFT;
    return NA_SEL(negative, e * s, s);
}

/* ---- one vector of elements; `mode` is a constant wherever these are inlined ---- */

/* The output: x * a + b, x * sigmoid(v x) * a + b, or max(x * a + b, tau). */
NA_INLINE NA_VT NA_ATTR NA_F(na_value)(NA_VT x, NA_VT a, NA_VT b, NA_VT v, NA_VT tau,
                                       const int mode) {
    NA_VT y;
    if (mode == NA_ACT) x = x * NA_F(na_sigmoid)(v * x);
    y = x * a + b;
    if (mode == NA_TLU) {
        y = NA_SEL(NA_LT(y, tau), tau, y);
        y = NA_SEL(NA_NE(tau, tau), tau, y);  /* NaN if either is, as torch.maximum */
    }
    return y;
}

/* torch.maximum(y, tau)'s gradients: all of dz to the larger, half each on a tie,
   all to both where one is NaN. */
NA_INLINE void NA_ATTR NA_F(na_tlu_gates)(NA_VT y, NA_VT tau, NA_VT dz, NA_VT* g_y,
                                          NA_VT* g_tau) {
    NA_VT half = NA_SEL(NA_EQ(y, tau), dz * (NA_T)0.5, dz);
    *g_y = NA_SEL(NA_LT(y, tau), NA_SPLAT(0), half);
    *g_tau = NA_SEL(NA_GT(y, tau), NA_SPLAT(0), half);
}

/* The terms of the backward's sums, for the gradient dz of the output:
   gu = g * u (u = x, or x * sigmoid(v x)), g (the gradient reaching x * a + b), and
   third = the gradient of tau (TLU) or dz * x^2 s (1 - s) (for v's gradient). */
NA_INLINE void NA_ATTR NA_F(na_grad_terms)(NA_VT dz, NA_VT x, NA_VT a, NA_VT b, NA_VT v,
                                           NA_VT tau, const int mode, NA_VT* gu, NA_VT* g,
                                           NA_VT* third) {
    if (mode == NA_TLU) {
        NA_F(na_tlu_gates)(x * a + b, tau, dz, g, third);
        *gu = *g * x;
    } else if (mode == NA_ACT) {
        NA_VT s = NA_F(na_sigmoid)(v * x);
        NA_VT dzx = dz * x;
        *g = dz;
        *gu = dzx * s;
        *third = dzx * x * (s * ((NA_T)1 - s));
    } else {
        *g = dz;
        *gu = dz * x;
        *third = NA_SPLAT(0);
    }
}

/* The input's gradient: g * a * d(u)/dx + (x - m) * k. */
NA_INLINE NA_VT NA_ATTR NA_F(na_grad_x)(NA_VT dz, NA_VT x, NA_VT a, NA_VT b, NA_VT v,
                                        NA_VT tau, NA_VT k, NA_VT m, const int mode) {
    NA_VT g = dz, unused;
    if (mode == NA_TLU) NA_F(na_tlu_gates)(x * a + b, tau, dz, &g, &unused);
    if (mode == NA_ACT) {
        NA_VT s = NA_F(na_sigmoid)(v * x);
        g = g * (s + v * x * (s * ((NA_T)1 - s)));
    }
    return g * a + (x - m) * k;
}

/* ---- runs: n consecutive values, scalar coefficients.
   A run of at least NA_LANES values ends with a vector that overlaps the one before it
   (its last `rest` lanes are new): a per-call cost of a few instructions, where moving a
   partial vector through a buffer cost more than the rest of a 49-value run (7x7 maps).
   The overlapping vector's inputs are loaded before anything is stored, so that an output
   may be the input itself; sums keep only its new lanes. ---- */

/* All bits set in the last `rest` lanes, 0 < rest < NA_LANES. */
NA_INLINE NA_VI NA_ATTR NA_F(na_last_lanes)(ptrdiff_t rest) {
#if NA_VECTORS
    NA_INT index[NA_LANES];
    NA_VI lanes;
    ptrdiff_t i;
    for (i = 0; i < NA_LANES; i++) index[i] = (NA_INT)i;
    memcpy(&lanes, index, sizeof lanes);
    return lanes >= (NA_INT)(NA_LANES - rest);
#else
    (void)rest;
    return -1;
#endif
}

NA_INLINE void NA_ATTR NA_F(na_stats_step)(NA_VT x, NA_VD centre, NA_VD* sums, NA_VD* squares) {
    NA_VD part[2];
    ptrdiff_t p;
    NA_F(na_widen)(x, &part[0], &part[1]);
    for (p = 0; p < NA_PARTS; p++) {
        NA_VD d = part[p] - centre;
        sums[p] += d;
        squares[p] += d * d;
    }
}

static void NA_ATTR NA_F(na_run_stats)(const NA_T* x, ptrdiff_t n, double pivot, double* sum,
                                       double* sum_sq) {
    NA_VD sums[2] = {NA_SPLAT_D(0), NA_SPLAT_D(0)}, squares[2] = {NA_SPLAT_D(0), NA_SPLAT_D(0)};
    const NA_VD centre = NA_SPLAT_D(pivot);
    const NA_VT fill = NA_SPLAT(pivot);  /* lanes that must not count hold the pivot: d = 0 */
    ptrdiff_t i;
    if (n < NA_LANES) {
        NA_F(na_stats_step)(NA_F(na_load_n)(x, n, (NA_T)pivot), centre, sums, squares);
    } else {
        for (i = 0; i + NA_LANES <= n; i += NA_LANES)
            NA_F(na_stats_step)(NA_F(na_load)(x + i), centre, sums, squares);
        if (i < n)
            NA_F(na_stats_step)(NA_SEL(NA_F(na_last_lanes)(n - i),
                                       NA_F(na_load)(x + n - NA_LANES), fill),
                                centre, sums, squares);
    }
    *sum = NA_F(na_hsum)(sums[0] + sums[1]);
    *sum_sq = NA_F(na_hsum)(squares[0] + squares[1]);
}

NA_INLINE void NA_ATTR NA_F(na_run_forward_mode)(const NA_T* x, NA_T* y, ptrdiff_t n, NA_T a,
                                                 NA_T b, NA_T v, NA_T tau, const int mode) {
    const NA_VT va = NA_SPLAT(a), vb = NA_SPLAT(b), vv = NA_SPLAT(v), vtau = NA_SPLAT(tau);
    NA_VT last;
    ptrdiff_t i;
    if (n < NA_LANES) {
        NA_F(na_store_n)(y, NA_F(na_value)(NA_F(na_load_n)(x, n, 0), va, vb, vv, vtau, mode), n);
        return;
    }
    last = NA_F(na_load)(x + n - NA_LANES);
    for (i = 0; i + NA_LANES <= n; i += NA_LANES)
        NA_F(na_store)(y + i, NA_F(na_value)(NA_F(na_load)(x + i), va, vb, vv, vtau, mode));
    if (i < n)
        NA_F(na_store)(y + n - NA_LANES, NA_F(na_value)(last, va, vb, vv, vtau, mode));
}

NA_INLINE void NA_ATTR NA_F(na_sums_step)(NA_VT dz, NA_VT x, NA_VT a, NA_VT b, NA_VT v,
                                          NA_VT tau, const int mode, NA_VI keep,
                                          NA_VD acc[3][2]) {
    NA_VT terms[3];
    NA_VD part[2];
    ptrdiff_t t, p;
    NA_F(na_grad_terms)(dz, x, a, b, v, tau, mode, &terms[0], &terms[1], &terms[2]);
    for (t = 0; t < 3; t++) {
        NA_F(na_widen)(NA_SEL(keep, terms[t], NA_SPLAT(0)), &part[0], &part[1]);
        for (p = 0; p < NA_PARTS; p++) acc[t][p] += part[p];
    }
}

NA_INLINE void NA_ATTR NA_F(na_run_backward_sums_mode)(
        const NA_T* dz, const NA_T* x, ptrdiff_t n, NA_T a, NA_T b, NA_T v, NA_T tau,
        const int mode, double* sum_gu, double* sum_g, double* sum_third) {
    const NA_VT va = NA_SPLAT(a), vb = NA_SPLAT(b), vv = NA_SPLAT(v), vtau = NA_SPLAT(tau);
    const NA_VI all = NA_EQ(NA_SPLAT(0), NA_SPLAT(0));
    NA_VD acc[3][2];
    ptrdiff_t i, t;
    for (t = 0; t < 3; t++) acc[t][0] = acc[t][1] = NA_SPLAT_D(0);
    if (n < NA_LANES) {
        /* lanes past the end: dz = 0 and x = 0, whose terms are 0 */
        NA_F(na_sums_step)(NA_F(na_load_n)(dz, n, 0), NA_F(na_load_n)(x, n, 0), va, vb, vv,
                           vtau, mode, all, acc);
    } else {
        for (i = 0; i + NA_LANES <= n; i += NA_LANES)
            NA_F(na_sums_step)(NA_F(na_load)(dz + i), NA_F(na_load)(x + i), va, vb, vv, vtau,
                               mode, all, acc);
        if (i < n)
            NA_F(na_sums_step)(NA_F(na_load)(dz + n - NA_LANES), NA_F(na_load)(x + n - NA_LANES),
                               va, vb, vv, vtau, mode, NA_F(na_last_lanes)(n - i), acc);
    }
    *sum_gu = NA_F(na_hsum)(acc[0][0] + acc[0][1]);
    *sum_g = NA_F(na_hsum)(acc[1][0] + acc[1][1]);
    *sum_third = NA_F(na_hsum)(acc[2][0] + acc[2][1]);
}

NA_INLINE void NA_ATTR NA_F(na_run_backward_dx_mode)(
        const NA_T* dz, const NA_T* x, NA_T* dx, ptrdiff_t n, NA_T a, NA_T b, NA_T v, NA_T tau,
        NA_T k, NA_T m, const int mode) {
    const NA_VT va = NA_SPLAT(a), vb = NA_SPLAT(b), vv = NA_SPLAT(v), vtau = NA_SPLAT(tau);
    const NA_VT vk = NA_SPLAT(k), vm = NA_SPLAT(m);
    NA_VT last_dz, last_x;
    ptrdiff_t i;
    if (n < NA_LANES) {
        NA_F(na_store_n)(dx, NA_F(na_grad_x)(NA_F(na_load_n)(dz, n, 0), NA_F(na_load_n)(x, n, 0),
                                             va, vb, vv, vtau, vk, vm, mode), n);
        return;
    }
    last_dz = NA_F(na_load)(dz + n - NA_LANES);
    last_x = NA_F(na_load)(x + n - NA_LANES);
    for (i = 0; i + NA_LANES <= n; i += NA_LANES)
        NA_F(na_store)(dx + i, NA_F(na_grad_x)(NA_F(na_load)(dz + i), NA_F(na_load)(x + i), va, vb,
                                               vv, vtau, vk, vm, mode));
    if (i < n)
        NA_F(na_store)(dx + n - NA_LANES, NA_F(na_grad_x)(last_dz, last_x, va, vb, vv, vtau, vk,
                                                          vm, mode));
}

/* ---- tiles: `rows` rows of `width` values, row r at r * stride, coefficients per column.
   v and tau are read only in the modes that use them (they may be NULL otherwise). ---- */

static void NA_ATTR NA_F(na_tile_stats)(const NA_T* x, ptrdiff_t rows, ptrdiff_t stride,
                                        ptrdiff_t width, const double* pivot, double* sum,
                                        double* sum_sq) {
    ptrdiff_t r, c, p;
    NA_VD part[2];
    for (r = 0; r < rows; r++, x += stride)
        for (c = 0; c < width; c += NA_LANES) {
            NA_F(na_widen)(NA_F(na_load_n)(x + c, width - c, 0), &part[0], &part[1]);
            for (p = 0; p < NA_PARTS; p++) {
                ptrdiff_t first = c + p * NA_D_LANES;
                NA_VD d;
                if (first >= width) break;
                d = part[p] - NA_F(na_load_d_n)(pivot + first, width - first);
                NA_F(na_add_d_n)(sum + first, d, width - first);
                NA_F(na_add_d_n)(sum_sq + first, d * d, width - first);
            }
        }
}

NA_INLINE void NA_ATTR NA_F(na_tile_forward_mode)(
        const NA_T* x, NA_T* y, ptrdiff_t rows, ptrdiff_t stride, ptrdiff_t width,
        const NA_T* a, const NA_T* b, const NA_T* v, const NA_T* tau, const int mode) {
    ptrdiff_t r, c;
    for (r = 0; r < rows; r++, x += stride, y += stride)
        for (c = 0; c < width; c += NA_LANES) {
            ptrdiff_t n = width - c;
            NA_VT vv = mode == NA_ACT ? NA_F(na_load_n)(v + c, n, 0) : NA_SPLAT(0);
            NA_VT vtau = mode == NA_TLU ? NA_F(na_load_n)(tau + c, n, 0) : NA_SPLAT(0);
            NA_F(na_store_n)(y + c, NA_F(na_value)(NA_F(na_load_n)(x + c, n, 0),
                                                   NA_F(na_load_n)(a + c, n, 0),
                                                   NA_F(na_load_n)(b + c, n, 0), vv, vtau,
                                                   mode), n);
        }
}

NA_INLINE void NA_ATTR NA_F(na_tile_backward_sums_mode)(
        const NA_T* dz, const NA_T* x, ptrdiff_t rows, ptrdiff_t stride, ptrdiff_t width,
        const NA_T* a, const NA_T* b, const NA_T* v, const NA_T* tau, const int mode,
        double* sum_gu, double* sum_g, double* sum_third) {
    ptrdiff_t r, c;
    for (r = 0; r < rows; r++, dz += stride, x += stride)
        for (c = 0; c < width; c += NA_LANES) {
            ptrdiff_t n = width - c;
            NA_VT gu, g, third;
            NA_VT vv = mode == NA_ACT ? NA_F(na_load_n)(v + c, n, 0) : NA_SPLAT(0);
            NA_VT vtau = mode == NA_TLU ? NA_F(na_load_n)(tau + c, n, 0) : NA_SPLAT(0);
            NA_F(na_grad_terms)(NA_F(na_load_n)(dz + c, n, 0), NA_F(na_load_n)(x + c, n, 0),
                                NA_F(na_load_n)(a + c, n, 0), NA_F(na_load_n)(b + c, n, 0), vv,
                                vtau, mode, &gu, &g, &third);
            NA_F(na_accumulate)(sum_gu + c, gu, n);
            NA_F(na_accumulate)(sum_g + c, g, n);
            if (mode != NA_PLAIN) NA_F(na_accumulate)(sum_third + c, third, n);
        }
}

NA_INLINE void NA_ATTR NA_F(na_tile_backward_dx_mode)(
        const NA_T* dz, const NA_T* x, NA_T* dx, ptrdiff_t rows, ptrdiff_t stride,
        ptrdiff_t width, const NA_T* a, const NA_T* b, const NA_T* v, const NA_T* tau,
        const NA_T* k, const NA_T* m, const int mode) {
    ptrdiff_t r, c;
    for (r = 0; r < rows; r++, dz += stride, x += stride, dx += stride)
        for (c = 0; c < width; c += NA_LANES) {
            ptrdiff_t n = width - c;
            NA_VT vv = mode == NA_ACT ? NA_F(na_load_n)(v + c, n, 0) : NA_SPLAT(0);
            NA_VT vtau = mode == NA_TLU ? NA_F(na_load_n)(tau + c, n, 0) : NA_SPLAT(0);
            NA_F(na_store_n)(dx + c, NA_F(na_grad_x)(
                NA_F(na_load_n)(dz + c, n, 0), NA_F(na_load_n)(x + c, n, 0),
                NA_F(na_load_n)(a + c, n, 0), NA_F(na_load_n)(b + c, n, 0), vv, vtau,
                NA_F(na_load_n)(k + c, n, 0), NA_F(na_load_n)(m + c, n, 0), mode), n);
        }
}

/* ---- the mode as a constant: one specialised copy of each loop per mode ---- */

#define NA_BY_MODE(call) \
    switch (mode) { \
        case NA_TLU: call(NA_TLU); break; \
        case NA_ACT: call(NA_ACT); break; \
        default: call(NA_PLAIN); break; \
    }

static void NA_ATTR NA_F(na_run_forward)(const NA_T* x, NA_T* y, ptrdiff_t n, NA_T a, NA_T b,
                                         NA_T v, NA_T tau, int mode) {
#define NA_CALL(M) NA_F(na_run_forward_mode)(x, y, n, a, b, v, tau, M)
    NA_BY_MODE(NA_CALL)
#undef NA_CALL
}

static void NA_ATTR NA_F(na_run_backward_sums)(const NA_T* dz, const NA_T* x, ptrdiff_t n,
                                               NA_T a, NA_T b, NA_T v, NA_T tau, int mode,
                                               double* sum_gu, double* sum_g,
                                               double* sum_third) {
#define NA_CALL(M) \
    NA_F(na_run_backward_sums_mode)(dz, x, n, a, b, v, tau, M, sum_gu, sum_g, sum_third)
    NA_BY_MODE(NA_CALL)
#undef NA_CALL
}

static void NA_ATTR NA_F(na_run_backward_dx)(const NA_T* dz, const NA_T* x, NA_T* dx,
                                             ptrdiff_t n, NA_T a, NA_T b, NA_T v, NA_T tau,
                                             NA_T k, NA_T m, int mode) {
#define NA_CALL(M) NA_F(na_run_backward_dx_mode)(dz, x, dx, n, a, b, v, tau, k, m, M)
    NA_BY_MODE(NA_CALL)
#undef NA_CALL
}

static void NA_ATTR NA_F(na_tile_forward)(const NA_T* x, NA_T* y, ptrdiff_t rows,
                                          ptrdiff_t stride, ptrdiff_t width, const NA_T* a,
                                          const NA_T* b, const NA_T* v, const NA_T* tau,
                                          int mode) {
#define NA_CALL(M) NA_F(na_tile_forward_mode)(x, y, rows, stride, width, a, b, v, tau, M)
    NA_BY_MODE(NA_CALL)
#undef NA_CALL
}

static void NA_ATTR NA_F(na_tile_backward_sums)(
        const NA_T* dz, const NA_T* x, ptrdiff_t rows, ptrdiff_t stride, ptrdiff_t width,
        const NA_T* a, const NA_T* b, const NA_T* v, const NA_T* tau, int mode,
        double* sum_gu, double* sum_g, double* sum_third) {
#define NA_CALL(M) NA_F(na_tile_backward_sums_mode)(dz, x, rows, stride, width, a, b, v, tau, \
                                                    M, sum_gu, sum_g, sum_third)
    NA_BY_MODE(NA_CALL)
#undef NA_CALL
}

static void NA_ATTR NA_F(na_tile_backward_dx)(
        const NA_T* dz, const NA_T* x, NA_T* dx, ptrdiff_t rows, ptrdiff_t stride,
        ptrdiff_t width, const NA_T* a, const NA_T* b, const NA_T* v, const NA_T* tau,
        const NA_T* k, const NA_T* m, int mode) {
#define NA_CALL(M) NA_F(na_tile_backward_dx_mode)(dz, x, dx, rows, stride, width, a, b, v, \
                                                  tau, k, m, M)
    NA_BY_MODE(NA_CALL)
#undef NA_CALL
}

#undef NA_BY_MODE
#undef NA_F
#undef NA_INT
#undef NA_UINT
#undef NA_SIGN_BIT
#undef NA_SIGN_SHIFT
#undef NA_LANES
#undef NA_D_LANES
#undef NA_VT
#undef NA_VI
#undef NA_VU
#undef NA_VD
#undef NA_VH
#undef NA_SPLAT
#undef NA_SPLAT_D
#undef NA_BITS
#undef NA_FROM_BITS
#undef NA_SHL
#undef NA_LT
#undef NA_GT
#undef NA_EQ
#undef NA_NE
#undef NA_SEL
#undef NA_PARTS
#undef NA_T
#undef NA_IS_DOUBLE
#undef NA_ISA
#undef NA_BYTES
#undef NA_ATTR
