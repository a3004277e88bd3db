/* The merge's and the check's passes over a block of rows, each element made and judged in one pass, in registers
   and L1 cache: the low-rank product, its sum with BASE's element, the rounding, and the proof.

   An optional accelerator: lora_merge/kernels/plain.py does the same in numpy (the product by BLAS), and the two
   give the same bytes (an element is written only where its value is proven to round to it; the others are
   flagged and the caller rounds them exactly). Each function takes C-contiguous blocks of `rows` x `width`
   elements, the left factors L (rows x r) and the right ones R, packed by blocks of COLS columns (blocks x r x
   COLS, zero past the last column):

   merge16 / merge32  y = w + p, p = L @ R, rounded to bfloat16 or float16 (computed in float32) or to float32
                      (computed in float64). An element is flagged when its error bound E = c |y| + ct m + slack
                      (m = Σ|L||R|, the product's terms' sizes) can reach a rounding midpoint of the output dtype, is
                      too large for only the nearest midpoint to matter, or y is not finite or near the largest
                      finite value.
   check16 / check32  v = w + q, q = L @ R the check's own product; a stored element o passes when |v - o| + E (as
                      above) is less than half the spacing of the output dtype at o on the side where the exact
                      value can be (o is then the value nearest it); the others are flagged, for the caller to
                      measure exactly. `sums` gets the survival of the change d = v - w in the stored s = o - w: sums
                      of d², s², (s - d)², s·d and of the elements where s != 0.
   trip               an unmerge's round trip (any output dtype): `u` the unmerged model's elements, `merged` the merged model's M,
                      L @ R the adapter's delta. u is certainly the original when it merges to M and neither of its
                      neighbours in the dtype does (each judged as the check judges, a sum that cannot be judged
                      either way flagged); with `orig` (else empty), the elements bit-identical to it and the worst
                      |u - orig| in units in the last place at max(|orig|, |M|). `stats` gets: certain, identical,
                      worst.

   The flagged elements' flat indices go to `idx`; the count is returned (when it exceeds idx's capacity, the
   caller decides every element itself). */

#include "_common.h"

/* Every tile function: rows x width elements; L (rows x r) the left factors, R packed (blocks x r x COLS); the error
   bound of an element is c |y| + ct m + slack, m its terms' sizes; flagged flat indices to X (capacity cap); returns
   their count. */

/* --------------------------------------------------------------------------------- 16-bit formats */

INLINE float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    float special = u2f(sign | 0x7F800000u | (m << 13));            /* infinity, NaN */
    float sub = copysignf((float)(int32_t)m * 0x1p-24f, u2f(sign));  /* exact: m < 2^10 */
    float normal = u2f(sign | ((e + 112) << 23) | (m << 13));
    return e == 0x1F ? special : (e == 0 ? sub : normal);
}

/* float32 to float16, to nearest even: normal, subnormal, overflow to infinity, NaN kept a NaN (branch-free, so that
   the loops using it vectorize) */
INLINE uint16_t float_to_half(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFF;
    uint32_t r = a - (112u << 23);
    uint32_t normal = (r + 0xFFF + ((r >> 13) & 1)) >> 13;
    /* a subnormal float16: the nearest multiple of 2^-24, ties to even (adding and taking away 2^23 rounds a float
       below 2^23 to an integer, to nearest even; the scaling by 2^24 is exact) */
    float q = smaller(u2f(a) * 0x1p24f, 0x1p20f);
    uint32_t sub = (uint32_t)(int32_t)((q + 0x1p23f) - 0x1p23f);
    uint32_t h = a >= 0x38800000u ? normal : sub;
    h = a >= 0x477FF000u ? 0x7C00u : h;  /* from 65520 on: infinity */
    h = a > 0x7F800000u ? 0x7E00u : h;   /* NaN */
    return (uint16_t)(sign | h);
}

INLINE float load16(const int in_kind, const void *w, I i) {
    if (in_kind == BF16) return u2f((uint32_t)((const uint16_t *)w)[i] << 16);
    if (in_kind == F16) return half_to_float(((const uint16_t *)w)[i]);
    return ((const float *)w)[i];
}

INLINE double load64(const int in_kind, const void *w, I i) {
    return in_kind == F32 ? (double)((const float *)w)[i] : (double)load16(in_kind, w, i);
}


/* the rounding midpoint of the output dtype nearest y, with y's sign */
INLINE float midpoint16(const int kind, float y) {
    uint32_t u = f2u(y);
    if (kind == BF16) return u2f((u & 0xFFFF0000u) | 0x8000u);
    float q = smaller(fabsf(y) * 0x1p24f, 0x1p20f);  /* subnormal float16: spacing 2^-24 */
    float sub = copysignf(((float)(int32_t)q + 0.5f) * 0x1p-24f, y);
    return (u & 0x7FFFFFFF) >= 0x38800000u ? u2f((u & 0xFFFFE000u) | 0x1000u) : sub;
}

INLINE uint16_t round16(const int kind, float y) {
    if (kind == F16) return float_to_half(y);
    uint32_t u = f2u(y);
    uint32_t r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFF) > 0x7F800000u ? ((u >> 16) | 0x40) : r);  /* a NaN stays a NaN */
}

/* Only the midpoint nearest y matters while E is below a quarter of the spacing, which is more than |y| 2^-8
   (bfloat16) or 2^-11 (float16); an exact zero with no error needs no rounding */
INLINE int flag16(const int kind, float y, float e) {
    float a = fabsf(y), d = fabsf(y - midpoint16(kind, y));
    float quarter = kind == BF16 ? 0x1p-10f : 0x1p-13f, top = kind == BF16 ? 0x1.fep127f : 65000.0f;
    return !(d > e) | !(e <= a * quarter) | !(a < top);
}

INLINE I merge16_tile(const int kind, const int in_kind, const void *w, const float *L, const float *R, I r,
                      float ct, float slack, I rows, I width, float c, uint16_t *O, int64_t *X, I cap) {
    I nflag = 0, nb = (width + COLS - 1) / COLS;
    float p[COLS], m[COLS];
    uint8_t fl[COLS];
    for (I g = 0; g < rows; g += GROUP)  /* a group of rows per block of columns: R's block stays in L1 */
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS, n = j0 + COLS < width ? COLS : width - j0;
        for (I i = g; i < rows && i < g + GROUP; i++) {
            I base = i * width + j0;
            if (r) product32(L + i * r, R + b * r * COLS, r, p, m);
            else memset(p, 0, sizeof p), memset(m, 0, sizeof m);
            uint8_t any = 0;
            for (I j = 0; j < n; j++) {
                float y = add(load16(in_kind, w, base + j), p[j]);
                O[base + j] = round16(kind, y);
                uint8_t f = (uint8_t)flag16(kind, y, c * fabsf(y) + (ct * m[j] + slack));
                fl[j] = f;
                any |= f;
            }
            if (any)
                for (I j = 0; j < n; j++)
                    if (fl[j]) {
                        if (nflag < cap) X[nflag] = base + j;
                        nflag++;
                    }
        }
    }
    return nflag;
}

HOT static I merge16_run(int kind, int in_kind, const void *w, const float *L, const float *R, I r, float ct, float slack,
                         I rows, I width, float c, uint16_t *O, int64_t *X, I cap) {
    switch (kind * 3 + in_kind) {
    case 0: return merge16_tile(BF16, BF16, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    case 1: return merge16_tile(BF16, F16, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    case 2: return merge16_tile(BF16, F32, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    case 3: return merge16_tile(F16, BF16, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    case 4: return merge16_tile(F16, F16, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    default: return merge16_tile(F16, F32, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    }
}

/* float32 midpoints drop 29 bits of a float64, in the normal range (spacing more than |y| 2^-24), whose ends are
   flagged; an exact zero with no error needs no rounding */
INLINE int flag32(double y, double e) {
    double m = u2d((d2u(y) & 0xFFFFFFFFE0000000ull) | 0x10000000ull);
    double a = fabs(y), d = fabs(y - m);
    return !(d > e) | !(e <= a * 0x1p-26) | !(a < 0x1.fffffcp127) | (!(a >= 0x1p-126) & !((a == 0.0) & (e == 0.0)));
}

INLINE I merge32_tile(const int in_kind, const void *w, const double *L, const double *R, I r, double ct,
                      double slack, I rows, I width, double c, float *O, int64_t *X, I cap) {
    I nflag = 0, nb = (width + COLS - 1) / COLS;
    double p[COLS], m[COLS];
    uint8_t fl[COLS];
    for (I g = 0; g < rows; g += GROUP)  /* a group of rows per block of columns: R's block stays in L1 */
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS, n = j0 + COLS < width ? COLS : width - j0;
        for (I i = g; i < rows && i < g + GROUP; i++) {
            I base = i * width + j0;
            if (r) product64(L + i * r, R + b * r * COLS, r, p, m);
            else memset(p, 0, sizeof p), memset(m, 0, sizeof m);
            uint8_t any = 0;
            for (I j = 0; j < n; j++) {
                double y = add64(load64(in_kind, w, base + j), p[j]);
                O[base + j] = (float)y;  /* the hardware's float64 -> float32: once, to nearest even */
                uint8_t f = (uint8_t)flag32(y, c * fabs(y) + (ct * m[j] + slack));
                fl[j] = f;
                any |= f;
            }
            if (any)
                for (I j = 0; j < n; j++)
                    if (fl[j]) {
                        if (nflag < cap) X[nflag] = base + j;
                        nflag++;
                    }
        }
    }
    return nflag;
}

HOT static I merge32_run(int in_kind, const void *w, const double *L, const double *R, I r, double ct, double slack,
                         I rows, I width, double c, float *O, int64_t *X, I cap) {
    switch (in_kind) {
    case BF16: return merge32_tile(BF16, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    case F16: return merge32_tile(F16, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    default: return merge32_tile(F32, w, L, R, r, ct, slack, rows, width, c, O, X, cap);
    }
}

/* ---------------------------------------------------------------------------------------- the check */

/* half the spacing of a 16-bit format at the stored o, toward zero (`below`) or away from it: below a power of two
   the spacing is half the one above it; 0 for infinity and NaN, which never pass */
INLINE float half_spacing16(const int kind, uint16_t o, int below) {
    const int mbits = kind == BF16 ? 7 : 10, ebits = kind == BF16 ? 8 : 5, bias = kind == BF16 ? 127 : 15;
    int e = (o >> mbits) & ((1 << ebits) - 1);
    int p = (e == 0 ? 1 : e) - bias - mbits - 1;  /* h = 2^p, from -134 (bfloat16 subnormals) up */
    float h = p > -64 ? u2f((uint32_t)(p + 127) << 23) : u2f((uint32_t)(p + 127 + 64) << 23) * 0x1p-64f;
    h = below & ((o & ((1u << mbits) - 1)) == 0) & (e > 1) ? h * 0.5f : h;
    return e == (1 << ebits) - 1 ? 0.0f : h;
}

INLINE I check16_tile(const int kind, const int in_kind, const void *w, const float *L, const float *R, I r,
                      float ct, float slack, I rows, I width, float c, const uint16_t *S, int64_t *X, I cap,
                      double *sums) {
    I nflag = 0, nb = (width + COLS - 1) / COLS;
    float q[COLS], m[COLS];
    uint8_t fl[COLS];
    for (I g = 0; g < rows; g += GROUP)  /* a group of rows per block of columns: R's block stays in L1 */
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS, n = j0 + COLS < width ? COLS : width - j0;
        for (I i = g; i < rows && i < g + GROUP; i++) {
            I base = i * width + j0;
            if (r) product32(L + i * r, R + b * r * COLS, r, q, m);
            else memset(q, 0, sizeof q), memset(m, 0, sizeof m);
            uint8_t any = 0;
            float base0[COLS], stored32[COLS];
            for (I j = 0; j < n; j++) {
                float w0 = load16(in_kind, w, base + j), v = add(w0, q[j]);
                uint16_t o = S[base + j];
                float o32 = kind == BF16 ? u2f((uint32_t)o << 16) : half_to_float(o);
                float e = c * fabsf(v) + (ct * m[j] + slack), room = fabsf(v - o32) + e;
                /* the exact value may lie below |o| unless v is clear above it: then the smaller spacing holds */
                uint8_t f = !(room < half_spacing16(kind, o, !(fabsf(v) >= fabsf(o32) + e)));  /* NaN, inf fail */
                fl[j] = f;
                any |= f;
                base0[j] = w0;
                stored32[j] = o32;
                q[j] = v;
            }
            float dd = 0, rr = 0, ee = 0, rd = 0, changed = 0;
#pragma omp simd reduction(+ : dd, rr, ee, rd, changed)
            for (I j = 0; j < n; j++) {  /* the exact change (estimated), and the stored one */
                float d = q[j] - base0[j], s = stored32[j] - base0[j], e = s - d;
                dd += d * d; rr += s * s; ee += e * e; rd += s * d; changed += s != 0.0f ? 1.0f : 0.0f;
            }
            sums[0] += dd; sums[1] += rr; sums[2] += ee; sums[3] += rd; sums[4] += changed;
            if (any)
                for (I j = 0; j < n; j++)
                    if (fl[j]) {
                        if (nflag < cap) X[nflag] = base + j;
                        nflag++;
                    }
        }
    }
    return nflag;
}

HOT static I check16_run(int kind, int in_kind, const void *w, const float *L, const float *R, I r, float ct,
                         float slack, I rows, I width, float c, const uint16_t *S, int64_t *X, I cap, double *sums) {
    switch (kind * 3 + in_kind) {
    case 0: return check16_tile(BF16, BF16, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    case 1: return check16_tile(BF16, F16, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    case 2: return check16_tile(BF16, F32, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    case 3: return check16_tile(F16, BF16, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    case 4: return check16_tile(F16, F16, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    default: return check16_tile(F16, F32, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    }
}

INLINE double half_spacing32(float o, int below) {
    uint32_t u = f2u(o);
    int e = (u >> 23) & 0xFF;
    double h = u2d((uint64_t)((e == 0 ? 1 : e) - 127 - 23 - 1 + 1023) << 52);
    h = below & ((u & 0x7FFFFF) == 0) & (e > 1) ? h * 0.5 : h;
    return e == 0xFF ? 0.0 : h;
}

INLINE I check32_tile(const int in_kind, const void *w, const double *L, const double *R, I r, double ct,
                      double slack, I rows, I width, double c, const float *S, int64_t *X, I cap, double *sums) {
    I nflag = 0, nb = (width + COLS - 1) / COLS;
    double q[COLS], m[COLS];
    uint8_t fl[COLS];
    for (I g = 0; g < rows; g += GROUP)  /* a group of rows per block of columns: R's block stays in L1 */
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS, n = j0 + COLS < width ? COLS : width - j0;
        for (I i = g; i < rows && i < g + GROUP; i++) {
            I base = i * width + j0;
            if (r) product64(L + i * r, R + b * r * COLS, r, q, m);
            else memset(q, 0, sizeof q), memset(m, 0, sizeof m);
            uint8_t any = 0;
            double base0[COLS];
            for (I j = 0; j < n; j++) {
                double w0 = load64(in_kind, w, base + j), v = add64(w0, q[j]);
                float o = S[base + j];
                double e = c * fabs(v) + (ct * m[j] + slack), room = fabs(v - (double)o) + e;
                uint8_t f = !(room < half_spacing32(o, !(fabs(v) >= fabs((double)o) + e)));
                fl[j] = f;
                any |= f;
                base0[j] = w0;
                q[j] = v;
            }
            double dd = 0, rr = 0, ee = 0, rd = 0, changed = 0;
#pragma omp simd reduction(+ : dd, rr, ee, rd, changed)
            for (I j = 0; j < n; j++) {
                double d = q[j] - base0[j], s = (double)S[base + j] - base0[j], e = s - d;
                dd += d * d; rr += s * s; ee += e * e; rd += s * d; changed += s != 0.0 ? 1.0 : 0.0;
            }
            sums[0] += dd; sums[1] += rr; sums[2] += ee; sums[3] += rd; sums[4] += changed;
            if (any)
                for (I j = 0; j < n; j++)
                    if (fl[j]) {
                        if (nflag < cap) X[nflag] = base + j;
                        nflag++;
                    }
        }
    }
    return nflag;
}

HOT static I check32_run(int in_kind, const void *w, const double *L, const double *R, I r, double ct, double slack,
                         I rows, I width, double c, const float *S, int64_t *X, I cap, double *sums) {
    switch (in_kind) {
    case BF16: return check32_tile(BF16, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    case F16: return check32_tile(F16, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    default: return check32_tile(F32, w, L, R, r, ct, slack, rows, width, c, S, X, cap, sums);
    }
}

/* ---------------------------------------------------------------------------------------- Python side */

/* Arguments: (kind,) w, in_kind, L, R, r, ct, slack, rows, width, c, out or stored, idx (, sums): every buffer
   checked against the sizes it must have (`sized`). */
static PyObject *run(PyObject *args, int wide, int check) {
    int kind = 0, in_kind;
    Py_buffer w, L, R, o, idx, sums = {0};
    I r, rows, width;
    double ct, slack, c;
    /* a merge writes `out`; a check only reads the stored elements, and adds to its survival `sums` */
    int ok = wide ? (check ? PyArg_ParseTuple(args, "y*iy*y*nddnndy*w*w*", &w, &in_kind, &L, &R, &r, &ct, &slack, &rows,
                                              &width, &c, &o, &idx, &sums)
                           : PyArg_ParseTuple(args, "y*iy*y*nddnndw*w*", &w, &in_kind, &L, &R, &r, &ct, &slack, &rows,
                                              &width, &c, &o, &idx))
                  : (check ? PyArg_ParseTuple(args, "iy*iy*y*nddnndy*w*w*", &kind, &w, &in_kind, &L, &R, &r, &ct, &slack,
                                              &rows, &width, &c, &o, &idx, &sums)
                           : PyArg_ParseTuple(args, "iy*iy*y*nddnndw*w*", &kind, &w, &in_kind, &L, &R, &r, &ct, &slack,
                                              &rows, &width, &c, &o, &idx));
    if (!ok) return NULL;
    I n = rows * width, nb = (width + COLS - 1) / COLS, item = wide ? 8 : 4, nflag = -1;
    int in_size = in_kind == F32 ? 4 : 2;
    if (r < 0 || rows < 0 || width < 0 || in_kind < 0 || in_kind > 2 || kind < 0 || kind > 1)
        PyErr_SetString(PyExc_ValueError, "bad tile arguments");
    else if (sized(&w, n, in_size, "w") && sized(&L, rows * r, item, "L") && sized(&R, nb * r * COLS, item, "R") &&
             sized(&o, n, wide ? 4 : 2, "out") && sized(&idx, 0, 8, "idx") && (!check || sized(&sums, 5, 8, "sums"))) {
        I cap = idx.len / 8;
        Py_BEGIN_ALLOW_THREADS
        if (wide && check)
            nflag = check32_run(in_kind, w.buf, L.buf, R.buf, r, ct, slack, rows, width, c, o.buf, idx.buf, cap,
                                sums.buf);
        else if (wide)
            nflag = merge32_run(in_kind, w.buf, L.buf, R.buf, r, ct, slack, rows, width, c, o.buf, idx.buf, cap);
        else if (check)
            nflag = check16_run(kind, in_kind, w.buf, L.buf, R.buf, r, (float)ct, (float)slack, rows, width, (float)c,
                                o.buf, idx.buf, cap, sums.buf);
        else
            nflag = merge16_run(kind, in_kind, w.buf, L.buf, R.buf, r, (float)ct, (float)slack, rows, width, (float)c,
                                o.buf, idx.buf, cap);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&w); PyBuffer_Release(&L); PyBuffer_Release(&R); PyBuffer_Release(&o); PyBuffer_Release(&idx);
    if (check) PyBuffer_Release(&sums);
    return nflag < 0 ? NULL : PyLong_FromSsize_t(nflag);
}

/* gather(flat, w, in_kind, L, RT, scales, width, base, delta, size): for each flat index f (row f / width, column
   f % width) of a block, BASE's element, the delta sum_k scale_k L[row][k] RT[col][k] and the size
   |w| + sum_k |scale_k L RT| for its error bound, in float64: each product of two float32 factors is exact there.
   RT is R transposed (width x r), so that one element's factors lie side by side. */
static PyObject *gather(PyObject *self, PyObject *args) {
    Py_buffer f, w, L, R, s, base, delta, size;
    int in_kind;
    I width;
    if (!PyArg_ParseTuple(args, "y*y*iy*y*y*nw*w*w*", &f, &w, &in_kind, &L, &R, &s, &width, &base, &delta, &size))
        return NULL;
    I n = f.len / 8, r = s.len / 8;
    int ok = width > 0 && base.len >= n * 8 && delta.len >= n * 8 && size.len >= n * 8 && R.len >= r * width * 4;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        const int64_t *F = f.buf;
        const float *LL = L.buf, *RR = R.buf;
        const double *S = s.buf;
        double *B = base.buf, *D = delta.buf, *Z = size.buf;
        for (I k = 0; k < n; k++) {
            I i = F[k] / width, j = F[k] % width;
            double w0 = load64(in_kind, w.buf, F[k]), d = 0.0, z = fabs(w0);
            for (I t = 0; t < r; t++) {
                double x = (double)LL[i * r + t] * (double)RR[j * r + t];
                d += S[t] * x;
                z += fabs(S[t] * x);
            }
            B[k] = w0; D[k] = d; Z[k] = z;
        }
        Py_END_ALLOW_THREADS
    } else
        PyErr_SetString(PyExc_ValueError, "gather: buffers too small");
    PyBuffer_Release(&f); PyBuffer_Release(&w); PyBuffer_Release(&L); PyBuffer_Release(&R); PyBuffer_Release(&s);
    PyBuffer_Release(&base); PyBuffer_Release(&delta); PyBuffer_Release(&size);
    return ok ? Py_NewRef(Py_None) : NULL;
}

/* The exact sum of x[0..n), rounded once to the nearest double, ties to even: Python's math.fsum, step for step
   (Shewchuk's partials, each sum of two doubles kept exactly as a rounded sum and its error, then their sum rounded
   once, half-way cases carried across partials). `p` holds n doubles of scratch. No term may be infinite, and the
   partial sums must stay finite: the caller keeps every term within 2^1000. */
static double fsum(const double *x, I n, double *p) {
    I m = 0;
    for (I k = 0; k < n; k++) {
        double a = x[k];
        I i = 0;
        for (I j = 0; j < m; j++) {
            double b = p[j];
            if (fabs(a) < fabs(b)) { double t = a; a = b; b = t; }
            double hi = a + b, lo = b - (hi - a);
            if (lo != 0.0) p[i++] = lo;
            a = hi;
        }
        m = i;
        if (a != 0.0) p[m++] = a;
    }
    double hi = 0.0, lo = 0.0;
    if (m > 0) {
        hi = p[--m];
        while (m > 0) {  /* from the top, until a sum is inexact */
            double a = hi, b = p[--m];
            hi = a + b;
            lo = b - (hi - a);
            if (lo != 0.0) break;
        }
        if (m > 0 && ((lo < 0.0 && p[m - 1] < 0.0) || (lo > 0.0 && p[m - 1] > 0.0))) {  /* half-way, carried */
            double b = lo * 2.0, a = hi + b;
            if (b == a - hi) hi = a;
        }
    }
    return hi;
}

#define EXACT_TOP 0x1p1000
#define EXACT_LOW 0x1p-900

/* exact(flat, width, L, RT, scales, w, out): for each flat index f of a block (row f / width, column f % width), the
   exact value of w + sum_k scale_k L[row][k] RT[col][k] rounded to odd: itself where it is a double, else of its two
   neighbouring doubles the one whose last bit is odd. Each product of two float32 factors is exact in a double, its
   product with the scale splits exactly into a rounded product and its error (a fused multiply-add), the terms'
   sum rounded to nearest (fsum) and the sign of what that rounding left (fsum once more) give the odd rounding. So
   any rounding to a grid whose boundaries are doubles of at most 52 significant bits (a 16-bit or float32 value's
   midpoints, FP8 or MXFP4 codes at a scale, a block's scale) gives from out what it gives from the exact value.
   NaN where the split cannot be exact in doubles (a product's error below their range: a scale under about
   2^-600) or a term reaches 2^1000: the caller decides those otherwise. */
HOT static void exact_run(const int64_t *F, I n, I width, const float *L, const float *RT, const double *S, I r,
                          const double *W, double *out, double *terms) {
    for (I k = 0; k < n; k++) {
        I i = F[k] / width, j = F[k] % width, count = 0;
        int ok = fabs(W[k]) <= EXACT_TOP;
        terms[count++] = W[k];
        for (I t = 0; t < r; t++) {
            double x = (double)L[i * r + t] * (double)RT[j * r + t], p = x * S[t];
            if (p == 0.0 && (x == 0.0 || S[t] == 0.0)) continue;
            ok &= fabs(p) >= EXACT_LOW && fabs(p) <= EXACT_TOP;
            terms[count++] = p;
            terms[count++] = fma(x, S[t], -p);
        }
        if (!ok) { out[k] = NAN; continue; }
        double nearest = fsum(terms, count, terms + count + 1);
        terms[count] = -nearest;
        double left = fsum(terms, count + 1, terms + count + 1);
        if (left != 0.0 && (d2u(nearest) & 1) == 0) nearest = nextafter(nearest, left > 0.0 ? INFINITY : -INFINITY);
        out[k] = nearest;
    }
}

static PyObject *exact(PyObject *self, PyObject *args) {
    Py_buffer f, L, R, s, w, out;
    I width;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*y*w*", &f, &width, &L, &R, &s, &w, &out)) return NULL;
    I n = f.len / 8, r = s.len / 8;
    double *terms = NULL;
    int ok = width > 0 && R.len >= r * width * 4 && sized(&w, n, 8, "w") && sized(&out, n, 8, "out");
    if (ok) {
        const int64_t *F = f.buf;
        I rows = 0;
        for (I k = 0; k < n; k++) rows = F[k] < 0 || rows < 0 ? -1 : (F[k] / width + 1 > rows ? F[k] / width + 1 : rows);
        if (rows < 0) { PyErr_SetString(PyExc_ValueError, "exact: a negative index"); ok = 0; }
        else ok = sized(&L, rows * r, 4, "L");
        terms = ok ? PyMem_RawMalloc(sizeof(double) * (4 * r + 4)) : NULL;  /* the terms, and fsum's partials */
        if (ok && terms == NULL) { PyErr_NoMemory(); ok = 0; }
    } else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "exact: buffers too small");
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        exact_run(f.buf, n, width, L.buf, R.buf, s.buf, r, w.buf, out.buf, terms);
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(terms);
    PyBuffer_Release(&f); PyBuffer_Release(&L); PyBuffer_Release(&R); PyBuffer_Release(&s); PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return ok ? Py_NewRef(Py_None) : NULL;
}

/* the first byte where two buffers differ (-1: none; the shorter one's length when one is a prefix of the other) */
static PyObject *first_difference(PyObject *self, PyObject *args) {
    Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b)) return NULL;
    I n = a.len < b.len ? a.len : b.len, at = -1;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *x = a.buf, *y = b.buf;
    for (I k = 0; k < n && at < 0; k += 1 << 16) {
        I m = n - k < (1 << 16) ? n - k : (1 << 16);
        if (memcmp(x + k, y + k, (size_t)m) != 0)
            for (I j = k; j < k + m; j++)
                if (x[j] != y[j]) { at = j; break; }
    }
    if (at < 0 && a.len != b.len) at = n;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a); PyBuffer_Release(&b);
    return PyLong_FromSsize_t(at);
}

/* whether a buffer of float elements (kind: 0 bfloat16, 1 float16, 2 float32) holds a NaN or an infinity */
static PyObject *nonfinite(PyObject *self, PyObject *args) {
    int kind;
    Py_buffer a;
    if (!PyArg_ParseTuple(args, "iy*", &kind, &a)) return NULL;
    int found = 0;
    Py_BEGIN_ALLOW_THREADS
    if (kind == F32) {
        const uint32_t *x = a.buf;
        I n = a.len / 4;
        uint32_t any = 0;
        for (I j = 0; j < n; j++) any |= ((x[j] & 0x7F800000u) == 0x7F800000u);
        found = any != 0;
    } else {
        const uint16_t *x = a.buf;
        I n = a.len / 2;
        uint16_t mask = kind == BF16 ? 0x7F80 : 0x7C00, any = 0;
        for (I j = 0; j < n; j++) any |= ((x[j] & mask) == mask);
        found = any != 0;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    return PyBool_FromLong(found);
}

/* survival(w, v, o, sums): adds to sums (5 doubles) what the stored o (float64) keeps of the change d = v - w, with
   r = o - w: ‖d‖², ‖r‖², ‖r - d‖², ⟨r, d⟩ and the count of r != 0, in one pass (the torch paths' checks) */
static PyObject *survival(PyObject *self, PyObject *args) {
    Py_buffer w, v, o, out;
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &w, &v, &o, &out)) return NULL;
    if (w.len != v.len || w.len != o.len || out.len != 5 * (Py_ssize_t)sizeof(double)) {
        PyBuffer_Release(&w); PyBuffer_Release(&v); PyBuffer_Release(&o); PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "survival: w, v and o must be float64 of one length, sums 5 float64");
        return NULL;
    }
    const double *x = w.buf, *y = v.buf, *z = o.buf;
    double *sums = out.buf;
    I n = w.len / (Py_ssize_t)sizeof(double);
    double dd = 0, rr = 0, ee = 0, rd = 0, changed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (I j = 0; j < n; j++) {
        double d = y[j] - x[j], r = z[j] - x[j], e = r - d;
        dd += d * d; rr += r * r; ee += e * e; rd += r * d; changed += r != 0;
    }
    Py_END_ALLOW_THREADS
    sums[0] += dd; sums[1] += rr; sums[2] += ee; sums[3] += rd; sums[4] += changed;
    PyBuffer_Release(&w); PyBuffer_Release(&v); PyBuffer_Release(&o); PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------------------- the round trip */

/* The neighbours of a float's bits (sign and magnitude) toward +infinity and -infinity: `top` the sign bit */
INLINE uint32_t next_up(uint32_t x, uint32_t top) {
    return (x & top) ? ((x == top) ? 1u : x - 1u) : x + 1u;
}
INLINE uint32_t next_down(uint32_t x, uint32_t top) {
    return (x & top) ? x + 1u : (x == 0 ? top | 1u : x - 1u);
}

/* Whether x + p rounds to the stored o (1), certainly not (0), or cannot be told from here (2): e is the bound on
   the error of v = x + p as computed (and of |v - o|), h_in / h_out half the spacing at o toward zero and away */
INLINE int judged(float v, float o32, float e, float h_in, float h_out) {
    float d = fabsf(v - o32);
    float h_yes = fabsf(v) >= fabsf(o32) + e ? h_out : h_in, h_no = fabsf(v) + e < fabsf(o32) ? h_in : h_out;
    return d + e < h_yes ? 1 : (d - e > h_no ? 0 : 2);
}
INLINE int judged64(double v, double o, double e, double h_in, double h_out) {
    double d = fabs(v - o);
    double h_yes = fabs(v) >= fabs(o) + e ? h_out : h_in, h_no = fabs(v) + e < fabs(o) ? h_in : h_out;
    return d + e < h_yes ? 1 : (d - e > h_no ? 0 : 2);
}

/* certain: u merges to M and its neighbours do not (1); certainly not (0); else 2 (branch-free) */
INLINE uint8_t certain3(int at, int up, int down) {
    int no = (at == 0) | (up == 1) | (down == 1), yes = (at == 1) & (up == 0) & (down == 0);
    return (uint8_t)(no ? 0 : (yes ? 1 : 2));
}

/* |u - w| in units in the last place at max(|w|, |M|) (mant bits, smallest normal exponent emin); 0 with a NaN */
INLINE double ulps(double u, double w, double mm, int mant, int emin) {
    double a = fabs(w) > fabs(mm) ? fabs(w) : fabs(mm);  /* a NaN gives err NaN, or a unit past any error */
    int64_t e = (int64_t)((d2u(a) >> 52) & 0x7FF) - 1023;
    e = e < emin ? emin : (e > 1023 ? 1023 : e);
    double err = fabs(u - w) * u2d((uint64_t)(1023 - (e - mant)) << 52);  /* times 2^-(e - mant): exact */
    return err == err ? err : 0.0;
}

/* The verdicts of one row's block of n <= COLS elements, from the product p and its terms' sizes m. Where u and M
   lie in one binade, neither a power of two, u's neighbours are one spacing s = 2h away on either side, so when u
   merges to M by a margin (|x - M| < h) they are more than h from M and do not: u alone decides, in one vectorized
   pass. The others (verdict 3 there) are judged with both neighbours afterwards. */
INLINE float decode16(const int kind, uint16_t x) { return kind == BF16 ? u2f((uint32_t)x << 16) : half_to_float(x); }

INLINE void trip16_verdicts(const int kind, const uint16_t *U, const uint16_t *M, const float *p, const float *m,
                            float ct, float slack, float c, I n, uint8_t *verdict) {
    const uint16_t inf = kind == BF16 ? 0x7F80 : 0x7C00, mbits = kind == BF16 ? 0x7F : 0x3FF;
    const uint16_t binade = (uint16_t)(0x8000 | inf);
    int rest = 0;
    for (I j = 0; j < n; j++) {
        uint16_t u = U[j], o = M[j];
        float o32 = decode16(kind, o), h = half_spacing16(kind, o, 0), vu = add(decode16(kind, u), p[j]);
        int at = judged(vu, o32, c * fabsf(vu) + (ct * m[j] + slack), h, h);
        int simple = (((u ^ o) & binade) == 0) & ((u & mbits) != 0) & ((o & mbits) != 0) & ((o & inf) != inf);
        verdict[j] = (uint8_t)(simple ? at : 3);
        rest |= !simple;
    }
    if (rest)
        for (I j = 0; j < n; j++)
            if (verdict[j] == 3) {
                uint16_t u = U[j], o = M[j];
                if ((u & inf) == inf || (o & inf) == inf) {
                    verdict[j] = 0;
                    continue;
                }
                float o32 = decode16(kind, o), eb = ct * m[j] + slack;
                float h_in = half_spacing16(kind, o, 1), h_out = half_spacing16(kind, o, 0);
                float vu = add(decode16(kind, u), p[j]);
                float vup = add(decode16(kind, (uint16_t)next_up(u, 0x8000)), p[j]);
                float vdn = add(decode16(kind, (uint16_t)next_down(u, 0x8000)), p[j]);
                verdict[j] = certain3(judged(vu, o32, c * fabsf(vu) + eb, h_in, h_out),
                                      judged(vup, o32, c * fabsf(vup) + eb, h_in, h_out),
                                      judged(vdn, o32, c * fabsf(vdn) + eb, h_in, h_out));
            }
}

INLINE I trip16_tile(const int kind, const int with_orig, const uint16_t *U, const uint16_t *M, const uint16_t *W,
                     const float *L, const float *R, I r, float ct, float slack, I rows, I width, float c, int64_t *X,
                     I cap, double *stats) {
    I nflag = 0, nb = (width + COLS - 1) / COLS;
    const int mant = kind == BF16 ? 7 : 10, emin = kind == BF16 ? -126 : -14;
    float p[COLS], m[COLS];
    uint8_t verdict[COLS];
    int64_t certain = 0, identical = 0;
    double worst = 0;
    for (I g = 0; g < rows; g += GROUP)
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS, n = j0 + COLS < width ? COLS : width - j0;
        for (I i = g; i < rows && i < g + GROUP; i++) {
            I base = i * width + j0;
            if (r) product32(L + i * r, R + b * r * COLS, r, p, m);
            else memset(p, 0, sizeof p), memset(m, 0, sizeof m);
            trip16_verdicts(kind, U + base, M + base, p, m, ct, slack, c, n, verdict);
            int64_t yes = 0, open = 0;
            for (I j = 0; j < n; j++) yes += verdict[j] == 1, open += verdict[j] == 2;
            certain += yes;
            if (open)
                for (I j = 0; j < n; j++)
                    if (verdict[j] == 2) {
                        if (nflag < cap) X[nflag] = base + j;
                        nflag++;
                    }
            if (with_orig) {
                int64_t same = 0;
                double top = 0;
#pragma omp simd reduction(+ : same) reduction(max : top)
                for (I j = 0; j < n; j++) {
                    uint16_t u = U[base + j], w = W[base + j], o = M[base + j];
                    same += u == w;
                    double e = ulps(kind == BF16 ? u2f((uint32_t)u << 16) : half_to_float(u),
                                    kind == BF16 ? u2f((uint32_t)w << 16) : half_to_float(w),
                                    kind == BF16 ? u2f((uint32_t)o << 16) : half_to_float(o), mant, emin);
                    top = e > top ? e : top;
                }
                identical += same;
                worst = top > worst ? top : worst;
            }
        }
    }
    stats[0] += (double)certain; stats[1] += (double)identical; stats[2] = worst > stats[2] ? worst : stats[2];
    return nflag;
}

INLINE void trip32_verdicts(const float *U, const float *M, const double *p, const double *m, double ct,
                            double slack, double c, I n, uint8_t *verdict) {
    int rest = 0;
    for (I j = 0; j < n; j++) {  /* as trip16_verdicts */
        uint32_t u = f2u(U[j]), o = f2u(M[j]);
        double h = half_spacing32(M[j], 0), vu = add64((double)U[j], p[j]);
        int at = judged64(vu, (double)M[j], c * fabs(vu) + (ct * m[j] + slack), h, h);
        int simple = (((u ^ o) & 0xFF800000u) == 0) & ((u & 0x7FFFFFu) != 0) & ((o & 0x7FFFFFu) != 0) &
                     ((o & 0x7F800000u) != 0x7F800000u);
        verdict[j] = (uint8_t)(simple ? at : 3);
        rest |= !simple;
    }
    if (rest)
        for (I j = 0; j < n; j++)
            if (verdict[j] == 3) {
                uint32_t u = f2u(U[j]), ob = f2u(M[j]);
                if ((u & 0x7F800000u) == 0x7F800000u || (ob & 0x7F800000u) == 0x7F800000u) {
                    verdict[j] = 0;
                    continue;
                }
                double o = M[j], eb = ct * m[j] + slack, h_in = half_spacing32(M[j], 1), h_out = half_spacing32(M[j], 0);
                double vu = add64((double)U[j], p[j]);
                double vup = add64((double)u2f(next_up(u, 0x80000000u)), p[j]);
                double vdn = add64((double)u2f(next_down(u, 0x80000000u)), p[j]);
                verdict[j] = certain3(judged64(vu, o, c * fabs(vu) + eb, h_in, h_out),
                                      judged64(vup, o, c * fabs(vup) + eb, h_in, h_out),
                                      judged64(vdn, o, c * fabs(vdn) + eb, h_in, h_out));
            }
}

INLINE I trip32_tile(const int with_orig, const float *U, const float *M, const float *W, const double *L,
                     const double *R, I r, double ct, double slack, I rows, I width, double c, int64_t *X, I cap,
                     double *stats) {
    I nflag = 0, nb = (width + COLS - 1) / COLS;
    double p[COLS], m[COLS];
    uint8_t verdict[COLS];
    int64_t certain = 0, identical = 0;
    double worst = 0;
    for (I g = 0; g < rows; g += GROUP)
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS, n = j0 + COLS < width ? COLS : width - j0;
        for (I i = g; i < rows && i < g + GROUP; i++) {
            I base = i * width + j0;
            if (r) product64(L + i * r, R + b * r * COLS, r, p, m);
            else memset(p, 0, sizeof p), memset(m, 0, sizeof m);
            trip32_verdicts(U + base, M + base, p, m, ct, slack, c, n, verdict);
            int64_t yes = 0, open = 0;
            for (I j = 0; j < n; j++) yes += verdict[j] == 1, open += verdict[j] == 2;
            certain += yes;
            if (open)
                for (I j = 0; j < n; j++)
                    if (verdict[j] == 2) {
                        if (nflag < cap) X[nflag] = base + j;
                        nflag++;
                    }
            if (with_orig) {
                int64_t same = 0;
                double top = 0;
#pragma omp simd reduction(+ : same) reduction(max : top)
                for (I j = 0; j < n; j++) {
                    same += f2u(U[base + j]) == f2u(W[base + j]);
                    double e = ulps(U[base + j], W[base + j], M[base + j], 23, -126);
                    top = e > top ? e : top;
                }
                identical += same;
                worst = top > worst ? top : worst;
            }
        }
    }
    stats[0] += (double)certain; stats[1] += (double)identical; stats[2] = worst > stats[2] ? worst : stats[2];
    return nflag;
}

HOT static I trip_run(int kind, const void *U, const void *M, const void *W, const void *L, const void *R, I r,
                      double ct, double slack, I rows, I width, double c, int64_t *X, I cap, double *stats) {
    float ct32 = (float)ct, slack32 = (float)slack, c32 = (float)c;
    if (kind == F32)
        return W ? trip32_tile(1, U, M, W, L, R, r, ct, slack, rows, width, c, X, cap, stats)
                 : trip32_tile(0, U, M, W, L, R, r, ct, slack, rows, width, c, X, cap, stats);
    if (kind == F16)
        return W ? trip16_tile(F16, 1, U, M, W, L, R, r, ct32, slack32, rows, width, c32, X, cap, stats)
                 : trip16_tile(F16, 0, U, M, W, L, R, r, ct32, slack32, rows, width, c32, X, cap, stats);
    return W ? trip16_tile(BF16, 1, U, M, W, L, R, r, ct32, slack32, rows, width, c32, X, cap, stats)
             : trip16_tile(BF16, 0, U, M, W, L, R, r, ct32, slack32, rows, width, c32, X, cap, stats);
}

/* trip(kind, u, merged, orig, L, R, r, ct, slack, rows, width, c, idx, stats) -> flagged; orig empty: none */
static PyObject *trip(PyObject *self, PyObject *args) {
    int kind;
    Py_buffer u, mg, w, L, R, idx, stats;
    I r, rows, width, nflag = -1;
    double ct, slack, c;
    if (!PyArg_ParseTuple(args, "iy*y*y*y*y*nddnndw*w*", &kind, &u, &mg, &w, &L, &R, &r, &ct, &slack, &rows, &width,
                          &c, &idx, &stats))
        return NULL;
    I n = rows * width, nb = (width + COLS - 1) / COLS, item = kind == F32 ? 8 : 4, size = kind == F32 ? 4 : 2;
    if (r < 0 || rows < 0 || width < 0 || kind < 0 || kind > 2 || (w.len != 0 && w.len < n * size))
        PyErr_SetString(PyExc_ValueError, "bad round trip arguments");
    else if (sized(&u, n, size, "u") && sized(&mg, n, size, "merged") && sized(&L, rows * r, item, "L") &&
             sized(&R, nb * r * COLS, item, "R") && sized(&stats, 3, 8, "stats")) {
        I cap = idx.len / 8;
        Py_BEGIN_ALLOW_THREADS
        nflag = trip_run(kind, u.buf, mg.buf, w.len ? w.buf : NULL, L.buf, R.buf, r, ct, slack, rows, width, c,
                         idx.buf, cap, stats.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&u); PyBuffer_Release(&mg); PyBuffer_Release(&w); PyBuffer_Release(&L); PyBuffer_Release(&R);
    PyBuffer_Release(&idx); PyBuffer_Release(&stats);
    return nflag < 0 ? NULL : PyLong_FromSsize_t(nflag);
}

static PyObject *merge16(PyObject *self, PyObject *args) { return run(args, 0, 0); }
static PyObject *merge32(PyObject *self, PyObject *args) { return run(args, 1, 0); }
static PyObject *check16(PyObject *self, PyObject *args) { return run(args, 0, 1); }
static PyObject *check32(PyObject *self, PyObject *args) { return run(args, 1, 1); }

static PyMethodDef methods[] = {
    {"merge16", merge16, METH_VARARGS,
     "merge16(kind, w, in_kind, L, R, r, ct, slack, rows, width, c, out, idx) -> flagged"},
    {"merge32", merge32, METH_VARARGS, "merge32(w, in_kind, L, R, r, ct, slack, rows, width, c, out, idx) -> flagged"},
    {"check16", check16, METH_VARARGS,
     "check16(kind, w, in_kind, L, R, r, ct, slack, rows, width, c, stored, idx, sums) -> flagged"},
    {"check32", check32, METH_VARARGS,
     "check32(w, in_kind, L, R, r, ct, slack, rows, width, c, stored, idx, sums) -> flagged"},
    {"trip", trip, METH_VARARGS,
     "trip(kind, u, merged, orig, L, R, r, ct, slack, rows, width, c, idx, stats) -> flagged"},
    {"gather", gather, METH_VARARGS, "gather(flat, w, in_kind, L, R, scales, width, base, delta, size)"},
    {"exact", exact, METH_VARARGS, "exact(flat, width, L, RT, scales, w, out): w + the deltas, rounded to odd"},
    {"first_difference", first_difference, METH_VARARGS, "first_difference(a, b) -> the first byte that differs, or -1"},
    {"survival", survival, METH_VARARGS, "survival(w, v, o, sums): the change's sums, added to sums"},
    {"nonfinite", nonfinite, METH_VARARGS, "nonfinite(kind, buffer) -> whether a NaN or an infinity is there"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
