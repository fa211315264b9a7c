/* Linear attention's cores (sparse_attention/approx/linear.py) for the elementwise feature maps (elu+1,
 * relu, or features computed beforehand) and Performer's FAVOR+ random features, forward and backward,
 * non-causal and causal.
 *
 *   out_i = φ(q_i) S / (φ(q_i) · z + eps),   S = Σ_j φ(k_j) v_jᵀ (F × Dv),   z = Σ_j φ(k_j)
 *
 * (causal: S and z over j <= i). PyTorch needs about a dozen passes over the (rows, D) tensors for this
 * (features, their masking, the products, the normaliser, each again in the backward); here every row
 * is read once per pass and its features never leave the cache.
 *
 * Rows go in blocks of BLOCK: the products are block-of-rows times a state matrix (times_rows) and rank
 * updates of a state by a block (rank_rows), with the state streamed once per block instead of once per
 * row. Every row is first copied into a 64-byte aligned slot padded with zeros to whole 16-lane vectors
 * (D to Dp, F to Fp, Dv to Dvp), so the products run on whole vectors; the padding lanes stay 0.
 *
 * The causal form is exact: a block's rows see the state of every earlier block plus the earlier rows
 * of their own block (a BLOCK × BLOCK triangle of dot products); the backward runs the same recurrence
 * forward (dQ, from the key states) and backward (dK and dV, from the states of later queries). With
 * grouped queries (group query heads per key head) the key states are shared and a block's query rows
 * are those of every query head of the group.
 *
 * Every state is a sum over rows in two levels (see `running`): float32 sums of N/BLOCK updates in a
 * row lost accuracy on FAVOR+'s features. Non-causal states are summed in a fixed number of row chunks
 * per head (at most MAX_CHUNKS, from the length alone), chunk by chunk in order: the result does not
 * depend on the number of threads. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"
#include "vec.h"

/* the vector width this build uses, in bytes: the Python side prefers these kernels to PyTorch's from 32 on
 * (with 16-byte vectors they were slower here: 14 against 9 ms for a forward at N = 4096) */
int sa_linear_vector_bytes(void) { return VECTOR_BYTES; }

enum { MAP_IDENTITY = 0, MAP_ELU = 1, MAP_RELU = 2, MAP_FAVOR = 3 };
enum { MAX_CHUNKS = 8, CHUNK_ROWS = 256, FOLD = 64 };

/* y = scale * φ(x) over F entries (0 beyond, up to Fp) and, when d is given, d = φ'(x); y and d aligned
 * slots. NaN stays NaN (elu(NaN) + 1 and relu(NaN) are NaN in PyTorch too). elu: φ = x + 1 (x > 0), e^x
 * (x <= 0), so φ' = min(φ, 1); relu: φ' = 1 where x > 0, else 0 (PyTorch's choice at 0). */
static void features(const float *restrict x, int64_t F, int64_t Fp, int map, float scale, float *restrict y,
                     float *restrict d) {
    for (int64_t i = 0; i < Fp; i += VL) {
        vf a = load_part(x + i, F - i), phi = a, dphi = splat(1.0f);
        if (map == MAP_ELU) {
            vi le = a <= 0.0f;
            phi = pick(le, exp_lanes((vf)((vi)a & le)), a + 1.0f); /* e^min(a, 0) where a <= 0 */
            dphi = pick(phi < 1.0f, phi, splat(1.0f));
        } else if (map == MAP_RELU) {
            phi = (vf)((vi)a & ~(a <= 0.0f));
            dphi = (vf)((vi)splat(1.0f) & (a > 0.0f));
        }
        *(vf *)(y + i) = scale == 1.0f ? phi : phi * scale;
        if (d) *(vf *)(d + i) = dphi;
    }
    for (int64_t f = F; f < Fp; f++) y[f] = 0.0f; /* φ(0) = 1 for elu: the padding back to 0 */
    if (d)
        for (int64_t f = F; f < Fp; f++) d[f] = 0.0f;
}

/* A running sum of states (n floats: a matrix and its vector) in two levels: `inner` takes the rank updates
 * of up to FOLD blocks, then is added to `outer` and cleared; a reader uses outer + inner. One sequential
 * sum over N/BLOCK updates lost accuracy on FAVOR+'s wide-ranging features (at N = 65536, 30x the error of
 * PyTorch's blocked products); two levels sum about N/(BLOCK·FOLD) + FOLD terms each. */
typedef struct {
    float *outer, *inner;
    int64_t n;
    int blocks;
} running;

static void running_fold(running *r) {
    axpy(r->outer, 1.0f, r->inner, r->n);
    memset(r->inner, 0, (size_t)r->n * sizeof(float));
    r->blocks = 0;
}

/* after each block's update of inner */
static void running_step(running *r) {
    if (++r->blocks == FOLD) running_fold(r);
}

/* both levels in one buffer (freed through outer), zero: 0, or -1 when out of memory */
static int running_open(running *r, int64_t n) {
    r->outer = aligned_floats(2 * n);
    r->inner = r->outer ? r->outer + n : NULL;
    r->n = n, r->blocks = 0;
    return r->outer ? 0 : -1;
}

static void running_clear(running *r) {
    memset(r->outer, 0, (size_t)(2 * r->n) * sizeof(float));
    r->blocks = 0;
}

/* ---------------------------------------------------------------------------------------- the job */

typedef struct {
    const float *q, *k, *v, *keep; /* q (heads·group, R, D), k (heads, S, D), v (heads, S, Dv), keep (heads, S) */
    float *Wt, *W, *shift;         /* FAVOR+: W'ᵀ (Dp, Fp), W' (Fp, Dp) and c (Fp), zero-padded copies */
    const float *g, *out, *den;    /* the backward's inputs: ∂L/∂out, out (·, R, Dv), den (·, R) */
    const float *kvz;              /* non-causal backward: the forward's [S | z] (heads, F, Dv + 1) */
    int64_t heads, group, R, S, D, F, Dv, Dp, Fp, Dvp, chunks; /* D: input width, F: features (D but FAVOR+) */
    int map;
    float eps;
    float *state;                  /* non-causal: (heads, chunks, state_size) partial states */
    float *o_out, *o_den, *o_kvz;  /* forward results */
    float *dq, *dk, *dv;           /* backward results */
} lin_job;

/* a non-causal partial state: M (Fp, Dvp) then z (Fp) */
static inline int64_t state_size(const lin_job *p) { return p->Fp * p->Dvp + p->Fp; }

static inline int64_t chunk_rows(const lin_job *p, int64_t rows) { return (rows + p->chunks - 1) / p->chunks; }

/* per-thread scratch: `slots` aligned rows of max(Dp, Fp, Dvp) floats for the caller, then 2·BLOCK for the
 * FAVOR+ features and their gradients (aux) */
typedef struct {
    float *base;
    int64_t width, slots;
} scratch;

static int scratch_open(scratch *s, const lin_job *p, int64_t slots) {
    s->width = p->Fp > p->Dvp ? p->Fp : p->Dvp;
    s->width = s->width > p->Dp ? s->width : p->Dp;
    s->slots = slots;
    s->base = aligned_floats((slots + 2 * BLOCK) * s->width);
    return s->base ? 0 : -1;
}

static inline float *slot(const scratch *s, int64_t i) { return s->base + i * s->width; }

static inline float *aux(const scratch *s, int64_t i) { return slot(s, s->slots + i); }

/* den = Σ + eps, replaced by 1 where <= 0 (every feature product 0: num is 0 too, the output 0) */
static inline float guard(float sum, float eps) {
    float d = sum + eps;
    return d <= 0.0f ? 1.0f : d;
}

/* ------------------------------------------------------------------------ non-causal, forward */

/* φ of a block's rows x_r = src + (row0 + r)·D, r < count (zero rows from count on), times keep[r] when keep
 * is given (keys), with φ'(x) in dphi when given (elementwise maps). FAVOR+ (W' = W / D^(1/4), see
 * approx.FavorPlus): queries exp(W'x + c - max_f(W'x + c)), keys exp(W'x - c - |x|²/(2√D)) (at most e^40) */
static void block_features(const lin_job *p, const scratch *s, const float *src, int64_t row0, int count,
                           const float *keep, float **phi, float **dphi) {
    if (p->map != MAP_FAVOR) {
        for (int r = 0; r < BLOCK; r++)
            if (r < count)
                features(src + (row0 + r) * p->D, p->F, p->Fp, p->map, keep ? keep[r] : 1.0f, phi[r],
                         dphi ? dphi[r] : NULL);
            else
                zero_row(phi[r], p->Fp);
        return;
    }
    float *x[BLOCK];
    for (int r = 0; r < BLOCK; r++) {
        x[r] = aux(s, r);
        if (r < count) load_row(x[r], src + (row0 + r) * p->D, p->D, p->Dp);
        else zero_row(x[r], p->Dp);
    }
    times_rows(x, p->Wt, p->Dp, p->Fp, phi); /* W'x */
    for (int r = 0; r < BLOCK; r++) {
        float *y = phi[r];
        if (r >= count) {
            zero_row(y, p->Fp);
            continue;
        }
        if (keep) { /* keys */
            vf half_sq = splat(dot(x[r], x[r], p->Dp) * 0.5f / sqrtf((float)p->D));
            for (int64_t i = 0; i < p->Fp; i += VL)
                *(vf *)(y + i) = exp_lanes(*(vf *)(y + i) - *(const vf *)(p->shift + i) - half_sq) * keep[r];
        } else { /* queries: the row maximum is a constant of the row (it cancels in the ratio) */
            float top = -INFINITY;
            for (int64_t f = 0; f < p->F; f++) {
                y[f] += p->shift[f];
                top = y[f] > top ? y[f] : top;
            }
            for (int64_t i = 0; i < p->Fp; i += VL) *(vf *)(y + i) = exp_lanes(*(vf *)(y + i) - top);
        }
        for (int64_t f = p->F; f < p->Fp; f++) y[f] = 0.0f;
    }
}

/* ∂L/∂x of a block's rows (as block_features read them) into dst + (row0 + r)·D, r < count, from g[r] = ∂L/∂φ
 * (overwritten) and φ, φ' from block_features: elementwise maps keep · g ⊙ φ'; FAVOR+ (g ⊙ φ) W', minus
 * (Σ_f g ⊙ φ) x/√D for keys (the query's row maximum is held constant, as in approx.FavorPlus) */
static void block_feature_grads(const lin_job *p, const scratch *s, const float *src, int64_t row0, int count,
                                const float *keep, float **phi, float **dphi, float **g, float *dst) {
    if (p->map != MAP_FAVOR) {
        for (int r = 0; r < count; r++) {
            float *o = dst + (row0 + r) * p->D, w = keep ? keep[r] : 1.0f;
            for (int64_t f = 0; f < p->F; f++) o[f] = w * g[r][f] * dphi[r][f];
        }
        return;
    }
    float *dx[BLOCK];
    for (int r = 0; r < BLOCK; r++) {
        dx[r] = aux(s, BLOCK + r);
        for (int64_t i = 0; i < p->Fp; i += VL) *(vf *)(g[r] + i) *= *(const vf *)(phi[r] + i);
    }
    times_rows(g, p->W, p->Fp, p->Dp, dx);
    for (int r = 0; r < count; r++) {
        const float *x = src + (row0 + r) * p->D;
        float *o = dst + (row0 + r) * p->D;
        if (keep) {
            vf acc = {0};
            for (int64_t i = 0; i < p->Fp; i += VL) acc += *(const vf *)(g[r] + i);
            float c = lane_sum(acc) / sqrtf((float)p->D);
            for (int64_t d = 0; d < p->D; d++) o[d] = dx[r][d] - c * x[d];
        } else {
            for (int64_t d = 0; d < p->D; d++) o[d] = dx[r][d];
        }
    }
}

/* a block's keys (rows i0.. of key head h): keep·φ(k) (and φ'(k) when dphi is given) and the v rows;
 * rows from `count` on are zero (their products are computed and dropped) */
static void key_block(const lin_job *p, const scratch *s, int64_t h, int64_t i0, int count, float **fk, float **dphi,
                      float **vb, float *keep) {
    int64_t row0 = h * p->S + i0;
    for (int r = 0; r < BLOCK; r++) {
        keep[r] = r >= count ? 0.0f : p->keep ? p->keep[row0 + r] : 1.0f;
        if (r < count) load_row(vb[r], p->v + (row0 + r) * p->Dv, p->Dv, p->Dvp);
        else zero_row(vb[r], p->Dvp);
    }
    block_features(p, s, p->k, row0, count, keep, fk, dphi);
}

/* the per-row gradients of the normalisation: gnum (a Dvp slot) = g / den; returns gden = -gnum · out */
static float grad_rows(const lin_job *p, int64_t row, float *restrict gnum) {
    const float *g = p->g + row * p->Dv, *o = p->out + row * p->Dv;
    float den = p->den[row];
    vf acc = {0};
    for (int64_t i = 0; i < p->Dvp; i += VL) {
        vf gn = load_part(g + i, p->Dv - i) / den;
        *(vf *)(gnum + i) = gn;
        acc += gn * load_part(o + i, p->Dv - i);
    }
    return -lane_sum(acc);
}

/* a block's query rows (row0.. of the (·, R) rows): φ(q) (and φ'(q) when dphi is given) and, when gnum is
 * given, the normalisation's gradients gnum and gden (see grad_rows); rows from `count` on are zero */
static void query_block_rows(const lin_job *p, const scratch *s, int64_t row0, int count, float **fq, float **dphi,
                             float **gnum, float *gden) {
    block_features(p, s, p->q, row0, count, NULL, fq, dphi);
    for (int r = 0; gnum && r < BLOCK; r++)
        if (r < count) gden[r] = grad_rows(p, row0 + r, gnum[r]);
        else zero_row(gnum[r], p->Dvp), gden[r] = 0.0f;
}

/* (head, chunk) tasks over `rows` rows per head: fn(p, scratch, head, row, count, partial) adds a block's
 * terms to a partial sum [matrix | vector] of F·Dv + F floats, summed in two levels (see `running`) into
 * outer(p, task) */
typedef void (*chunk_fn)(const lin_job *p, const scratch *s, int64_t h, int64_t row, int count, float *partial);

static int chunk_tasks(const lin_job *p, int64_t t0, int64_t t1, int64_t rows, int64_t slots,
                       float *(*outer)(const lin_job *, int64_t), chunk_fn fn) {
    scratch s;
    running sum = {.inner = aligned_floats(state_size(p)), .n = state_size(p)};
    if (!sum.inner || scratch_open(&s, p, slots)) return free(sum.inner), -1;
    int64_t per = chunk_rows(p, rows);
    for (int64_t t = t0; t < t1; t++) {
        int64_t h = t / p->chunks, i0 = (t % p->chunks) * per, i1 = i0 + per < rows ? i0 + per : rows;
        sum.outer = outer(p, t);
        for (int64_t i = i0; i < i1; i += BLOCK) {
            fn(p, &s, h, i, i1 - i < BLOCK ? (int)(i1 - i) : BLOCK, sum.inner);
            running_step(&sum);
        }
        running_fold(&sum);
    }
    free(s.base);
    free(sum.inner);
    return 0;
}

/* a block of keys into a partial state: M += φ(k_j) v_jᵀ, z += φ(k_j) */
static void key_state_block(const lin_job *p, const scratch *s, int64_t h, int64_t j, int count, float *M) {
    float *fk[BLOCK], *vb[BLOCK], keep[BLOCK], *z = M + p->Fp * p->Dvp;
    for (int r = 0; r < BLOCK; r++) fk[r] = slot(s, r), vb[r] = slot(s, BLOCK + r);
    key_block(p, s, h, j, count, fk, NULL, vb, keep);
    rank_rows(M, fk, vb, p->Fp, p->Dvp);
    for (int r = 0; r < BLOCK; r++) axpy(z, 1.0f, fk[r], p->Fp);
}

static float *key_partial(const lin_job *p, int64_t t) { return p->state + t * state_size(p); }

static int key_states(void *arg, int64_t t0, int64_t t1) {
    const lin_job *p = arg;
    return chunk_tasks(p, t0, t1, p->S, 2 * BLOCK, key_partial, key_state_block);
}

/* each head's chunks summed in order into chunk 0 */
static int sum_chunks(void *arg, int64_t h0, int64_t h1) {
    const lin_job *p = arg;
    int64_t n = state_size(p);
    for (int64_t h = h0; h < h1; h++) {
        float *first = p->state + h * p->chunks * n;
        for (int64_t c = 1; c < p->chunks; c++) axpy(first, 1.0f, first + c * n, n);
    }
    return 0;
}

/* rows [r0, r1) of (heads·R) as blocks of at most BLOCK rows of one head: fn(p, scratch, head, row, count) */
typedef void (*block_fn)(const lin_job *p, const scratch *s, int64_t head, int64_t row, int count);

static int row_blocks(const lin_job *p, int64_t r0, int64_t r1, int64_t slots, block_fn fn) {
    scratch s;
    if (scratch_open(&s, p, slots)) return -1;
    for (int64_t r = r0; r < r1;) {
        int64_t h = r / p->R, end = (h + 1) * p->R < r1 ? (h + 1) * p->R : r1;
        int count = end - r < BLOCK ? (int)(end - r) : BLOCK;
        fn(p, &s, h, r - h * p->R, count);
        r += count;
    }
    free(s.base);
    return 0;
}

static void query_block(const lin_job *p, const scratch *s, int64_t h, int64_t i, int count) {
    const float *M = p->state + h * p->chunks * state_size(p), *z = M + p->Fp * p->Dvp;
    float *fq[BLOCK], *num[BLOCK];
    for (int r = 0; r < BLOCK; r++) fq[r] = slot(s, r), num[r] = slot(s, BLOCK + r);
    query_block_rows(p, s, h * p->R + i, count, fq, NULL, NULL, NULL);
    times_rows(fq, M, p->Fp, p->Dvp, num);
    for (int r = 0; r < count; r++) {
        int64_t row = h * p->R + i + r;
        float den = guard(dot(fq[r], z, p->Fp), p->eps);
        p->o_den[row] = den;
        for (int64_t d = 0; d < p->Dv; d++) p->o_out[row * p->Dv + d] = num[r][d] / den;
    }
}

static int queries(void *arg, int64_t r0, int64_t r1) { return row_blocks(arg, r0, r1, 2 * BLOCK, query_block); }

/* the summed states into PyTorch's layout [S | z] (heads, F, Dv + 1) */
static int export_states(void *arg, int64_t h0, int64_t h1) {
    const lin_job *p = arg;
    for (int64_t h = h0; h < h1; h++) {
        const float *M = p->state + h * p->chunks * state_size(p), *z = M + p->Fp * p->Dvp;
        for (int64_t f = 0; f < p->F; f++) {
            float *o = p->o_kvz + (h * p->F + f) * (p->Dv + 1);
            memcpy(o, M + f * p->Dvp, (size_t)p->Dv * sizeof(float));
            o[p->Dv] = z[f];
        }
    }
    return 0;
}

static int64_t chunk_count(int64_t rows) {
    int64_t c = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    return c < 1 ? 1 : c > MAX_CHUNKS ? MAX_CHUNKS : c;
}

/* the job of one call; FAVOR+ (proj W' (F, D) and shift c (F) given) gets padded copies of W'ᵀ, W' and c:
 * 0, or -1 when out of memory (release() frees them) */
static int job(lin_job *p, const float *q, const float *k, const float *v, const float *keep, const float *proj,
               const float *shift, int64_t heads, int64_t group, int64_t R, int64_t S, int64_t D, int64_t F, int64_t Dv,
               int64_t map, double eps) {
    lin_job j = {.q = q, .k = k, .v = v, .keep = keep, .heads = heads, .group = group, .R = R, .S = S, .D = D, .F = F,
                 .Dv = Dv, .Dp = padded(D), .Fp = padded(F), .Dvp = padded(Dv), .map = (int)map, .eps = (float)eps};
    *p = j;
    if (map != MAP_FAVOR) return 0;
    p->Wt = aligned_floats(p->Dp * p->Fp);
    p->W = aligned_floats(p->Fp * p->Dp);
    p->shift = aligned_floats(p->Fp);
    if (!p->Wt || !p->W || !p->shift) return -1;
    transpose(proj, D, F, D, p->Wt, p->Fp);
    for (int64_t f = 0; f < F; f++) memcpy(p->W + f * p->Dp, proj + f * D, (size_t)D * sizeof(float));
    memcpy(p->shift, shift, (size_t)F * sizeof(float));
    return 0;
}

static int release(lin_job *p, int status) {
    free(p->Wt);
    free(p->W);
    free(p->shift);
    free(p->state);
    return status;
}

/* Non-causal forward. q (heads, R, D) (grouped query heads folded into R), k (heads, S, D), v (heads, S, Dv),
 * keep (heads, S) of 1 (real key) and 0 (padding), or NULL; all contiguous float32. map: MAP_*; F = D, but for
 * FAVOR+: proj W' = W / D^(1/4) (F, D) and shift c (F) (NULL otherwise). Writes out (heads, R, Dv), den
 * (heads, R) and the states kvz (heads, F, Dv + 1). 0, or -1 when out of memory. */
int sa_linear_fwd_f32(const float *q, const float *k, const float *v, const float *keep, const float *proj,
                      const float *shift, int64_t heads, int64_t R, int64_t S, int64_t D, int64_t F, int64_t Dv,
                      int64_t map, double eps, float *out, float *den, float *kvz, int threads) {
    lin_job p;
    int status = job(&p, q, k, v, keep, proj, shift, heads, 1, R, S, D, F, Dv, map, eps);
    p.chunks = chunk_count(S);
    p.o_out = out, p.o_den = den, p.o_kvz = kvz;
    p.state = aligned_floats(heads * p.chunks * state_size(&p));
    if (!status && !p.state) status = -1;
    if (!status) status = sa_parallel_rows(heads * p.chunks, threads, key_states, &p);
    if (!status) status = sa_parallel_rows(heads, threads, sum_chunks, &p);
    if (!status) status = sa_parallel_rows(heads * R, threads, queries, &p);
    if (!status) status = sa_parallel_rows(heads, threads, export_states, &p);
    return release(&p, status);
}

/* ----------------------------------------------------------------------- non-causal, backward */
/*
 * With gnum = g / den and gden = -gnum · out per query row:
 *   ∂L/∂φ(q_i) = S gnum_i + z gden_i,   ∂L/∂S = Σ_i φ(q_i) gnum_iᵀ,   ∂L/∂z = Σ_i φ(q_i) gden_i,
 *   ∂L/∂φ(k_j) = (∂L/∂S) v_j + ∂L/∂z,  ∂L/∂v_j = (∂L/∂S)ᵀ φ(k_j)  (φ(k_j) with its keep factor).
 * The backward's state per head: A = Sᵀ (Dvp, Fp) and z, read; then ∂L/∂S and its transpose, ∂L/∂z.
 */

typedef struct {
    float *St, *z;    /* Sᵀ (Dvp, Fp) and z (Fp) */
    float *G, *gz, *Gt; /* ∂L/∂S (Fp, Dvp) and ∂L/∂z (Fp), adjacent; the transpose of ∂L/∂S (Dvp, Fp) */
} grad_state;

static inline int64_t grad_state_size(const lin_job *p) { return 3 * p->Fp * p->Dvp + 2 * p->Fp; }

static grad_state grad_state_of(const lin_job *p, float *base) {
    int64_t FD = p->Fp * p->Dvp;
    grad_state st = {.St = base, .z = base + FD, .G = base + FD + p->Fp, .gz = base + 2 * FD + p->Fp,
                     .Gt = base + 2 * FD + 2 * p->Fp};
    return st;
}

/* a block of query rows: dq (∂L/∂φ(q) = S gnum + z gden, through the feature map's gradient), and the rows'
 * terms of ∂L/∂S and ∂L/∂z (adjacent in `partial`) */
static void query_grad_rows(const lin_job *p, const scratch *s, int64_t h, int64_t i, int count, float *partial) {
    grad_state st = grad_state_of(p, p->state + h * p->chunks * grad_state_size(p));
    int64_t row0 = h * p->R + i;
    float *fq[BLOCK], *dphi[BLOCK], *gnum[BLOCK], *dfq[BLOCK], gden[BLOCK] = {0}, *gz = partial + p->Fp * p->Dvp;
    for (int r = 0; r < BLOCK; r++)
        fq[r] = slot(s, r), dphi[r] = slot(s, BLOCK + r), gnum[r] = slot(s, 2 * BLOCK + r), dfq[r] = slot(s, 3 * BLOCK + r);
    query_block_rows(p, s, row0, count, fq, dphi, gnum, gden);
    times_rows(gnum, st.St, p->Dvp, p->Fp, dfq);
    for (int r = 0; r < count; r++) axpy(dfq[r], gden[r], st.z, p->Fp);
    block_feature_grads(p, s, p->q, row0, count, NULL, fq, dphi, dfq, p->dq);
    rank_rows(partial, fq, gnum, p->Fp, p->Dvp);
    for (int r = 0; r < count; r++) axpy(gz, gden[r], fq[r], p->Fp);
}

/* a chunk's partial ∂L/∂S: the head's own for its first chunk, else the start of the chunk's slot */
static float *grad_partial(const lin_job *p, int64_t t) {
    if (t % p->chunks) return p->state + t * grad_state_size(p);
    return grad_state_of(p, p->state + t * grad_state_size(p)).G;
}

/* (head, chunk) tasks over the query rows: dq, and the chunk's partial ∂L/∂S, ∂L/∂z */
static int query_grads(void *arg, int64_t t0, int64_t t1) {
    const lin_job *p = arg;
    return chunk_tasks(p, t0, t1, p->R, 4 * BLOCK, grad_partial, query_grad_rows);
}

/* per head, before the query pass: Sᵀ and z from PyTorch's [S | z] layout */
static int states_in(void *arg, int64_t h0, int64_t h1) {
    const lin_job *p = arg;
    for (int64_t h = h0; h < h1; h++) {
        grad_state st = grad_state_of(p, p->state + h * p->chunks * grad_state_size(p));
        const float *kvz = p->kvz + h * p->F * (p->Dv + 1);
        transpose(kvz, p->Dv + 1, p->F, p->Dv, st.St, p->Fp);
        transpose(kvz + p->Dv, p->Dv + 1, p->F, 1, st.z, p->Fp); /* the last column */
    }
    return 0;
}

/* per head, after it: the chunks' partial gradients summed in order into the first (the later chunks'
 * partials live at the start of their own slots), and transposed */
static int grads_summed(void *arg, int64_t h0, int64_t h1) {
    const lin_job *p = arg;
    for (int64_t h = h0; h < h1; h++) {
        grad_state st = grad_state_of(p, p->state + h * p->chunks * grad_state_size(p));
        for (int64_t c = 1; c < p->chunks; c++) {
            axpy(st.G, 1.0f, p->state + (h * p->chunks + c) * grad_state_size(p), p->Fp * p->Dvp + p->Fp);
        }
        transpose(st.G, p->Dvp, p->Fp, p->Dvp, st.Gt, p->Fp);
    }
    return 0;
}

/* dk = keep φ'(k) ⊙ (∂L/∂S v + ∂L/∂z), dv = (∂L/∂S)ᵀ (keep φ(k)) for a block of key rows */
static void key_grad_block(const lin_job *p, const scratch *s, int64_t h, int64_t j, int count) {
    grad_state st = grad_state_of(p, p->state + h * p->chunks * grad_state_size(p));
    float *fk[BLOCK], *dphi[BLOCK], *vb[BLOCK], *dfk[BLOCK], *dvb[BLOCK], keep[BLOCK];
    for (int r = 0; r < BLOCK; r++)
        fk[r] = slot(s, r), dphi[r] = slot(s, BLOCK + r), vb[r] = slot(s, 2 * BLOCK + r), dfk[r] = slot(s, 3 * BLOCK + r),
        dvb[r] = slot(s, 4 * BLOCK + r);
    key_block(p, s, h, j, count, fk, dphi, vb, keep);
    times_rows(vb, st.Gt, p->Dvp, p->Fp, dfk);
    times_rows(fk, st.G, p->Fp, p->Dvp, dvb);
    for (int r = 0; r < count; r++) {
        axpy(dfk[r], 1.0f, st.gz, p->Fp);
        store_row(p->dv + (h * p->S + j + r) * p->Dv, dvb[r], p->Dv);
    }
    block_feature_grads(p, s, p->k, h * p->S + j, count, keep, fk, dphi, dfk, p->dk);
}

static int key_grads(void *arg, int64_t r0, int64_t r1) {
    lin_job keys = *(const lin_job *)arg; /* row_blocks walks R rows per head: here the S key rows */
    keys.R = keys.S;
    return row_blocks(&keys, r0, r1, 5 * BLOCK, key_grad_block);
}

/* Non-causal backward: the forward's arguments, its kvz, out and den, and g = ∂L/∂out (heads, R, Dv); writes
 * dq (heads, R, D), dk (heads, S, D), dv (heads, S, Dv). 0, or -1 when out of memory. */
int sa_linear_bwd_f32(const float *q, const float *k, const float *v, const float *keep, const float *proj,
                      const float *shift, const float *kvz, const float *g, const float *out, const float *den,
                      int64_t heads, int64_t R, int64_t S, int64_t D, int64_t F, int64_t Dv, int64_t map, float *dq,
                      float *dk, float *dv, int threads) {
    lin_job p;
    int status = job(&p, q, k, v, keep, proj, shift, heads, 1, R, S, D, F, Dv, map, 0.0);
    p.kvz = kvz, p.g = g, p.out = out, p.den = den, p.dq = dq, p.dk = dk, p.dv = dv;
    p.chunks = chunk_count(R);
    p.state = aligned_floats(heads * p.chunks * grad_state_size(&p));
    if (!status && !p.state) status = -1;
    if (!status) status = sa_parallel_rows(heads, threads, states_in, &p);
    if (!status) status = sa_parallel_rows(heads * p.chunks, threads, query_grads, &p);
    if (!status) status = sa_parallel_rows(heads, threads, grads_summed, &p);
    if (!status) status = sa_parallel_rows(heads * S, threads, key_grads, &p);
    return release(&p, status);
}

/* --------------------------------------------------------------------------------------- causal */
/*
 * One task per key head, its blocks in order (forward, and dq) or in reverse (dk, dv), the state of the
 * rows before (after) the block carried along. Within a block of rows i0..i0+BLOCK-1, query row i sees
 * the state of the earlier blocks and the keys i0..i of its own block:
 *   forward:  num_i = φ(q_i) S + Σ_{i0 <= j <= i} (φ(q_i)·φ(k_j)) v_j,  den_i likewise with 1 for v_j;
 *   dq:       ∂L/∂φ(q_i) = S gnum_i + z gden_i + Σ_{i0 <= j <= i} (v_j·gnum_i + gden_i) φ(k_j);
 *   dk, dv:   with P = Σ_{later i} φ(q_i) gnum_iᵀ and p = Σ_{later i} φ(q_i) gden_i,
 *             ∂L/∂φ(k_j) = P v_j + p + Σ_{j <= i < i0+BLOCK} (gnum_i·v_j + gden_i) φ(q_i),
 *             ∂L/∂v_j = Pᵀ φ(k_j) + Σ_{j <= i < i0+BLOCK} (φ(q_i)·φ(k_j)) gnum_i.
 * Here R = S = L; query head h·group + g reads key head h.
 */

/* the first row of query head h·group + g's block */
static inline int64_t query_row(const lin_job *p, int64_t h, int64_t g, int64_t i0) {
    return (h * p->group + g) * p->R + i0;
}

static int causal_forward(void *arg, int64_t h0, int64_t h1) {
    const lin_job *p = arg;
    scratch s;
    int64_t FD = p->Fp * p->Dvp;
    running M; /* [S | z] of the rows before the block */
    if (running_open(&M, FD + p->Fp) || scratch_open(&s, p, 4 * BLOCK)) return free(M.outer), -1;
    float *fk[BLOCK], *vb[BLOCK], *fq[BLOCK], *num[BLOCK], keep[BLOCK];
    for (int r = 0; r < BLOCK; r++)
        fk[r] = slot(&s, r), vb[r] = slot(&s, BLOCK + r), fq[r] = slot(&s, 2 * BLOCK + r), num[r] = slot(&s, 3 * BLOCK + r);
    for (int64_t h = h0; h < h1; h++) {
        running_clear(&M);
        for (int64_t i0 = 0; i0 < p->R; i0 += BLOCK) {
            int count = p->R - i0 < BLOCK ? (int)(p->R - i0) : BLOCK;
            key_block(p, &s, h, i0, count, fk, NULL, vb, keep);
            for (int64_t g = 0; g < p->group; g++) {
                int64_t row0 = query_row(p, h, g, i0);
                query_block_rows(p, &s, row0, count, fq, NULL, NULL, NULL);
                times_rows2(fq, M.outer, M.inner, p->Fp, p->Dvp, num);
                for (int r = 0; r < count; r++) {
                    float den = dot(fq[r], M.outer + FD, p->Fp) + dot(fq[r], M.inner + FD, p->Fp);
                    for (int j = 0; j <= r; j++) {
                        float a = dot(fq[r], fk[j], p->Fp);
                        axpy(num[r], a, vb[j], p->Dvp);
                        den += a;
                    }
                    den = guard(den, p->eps);
                    p->o_den[row0 + r] = den;
                    for (int64_t d = 0; d < p->Dv; d++) p->o_out[(row0 + r) * p->Dv + d] = num[r][d] / den;
                }
            }
            rank_rows(M.inner, fk, vb, p->Fp, p->Dvp);
            for (int r = 0; r < count; r++) axpy(M.inner + FD, 1.0f, fk[r], p->Fp);
            running_step(&M);
        }
    }
    free(s.base);
    free(M.outer);
    return 0;
}

/* Causal forward. q (heads·group, L, D), k (heads, L, D), v (heads, L, Dv), keep (heads, L) or NULL, the map as
 * in sa_linear_fwd_f32; writes out (heads·group, L, Dv) and den (heads·group, L). 0, or -1 when out of memory. */
int sa_linear_causal_fwd_f32(const float *q, const float *k, const float *v, const float *keep, const float *proj,
                             const float *shift, int64_t heads, int64_t group, int64_t L, int64_t D, int64_t F,
                             int64_t Dv, int64_t map, double eps, float *out, float *den, int threads) {
    lin_job p;
    int status = job(&p, q, k, v, keep, proj, shift, heads, group, L, L, D, F, Dv, map, eps);
    p.o_out = out, p.o_den = den;
    if (!status) status = sa_parallel_rows(heads, threads, causal_forward, &p);
    return release(&p, status);
}

static int causal_dq(void *arg, int64_t h0, int64_t h1) {
    const lin_job *p = arg;
    scratch s;
    int64_t FD = p->Fp * p->Dvp;
    running St; /* [Sᵀ | z] of the rows before the block */
    if (running_open(&St, FD + p->Fp) || scratch_open(&s, p, 6 * BLOCK)) return free(St.outer), -1;
    float *fk[BLOCK], *vb[BLOCK], *fq[BLOCK], *dphi[BLOCK], *gnum[BLOCK], *dfq[BLOCK], keep[BLOCK], gden[BLOCK];
    for (int r = 0; r < BLOCK; r++)
        fk[r] = slot(&s, r), vb[r] = slot(&s, BLOCK + r), fq[r] = slot(&s, 2 * BLOCK + r), dphi[r] = slot(&s, 3 * BLOCK + r),
        gnum[r] = slot(&s, 4 * BLOCK + r), dfq[r] = slot(&s, 5 * BLOCK + r);
    for (int64_t h = h0; h < h1; h++) {
        running_clear(&St);
        for (int64_t i0 = 0; i0 < p->R; i0 += BLOCK) {
            int count = p->R - i0 < BLOCK ? (int)(p->R - i0) : BLOCK;
            key_block(p, &s, h, i0, count, fk, NULL, vb, keep);
            for (int64_t g = 0; g < p->group; g++) {
                int64_t row0 = query_row(p, h, g, i0);
                query_block_rows(p, &s, row0, count, fq, dphi, gnum, gden);
                times_rows2(gnum, St.outer, St.inner, p->Dvp, p->Fp, dfq);
                for (int r = 0; r < count; r++) {
                    axpy(dfq[r], gden[r], St.outer + FD, p->Fp);
                    axpy(dfq[r], gden[r], St.inner + FD, p->Fp);
                    for (int j = 0; j <= r; j++) axpy(dfq[r], dot(vb[j], gnum[r], p->Dvp) + gden[r], fk[j], p->Fp);
                }
                block_feature_grads(p, &s, p->q, row0, count, NULL, fq, dphi, dfq, p->dq);
            }
            rank_rows(St.inner, vb, fk, p->Dvp, p->Fp);
            for (int r = 0; r < count; r++) axpy(St.inner + FD, 1.0f, fk[r], p->Fp);
            running_step(&St);
        }
    }
    free(s.base);
    free(St.outer);
    return 0;
}

static int causal_dkv(void *arg, int64_t h0, int64_t h1) {
    const lin_job *p = arg;
    scratch s;
    int64_t FD = p->Fp * p->Dvp;
    running P; /* [P | Pᵀ | p] of the rows after the block */
    if (running_open(&P, 2 * FD + p->Fp) || scratch_open(&s, p, 7 * BLOCK)) return free(P.outer), -1;
    float keep[BLOCK], gden[BLOCK];
    float *fk[BLOCK], *dphi[BLOCK], *vb[BLOCK], *dfk[BLOCK], *dvb[BLOCK], *fq[BLOCK], *gnum[BLOCK];
    for (int r = 0; r < BLOCK; r++)
        fk[r] = slot(&s, r), dphi[r] = slot(&s, BLOCK + r), vb[r] = slot(&s, 2 * BLOCK + r), dfk[r] = slot(&s, 3 * BLOCK + r),
        dvb[r] = slot(&s, 4 * BLOCK + r), fq[r] = slot(&s, 5 * BLOCK + r), gnum[r] = slot(&s, 6 * BLOCK + r);
    for (int64_t h = h0; h < h1; h++) {
        running_clear(&P);
        for (int64_t i0 = (p->R - 1) / BLOCK * BLOCK; i0 >= 0; i0 -= BLOCK) {
            int count = p->R - i0 < BLOCK ? (int)(p->R - i0) : BLOCK;
            key_block(p, &s, h, i0, count, fk, dphi, vb, keep);
            times_rows2(vb, P.outer + FD, P.inner + FD, p->Dvp, p->Fp, dfk);
            times_rows2(fk, P.outer, P.inner, p->Fp, p->Dvp, dvb);
            for (int j = 0; j < count; j++) {
                axpy(dfk[j], 1.0f, P.outer + 2 * FD, p->Fp);
                axpy(dfk[j], 1.0f, P.inner + 2 * FD, p->Fp);
            }
            for (int64_t g = 0; g < p->group; g++) {
                int64_t row0 = query_row(p, h, g, i0);
                query_block_rows(p, &s, row0, count, fq, NULL, gnum, gden);
                for (int j = 0; j < count; j++)
                    for (int r = j; r < count; r++) {
                        axpy(dfk[j], dot(gnum[r], vb[j], p->Dvp) + gden[r], fq[r], p->Fp);
                        axpy(dvb[j], dot(fq[r], fk[j], p->Fp), gnum[r], p->Dvp);
                    }
                /* the later rows' states for the earlier blocks (this block's products are done) */
                rank_rows(P.inner, fq, gnum, p->Fp, p->Dvp);
                rank_rows(P.inner + FD, gnum, fq, p->Dvp, p->Fp);
                for (int r = 0; r < count; r++) axpy(P.inner + 2 * FD, gden[r], fq[r], p->Fp);
            }
            running_step(&P);
            for (int j = 0; j < count; j++) store_row(p->dv + (h * p->S + i0 + j) * p->Dv, dvb[j], p->Dv);
            block_feature_grads(p, &s, p->k, h * p->S + i0, count, keep, fk, dphi, dfk, p->dk);
        }
    }
    free(s.base);
    free(P.outer);
    return 0;
}

/* Causal backward: the forward's arguments, out and den, and g = ∂L/∂out (heads·group, L, Dv); writes dq
 * (heads·group, L, D), dk (heads, L, D), dv (heads, L, Dv). 0, or -1 when out of memory. */
int sa_linear_causal_bwd_f32(const float *q, const float *k, const float *v, const float *keep, const float *proj,
                             const float *shift, const float *g, const float *out, const float *den, int64_t heads,
                             int64_t group, int64_t L, int64_t D, int64_t F, int64_t Dv, int64_t map, float *dq,
                             float *dk, float *dv, int threads) {
    lin_job p;
    int status = job(&p, q, k, v, keep, proj, shift, heads, group, L, L, D, F, Dv, map, 0.0);
    p.g = g, p.out = out, p.den = den, p.dq = dq, p.dk = dk, p.dv = dv;
    if (!status) status = sa_parallel_rows(heads, threads, causal_dq, &p);
    if (!status) status = sa_parallel_rows(heads, threads, causal_dkv, &p);
    return release(&p, status);
}
