/* LSH's hashing steps (sparse_attention/dynamic/lsh.py): the bucket of each row of projections, and
 * the stable order of tokens by bucket. Both replace several PyTorch ops with one pass:
 * abs().argmax() + gather + compare, and torch.sort of bucket * L + position (a comparison sort where
 * a counting sort over the few bucket values does). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"

int sa_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

typedef struct {
    const float *p;
    int64_t half, row_stride;
    int64_t *out;
} bucket_job;

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

/* argmax over [x, -x] without building it: the column of the largest |x| (the first on ties, as
 * torch.argmax), plus half when that projection is negative; a row holding NaN takes its first NaN's
 * column (torch.argmax ranks NaN highest; NaN < 0 is false). 16 lanes (GCC/Clang vector extensions)
 * keep each lane's largest |x| and its first column. */
static int64_t bucket_of(const float *x, int64_t half) {
    if (half < 16) { /* too short for the lanes */
        float best = -1.0f;
        int64_t col = 0;
        for (int64_t c = 0; c < half; c++) {
            float a = fabsf(x[c]);
            if (a != a) return c;
            if (a > best) {
                best = a;
                col = c;
            }
        }
        return col + (x[col] < 0 ? half : 0);
    }
    const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    v16f best = {0};
    best -= 1.0f; /* below every |x|: a lane's first column replaces it */
    v16i at = {0}, nan = {0};
    int64_t j = 0;
    for (; j + 16 <= half; j += 16) {
        v16i bits;
        memcpy(&bits, x + j, sizeof bits);
        bits &= 0x7fffffff; /* |x| */
        v16f a;
        memcpy(&a, &bits, sizeof a);
        v16i gt = a > best; /* -1 where true */
        v16i best_bits;
        memcpy(&best_bits, &best, sizeof best_bits);
        best_bits = (bits & gt) | (best_bits & ~gt);
        memcpy(&best, &best_bits, sizeof best);
        at = ((lane + (int32_t)j) & gt) | (at & ~gt);
        nan |= a != a;
    }
    float bl[16];
    int32_t al[16];
    memcpy(bl, &best, sizeof bl);
    memcpy(al, &at, sizeof al);
    int32_t any_nan = 0;
    for (int l = 0; l < 16; l++) any_nan |= nan[l];
    for (int l = 0; j < half; j++, l++) { /* later columns than every lane's: strict > keeps the first */
        float v = fabsf(x[j]);
        if (v > bl[l]) {
            bl[l] = v;
            al[l] = (int32_t)j;
        }
        any_nan |= v != v;
    }
    if (any_nan)
        for (int64_t c = 0; c < half; c++)
            if (x[c] != x[c]) return c;
    float top = bl[0]; /* branch-free: the largest |x|, then the first column holding it */
    for (int l = 1; l < 16; l++) top = bl[l] > top ? bl[l] : top;
    int32_t col = INT32_MAX;
    for (int l = 0; l < 16; l++) col = bl[l] == top && al[l] < col ? al[l] : col;
    return col + (x[col] < 0 ? half : 0);
}

static int bucket_rows(void *arg, int64_t row0, int64_t row1) {
    const bucket_job *jb = arg;
    for (int64_t r = row0; r < row1; r++) jb->out[r] = bucket_of(jb->p + r * jb->row_stride, jb->half);
    return 0;
}

/* p: (rows, half) with rows row_stride apart, half >= 1; out: (rows,) */
int sa_lsh_buckets_f32(const float *p, int64_t rows, int64_t half, int64_t row_stride, int64_t *out, int threads) {
    bucket_job jb = {p, half, row_stride, out};
    return sa_parallel_rows(rows, threads, bucket_rows, &jb);
}

typedef struct {
    const int64_t *b;
    int64_t L, values;
    int64_t *order;
} order_job;

static int order_rows(void *arg, int64_t row0, int64_t row1) {
    const order_job *jb = arg;
    int64_t L = jb->L, V = jb->values;
    int64_t *start = malloc((size_t)(V + 1) * sizeof(int64_t));
    if (!start) return -1;
    int status = 0;
    for (int64_t r = row0; r < row1 && !status; r++) {
        const int64_t *b = jb->b + r * L;
        int64_t *o = jb->order + r * L;
        memset(start, 0, (size_t)(V + 1) * sizeof(int64_t));
        for (int64_t j = 0; j < L; j++) {
            if (b[j] < 0 || b[j] >= V) {
                status = -2;
                break;
            }
            start[b[j] + 1]++;
        }
        if (status) break;
        for (int64_t v = 0; v < V; v++) start[v + 1] += start[v];
        for (int64_t j = 0; j < L; j++) o[start[b[j]]++] = j;
    }
    free(start);
    return status;
}

/* Stable counting sort of each row of b (rows, L) contiguous, values in [0, values): order (rows, L)
 * holds the positions by ascending value, equal values by position (torch.sort(b * L + position)).
 * Returns 0, -1 (no memory) or -2 (a value out of range). */
int sa_bucket_order(const int64_t *b, int64_t rows, int64_t L, int64_t values, int64_t *order, int threads) {
    order_job jb = {b, L, values, order};
    return sa_parallel_rows(rows, threads, order_rows, &jb);
}
