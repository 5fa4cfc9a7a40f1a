/* AMX-INT8 block matmuls (Intel Sapphire Rapids and later): included by cpu_decode.c.
 *
 * A tile dot product multiplies 16 weight rows by 16 activation rows over one 32-weight block
 * (TDPBUSD: Q4_1 nibbles as u8 against s8 codes; TDPBSSD: Q8_0 codes, s8 x s8), giving the block's
 * 256 int32 sums at once: the same integers the AVX2 kernels compute one row pair at a time. Each
 * block carries its own float scales, so the sums of up to AMX_CHUNK blocks are stored and then
 * scaled into float accumulators with AVX2 (w * d_w * d_a, plus m_w * s_a for Q4_1), in another
 * order than the AVX2 kernels' lanes: answers agree to float rounding, not bit for bit.
 *
 * Layout: an A tile is 16 weight rows x 32 bytes (one block, unpacked to a byte per weight, in
 * the order j = 0..31); a B tile is the matching 16 activation rows' 32 codes in the VNNI order
 * the instruction wants (8 rows of 64 bytes: row k holds codes 4k..4k+3 of each activation row).
 * Activations are repacked once per matmul (amx_pack); each thread unpacks its 16 weight rows
 * once and runs them against every 16 activation rows.
 *
 * Chosen at build time by -march=native on a CPU reporting amx_tile and amx_int8, and switched on
 * at load (lg_amx_init) only if Linux grants the tile state (arch_prctl) and a small matmul agrees
 * with the AVX2 kernels (build.py). LG_AMX_EMULATE builds the same code with the tile
 * instructions done in C, so machines without AMX test everything but the instructions. */

#if defined(LG_AVX2) && ((defined(__AMX_TILE__) && defined(__AMX_INT8__)) || defined(LG_AMX_EMULATE))
#define LG_AMX 1
#define AMX_MIN_ROWS 16 /* activation rows from which a matmul takes the tiles (one full B tile) */
#define AMX_CHUNK 32    /* blocks whose int32 sums are stored before their scales are applied */

static int g_amx = 0; /* tiles granted and the self-check passed (build.py turns it on) */
static long g_amx_calls = 0; /* matmuls run on the tiles (tests and benchmarks check the path ran) */

#ifdef LG_AMX_EMULATE
/* The tile instructions in C, one thread's tile registers each: what the tests on CPUs without
 * AMX run (the semantics of Intel's TILELOADD, TILESTORED, TILEZERO, TDPBUSD and TDPBSSD). */
typedef struct { int rows, colsb; uint8_t b[16][64]; } emu_tile;
static __thread emu_tile emu_t[8];

static void emu_load(int t, const void *p, int stride) {
    for (int r = 0; r < emu_t[t].rows; r++) memcpy(emu_t[t].b[r], (const uint8_t *)p + (size_t)r * stride, emu_t[t].colsb);
}
static void emu_store(int t, void *p, int stride) {
    for (int r = 0; r < emu_t[t].rows; r++) memcpy((uint8_t *)p + (size_t)r * stride, emu_t[t].b[r], emu_t[t].colsb);
}
static void emu_zero(int t) { memset(emu_t[t].b, 0, sizeof(emu_t[t].b)); }
static void emu_dp(int c, int a, int b, int a_signed) {
    for (int m = 0; m < emu_t[c].rows; m++)
        for (int n = 0; n < emu_t[c].colsb / 4; n++) {
            int32_t s;
            memcpy(&s, emu_t[c].b[m] + 4 * n, 4);
            for (int k = 0; k < emu_t[a].colsb / 4; k++)
                for (int i = 0; i < 4; i++) {
                    const int x = a_signed ? (int8_t)emu_t[a].b[m][4 * k + i] : emu_t[a].b[m][4 * k + i];
                    s += x * (int8_t)emu_t[b].b[k][4 * n + i];
                }
            memcpy(emu_t[c].b[m] + 4 * n, &s, 4);
        }
}
#define T_LOAD(t, p, s) emu_load(t, p, s)
#define T_STORE(t, p, s) emu_store(t, p, s)
#define T_ZERO(t) emu_zero(t)
#define T_DPBUSD(c, a, b) emu_dp(c, a, b, 0)
#define T_DPBSSD(c, a, b) emu_dp(c, a, b, 1)
#define AMX_KIND 2
#else
#include <sys/syscall.h>
#include <unistd.h>
#define T_LOAD(t, p, s) _tile_loadd(t, p, s)
#define T_STORE(t, p, s) _tile_stored(t, p, s)
#define T_ZERO(t) _tile_zero(t)
#define T_DPBUSD(c, a, b) _tile_dpbusd(c, a, b)
#define T_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)
#define AMX_KIND 1
#endif

/* Tile 0: C, 16 x 16 int32; tile 1: A, 16 weight rows x 32 bytes; tile 2: B, 8 x 64 bytes. */
typedef struct __attribute__((aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg;

static void amx_config(void) {
    amx_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = 16; cfg.colsb[0] = 64;
    cfg.rows[1] = 16; cfg.colsb[1] = 32;
    cfg.rows[2] = 8;  cfg.colsb[2] = 64;
#ifdef LG_AMX_EMULATE
    for (int t = 0; t < 3; t++) { emu_t[t].rows = cfg.rows[t]; emu_t[t].colsb = cfg.colsb[t]; }
#else
    _tile_loadconfig(&cfg);
#endif
}

static void amx_release(void) {
#ifndef LG_AMX_EMULATE
    _tile_release(); /* the OS need not save the tile state of an idle thread */
#endif
}

static int amx_rows(int M, int bits) { return g_amx && bits == 8 && M >= AMX_MIN_ROWS; }

/* Each thread's unpacked weight rows (kept between calls: OpenMP's threads persist). */
typedef struct {
    uint8_t *a;     /* [nb][16][32]: A tiles */
    float *dw, *mw; /* [nb][16]: the rows' block scales and Q4_1 offsets */
    int32_t *c;     /* [AMX_CHUNK][16][16]: int32 sums awaiting their scales */
    int nb;
} amx_buf;
static __thread amx_buf g_ab;

static amx_buf *amx_thread_buf(int nb) {
    if (g_ab.nb >= nb) return &g_ab;
    free(g_ab.a); free(g_ab.dw); free(g_ab.mw); free(g_ab.c);
    g_ab.a = aligned_alloc(64, (size_t)nb * 512);
    g_ab.dw = malloc((size_t)nb * 16 * sizeof(float));
    g_ab.mw = malloc((size_t)nb * 16 * sizeof(float));
    g_ab.c = aligned_alloc(64, (size_t)AMX_CHUNK * 1024);
    g_ab.nb = g_ab.a && g_ab.dw && g_ab.mw && g_ab.c ? nb : 0;
    return g_ab.nb ? &g_ab : NULL;
}

/* Activation rows as B tiles, with their scales per block for each 16 rows (rows past M zero). */
static void amx_pack(const act_t *a, int M) {
    const int nb = a->nb, tiles = (M + 15) / 16;
#pragma omp for schedule(static)
    for (int tb = 0; tb < tiles * nb; tb++) {
        const int t = tb / nb, b = tb % nb;
        uint8_t *dst = (uint8_t *)a->bt + (size_t)tb * 512;
        float *dT = a->dT + (size_t)tb * 16, *sT = a->sT + (size_t)tb * 16;
        for (int n = 0; n < 16; n++) {
            const int m = t * 16 + n;
            if (m >= M) {
                for (int k = 0; k < 8; k++) memset(dst + k * 64 + 4 * n, 0, 4);
                dT[n] = sT[n] = 0.f;
                continue;
            }
            const int8_t *src = a->q + ((size_t)m * nb + (b & ~1)) * QK + (b & 1) * 16; /* pair order */
            for (int k = 0; k < 8; k++) memcpy(dst + k * 64 + 4 * n, src + (k < 4 ? 4 * k : 32 + 4 * (k - 4)), 4);
            dT[n] = a->d[(size_t)m * a->stride + b];
            sT[n] = a->s[(size_t)m * a->stride + b];
        }
    }
}

/* Weight rows n0 .. n0 + rows - 1 as A tiles (a byte per weight, j = 0..31), zero past them. */
static void amx_unpack(const void *W, int wtype, int nb, int n0, int rows, amx_buf *B) {
    const size_t rb = row_bytes(wtype, nb);
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int r = 0; r < 16; r++) {
        if (r >= rows) {
            for (int b = 0; b < nb; b++) {
                memset(B->a + (size_t)b * 512 + r * 32, 0, 32);
                B->dw[b * 16 + r] = B->mw[b * 16 + r] = 0.f;
            }
            continue;
        }
        const uint8_t *w = (const uint8_t *)W + (size_t)(n0 + r) * rb;
        for (int b0 = 0; b0 < nb; b0 += GROUP_BLOCKS) {
            const int G = nb - b0 < GROUP_BLOCKS ? nb - b0 : GROUP_BLOCKS;
            const uint16_t *d16 = (const uint16_t *)w;
            for (int g = 0; g < G; g++) {
                const int b = b0 + g;
                uint8_t *dst = B->a + (size_t)b * 512 + r * 32;
                B->dw[b * 16 + r] = h2f(d16[g]);
                if (wtype == LG_Q4_1) {
                    B->mw[b * 16 + r] = h2f(d16[G + g]);
                    const __m128i q = _mm_loadu_si128((const __m128i *)(w + 4 * G + 16 * g));
                    _mm_storeu_si128((__m128i *)dst, _mm_and_si128(q, low));
                    _mm_storeu_si128((__m128i *)(dst + 16), _mm_and_si128(_mm_srli_epi16(q, 4), low));
                } else {
                    B->mw[b * 16 + r] = 0.f;
                    const uint8_t *qs = w + 2 * G + (g & ~1) * QK + (g & 1) * 16;
                    memcpy(dst, qs, 16);
                    memcpy(dst + 16, qs + 32, 16);
                }
            }
            w += (wtype == LG_Q4_1 ? 20 : 34) * G;
        }
    }
}

/* acc[r][n] += sum over blocks c0..c1 of sum[b][r][n] * d_w[b][r] * d_a[b][n] (+ m_w[b][r] * s_a[b][n]).
 * Two weight rows at a time: eight independent FMA chains hide their latency. */
static void amx_scale(const act_t *a, int t, const amx_buf *B, int wtype, int c0, int c1, float acc[16][16]) {
    const float *dT = a->dT + (size_t)t * a->nb * 16, *sT = a->sT + (size_t)t * a->nb * 16;
    for (int r = 0; r < 16; r += 2) {
        __m256 x0 = _mm256_loadu_ps(acc[r]), x1 = _mm256_loadu_ps(acc[r] + 8);
        __m256 y0 = _mm256_loadu_ps(acc[r + 1]), y1 = _mm256_loadu_ps(acc[r + 1] + 8);
        __m256 ox0 = _mm256_setzero_ps(), ox1 = ox0, oy0 = ox0, oy1 = ox0;
        for (int b = c0; b < c1; b++) {
            MCA_BEGIN("amx_scale");
            const int32_t *c = B->c + (size_t)(b - c0) * 256 + r * 16;
            const __m256 d0 = _mm256_loadu_ps(dT + b * 16), d1 = _mm256_loadu_ps(dT + b * 16 + 8);
            const __m256 wx = _mm256_broadcast_ss(B->dw + b * 16 + r), wy = _mm256_broadcast_ss(B->dw + b * 16 + r + 1);
            x0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256((const __m256i *)c)), d0), wx, x0);
            x1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256((const __m256i *)(c + 8))), d1), wx, x1);
            y0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256((const __m256i *)(c + 16))), d0), wy, y0);
            y1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256((const __m256i *)(c + 24))), d1), wy, y1);
            if (wtype == LG_Q4_1) {
                const __m256 s0 = _mm256_loadu_ps(sT + b * 16), s1 = _mm256_loadu_ps(sT + b * 16 + 8);
                const __m256 mx = _mm256_broadcast_ss(B->mw + b * 16 + r), my = _mm256_broadcast_ss(B->mw + b * 16 + r + 1);
                ox0 = _mm256_fmadd_ps(mx, s0, ox0);
                ox1 = _mm256_fmadd_ps(mx, s1, ox1);
                oy0 = _mm256_fmadd_ps(my, s0, oy0);
                oy1 = _mm256_fmadd_ps(my, s1, oy1);
            }
            MCA_END("amx_scale");
        }
        _mm256_storeu_ps(acc[r], _mm256_add_ps(x0, ox0));
        _mm256_storeu_ps(acc[r] + 8, _mm256_add_ps(x1, ox1));
        _mm256_storeu_ps(acc[r + 1], _mm256_add_ps(y0, oy0));
        _mm256_storeu_ps(acc[r + 1] + 8, _mm256_add_ps(y1, oy1));
    }
}

/* gemm_q on the tiles: the same contract (work-shared over weight rows, inside a parallel region). */
static void gemm_amx(const act_t *a, int M, const void *W, int wtype, int N, const float *bias, float *y,
                     int ldy, int accumulate) {
    const int nb = a->nb, tiles = (M + 15) / 16, stripes = (N + 15) / 16;
    if (omp_get_thread_num() == 0) g_amx_calls++;
    amx_pack(a, M); /* ends in a barrier: every thread's tiles are packed */
    amx_buf *B = amx_thread_buf(nb);
    if (B) amx_config();
#pragma omp for schedule(static) nowait
    for (int s = 0; s < stripes; s++) {
        const int n0 = s * 16, rows = N - n0 < 16 ? N - n0 : 16;
        if (!B) { /* no memory for this thread's tiles: its rows on the AVX2 kernels */
            for (int r = 0; r < rows; r++)
                gemm_rows(a, (const uint8_t *)W + (size_t)(n0 + r) * row_bytes(wtype, nb), wtype, n0 + r, bias,
                          y, ldy, accumulate, 0, M);
            continue;
        }
        amx_unpack(W, wtype, nb, n0, rows, B);
        for (int t = 0; t < tiles; t++) {
            float acc[16][16] __attribute__((aligned(32)));
            memset(acc, 0, sizeof acc);
            for (int c0 = 0; c0 < nb; c0 += AMX_CHUNK) {
                const int c1 = nb - c0 < AMX_CHUNK ? nb : c0 + AMX_CHUNK;
                for (int b = c0; b < c1; b++) {
                    MCA_BEGIN("amx_tiles");
                    T_ZERO(0);
                    T_LOAD(1, B->a + (size_t)b * 512, 32);
                    T_LOAD(2, a->bt + ((size_t)t * nb + b) * 512, 64);
                    if (wtype == LG_Q4_1) T_DPBUSD(0, 1, 2);
                    else T_DPBSSD(0, 1, 2);
                    T_STORE(0, B->c + (size_t)(b - c0) * 256, 64);
                    MCA_END("amx_tiles");
                }
                amx_scale(a, t, B, wtype, c0, c1, acc);
            }
            const int cols = M - t * 16 < 16 ? M - t * 16 : 16;
            for (int r = 0; r < rows; r++) {
                const float bv = bias ? bias[n0 + r] : 0.f;
                for (int n = 0; n < cols; n++) {
                    float *dst = y + (size_t)(t * 16 + n) * ldy + n0 + r;
                    *dst = accumulate ? *dst + acc[r][n] + bv : acc[r][n] + bv;
                }
            }
        }
    }
    if (B) amx_release();
#pragma omp barrier
}

int lg_amx(void) { return AMX_KIND; }

/* Ask Linux for the tile state (a process-wide grant, needed once before any thread uses the
 * tiles); 0 when granted. The caller switches the tiles on after its self-check (lg_set_amx). */
int lg_amx_init(void) {
#ifdef LG_AMX_EMULATE
    return 0;
#else
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) ? -1 : 0;
#endif
}

#else /* no AMX in this build */
static int amx_rows(int M, int bits) { (void)M; (void)bits; return 0; }
static int g_amx = 0;
static long g_amx_calls = 0;
static void gemm_amx(const act_t *a, int M, const void *W, int wtype, int N, const float *bias, float *y,
                     int ldy, int accumulate) {
    (void)a; (void)M; (void)W; (void)wtype; (void)N; (void)bias; (void)y; (void)ldy; (void)accumulate;
}
int lg_amx(void) { return 0; }
int lg_amx_init(void) { return -1; }
#endif

int lg_amx_on(void) { return g_amx; }
long lg_amx_calls(void) { return g_amx_calls; }

/* Tiles on (1) or off (0) for the matmuls that follow; returns the previous setting, or -1 where
 * this build has no tiles. Call between steps, not during one. */
int lg_set_amx(int on) {
    if (!lg_amx()) return -1;
    const int was = g_amx;
    g_amx = on ? 1 : 0;
    return was;
}
