/* lockgate native CPU kernels: block-quantized matmuls and a fused decode step.
 *
 * Weights stay in GGUF block form (32 weights per block):
 *   Q4_1  20 bytes: d (f16), m (f16), 16 bytes of nibbles   w = d * q + m
 *   Q8_0  34 bytes: d (f16), 32 int8                        w = d * q
 * Nibble byte j holds weight j (low 4 bits) and weight j + 16 (high 4 bits).
 *
 * Activations are quantized per 32 values to int8 (scale d, and d * sum(q) for the
 * Q4_1 offset term), so a block's dot product is integer multiply-adds (AVX2
 * maddubs), as llama.cpp does: at one stream a decode step reads each weight byte once
 * and the int8 dot keeps up with memory on two AVX2 cores.
 *
 * lg_decode runs every layer of a decode-only step (one new token per row) in one
 * call and one OpenMP parallel region: Python sees one call per step, not ~20 per layer.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LG_AVX2 1
#endif

#define QK 32
#define LG_ABI 5

enum { LG_Q4_1 = 0, LG_Q8_0 = 1 };


static inline float h2f(uint16_t h) {
#ifdef LG_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

int lg_abi(void) { return LG_ABI; }

int lg_has_avx2(void) {
#ifdef LG_AVX2
    return 1;
#else
    return 0;
#endif
}

/* ---- layouts ------------------------------------------------------------------
 * A weight row of nb blocks (nb even) is stored in groups of up to 8 blocks:
 *   Q4_1 group of G blocks: d[G] (f16), m[G] (f16), qs[G][16]  (20 G bytes, GGUF's bytes regrouped)
 *   Q8_0 group of G blocks: d[G] (f16), then per block pair the first 16 codes of both
 *        blocks, then the last 16 codes of both                (34 G bytes)
 * An activation row (act_t) keeps d[nb], s[nb] (= d * sum of codes) and codes in the
 * pair order above, so one 32-byte load meets one 32-byte load of weights. */

#define GROUP_BLOCKS 8

typedef struct {
    float *d, *s; /* [M][nb + 8] (zero padded) */
    int8_t *q;    /* [M][nb * 32] */
    int nb, stride;
} act_t;

static int act_alloc(act_t *a, int M, int nb) {
    a->nb = nb;
    a->stride = nb + GROUP_BLOCKS;
    a->d = calloc((size_t)M * a->stride, sizeof(float));
    a->s = calloc((size_t)M * a->stride, sizeof(float));
    a->q = malloc((size_t)M * nb * QK + 64);
    return a->d && a->s && a->q ? 0 : -1;
}

static void act_free(act_t *a) { free(a->d); free(a->s); free(a->q); }

/* Quantize x[k] (k = 32 nb) into row m of a, in pair order. */
static void quantize_row(const float *x, int k, const act_t *a, int m) {
    float *dd = a->d + (size_t)m * a->stride, *ss = a->s + (size_t)m * a->stride;
    int8_t *qq = a->q + (size_t)m * a->nb * QK;
    for (int b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) { float v = fabsf(xb[j]); amax = v > amax ? v : amax; }
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        int8_t *dst = qq + (b & ~1) * QK + (b & 1) * 16; /* pair base, then this block's half */
        for (int j = 0; j < QK; j++) {
            int q = (int)lrintf(xb[j] * id);
            dst[(j >> 4) * 32 + (j & 15)] = (int8_t)q;
            sum += q;
        }
        dd[b] = d;
        ss[b] = d * (float)sum;
    }
}

static inline size_t row_bytes(int wtype, int nb) { return (size_t)nb * (wtype == LG_Q4_1 ? 20 : 34); }

/* ---- block dot products: one weight row against R activation rows ---------- */

#ifdef LG_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load_f16(const uint16_t *p, int G) {
    if (G == GROUP_BLOCKS) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t t[8] = {0};
    memcpy(t, p, sizeof(uint16_t) * G);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}

static inline __attribute__((always_inline)) void dot_row(const uint8_t *w, int wtype, const act_t *a,
                                                           int m0, int R, float *out) {
    const int nb = a->nb;
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[4], off[4];
    for (int r = 0; r < 4; r++) { acc[r] = _mm256_setzero_ps(); off[r] = _mm256_setzero_ps(); }
    for (int b0 = 0; b0 < nb; b0 += GROUP_BLOCKS) {
        const int G = nb - b0 < GROUP_BLOCKS ? nb - b0 : GROUP_BLOCKS;
        const uint16_t *d16 = (const uint16_t *)w;
        __m256 dw = load_f16(d16, G), prod[4];
        for (int r = 0; r < R; r++) {
            size_t o = (size_t)(m0 + r) * a->stride + b0;
            prod[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(a->d + o));
            if (wtype == LG_Q4_1) off[r] = _mm256_fmadd_ps(load_f16(d16 + G, G), _mm256_loadu_ps(a->s + o), off[r]);
        }
        if (wtype == LG_Q4_1) {
            const uint8_t *qs = w + 4 * G;
            for (int p = 0; p < G / 2; p++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
                __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                __m256i idx = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
                for (int r = 0; r < R; r++) {
                    const int8_t *x = a->q + ((size_t)(m0 + r) * nb + b0 + 2 * p) * QK;
                    __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                                   _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
                    __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
                    acc[r] = _mm256_fmadd_ps(f, _mm256_permutevar8x32_ps(prod[r], idx), acc[r]);
                }
            }
            w += 20 * G;
        } else {
            const uint8_t *qs = w + 2 * G;
            for (int p = 0; p < G / 2; p++) {
                __m256i w1 = _mm256_loadu_si256((const __m256i *)(qs + 64 * p));
                __m256i w2 = _mm256_loadu_si256((const __m256i *)(qs + 64 * p + 32));
                __m256i a1 = _mm256_sign_epi8(w1, w1), a2 = _mm256_sign_epi8(w2, w2);
                __m256i idx = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
                for (int r = 0; r < R; r++) {
                    const int8_t *x = a->q + ((size_t)(m0 + r) * nb + b0 + 2 * p) * QK;
                    __m256i x1 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x), w1);
                    __m256i x2 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x + 32)), w2);
                    __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a1, x1), ones),
                                                   _mm256_madd_epi16(_mm256_maddubs_epi16(a2, x2), ones));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_permutevar8x32_ps(prod[r], idx), acc[r]);
                }
            }
            w += 34 * G;
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(_mm256_add_ps(acc[r], off[r]));
}
#else
static void dot_row(const uint8_t *w, int wtype, const act_t *a, int m0, int R, float *out) {
    const int nb = a->nb;
    for (int r = 0; r < R; r++) out[r] = 0.f;
    for (int b0 = 0; b0 < nb; b0 += GROUP_BLOCKS) {
        const int G = nb - b0 < GROUP_BLOCKS ? nb - b0 : GROUP_BLOCKS;
        const uint16_t *d16 = (const uint16_t *)w;
        for (int g = 0; g < G; g++) {
            int b = b0 + g;
            for (int r = 0; r < R; r++) {
                const int8_t *x = a->q + ((size_t)(m0 + r) * nb + (b & ~1)) * QK + (b & 1) * 16;
                size_t o = (size_t)(m0 + r) * a->stride + b;
                int s = 0;
                for (int j = 0; j < QK; j++) {
                    int xv = x[(j >> 4) * 32 + (j & 15)], wv;
                    if (wtype == LG_Q4_1) {
                        uint8_t byte = w[4 * G + 16 * g + (j & 15)];
                        wv = j < 16 ? (byte & 0x0f) : (byte >> 4);
                    } else {
                        wv = ((const int8_t *)w)[2 * G + (g & ~1) * QK + (j >> 4) * 32 + (g & 1) * 16 + (j & 15)];
                    }
                    s += wv * xv;
                }
                out[r] += h2f(d16[g]) * a->d[o] * (float)s + (wtype == LG_Q4_1 ? h2f(d16[G + g]) * a->s[o] : 0.f);
            }
        }
        w += (wtype == LG_Q4_1 ? 20 : 34) * G;
    }
}
#endif

/* Rows of y[M, N] (leading dim ldy) = a[M, K] . W[N, K]^T (+ bias) (+= when accumulate).
 * Work-shared over weight rows: call inside a parallel region (or alone, serially). */
static void gemm_q(const act_t *a, int M, const void *W, int wtype, int N,
                   const float *bias, float *y, int ldy, int accumulate) {
    const size_t rb = row_bytes(wtype, a->nb);
#pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wr = (const uint8_t *)W + (size_t)n * rb;
        for (int m0 = 0; m0 < M; m0 += 4) {
            float out[4];
            int R = M - m0 < 4 ? M - m0 : 4;
            switch (R) {
            case 1: dot_row(wr, wtype, a, m0, 1, out); break;
            case 2: dot_row(wr, wtype, a, m0, 2, out); break;
            case 3: dot_row(wr, wtype, a, m0, 3, out); break;
            default: dot_row(wr, wtype, a, m0, 4, out); break;
            }
            float b = bias ? bias[n] : 0.f;
            for (int r = 0; r < R; r++) {
                float *dst = y + (size_t)(m0 + r) * ldy + n;
                *dst = accumulate ? *dst + out[r] + b : out[r] + b;
            }
        }
    }
}

/* y[M, N] = x[M, K] . W^T (+ bias): the per-matmul entry (prefill and mixed steps). */
int lg_gemm(const float *x, int M, int K, const void *W, int wtype, int N, const float *bias, float *y) {
    act_t a;
    if (act_alloc(&a, M, K / QK)) { act_free(&a); return -1; }
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) quantize_row(x + (size_t)m * K, K, &a, m);
        gemm_q(&a, M, W, wtype, N, bias, y, N, 0);
    }
    act_free(&a);
    return 0;
}

/* Row `row` of a table, dequantized (embedding lookup, exact logits). */
static void dequant_row(const void *W, int wtype, int K, int64_t row, float *out) {
    const int nb = K / QK;
    const uint8_t *w = (const uint8_t *)W + (size_t)row * row_bytes(wtype, nb);
    for (int b0 = 0; b0 < nb; b0 += GROUP_BLOCKS) {
        const int G = nb - b0 < GROUP_BLOCKS ? nb - b0 : GROUP_BLOCKS;
        const uint16_t *d16 = (const uint16_t *)w;
        for (int g = 0; g < G; g++) {
            float d = h2f(d16[g]), *o = out + (size_t)(b0 + g) * QK;
            if (wtype == LG_Q4_1) {
                float m = h2f(d16[G + g]);
                const uint8_t *qs = w + 4 * G + 16 * g;
                for (int j = 0; j < 16; j++) { o[j] = d * (qs[j] & 0x0f) + m; o[j + 16] = d * (qs[j] >> 4) + m; }
            } else {
                const int8_t *qs = (const int8_t *)w + 2 * G + (g & ~1) * QK + (g & 1) * 16;
                for (int j = 0; j < 16; j++) { o[j] = d * qs[j]; o[j + 16] = d * qs[j + 32]; }
            }
        }
        w += (wtype == LG_Q4_1 ? 20 : 34) * G;
    }
}

void lg_rows(const void *W, int wtype, int K, const int64_t *ids, int n, float *out) {
    for (int i = 0; i < n; i++) dequant_row(W, wtype, K, ids[i], out + (size_t)i * K);
}

/* out[m, j] = float32 dot of dequantized row ids[m, j] with h[m] (exact logits of candidates). */
void lg_rows_dot(const void *W, int wtype, int K, const float *h, int M, const int64_t *ids, int k, float *out) {
#pragma omp parallel
    {
        float *row = malloc(sizeof(float) * K);
#pragma omp for schedule(static)
        for (int i = 0; i < M * k; i++) {
            const float *hm = h + (size_t)(i / k) * K;
            dequant_row(W, wtype, K, ids[i], row);
            float s = 0.f;
            for (int j = 0; j < K; j++) s += row[j] * hm[j];
            out[i] = s;
        }
        free(row);
    }
}

/* ---- the fused decode step ------------------------------------------------- */

typedef struct {
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm, *qkv_bias; /* q/k norm and bias may be NULL */
    const void *qkv, *o, *gate_up, *down;
    float *k_cache, *v_cache; /* [slots, kv_heads, head_dim] float32 */
} lg_layer;

typedef struct {
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, inter, block_size, wtype, embed_type, vocab, max_pos;
    float eps, scale;
    const float *cos, *sin_signed; /* [max_pos, head_dim]: rope tables, rotate-half sign folded in */
    const void *embed;
    const float *final_norm;
    const lg_layer *layers;
} lg_model;

static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *x, const float *c, const float *s, int d) {
    int h = d / 2;
    for (int i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * c[i] + b * s[i];
        x[i + h] = b * c[i + h] + a * s[i + h];
    }
}

/* One query head over its sequence's paged context (two passes: scores, then softmax-weighted V). */
static void attend(const float *q, const lg_model *md, const lg_layer *L, int kv, const int64_t *blocks,
                   int ctx, float *scores, float *out) {
    const int d = md->head_dim, kvh = md->n_kv_heads, bs = md->block_size;
    float mx = -INFINITY;
    for (int t = 0; t < ctx; t++) {
        int64_t slot = blocks[t / bs] * bs + t % bs;
        const float *k = L->k_cache + ((size_t)slot * kvh + kv) * d;
        float s = 0.f;
        for (int i = 0; i < d; i++) s += q[i] * k[i];
        s *= md->scale;
        scores[t] = s;
        mx = s > mx ? s : mx;
    }
    float sum = 0.f;
    for (int t = 0; t < ctx; t++) { scores[t] = expf(scores[t] - mx); sum += scores[t]; }
    for (int i = 0; i < d; i++) out[i] = 0.f;
    for (int t = 0; t < ctx; t++) {
        int64_t slot = blocks[t / bs] * bs + t % bs;
        const float *v = L->v_cache + ((size_t)slot * kvh + kv) * d;
        float p = scores[t] / sum;
        for (int i = 0; i < d; i++) out[i] += p * v[i];
    }
}

static inline float silu(float x) { return x / (1.f + expf(-x)); }

/* M decode rows: token ids, positions, KV slots, block tables [M, max_blocks] and context
 * lengths (the new token included). Writes the final-normed hidden states [M, hidden]. */
int lg_decode(const lg_model *md, int M, const int64_t *ids, const int64_t *pos, const int64_t *slots,
              const int64_t *block_tables, int max_blocks, const int64_t *ctx_lens, float *out) {
    const int H = md->hidden, nh = md->n_heads, nkv = md->n_kv_heads, d = md->head_dim, I = md->inter;
    const int qs = nh * d, kvs = nkv * d, nqkv = qs + 2 * kvs, group = nh / nkv;
    int max_ctx = 0;
    for (int m = 0; m < M; m++) {
        if (ids[m] < 0 || ids[m] >= md->vocab || pos[m] < 0 || pos[m] >= md->max_pos || ctx_lens[m] != pos[m] + 1)
            return -2; /* the caller's bug: refuse rather than read out of bounds */
        max_ctx = ctx_lens[m] > max_ctx ? (int)ctx_lens[m] : max_ctx;
    }
    const int kmax = (H > I ? H : I) > qs ? (H > I ? H : I) : qs;
    float *x = malloc(sizeof(float) * M * H), *h = malloc(sizeof(float) * M * H);
    float *qkv = malloc(sizeof(float) * M * nqkv), *att = malloc(sizeof(float) * M * qs);
    float *gu = malloc(sizeof(float) * M * 2 * I), *act = malloc(sizeof(float) * M * I);
    act_t aH; /* one buffer, viewed with the block count of each matmul's input */
    int bad = act_alloc(&aH, M, kmax / QK);
    if (bad || !x || !h || !qkv || !att || !gu || !act) {
        free(x); free(h); free(qkv); free(att); free(gu); free(act); act_free(&aH);
        return -1;
    }
    act_t aQ = aH, aI = aH;
    aH.nb = H / QK; aQ.nb = qs / QK; aI.nb = I / QK;
    for (int m = 0; m < M; m++) dequant_row(md->embed, md->embed_type, H, ids[m], x + (size_t)m * H);
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (max_ctx > 0 ? max_ctx : 1));
        for (int l = 0; l < md->n_layers; l++) {
            const lg_layer *L = md->layers + l;
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                rms_norm(x + (size_t)m * H, L->attn_norm, H, md->eps, h + (size_t)m * H);
                quantize_row(h + (size_t)m * H, H, &aH, m);
            }
            gemm_q(&aH, M, L->qkv, md->wtype, nqkv, L->qkv_bias, qkv, nqkv, 0);
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                float *r = qkv + (size_t)m * nqkv;
                const float *c = md->cos + pos[m] * d, *s = md->sin_signed + pos[m] * d;
                for (int j = 0; j < nh + nkv; j++) {
                    float *v = r + j * d;
                    if (L->q_norm) rms_norm(v, j < nh ? L->q_norm : L->k_norm, d, md->eps, v);
                    rope(v, c, s, d);
                }
                memcpy(L->k_cache + (size_t)slots[m] * kvs, r + qs, sizeof(float) * kvs);
                memcpy(L->v_cache + (size_t)slots[m] * kvs, r + qs + kvs, sizeof(float) * kvs);
            }
#pragma omp for schedule(static)
            for (int i = 0; i < M * nh; i++) {
                int m = i / nh, head = i % nh;
                attend(qkv + (size_t)m * nqkv + head * d, md, L, head / group, block_tables + (size_t)m * max_blocks,
                       (int)ctx_lens[m], scores, att + (size_t)m * qs + head * d);
            }
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) quantize_row(att + (size_t)m * qs, qs, &aQ, m);
            gemm_q(&aQ, M, L->o, md->wtype, H, NULL, x, H, 1);
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                rms_norm(x + (size_t)m * H, L->ffn_norm, H, md->eps, h + (size_t)m * H);
                quantize_row(h + (size_t)m * H, H, &aH, m);
            }
            gemm_q(&aH, M, L->gate_up, md->wtype, 2 * I, NULL, gu, 2 * I, 0);
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                const float *g = gu + (size_t)m * 2 * I, *u = g + I;
                float *a = act + (size_t)m * I;
                for (int j = 0; j < I; j++) a[j] = silu(g[j]) * u[j];
                quantize_row(a, I, &aI, m);
            }
            gemm_q(&aI, M, L->down, md->wtype, H, NULL, x, H, 1);
        }
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) rms_norm(x + (size_t)m * H, md->final_norm, H, md->eps, out + (size_t)m * H);
        free(scores);
    }
    free(x); free(h); free(qkv); free(att); free(gu); free(act); act_free(&aH);
    return 0;
}
