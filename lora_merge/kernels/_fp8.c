/* FP8 e4m3 weights with block scales (DeepSeek-V3, Qwen3 FP8: float8_e4m3fn codes, one scale per bm x bn block),
   merged and checked a band of rows at a time (the rows of one row of scale blocks), each element in one pass.

   An optional accelerator, as _kernels.c: lora_merge/quant/fp8_cpu.py and lora_merge/check/fp8.py decide in numpy
   every element these passes leave open, and without the extension fall back to the torch codec (the same bytes).
   A band is `rows` x `cols` elements; `scales` its row of block scales (float32 values, one per `bn` columns);
   L (rows x r) and R (packed by COLS columns, as _kernels.c) the low-rank factors with the scale folded in.

   BASE's weights are FP8 codes and scales, or (`wf`, not empty: writing a float BASE as FP8) float32 values, exact
   copies of a bfloat16, float16 or float32 tensor: w is then wf's, and every block gets a fresh scale (`fresh_all`).

   fp8_merge   a block of scale at a time, while it is in cache: w = e4m3(code) * scale, v = w + L @ R in float32,
               and E, a rigorous bound on |v - the exact value| (c (|v| + |w|) + ct m + slack); per element `state`
               2 where the delta is certainly not zero, 1 where it may be, 0 where it is exactly zero; an interval
               that holds the block's largest exact |value| (computed again in float64 for the elements that can
               be the largest, from the adapter's own factors L0, RT and their scales sc); where that interval
               decides the block's fresh scale, the codes (as fp8_encode); per block `status` 0 unchanged, 1
               merged, 2 left to the caller; blocks [k_first, k_last) only, so that threads can share a band.
               Returns the flagged count (their flat indices in `idx`).
   fp8_encode  each element of the blocks `keep` marks 0 as the nearest e4m3 code to v / scale (ties to even,
               saturating at 448, the sign kept), flagged where its bound can reach a midpoint between codes; a
               block marked 1 gets BASE's codes, 2 is left as it is. Returns the flagged count.
   fp8_check   the check's own, in float32: w from BASE's codes and scales, v = w + L @ R, each stored
               o = e4m3(code) * scale must be within half a step of the grid of v's exact value beyond the bound
               (else flagged, for the caller to measure exactly); per block the largest |v| - E, |v| + E and
               whether any stored value certainly differs from the exact one; `sums` the survival of the change
               (as check16). */

#include "_common.h"

#include <stdlib.h>

/* A code's value (0x7F and 0xFF: NaN), from its bits: float32's layout holds e4m3's normal values with the exponent
   rebiased, and its subnormals are m 2^-9 (no table: a table is a gather per element, slow where it vectorizes) */
INLINE float e4m3_value(uint8_t code) {
    uint32_t c = code, sign = (c & 0x80u) << 24, e = (c >> 3) & 15u, m = c & 7u;
    float normal = u2f(sign | ((e + 120u) << 23) | (m << 20));
    float sub = u2f(sign | f2u((float)(int32_t)m * 0x1p-9f));
    float v = e == 0 ? sub : normal;
    return (c & 0x7Fu) == 0x7Fu ? u2f(sign | 0x7FC00000u) : v;
}

/* BASE's values at flat indices [at + ja, at + jb), as a row `w` to index by j in [ja, jb): a float BASE's own (wf,
   in place), else each code times the scale, made in `room` (COLS floats); chosen once per segment, so that the
   loops that use it stay vectorized */
INLINE const float *w_row(const uint8_t *codes, const float *wf, I at, I ja, I jb, float scale, float *room) {
    if (wf) return wf + at;
    float *w = room - ja;
#pragma omp simd simdlen(8)
    for (I j = ja; j < jb; j++) w[j] = e4m3_value(codes[at + j]) * scale;
    return w;
}

/* The nearest e4m3 code to t, ties to even, past 448 saturating to it, and whether a bound et on t's error can
   make another code the nearest (a midpoint within et, or et too large for only the nearest midpoint to matter) */
INLINE uint8_t e4m3_nearest(float t, float et, int *open) {
    uint32_t bits = f2u(t), sign = (bits >> 24) & 0x80;
    float a = fabsf(t);
    uint32_t ab = f2u(a);
    uint32_t r = (ab + 0x7FFFFu + ((ab >> 20) & 1u)) >> 20;  /* float's exponent and 3 mantissa bits, rounded */
    int32_t normal = (int32_t)r - (120 << 3);
    normal = normal > 0x7E ? 0x7E : normal;
    float q = (a * 512.0f + 0x1p23f) - 0x1p23f;  /* subnormal: the nearest multiple of 2^-9, to even */
    uint32_t sub = (uint32_t)(int32_t)q;
    uint32_t code = a >= 0x1p-6f ? (uint32_t)normal : sub;
    float mid = a >= 0x1p-6f ? u2f((ab & 0xFFF00000u) | 0x00080000u) : (floorf(a * 512.0f) + 0.5f) * 0x1p-9f;
    float quarter = a >= 0x1p-6f ? a * 0x1p-6f : 0x1p-11f;
    int flag = !(fabsf(a - mid) > et) | !(et <= quarter);
    *open = (a - et > 432.0f) ? 0 : flag;  /* nearer 448 than 416 by the bound: 448, whatever lies beyond */
    return (uint8_t)(sign | (a >= 448.0f ? 0x7Eu : code));
}

/* ------------------------------------------------------------------------------------------ merge */

/* Each 64-column block of a row is taken in segments that share a scale (`bn` may not be a multiple of 64). What a
   block of scale finds (its largest values, whether anything changed) is gathered per column first, across the
   band's rows (elementwise, so the loops vectorize without a reduction each), and per block once at the end. */
#define SEGMENTS(j0, n, bn, ja, jb, k)                                                                 \
    for (I ja = 0, jb, k; ja < (n) && (k = ((j0) + ja) / (bn), jb = (k + 1) * (bn) - (j0), jb = jb < (n) ? jb : (n), 1); \
         ja = jb)

/* whether any of n <= COLS flags is set, a word at a time */
INLINE int any_set(const uint8_t *flags, I n) {
    uint64_t any = 0, word;
    I j = 0;
    for (; j + 8 <= n; j += 8) memcpy(&word, flags + j, 8), any |= word;
    for (; j < n; j++) any |= flags[j];
    return any != 0;
}

INLINE I listed(const uint8_t *flags, I n, I base, int64_t *X, I cap, I nflag) {
    if (any_set(flags, n))
        for (I j = 0; j < n; j++)
            if (flags[j]) {
                if (nflag < cap) X[nflag] = base + j;
                nflag++;
            }
    return nflag;
}

/* The largest exact |value| of block k lies within [lo, hi]: among the elements whose float32 bound can reach the
   float32 pass's lower end (no other can be the largest), each computed again in float64 from the adapter's own
   factors (L0 rows x r, RT cols x r, each column's scale sc: every product of two float32 factors is exact there),
   with a bound of its own, (r + 4) 2^-52 of its terms' sizes. */
static void extremes64(const uint8_t *codes, const float *wf, float scale, const float *BV, const float *BE, I rows,
                       I cols, I first, I last, float lo32, const float *L0, const float *RT, const double *sc, I r,
                       double *lo, double *hi) {
    double l = 0.0, h = 0.0;
    float from = lo32 * (1.0f - 0x1p-22f);
    I width = last - first;
    for (I i = 0; i < rows; i++)
        for (I j = first; j < last; j++) {
            I at = i * width + j - first;  /* BV and BE hold the block alone, row after row */
            if (!(fabsf(BV[at]) + BE[at] >= from)) continue;
            double w = wf ? (double)wf[i * cols + j] : (double)e4m3_value(codes[i * cols + j]) * (double)scale;
            double d = 0.0, size = fabs(w);
            for (I t = 0; t < r; t++) {
                double x = sc[t] * ((double)L0[i * r + t] * (double)RT[j * r + t]);
                d += x;
                size += fabs(x);
            }
            double a = fabs(w + d), b = (double)(r + 4) * 0x1p-52 * size + 0x1p-1070;
            l = a - b > l ? a - b : l;
            h = a + b > h ? a + b : h;
        }
    *lo = l, *hi = h;
}

/* The scale FP8 defines for a block whose largest |value| is x: x / 448 rounded to float32, or the smallest power
   of two at least that (x > 0) */
static double fresh(double x, int pow2) {
    double q = x / 448.0;
    if (!pow2) return (double)(float)q;
    int e;
    double m = frexp(q, &e);
    return ldexp(1.0, m == 0.5 ? e - 1 : e);
}

/* Each element of block k (columns [first, last); BV and BE hold it alone) encoded at scale s, its open ones
   listed */
INLINE I encode_block(const float *BV, const float *BE, float s, I rows, I cols, I first, I last, uint8_t *out,
                      int64_t *X, I cap, I nflag) {
    uint8_t open[COLS];
    I width = last - first;
    float inv = 1.0f / s;
    for (I i = 0; i < rows; i++)
        for (I j0 = first; j0 < last; j0 += COLS) {
            I n = j0 + COLS < last ? COLS : last - j0, base = i * cols + j0, local = i * width + j0 - first;
#pragma omp simd simdlen(8)
            for (I j = 0; j < n; j++) {
                /* t = v (1/s): two roundings more than v itself, 2^-22 |t| in all */
                float t = BV[local + j] * inv, et = BE[local + j] * inv * (1.0f + 0x1p-21f) + fabsf(t) * 0x1p-21f;
                int o;
                out[base + j] = e4m3_nearest(t, et, &o);
                open[j] = (uint8_t)(o | !(fabsf(t) < 0x1p127f));  /* NaN and infinity: always the caller's */
            }
            nflag = listed(open, n, base, X, cap, nflag);
        }
    return nflag;
}

/* A band merged a block of scale at a time, while its values are in cache: the values and their bounds, the block's
   largest |value| (extremes64), its scale where that decides it, its codes. status[k]: 0 the block is unchanged (its
   codes copied, its scale kept), 1 merged (its scale in new_scales), 2 left to the caller (V, E and S filled);
   with `fresh_all` no block is 0, and a block the adapter may not change is merged as one it does. */
HOT static I merge_band(const uint8_t *codes, const float *wf, const float *scales, const float *L, const float *R,
                        I r, float ct, float slack, float c, I rows, I cols, I bn, const float *L0, const float *RT,
                        const double *sc, int pow2, int fresh_all, I k_first, I k_last, float *V, float *E,
                        uint8_t *S, uint8_t *out, float *new_scales, uint8_t *status, int64_t *X, I cap) {
    I nflag = 0;
    float p[COLS], m[COLS], room[COLS];
    float *lo = malloc((size_t)(bn + COLS) * sizeof(float));
    uint8_t *st = malloc((size_t)(bn + COLS));
    /* the block's values, bounds and states, row after row: a few hundred KB at most, in cache */
    float *BV = malloc((size_t)(rows * bn + 1) * sizeof(float)), *BE = malloc((size_t)(rows * bn + 1) * sizeof(float));
    uint8_t *BS = malloc((size_t)(rows * bn + 1));
    for (I k = k_first; k < k_last; k++) {
        I first = k * bn, last = first + bn < cols ? first + bn : cols, width = last - first;
        float scale = scales[k];
        memset(lo, 0, (size_t)width * sizeof(float));
        memset(st, 0, (size_t)width);
        for (I g = 0; g < rows; g += GROUP)
        for (I j0 = first / COLS * COLS; j0 < last; j0 += COLS) {  /* the chunks of R's packing the block touches */
            I ja = j0 > first ? j0 : first, jb = j0 + COLS < last ? j0 + COLS : last;
            for (I i = g; i < rows && i < g + GROUP; i++) {
                if (r) product32(L + i * r, R + (j0 / COLS) * r * COLS, r, p, m);
                else memset(p, 0, sizeof p), memset(m, 0, sizeof m);
                const float *pj = p - j0, *mj = m - j0, *wj = w_row(codes, wf, i * cols, ja, jb, scale, room);
                float *loj = lo - first;
                uint8_t *stj = st - first;
#pragma omp simd simdlen(8)
                for (I j = ja; j < jb; j++) {
                    I local = i * width + j - first;
                    float w = wj[j];
                    float v = add(w, pj[j]), eb = ct * mj[j] + slack, a = fabsf(v);
                    float e = c * (a + fabsf(w)) + eb;
                    uint8_t state = (uint8_t)(fabsf(pj[j]) > eb ? 2 : (mj[j] > 0.0f ? 1 : 0));
                    BV[local] = v;
                    BE[local] = e;
                    BS[local] = state;
                    loj[j] = a - e > loj[j] ? a - e : loj[j];
                    stj[j] = state > stj[j] ? state : stj[j];
                }
            }
        }
        float l = 0;
        uint8_t t = 0;
        for (I j = 0; j < width; j++) {
            l = lo[j] > l ? lo[j] : l;
            t = st[j] > t ? st[j] : t;
        }
        if (fresh_all) t = 2;  /* every block scaled afresh, whatever the adapter does to it */
        if (t == 0) {  /* the adapter changes nothing here */
            for (I i = 0; i < rows; i++) memcpy(out + i * cols + first, codes + i * cols + first, (size_t)width);
            new_scales[k] = scale;
            status[k] = 0;
            continue;
        }
        double l64 = 0.0, h64 = 0.0;
        extremes64(codes, wf, scale, BV, BE, rows, cols, first, last, l, L0, RT, sc, r, &l64, &h64);
        double low = fresh(l64 * (1.0 - 0x1p-50), pow2), high = fresh(h64 * (1.0 + 0x1p-50), pow2);
        if (t == 1 || !(l64 > 0.0) || low != high || !(low >= 0x1p-126 && low <= 0x1p127)) {
            status[k] = 2;  /* whether it changes, or its scale, is the caller's to decide exactly: V, E, S for it */
            new_scales[k] = scale;
            for (I i = 0; i < rows; i++) {
                memcpy(V + i * cols + first, BV + i * width, (size_t)width * sizeof(float));
                memcpy(E + i * cols + first, BE + i * width, (size_t)width * sizeof(float));
                memcpy(S + i * cols + first, BS + i * width, (size_t)width);
            }
            continue;
        }
        new_scales[k] = (float)low;
        status[k] = 1;
        nflag = encode_block(BV, BE, (float)low, rows, cols, first, last, out, X, cap, nflag);
    }
    free(lo), free(st), free(BV), free(BE), free(BS);
    return nflag;
}

HOT static I encode_band(const float *V, const float *E, const float *scales, const uint8_t *keep,
                         const uint8_t *codes, I rows, I cols, I bn, uint8_t *out, int64_t *X, I cap) {
    I nflag = 0;
    uint8_t open[COLS];
    for (I i = 0; i < rows; i++)
        for (I j0 = 0; j0 < cols; j0 += COLS) {
            I n = j0 + COLS < cols ? COLS : cols - j0, base = i * cols + j0;
            SEGMENTS(j0, n, bn, ja, jb, k) {
                if (keep[k]) {  /* 1: BASE's codes; 2: as they are */
                    if (keep[k] == 1) memcpy(out + base + ja, codes + base + ja, (size_t)(jb - ja));
                    memset(open + ja, 0, (size_t)(jb - ja));
                    continue;
                }
                float s = scales[k];
#pragma omp simd simdlen(8)
                for (I j = ja; j < jb; j++) {
                    float t = V[base + j] / s, et = E[base + j] / s * (1.0f + 0x1p-22f) + fabsf(t) * 0x1p-23f;
                    int o;
                    out[base + j] = e4m3_nearest(t, et, &o);
                    open[j] = (uint8_t)(o | !(fabsf(t) < 0x1p127f));  /* NaN and infinity: always the caller's */
                }
            }
            nflag = listed(open, n, base, X, cap, nflag);
        }
    return nflag;
}

/* ------------------------------------------------------------------------------------------ check */

/* half a step of the e4m3 grid at the stored code o (times its scale), toward zero (`below`) or away: the scale
   times a power of two (2^-11 up to 2^3), built from its bits */
INLINE float half_step(uint8_t o, float scale, int below) {
    int e = (o >> 3) & 15;
    float h = scale * u2f((uint32_t)((e == 0 ? 1 : e) - 7 - 3 - 1 + 127) << 23);
    return below & ((o & 7) == 0) & (e > 1) ? h * 0.5f : h;
}

HOT static I check_band(const uint8_t *base_codes, const float *base_scales, const float *wf, const uint8_t *codes,
                        const float *scales, const float *L, const float *R, I r, float ct, float slack, float c,
                        I rows, I cols, I bn, int64_t *X, I cap, double *sums, double *blocks) {
    I nflag = 0, nb = (cols + COLS - 1) / COLS, nscale = (cols + bn - 1) / bn;
    float p[COLS], m[COLS], room[COLS];
    uint8_t fl[COLS];
    /* per column: the largest |v| - e and |v| + e, whether a stored value certainly differs, the survival's sums */
    float *acc = calloc((size_t)cols * 11, sizeof(float));
    uint8_t *df = calloc((size_t)cols, 1);
    for (I g = 0; g < rows; g += GROUP)
    for (I b = 0; b < nb; b++) {
        I j0 = b * COLS, n = j0 + COLS < cols ? COLS : cols - j0;
        float *lo = acc + j0, *hi = acc + cols + j0, *sdd = acc + 2 * cols + j0, *srr = acc + 3 * cols + j0;
        float *see = acc + 4 * cols + j0, *srd = acc + 5 * cols + j0, *sch = acc + 6 * cols + j0;
        float *brr = acc + 7 * cols + j0, *bee = acc + 8 * cols + j0, *brd = acc + 9 * cols + j0;
        float *bch = acc + 10 * cols + j0;
        uint8_t *df0 = df + j0;
        for (I i = g; i < rows && i < g + GROUP; i++) {
            I base = i * cols + j0;
            if (r) product32(L + i * r, R + b * r * COLS, r, p, m);
            else memset(p, 0, sizeof p), memset(m, 0, sizeof m);
            SEGMENTS(j0, n, bn, ja, jb, k) {
                float bscale = base_scales[k], scale = scales[k];
                const float *wj = w_row(base_codes, wf, base, ja, jb, bscale, room);
#pragma omp simd simdlen(8)
                for (I j = ja; j < jb; j++) {
                    uint8_t o = codes[base + j];
                    float w = wj[j], got = e4m3_value(o) * scale;
                    float v = add(w, p[j]), a = fabsf(v), d = fabsf(v - got);
                    float e = c * (a + fabsf(w) + fabsf(got)) + (ct * m[j] + slack);
                    int below = !(a >= fabsf(got) + e);
                    fl[j] = (uint8_t)!(d + e < half_step(o, scale, below));  /* NaN fails too */
                    lo[j] = a - e > lo[j] ? a - e : lo[j];
                    hi[j] = a + e > hi[j] ? a + e : hi[j];
                    df0[j] = d > e ? 1 : df0[j];
                    float dv = v - w, sv = got - w, ev = sv - dv;
                    sdd[j] += dv * dv; srr[j] += sv * sv; see[j] += ev * ev; srd[j] += sv * dv;
                    sch[j] += sv != 0.0f ? 1.0f : 0.0f;
                    float bv = to_bf16(v) - w, bev = bv - dv;  /* what --dtype bfloat16 would store */
                    brr[j] += bv * bv; bee[j] += bev * bev; brd[j] += bv * dv;
                    bch[j] += to_bf16(v) != to_bf16(w) ? 1.0f : 0.0f;
                }
            }
            nflag = listed(fl, n, base, X, cap, nflag);
        }
    }
    for (I k = 0; k < nscale; k++) {
        I first = k * bn, last = first + bn < cols ? first + bn : cols;
        float l = 0, h = 0;
        int d = 0;
        for (I j = first; j < last; j++) {
            l = acc[j] > l ? acc[j] : l;
            h = acc[cols + j] > h ? acc[cols + j] : h;
            d |= df[j];
        }
        blocks[3 * k] = l, blocks[3 * k + 1] = h, blocks[3 * k + 2] = d;
    }
    for (I q = 0; q < 9; q++)
        for (I j = 0; j < cols; j++) sums[q] += (double)acc[(2 + q) * cols + j];
    free(acc), free(df);
    return nflag;
}

/* ---------------------------------------------------------------------------------------- Python side */

static PyObject *fp8_merge(PyObject *self, PyObject *args) {
    Py_buffer codes, wf, scales, L, R, L0, RT, sc, V, E, S, out, fresh_scales, status, idx;
    I r, rows, cols, bn, k_first, k_last, nflag = -1;
    double ct, slack, c;
    int pow2, fresh_all;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*ndddnnny*y*y*ppnnw*w*w*w*w*w*w*", &codes, &wf, &scales, &L, &R, &r, &ct,
                          &slack, &c, &rows, &cols, &bn, &L0, &RT, &sc, &pow2, &fresh_all, &k_first, &k_last, &V, &E,
                          &S, &out, &fresh_scales, &status, &idx))
        return NULL;
    I n = rows * cols, nscale = bn > 0 ? (cols + bn - 1) / bn : 0;
    int ok = r >= 0 && rows >= 0 && cols > 0 && bn > 0 && 0 <= k_first && k_first <= k_last && k_last <= nscale &&
             sized(&codes, n, 1, "codes") && (wf.len == 0 || sized(&wf, n, 4, "wf")) &&
             sized(&scales, nscale, 4, "scales") && sized(&L, rows * r, 4, "L") &&
             sized(&R, (cols + COLS - 1) / COLS * r * COLS, 4, "R") && sized(&L0, rows * r, 4, "L0") &&
             sized(&RT, cols * r, 4, "RT") && sized(&sc, r, 8, "sc") && sized(&V, n, 4, "v") && sized(&E, n, 4, "e") &&
             sized(&S, n, 1, "state") && sized(&out, n, 1, "out") && sized(&fresh_scales, nscale, 4, "new scales") &&
             sized(&status, nscale, 1, "status");
    if (ok) {
        I cap = idx.len / 8;
        Py_BEGIN_ALLOW_THREADS
        nflag = merge_band(codes.buf, wf.len ? wf.buf : NULL, scales.buf, L.buf, R.buf, r, (float)ct, (float)slack,
                           (float)c, rows, cols, bn, L0.buf, RT.buf, sc.buf, pow2, fresh_all, k_first, k_last, V.buf,
                           E.buf, S.buf, out.buf, fresh_scales.buf, status.buf, idx.buf, cap);
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "bad band arguments");
    Py_buffer *all[] = {&codes, &wf, &scales, &L, &R, &L0, &RT, &sc, &V, &E, &S, &out, &fresh_scales, &status, &idx};
    for (size_t q = 0; q < sizeof all / sizeof *all; q++) PyBuffer_Release(all[q]);
    return nflag < 0 ? NULL : PyLong_FromSsize_t(nflag);
}

static PyObject *fp8_encode(PyObject *self, PyObject *args) {
    Py_buffer V, E, scales, keep, codes, out, idx;
    I rows, cols, bn, nflag = -1;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*nnnw*w*", &V, &E, &scales, &keep, &codes, &rows, &cols, &bn, &out, &idx))
        return NULL;
    I n = rows * cols, nscale = bn > 0 ? (cols + bn - 1) / bn : 0;
    int ok = rows >= 0 && cols > 0 && bn > 0 && sized(&V, n, 4, "v") && sized(&E, n, 4, "e") &&
             sized(&scales, nscale, 4, "scales") && sized(&keep, nscale, 1, "keep") && sized(&codes, n, 1, "codes") &&
             sized(&out, n, 1, "out");
    if (ok) {
        I cap = idx.len / 8;
        Py_BEGIN_ALLOW_THREADS
        nflag = encode_band(V.buf, E.buf, scales.buf, keep.buf, codes.buf, rows, cols, bn, out.buf, idx.buf, cap);
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "bad band arguments");
    Py_buffer *all[] = {&V, &E, &scales, &keep, &codes, &out, &idx};
    for (size_t q = 0; q < sizeof all / sizeof *all; q++) PyBuffer_Release(all[q]);
    return nflag < 0 ? NULL : PyLong_FromSsize_t(nflag);
}

static PyObject *fp8_check(PyObject *self, PyObject *args) {
    Py_buffer bc, bs, wf, codes, scales, L, R, idx, sums, blocks;
    I r, rows, cols, bn, nflag = -1;
    double ct, slack, c;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*ndddnnnw*w*w*", &bc, &bs, &wf, &codes, &scales, &L, &R, &r, &ct, &slack,
                          &c, &rows, &cols, &bn, &idx, &sums, &blocks))
        return NULL;
    I n = rows * cols, nscale = bn > 0 ? (cols + bn - 1) / bn : 0;
    int ok = r >= 0 && rows >= 0 && cols > 0 && bn > 0 && sized(&bc, n, 1, "base codes") &&
             (wf.len == 0 || sized(&wf, n, 4, "wf")) &&
             sized(&bs, nscale, 4, "base scales") && sized(&codes, n, 1, "codes") &&
             sized(&scales, nscale, 4, "scales") && sized(&L, rows * r, 4, "L") &&
             sized(&R, (cols + COLS - 1) / COLS * r * COLS, 4, "R") && sized(&sums, 9, 8, "sums") &&
             sized(&blocks, 3 * nscale, 8, "blocks");
    if (ok) {
        I cap = idx.len / 8;
        Py_BEGIN_ALLOW_THREADS
        nflag = check_band(bc.buf, bs.buf, wf.len ? wf.buf : NULL, codes.buf, scales.buf, L.buf, R.buf, r, (float)ct,
                           (float)slack, (float)c, rows, cols, bn, idx.buf, cap, sums.buf, blocks.buf);
        Py_END_ALLOW_THREADS
    } else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "bad band arguments");
    Py_buffer *all[] = {&bc, &bs, &wf, &codes, &scales, &L, &R, &idx, &sums, &blocks};
    for (size_t q = 0; q < sizeof all / sizeof *all; q++) PyBuffer_Release(all[q]);
    return nflag < 0 ? NULL : PyLong_FromSsize_t(nflag);
}

static PyMethodDef methods[] = {
    {"fp8_merge", fp8_merge, METH_VARARGS,
     "fp8_merge(codes, wf, scales, L, R, r, ct, slack, c, rows, cols, bn, L0, RT, sc, power_of_two, fresh_all, k_first, "
     "k_last, v, e, state, out, new_scales, status, idx) -> flagged"},
    {"fp8_encode", fp8_encode, METH_VARARGS,
     "fp8_encode(v, e, scales, keep, codes, rows, cols, bn, out, idx) -> flagged"},
    {"fp8_check", fp8_check, METH_VARARGS,
     "fp8_check(base_codes, base_scales, wf, codes, scales, L, R, r, ct, slack, c, rows, cols, bn, idx, sums, "
     "blocks) -> flagged"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fp8", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fp8(void) { return PyModule_Create(&module); }
