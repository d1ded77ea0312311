// Causal grouped-query attention, blockwise (FlashAttention-2 schedule on CPU).
//
// Forward: one task per (batch, query head, query block). Scores for one key block at a time
// go into a small transposed tile S^T [BK, BQ] (= K Q^T, with Q^T packed once per task, so
// the softmax statistics per query are vertical vector ops); an online softmax (running max
// m, running sum l) rescales the output accumulator, so no Lq x Lk matrix ever exists.
// Saves lse = m + log(l). Few queries (decoding) take a row-layout path instead,
// attention_forward_rows, one task per (batch, kv head).
//
// Backward: one task per (batch, kv head). The task owns every query head of its group, so it
// can accumulate dq, dk and dv without races or per-thread copies: for each key block it
// recomputes P = exp(S - lse) for every query block that sees it, and forms
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dK += scale dS^T Q,  dQ += scale dS K,
// with D_i = rowsum(dO_i * O_i) computed once up front. (Parallelism is B * Hkv tasks; with
// fewer tasks than threads some threads idle.)
//
// Blocks that straddle the causal diagonal skip masked work in row slabs (mm_causal). All
// tile products go through one register-blocked microkernel, tile_mm() below.
//
// Sliding window (window = w > 0): the query at position p sees keys (p - w, p]. Key blocks
// wholly before a query tile's window are never visited (forward: the key loop starts at the
// tile's first visible key; backward: the query loop of a key block ends at the last query
// that sees it), so the cost is O(L w); blocks the window's lower edge cuts are computed whole
// and masked. window = 0 takes exactly the causal path.
#include <algorithm>
#include <array>
#include <cmath>

#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "kernels/ops.h"
#include "kernels/tile_gemm.h"

#include "kernels/isa_target.h"  // last include: the variant's target and namespace
#include "kernels/simd.h"

namespace dlcm::ops::DLCM_ISA_NS {

namespace {

constexpr i64 BQ = 64;  // query rows per tile
constexpr i64 BK = 64;  // keys per tile



// dst[c*ldd + j] = src[j*ld + c] for j < n, c < hd: a block of rows, transposed so that it
// can be the contiguous B operand of tile_mm(). Full 16x16 tiles in registers, edges scalar.
void pack_t(float* dst, i64 ldd, const float* src, i64 ld, i64 n, i64 hd) {
  i64 n16 = 0, h16 = 0;
#ifdef DLCM_AVX512
  n16 = n / 16 * 16;
  h16 = hd / 16 * 16;
  for (i64 j = 0; j < n16; j += 16)
    for (i64 c = 0; c < h16; c += 16)
      simd::transpose16(dst + c * ldd + j, ldd, src + j * ld + c, ld);
#endif
  for (i64 j = 0; j < n; ++j) {
    const float* s = src + j * ld;
    for (i64 c = (j < n16 ? h16 : 0); c < hd; ++c) dst[c * ldd + j] = s[c];
  }
}

// Online softmax over the columns of a transposed score tile st [nk, ld] (column i = query
// i < mq). Per column: m_new = max(m, max_j st), corr = exp(m - m_new), st = exp(st - m_new),
// l = l*corr + sum_j st. Column-wise, so every step is a plain vertical vector op.
void softmax_cols(float* st, i64 nk, i64 mq, float* m, float* l, float* corr) {
#ifdef DLCM_AVX512
  const i64 ld = BQ;
  for (i64 i = 0; i < mq; i += 16) {
    const __mmask16 km = simd::tail_mask(mq - i);
    const __m512 mo = _mm512_maskz_loadu_ps(km, m + i);
    __m512 mx = mo;
    for (i64 j = 0; j < nk; ++j) mx = _mm512_max_ps(mx, _mm512_maskz_loadu_ps(km, st + j * ld + i));
    const __m512 c = simd::exp_ps(_mm512_sub_ps(mo, mx));
    __m512 sum = _mm512_setzero_ps();
    for (i64 j = 0; j < nk; ++j) {
      float* row = st + j * ld + i;
      const __m512 e = simd::exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(km, row), mx));
      _mm512_mask_storeu_ps(row, km, e);
      sum = _mm512_add_ps(sum, e);
    }
    _mm512_mask_storeu_ps(l + i, km, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, l + i), c, sum));
    _mm512_mask_storeu_ps(m + i, km, mx);
    _mm512_mask_storeu_ps(corr + i, km, c);
  }
#else
  for (i64 i = 0; i < mq; ++i) {
    float mx = m[i];
    for (i64 j = 0; j < nk; ++j) mx = std::max(mx, st[j * BQ + i]);
    const float c = std::exp(m[i] - mx);
    float sum = 0;
    for (i64 j = 0; j < nk; ++j) sum += (st[j * BQ + i] = std::exp(st[j * BQ + i] - mx));
    l[i] = l[i] * c + sum;
    m[i] = mx;
    corr[i] = c;
  }
#endif
}


// The tile product of one attention call: tile_mm() (FP32), or, with the GEMMs in BF16 on a CPU
// with AMX, tile_mm_amx() (operands rounded to bf16, FP32 accumulation), as the BF16 GEMMs do.
struct TileProduct {
  bool amx = false;
  TileProduct() {
#ifdef DLCM_AVX512
    amx = gemm_precision() == Precision::BF16 && amx_bf16_usable();
#endif
  }
  void operator()(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb,
                  i64 M, i64 N, i64 K, float alpha, bool acc) const {
#ifdef DLCM_AVX512
    if (amx) return tile_mm_amx(C, ldc, A, rsa, csa, B, ldb, M, N, K, alpha, acc);
#endif
    tile_mm(C, ldc, A, rsa, csa, B, ldb, M, N, K, alpha, acc);
  }
};

// tile_mm() for a tile that straddles the causal diagonal: query row r of the tile sees key column
// c iff c <= r + off. Rows index queries (else keys); the other index (keys, or queries) runs
// along K when other_on_k (else along N). Work on
// entries the mask removes is skipped in slabs of 12 rows (two microkernel row tiles); those
// entries of C are left unwritten, so callers mask or zero them afterwards. On 64x64 blocks
// this saves about a third of the diagonal block's flops.
// On AMX the whole tile is computed (a tile product costs less than the slabs' packing): the
// callers' masks and zeros make the hidden entries' values irrelevant.
void mm_causal(const TileProduct& mm, float* C, i64 ldc, const float* A, i64 rsa, i64 csa,
               const float* B, i64 ldb, i64 M, i64 N, i64 K, float alpha, bool acc, i64 off,
               bool rows_are_queries, bool other_on_k) {
  if (mm.amx) return mm(C, ldc, A, rsa, csa, B, ldb, M, N, K, alpha, acc);
  constexpr i64 SLAB = 12;
  for (i64 r0 = 0; r0 < M; r0 += SLAB) {
    const i64 r1 = std::min(M, r0 + SLAB);
    i64 lo = 0, hi = other_on_k ? K : N;
    if (rows_are_queries)
      hi = std::clamp<i64>(r1 + off, 0, hi);  // keys <= (r1 - 1) + off
    else
      lo = std::clamp<i64>(r0 - off, 0, hi);  // queries >= r0 - off
    if (other_on_k) {
      if (lo < hi)
        tile_mm(C + r0 * ldc, ldc, A + r0 * rsa + lo * csa, rsa, csa, B + lo * ldb, ldb, r1 - r0, N,
           hi - lo, alpha, acc);
      else if (!acc)
        for (i64 r = r0; r < r1; ++r) std::fill_n(C + r * ldc, N, 0.0f);
    } else if (lo < hi) {
      tile_mm(C + r0 * ldc + lo, ldc, A + r0 * rsa, rsa, csa, B + lo, ldb, r1 - r0, hi - lo, K, alpha,
         acc);
    }
  }
}

void check_shapes(const char* who, i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset,
                  i64 window) {
  DLCM_CHECK(B >= 0 && Lq >= 0 && hd >= 1, who, ": bad shape B=", B, " Lq=", Lq, " hd=", hd);
  DLCM_CHECK(Lk >= 1, who, ": need at least one key, got Lk=", Lk);
  DLCM_CHECK(Hkv >= 1 && Hq % Hkv == 0, who, ": n_kv_heads (", Hkv,
             ") must divide n_heads (", Hq, ")");
  DLCM_CHECK(q_offset >= 0, who, ": q_offset must be >= 0, got ", q_offset);
  DLCM_CHECK(window >= 0, who, ": window must be >= 0 (0 = full causal), got ", window);
  // Every query must see at least its own key, or its softmax would be empty.
  DLCM_CHECK(window == 0 || q_offset + Lq <= Lk, who, ": a sliding window needs every query's ",
             "own key (q_offset + Lq <= Lk), got q_offset=", q_offset, " Lq=", Lq, " Lk=", Lk);
}

// Keys one query sees at most: what the parallel-or-not threshold counts.
i64 keys_seen(i64 Lq, i64 Lk, i64 q_offset, i64 window) {
  const i64 n = std::min(Lk, q_offset + Lq);
  return window > 0 ? std::min(n, window) : n;
}

// Forward for few queries (decode: Lq = 1, or short chunks). One task per (batch, kv head);
// the tile's rows are every (query, head-of-the-group) pair, row = i * group + hh, so the
// group's heads share each packed K^T block, and scores are rows of S = Q K^T (the transposed
// layout would leave most of each vector empty when there are only a few queries).
void attention_forward_rows(float* out, float* lse, const float* q, const float* k,
                            const float* v, i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd,
                            i64 q_offset, float scale, i64 window, bool par) {
  const i64 group = Hq / Hkv, ldk = Hkv * hd, R = Lq * group;
  const i64 jend = std::min(Lk, q_offset + Lq);  // keys seen by the last query
  const i64 jbeg = window > 0 ? std::max<i64>(0, q_offset - window + 1) : 0;  // by the first
#pragma omp parallel if (par)
  {
    Buf qs(size_t(R) * hd), kt(size_t(hd) * BK), s(size_t(R) * BK), o(size_t(R) * hd);
    std::vector<float> m(R), l(R);
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < B * Hkv; ++t) {
      const i64 b = t / Hkv, g = t % Hkv;
      for (i64 i = 0; i < Lq; ++i)  // the group's heads are adjacent rows of q
        std::copy_n(q + ((b * Lq + i) * Hq + g * group) * hd, group * hd,
                    qs.data() + i * group * hd);
      const float* kp = k + (b * Lk * Hkv + g) * hd;
      const float* vp = v + (b * Lk * Hkv + g) * hd;
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(o.begin(), o.end(), 0.0f);
      for (i64 j0 = jbeg; j0 < jend; j0 += BK) {
        const i64 nk = std::min(BK, jend - j0);
        pack_t(kt.data(), BK, kp + j0 * ldk, ldk, nk, hd);
        tile_mm(s.data(), BK, qs.data(), hd, 1, kt.data(), BK, R, nk, hd, scale, false);  // S [R, nk]
        for (i64 r = 0; r < R; ++r) {
          float* row = s.data() + r * BK;
          const i64 nv = std::clamp<i64>(q_offset + r / group + 1 - j0, 0, nk);
          std::fill(row + nv, row + nk, -INFINITY);
          if (window > 0)
            std::fill(row, row + std::clamp<i64>(q_offset + r / group - window + 1 - j0, 0, nv),
                      -INFINITY);
          // The first block holds each query's first visible key (key 0, or with a window key
          // jbeg + i with i < Lq < BK), so m is finite from then on.
          const float mnew = std::max(m[r], simd::hmax(row, nk));
          const float corr = std::exp(m[r] - mnew);  // 0 on the first block
          l[r] = float(l[r] * corr + simd::exp_sub_sum(row, nk, mnew));
          m[r] = mnew;
          if (corr != 1.0f) {
            float* orow = o.data() + r * hd;
#pragma omp simd
            for (i64 x = 0; x < hd; ++x) orow[x] *= corr;
          }
        }
        tile_mm(o.data(), hd, s.data(), BK, 1, vp + j0 * ldk, ldk, R, hd, nk, 1.0f, true);  // O += P V
      }
      for (i64 r = 0; r < R; ++r) {
        const i64 i = r / group, h = g * group + r % group;
        const float inv = 1.0f / l[r];
        float* dst = out + ((b * Lq + i) * Hq + h) * hd;
        const float* orow = o.data() + r * hd;
#pragma omp simd
        for (i64 x = 0; x < hd; ++x) dst[x] = orow[x] * inv;
        lse[(b * Hq + h) * Lq + i] = m[r] + std::log(l[r]);
      }
    }
  }
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset,
                       float scale, i64 window) {
  check_shapes("attention_forward", B, Lq, Lk, Hq, Hkv, hd, q_offset, window);
  const i64 group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const i64 nqb = (Lq + BQ - 1) / BQ;
  const i64 ntask = B * Hq * nqb;
  const bool par = B * Hq * Lq * keys_seen(Lq, Lk, q_offset, window) * hd > (1 << 16);
  if (Lq < 16 && Lq * group <= BQ)
    return attention_forward_rows(out, lse, q, k, v, B, Lq, Lk, Hq, Hkv, hd, q_offset, scale,
                                  window, par);
  const TileProduct mm;
#pragma omp parallel if (par)
  {
    Buf qt(size_t(hd) * BQ), st(size_t(BK) * BQ), o(size_t(BQ) * hd);
    alignas(64) float m[BQ], l[BQ], corr[BQ];
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
      // First key seen by the tile's row 0. Starting the key blocks there (not on the BK grid)
      // puts every row's first visible key (<= jbeg + r, r < BQ = BK) into the first block, so
      // the running max is finite after it.
      const i64 jbeg = window > 0 ? std::max<i64>(0, q_offset + i0 - window + 1) : 0;
      pack_t(qt.data(), BQ, qp, ldq, mq, hd);  // Q^T [hd, mq], packed once for all key blocks
      std::fill(m, m + BQ, -INFINITY);
      std::fill(l, l + BQ, 0.0f);
      std::fill(o.begin(), o.begin() + mq * hd, 0.0f);
      for (i64 j0 = jbeg; j0 < jend; j0 += BK) {
        const i64 nk = std::min(BK, jend - j0);
        const i64 off = q_offset + i0 - j0;  // tile query r sees tile key j iff j <= r + off
        const bool diag = nk - 1 > off;       // some key in this block is hidden from row 0
        if (!diag) {
          mm(st.data(), BQ, kp + j0 * ldk, ldk, 1, qt.data(), BQ, nk, mq, hd, scale, false);
        } else {
          mm_causal(mm, st.data(), BQ, kp + j0 * ldk, ldk, 1, qt.data(), BQ, nk, mq, hd, scale,
                    false, off, false, false);
          // Causal mask (also covers entries mm_causal skipped): key j hides from i < j - off.
          for (i64 j = 0; j < nk; ++j)
            std::fill_n(st.data() + j * BQ, std::clamp<i64>(j - off, 0, mq), -INFINITY);
        }
        // Window mask: key j hides from rows r >= j - off + window (the last row sees key 0
        // of the block iff mq - 1 + off < window).
        if (window > 0 && mq - 1 + off >= window)
          for (i64 j = 0; j < nk; ++j) {
            const i64 r0 = std::clamp<i64>(j - off + window, 0, mq);
            std::fill(st.data() + j * BQ + r0, st.data() + j * BQ + mq, -INFINITY);
          }
        softmax_cols(st.data(), nk, mq, m, l, corr);  // S^T -> P^T, running stats
        for (i64 r = 0; r < mq; ++r)
          if (corr[r] != 1.0f) {
            float* orow = o.data() + r * hd;
            const float c = corr[r];
#pragma omp simd
            for (i64 x = 0; x < hd; ++x) orow[x] *= c;
          }
        // O += P V, P read transposed out of P^T.
        if (!diag)
          mm(o.data(), hd, st.data(), 1, BQ, vp + j0 * ldk, ldk, mq, hd, nk, 1.0f, true);
        else
          mm_causal(mm, o.data(), hd, st.data(), 1, BQ, vp + j0 * ldk, ldk, mq, hd, nk, 1.0f, true,
                    off, true, true);
      }
      for (i64 r = 0; r < mq; ++r) {
        const float inv = 1.0f / l[r];
        float* dst = out + ((b * Lq + i0 + r) * Hq + h) * hd;
        const float* orow = o.data() + r * hd;
#pragma omp simd
        for (i64 x = 0; x < hd; ++x) dst[x] = orow[x] * inv;
        lse[(b * Hq + h) * Lq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  }
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v, i64 B,
                        i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale,
                        i64 window) {
  check_shapes("attention_backward", B, Lq, Lk, Hq, Hkv, hd, q_offset, window);
  const i64 group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const bool par = B * Hq * Lq * keys_seen(Lq, Lk, q_offset, window) * hd > (1 << 16);
  const TileProduct mm;

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
        const i64 istart = std::max<i64>(0, j0 - q_offset);  // first query that sees key j0
        // One past the last query that sees the block's last key (position < key + window).
        const i64 iend =
            window > 0 ? std::clamp<i64>(j0 + nk - 1 + window - q_offset, 0, Lq) : Lq;
        if (istart >= iend) continue;  // cached keys below every query's window
        pack_t(kt.data(), BK, kp + j0 * ldk, ldk, nk, hd);
        pack_t(vt.data(), BK, vp + j0 * ldk, ldk, nk, hd);
        std::fill(dka.begin(), dka.begin() + nk * hd, 0.0f);
        std::fill(dva.begin(), dva.begin() + nk * hd, 0.0f);
        for (i64 h = g * group; h < (g + 1) * group; ++h) {
          for (i64 i0 = istart; i0 < iend; i0 += BQ) {
            const i64 mq = std::min(BQ, iend - i0);
            const i64 rowoff = ((b * Lq + i0) * Hq + h) * hd;
            const float* qp = q + rowoff;
            const float* gp = dout + rowoff;
            const float* lrow = lse + (b * Hq + h) * Lq + i0;
            const float* drow = D.data() + (b * Hq + h) * Lq + i0;
            const i64 off = q_offset + i0 - j0;  // tile query r sees tile key j iff j <= r+off
            if (nk - 1 <= off) {  // the whole block is visible to every query of the tile
              mm(p.data(), BK, qp, ldq, 1, kt.data(), BK, mq, nk, hd, scale, false);   // S
              mm(ds.data(), BK, gp, ldq, 1, vt.data(), BK, mq, nk, hd, 1.0f, false);  // dP
            } else {
              mm_causal(mm, p.data(), BK, qp, ldq, 1, kt.data(), BK, mq, nk, hd, scale, false, off,
                        true, false);
              mm_causal(mm, ds.data(), BK, gp, ldq, 1, vt.data(), BK, mq, nk, hd, 1.0f, false, off,
                        true, false);
            }
            for (i64 r = 0; r < mq; ++r) {
              float* pr = p.data() + r * BK;
              float* dr = ds.data() + r * BK;
              const i64 nv = std::clamp<i64>(r + off + 1, 0, nk);
              // Keys before the window: [0, lo).
              const i64 lo = window > 0 ? std::clamp<i64>(r + off - window + 1, 0, nv) : 0;
              const float dd = drow[r];
              simd::exp_sub_sum(pr + lo, nv - lo, lrow[r]);  // P = exp(S - lse)
#pragma omp simd
              for (i64 j = lo; j < nv; ++j) dr[j] = pr[j] * (dr[j] - dd);  // dS = P (dP - D)
              // Hidden keys: exact zeros (mm_causal may not have written these entries).
              std::fill(pr, pr + lo, 0.0f);
              std::fill(dr, dr + lo, 0.0f);
              std::fill(pr + nv, pr + nk, 0.0f);
              std::fill(dr + nv, dr + nk, 0.0f);
            }
            if (nk - 1 <= off) {
              // dV += P^T dO, dK += scale dS^T Q (A read transposed through its strides).
              mm(dva.data(), hd, p.data(), 1, BK, gp, ldq, nk, hd, mq, 1.0f, true);
              mm(dka.data(), hd, ds.data(), 1, BK, qp, ldq, nk, hd, mq, scale, true);
              // dQ += scale dS K, straight into dq: this task owns these rows.
              mm(dq + rowoff, ldq, ds.data(), BK, 1, kp + j0 * ldk, ldk, mq, hd, nk, scale, true);
            } else {
              mm_causal(mm, dva.data(), hd, p.data(), 1, BK, gp, ldq, nk, hd, mq, 1.0f, true, off,
                        false, true);
              mm_causal(mm, dka.data(), hd, ds.data(), 1, BK, qp, ldq, nk, hd, mq, scale, true, off,
                        false, true);
              mm_causal(mm, dq + rowoff, ldq, ds.data(), BK, 1, kp + j0 * ldk, ldk, mq, hd, nk, scale,
                        true, off, true, true);
            }
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

}  // namespace dlcm::ops::DLCM_ISA_NS
