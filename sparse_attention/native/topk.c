/* Row-wise top-k of a float32 matrix: the selection step of sparse_attention's TopK and Routing.
 *
 * Compiled on first use by sparse_attention/native/__init__.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes; the package falls back to torch.topk where no compiler is found.
 *
 * Order. Entries rank by value (-0 = +0), NaN above every number, equal values by lower column.
 * The k entries kept are the first k in that order, so the result is fully determined by the row
 * (ties included); they are written in ascending column order.
 *
 * Per row, when S > 4k, in two passes over the row (both vectorised):
 *   1. the maxima of G = 2k strided groups (group j holds columns j, j + G, j + 2G, ...); their
 *      k-th largest value t is at most the row's k-th largest (k groups each hold a value >= t);
 *   2. the columns with a value >= t are the candidates (about 1.4k of them on random rows), kept
 *      in column order.
 * The k-th largest among the candidates is then found by bisection over order-preserving 32-bit
 * keys (32 vectorised counts at most, no data-dependent branches), and one scan in column order
 * writes the result. A row holding NaN (which compares false in the passes) takes every column as a
 * candidate, as do rows with S <= 4k. When t = -inf only finite values are candidates; with fewer
 * than k of them the row is completed by its first -inf columns.
 *
 * Against torch.topk: benchmarks/bench_native.py, figures in benchmarks/RESULTS.md.
 */
#include <float.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"

/* An order-preserving key: key(a) > key(b) exactly when a > b as floats, with -0 = +0, and NaN
 * (any sign or payload) above +inf. */
static inline uint32_t key_of(float x) {
    if (x != x) return 0xffffffffu;
    if (x == 0.0f) x = 0.0f;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float float_of(uint32_t key) {
    uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static inline int64_t count_at_least(const uint32_t *keys, int64_t n, uint32_t t) {
    int64_t c = 0;
    for (int64_t j = 0; j < n; j++) c += keys[j] >= t;
    return c;
}

/* The largest t with count(keys >= t) >= k (0 < k <= n), by bisection over the 32-bit keys: the
 * k-th largest key, or, if a count of exactly k is met on the way, a t that k keys reach. */
static uint32_t kth_key(const uint32_t *keys, int64_t n, int64_t k, int64_t *count) {
    uint64_t lo = 0, hi = 1ull << 32; /* count(>= lo) >= k > count(>= hi) */
    int64_t c_lo = n;
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        int64_t c = count_at_least(keys, n, (uint32_t)mid);
        if (c >= k) {
            lo = mid;
            c_lo = c;
            if (c == k) break;
        } else {
            hi = mid;
        }
    }
    *count = c_lo;
    return (uint32_t)lo;
}

typedef struct {
    float *maxima;   /* 2k */
    uint32_t *keys;  /* S: the candidates' keys */
    int64_t *cand;   /* S: their columns, ascending */
} scratch;

/* Appends the columns j0 <= j < j1 of s with a value >= t (no NaN in s) to cand, keys, from n. */
static int64_t gather_at_least(const float *s, int64_t j0, int64_t j1, float t, int64_t n, scratch *w) {
    int64_t j = j0;
#if defined(__AVX512F__)
    __m512 tv = _mm512_set1_ps(t);
    for (; j + 16 <= j1; j += 16)
        for (__mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j), tv, _CMP_GE_OQ); m; m &= m - 1) {
            int64_t c = j + __builtin_ctz(m);
            w->cand[n] = c;
            w->keys[n++] = key_of(s[c]);
        }
#elif defined(__AVX2__)
    __m256 tv = _mm256_set1_ps(t);
    for (; j + 8 <= j1; j += 8)
        for (int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j), tv, _CMP_GE_OQ)); m; m &= m - 1) {
            int64_t c = j + __builtin_ctz(m);
            w->cand[n] = c;
            w->keys[n++] = key_of(s[c]);
        }
#endif
    for (; j < j1; j++)
        if (s[j] >= t) {
            w->cand[n] = j;
            w->keys[n++] = key_of(s[j]);
        }
    return n;
}

static void top_row(const float *s, int64_t S, int64_t k, float *values, int64_t *cols, scratch *w) {
    int64_t n = 0;
    int take_all = S <= 4 * k;
    if (!take_all) {
        int64_t G = 2 * k, b = S / G;
        float *m = w->maxima;
        memcpy(m, s, (size_t)G * sizeof(float));
        int nan_lanes = 0;
        for (int64_t j = 0; j < G; j++) nan_lanes |= s[j] != s[j];
        for (int64_t r = 1; r < b; r++) {
            const float *x = s + r * G;
            for (int64_t j = 0; j < G; j++) {
                m[j] = x[j] > m[j] ? x[j] : m[j];
                nan_lanes |= x[j] != x[j];
            }
        }
        const float *x = s + b * G; /* the S mod G last columns join the first groups */
        for (int64_t j = 0; j < S - b * G; j++) {
            m[j] = x[j] > m[j] ? x[j] : m[j];
            nan_lanes |= x[j] != x[j];
        }
        take_all = nan_lanes; /* NaN compares false in the passes below */
        if (!take_all) {
            for (int64_t j = 0; j < G; j++) w->keys[j] = key_of(m[j]);
            int64_t unused;
            float t = float_of(kth_key(w->keys, G, k, &unused));
            /* t = -inf: the finite values are the candidates (the -inf ones rank after them by column) */
            n = gather_at_least(s, 0, S, t == -INFINITY ? -FLT_MAX : t, 0, w);
            if (n < k) { /* fewer than k finite values: all of them and the first k - n -inf columns */
                int64_t extra = k - n;
                for (int64_t j = 0, out = 0; out < k; j++)
                    if (s[j] > -INFINITY || extra-- > 0) {
                        cols[out] = j;
                        values[out++] = s[j];
                    }
                return;
            }
        }
    }
    if (take_all) {
        for (int64_t j = 0; j < S; j++) {
            w->cand[j] = j;
            w->keys[j] = key_of(s[j]);
        }
        n = S;
    }
    int64_t c_ge;
    uint32_t t = kth_key(w->keys, n, k, &c_ge);
    /* kept: the keys above t, then the keys equal to t by column while needed (all when c_ge = k) */
    int64_t need = c_ge == k ? n : k - (t == 0xffffffffu ? 0 : count_at_least(w->keys, n, t + 1));
    for (int64_t j = 0, out = 0; out < k; j++) {
        uint32_t key = w->keys[j];
        if (key > t || (key == t && need-- > 0)) {
            cols[out] = w->cand[j];
            values[out++] = s[w->cand[j]];
        }
    }
}

typedef struct {
    const float *s;
    int64_t S, row_stride, k;
    float *values;
    int64_t *cols;
} topk_job;

static int topk_rows(void *arg, int64_t row0, int64_t row1) {
    const topk_job *jb = arg;
    int64_t S = jb->S, k = jb->k;
    scratch w = {malloc((size_t)(2 * k) * sizeof(float)), malloc((size_t)S * sizeof(uint32_t)),
                 malloc((size_t)S * sizeof(int64_t))};
    int status = -1;
    if (w.maxima && w.keys && w.cand) {
        for (int64_t r = row0; r < row1; r++)
            top_row(jb->s + r * jb->row_stride, S, k, jb->values + r * k, jb->cols + r * k, &w);
        status = 0;
    }
    free(w.maxima);
    free(w.keys);
    free(w.cand);
    return status;
}

/* values, cols: (rows, k), contiguous. 0 < k <= S. Returns 0, or -1 when memory could not be had (the
 * outputs are then incomplete). */
int sa_topk_f32(const float *s, int64_t rows, int64_t S, int64_t row_stride, int64_t k, float *values,
                int64_t *cols, int threads) {
    topk_job jb = {s, S, row_stride, k, values, cols};
    return sa_parallel_rows(rows, threads, topk_rows, &jb);
}
