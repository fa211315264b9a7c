/* Softmax attention over small items whose rows are given by index (routing's clusters and LSH's sorted
 * chunks against their key windows, sparse_attention/dynamic/routing.py and lsh.py), forward and backward:
 * each item is wq query rows against wk key rows (-1: an empty slot), read straight from the token tensors,
 * with an additive bias per pair; outputs and gradients go straight into the tokens' rows. They replace
 * gathering the items' rows, PyTorch's fused kernel (whose outputs and gradients are fresh per-item
 * tensors, the gradients zero-filled) and scattering back. Each group of items (a batch entry and head, or
 * key/value head) owns its rows and runs on one thread.
 *
 * Forward: per item and query, m = the row's largest score, o = Σ exp(s - m) v and l = Σ exp(s - m); a
 * query in several items gets out = Σ exp(m - M) o / Z with M the largest m and Z = Σ exp(m - M) l, so
 * its softmax runs over the union of its items' keys (each pair as often as it occurs: the caller's bias
 * lowers repeated pairs). M and Z are returned; the log-sum-exp is M + log Z.
 *
 * Backward:
 * The probabilities are p = exp(scale q.k + bias - lse) with the caller's lse per query row (its softmax
 * over every item it is in: the gradient of the union softmax), and the output o per query row for
 * D = dO.o. Per item, for each block of 4 queries:
 *   S = Q Kᵀ, P = exp(scale S + bias - lse), dP = dO Vᵀ, dS = scale P (dP - D),
 *   dQ += dS K, dK += dSᵀ Q, dV += Pᵀ dO.
 * A probability below e^-87 is taken as 0 (the exponential's range; masked pairs and rows with lse = +inf
 * give exactly 0, as the fused kernel does). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"
#include "vec.h"

typedef struct {
    const float *q, *k, *v, *g, *o, *lse, *bias;
    const float *k2, *v2;                /* a second source of keys and values (or NULL): rows from `split` on */
    const int64_t *qrows, *krows, *boff; /* boff: each item's first bias entry */
    int64_t items, wq, wk, D, Dv, Dp, Dvp, Kp, nq, nk, nk2, split, brow; /* brow: bias row stride (0: one row) */
    float scale;
    float *dq, *dk, *dv, *dk2, *dv2; /* backward */
    float *out, *M, *Z;              /* forward */
} items_job;

/* key row `row` (an absolute index: below split in k, else row - split in k2), and its value row; the same
 * rows of the key and value gradients */
static inline const float *key_row(const items_job *p, int64_t row) {
    return row < p->split ? p->k + row * p->D : p->k2 + (row - p->split) * p->D;
}
static inline const float *value_row(const items_job *p, int64_t row) {
    return row < p->split ? p->v + row * p->Dv : p->v2 + (row - p->split) * p->Dv;
}
static inline float *key_grad_row(const items_job *p, int64_t row) {
    return row < p->split ? p->dk + row * p->D : p->dk2 + (row - p->split) * p->D;
}
static inline float *value_grad_row(const items_job *p, int64_t row) {
    return row < p->split ? p->dv + row * p->Dv : p->dv2 + (row - p->split) * p->Dv;
}

typedef struct {
    float *kt, *vt, *kr, *vr, *dkb, *dvb, *rows;
} items_scratch;

static void scratch_free(items_scratch *s) {
    free(s->kt);
    free(s->vt);
    free(s->kr);
    free(s->vr);
    free(s->dkb);
    free(s->dvb);
    free(s->rows);
}

static int scratch_init(items_scratch *s, const items_job *p) {
    s->kt = aligned_floats(p->Dp * p->Kp);   /* Kᵀ (Dp, Kp) */
    s->vt = aligned_floats(p->Dvp * p->Kp);  /* Vᵀ (Dvp, Kp) */
    s->kr = aligned_floats(p->Kp * p->Dp);   /* K (Kp, Dp) */
    s->vr = aligned_floats(p->Kp * p->Dvp);  /* V (Kp, Dvp) */
    s->dkb = aligned_floats(p->Kp * p->Dp);  /* the item's dK */
    s->dvb = aligned_floats(p->Kp * p->Dvp); /* the item's dV */
    s->rows = aligned_floats(BLOCK * (2 * p->Dp + p->Dvp + 2 * p->Kp));
    if (s->kt && s->vt && s->kr && s->vr && s->dkb && s->dvb && s->rows) return 0;
    scratch_free(s);
    return -1;
}

/* the item's keys as Kᵀ (pad columns 0), and for the forward its values as rows, for the backward its
 * values as Vᵀ and its keys as rows, with the item's dK and dV zeroed; a negative row is a zero key */
static void load_keys(const items_job *p, const items_scratch *s, const int64_t *krow, int forward) {
    for (int64_t j0 = 0; j0 < p->Kp; j0 += 16) { /* Kᵀ and Vᵀ by tiles of 16 keys (Kp is a multiple of 16) */
        const float *kx[16], *vx[16];
        for (int64_t r = 0; r < 16; r++) {
            const int64_t row = j0 + r < p->wk ? krow[j0 + r] : -1; /* negative: a zero key (its bias: -inf) */
            kx[r] = row < 0 ? NULL : key_row(p, row);
            vx[r] = row < 0 ? NULL : value_row(p, row);
        }
        for (int64_t e0 = 0; e0 < p->Dp; e0 += 16) transpose_tile16(kx, e0, p->D - e0, s->kt + e0 * p->Kp + j0, p->Kp);
        if (!forward)
            for (int64_t e0 = 0; e0 < p->Dvp; e0 += 16)
                transpose_tile16(vx, e0, p->Dv - e0, s->vt + e0 * p->Kp + j0, p->Kp);
    }
    for (int64_t j = 0; j < p->wk; j++) {
        const int64_t row = krow[j];
        float *dst = forward ? s->vr + j * p->Dvp : s->kr + j * p->Dp;
        const int64_t n = forward ? p->Dv : p->D, np = forward ? p->Dvp : p->Dp;
        if (row < 0) zero_row(dst, np);
        else load_row(dst, forward ? value_row(p, row) : key_row(p, row), n, np);
    }
    if (!forward) {
        memset(s->dkb, 0, (size_t)(p->Kp * p->Dp) * sizeof(float));
        memset(s->dvb, 0, (size_t)(p->Kp * p->Dvp) * sizeof(float));
    }
}

/* rows of a block of 4 queries in the item's scratch: q (Dp), dq (Dp), dO (Dvp), s and dp (Kp) */
static void block_rows(const items_job *p, const items_scratch *s, float **qr, float **dqr, float **gr, float **sr,
                       float **dpr) {
    for (int r = 0; r < BLOCK; r++) {
        qr[r] = s->rows + r * p->Dp;
        dqr[r] = s->rows + (BLOCK + r) * p->Dp;
        gr[r] = s->rows + 2 * BLOCK * p->Dp + r * p->Dvp;
        sr[r] = s->rows + BLOCK * (2 * p->Dp + p->Dvp) + r * p->Kp;
        dpr[r] = s->rows + BLOCK * (2 * p->Dp + p->Dvp + p->Kp) + r * p->Kp;
    }
}

static inline float exp1(float x) { return x >= -87.0f ? exp_lanes(splat(x))[0] : 0.0f; }

static inline float lane_max(vf a) {
    float m = a[0];
    for (int64_t l = 1; l < VL; l++) m = a[l] > m ? a[l] : m;
    return m;
}

/* forward: per group, every item's slots (unnormalised outputs, row maxima and sums), then each query's
 * slots merged into its row of out, M and Z */
static int forward_groups(void *arg, int64_t g0, int64_t g1) {
    const items_job *p = arg;
    const int64_t Dp = p->Dp, Dvp = p->Dvp, Kp = p->Kp, slots = p->items * p->wq;
    items_scratch s;
    if (scratch_init(&s, p)) return -1;
    float *so = aligned_floats(slots * Dvp), *sm = aligned_floats(slots), *sl = aligned_floats(slots);
    if (!so || !sm || !sl) {
        free(so);
        free(sm);
        free(sl);
        scratch_free(&s);
        return -1;
    }
    float *qr[BLOCK], *dqr[BLOCK], *gr[BLOCK], *sr[BLOCK], *dpr[BLOCK], *orow[BLOCK];
    block_rows(p, &s, qr, dqr, gr, sr, dpr);
    vi lane;
    for (int64_t l = 0; l < VL; l++) lane[l] = (int32_t)l;
    for (int64_t gi = g0; gi < g1; gi++) {
        for (int64_t it = gi * p->items; it < (gi + 1) * p->items; it++) {
            const int64_t *qrow = p->qrows + it * p->wq, *krow = p->krows + it * p->wk;
            const int64_t slot0 = (it - gi * p->items) * p->wq;
            load_keys(p, &s, krow, 1);
            for (int64_t i = 0; i < p->wq; i += BLOCK) {
                for (int r = 0; r < BLOCK; r++) {
                    if (i + r < p->wq) {
                        if (qrow[i + r] < 0) zero_row(qr[r], Dp); /* an empty slot: merged into no row */
                        else load_row(qr[r], p->q + qrow[i + r] * p->D, p->D, Dp);
                        orow[r] = so + (slot0 + i + r) * Dvp;
                    } else {
                        zero_row(qr[r], Dp);
                        orow[r] = gr[r]; /* a block past the item's last query: computed, not kept */
                    }
                }
                times_rows(qr, s.kt, Dp, Kp, sr); /* S = Q Kᵀ */
                for (int r = 0; r < BLOCK; r++) {
                    const float *bias = p->bias && i + r < p->wq ? p->bias + p->boff[it] + (i + r) * p->brow : NULL;
                    vf sc = splat(p->scale), mx = splat(-__builtin_inff());
                    for (int64_t c = 0; c < Kp; c += VL) { /* scores; -inf past the item's keys */
                        vf x = *(vf *)(sr[r] + c) * sc;
                        if (bias) x += load_part(bias + c, p->wk - c);
                        x = pick(lane < (int32_t)(p->wk - c), x, splat(-__builtin_inff()));
                        *(vf *)(sr[r] + c) = x;
                        mx = pick(x > mx, x, mx);
                    }
                    float m = lane_max(mx);
                    vf shift = splat(m == -__builtin_inff() ? 0.0f : m), sum = {0};
                    for (int64_t c = 0; c < Kp; c += VL) {
                        vf x = *(vf *)(sr[r] + c) - shift;
                        vf pr = pick(x >= -87.0f, exp_lanes(x), splat(0.0f));
                        *(vf *)(sr[r] + c) = pr;
                        sum += pr;
                    }
                    if (i + r < p->wq) {
                        sm[slot0 + i + r] = m;
                        sl[slot0 + i + r] = lane_sum(sum);
                    }
                }
                times_rows(sr, s.vr, Kp, Dvp, orow); /* o = P V, unnormalised */
            }
        }
        /* merge: M = the largest row maximum, Z = Σ exp(m - M) l, out = Σ exp(m - M) o / Z */
        const int64_t *qrow = p->qrows + gi * slots;
        float *M = p->M, *Z = p->Z;
        for (int64_t t = gi * p->nq; t < (gi + 1) * p->nq; t++) {
            M[t] = -__builtin_inff();
            Z[t] = 0.0f;
        }
        memset(p->out + gi * p->nq * p->Dv, 0, (size_t)(p->nq * p->Dv) * sizeof(float));
        for (int64_t j = 0; j < slots; j++)
            if (qrow[j] >= 0) M[qrow[j]] = sm[j] > M[qrow[j]] ? sm[j] : M[qrow[j]];
        for (int64_t j = 0; j < slots; j++) {
            int64_t t = qrow[j];
            if (t < 0 || sm[j] == -__builtin_inff()) continue; /* an empty slot, or one with no key */
            float w = exp1(sm[j] - M[t]);
            Z[t] += w * sl[j];
            float *dst = p->out + t * p->Dv;
            const float *src = so + j * Dvp;
            for (int64_t e = 0; e < p->Dv; e++) dst[e] += w * src[e];
        }
        for (int64_t t = gi * p->nq; t < (gi + 1) * p->nq; t++)
            if (Z[t] > 0.0f) {
                float inv = 1.0f / Z[t], *dst = p->out + t * p->Dv;
                for (int64_t e = 0; e < p->Dv; e++) dst[e] *= inv;
            }
    }
    free(so);
    free(sm);
    free(sl);
    scratch_free(&s);
    return 0;
}

/* P and scale·dS for a block of query rows in place of S and dP; bias rows (wk) or NULL. The pad columns
 * past wk get some probability, but meet zero rows of K, Kᵀ and Vᵀ and are never stored: no effect. */
static void probabilities(const items_job *p, float *const *s, float *const *dp, const float *const *bias,
                          const float *lse, const float *Drow) {
    for (int r = 0; r < BLOCK; r++) {
        vf sc = splat(p->scale), L = splat(lse[r]), Dr = splat(Drow[r]);
        for (int64_t c = 0; c < p->Kp; c += VL) {
            vf x = *(vf *)(s[r] + c) * sc - L;
            if (bias[r]) x += load_part(bias[r] + c, p->wk - c);
            vf pr = pick(x >= -87.0f, exp_lanes(x), splat(0.0f)); /* -inf (masked, or lse = +inf): 0 */
            pr = pick(x != x, x, pr);                            /* NaN stays NaN */
            *(vf *)(s[r] + c) = pr;
            *(vf *)(dp[r] + c) = pr * (*(vf *)(dp[r] + c) - Dr) * sc;
        }
    }
}

/* dst = src when the row has not been written yet, dst += src after: n floats */
static inline void put_row(float *restrict dst, const float *restrict src, int64_t n, int written) {
    if (written)
        for (int64_t e = 0; e < n; e++) dst[e] += src[e];
    else
        memcpy(dst, src, (size_t)n * sizeof(float));
}

/* zeros in the rows of x (n rows of w floats) that were never written */
static void zero_unwritten(float *x, int64_t n, int64_t w, const unsigned char *written) {
    for (int64_t r = 0; r < n; r++)
        if (!written[r]) memset(x + r * w, 0, (size_t)w * sizeof(float));
}

static int backward_groups(void *arg, int64_t g0, int64_t g1) {
    const items_job *p = arg;
    items_scratch s;
    if (scratch_init(&s, p)) return -1;
    /* which of the group's query rows and key rows (k's, then k2's) have been written: a gradient row is
     * stored on its first write and added to after, so the gradients are never zeroed in advance (at N = 4096
     * that pass wrote, and the adds read back, 40 MB per call) */
    unsigned char *qdone = calloc((size_t)(p->nq + p->nk + p->nk2) + 1, 1), *kdone = qdone + p->nq;
    if (!qdone) {
        scratch_free(&s);
        return -1;
    }
    const int64_t Dp = p->Dp, Dvp = p->Dvp, Kp = p->Kp;
    float *qr[BLOCK], *dqr[BLOCK], *gr[BLOCK], *sr[BLOCK], *dpr[BLOCK];
    block_rows(p, &s, qr, dqr, gr, sr, dpr);
    for (int64_t gi = g0; gi < g1; gi++) {
        memset(qdone, 0, (size_t)(p->nq + p->nk + p->nk2));
        const int64_t q0 = gi * p->nq, k0 = gi * p->nk, k20 = p->split + gi * p->nk2;
        for (int64_t it = gi * p->items; it < (gi + 1) * p->items; it++) {
            const int64_t *qrow = p->qrows + it * p->wq, *krow = p->krows + it * p->wk;
            load_keys(p, &s, krow, 0);
            for (int64_t i = 0; i < p->wq; i += BLOCK) {
                float lse[BLOCK], Drow[BLOCK];
                const float *bias[BLOCK];
                for (int r = 0; r < BLOCK; r++) {
                    if (i + r < p->wq && qrow[i + r] >= 0) {
                        int64_t row = qrow[i + r];
                        load_row(qr[r], p->q + row * p->D, p->D, Dp);
                        load_row(gr[r], p->g + row * p->Dv, p->Dv, Dvp);
                        float d = 0;
                        for (int64_t e = 0; e < p->Dv; e++) d += p->g[row * p->Dv + e] * p->o[row * p->Dv + e];
                        Drow[r] = d;
                        lse[r] = p->lse[row];
                        bias[r] = p->bias ? p->bias + p->boff[it] + (i + r) * p->brow : NULL;
                    } else { /* past the item's last query, or an empty slot: zero rows, no probability */
                        zero_row(qr[r], Dp);
                        zero_row(gr[r], Dvp);
                        Drow[r] = 0.0f;
                        lse[r] = __builtin_inff();
                        bias[r] = NULL;
                    }
                }
                times_rows(qr, s.kt, Dp, Kp, sr);  /* S = Q Kᵀ */
                times_rows(gr, s.vt, Dvp, Kp, dpr); /* dP = dO Vᵀ */
                probabilities(p, sr, dpr, bias, lse, Drow);
                times_rows(dpr, s.kr, Kp, Dp, dqr); /* dQ = dS K */
                for (int r = 0; r < BLOCK && i + r < p->wq; r++) {
                    const int64_t row = qrow[i + r];
                    if (row < 0) continue;
                    put_row(p->dq + row * p->D, dqr[r], p->D, qdone[row - q0]);
                    qdone[row - q0] = 1;
                }
                rank_rows(s.dkb, dpr, qr, Kp, Dp);  /* dK += dSᵀ Q */
                rank_rows(s.dvb, sr, gr, Kp, Dvp);  /* dV += Pᵀ dO */
            }
            for (int64_t j = 0; j < p->wk; j++) {
                const int64_t row = krow[j];
                if (row < 0) continue;
                unsigned char *done = kdone + (row < p->split ? row - k0 : p->nk + row - k20);
                put_row(key_grad_row(p, row), s.dkb + j * Dp, p->D, *done); /* a key's and its value's rows */
                put_row(value_grad_row(p, row), s.dvb + j * Dvp, p->Dv, *done);
                *done = 1;
            }
        }
        zero_unwritten(p->dq + q0 * p->D, p->nq, p->D, qdone);
        zero_unwritten(p->dk + k0 * p->D, p->nk, p->D, kdone);
        zero_unwritten(p->dv + k0 * p->Dv, p->nk, p->Dv, kdone);
        if (p->dk2) {
            zero_unwritten(p->dk2 + gi * p->nk2 * p->D, p->nk2, p->D, kdone + p->nk);
            zero_unwritten(p->dv2 + gi * p->nk2 * p->Dv, p->nk2, p->Dv, kdone + p->nk);
        }
    }
    free(qdone);
    scratch_free(&s);
    return 0;
}

/* q (groups·nq, D), g and o (groups·nq, Dv), lse (groups·nq) (+inf: a row with no key); k (groups·nk, D),
 * v (groups·nk, Dv), and optionally k2 (groups·nk2, D) and v2 (groups·nk2, Dv) (else NULL, nk2 0): key row r
 * is row r of k below groups·nk, else row r - groups·nk of k2; qrows (groups, items, wq) and krows (groups,
 * items, wk): each item's rows, those of group gi in [gi·nq, (gi+1)·nq) and in [gi·nk, (gi+1)·nk) or
 * groups·nk + [gi·nk2, (gi+1)·nk2), or -1 for an empty slot (no query; no key: the
 * bias must be -inf there); bias NULL, or item it's row i at bias + boff[it] + i·brow (wk entries; brow 0:
 * one row for all). Writes dq, dk, dv (the shapes of q, k, v), and dk2, dv2 (those of k2, v2) with a second
 * source: the groups run in parallel, each writing only its own rows (a row that no item reaches gets zeros). Returns 0, or -1 when a thread's scratch could not be allocated. */
int sa_items_bwd_f32(const float *q, const float *k, const float *v, const float *k2, const float *v2,
                     const float *g, const float *o, const float *lse, const int64_t *qrows, const int64_t *krows,
                     const float *bias, const int64_t *boff, int64_t brow, int64_t groups, int64_t items, int64_t wq,
                     int64_t wk, int64_t D, int64_t Dv, int64_t nq, int64_t nk, int64_t nk2, double scale, float *dq,
                     float *dk, float *dv, float *dk2, float *dv2, int threads) {
    items_job p = {.q = q, .k = k, .v = v, .k2 = k2, .v2 = v2, .g = g, .o = o, .lse = lse, .bias = bias,
                   .qrows = qrows, .krows = krows, .boff = boff, .items = items, .wq = wq, .wk = wk, .D = D,
                   .Dv = Dv, .Dp = padded(D), .Dvp = padded(Dv), .Kp = padded(wk), .nq = nq, .nk = nk,
                   .nk2 = k2 ? nk2 : 0, .split = groups * nk, .brow = brow, .scale = (float)scale, .dq = dq,
                   .dk = dk, .dv = dv, .dk2 = k2 ? dk2 : NULL, .dv2 = k2 ? dv2 : NULL};
    return sa_parallel_rows(groups, threads, backward_groups, &p);
}

/* q (groups·nq, D), k (groups·nk, D), v (groups·nk, Dv), k2 and v2; qrows, krows and the bias as for
 * sa_items_bwd_f32.
 * Writes out (groups·nq, Dv), M and Z (groups·nq): a query in no item, or whose items hold no allowed key,
 * gets out 0, M -inf and Z 0. Returns 0, or -1 when a thread's scratch could not be allocated. */
int sa_items_fwd_f32(const float *q, const float *k, const float *v, const float *k2, const float *v2,
                     const int64_t *qrows, const int64_t *krows, const float *bias, const int64_t *boff, int64_t brow,
                     int64_t groups, int64_t items, int64_t wq, int64_t wk, int64_t D, int64_t Dv, int64_t nq,
                     int64_t nk, int64_t nk2, double scale, float *out, float *M, float *Z, int threads) {
    items_job p = {.q = q, .k = k, .v = v, .k2 = k2, .v2 = v2, .bias = bias, .qrows = qrows, .krows = krows,
                   .boff = boff, .items = items, .wq = wq, .wk = wk, .D = D, .Dv = Dv, .Dp = padded(D),
                   .Dvp = padded(Dv), .Kp = padded(wk), .nq = nq, .nk = nk, .nk2 = k2 ? nk2 : 0,
                   .split = groups * nk, .brow = brow, .scale = (float)scale, .out = out, .M = M, .Z = Z};
    return sa_parallel_rows(groups, threads, forward_groups, &p);
}
