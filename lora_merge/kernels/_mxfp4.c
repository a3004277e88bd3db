/* MXFP4 experts (gpt-oss: e2m1 codes, two to a byte, the even element in the low nibble; one e8m0 exponent per
   group of 32 elements along the input axis) merged and checked a block of stored rows at a time, each element in
   one pass, each group decided while it is in registers.

   An optional accelerator, as _kernels.c: lora_merge/quant/mxfp4_cpu.py and lora_merge/check/mxfp4.py decide in
   numpy what these passes leave open (kernels/plain.py has the same passes), and the torch codec gives the same
   bytes. A block is `rows` stored rows of `width` elements (a multiple of 32); `blocks` its bytes (rows x width/2),
   `scales` its exponent bytes (rows x width/32); L (rows x r) and R (packed by COLS columns, as _kernels.c) the
   low-rank factors with the scale folded in.

   mx_merge   w = e2m1(code) * 2^(byte - 127), v = w + L @ R in float32 with E, a rigorous bound on its error (as
              fp8_merge); per group, the adapter changes nothing (status 0: bytes and exponent kept), or the interval
              of its largest exact |value| decides the exponent (the smallest power of two s with largest <= 6 s,
              2^-127 for a group of zeros, as gpt-oss's quantizer; near a boundary each element again in float64
              from the adapter's own factors L0, RT, sc) and each code is the nearest e2m1 value to v / s,
              ties to even, 6 at most (status 1; a code whose bound reaches a midpoint flagged), or the caller
              decides the group (status 2). Returns the flagged count (flat element indices in `idx`).
   mx_check   the check's own: w from BASE's bytes, v = w + L @ R, each stored value within half a step of the grid
              at its group's scale beyond the bound (else flagged, for the caller to measure exactly); per group
              `groups` bit 0: a stored value certainly differs from the exact one, bit 1: the exponent is not the
              one the interval of the largest |value| allows; `sums` the survival of the change (as check16). */

#include "_common.h"

#include <stdlib.h>

/* a 4-bit code's value: magnitude code m = exponent (2 bits) and mantissa (1 bit), the sign in bit 3 */
INLINE float e2m1_value(uint32_t nib) {
    uint32_t m = nib & 7u, e = m >> 1, b = m & 1u;
    float normal = u2f(((e + 126u) << 23) | (b << 22));  /* (1 + b/2) 2^(e - 1) */
    float mag = e == 0 ? (float)b * 0.5f : normal;
    return u2f(f2u(mag) | ((nib & 8u) << 28));
}

/* 2^(byte - 127), from its bits (2^-127 is a float32 subnormal); byte 255 (NaN in e8m0) as 2^128: infinity */
INLINE float e8m0_value(uint8_t byte) {
    return byte == 0 ? 0x1p-127f : u2f((uint32_t)byte << 23);
}

/* The nearest e2m1 code to t (ties to the even code, past 6 the largest) and whether the bound et on t's error can
   reach a midpoint between codes */
INLINE uint8_t e2m1_nearest(float t, float et, int *open) {
    float a = fabsf(t);
    uint32_t m = (uint32_t)(a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) +
                 (a > 5.0f);
    float d = fabsf(a - 0.25f);
    d = smaller(fabsf(a - 0.75f), d); d = smaller(fabsf(a - 1.25f), d); d = smaller(fabsf(a - 1.75f), d);
    d = smaller(fabsf(a - 2.5f), d); d = smaller(fabsf(a - 3.5f), d); d = smaller(fabsf(a - 5.0f), d);
    *open = !(d > et) | !(a < 0x1p127f);  /* NaN and infinity: always the caller's */
    return (uint8_t)(m | ((f2u(t) >> 28) & 8u));
}

/* the 64 codes of 32 bytes, the even element in the low nibble */
INLINE void unpack(const uint8_t *bytes, uint8_t *codes) {
    for (int q = 0; q < 32; q++) {
        codes[2 * q] = bytes[q] & 15u;
        codes[2 * q + 1] = bytes[q] >> 4;
    }
}

/* the exponent (unbiased) of the smallest power of two s with x <= 6 s, for x > 0 */
static int fresh_exponent(double x) {
    int e;
    double m = frexp(x / 6.0, &e);  /* x / 6 = m 2^e, m in [0.5, 1) */
    return m == 0.5 ? e - 1 : e;
}

/* ------------------------------------------------------------------------------------------ merge */

/* The exponent of a group whose float32 interval straddles a boundary (its largest |value| near 6 times a power of
   two, as a quantized group's often is), from each element in float64 (the adapter's own factors, every product of
   two float32 factors exact there) with a bound of its own; -1000 where that does not decide it either */
static int exponent64(const uint8_t *nib, float scale, I i, I j0, const float *L0, const float *RT, const double *sc,
                      I r) {
    double l = 0.0, h = 0.0;
    for (int j = 0; j < 32; j++) {
        double w = (double)(e2m1_value(nib[j]) * scale), d = 0.0, size = fabs(w);
        for (I t = 0; t < r; t++) {
            double x = sc[t] * ((double)L0[i * r + t] * (double)RT[(j0 + j) * r + t]);
            d += x;
            size += fabs(x);
        }
        double a = fabs(w + d), b = (double)(r + 4) * 0x1p-52 * size + 0x1p-1070;
        l = a - b > l ? a - b : l;
        h = a + b > h ? a + b : h;
    }
    if (!(l > 0.0)) return -1000;
    int ex = fresh_exponent(l);
    return ex == fresh_exponent(h) && ex >= -127 && ex <= 127 ? ex : -1000;
}

HOT static I merge_rows(const uint8_t *blocks, const uint8_t *scales, const float *L, const float *R, I r, float ct,
                        float slack, float c, I rows, I width, const float *L0, const float *RT, const double *sc,
                        uint8_t *out_blocks, uint8_t *out_scales, uint8_t *status, int64_t *X, I cap) {
    I nflag = 0, nb = width / COLS, groups = width / 32;
    float p[COLS], m[COLS], v[COLS], e[COLS];
    uint8_t st[COLS], code[COLS], open[COLS], nib[COLS];
    for (I g0 = 0; g0 < rows; g0 += GROUP)
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS;
        for (I i = g0; i < rows && i < g0 + GROUP; i++) {
            if (r) product32(L + i * r, R + b * r * COLS, r, p, m);
            else memset(p, 0, sizeof p), memset(m, 0, sizeof m);
            const uint8_t *bytes = blocks + (i * width + j0) / 2;
            float s0 = e8m0_value(scales[i * groups + j0 / 32]), s1 = e8m0_value(scales[i * groups + j0 / 32 + 1]);
            unpack(bytes, nib);
#pragma omp simd simdlen(8)
            for (I j = 0; j < COLS; j++) {
                float w = e2m1_value(nib[j]) * (j < 32 ? s0 : s1);
                float x = add(w, p[j]), eb = ct * m[j] + slack, a = fabsf(x);
                v[j] = x;
                e[j] = c * (a + fabsf(w)) + eb;
                st[j] = (uint8_t)(fabsf(p[j]) > eb ? 2 : (m[j] > 0.0f ? 1 : 0));
            }
            for (int h = 0; h < 2; h++) {  /* the chunk's two groups of 32 */
                I k = i * groups + j0 / 32 + h;
                float lo = 0.0f, hi = 0.0f;
                uint8_t most = 0;
                const float *vh = v + 32 * h, *eh = e + 32 * h;
                const uint8_t *sh = st + 32 * h;
#pragma omp simd reduction(max : lo, hi, most)
                for (int j = 0; j < 32; j++) {
                    float a = fabsf(vh[j]);
                    lo = a - eh[j] > lo ? a - eh[j] : lo;
                    hi = a + eh[j] > hi ? a + eh[j] : hi;
                    most = sh[j] > most ? sh[j] : most;
                }
                uint8_t *ob = out_blocks + (i * width + j0 + 32 * h) / 2;
                if (most == 0) {  /* the adapter changes nothing here */
                    memcpy(ob, bytes + 16 * h, 16);
                    out_scales[k] = scales[k];
                    status[k] = 0;
                    memset(open + 32 * h, 0, 32);
                    continue;
                }
                int ex = -1000, ok = most == 2 && hi < 0x1p127f;
                if (ok && lo > 0.0f) {
                    ex = fresh_exponent((double)lo * (1.0 - 0x1p-22));
                    ok = ex == fresh_exponent((double)hi * (1.0 + 0x1p-22)) && ex >= -127 && ex <= 127;
                }
                if (most == 2 && hi < 0x1p127f && !ok) {  /* near a boundary: in float64 */
                    ex = exponent64(nib + 32 * h, h ? s1 : s0, i, j0 + 32 * h, L0, RT, sc, r);
                    ok = ex != -1000;
                }
                if (!ok) {  /* the caller decides whether it changes, or its exponent, exactly */
                    status[k] = 2;
                    memset(open + 32 * h, 0, 32);
                    continue;
                }
                status[k] = 1;
                out_scales[k] = (uint8_t)(ex + 127);
                float inv = ex < 127 ? u2f((uint32_t)(127 - ex) << 23) : 0x1p-127f;  /* 2^-ex, exact */
#pragma omp simd simdlen(8)
                for (int j = 0; j < 32; j++) {
                    int o;
                    code[32 * h + j] = e2m1_nearest(vh[j] * inv, eh[j] * inv, &o);
                    open[32 * h + j] = (uint8_t)o;
                }
                for (int q = 0; q < 16; q++) ob[q] = (uint8_t)(code[32 * h + 2 * q] | (code[32 * h + 2 * q + 1] << 4));
            }
            for (I j = 0; j < COLS; j++)
                if (open[j]) {
                    if (nflag < cap) X[nflag] = i * width + j0 + j;
                    nflag++;
                }
        }
    }
    return nflag;
}

/* ------------------------------------------------------------------------------------------ check */

/* half a step of the e2m1 grid at magnitude code m (times the scale), toward zero or away */
INLINE float half_step(uint32_t m, int below) {
    float out = m < 4 ? 0.25f : (m < 6 ? 0.5f : 1.0f);
    float in = m < 5 ? 0.25f : (m < 7 ? 0.5f : 1.0f);
    return below ? in : out;
}

HOT static I check_rows(const uint8_t *base_blocks, const uint8_t *base_scales, const uint8_t *blocks,
                        const uint8_t *scales, const float *L, const float *R, I r, float ct, float slack, float c,
                        I rows, I width, int64_t *X, I cap, double *sums, uint8_t *verdicts) {
    I nflag = 0, nb = width / COLS, groups = width / 32;
    float p[COLS], m[COLS], lo[COLS], hi[COLS];
    uint8_t fl[COLS], df[COLS], bnib[COLS], onib[COLS];
    float dd = 0, rr = 0, ee = 0, rd = 0, changed = 0, brr = 0, bee = 0, brd = 0, bch = 0;
    for (I g0 = 0; g0 < rows; g0 += GROUP)
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS;
        for (I i = g0; i < rows && i < g0 + GROUP; i++) {
            if (r) product32(L + i * r, R + b * r * COLS, r, p, m);
            else memset(p, 0, sizeof p), memset(m, 0, sizeof m);
            const uint8_t *bb = base_blocks + (i * width + j0) / 2, *ob = blocks + (i * width + j0) / 2;
            I k = i * groups + j0 / 32;
            float b0 = e8m0_value(base_scales[k]), b1 = e8m0_value(base_scales[k + 1]);
            float s0 = e8m0_value(scales[k]), s1 = e8m0_value(scales[k + 1]);
            unpack(bb, bnib);
            unpack(ob, onib);
#pragma omp simd simdlen(8) reduction(+ : dd, rr, ee, rd, changed, brr, bee, brd, bch)
            for (I j = 0; j < COLS; j++) {
                float scale = j < 32 ? s0 : s1;
                float w = e2m1_value(bnib[j]) * (j < 32 ? b0 : b1), got = e2m1_value(onib[j]) * scale;
                float v = add(w, p[j]), a = fabsf(v), d = fabsf(v - got);
                float e = c * (a + fabsf(w) + fabsf(got)) + (ct * m[j] + slack);
                int below = !(a >= fabsf(got) + e);
                fl[j] = (uint8_t)!(d + e < half_step(onib[j] & 7u, below) * scale);  /* NaN fails too */
                lo[j] = a - e;
                hi[j] = a + e;
                df[j] = (uint8_t)(d > e);
                float dv = v - w, sv = got - w, ev = sv - dv;
                dd += dv * dv; rr += sv * sv; ee += ev * ev; rd += sv * dv; changed += sv != 0.0f ? 1.0f : 0.0f;
                float bv = to_bf16(v) - w, bev = bv - dv;  /* what --dtype bfloat16 would store */
                brr += bv * bv; bee += bev * bev; brd += bv * dv; bch += to_bf16(v) != to_bf16(w) ? 1.0f : 0.0f;
            }
            for (int h = 0; h < 2; h++) {
                float l = 0.0f, u = 0.0f;
                uint8_t differs = 0;
#pragma omp simd reduction(max : l, u, differs)
                for (int j = 32 * h; j < 32 * h + 32; j++) {
                    l = lo[j] > l ? lo[j] : l;
                    u = hi[j] > u ? hi[j] : u;
                    differs = df[j] > differs ? df[j] : differs;
                }
                int wrong = 0;
                if (differs) {  /* the stored exponent must be one the interval of the largest |value| allows */
                    int have = (int)scales[k + h] - 127;
                    int low = l > 0.0f ? fresh_exponent((double)l * (1.0 - 0x1p-22)) : -127;
                    int high = u > 0.0f ? fresh_exponent((double)u * (1.0 + 0x1p-22)) : -127;
                    low = low < -127 ? -127 : low;
                    high = high > 127 ? 127 : (high < -127 ? -127 : high);
                    wrong = !(low <= have && have <= high);
                }
                verdicts[k + h] = (uint8_t)(differs | (wrong << 1));
            }
            for (I j = 0; j < COLS; j++)
                if (fl[j]) {
                    if (nflag < cap) X[nflag] = i * width + j0 + j;
                    nflag++;
                }
        }
    }
    sums[0] += dd; sums[1] += rr; sums[2] += ee; sums[3] += rd; sums[4] += changed;
    sums[5] += brr; sums[6] += bee; sums[7] += brd; sums[8] += bch;
    return nflag;
}

/* ---------------------------------------------------------------------------------------- Python side */

static PyObject *mx_merge(PyObject *self, PyObject *args) {
    Py_buffer blocks, scales, L, R, L0, RT, sc, out_blocks, out_scales, status, idx;
    I r, rows, width, nflag = -1;
    double ct, slack, c;
    if (!PyArg_ParseTuple(args, "y*y*y*y*ndddnny*y*y*w*w*w*w*", &blocks, &scales, &L, &R, &r, &ct, &slack, &c, &rows,
                          &width, &L0, &RT, &sc, &out_blocks, &out_scales, &status, &idx))
        return NULL;
    I n = rows * width, groups = rows * (width / 32);
    int ok = r >= 0 && rows >= 0 && width > 0 && width % COLS == 0 && sized(&blocks, n / 2, 1, "blocks") &&
             sized(&scales, groups, 1, "scales") && sized(&L, rows * r, 4, "L") && sized(&R, width / COLS * r * COLS, 4, "R") &&
             sized(&out_blocks, n / 2, 1, "out blocks") && sized(&out_scales, groups, 1, "out scales") &&
             sized(&status, groups, 1, "status") && sized(&L0, rows * r, 4, "L0") && sized(&RT, width * r, 4, "RT") &&
             sized(&sc, r, 8, "sc");
    if (ok) {
        I cap = idx.len / 8;
        Py_BEGIN_ALLOW_THREADS
        nflag = merge_rows(blocks.buf, scales.buf, L.buf, R.buf, r, (float)ct, (float)slack, (float)c, rows, width,
                           L0.buf, RT.buf, sc.buf, out_blocks.buf, out_scales.buf, status.buf, idx.buf, cap);
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "bad rows arguments (the width must be a multiple of 64)");
    Py_buffer *all[] = {&blocks, &scales, &L, &R, &L0, &RT, &sc, &out_blocks, &out_scales, &status, &idx};
    for (size_t q = 0; q < sizeof all / sizeof *all; q++) PyBuffer_Release(all[q]);
    return nflag < 0 ? NULL : PyLong_FromSsize_t(nflag);
}

static PyObject *mx_check(PyObject *self, PyObject *args) {
    Py_buffer bb, bs, blocks, scales, L, R, idx, sums, verdicts;
    I r, rows, width, nflag = -1;
    double ct, slack, c;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*ndddnnw*w*w*", &bb, &bs, &blocks, &scales, &L, &R, &r, &ct, &slack, &c,
                          &rows, &width, &idx, &sums, &verdicts))
        return NULL;
    I n = rows * width, groups = rows * (width / 32);
    int ok = r >= 0 && rows >= 0 && width > 0 && width % COLS == 0 && sized(&bb, n / 2, 1, "base blocks") &&
             sized(&bs, groups, 1, "base scales") && sized(&blocks, n / 2, 1, "blocks") &&
             sized(&scales, groups, 1, "scales") && sized(&L, rows * r, 4, "L") && sized(&R, width / COLS * r * COLS, 4, "R") &&
             sized(&sums, 9, 8, "sums") && sized(&verdicts, groups, 1, "verdicts");
    if (ok) {
        I cap = idx.len / 8;
        Py_BEGIN_ALLOW_THREADS
        nflag = check_rows(bb.buf, bs.buf, blocks.buf, scales.buf, L.buf, R.buf, r, (float)ct, (float)slack, (float)c,
                           rows, width, idx.buf, cap, sums.buf, verdicts.buf);
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "bad rows arguments (the width must be a multiple of 64)");
    Py_buffer *all[] = {&bb, &bs, &blocks, &scales, &L, &R, &idx, &sums, &verdicts};
    for (size_t q = 0; q < sizeof all / sizeof *all; q++) PyBuffer_Release(all[q]);
    return nflag < 0 ? NULL : PyLong_FromSsize_t(nflag);
}

static PyMethodDef methods[] = {
    {"mx_merge", mx_merge, METH_VARARGS,
     "mx_merge(blocks, scales, L, R, r, ct, slack, c, rows, width, L0, RT, sc, out_blocks, out_scales, status, idx) "
     "-> flagged"},
    {"mx_check", mx_check, METH_VARARGS,
     "mx_check(base_blocks, base_scales, blocks, scales, L, R, r, ct, slack, c, rows, width, idx, sums, groups) "
     "-> flagged"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mxfp4", NULL, -1, methods};

PyMODINIT_FUNC PyInit__mxfp4(void) { return PyModule_Create(&module); }
