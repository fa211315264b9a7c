/* Vector helpers of the dense kernels of sparse_attention/native (linear.c): GCC/Clang
 * vector types as wide as the target's vectors, rows padded with zeros to LANES floats in 64-byte aligned
 * slots, and the two products everything is built from: a block of BLOCK rows times a matrix
 * (times_rows) and a rank-BLOCK update of a matrix (rank_rows). Those two are never inlined: inlined
 * into a caller's loop, rank_rows took twice the time (register pressure; measured in the non-causal
 * forward at N = 4096: 6.8 against 4.7 ms). */
#ifndef SA_VEC_H
#define SA_VEC_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { BLOCK = 4, LANES = 16 };

/* the widest vector of the target (a wider vector type would be expanded element by element) */
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#elif defined(__AVX__)
#define VECTOR_BYTES 32
#else
#define VECTOR_BYTES 16
#endif
typedef float vf __attribute__((vector_size(VECTOR_BYTES)));
typedef int32_t vi __attribute__((vector_size(VECTOR_BYTES)));
#define VL ((int64_t)(sizeof(vf) / sizeof(float))) /* divides LANES: rows padded to LANES are whole vectors */

static inline int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

static inline float *aligned_floats(int64_t n) {
    size_t bytes = ((size_t)n * sizeof(float) + 63) / 64 * 64;
    float *p = aligned_alloc(64, bytes ? bytes : 64);
    if (p) memset(p, 0, bytes);
    return p;
}

static inline vf splat(float x) { return (vf){0} + x; }

/* where mask (lanes of -1 or 0, from a comparison): a, else b (vector ?: is C++ only) */
static inline vf pick(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* e^x lane by lane (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n)
 * for x <= 88; x below -87 gives e^-87 (~1.6e-38, not 0), NaN gives NaN */
static inline vf exp_lanes(vf x) {
    x = pick(x < -87.0f, splat(-87.0f), x);
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

/* n floats from x (all VL when n >= VL, none when n <= 0), zeros in the other lanes; inline moves, no
 * library call (a memcpy call per row took a fifth of the causal backward) */
static inline vf load_part(const float *restrict x, int64_t n) {
    vf a = {0};
    if (n >= VL)
        memcpy(&a, x, sizeof a); /* a constant size: one unaligned load */
    else
        for (int64_t l = 0; l < n; l++) a[l] = x[l];
    return a;
}

static inline void store_part(float *restrict x, vf a, int64_t n) {
    if (n >= VL)
        memcpy(x, &a, sizeof a);
    else
        for (int64_t l = 0; l < n; l++) x[l] = a[l];
}

/* a row of n floats into an aligned slot padded with zeros to np */
static inline void load_row(float *restrict slot, const float *restrict x, int64_t n, int64_t np) {
    for (int64_t i = 0; i < np; i += VL) *(vf *)(slot + i) = load_part(x + i, n - i);
}

/* the first n floats of an aligned slot into x */
static inline void store_row(float *restrict x, const float *restrict slot, int64_t n) {
    for (int64_t i = 0; i < n; i += VL) store_part(x + i, *(const vf *)(slot + i), n - i);
}

static inline void zero_row(float *slot, int64_t np) {
    for (int64_t i = 0; i < np; i += VL) *(vf *)(slot + i) = (vf){0};
}

typedef float vf4 __attribute__((vector_size(16)));

/* the sum of the lanes as a tree (a chain of dependent adds would take ~4x longer) */
static inline float lane_sum(vf a) {
    vf4 s = {0}, part;
    for (int64_t i = 0; i < VL; i += 4) {
        memcpy(&part, (char *)&a + i * sizeof(float), sizeof part);
        s += part;
    }
    return (s[0] + s[2]) + (s[1] + s[3]);
}

static inline float dot(const float *restrict x, const float *restrict y, int64_t np) {
    vf acc = {0};
    for (int64_t i = 0; i < np; i += VL) acc += *(const vf *)(x + i) * *(const vf *)(y + i);
    return lane_sum(acc);
}

/* y += w * x over np entries (whole vectors) */
static inline void axpy(float *restrict y, float w, const float *restrict x, int64_t np) {
    for (int64_t i = 0; i < np; i += VL) *(vf *)(y + i) += w * *(const vf *)(x + i);
}

/* y[r] = Σ_k a[r][k] (M + M2)[k, :] for the BLOCK rows (M2 may be NULL): a[r] of K entries, M and M2 (K, W),
 * W a multiple of LANES. Each strip of M one vector wide is read once for the whole block, the rows' sums
 * stay in registers. */
__attribute__((noinline)) static void times_rows2(float *const *a, const float *restrict M, const float *restrict M2,
                                                   int64_t K, int64_t W, float *const *y) {
    for (int64_t c = 0; c < W; c += VL) {
        vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t k = 0; k < K; k++) {
            vf m = *(const vf *)(M + k * W + c);
            if (M2) m += *(const vf *)(M2 + k * W + c); /* (the branch is hoisted out of the loop) */
            s0 += a[0][k] * m;
            s1 += a[1][k] * m;
            s2 += a[2][k] * m;
            s3 += a[3][k] * m;
        }
        *(vf *)(y[0] + c) = s0;
        *(vf *)(y[1] + c) = s1;
        *(vf *)(y[2] + c) = s2;
        *(vf *)(y[3] + c) = s3;
    }
}

static inline void times_rows(float *const *a, const float *restrict M, int64_t K, int64_t W, float *const *y) {
    times_rows2(a, M, NULL, K, W, y);
}

/* M[k, :] += Σ_r a[r][k] b[r] for the BLOCK rows (a rank-BLOCK update): M (K, W), b[r] of W entries */
__attribute__((noinline)) static void rank_rows(float *restrict M, float *const *a, float *const *b, int64_t K,
                                                 int64_t W) {
    for (int64_t c = 0; c < W; c += VL) {
        vf b0 = *(const vf *)(b[0] + c), b1 = *(const vf *)(b[1] + c), b2 = *(const vf *)(b[2] + c),
           b3 = *(const vf *)(b[3] + c);
        for (int64_t k = 0; k < K; k++) {
            vf *m = (vf *)(M + k * W + c);
            *m += a[0][k] * b0 + a[1][k] * b1 + a[2][k] * b2 + a[3][k] * b3;
        }
    }
}

/* A tile of 16 rows transposed: dst[c * ds + r] = rows[r][e0 + c] for r, c < 16, where rows[r] NULL is a
 * row of zeros and columns from `cols` on are read as 0 (nothing past them is touched). dst rows are 16
 * floats at 64-byte alignment. With AVX-512, 16 loads, 64 shuffles in registers and 16 stores (as scalars,
 * 256 loads and 256 strided stores took a fifth of the items kernels' time at D = 64). */
static inline void transpose_tile16(const float *const *rows, int64_t e0, int64_t cols, float *restrict dst,
                                    int64_t ds) {
#if defined(__AVX512F__)
    const __mmask16 keep = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols > 0 ? cols : 0)) - 1);
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = rows[i] ? _mm512_maskz_loadu_ps(keep, rows[i] + e0) : _mm512_setzero_ps();
    for (int i = 0; i < 16; i += 2) { /* within 128-bit lanes: pairs of rows interleaved */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* quads of rows: lane L of r[i + c] holds column c + 4L of rows i..i+3 */
        __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]), c = _mm512_castps_pd(t[i + 2]),
                d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) { /* lane L of the four quads' r[4g + c] -> column c + 4L */
        __m512 x = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), y = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
        __m512 x2 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE), y2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
        _mm512_store_ps(dst + c * ds, _mm512_shuffle_f32x4(x, y, 0x88));
        _mm512_store_ps(dst + (c + 4) * ds, _mm512_shuffle_f32x4(x, y, 0xDD));
        _mm512_store_ps(dst + (c + 8) * ds, _mm512_shuffle_f32x4(x2, y2, 0x88));
        _mm512_store_ps(dst + (c + 12) * ds, _mm512_shuffle_f32x4(x2, y2, 0xDD));
    }
#else
    for (int64_t c = 0; c < 16; c++)
        for (int64_t r = 0; r < 16; r++) dst[c * ds + r] = rows[r] && c < cols ? rows[r][e0 + c] : 0.0f;
#endif
}

/* dst[c, r] = src[r, c] for r < rows, c < cols (row strides of src and dst given) */
static inline void transpose(const float *restrict src, int64_t src_stride, int64_t rows, int64_t cols,
                             float *restrict dst, int64_t dst_stride) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * dst_stride + r] = src[r * src_stride + c];
}

#endif
