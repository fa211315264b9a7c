/* TopK's products over its selected pairs (sparse_attention/dynamic/topk.py), instead of CSR products
 * (torch.sparse) built for the purpose:
 *   - value mixing (forward) and dQ: out[r] = sum_j w[r, j] * v[cols[r, j]], weighted sums of k
 *     gathered rows, one pass with the output row in L1;
 *   - dW: dot products of a row with k gathered rows;
 *   - dV and dK: scatter-adds, in parallel over groups of rows that share no output row.
 * Every slot is summed, zero weights included, as the CSR products do (so a NaN value behind a zero
 * weight propagates alike).
 *
 * Measured here at N = 4096, k = 64, 8 heads (alternating in-process A/B): the forward's mixing took
 * 11.7 ms alone against 26.5 ms for the CSR product, but only 4-7 ms less in TopK's whole forward
 * (88 ms less at N = 16384); the backward 67 ms against 140 (0.42-0.48x the time at N = 4096-16384). */
#include <stdint.h>
#include <string.h>

#include "rows.h"

/* One job for the three kernels: every pair (r, j) joins row r (of w, a, out) to row cols[r, j] (of v
 * or of out). */
typedef struct {
    const float *w;      /* (rows, k): the pairs' weights (mixing, scatter) */
    const float *a;      /* (rows, E): the rows' own operand (dot, scatter) */
    const float *v;      /* (value rows, E): the gathered operand (mixing, dot) */
    const int64_t *cols; /* (rows, k) */
    int64_t k, E, rows_per_group, keys_per_group;
    float *out;
} pairs;

/* o += w * x over E entries */
static inline void axpy(float *o, float w, const float *x, int64_t E) {
    for (int64_t e = 0; e < E; e++) o[e] += w * x[e];
}

static int mix_rows(void *arg, int64_t row0, int64_t row1) {
    const pairs *p = arg;
    for (int64_t r = row0; r < row1; r++) {
        float *o = p->out + r * p->E;
        memset(o, 0, (size_t)p->E * sizeof(float));
        for (int64_t j = 0; j < p->k; j++) axpy(o, p->w[r * p->k + j], p->v + p->cols[r * p->k + j] * p->E, p->E);
    }
    return 0;
}

/* out[r] = sum_j w[r, j] * v[cols[r, j]]; w, cols: (rows, k), v: (value rows, E), out: (rows, E); all
 * contiguous. */
int sa_mix_rows_f32(const float *w, const int64_t *cols, int64_t rows, int64_t k, const float *v, int64_t E,
                    float *out, int threads) {
    pairs p = {.w = w, .v = v, .cols = cols, .k = k, .E = E, .out = out};
    return sa_parallel_rows(rows, threads, mix_rows, &p);
}

/* 16-lane dot product: a fixed summation order the compiler vectorises without reassociating */
static float dot(const float *x, const float *y, int64_t E) {
    float lane[16] = {0};
    int64_t e = 0;
    for (; e + 16 <= E; e += 16)
        for (int l = 0; l < 16; l++) lane[l] += x[e + l] * y[e + l];
    for (int l = 0; e < E; e++, l++) lane[l] += x[e] * y[e];
    for (int half = 8; half > 0; half /= 2) /* a tree: no 16-long chain of dependent adds */
        for (int l = 0; l < half; l++) lane[l] += lane[l + half];
    return lane[0];
}

static int dot_rows(void *arg, int64_t row0, int64_t row1) {
    const pairs *p = arg;
    for (int64_t r = row0; r < row1; r++)
        for (int64_t j = 0; j < p->k; j++)
            p->out[r * p->k + j] = dot(p->a + r * p->E, p->v + p->cols[r * p->k + j] * p->E, p->E);
    return 0;
}

/* dW: out[r, j] = a[r] . b[cols[r, j]] for a (rows, E), b (value rows, E), cols (rows, k); all contiguous. */
int sa_dot_rows_f32(const float *a, const int64_t *cols, int64_t rows, int64_t k, const float *b, int64_t E,
                    float *out, int threads) {
    pairs p = {.a = a, .v = b, .cols = cols, .k = k, .E = E, .out = out};
    return sa_parallel_rows(rows, threads, dot_rows, &p);
}

static int scatter_groups(void *arg, int64_t g0, int64_t g1) {
    const pairs *p = arg;
    for (int64_t g = g0; g < g1; g++) {
        memset(p->out + g * p->keys_per_group * p->E, 0, (size_t)(p->keys_per_group * p->E) * sizeof(float));
        for (int64_t r = g * p->rows_per_group; r < (g + 1) * p->rows_per_group; r++)
            for (int64_t j = 0; j < p->k; j++)
                if (p->cols[r * p->k + j] >= 0)
                    axpy(p->out + p->cols[r * p->k + j] * p->E, p->w[r * p->k + j], p->a + r * p->E, p->E);
    }
    return 0;
}

/* dV and dK, the transposed products: out[cols[r, j]] += w[r, j] * src[r] over every pair (a negative
 * column: none, the pair is skipped). The rows come
 * in groups of rows_per_group whose pairs all fall in the group's own keys_per_group output rows (a
 * batch entry's key head and the query heads reading it), so the groups run in parallel without
 * sharing an output row; each group's rows are zeroed first. w, cols: (rows, k); src: (rows, E); out:
 * (groups * keys_per_group, E). */
int sa_scatter_groups_f32(const float *w, const int64_t *cols, int64_t groups, int64_t rows_per_group,
                          int64_t keys_per_group, int64_t k, const float *src, int64_t E, float *out, int threads) {
    pairs p = {.w = w, .a = src, .cols = cols, .k = k, .E = E, .rows_per_group = rows_per_group,
               .keys_per_group = keys_per_group, .out = out};
    return sa_parallel_rows(groups, threads, scatter_groups, &p);
}

/* The backward of Reformer's shared-QK keys (sparse_attention/nn/content_based.py, _UnitRows: each row
 * divided by its norm): one pass over the rows instead of PyTorch's dot product, multiply-add and division. */
typedef struct {
    const float *y, *g, *norm;
    int64_t E;
    float eps;
    float *dx;
} unit_job;

static int unit_rows_bwd(void *arg, int64_t r0, int64_t r1) {
    const unit_job *p = arg;
    for (int64_t r = r0; r < r1; r++) {
        const float *y = p->y + r * p->E, *g = p->g + r * p->E;
        float n = p->norm[r], dot = 0.0f;
        if (n > p->eps) /* a row divided by eps: y does not depend on |x| */
            for (int64_t e = 0; e < p->E; e++) dot += y[e] * g[e];
        float inv = 1.0f / (n > p->eps ? n : p->eps);
        for (int64_t e = 0; e < p->E; e++) p->dx[r * p->E + e] = (g[e] - y[e] * dot) * inv;
    }
    return 0;
}

/* dx (rows, E) = (g - y (y.g)) / max(norm, eps), the dot product taken as 0 where norm <= eps */
int sa_unit_rows_bwd_f32(const float *y, const float *g, const float *norm, int64_t rows, int64_t E, double eps,
                         float *dx, int threads) {
    unit_job p = {.y = y, .g = g, .norm = norm, .E = E, .eps = (float)eps, .dx = dx};
    return sa_parallel_rows(rows, threads, unit_rows_bwd, &p);
}
