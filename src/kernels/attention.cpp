// Causal grouped-query attention, blockwise (FlashAttention-2 schedule on CPU).
//
// Forward: one task per (batch, query head, query block). Scores for one key block at a time
// go into a small [BQ, BK] tile; an online softmax (running max m, running sum l) rescales
// the output accumulator, so no Lq x Lk matrix ever exists. Saves lse = m + log(l).
//
// Backward: one task per (batch, kv head). The task owns every query head of its group, so it
// can accumulate dq, dk and dv without races or per-thread copies: for each key block it
// recomputes P = exp(S - lse) for every query block that sees it, and forms
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dK += scale dS^T Q,  dQ += scale dS K,
// with D_i = rowsum(dO_i * O_i) computed once up front.
//
// All tile products go through one register-blocked microkernel, mm() below.
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "kernels/ops.h"
#include "kernels/simd.h"

namespace dlcm::ops {

namespace {

constexpr i64 BQ = 64;  // query rows per tile
constexpr i64 BK = 64;  // keys per tile

// C[M,N] = (acc ? C : 0) + alpha * A(M,K) B[K,N].
// A(r,k) = A[r*rsa + k*csa] (any strides: lets P^T and dS^T be read without a transpose);
// row k of B starts at B + k*ldb and is contiguous; rows of C are ldc apart.
#ifdef DLCM_AVX512
template <int MR, int NV>
void mm_tile(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 K,
             __mmask16 last, float alpha, bool acc) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = _mm512_setzero_ps();
  for (i64 k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    __m512 bv[NV];
    for (int v = 0; v < NV - 1; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
    bv[NV - 1] = _mm512_maskz_loadu_ps(last, b + 16 * (NV - 1));
    const float* a = A + k * csa;
    for (int r = 0; r < MR; ++r) {
      __m512 av = _mm512_set1_ps(a[r * rsa]);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(av, bv[v], c[r][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  for (int r = 0; r < MR; ++r) {
    float* cr = C + r * ldc;
    for (int v = 0; v < NV; ++v) {
      __mmask16 m = (v == NV - 1) ? last : __mmask16(0xFFFF);
      __m512 x = _mm512_mul_ps(c[r][v], al);
      if (acc) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, cr + 16 * v));
      _mm512_mask_storeu_ps(cr + 16 * v, m, x);
    }
  }
}

using TileFn = void (*)(float*, i64, const float*, i64, i64, const float*, i64, i64, __mmask16,
                        float, bool);
constexpr int MR = 4;
const TileFn kTiles[MR][4] = {
    {mm_tile<1, 1>, mm_tile<1, 2>, mm_tile<1, 3>, mm_tile<1, 4>},
    {mm_tile<2, 1>, mm_tile<2, 2>, mm_tile<2, 3>, mm_tile<2, 4>},
    {mm_tile<3, 1>, mm_tile<3, 2>, mm_tile<3, 3>, mm_tile<3, 4>},
    {mm_tile<4, 1>, mm_tile<4, 2>, mm_tile<4, 3>, mm_tile<4, 4>},
};

void mm(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 M,
        i64 N, i64 K, float alpha, bool acc) {
  for (i64 j0 = 0; j0 < N; j0 += 64) {
    i64 nj = std::min<i64>(64, N - j0);
    int nv = int((nj + 15) / 16);
    __mmask16 last = simd::tail_mask(nj - 16 * (nv - 1));
    for (i64 i0 = 0; i0 < M; i0 += MR) {
      int mr = int(std::min<i64>(MR, M - i0));
      kTiles[mr - 1][nv - 1](C + i0 * ldc + j0, ldc, A + i0 * rsa, rsa, csa, B + j0, ldb, K,
                             last, alpha, acc);
    }
  }
}
#else
void mm(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 M,
        i64 N, i64 K, float alpha, bool acc) {
  for (i64 i = 0; i < M; ++i) {
    float* cr = C + i * ldc;
    float tmp[64];
    for (i64 j0 = 0; j0 < N; j0 += 64) {
      i64 nj = std::min<i64>(64, N - j0);
      std::fill(tmp, tmp + nj, 0.0f);
      for (i64 k = 0; k < K; ++k) {
        float a = A[i * rsa + k * csa];
        const float* b = B + k * ldb + j0;
        for (i64 j = 0; j < nj; ++j) tmp[j] += a * b[j];
      }
      for (i64 j = 0; j < nj; ++j) cr[j0 + j] = (acc ? cr[j0 + j] : 0.0f) + alpha * tmp[j];
    }
  }
}
#endif

// dst[c*BK + j] = src[j*ld + c] for j < nk, c < hd: a key (or value) block, transposed so
// that it can be the contiguous B operand of mm().
void pack_t(float* dst, const float* src, i64 ld, i64 nk, i64 hd) {
  for (i64 j = 0; j < nk; ++j) {
    const float* s = src + j * ld;
    for (i64 c = 0; c < hd; ++c) dst[c * BK + j] = s[c];
  }
}

// Keys visible to query row r of a tile: absolute query position qpos sees keys <= qpos.
inline i64 n_visible(i64 qpos, i64 j0, i64 nk) { return std::clamp<i64>(qpos + 1 - j0, 0, nk); }

void check_shapes(const char* who, i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset) {
  DLCM_CHECK(B >= 0 && Lq >= 0 && hd >= 1, who, ": bad shape B=", B, " Lq=", Lq, " hd=", hd);
  DLCM_CHECK(Lk >= 1, who, ": need at least one key, got Lk=", Lk);
  DLCM_CHECK(Hkv >= 1 && Hq % Hkv == 0, who, ": n_kv_heads (", Hkv,
             ") must divide n_heads (", Hq, ")");
  DLCM_CHECK(q_offset >= 0, who, ": q_offset must be >= 0, got ", q_offset);
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset,
                       float scale) {
  check_shapes("attention_forward", B, Lq, Lk, Hq, Hkv, hd, q_offset);
  const i64 group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const i64 nqb = (Lq + BQ - 1) / BQ;
  const i64 ntask = B * Hq * nqb;
  const bool par = B * Hq * Lq * std::min(Lk, q_offset + Lq) * hd > (1 << 16);
#pragma omp parallel if (par)
  {
    Buf kt(size_t(hd) * BK), s(size_t(BQ) * BK), o(size_t(BQ) * hd);
    float m[BQ], l[BQ];
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < ntask; ++t) {
      // Heaviest (last) query blocks first, so that dynamic scheduling balances the tail.
      const i64 qb = nqb - 1 - t % nqb, h = (t / nqb) % Hq, b = t / (nqb * Hq);
      const i64 g = h / group;
      const i64 i0 = qb * BQ, mq = std::min(BQ, Lq - i0);
      const float* qp = q + ((b * Lq + i0) * Hq + h) * hd;
      const float* kp = k + (b * Lk * Hkv + g) * hd;
      const float* vp = v + (b * Lk * Hkv + g) * hd;
      const i64 jend = std::min(Lk, q_offset + i0 + mq);  // keys seen by the tile's last row
      std::fill(m, m + mq, -INFINITY);
      std::fill(l, l + mq, 0.0f);
      std::fill(o.begin(), o.begin() + mq * hd, 0.0f);
      for (i64 j0 = 0; j0 < jend; j0 += BK) {
        const i64 nk = std::min(BK, jend - j0);
        pack_t(kt.data(), kp + j0 * ldk, ldk, nk, hd);
        mm(s.data(), BK, qp, ldq, 1, kt.data(), BK, mq, nk, hd, scale, false);  // S [mq, nk]
        for (i64 r = 0; r < mq; ++r) {
          float* row = s.data() + r * BK;
          for (i64 j = n_visible(q_offset + i0 + r, j0, nk); j < nk; ++j) row[j] = -INFINITY;
          // Block 0 always holds key 0, visible to every query, so m is finite from then on.
          const float mnew = std::max(m[r], simd::hmax(row, nk));
          const float corr = std::exp(m[r] - mnew);  // 0 on the first block
          l[r] = float(l[r] * corr + simd::exp_sub_sum(row, nk, mnew));
          m[r] = mnew;
          if (corr != 1.0f) {
            float* orow = o.data() + r * hd;
#pragma omp simd
            for (i64 c = 0; c < hd; ++c) orow[c] *= corr;
          }
        }
        mm(o.data(), hd, s.data(), BK, 1, vp + j0 * ldk, ldk, mq, hd, nk, 1.0f, true);  // O += P V
      }
      for (i64 r = 0; r < mq; ++r) {
        const float inv = 1.0f / l[r];
        float* dst = out + ((b * Lq + i0 + r) * Hq + h) * hd;
        const float* orow = o.data() + r * hd;
#pragma omp simd
        for (i64 c = 0; c < hd; ++c) dst[c] = orow[c] * inv;
        lse[(b * Hq + h) * Lq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  }
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v, i64 B,
                        i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale) {
  check_shapes("attention_backward", B, Lq, Lk, Hq, Hkv, hd, q_offset);
  const i64 group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const bool par = B * Hq * Lq * std::min(Lk, q_offset + Lq) * hd > (1 << 16);

  // D[b, h, i] = dO_i . O_i  (the softmax Jacobian's row term), same layout as lse.
  Buf D(size_t(B * Hq * Lq));
#pragma omp parallel for schedule(static) if (par)
  for (i64 row = 0; row < B * Lq * Hq; ++row) {
    const i64 h = row % Hq, i = (row / Hq) % Lq, b = row / (Hq * Lq);
    const float* a = dout + row * hd;
    const float* o = out + row * hd;
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (i64 c = 0; c < hd; ++c) s += a[c] * o[c];
    D[(b * Hq + h) * Lq + i] = s;
  }

#pragma omp parallel if (par)
  {
    Buf kt(size_t(hd) * BK), vt(size_t(hd) * BK), p(size_t(BQ) * BK), ds(size_t(BQ) * BK);
    Buf dka(size_t(BK) * hd), dva(size_t(BK) * hd);
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < B * Hkv; ++t) {
      const i64 b = t / Hkv, g = t % Hkv;
      const float* kp = k + (b * Lk * Hkv + g) * hd;
      const float* vp = v + (b * Lk * Hkv + g) * hd;
      // Only keys some query can see: j < q_offset + Lq.
      const i64 jend = std::min(Lk, q_offset + Lq);
      for (i64 j0 = 0; j0 < jend; j0 += BK) {
        const i64 nk = std::min(BK, jend - j0);
        pack_t(kt.data(), kp + j0 * ldk, ldk, nk, hd);
        pack_t(vt.data(), vp + j0 * ldk, ldk, nk, hd);
        std::fill(dka.begin(), dka.begin() + nk * hd, 0.0f);
        std::fill(dva.begin(), dva.begin() + nk * hd, 0.0f);
        const i64 istart = std::max<i64>(0, j0 - q_offset);  // first query that sees key j0
        for (i64 h = g * group; h < (g + 1) * group; ++h) {
          for (i64 i0 = istart; i0 < Lq; i0 += BQ) {
            const i64 mq = std::min(BQ, Lq - i0);
            const i64 rowoff = ((b * Lq + i0) * Hq + h) * hd;
            const float* qp = q + rowoff;
            const float* gp = dout + rowoff;
            const float* lrow = lse + (b * Hq + h) * Lq + i0;
            const float* drow = D.data() + (b * Hq + h) * Lq + i0;
            mm(p.data(), BK, qp, ldq, 1, kt.data(), BK, mq, nk, hd, scale, false);   // S
            mm(ds.data(), BK, gp, ldq, 1, vt.data(), BK, mq, nk, hd, 1.0f, false);  // dP
            for (i64 r = 0; r < mq; ++r) {
              float* pr = p.data() + r * BK;
              float* dr = ds.data() + r * BK;
              const i64 nv = n_visible(q_offset + i0 + r, j0, nk);
              const float lr = lrow[r], dd = drow[r];
              for (i64 j = nv; j < nk; ++j) pr[j] = -INFINITY;
              simd::exp_sub_sum(pr, nk, lr);  // P = exp(S - lse); masked entries give 0
#pragma omp simd
              for (i64 j = 0; j < nk; ++j) dr[j] = pr[j] * (dr[j] - dd);  // dS
            }
            // dV += P^T dO, dK += scale dS^T Q (A read transposed through its strides).
            mm(dva.data(), hd, p.data(), 1, BK, gp, ldq, nk, hd, mq, 1.0f, true);
            mm(dka.data(), hd, ds.data(), 1, BK, qp, ldq, nk, hd, mq, scale, true);
            // dQ += scale dS K, straight into dq: this task owns these rows.
            mm(dq + rowoff, ldq, ds.data(), BK, 1, kp + j0 * ldk, ldk, mq, hd, nk, scale, true);
          }
        }
        for (i64 j = 0; j < nk; ++j) {
          float* dkr = dk + ((b * Lk + j0 + j) * Hkv + g) * hd;
          float* dvr = dv + ((b * Lk + j0 + j) * Hkv + g) * hd;
          const float* a = dka.data() + j * hd;
          const float* c = dva.data() + j * hd;
#pragma omp simd
          for (i64 x = 0; x < hd; ++x) {
            dkr[x] += a[x];
            dvr[x] += c[x];
          }
        }
      }
    }
  }
}

}  // namespace dlcm::ops
