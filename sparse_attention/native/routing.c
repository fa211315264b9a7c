/* Routing's pair counts (sparse_attention/dynamic/routing.py): in how many clusters each (query slot,
 * key slot) pair of every cluster meets. Each token's clusters become a bit set (K bits); a pair's count
 * is the popcount of the AND of its two sets. This replaces one-hot rows over the K clusters and their
 * matrix product (at N = 16384, K = 256 the one-hot rows alone took 69 ms to zero-fill). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"

typedef struct {
    const int64_t *idx;  /* (BH, K, w) members */
    int64_t K, w, L, words;
    uint64_t *bits;      /* (BH, L, words) */
    const int64_t *qi, *ki; /* pair counts: (BH, K, wq), (BH, K, wk) */
    const uint64_t *qbits, *kbits;
    int64_t wq, wk, N, S;
    const float *table;  /* NULL, or table[count] written instead of the count */
    float *out;          /* (BH, K, wq, wk) */
} sets_job;

static int member_bits(void *arg, int64_t bh0, int64_t bh1) {
    const sets_job *p = arg;
    for (int64_t bh = bh0; bh < bh1; bh++) {
        uint64_t *bits = p->bits + bh * p->L * p->words;
        memset(bits, 0, (size_t)(p->L * p->words) * sizeof(uint64_t));
        for (int64_t c = 0; c < p->K; c++)
            for (int64_t j = 0; j < p->w; j++) {
                int64_t t = p->idx[(bh * p->K + c) * p->w + j];
                if (t < 0 || t >= p->L) return -2;
                bits[t * p->words + (c >> 6)] |= 1ull << (c & 63);
            }
    }
    return 0;
}

/* bits (BH, L, words), words = ceil(K / 64): bit c of token t's set is whether t is a member of cluster
 * c, from idx (BH, K, w) in [0, L). Returns 0, or -2 for a member out of range. */
int sa_member_bits(const int64_t *idx, int64_t BH, int64_t K, int64_t w, int64_t L, uint64_t *bits, int threads) {
    sets_job p = {.idx = idx, .K = K, .w = w, .L = L, .words = (K + 63) / 64, .bits = bits};
    return sa_parallel_rows(BH, threads, member_bits, &p);
}

static int pair_counts(void *arg, int64_t r0, int64_t r1) {
    const sets_job *p = arg;
    const int64_t words = p->words, wq = p->wq, wk = p->wk;
    const float *table = p->table;
    /* the cluster's key sets side by side (wk x words), then each query's set against all of them */
    uint64_t *kb = malloc((size_t)(wk * words) * sizeof(uint64_t));
    int32_t *n = malloc((size_t)wk * sizeof(int32_t));
    if (!kb || !n) {
        free(kb);
        free(n);
        return -1;
    }
    for (int64_t r = r0; r < r1; r++) { /* r = bh * K + c */
        const int64_t bh = r / p->K;
        for (int64_t j = 0; j < wk; j++)
            memcpy(kb + j * words, p->kbits + (bh * p->S + p->ki[r * wk + j]) * words, (size_t)words * 8);
        float *o = p->out + r * wq * wk;
        for (int64_t i = 0; i < wq; i++, o += wk) {
            const uint64_t *a = p->qbits + (bh * p->N + p->qi[r * wq + i]) * words;
            if (words == 1) {
                const uint64_t a0 = a[0];
                for (int64_t j = 0; j < wk; j++) n[j] = (int32_t)__builtin_popcountll(a0 & kb[j]);
            } else {
                for (int64_t j = 0; j < wk; j++) {
                    int32_t m = 0;
                    for (int64_t x = 0; x < words; x++) m += (int32_t)__builtin_popcountll(a[x] & kb[j * words + x]);
                    n[j] = m;
                }
            }
            if (table)
                for (int64_t j = 0; j < wk; j++) o[j] = table[n[j]];
            else
                for (int64_t j = 0; j < wk; j++) o[j] = (float)n[j];
        }
    }
    free(kb);
    free(n);
    return 0;
}

/* out (BH, K, wq, wk): the clusters query slot i and key slot j of cluster c share, or table[that count]
 * (table: K + 1 entries, or NULL), from the members qi (BH, K, wq) in [0, N), ki (BH, K, wk) in [0, S)
 * and their bit sets (sa_member_bits). Returns 0, or -1 when the scratch could not be allocated. */
int sa_pair_counts(const int64_t *qi, const int64_t *ki, int64_t BH, int64_t K, int64_t wq, int64_t wk,
                   const uint64_t *qbits, const uint64_t *kbits, int64_t N, int64_t S, const float *table, float *out,
                   int threads) {
    sets_job p = {.K = K, .words = (K + 63) / 64, .qi = qi, .ki = ki, .qbits = qbits, .kbits = kbits,
                  .wq = wq, .wk = wk, .N = N, .S = S, .table = table, .out = out};
    return sa_parallel_rows(BH * K, threads, pair_counts, &p);
}
