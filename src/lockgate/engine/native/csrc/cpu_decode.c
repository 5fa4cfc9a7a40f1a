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
 * lg_decode runs every layer of a step (each row one token with its own position:
 * decodes, and prefill chunks attending causally up to each row) in one call and one
 * OpenMP parallel region: Python sees one call per step, not ~20 per layer.
 *
 * The KV cache holds float32, float16 or bfloat16 (lg_model.kv_type): 16-bit K/V are
 * rounded to nearest even on write (float16 saturated at 65504, as the PyTorch path
 * does) and widened 8 at a time in the attention's dot products and weighted V sums
 * (F16C's vcvtph2ps; bfloat16 is a 16-bit shift), so attention reads half the bytes.
 */
#define _GNU_SOURCE /* syscall(): asking Linux for the AMX tile state (amx.h) */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LG_AVX2 1
#endif

/* VNNI (one vpdpbusd per 32 weight bytes instead of maddubs + madd): chosen by the compiler's
 * -march=native on a CPU that has it; LOCKGATE_NATIVE_ISA=avx2 builds without it (build.py).
 * u8 x s8 products summed four to an int32 lane: the same sums as the AVX2 pair, which never
 * saturate here (|codes| <= 127, nibbles <= 15), so the answers are bit for bit the same. */
#if defined(LG_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LG_VNNI 1
#define LG_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(LG_AVX2) && defined(__AVXVNNI__)
#define LG_VNNI 2
#define LG_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

#define QK 32
#define LG_ABI 8

/* Marked loop bodies for llvm-mca (benchmarks/kernel_model.py builds with -DLG_MCA -S to predict
 * the kernels' throughput on CPUs these machines lack); no code otherwise. */
#ifdef LG_MCA
#define MCA_BEGIN(name) __asm__ volatile("# LLVM-MCA-BEGIN " name)
#define MCA_END(name) __asm__ volatile("# LLVM-MCA-END " name)
#else
#define MCA_BEGIN(name) do { } while (0)
#define MCA_END(name) do { } while (0)
#endif

enum { LG_Q4_1 = 0, LG_Q8_0 = 1 };
enum { LG_KV_F32 = 0, LG_KV_F16 = 1, LG_KV_BF16 = 2 };


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

/* float -> float16, round to nearest even, saturated at +-65504 (NaN stays NaN). */
static inline uint16_t f2h(float f) {
    if (f > 65504.f) f = 65504.f;
    else if (f < -65504.f) f = -65504.f;
#ifdef LG_AVX2
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    x &= 0x7fffffff;
    if (x > 0x7f800000) return (uint16_t)(sign | 0x7e00);
    if (x >= 0x38800000) { /* a normal half (>= 2^-14): rebias the exponent, round off 13 bits */
        uint32_t r = x - 0x38000000;
        r += 0xfff + ((r >> 13) & 1);
        return (uint16_t)(sign | (r >> 13));
    }
    if (x < 0x33000000) return (uint16_t)sign; /* at most half the smallest subnormal (2^-25) */
    const int shift = 126 - (int)(x >> 23); /* a subnormal half: the significand in units of 2^-24 */
    const uint32_t m = (x & 0x7fffff) | 0x800000, half = 1u << (shift - 1), rem = m & ((1u << shift) - 1);
    uint32_t q = m >> shift;
    if (rem > half || (rem == half && (q & 1))) q++;
    return (uint16_t)(sign | q);
#endif
}

/* float -> bfloat16, round to nearest even (PyTorch's rounding; NaN stays NaN). */
static inline uint16_t f2bf(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

static inline float bf2f(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

int lg_abi(void) { return LG_ABI; }

/* The instruction set the kernels were built for: 0 portable C, 1 AVX2, 2 AVX2 + AVX512-VNNI
 * (256-bit, VL), 3 AVX2 + AVX-VNNI. */
int lg_isa(void) {
#if defined(LG_VNNI) && LG_VNNI == 1
    return 2;
#elif defined(LG_VNNI)
    return 3;
#elif defined(LG_AVX2)
    return 1;
#else
    return 0;
#endif
}

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
#ifndef M_CHUNK
#define M_CHUNK 64 /* activation rows per pass over the weights (gemm_q) */
#endif
#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead of the weight stream */
#endif

typedef struct {
    float *d, *s;  /* [M][nb + 8] (zero padded) */
    int8_t *q;     /* [M][nb * 32]: 8-bit codes (the default) ... */
    int16_t *q16;  /* ... or 16-bit ones (lg_set_activation_bits(16)); the other is NULL */
    int nb, stride, bits;
    int8_t *bt;    /* AMX: the codes again as B tiles, [M / 16][nb][8][64] (amx.h); NULL without */
    float *dT, *sT; /* AMX: d and s per block for each 16 rows, [M / 16][nb][16] */
} act_t;

static int g_act_bits = 8; /* activation codes' width: 8 (llama.cpp's choice, fastest) or 16 */

static int amx_rows(int M, int bits); /* amx.h: whether M rows of these codes take the AMX tiles */

static int act_alloc(act_t *a, int M, int nb) {
    a->nb = nb;
    a->stride = nb + GROUP_BLOCKS;
    a->bits = g_act_bits;
    a->d = calloc((size_t)M * a->stride, sizeof(float));
    a->s = calloc((size_t)M * a->stride, sizeof(float));
    a->q = a->bits == 8 ? malloc((size_t)M * nb * QK + 64) : NULL;
    a->q16 = a->bits == 16 ? malloc(((size_t)M * nb * QK + 64) * sizeof(int16_t)) : NULL;
    a->bt = NULL; a->dT = a->sT = NULL;
    if (amx_rows(M, a->bits)) {
        const size_t tiles = (size_t)(M + 15) / 16;
        a->bt = aligned_alloc(64, tiles * nb * 512);
        a->dT = malloc(tiles * nb * 16 * sizeof(float));
        a->sT = malloc(tiles * nb * 16 * sizeof(float));
        if (!a->bt || !a->dT || !a->sT) return -1;
    }
    return a->d && a->s && (a->q || a->q16) ? 0 : -1;
}

static void act_free(act_t *a) { free(a->d); free(a->s); free(a->q); free(a->q16); free(a->bt); free(a->dT); free(a->sT); }

#ifdef LG_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Float dot product (attention scores, norms): vectorized by hand, since the compiler
 * keeps a float sum's order (and so scalar code) without -ffast-math. */
static inline float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
#ifdef LG_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---- 16-bit K/V rows ---- */
static inline float kv_get(const uint16_t *p, int type) { return type == LG_KV_F16 ? h2f(*p) : bf2f(*p); }

#ifdef LG_AVX2
static inline __m256 load8_16(const uint16_t *p, int type) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return type == LG_KV_F16 ? _mm256_cvtph_ps(v)
                             : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
#endif

/* a . b, b a 16-bit K row. */
static inline float dot_16(const float *a, const uint16_t *b, int n, int type) {
    int i = 0;
    float s = 0.f;
#ifdef LG_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8_16(b + i, type), acc);
    s = hsum(acc);
#endif
    for (; i < n; i++) s += a[i] * kv_get(b + i, type);
    return s;
}

/* o += p * v, v a 16-bit V row: a multiply then an add, as the float32 rows' loop compiles (no
 * contraction under -std=c11). */
static inline void axpy_16(float p, const uint16_t *v, int n, int type, float *o) {
    int i = 0;
#ifdef LG_AVX2
    const __m256 vp = _mm256_set1_ps(p);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(o + i), _mm256_mul_ps(vp, load8_16(v + i, type))));
#endif
    for (; i < n; i++) o[i] += p * kv_get(v + i, type);
}

/* x[n] into the cache at element offset off, in the cache's type. */
static void kv_store(void *cache, int type, size_t off, const float *x, int n) {
    if (type == LG_KV_F32) {
        memcpy((float *)cache + off, x, sizeof(float) * n);
        return;
    }
    uint16_t *o = (uint16_t *)cache + off;
    int i = 0;
#ifdef LG_AVX2
    if (type == LG_KV_F16) {
        const __m256 hi = _mm256_set1_ps(65504.f), lo = _mm256_set1_ps(-65504.f);
        for (; i + 8 <= n; i += 8) { /* min/max return their second operand for NaN: NaN stays NaN */
            __m256 v = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(x + i)));
            _mm_storeu_si128((__m128i *)(o + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        }
    }
#endif
    for (; i < n; i++) o[i] = type == LG_KV_F16 ? f2h(x[i]) : f2bf(x[i]);
}

/* n floats in a KV cache's type, as lg_decode writes them (the tests compare it with PyTorch's). */
int lg_kv_write(void *dst, int type, const float *x, int n) {
    if (type < LG_KV_F32 || type > LG_KV_BF16) return -3;
    kv_store(dst, type, 0, x, n);
    return 0;
}

/* Quantize x[k] (k = 32 nb) into row m of a, in pair order. */
static void quantize_row16(const float *x, int k, const act_t *a, int m);

static void quantize_row(const float *x, int k, const act_t *a, int m) {
    if (a->bits == 16) {
        quantize_row16(x, k, a, m);
        return;
    }
    float *dd = a->d + (size_t)m * a->stride, *ss = a->s + (size_t)m * a->stride;
    int8_t *qq = a->q + (size_t)m * a->nb * QK;
    for (int b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        int8_t *dst = qq + (b & ~1) * QK + (b & 1) * 16; /* pair base, then this block's half */
#ifdef LG_AVX2
        const __m256 sign = _mm256_set1_ps(-0.f);
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        const __m256 mul = _mm256_set1_ps(id);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC; /* half to even, as lrintf */
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), rnd));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* undo the lane interleave */
        _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(q));
        _mm_storeu_si128((__m128i *)(dst + 32), _mm256_extracti128_si256(q, 1));
        int isum = _mm_cvtsi128_si32(s4);
#else
        float amax = 0.f;
        for (int j = 0; j < QK; j++) { float v = fabsf(xb[j]); amax = v > amax ? v : amax; }
        float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int isum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)lrintf(xb[j] * id);
            dst[(j >> 4) * 32 + (j & 15)] = (int8_t)q;
            isum += q;
        }
#endif
        dd[b] = d;
        ss[b] = d * (float)isum;
    }
}

static inline size_t row_bytes(int wtype, int nb) { return (size_t)nb * (wtype == LG_Q4_1 ? 20 : 34); }

/* ---- block dot products: one weight row against R activation rows ---------- */

#ifdef LG_AVX2
/* G float16 scales (lanes past G zeroed). A full 16-byte load stays inside the group
 * (20 G or 34 G bytes, G >= 2), and a masked load avoids a copy whose 16-byte reload would
 * miss store forwarding in every short last group. */
static inline __m256 load_f16(const uint16_t *p, int G) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    if (G < GROUP_BLOCKS)
        v = _mm_and_si128(v, _mm_cmpgt_epi16(_mm_set1_epi16((short)G), _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7)));
    return _mm256_cvtph_ps(v);
}

static inline __attribute__((always_inline)) void dot_row(const uint8_t *w, int wtype, const act_t *a,
                                                           int m0, int R, float *out) {
    const int nb = a->nb;
    const __m256i low = _mm256_set1_epi8(0x0f);
#ifndef LG_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 acc[4]; /* lanes are summed at the end, so the Q4_1 offset term can share them */
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += GROUP_BLOCKS) {
        const int G = nb - b0 < GROUP_BLOCKS ? nb - b0 : GROUP_BLOCKS;
        const uint16_t *d16 = (const uint16_t *)w;
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 128, _MM_HINT_T0);
        __m256 dw = load_f16(d16, G), prod[4];
        __m256 mw = wtype == LG_Q4_1 ? load_f16(d16 + G, G) : dw;
        for (int r = 0; r < R; r++) {
            size_t o = (size_t)(m0 + r) * a->stride + b0;
            prod[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(a->d + o));
            if (wtype == LG_Q4_1) acc[r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(a->s + o), acc[r]);
        }
        if (wtype == LG_Q4_1) {
            const uint8_t *qs = w + 4 * G;
            for (int p = 0; p < G / 2; p++) {
                MCA_BEGIN("q4_1_pair");
                __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
                __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                __m256i idx = _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1);
                for (int r = 0; r < R; r++) {
                    const int8_t *x = a->q + ((size_t)(m0 + r) * nb + b0 + 2 * p) * QK;
#ifdef LG_VNNI
                    __m256i s32 = LG_DPBUSD(LG_DPBUSD(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)x)),
                                            hi, _mm256_loadu_si256((const __m256i *)(x + 32)));
                    __m256 f = _mm256_cvtepi32_ps(s32);
#else
                    __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                                   _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
                    __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
#endif
                    acc[r] = _mm256_fmadd_ps(f, _mm256_permutevar8x32_ps(prod[r], idx), acc[r]);
                }
                MCA_END("q4_1_pair");
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
#ifdef LG_VNNI
                    __m256i s32 = LG_DPBUSD(LG_DPBUSD(_mm256_setzero_si256(), a1, x1), a2, x2);
#else
                    __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a1, x1), ones),
                                                   _mm256_madd_epi16(_mm256_maddubs_epi16(a2, x2), ones));
#endif
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_permutevar8x32_ps(prod[r], idx), acc[r]);
                }
            }
            w += 34 * G;
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}
#else
/* Portable C, one block at a time, for 8-bit (a->q) or 16-bit (a->q16) activation codes: the integer
 * sums are exact either way (int64: 32 products of 16-bit codes overflow nothing). */
static void dot_row_c(const uint8_t *w, int wtype, const act_t *a, int m0, int R, float *out, int bits) {
    const int nb = a->nb;
    for (int r = 0; r < R; r++) out[r] = 0.f;
    for (int b0 = 0; b0 < nb; b0 += GROUP_BLOCKS) {
        const int G = nb - b0 < GROUP_BLOCKS ? nb - b0 : GROUP_BLOCKS;
        const uint16_t *d16 = (const uint16_t *)w;
        for (int g = 0; g < G; g++) {
            int b = b0 + g;
            for (int r = 0; r < R; r++) {
                size_t xo = ((size_t)(m0 + r) * nb + (b & ~1)) * QK + (b & 1) * 16;
                size_t o = (size_t)(m0 + r) * a->stride + b;
                int64_t s = 0;
                for (int j = 0; j < QK; j++) {
                    size_t xj = xo + (j >> 4) * 32 + (j & 15);
                    int xv = bits == 16 ? a->q16[xj] : a->q[xj], wv;
                    if (wtype == LG_Q4_1) {
                        uint8_t byte = w[4 * G + 16 * g + (j & 15)];
                        wv = j < 16 ? (byte & 0x0f) : (byte >> 4);
                    } else {
                        wv = ((const int8_t *)w)[2 * G + (g & ~1) * QK + (j >> 4) * 32 + (g & 1) * 16 + (j & 15)];
                    }
                    s += (int64_t)wv * xv;
                }
                out[r] += h2f(d16[g]) * a->d[o] * (float)s + (wtype == LG_Q4_1 ? h2f(d16[G + g]) * a->s[o] : 0.f);
            }
        }
        w += (wtype == LG_Q4_1 ? 20 : 34) * G;
    }
}

static void dot_row(const uint8_t *w, int wtype, const act_t *a, int m0, int R, float *out) {
    dot_row_c(w, wtype, a, m0, R, out, 8);
}
#endif

/* ---- 16-bit activations (lg_set_activation_bits(16)) ----------------------------
 * The same blocks, with each activation block quantized to int16 (scale amax / 32767) instead of
 * int8: the dot products stay integer (madd_epi16: 16-bit weights x 16-bit activations, summed in
 * int32, exact), and the activations' rounding error falls 258x, which is what costs int8
 * activations their agreement with float32. Codes are kept in the same pair order. */
int lg_set_activation_bits(int bits) {
    if (bits != 8 && bits != 16) return -1;
    g_act_bits = bits;
    return 0;
}

int lg_activation_bits(void) { return g_act_bits; }

static void quantize_row16(const float *x, int k, const act_t *a, int m) {
    float *dd = a->d + (size_t)m * a->stride, *ss = a->s + (size_t)m * a->stride;
    int16_t *qq = a->q16 + (size_t)m * a->nb * QK;
    for (int b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        int16_t *dst = qq + (b & ~1) * QK + (b & 1) * 16; /* pair base, then this block's half */
        float amax = 0.f;
        for (int j = 0; j < QK; j++) { float v = fabsf(xb[j]); amax = v > amax ? v : amax; }
        float d = amax / 32767.f, id = d > 0.f ? 1.f / d : 0.f;
        int isum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)lrintf(xb[j] * id);
            dst[(j >> 4) * 32 + (j & 15)] = (int16_t)q;
            isum += q;
        }
        dd[b] = d;
        ss[b] = d * (float)isum;
    }
}

#ifdef LG_AVX2
static inline __attribute__((always_inline)) void dot_row16(const uint8_t *w, int wtype, const act_t *a,
                                                             int m0, int R, float *out) {
    const int nb = a->nb;
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < nb; b0 += GROUP_BLOCKS) {
        const int G = nb - b0 < GROUP_BLOCKS ? nb - b0 : GROUP_BLOCKS;
        const uint16_t *d16 = (const uint16_t *)w;
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH + 64, _MM_HINT_T0);
        __m256 dw = load_f16(d16, G), prod[4];
        __m256 mw = wtype == LG_Q4_1 ? load_f16(d16 + G, G) : dw;
        for (int r = 0; r < R; r++) {
            size_t o = (size_t)(m0 + r) * a->stride + b0;
            prod[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(a->d + o));
            if (wtype == LG_Q4_1) acc[r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(a->s + o), acc[r]);
        }
        const uint8_t *qs = w + (wtype == LG_Q4_1 ? 4 : 2) * G;
        for (int p = 0; p < G / 2; p++) {
            __m256i c0, c1; /* codes j < 16 of the pair's two blocks, then j >= 16 */
            if (wtype == LG_Q4_1) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
                c0 = _mm256_and_si256(raw, low);
                c1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            } else {
                c0 = _mm256_loadu_si256((const __m256i *)(qs + 64 * p));
                c1 = _mm256_loadu_si256((const __m256i *)(qs + 64 * p + 32));
            }
            /* 16-bit weights: [block 2p, j < 16], [2p+1, j < 16], [2p, j >= 16], [2p+1, j >= 16] */
            __m256i w0, w1, w2, w3;
            if (wtype == LG_Q4_1) {
                w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(c0));
                w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(c0, 1));
                w2 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(c1));
                w3 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(c1, 1));
            } else {
                w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(c0));
                w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(c0, 1));
                w2 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(c1));
                w3 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(c1, 1));
            }
            /* hadd leaves [2p, 2p, 2p+1, 2p+1] in each 128-bit lane */
            __m256i idx = _mm256_setr_epi32(2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1);
            for (int r = 0; r < R; r++) {
                const int16_t *x = a->q16 + ((size_t)(m0 + r) * nb + b0 + 2 * p) * QK;
                __m256i sa = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x)),
                                              _mm256_madd_epi16(w2, _mm256_loadu_si256((const __m256i *)(x + 32))));
                __m256i sb = _mm256_add_epi32(_mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + 16))),
                                              _mm256_madd_epi16(w3, _mm256_loadu_si256((const __m256i *)(x + 48))));
                __m256 f = _mm256_cvtepi32_ps(_mm256_hadd_epi32(sa, sb));
                acc[r] = _mm256_fmadd_ps(f, _mm256_permutevar8x32_ps(prod[r], idx), acc[r]);
            }
        }
        w += (wtype == LG_Q4_1 ? 20 : 34) * G;
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}
#else
static void dot_row16(const uint8_t *w, int wtype, const act_t *a, int m0, int R, float *out) {
    dot_row_c(w, wtype, a, m0, R, out, 16);
}
#endif

/* Row n of y = a . W^T for activation rows c0 .. c1 - 1 (AVX2/VNNI, or portable C), four at a time. */
static void gemm_rows(const act_t *a, const uint8_t *wr, int wtype, int n, const float *bias,
                      float *y, int ldy, int accumulate, int c0, int c1) {
    for (int m0 = c0; m0 < c1; m0 += 4) {
        float out[4];
        int R = c1 - m0 < 4 ? c1 - m0 : 4;
        if (a->bits == 16) {
            switch (R) {
            case 1: dot_row16(wr, wtype, a, m0, 1, out); break;
            case 2: dot_row16(wr, wtype, a, m0, 2, out); break;
            case 3: dot_row16(wr, wtype, a, m0, 3, out); break;
            default: dot_row16(wr, wtype, a, m0, 4, out); break;
            }
        } else {
            switch (R) {
            case 1: dot_row(wr, wtype, a, m0, 1, out); break;
            case 2: dot_row(wr, wtype, a, m0, 2, out); break;
            case 3: dot_row(wr, wtype, a, m0, 3, out); break;
            default: dot_row(wr, wtype, a, m0, 4, out); break;
            }
        }
        float b = bias ? bias[n] : 0.f;
        for (int r = 0; r < R; r++) {
            float *dst = y + (size_t)(m0 + r) * ldy + n;
            *dst = accumulate ? *dst + out[r] + b : out[r] + b;
        }
    }
}

#include "amx.h"

/* Rows of y[M, N] (leading dim ldy) = a[M, K] . W[N, K]^T (+ bias) (+= when accumulate).
 * Work-shared over weight rows: call inside a parallel region (or alone, serially). */
static void gemm_q(const act_t *a, int M, const void *W, int wtype, int N,
                   const float *bias, float *y, int ldy, int accumulate) {
    if (a->bt) { /* AMX tiles (amx.h): enough rows, 8-bit codes, tiles switched on */
        gemm_amx(a, M, W, wtype, N, bias, y, ldy, accumulate);
        return;
    }
    const size_t rb = row_bytes(wtype, a->nb);
    /* Activation rows in chunks that stay in L2 while each thread's weight rows pass over them
     * (all of a big prefill's rows would be re-read from memory for every weight row). The
     * static schedule gives a thread the same weight rows in every chunk, so no barrier between. */
    for (int c0 = 0; c0 < M; c0 += M_CHUNK) {
        const int c1 = M - c0 < M_CHUNK ? M : c0 + M_CHUNK;
#pragma omp for schedule(static) nowait
        for (int n = 0; n < N; n++)
            gemm_rows(a, (const uint8_t *)W + (size_t)n * rb, wtype, n, bias, y, ldy, accumulate, c0, c1);
    }
#pragma omp barrier
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

/* Min-heap of (value, index) keeping the k largest values seen. */
static void heap_push(float *hv, int64_t *hi, int *n, int k, float v, int64_t i) {
    if (*n < k) {
        int c = (*n)++;
        while (c > 0 && hv[(c - 1) / 2] > v) { hv[c] = hv[(c - 1) / 2]; hi[c] = hi[(c - 1) / 2]; c = (c - 1) / 2; }
        hv[c] = v; hi[c] = i;
        return;
    }
    if (v <= hv[0]) return;
    int c = 0; /* replace the root, sift down */
    for (;;) {
        int l = 2 * c + 1, r = l + 1, m = c;
        float mv = v;
        if (l < k && hv[l] < mv) { m = l; mv = hv[l]; }
        if (r < k && hv[r] < mv) { m = r; }
        if (m == c) break;
        hv[c] = hv[m]; hi[c] = hi[m]; c = m;
    }
    hv[c] = v; hi[c] = i;
}

/* Logits [M, V]: ranked by `rank` (any block table, e.g. a 4-bit copy), then the k best of each
 * row recomputed as exact float32 dots with the dequantized rows of `table`. */
int lg_logits(const void *rank, int rank_type, const void *table, int wtype, int K, int V,
              const float *h, int M, int k, float *out) {
    if (lg_gemm(h, M, K, rank, rank_type, V, NULL, out)) return -1;
    if (k > V) k = V;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        float *row = out + (size_t)m * V, *hv = malloc(sizeof(float) * k), *w = malloc(sizeof(float) * K);
        int64_t *hi = malloc(sizeof(int64_t) * k);
        int n = 0;
        for (int v = 0; v < V; v++) heap_push(hv, hi, &n, k, row[v], v);
        for (int j = 0; j < n; j++) {
            dequant_row(table, wtype, K, hi[j], w);
            row[hi[j]] = dot_f32(w, h + (size_t)m * K, K);
        }
        free(hv); free(hi); free(w);
    }
    return 0;
}

/* ---- the fused decode step ------------------------------------------------- */

typedef struct {
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm, *qkv_bias; /* q/k norm and bias may be NULL */
    const void *qkv, *o, *gate_up, *down;
    void *k_cache, *v_cache; /* [slots, kv_heads, head_dim] of lg_model.kv_type */
} lg_layer;

typedef struct {
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, inter, block_size, wtype, embed_type, vocab, max_pos;
    int kv_type; /* LG_KV_F32, LG_KV_F16 or LG_KV_BF16 */
    float eps, scale;
    const float *cos, *sin_signed; /* [max_pos, head_dim]: rope tables, rotate-half sign folded in */
    const void *embed;
    const float *final_norm;
    const lg_layer *layers;
} lg_model;

static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    float r = 1.f / sqrtf(dot_f32(x, x, n) / n + eps);
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

#ifdef LG_AVX2
/* e^x for x <= 0 (softmax after the max is taken out): Cephes' range reduction and degree-5
 * polynomial, within 2 ulp of expf; below -87.3 (e^x < 2^-126) it returns 0. */
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* Softmax of s[n], in place. */
static void softmax(float *s, int n) {
    float mx = -INFINITY, sum = 0.f;
    for (int i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    int t = 0;
#ifdef LG_AVX2
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; t < n; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }
    const float inv = 1.f / sum;
    for (int i = 0; i < n; i++) s[i] *= inv;
}

/* The g query heads q[g][d] that share KV head kv, over their sequence's paged context: each
 * K and V row is read once for all of them (grouped-query attention). scores: [g][ctx]. */
#ifndef KV_AHEAD
#define KV_AHEAD 8 /* tokens ahead whose K/V rows are prefetched (DRAM latency, not bandwidth) */
#endif

#ifdef LG_AVX2
/* Prefetch token t's row of KV head kv through the block table (consecutive blocks are seldom
 * adjacent in memory, so the next block's first rows need their own addresses). */
static inline void prefetch_kv(const void *cache, size_t esz, const int64_t *blocks, int bs, size_t row, int kv,
                               int d, int t) {
    const char *p = (const char *)cache + (((size_t)blocks[t / bs] * bs + t % bs) * row + (size_t)kv * d) * esz;
    for (size_t c = 0; c < d * esz; c += 64) _mm_prefetch(p + c, _MM_HINT_T0);
}
#endif

static void attend(const float *q, int g, const lg_model *md, const lg_layer *L, int kv, const int64_t *blocks,
                   int ctx, float *scores, float *out) {
    const int d = md->head_dim, kvh = md->n_kv_heads, bs = md->block_size, type = md->kv_type;
    const size_t row = (size_t)kvh * d; /* elements from one token's row to the next */
#ifdef LG_AVX2
    const size_t esz = type == LG_KV_F32 ? 4 : 2; /* bytes a value */
#endif
    for (int t0 = 0, blk = 0; t0 < ctx; t0 += bs, blk++) {
        const size_t base = ((size_t)blocks[blk] * bs * kvh + kv) * d; /* element offset of the block's first row */
        const int n = ctx - t0 < bs ? ctx - t0 : bs;
        for (int j = 0; j < n; j++) {
#ifdef LG_AVX2
            if (t0 + j + KV_AHEAD < ctx) prefetch_kv(L->k_cache, esz, blocks, bs, row, kv, d, t0 + j + KV_AHEAD);
#endif
            float *sc = scores + t0 + j;
            if (type == LG_KV_F32) {
                const float *kj = (const float *)L->k_cache + base + j * row;
                for (int h = 0; h < g; h++) sc[(size_t)h * ctx] = dot_f32(q + (size_t)h * d, kj, d) * md->scale;
            } else {
                const uint16_t *kj = (const uint16_t *)L->k_cache + base + j * row;
                for (int h = 0; h < g; h++) sc[(size_t)h * ctx] = dot_16(q + (size_t)h * d, kj, d, type) * md->scale;
            }
        }
    }
    for (int h = 0; h < g; h++) softmax(scores + (size_t)h * ctx, ctx);
    for (int i = 0; i < g * d; i++) out[i] = 0.f;
    for (int t0 = 0, blk = 0; t0 < ctx; t0 += bs, blk++) {
        const size_t base = ((size_t)blocks[blk] * bs * kvh + kv) * d;
        const int n = ctx - t0 < bs ? ctx - t0 : bs;
        for (int j = 0; j < n; j++) {
#ifdef LG_AVX2
            if (t0 + j + KV_AHEAD < ctx) prefetch_kv(L->v_cache, esz, blocks, bs, row, kv, d, t0 + j + KV_AHEAD);
#endif
            if (type == LG_KV_F32) {
                const float *vj = (const float *)L->v_cache + base + j * row;
                for (int h = 0; h < g; h++) {
                    const float p = scores[(size_t)h * ctx + t0 + j];
                    float *o = out + (size_t)h * d;
                    for (int i = 0; i < d; i++) o[i] += p * vj[i];
                }
            } else {
                const uint16_t *vj = (const uint16_t *)L->v_cache + base + j * row;
                for (int h = 0; h < g; h++) axpy_16(scores[(size_t)h * ctx + t0 + j], vj, d, type, out + (size_t)h * d);
            }
        }
    }
}

#ifdef LG_PROFILE
static double prof[8], prof_t;
#define PT(i) do { if (omp_get_thread_num() == 0) { double t_ = omp_get_wtime(); prof[i] += t_ - prof_t; prof_t = t_; } } while (0)
void lg_prof(double *out) { for (int i = 0; i < 8; i++) { out[i] = prof[i]; prof[i] = 0; } }
#else
#define PT(i) do { } while (0)
#endif

static inline float silu(float x) { return x / (1.f + expf(-x)); }

/* M rows, one token each: token ids, positions, KV slots, block tables [M, max_blocks] and
 * context lengths (= position + 1). Every row's K/V is written before any row attends, so
 * rows of one sequence's prefill chunk attend causally. Writes the final-normed hidden
 * states [M, hidden]. */
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
    if (md->kv_type < LG_KV_F32 || md->kv_type > LG_KV_BF16) return -3;
    const int kmax = (H > I ? H : I) > qs ? (H > I ? H : I) : qs;
    /* Attention work items: a row's query heads in their KV groups, unless that leaves too few
     * items to share among the threads (a single stream): then one head each. */
    const int gsz = M * nkv >= 4 * omp_get_max_threads() ? group : 1, per_row = nh / gsz;
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
        float *scores = malloc(sizeof(float) * gsz * (max_ctx > 0 ? max_ctx : 1));
#ifdef LG_PROFILE
        if (omp_get_thread_num() == 0) prof_t = omp_get_wtime();
#endif
        for (int l = 0; l < md->n_layers; l++) {
            const lg_layer *L = md->layers + l;
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                rms_norm(x + (size_t)m * H, L->attn_norm, H, md->eps, h + (size_t)m * H);
                quantize_row(h + (size_t)m * H, H, &aH, m);
            }
            PT(0);
            gemm_q(&aH, M, L->qkv, md->wtype, nqkv, L->qkv_bias, qkv, nqkv, 0);
            PT(1);
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                float *r = qkv + (size_t)m * nqkv;
                const float *c = md->cos + pos[m] * d, *s = md->sin_signed + pos[m] * d;
                for (int j = 0; j < nh + nkv; j++) {
                    float *v = r + j * d;
                    if (L->q_norm) rms_norm(v, j < nh ? L->q_norm : L->k_norm, d, md->eps, v);
                    rope(v, c, s, d);
                }
                kv_store(L->k_cache, md->kv_type, (size_t)slots[m] * kvs, r + qs, kvs);
                kv_store(L->v_cache, md->kv_type, (size_t)slots[m] * kvs, r + qs + kvs, kvs);
            }
            PT(2);
#pragma omp for schedule(static)
            for (int i = 0; i < M * per_row; i++) {
                int m = i / per_row, head = i % per_row * gsz;
                attend(qkv + (size_t)m * nqkv + head * d, gsz, md, L, head / group,
                       block_tables + (size_t)m * max_blocks, (int)ctx_lens[m], scores, att + (size_t)m * qs + head * d);
            }
            PT(7);
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) quantize_row(att + (size_t)m * qs, qs, &aQ, m);
            PT(3);
            gemm_q(&aQ, M, L->o, md->wtype, H, NULL, x, H, 1);
            PT(4);
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                rms_norm(x + (size_t)m * H, L->ffn_norm, H, md->eps, h + (size_t)m * H);
                quantize_row(h + (size_t)m * H, H, &aH, m);
            }
            PT(0);
            gemm_q(&aH, M, L->gate_up, md->wtype, 2 * I, NULL, gu, 2 * I, 0);
            PT(5);
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++) {
                const float *g = gu + (size_t)m * 2 * I, *u = g + I;
                float *a = act + (size_t)m * I;
                for (int j = 0; j < I; j++) a[j] = silu(g[j]) * u[j];
                quantize_row(a, I, &aI, m);
            }
            PT(0);
            gemm_q(&aI, M, L->down, md->wtype, H, NULL, x, H, 1);
            PT(6);
        }
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) rms_norm(x + (size_t)m * H, md->final_norm, H, md->eps, out + (size_t)m * H);
        free(scores);
    }
    free(x); free(h); free(qkv); free(att); free(gu); free(act); act_free(&aH);
    return 0;
}
