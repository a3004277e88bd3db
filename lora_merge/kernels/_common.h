/* What the kernels' C files share: types, bit casts, the fused low-rank product and buffer checks. */

#ifndef LORA_MERGE_COMMON_H
#define LORA_MERGE_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef Py_ssize_t I;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && (__GNUC__ >= 11)
#define HOT __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define HOT
#endif
#define INLINE static inline __attribute__((always_inline))

enum { BF16 = 0, F16 = 1, F32 = 2 };

INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE double u2d(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
INLINE uint64_t d2u(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }
/* x < y ? x : y, y for a NaN x, as fminf gives, but a select the compiler vectorizes (fminf is a call) */
INLINE float smaller(float x, float y) { return x < y ? x : y; }

/* w + p, where a product of exactly zero leaves w as it is (-0 stays -0: a delta of zero changes no bit) */
INLINE float add(float w, float p) { return p == 0.0f ? w : w + p; }
/* x rounded to bfloat16, to nearest even (finite x): what --dtype bfloat16 would store, for the survival figures */
INLINE float to_bf16(float x) {
    uint32_t u = f2u(x);
    return u2f((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}
INLINE double add64(double w, double p) { return p == 0.0 ? w : w + p; }

/* ------------------------------------------------------------------------------- the product, fused */

/* The low-rank product of one row and one block of COLS columns, and the sum of its terms' sizes, in registers:
   p_j = sum_k L[k] R[k][j] and m_j = sum_k |L[k]| |R[k][j]|. R is packed per block of columns: `Rb` points at the
   block's r x COLS values (zero beyond the last column). Each sum is a chain of fused multiply-adds from 0 (any
   order is covered by the bound). */
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint64_t v4u __attribute__((vector_size(32)));
#define COLS 64
#define GROUP 8

INLINE void product32(const float *L, const float *Rb, I r, float *p, float *m) {
    for (int half = 0; half < 2; half++) {  /* 32 columns at a time: eight registers of sums, without spilling */
        v8f acc[4], size[4];
        for (int q = 0; q < 4; q++) acc[q] = size[q] = (v8f){0};
        for (I k = 0; k < r; k++) {
            float lk = L[k], ak = fabsf(lk);
            const float *rk = Rb + k * COLS + 32 * half;
            for (int q = 0; q < 4; q++) {
                v8f x, ax;
                memcpy(&x, rk + 8 * q, 32);
                v8u bits;
                memcpy(&bits, &x, 32);
                bits &= 0x7FFFFFFFu;
                memcpy(&ax, &bits, 32);
                acc[q] += lk * x;
                size[q] += ak * ax;
            }
        }
        memcpy(p + 32 * half, acc, sizeof acc);
        memcpy(m + 32 * half, size, sizeof size);
    }
}

INLINE void product64(const double *L, const double *Rb, I r, double *p, double *m) {
    for (int quarter = 0; quarter < 4; quarter++) {  /* 16 columns at a time: eight registers of sums */
        v4d acc[4], size[4];
        for (int q = 0; q < 4; q++) acc[q] = size[q] = (v4d){0};
        for (I k = 0; k < r; k++) {
            double lk = L[k], ak = fabs(lk);
            const double *rk = Rb + k * COLS + 16 * quarter;
            for (int q = 0; q < 4; q++) {
                v4d x, ax;
                memcpy(&x, rk + 4 * q, 32);
                v4u bits;
                memcpy(&bits, &x, 32);
                bits &= 0x7FFFFFFFFFFFFFFFull;
                memcpy(&ax, &bits, 32);
                acc[q] += lk * x;
                size[q] += ak * ax;
            }
        }
        memcpy(p + 16 * quarter, acc, sizeof acc);
        memcpy(m + 16 * quarter, size, sizeof size);
    }
}

/* a buffer argument holds at least `count` items of `item` bytes */
static int sized(Py_buffer *b, I count, I item, const char *what) {
    if (b->len < count * item) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, %zd needed", what, b->len, count * item);
        return 0;
    }
    return 1;
}

#endif
