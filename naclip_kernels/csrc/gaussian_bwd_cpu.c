/* Fused CPU backward of O = softmax(scale * Q K^T + bias_scale * G) V in float32, with the sums of the
 * bias-parameter gradients fused in.
 *
 * Per (batch, head), in query blocks of `block_m` rows and key blocks of whole grid rows (about `block_n`
 * keys), from q, k, v, dO, O and the forward's per-row log-sum-exp `lse`:
 *   S  = Q_blk K_blk^T                          (BLAS)      P  = exp(scale * S + bias_scale * G - lse)
 *   dP = dO_blk V_blk^T                         (BLAS)      dS = P * (dP - rowsum(dO * O))
 *   dV_blk += P^T dO_blk,  dK_blk += scale * dS^T Q_blk,  dQ_blk += scale * dS K_blk     (BLAS)
 *   sum_bias[b, h] += sum dS * G,  sum_sig[b, h] += sum dS * G * d^2                     (double)
 * G is rebuilt from its separable 1-D factors (G[(r1, c1), (r2, c2)] = gy[r1, r2] * gx[c1, c2], zero for
 * the first `P` prefix tokens), so nothing N x N is stored. The BLAS routine is the caller's (a Fortran
 * `sgemm_` pointer, the one torch itself links); threads split the B * H (batch, head) pairs, each pair is
 * written by one thread only, so the result does not depend on the thread count.
 * Contract and design: docs/autograd.md ("Fused CPU backward"); Python side: naclip_kernels/_cpu_kernel.py.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

/* A [rows, cols] float32 matrix with row stride `ld` (unit column stride). */
typedef struct {
    const float *p;
    int64_t ld;
} mat_t;

/* Shapes, scale and the bias tables of one call. Tables are [th, gh, gh] / [th, gw, gw] float32, th = 0
 * (no bias), 1 (shared by the heads) or H (one per head); gyb = bias_scale * gy (the forward's factor). */
typedef struct {
    int64_t B, H, N, D, P, gh, gw, th, block_m, block_n;
    float scale;
    const float *gyb, *gy, *gx, *gxd; /* gxd = gx * dx^2 */
} shape_t;

/* One tensor [B, H, N, D] (or [B, H, N] for lse): base pointer and element strides of b, h, n. */
typedef struct {
    float *p;
    int64_t sb, sh, sn;
} tens_t;

/* Row-major C[M, N] = alpha * op(A)[M, K] op(B)[K, N] + beta * C through a column-major BLAS. */
static void gemm_rm(sgemm_fn f, char ta, char tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                    int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    int m = (int)M, n = (int)N, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
    f(&tb, &ta, &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

/* Vectors of VL floats (GCC / Clang vector extensions: AVX-512 / AVX2 / NEON code from one source). */
#define VL 16
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));

static inline vf sel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline vf splat(float x) { return (vf){0} + x; }
static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float hsum(vf v) {
    float acc = 0.0f;
    for (int l = 0; l < VL; ++l)
        acc += v[l];
    return acc;
}

/* exp(x) per lane in float32: Cody-Waite reduction by round-to-nearest n = x log2(e), Cephes minimax
 * polynomial on |r| <= ln(2) / 2 (about 1 ulp), 2^n from the exponent bits; 0 below -87 (float32's normal
 * range), +inf above 88, NaN for NaN. In this backward x = logit - lse <= ~1e-6. */
static inline vf vexp(vf x) {
    const vf shifter = splat(12582912.0f); /* 1.5 * 2^23: x + shifter rounds x to an integer */
    vf xc = sel(x < -87.0f, splat(-87.0f), x);
    xc = sel(xc > 88.0f, splat(88.0f), xc);
    vf m = xc * 1.44269504088896341f + shifter;
    vf n = m - shifter;
    vf r = xc - n * 0.693359375f - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi two_n = ((vi)m - 0x4B400000 + 127) << 23; /* m's low mantissa bits hold n */
    vf y = p * (vf)two_n;
    y = sel(x < -87.0f, splat(0.0f), y);
    y = sel(x > 88.0f, splat(INFINITY), y);
    return sel(x != x, x, y);
}

/* One vector of keys: P and dS in place, and the bias sums (weights w_g = gy * gx, w_f = gy * gx * d^2
 * are zero where no bias applies). */
static inline void lane_step(float *s, float *dp, vf bias, vf wg, vf wf, float scale, float lse, float delta,
                             vf *acc_g, vf *acc_f) {
    vf p = vexp(load(s) * scale + bias - lse);
    vf ds = p * (load(dp) - delta);
    store(s, p);
    store(dp, ds);
    *acc_g += ds * wg;
    *acc_f += ds * wf;
}

/* lane_step on the last n < VL keys, through zero-padded copies of s / dp (bias and weights: padded too). */
static void lane_tail(float *s, float *dp, int64_t n, vf bias, vf wg, vf wf, float scale, float lse, float delta,
                      vf *acc_g, vf *acc_f) {
    float ts[VL] = {0}, td[VL] = {0};
    memcpy(ts, s, (size_t)n * sizeof(float));
    memcpy(td, dp, (size_t)n * sizeof(float));
    lane_step(ts, td, bias, wg, wf, scale, lse, delta, acc_g, acc_f);
    memcpy(s, ts, (size_t)n * sizeof(float));
    memcpy(dp, td, (size_t)n * sizeof(float));
}

/* `n` consecutive keys without bias. */
static void row_plain(float *s, float *dp, int64_t n, float scale, float lse, float delta) {
    vf zero = {0}, ag = {0}, af = {0};
    int64_t j = 0;
    for (; j + VL <= n; j += VL)
        lane_step(s + j, dp + j, zero, zero, zero, scale, lse, delta, &ag, &af);
    if (j < n)
        lane_tail(s + j, dp + j, n - j, zero, zero, zero, scale, lse, delta, &ag, &af);
}

/* The keys of grid rows kr0..kr1 (gw each, from s / dp) of patch query (ri, ci): bias_scale * G added to
 * the logits, sum dS * G and sum dS * G * d^2 of the row added to acc_bias / acc_sig. */
static void row_bias(float *s, float *dp, const shape_t *sh, int64_t t, int64_t ri, int64_t ci, int64_t kr0,
                     int64_t kr1, float lse, float delta, double *acc_bias, double *acc_sig) {
    const int64_t gh = sh->gh, gw = sh->gw, tail = gw % VL;
    const float *gyb = sh->gyb + (t * gh + ri) * gh, *gy = sh->gy + (t * gh + ri) * gh;
    const float *gx = sh->gx + (t * gw + ci) * gw, *gxd = sh->gxd + (t * gw + ci) * gw;
    const float scale = sh->scale;
    vf ag = {0}, af = {0};
    float txg[VL] = {0}, txd[VL] = {0}; /* zero-padded tails of the gx / gx * dx^2 rows */
    memcpy(txg, gx + (gw - tail), (size_t)tail * sizeof(float));
    memcpy(txd, gxd + (gw - tail), (size_t)tail * sizeof(float));
    for (int64_t rj = kr0; rj <= kr1; ++rj, s += gw, dp += gw) {
        const float g = gyb[rj], wy = gy[rj], dy2 = (float)((ri - rj) * (ri - rj));
        int64_t j = 0;
        for (; j + VL <= gw; j += VL) {
            vf x = load(gx + j);
            lane_step(s + j, dp + j, x * g, x * wy, (x * dy2 + load(gxd + j)) * wy, scale, lse, delta, &ag,
                      &af);
        }
        if (tail) {
            vf x = load(txg);
            lane_tail(s + j, dp + j, tail, x * g, x * wy, (x * dy2 + load(txd)) * wy, scale, lse, delta, &ag,
                      &af);
        }
    }
    *acc_bias += (double)hsum(ag);
    *acc_sig += (double)hsum(af);
}

/* One query block [i0, i0 + m) against the key block [a, a + nb) (grid rows kr0..kr1, the prefix keys too
 * when a == 0): the scores, P / dS, the bias sums, and the dV / dK / dQ accumulations. */
static void tile(sgemm_fn gemm, const shape_t *sh, int64_t t, mat_t Q, mat_t K, mat_t V, mat_t dO, const float *lse,
                 const float *delta, float *dK, int64_t ldk, float *dV, int64_t ldv, float *dQl, float *S, float *dP,
                 int64_t i0, int64_t m, int64_t a, int64_t nb, int64_t kr0, int64_t kr1, double *acc) {
    const int64_t D = sh->D, P = sh->P;
    gemm_rm(gemm, 'N', 'T', m, nb, D, 1.0f, Q.p + i0 * Q.ld, Q.ld, K.p + a * K.ld, K.ld, 0.0f, S, nb);
    gemm_rm(gemm, 'N', 'T', m, nb, D, 1.0f, dO.p + i0 * dO.ld, dO.ld, V.p + a * V.ld, V.ld, 0.0f, dP, nb);
    const int64_t pc = (a == 0) ? (P < nb ? P : nb) : 0; /* prefix key columns of this block */
    for (int64_t r = 0; r < m; ++r) {
        const int64_t i = i0 + r;
        float *s = S + r * nb, *dp = dP + r * nb;
        if (sh->th == 0 || i < P) {
            row_plain(s, dp, nb, sh->scale, lse[r], delta[r]);
            continue;
        }
        row_plain(s, dp, pc, sh->scale, lse[r], delta[r]);
        const int64_t ri = (i - P) / sh->gw, ci = (i - P) % sh->gw;
        row_bias(s + pc, dp + pc, sh, t, ri, ci, kr0, kr1, lse[r], delta[r], acc, acc + 1);
    }
    gemm_rm(gemm, 'T', 'N', nb, D, m, 1.0f, S, nb, dO.p + i0 * dO.ld, dO.ld, 1.0f, dV + a * ldv, ldv);
    gemm_rm(gemm, 'T', 'N', nb, D, m, sh->scale, dP, nb, Q.p + i0 * Q.ld, Q.ld, 1.0f, dK + a * ldk, ldk);
    gemm_rm(gemm, 'N', 'N', m, D, nb, sh->scale, dP, nb, K.p + a * K.ld, K.ld, 1.0f, dQl, D);
}

/* Key blocks: [0, N) in `block_n` pieces without bias; with bias, whole grid rows (the prefix keys joined to
 * the first block). Returns the next block after `a` in (a, nb, kr0, kr1); nb == 0 at the end. */
static void next_block(const shape_t *sh, int64_t a, int64_t *nb, int64_t *kr0, int64_t *kr1) {
    if (a >= sh->N) {
        *nb = 0;
        return;
    }
    if (sh->th == 0) {
        *nb = sh->N - a < sh->block_n ? sh->N - a : sh->block_n;
        return;
    }
    const int64_t rows = sh->block_n / sh->gw > 0 ? sh->block_n / sh->gw : 1;
    const int64_t r0 = a == 0 ? 0 : (a - sh->P) / sh->gw;
    const int64_t r1 = r0 + rows - 1 < sh->gh - 1 ? r0 + rows - 1 : sh->gh - 1;
    *kr0 = r0;
    *kr1 = r1;
    *nb = sh->P + (r1 + 1) * sh->gw - a;
}

static float dot(const float *x, const float *y, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j)
        acc += x[j] * y[j];
    return acc;
}

/* Widest key block next_block() can return (scratch columns). */
static int64_t max_block(const shape_t *sh) {
    if (sh->th == 0)
        return sh->N < sh->block_n ? sh->N : sh->block_n;
    int64_t rows = sh->block_n / sh->gw > 0 ? sh->block_n / sh->gw : 1;
    rows = rows < sh->gh ? rows : sh->gh;
    return sh->P + rows * sh->gw;
}

/* The whole backward of one (batch, head) pair with this thread's scratch `work` (scratch_floats()). */
static void one_head(sgemm_fn gemm, const shape_t *sh, int64_t b, int64_t h, const tens_t *io, float *work,
                     double *acc) {
    const int64_t N = sh->N, D = sh->D, bm = sh->block_m, nbw = max_block(sh);
#define AT(x) (io[x].p + b * io[x].sb + h * io[x].sh)
    const mat_t Q = {AT(0), io[0].sn}, K = {AT(1), io[1].sn}, V = {AT(2), io[2].sn};
    const mat_t O = {AT(3), io[3].sn}, dO = {AT(4), io[4].sn};
    const float *L = AT(5);
    float *dQ = AT(6), *dK = AT(7), *dV = AT(8);
#undef AT
    const int64_t lsn = io[5].sn, ldq = io[6].sn, ldk = io[7].sn, ldv = io[8].sn;
    const int64_t t = sh->th > 1 ? h : 0;
    float *S = work, *dP = S + bm * nbw, *dQl = dP + bm * nbw, *lse = dQl + bm * D, *delta = lse + bm;
    for (int64_t j = 0; j < N; ++j) {
        memset(dK + j * ldk, 0, (size_t)D * sizeof(float));
        memset(dV + j * ldv, 0, (size_t)D * sizeof(float));
    }
    acc[0] = acc[1] = 0.0;
    for (int64_t i0 = 0; i0 < N; i0 += bm) {
        const int64_t m = N - i0 < bm ? N - i0 : bm;
        memset(dQl, 0, (size_t)(m * D) * sizeof(float));
        for (int64_t r = 0; r < m; ++r) {
            lse[r] = L[(i0 + r) * lsn];
            delta[r] = dot(dO.p + (i0 + r) * dO.ld, O.p + (i0 + r) * O.ld, D);
        }
        int64_t a = 0, nb = 0, kr0 = 0, kr1 = -1;
        for (next_block(sh, a, &nb, &kr0, &kr1); nb > 0; a += nb, next_block(sh, a, &nb, &kr0, &kr1))
            tile(gemm, sh, t, Q, K, V, dO, lse, delta, dK, ldk, dV, ldv, dQl, S, dP, i0, m, a, nb, kr0, kr1, acc);
        for (int64_t r = 0; r < m; ++r)
            memcpy(dQ + (i0 + r) * ldq, dQl + r * D, (size_t)D * sizeof(float));
    }
}

/* Floats of scratch one thread needs. */
int64_t naclip_scratch_floats(const shape_t *sh) {
    const int64_t bm = sh->block_m;
    return 2 * bm * max_block(sh) + bm * sh->D + 2 * bm;
}

/* Entry point. io: q, k, v, out, dout, lse, dq, dk, dv (strides in elements; unit stride on D). sums:
 * [B * H, 2] doubles (sum dS * G, sum dS * G * d^2), written for every pair. Returns 0, or 1 when the
 * scratch memory could not be allocated (then nothing was written). */
int naclip_gaussian_bwd_f32(sgemm_fn gemm, const shape_t *sh, const tens_t *io, double *sums, int nthreads) {
    const int64_t pairs = sh->B * sh->H, per = naclip_scratch_floats(sh);
    nthreads = nthreads < 1 ? 1 : nthreads;
    float *work = (float *)malloc((size_t)(per * nthreads) * sizeof(float));
    if (work == NULL)
        return 1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < pairs; ++bh)
        one_head(gemm, sh, bh / sh->H, bh % sh->H, io, work + per * omp_get_thread_num(), sums + 2 * bh);
    free(work);
    return 0;
}

/* The kernel's exp on n floats (for its accuracy test). */
void naclip_exp_f32(const float *x, float *y, int64_t n) {
    int64_t j = 0;
    for (; j + VL <= n; j += VL)
        store(y + j, vexp(load(x + j)));
    if (j < n) {
        float t[VL] = {0};
        memcpy(t, x + j, (size_t)(n - j) * sizeof(float));
        store(t, vexp(load(t)));
        memcpy(y + j, t, (size_t)(n - j) * sizeof(float));
    }
}
