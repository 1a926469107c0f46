/* One pass over a (base, ablated) tensor pair for checks/pair_stats.py, built at install time as the
 * optional extension checks/_pair_kernels (setup.py) and loaded by checks/native.py with ctypes (the
 * torch path there is the fallback and the reference).
 *
 * The exported functions are compiled once per instruction set (GCC/Clang function multiversioning:
 * AVX-512, AVX2 and a baseline clone on x86-64), the loader picking the best the CPU has at run time,
 * so one build serves every machine; no -march=native. Contraction into FMA is off (setup.py), so
 * every clone rounds alike.
 *
 * A tensor is seen as [P, H, Q] with the residual axis H in the middle, stored as float32 (dt 0) or
 * bfloat16 (dt 1). Each element is loaded once, converted in registers, and every statistic of it is
 * taken at once: products with up to 4 direction rows for W and W', and the squared norms of W, W'
 * and D = W' - W. Torch needs a conversion, a subtraction, three dot products and two gemms, each a
 * pass over memory; this is the same arithmetic in one.
 *
 * Sums are kept in fixed lanes (16 per column for the residual axis last, one per column otherwise)
 * and reduced in a fixed order, so the results do not depend on the vector width the compiler picks.
 * No -ffast-math: the order of every sum is the one written here.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* Python imports nothing from this library (checks/native.py loads it with ctypes), but an extension
 * module must name an init function; this one refuses to be imported. */
void *PyInit__pair_kernels(void) { return 0; }

#define LANES 16
#define CB 768 /* columns per tile when the residual axis is not last (a whole row of most expert writers); its 11 accumulator rows (34 KB) stay in L1-L2 */
#define INLINE static inline __attribute__((always_inline))

INLINE float ld(const void *x, int64_t i, int dt) {
    if (dt == 0) return ((const float *)x)[i];
    uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One column (contiguous, H long, from element o) against JB (4 or 1) direction rows R0[k*H ..]:
 * res0/res1 = R . x0 / x1, and with SUMS s += |x0|^2, |x1|^2, |x1 - x0|^2. JB and SUMS are compile-time
 * constants at each call: a branch in the loop keeps compilers from vectorizing it without masked
 * stores (AVX2), and one direction need not pay for four. */
INLINE void col_block(const void *x0, const void *x1, int dt, int pair, const int JB, const int SUMS, int square, int64_t o,
                      int64_t H, const float *R0, float res0[4], float res1[4], double s[3]) {
    float p0[4][LANES] = {{0}}, p1[4][LANES] = {{0}}, q0[LANES] = {0}, q1[LANES] = {0}, qd[LANES] = {0};
    int64_t h = 0;
#define COL_STEP(l, i)                                                           \
    do {                                                                         \
        float v0 = ld(x0, o + (i), dt);                                          \
        if (square) v0 *= v0;                                                    \
        for (int k = 0; k < JB; k++) p0[k][l] += R0[k * H + (i)] * v0;           \
        if (pair) {                                                              \
            float v1 = ld(x1, o + (i), dt), d = v1 - v0;                         \
            for (int k = 0; k < JB; k++) p1[k][l] += R0[k * H + (i)] * v1;       \
            if (SUMS) {                                                          \
                q0[l] += v0 * v0;                                                \
                q1[l] += v1 * v1;                                                \
                qd[l] += d * d;                                                  \
            }                                                                    \
        }                                                                        \
    } while (0)
    for (; h + LANES <= H; h += LANES)
        for (int l = 0; l < LANES; l++) COL_STEP(l, h + l);
    for (int l = 0; h < H; h++, l++) COL_STEP(l, h); /* tail: fewer than LANES elements */
#undef COL_STEP
    for (int k = 0; k < JB; k++) {
        float t0 = 0, t1 = 0;
        for (int l = 0; l < LANES; l++) {
            t0 += p0[k][l];
            t1 += p1[k][l];
        }
        res0[k] = t0;
        res1[k] = t1;
    }
    if (SUMS)
        for (int l = 0; l < LANES; l++) {
            s[0] += q0[l];
            s[1] += q1[l];
            s[2] += qd[l];
        }
}

/* Residual axis last (Q = 1): column c is the contiguous vector x[c*H : (c+1)*H].
 * a0[j*P + c] = R_j . x0_c, a1 likewise for x1; sums[3c..3c+2] = |x0_c|^2, |x1_c|^2, |x1_c - x0_c|^2.
 * square: products of R with x0*x0 instead (rounding floors). m is 1 or a multiple of 4. */
INLINE void cols(const void *x0, const void *x1, int dt, int pair, int want_sums, int square, int64_t P, int64_t H,
                 const float *R, int64_t m, float *a0, float *a1, double *sums) {
#define BLOCK(JB, SUMS) col_block(x0, x1, dt, pair, JB, SUMS, square, c * H, H, R + jb * H, res0, res1, s)
    for (int64_t c = 0; c < P; c++) {
        for (int64_t jb = 0; jb < m; jb += 4) {
            float res0[4], res1[4];
            double s[3] = {0, 0, 0};
            if (want_sums && jb == 0) {
                if (m == 1) BLOCK(1, 1);
                else BLOCK(4, 1);
                sums[3 * c] += s[0];
                sums[3 * c + 1] += s[1];
                sums[3 * c + 2] += s[2];
            } else if (m == 1) BLOCK(1, 0);
            else BLOCK(4, 0);
            for (int k = 0; k < 4 && jb + k < m; k++) {
                a0[(jb + k) * P + c] += res0[k];
                if (pair) a1[(jb + k) * P + c] += res1[k];
            }
        }
    }
#undef BLOCK
}

/* NR rows h..h+NR-1 of one tile of n columns starting at element offset o (row stride Q), into the
 * tile's local accumulators (locals: the compiler knows they alias nothing and vectorizes). */
INLINE void tile_rows(const void *x0, const void *x1, int dt, int pair, const int do_sums, int square, const int NR, int64_t o, int64_t Q,
                      int64_t n, const float w[][4], float p0[4][CB], float p1[4][CB], float q0[CB], float q1[CB], float qd[CB]) {
    for (int64_t c = 0; c < n; c++) {
        float s0[4] = {p0[0][c], p0[1][c], p0[2][c], p0[3][c]}, s1[4] = {0}, u0 = 0, u1 = 0, ud = 0;
        if (pair) {
            for (int k = 0; k < 4; k++) s1[k] = p1[k][c];
            if (do_sums) u0 = q0[c], u1 = q1[c], ud = qd[c];
        }
        for (int r = 0; r < NR; r++) {
            float v0 = ld(x0, o + r * Q + c, dt);
            if (square) v0 *= v0;
            for (int k = 0; k < 4; k++) s0[k] += w[r][k] * v0;
            if (pair) {
                float v1 = ld(x1, o + r * Q + c, dt), d = v1 - v0;
                for (int k = 0; k < 4; k++) s1[k] += w[r][k] * v1;
                if (do_sums) {
                    u0 += v0 * v0;
                    u1 += v1 * v1;
                    ud += d * d;
                }
            }
        }
        for (int k = 0; k < 4; k++) p0[k][c] = s0[k];
        if (pair) {
            for (int k = 0; k < 4; k++) p1[k][c] = s1[k];
            if (do_sums) q0[c] = u0, q1[c] = u1, qd[c] = ud;
        }
    }
}

/* Residual axis not last (Q > 1): rows x[p, h, :] are contiguous; column (p, q) sums over h.
 * Tiles of CB columns, all H rows per tile (4 at a time), so the accumulators of a tile stay near the core.
 * a0[j*P*Q + p*Q + q]; sums[3p..3p+2] per p. */
INLINE void rows(const void *x0, const void *x1, int dt, int pair, int want_sums, int square, int64_t P, int64_t H, int64_t Q,
                 const float *R, int64_t m, float *a0, float *a1, double *sums) {
    const int64_t PQ = P * Q;
    float p0[4][CB], p1[4][CB], q0[CB], q1[CB], qd[CB], w[4][4];
    for (int64_t p = 0; p < P; p++) {
        const int64_t base = p * H * Q;
        double t0 = 0, t1 = 0, td = 0;
        for (int64_t c0 = 0; c0 < Q; c0 += CB) {
            const int64_t n = Q - c0 < CB ? Q - c0 : CB;
            for (int64_t jb = 0; jb < m; jb += 4) {
                const int do_sums = want_sums && jb == 0;
/* do_sums as a constant at each call: a branch in the loop keeps compilers from vectorizing it without masked stores (AVX2) */
#define TILE(NR)                                                                                                               \
    do {                                                                                                                       \
        if (do_sums) tile_rows(x0, x1, dt, pair, 1, square, NR, base + h * Q + c0, Q, n, (const float(*)[4])w, p0, p1, q0, q1, qd); \
        else tile_rows(x0, x1, dt, pair, 0, square, NR, base + h * Q + c0, Q, n, (const float(*)[4])w, p0, p1, q0, q1, qd);         \
    } while (0)
                memset(p0, 0, sizeof p0);
                memset(p1, 0, sizeof p1);
                memset(q0, 0, sizeof q0);
                memset(q1, 0, sizeof q1);
                memset(qd, 0, sizeof qd);
                int64_t h = 0;
                for (; h + 4 <= H; h += 4) {
                    for (int r = 0; r < 4; r++)
                        for (int k = 0; k < 4; k++) w[r][k] = jb + k < m ? R[(jb + k) * H + h + r] : 0.0f;
                    TILE(4);
                }
                for (; h < H; h++) {
                    for (int k = 0; k < 4; k++) w[0][k] = jb + k < m ? R[(jb + k) * H + h] : 0.0f;
                    TILE(1);
                }
                for (int k = 0; k < 4 && jb + k < m; k++) {
                    float *A0 = a0 + (jb + k) * PQ + p * Q + c0;
                    for (int64_t c = 0; c < n; c++) A0[c] += p0[k][c];
                    if (pair) {
                        float *A1 = a1 + (jb + k) * PQ + p * Q + c0;
                        for (int64_t c = 0; c < n; c++) A1[c] += p1[k][c];
                    }
                }
#undef TILE
                if (do_sums)
                    for (int64_t c = 0; c < n; c++) {
                        t0 += q0[c];
                        t1 += q1[c];
                        td += qd[c];
                    }
            }
        }
        if (want_sums) {
            sums[3 * p] += t0;
            sums[3 * p + 1] += t1;
            sums[3 * p + 2] += td;
        }
    }
}

INLINE void project_any(const void *x0, const void *x1, int dt, int want_sums, int square, int64_t P, int64_t H, int64_t Q,
                        const float *R, int64_t m, float *a0, float *a1, double *sums) {
    const int pair = x1 != 0;
    if (Q == 1) {
        if (pair) {
            if (want_sums) cols(x0, x1, dt, 1, 1, 0, P, H, R, m, a0, a1, sums);
            else cols(x0, x1, dt, 1, 0, 0, P, H, R, m, a0, a1, sums);
        } else if (square) cols(x0, 0, dt, 0, 0, 1, P, H, R, m, a0, a1, sums);
        else cols(x0, 0, dt, 0, 0, 0, P, H, R, m, a0, a1, sums);
    } else {
        if (pair) {
            if (want_sums) rows(x0, x1, dt, 1, 1, 0, P, H, Q, R, m, a0, a1, sums);
            else rows(x0, x1, dt, 1, 0, 0, P, H, Q, R, m, a0, a1, sums);
        } else if (square) rows(x0, 0, dt, 0, 0, 1, P, H, Q, R, m, a0, a1, sums);
        else rows(x0, 0, dt, 0, 0, 0, P, H, Q, R, m, a0, a1, sums);
    }
}

/* a0 (and a1 when x1 is given) += R @ x per column of the [H, P*Q] view, R [m, H] with m 1 or a multiple of 4;
 * sums (3 per column when Q = 1, else 3 per p; x1 needed) += |x0|^2, |x1|^2, |x1 - x0|^2 when sums is given;
 * square: R @ (x0 * x0) (x1 must be NULL). Returns 0, or -1 for arguments it cannot take. */
MULTIVERSION int pk_project(const void *x0, const void *x1, int dt, int64_t P, int64_t H, int64_t Q, const float *R, int64_t m,
               float *a0, float *a1, double *sums, int square) {
    if ((m != 1 && m % 4) || (dt != 0 && dt != 1) || (square && x1) || (sums && !x1)) return -1;
    if (dt == 0) project_any(x0, x1, 0, sums != 0, square, P, H, Q, R, m, a0, a1, sums);
    else project_any(x0, x1, 1, sums != 0, square, P, H, Q, R, m, a0, a1, sums);
    return 0;
}

INLINE void apply_d_any(const void *x0, const void *x1, int dt, int64_t P, int64_t H, int64_t Q, const float *t, float *z) {
    if (Q == 1) { /* z += t_c (x1_c - x0_c) for each contiguous column c */
        for (int64_t c = 0; c < P; c++) {
            const float tc = t[c];
            if (tc == 0) continue;
            const int64_t o = c * H;
            for (int64_t h = 0; h < H; h++) z[h] += tc * (ld(x1, o + h, dt) - ld(x0, o + h, dt));
        }
        return;
    }
    for (int64_t p = 0; p < P; p++) { /* z_h += (x1 - x0)[p, h, :] . t[p, :] */
        const float *tp = t + p * Q;
        for (int64_t h = 0; h < H; h++) {
            const int64_t o = (p * H + h) * Q;
            float acc[LANES] = {0};
            int64_t c = 0;
            for (; c + LANES <= Q; c += LANES)
                for (int l = 0; l < LANES; l++) acc[l] += (ld(x1, o + c + l, dt) - ld(x0, o + c + l, dt)) * tp[c + l];
            for (int l = 0; c < Q; c++, l++) acc[l] += (ld(x1, o + c, dt) - ld(x0, o + c, dt)) * tp[c];
            float s = 0;
            for (int l = 0; l < LANES; l++) s += acc[l];
            z[h] += s;
        }
    }
}

/* z [H] += D t, D = x1 - x0 as the [H, P*Q] matrix, t [P*Q]: one exact power step's second half. */
MULTIVERSION int pk_apply_d(const void *x0, const void *x1, int dt, int64_t P, int64_t H, int64_t Q, const float *t, float *z) {
    if (dt == 0) apply_d_any(x0, x1, 0, P, H, Q, t, z);
    else if (dt == 1) apply_d_any(x0, x1, 1, P, H, Q, t, z);
    else return -1;
    return 0;
}

/* out[0..2] += |x0|^2, |x1|^2, |x1 - x0|^2 over n elements (a pair with no direction to project on). */
MULTIVERSION int pk_sums(const void *x0, const void *x1, int dt, int64_t n, double *out) {
    if (dt != 0 && dt != 1) return -1;
    float q0[LANES] = {0}, q1[LANES] = {0}, qd[LANES] = {0};
    int64_t i = 0;
#define SUMS_BODY(DT)                                                  \
    for (; i + LANES <= n; i += LANES)                                 \
        for (int l = 0; l < LANES; l++) {                              \
            float v0 = ld(x0, i + l, DT), v1 = ld(x1, i + l, DT), d = v1 - v0; \
            q0[l] += v0 * v0;                                          \
            q1[l] += v1 * v1;                                          \
            qd[l] += d * d;                                            \
        }
    if (dt == 0) { SUMS_BODY(0) } else { SUMS_BODY(1) }
#undef SUMS_BODY
    for (int l = 0; i < n; i++, l++) {
        float v0 = ld(x0, i, dt), v1 = ld(x1, i, dt), d = v1 - v0;
        q0[l] += v0 * v0;
        q1[l] += v1 * v1;
        qd[l] += d * d;
    }
    for (int l = 0; l < LANES; l++) {
        out[0] += q0[l];
        out[1] += q1[l];
        out[2] += qd[l];
    }
    return 0;
}

/* out[i] = lut[codes[i]] over n one-byte codes: a quantized tensor's values (or rounding variances) by table, the
 * 256-entry table in L1 (audit/quant.py; torch's float8 cast and index_select take 10 and 3 ns an element). */
MULTIVERSION int pk_lut_u8(const uint8_t *codes, const float *lut, int64_t n, float *out) {
    if (n < 0) return -1;
    for (int64_t i = 0; i < n; i++) out[i] = lut[codes[i]];
    return 0;
}
