// Causal grouped-query attention, blockwise (FlashAttention-2 schedule on CPU).
//
// Forward: one task per (batch, query head, query block). Scores for one key block at a time
// go into a small transposed tile S^T [BK, BQ] (= K Q^T, with Q^T packed once per task, so
// the softmax statistics per query are vertical vector ops); an online softmax (running max
// m, running sum l) rescales the output accumulator, so no Lq x Lk matrix ever exists.
// Saves lse = m + log(l). Few queries (decoding) take a row-layout path instead,
// attention_forward_rows, one task per (batch, kv head).
//
// BF16: with the GEMMs in BF16 on the native units, both passes of the block path run on bf16
// operands kept in the AMX tiles' layouts (attention_forward_bf16, attention_backward_bf16:
// bf16 operands as the BF16 GEMMs round them, FP32 accumulation and softmax), their products
// on the AMX tiles where the CPU has them, else as AVX512-BF16 dot products (vdpbf16ps reads
// the same pair layout; ops::attention_units()). Decoding's row path stays FP32.
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

#include "core/parallel.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "kernels/ops.h"
#include "kernels/tile_gemm.h"

#include "kernels/isa_target.h"  // last include: the variant's target and namespace
#include "kernels/simd.h"
#include "kernels/amx.h"

namespace dlcm::ops::DLCM_ISA_NS {

namespace {

constexpr i64 BQ = 64;  // query rows per tile
constexpr i64 BK = 64;  // keys per tile
// The few-queries path's scores as dot products from the key rows (scores_dot) up to this many
// rows (queries x heads of a group), through transposed key blocks (pack_t, tile_mm) beyond.
// One core of the Zen 4 host, 256 keys, hd 64 (test_ops --perf attention, session 34): 1 row
// 25 -> 39 GFLOP/s, 2 rows 40 -> 51, 4 rows 56 -> 59, 8 rows 66 -> 61.
constexpr i64 kDotRows = 4;

// This thread's scratch of at least n floats, kept between calls (not cleared).
float* attention_scratch(size_t n) {
  thread_local Buf b;
  if (b.size() < n) b.resize(n);
  return b.data();
}

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

// s[r * lds + j] = scale * q_r . k_j for R query rows (q rows hd apart) and n keys (rows ld
// apart): dot products straight from the keys' rows, for the few-queries path's calls of at
// most kDotRows rows (decode), where transposing each key block for tile_mm costs more than
// the product that reads it. AVX-512: 16 keys at a time, one accumulator per key over hd in
// 16-lane chunks, the 16 sums folded into one vector of the 16 keys' scores.
void scores_dot(float* s, i64 lds, const float* q, i64 R, const float* k, i64 ld, i64 n, i64 hd,
                float scale) {
  i64 j0 = 0;
#ifdef DLCM_AVX512
  const __m512 sc = _mm512_set1_ps(scale);
  for (i64 r = 0; r < R; ++r) {
    const float* qr = q + r * hd;
    for (i64 j = 0; j + 16 <= n; j += 16) {
      __m512 a[16];
      for (int u = 0; u < 16; ++u) a[u] = _mm512_setzero_ps();
      for (i64 c = 0; c < hd; c += 16) {
        const __mmask16 m = simd::tail_mask(hd - c);
        const __m512 qv = _mm512_maskz_loadu_ps(m, qr + c);
        for (int u = 0; u < 16; ++u)
          a[u] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k + (j + u) * ld + c), a[u]);
      }
      // fold: pairs within 128-bit lanes, then quads, then across lanes; lane u ends as key u
      __m512 t[8], v[4], w[2];
      for (int i = 0; i < 8; ++i)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
      for (int i = 0; i < 4; ++i)
        v[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
      for (int i = 0; i < 2; ++i)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
      const __m512 sum = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
      _mm512_storeu_ps(s + r * lds + j, _mm512_mul_ps(sum, sc));
    }
  }
  j0 = n / 16 * 16;
#endif
  for (i64 r = 0; r < R; ++r) {
    const float* qr = q + r * hd;
    for (i64 j = j0; j < n; ++j) {
      const float* kj = k + j * ld;
      float d = 0;
      for (i64 c = 0; c < hd; ++c) d += qr[c] * kj[c];
      s[r * lds + j] = d * scale;
    }
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
// (There the tile-layout kernels below run instead, except for a scale <= 0, which their
// masking of unscaled scores does not allow.)
struct TileProduct {
  bool amx = false;
  TileProduct() {
#ifdef DLCM_AVX512
    amx = attention_units() == AttentionUnits::Tiles;
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

// A key block's dK and dV (rows ld apart in the task's accumulators) into dk and dv (+=, or =
// without acc), dK times ks: the rows of key j0 + j, kv head g, batch b.
// nt (without acc): rows of whole 64-byte lines on the grid written with non-temporal stores.
void add_key_grads(float* dk, float* dv, const float* dka, const float* dva, i64 ld, float ks,
                   i64 b, i64 g, i64 j0, i64 nk, i64 Lk, i64 Hkv, i64 hd, bool acc,
                   bool nt = false) {
  for (i64 j = 0; j < nk; ++j) {
    float* dkr = dk + ((b * Lk + j0 + j) * Hkv + g) * hd;
    float* dvr = dv + ((b * Lk + j0 + j) * Hkv + g) * hd;
    const float* a = dka + j * ld;
    const float* c = dva + j * ld;
#ifdef DLCM_AVX512
    if (nt && !acc && hd % 16 == 0 &&
        ((reinterpret_cast<uintptr_t>(dkr) | reinterpret_cast<uintptr_t>(dvr)) & 63) == 0) {
      const __m512 s = _mm512_set1_ps(ks);
      for (i64 x = 0; x < hd; x += 16) {
        _mm512_stream_ps(dkr + x, _mm512_mul_ps(s, _mm512_loadu_ps(a + x)));
        _mm512_stream_ps(dvr + x, _mm512_loadu_ps(c + x));
      }
      continue;
    }
#endif
    if (acc) {
#pragma omp simd
      for (i64 x = 0; x < hd; ++x) {
        dkr[x] += ks * a[x];
        dvr[x] += c[x];
      }
    } else {
#pragma omp simd
      for (i64 x = 0; x < hd; ++x) {
        dkr[x] = ks * a[x];
        dvr[x] = c[x];
      }
    }
  }
}

// Overwrite mode: dk and dv of keys [j0, j1) (kv head g, batch b), which no query sees, are 0.
void zero_key_grads(float* dk, float* dv, i64 b, i64 g, i64 j0, i64 j1, i64 Lk, i64 Hkv, i64 hd) {
  for (i64 j = j0; j < j1; ++j) {
    std::fill_n(dk + ((b * Lk + j) * Hkv + g) * hd, hd, 0.0f);
    std::fill_n(dv + ((b * Lk + j) * Hkv + g) * hd, hd, 0.0f);
  }
}

#ifdef DLCM_AVX512
// ---- Forward on AMX tiles, in the tiles' own layouts (BF16 precision on an AMX CPU) ----
// The block path's arithmetic (query blocks of 64, key blocks in order with an online
// softmax), with every operand kept in the layout a tile reads, instead of packed again for
// each product as tile_mm_amx() must:
//   per task       (one batch and query head, all its query blocks) K as A operands
//                  [Lkp][hdp] and V^T as A operands [hdp][BK] per key block (on the BK grid),
//                  converted once while they stay in this core's cache, where a task per
//                  query block would convert every key block it visits again;
//   per query blk  Q^T as a B operand [hdp/2][BQ][2] (pairs of channels interleaved);
//   per key block  S^T = K Q^T in FP32 [BK][BQ]; the online softmax writes P^T (bf16)
//                  straight into a B operand [BK/2][BQ][2]; O^T [hdp][BQ] += V^T P^T,
//                  accumulated in FP32 in memory, so rescaling by the softmax correction is a
//                  vertical multiply.
// hdp is hd rounded up to 32, Lkp is Lk rounded up to BK, all padding zero, so every tile is
// full. Key blocks lie on the BK grid, so with a window a tile's first block may hold no key
// some query sees (the softmax then keeps that query's statistics empty). Q, K, V and P are
// rounded to bf16 as the BF16 GEMMs round their operands; scores, softmax, lse and the
// accumulation stay FP32. Tiles: 0-3 C (2 x 2 of 16 x 16 FP32), 4-5 A, 6-7 B.

// Rows [n][hd] (ld apart) -> bf16 rows [rows_p][hdp], zero beyond n rows and hd columns.
DLCM_AMX_TARGET void amx_rows(uint16_t* d, i64 hdp, const float* src, i64 ld, i64 n, i64 rows_p,
                              i64 hd) {
  for (i64 r = 0; r < n; ++r)
    for (i64 c = 0; c < hdp; c += 32) {
      const __m512 lo =
          _mm512_maskz_loadu_ps(simd::tail_mask(std::max<i64>(0, hd - c)), src + r * ld + c);
      const __m512 hi = _mm512_maskz_loadu_ps(simd::tail_mask(std::max<i64>(0, hd - c - 16)),
                                              src + r * ld + c + 16);
      _mm512_store_si512(d + r * hdp + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  std::fill(d + n * hdp, d + rows_p * hdp, uint16_t(0));
}

// Q rows [mq][hd] -> Q^T as a B operand. Channels 2p and 2p+1 of query r form one 32-bit word
// of a bf16 row; the B layout wants word (p, r) at p*BQ + r: a 32-bit transpose of the rows.
DLCM_AMX_TARGET void amx_qt(uint16_t* d, uint16_t* tmp, const float* q, i64 ld, i64 mq, i64 hd,
                            i64 hdp) {
  amx_rows(tmp, hdp, q, ld, mq, BQ, hd);  // [BQ][hdp] bf16 = [BQ][hdp/2] words
  const i64 np = hdp / 2;
  const float* w = reinterpret_cast<const float*>(tmp);  // moved by shuffles only: bits kept
  for (i64 r = 0; r < BQ; r += 16)
    for (i64 p = 0; p < np; p += 16)
      simd::transpose16(reinterpret_cast<float*>(d) + p * BQ + r, BQ, w + r * np + p, np);
}

// V rows [n][hd] -> V^T as an A operand [hdp][BK] bf16, zero beyond n keys and hd channels.
DLCM_AMX_TARGET void amx_vt(uint16_t* d, float* tmp, const float* v, i64 ld, i64 n, i64 hd,
                            i64 hdp) {
  alignas(64) float blk[16 * 16];
  for (i64 j = 0; j < BK; j += 16)
    for (i64 c = 0; c < hdp; c += 16) {
      const __mmask16 mc = simd::tail_mask(std::max<i64>(0, hd - c));
      if (j + 16 <= n && c + 16 <= hd) {
        simd::transpose16(tmp + c * BK + j, BK, v + j * ld + c, ld);
        continue;
      }
      for (i64 jj = 0; jj < 16; ++jj)
        _mm512_store_ps(blk + jj * 16, j + jj < n ? _mm512_maskz_loadu_ps(mc, v + (j + jj) * ld + c)
                                                  : _mm512_setzero_ps());
      simd::transpose16(tmp + c * BK + j, BK, blk, 16);
    }
  for (i64 c = 0; c < hdp; ++c)
    for (i64 j = 0; j < BK; j += 32)
      _mm512_store_si512(d + c * BK + j,
                         (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(tmp + c * BK + j + 16),
                                                      _mm512_load_ps(tmp + c * BK + j)));
}

// C [M][N] (FP32, rows ldc apart) = (acc ? C : 0) + A B, with A as bf16 rows [M][K] (lda
// apart) and B in the pair layout: rows 2p and 2p+1 of B interleaved, column n of pair p at
// Bp[p * ldp + 2n] (ldp = 2N when packed alone). M, N, K multiples of 32.
DLCM_AMX_TARGET void amx_product(float* C, i64 ldc, const uint16_t* A, i64 lda, const uint16_t* Bp,
                                 i64 ldp, i64 M, i64 N, i64 K, bool acc) {
  for (i64 i = 0; i < M; i += 32)
    for (i64 j = 0; j < N; j += 32) {
      float* c = C + i * ldc + j;
      if (acc) {
        _tile_loadd(0, c, ldc * 4);
        _tile_loadd(1, c + 16, ldc * 4);
        _tile_loadd(2, c + 16 * ldc, ldc * 4);
        _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (i64 k = 0; k < K; k += 32) {
        _tile_loadd(4, A + i * lda + k, lda * 2);
        _tile_loadd(5, A + (i + 16) * lda + k, lda * 2);
        _tile_loadd(6, Bp + k / 2 * ldp + 2 * j, ldp * 2);
        _tile_loadd(7, Bp + k / 2 * ldp + 2 * (j + 16), ldp * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, ldc * 4);
      _tile_stored(1, c + 16, ldc * 4);
      _tile_stored(2, c + 16 * ldc, ldc * 4);
      _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
    }
}

// The same product as AVX512-BF16 dot products, for a CPU without AMX: vdpbf16ps multiplies a
// pair of bf16 per 32-bit lane and adds both products to the lane's FP32 sum, so the A row's
// pair (k, k+1), broadcast, against a 64-byte row of the pair layout (16 columns' pairs) gives
// 16 columns' sums; 4 rows x 64 columns of C (8 x 32 where N is no multiple of 64) stay in 16
// accumulators over all of K (4 x 64 measured 0-3% faster than 8 x 32 on Zen 4, 6 x 64 slower
// with its tail). The same operands and FP32 sums as the tiles (in another order; both flush
// denormals).
#define DLCM_BF16DOT_TARGET \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
template <int MR, int NV>
DLCM_BF16DOT_TARGET inline __attribute__((always_inline)) void dot_block(
    float* C, i64 ldc, const uint16_t* A, i64 lda, const uint16_t* Bp, i64 ldp, i64 K, bool acc) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      c[r][v] = acc ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  const uint16_t* b = Bp;
  const uint16_t* a = A;
  for (i64 p = 0; p < K / 2; ++p, b += ldp, a += 2) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + 32 * v);
    for (int r = 0; r < MR; ++r) {
      int32_t w;
      std::memcpy(&w, a + r * lda, sizeof w);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(w);
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

DLCM_BF16DOT_TARGET void dot_product(float* C, i64 ldc, const uint16_t* A, i64 lda,
                                     const uint16_t* Bp, i64 ldp, i64 M, i64 N, i64 K, bool acc) {
  for (i64 j = 0; j < N; j += 64) {
    if (j + 64 <= N) {
      for (i64 i = 0; i < M; i += 4)
        dot_block<4, 4>(C + i * ldc + j, ldc, A + i * lda, lda, Bp + 2 * j, ldp, K, acc);
    } else {
      for (i64 i = 0; i < M; i += 8)
        dot_block<8, 2>(C + i * ldc + j, ldc, A + i * lda, lda, Bp + 2 * j, ldp, K, acc);
    }
  }
}

// The units of the tile-layout kernels below: begin() before a task's products, end() after.
struct AmxUnits {
  amx::TileConfig cfg = amx::full_tiles();
  // oneDNN's AMX kernels load their own configuration: ours, on every task.
  DLCM_AMX_TARGET void begin() const { _tile_loadconfig(&cfg); }
  // no tile state in use between tasks (saved at every context switch)
  DLCM_AMX_TARGET void end() const { _tile_release(); }
  DLCM_AMX_TARGET void product(float* C, i64 ldc, const uint16_t* A, i64 lda, const uint16_t* Bp,
                               i64 ldp, i64 M, i64 N, i64 K, bool acc) const {
    amx_product(C, ldc, A, lda, Bp, ldp, M, N, K, acc);
  }
};
struct DotUnits {
  void begin() const {}
  void end() const {}
  void product(float* C, i64 ldc, const uint16_t* A, i64 lda, const uint16_t* Bp, i64 ldp, i64 M,
               i64 N, i64 K, bool acc) const {
    dot_product(C, ldc, A, lda, Bp, ldp, M, N, K, acc);
  }
};

// f(AmxUnits{}) or f(DotUnits{}): the units u names (Tiles or Dot).
template <class F>
void with_units(AttentionUnits u, F f) {
  if (u == AttentionUnits::Tiles) return f(AmxUnits{});
  f(DotUnits{});
}

// Rows [n][hd] (ld apart) -> the pair layout of a B operand [rows_p/2][hdp][2] (rows 2p and
// 2p+1 interleaved per column), zero beyond n rows and hd columns.
DLCM_AMX_TARGET void amx_pairs(uint16_t* d, const float* src, i64 ld, i64 n, i64 rows_p, i64 hd,
                               i64 hdp) {
  const __m512i idx = _mm512_load_si512(amx::kPairIdx);
  for (i64 r = 0; r < rows_p; r += 2)
    for (i64 c = 0; c < hdp; c += 16) {
      const __mmask16 m = simd::tail_mask(std::max<i64>(0, hd - c));
      const __m512 r0 = r < n ? _mm512_maskz_loadu_ps(m, src + r * ld + c) : _mm512_setzero_ps();
      const __m512 r1 =
          r + 1 < n ? _mm512_maskz_loadu_ps(m, src + (r + 1) * ld + c) : _mm512_setzero_ps();
      _mm512_store_si512(d + r * hdp + 2 * c,
                         _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(r1, r0)));
    }
}

// softmax_cols() on unscaled scores (scale > 0 applied here), over all BQ columns (padded
// queries' outputs are never read), writing P^T in bf16 as the B operand of O^T += V^T P^T
// (amx_product): keys j, j+1 of query i at pv[j*BQ + 2i + (0, 1)] for even j, keys >= nk
// zero. The running sum l adds the FP32 values. The running maximum m moves only when the
// block's maximum exceeds it by more than kLazyRescale (then corr != 1 and the caller rescales
// O): below that the probabilities stay below e^kLazyRescale, far from FP32's or bf16's range,
// and O / l and lse = m + log l are the same quantities; most blocks after the first leave O
// as it is. Exponentials in base 2 (simd::exp2_ps) with log2(e) folded into the scale.
constexpr float kLazyRescale = 8.0f;
DLCM_GCC105593_BEGIN
DLCM_AMX_TARGET void softmax_cols_tiles(const float* st, i64 nk, float scale, float* m, float* l,
                                        float* corr, uint16_t* pv) {
  const __m512i idx = _mm512_load_si512(amx::kPairIdx);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 sc = _mm512_set1_ps(scale), sc2 = _mm512_mul_ps(sc, log2e);
  const __m512 zero = _mm512_setzero_ps();
  for (i64 i = 0; i < BQ; i += 16) {
    const __m512 mo = _mm512_load_ps(m + i);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (i64 j = 0; j < nk; ++j) mx = _mm512_max_ps(mx, _mm512_load_ps(st + j * BQ + i));
    // Floored at -1e30: a query with no visible key in this block (and none before) keeps
    // m = -1e30, l = 0 and writes zeros, instead of exp(-inf - -inf) = NaN.
    mx = _mm512_max_ps(mo, _mm512_max_ps(_mm512_mul_ps(mx, sc), _mm512_set1_ps(-1e30f)));
    mx = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask(mx, _mm512_add_ps(mo, _mm512_set1_ps(kLazyRescale)), _CMP_GT_OQ), mo,
        mx);
    const __m512 c = simd::exp2_ps(_mm512_mul_ps(_mm512_sub_ps(mo, mx), log2e));  // 1 if kept
    const __m512 mxl = _mm512_mul_ps(mx, log2e);
    __m512 sum = zero;
    for (i64 j = 0; j < BK; j += 2) {
      const __m512 e0 =
          j < nk ? simd::exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(st + j * BQ + i), sc2, mxl))
                 : zero;
      const __m512 e1 =
          j + 1 < nk
              ? simd::exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(st + (j + 1) * BQ + i), sc2, mxl))
              : zero;
      sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
      _mm512_store_si512(pv + j * BQ + 2 * i,
                         _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(e1, e0)));
    }
    _mm512_store_ps(l + i, _mm512_fmadd_ps(_mm512_load_ps(l + i), c, sum));
    _mm512_store_ps(m + i, mx);
    _mm512_store_ps(corr + i, c);
  }
}
DLCM_GCC105593_END

// Which keys each query sees, for the tile-layout kernels below (one policy per attention):
//   keys_all(b)          keys [lo, end) some query of row b sees, lo on the BK grid
//   keys(b, i0, mq)      the same for the query block [i0, i0 + mq), begin on the BK grid
//   queries(b, j0, nk)   queries [begin, end) that see some key of the block [j0, j0 + nk)
//   hide(st, b, i0, ncols, j0, nrows)  on unscaled scores S^T (row j: key j0 + j, column r:
//                        query i0 + r), columns < ncols and rows < nrows: -inf where hidden,
//                        plus bias / scale where the attention adds a bias.
// Causal (with an optional sliding window): query i at position q_offset + i sees keys
// (q_offset + i - window, q_offset + i].
struct CausalMask {
  i64 Lq, Lk, q_offset, window;
  std::pair<i64, i64> keys_all(i64) const {
    return {window > 0 ? std::max<i64>(0, q_offset - window + 1) / BK * BK : 0,
            std::min(Lk, q_offset + Lq)};
  }
  std::pair<i64, i64> keys(i64, i64 i0, i64 mq) const {
    return {window > 0 ? std::max<i64>(0, q_offset + i0 - window + 1) / BK * BK : 0,
            std::min(Lk, q_offset + i0 + mq)};
  }
  std::pair<i64, i64> queries(i64, i64 j0, i64 nk) const {
    return {std::max<i64>(0, j0 - q_offset),
            window > 0 ? std::clamp<i64>(j0 + nk - 1 + window - q_offset, 0, Lq) : Lq};
  }
  void hide(float* st, i64, i64 i0, i64 ncols, i64 j0, i64 nrows) const {
    const i64 off = q_offset + i0 - j0;  // tile query r sees tile key j iff j <= r + off
    // without a window, rows j <= off hide nothing: a block below the diagonal is left as it is
    for (i64 j = window > 0 ? 0 : std::max<i64>(0, off + 1); j < nrows; ++j) {
      float* row = st + j * BQ;
      std::fill_n(row, std::clamp<i64>(j - off, 0, ncols), -INFINITY);  // causal
      if (window > 0)  // rows r >= j - off + window
        std::fill(row + std::clamp<i64>(j - off + window, 0, ncols), row + ncols, -INFINITY);
    }
  }
};

// The compact concept attention (dlcm_ops.h): query t sees the list entries k <= s(t) (s(t) =
// seg(t), plus 1 with inclusive visibility), with the bias log(mult): logm[k] = log len for
// k < s(t) and logd(t) = log(t - start + 1) for k = s(t). Per token: sf (s(t) as float) and
// logd [B*L]; per row: logm [B*K1]. s(t) never decreases along a row.
struct ConceptMask {
  i64 L, K1;
  float scale;
  const float* sf;
  const float* logd;
  const float* logm;
  std::pair<i64, i64> keys_all(i64 b) const { return {0, i64(sf[b * L + L - 1]) + 1}; }
  std::pair<i64, i64> keys(i64 b, i64 i0, i64 mq) const {
    return {0, i64(sf[b * L + i0 + mq - 1]) + 1};
  }
  std::pair<i64, i64> queries(i64 b, i64 j0, i64) const {
    const float* row = sf + b * L;
    return {std::lower_bound(row, row + L, float(j0)) - row, L};
  }
  DLCM_AMX_TARGET void hide(float* st, i64 b, i64 i0, i64 ncols, i64 j0, i64 nrows) const {
    alignas(64) float s[BQ], d[BQ];  // padding columns: s = -1 hides every key
    const float inv = 1.0f / scale;
    for (i64 r = 0; r < BQ; ++r) {
      const bool real = r < ncols && i0 + r < L;
      s[r] = real ? sf[b * L + i0 + r] : -1.0f;
      d[r] = real ? logd[b * L + i0 + r] * inv : 0.0f;
    }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (i64 j = 0; j < nrows; ++j) {
      float* row = st + j * BQ;
      const i64 kk = j0 + j;
      const __m512 kf = _mm512_set1_ps(float(kk));
      const __m512 lb = _mm512_set1_ps(kk < K1 ? logm[b * K1 + kk] * inv : 0.0f);
      for (i64 r = 0; r < BQ; r += 16) {
        const __m512 sv = _mm512_load_ps(s + r), x = _mm512_load_ps(row + r);
        const __mmask16 lt = _mm512_cmp_ps_mask(kf, sv, _CMP_LT_OQ);
        const __mmask16 eq = _mm512_cmp_ps_mask(kf, sv, _CMP_EQ_OQ);
        __m512 y = _mm512_mask_add_ps(ninf, lt, x, lb);
        y = _mm512_mask_add_ps(y, eq, x, _mm512_load_ps(d + r));
        _mm512_store_ps(row + r, y);
      }
    }
  }
};

template <class Units, class Mask>
DLCM_AMX_TARGET void attention_forward_bf16(float* out, float* lse, const float* q, const float* k,
                                            const float* v, i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv,
                                            i64 hd, float scale, const Mask& mask, bool par) {
  const i64 group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const i64 nqb = (Lq + BQ - 1) / BQ;
  const i64 hdp = (hd + 31) / 32 * 32;
  const i64 Lkp = (Lk + BK - 1) / BK * BK;
  // A large output (a layer's activation, rows hd floats of every head apart) is written with
  // non-temporal stores (ops::stream_output): an ordinary store first reads each line, one
  // scattered miss per 64 bytes (the forward 1.13x alone, session 44).
  const bool nt = stream_output(B * Lq * Hq * hd * i64(sizeof(float)));
  if (nt) count_streamed_output();
#pragma omp parallel if (par)
  {
    amx::AVec<uint16_t> kt(Lkp * hdp), vt(Lkp * hdp), qv(hdp * BQ), qtmp(BQ * hdp), pv(BK * BQ);
    Buf vtmp(size_t(hdp) * BK), st(size_t(BK) * BQ), ot(size_t(hdp) * BQ);
    alignas(64) float m[BQ], l[BQ], corr[BQ], blk[16 * 16];
    const Units units;
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < B * Hq; ++t) {
      const i64 h = t % Hq, b = t / Hq, g = h / group;
      // K and V^T of the keys this head's queries see, in tile layout (block kb at kb * BK *
      // hdp), converted once for all its query blocks while they stay in this core's cache.
      const auto [jlo, jall] = mask.keys_all(b);
      for (i64 j0 = jlo; j0 < jall; j0 += BK) {
        const float* src = k + (b * Lk * Hkv + g) * hd + j0 * ldk;
        amx_rows(kt.data() + j0 * hdp, hdp, src, ldk, std::min(BK, Lk - j0), BK, hd);
        amx_vt(vt.data() + j0 * hdp, vtmp.data(), v + (src - k), ldk, std::min(BK, Lk - j0), hd,
               hdp);
      }
      units.begin();
      for (i64 qb = 0; qb < nqb; ++qb) {
        const i64 i0 = qb * BQ, mq = std::min(BQ, Lq - i0);
        // From the block that holds the first key the tile's row 0 sees.
        const auto [jbeg, jend] = mask.keys(b, i0, mq);
        amx_qt(qv.data(), qtmp.data(), q + ((b * Lq + i0) * Hq + h) * hd, ldq, mq, hd, hdp);
        std::fill(m, m + BQ, -INFINITY);
        std::fill(l, l + BQ, 0.0f);
        for (i64 j0 = jbeg; j0 < jend; j0 += BK) {
          const i64 nk = std::min(BK, jend - j0);
          units.product(st.data(), BQ, kt.data() + j0 * hdp, hdp, qv.data(), 2 * BQ, BK, BQ, hdp,
                        false);
          mask.hide(st.data(), b, i0, mq, j0, nk);
          softmax_cols_tiles(st.data(), nk, scale, m, l, corr, pv.data());
          // O^T columns *= corr, where some corr != 1; the first block writes O^T (acc = false)
          for (i64 i = 0; i < BQ && j0 != jbeg; i += 16) {
            const __m512 c = _mm512_load_ps(corr + i);
            if (!_mm512_cmp_ps_mask(c, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ)) continue;
            for (i64 r = 0; r < hd; ++r) {
              float* o = ot.data() + r * BQ + i;
              _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), c));
            }
          }
          units.product(ot.data(), BQ, vt.data() + j0 * hdp, BK, pv.data(), 2 * BQ, hdp, BQ, BK,
                        j0 != jbeg);
        }
        // out = (O^T)^T / l, 16 x 16 blocks.
        for (i64 r0 = 0; r0 < mq; r0 += 16)
          for (i64 c0 = 0; c0 < hd; c0 += 16) {
            simd::transpose16(blk, 16, ot.data() + c0 * BQ + r0, BQ);  // blk[r][c]
            const __mmask16 mc = simd::tail_mask(hd - c0);
            for (i64 r = 0; r < 16 && r0 + r < mq; ++r) {
              float* o = out + ((b * Lq + i0 + r0 + r) * Hq + h) * hd + c0;
              const __m512 v =
                  _mm512_mul_ps(_mm512_load_ps(blk + r * 16), _mm512_set1_ps(1.0f / l[r0 + r]));
              if (nt && mc == 0xFFFF && (reinterpret_cast<uintptr_t>(o) & 63) == 0)
                _mm512_stream_ps(o, v);
              else
                _mm512_mask_storeu_ps(o, mc, v);
            }
          }
        for (i64 r = 0; r < mq; ++r) lse[(b * Hq + h) * Lq + i0 + r] = m[r] + std::log(l[r]);
      }
      units.end();
    }
    if (nt) _mm_sfence();  // this thread's streamed lines before the region's barrier
  }
}

// ---- Backward on AMX tiles ----
// attention_backward's schedule (one task per batch and kv head, key blocks outer, every
// query head of the group and query block inner), with the scores transposed as in the
// forward, so that P^T and dS^T come out as rows, the layout an A operand wants:
//   S^T = K Q^T, dP^T = V dO^T                       (B operands: Q^T, dO^T, per query block)
//   P^T = exp(scale S^T - lse), dS^T = P^T (dP^T - D) (per query column: vertical vector ops)
//   dV += P^T dO, dK += dS^T Q                        (B operands: dO, Q in the pair layout)
//   dQ^T += K^T dS^T                                  (B operand: dS^T in the pair layout)
// The task converts each query block's four operands once (it owns every query head of its
// group) and each key block's three (K, V rows; K^T) once. dQ^T accumulates per query block in
// FP32 and is added into dq, scaled, at the end; dK, dV per key block, as in the FP32 kernel.
// Key and query blocks lie on the 64 grid; masked entries and padded queries (lse = +inf)
// give P = 0 and dS = 0.

// P^T and dS^T from S^T and dP^T [BK][BQ] (FP32; S^T unscaled with hidden entries -inf), as
// bf16 rows [BK][BQ] (A operands of dV and dK) and dS^T in the pair layout (B operand of dQ^T).
DLCM_GCC105593_BEGIN
DLCM_AMX_TARGET void softmax_grad_tiles(const float* st, const float* dpt, float scale,
                                        const float* lse, const float* D, uint16_t* pa,
                                        uint16_t* dsa, uint16_t* dsb) {
  const __m512i idx = _mm512_load_si512(amx::kPairIdx);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 sc2 = _mm512_mul_ps(_mm512_set1_ps(scale), log2e);  // base 2, as the forward
  for (i64 i = 0; i < BQ; i += 16) {
    const __m512 ls = _mm512_mul_ps(_mm512_load_ps(lse + i), log2e), dd = _mm512_load_ps(D + i);
    for (i64 j = 0; j < BK; j += 2) {
      const __m512 p0 = simd::exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(st + j * BQ + i), sc2, ls));
      const __m512 p1 =
          simd::exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(st + (j + 1) * BQ + i), sc2, ls));
      const __m512 d0 = _mm512_mul_ps(p0, _mm512_sub_ps(_mm512_load_ps(dpt + j * BQ + i), dd));
      const __m512 d1 =
          _mm512_mul_ps(p1, _mm512_sub_ps(_mm512_load_ps(dpt + (j + 1) * BQ + i), dd));
      _mm256_store_si256((__m256i*)(pa + j * BQ + i), (__m256i)_mm512_cvtneps_pbh(p0));
      _mm256_store_si256((__m256i*)(pa + (j + 1) * BQ + i), (__m256i)_mm512_cvtneps_pbh(p1));
      _mm256_store_si256((__m256i*)(dsa + j * BQ + i), (__m256i)_mm512_cvtneps_pbh(d0));
      _mm256_store_si256((__m256i*)(dsa + (j + 1) * BQ + i), (__m256i)_mm512_cvtneps_pbh(d1));
      _mm512_store_si512(dsb + j * BQ + 2 * i,
                         _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(d1, d0)));
    }
  }
}
DLCM_GCC105593_END

template <class Units, class Mask>
DLCM_AMX_TARGET void attention_backward_bf16(float* dq, float* dk, float* dv, const float* dout,
                                             const float* lse, const float* D, const float* q,
                                             const float* k, const float* v, i64 B, i64 Lq,
                                             i64 Lk, i64 Hq, i64 Hkv, i64 hd, float scale,
                                             const Mask& mask, bool par, bool acc) {
  const i64 group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const i64 hdp = (hd + 31) / 32 * 32, nqb = (Lq + BQ - 1) / BQ;
  const i64 nblk = group * nqb, opw = BQ * hdp;  // query blocks of a task; words per operand
  // Large gradients written without accumulation: non-temporal stores (ops::stream_output),
  // as the forward's output, for rows hd floats of every head apart
  const bool nt_q = !acc && stream_output(B * Lq * Hq * hd * i64(sizeof(float)));
  const bool nt_kv = !acc && stream_output(B * Lk * Hkv * hd * i64(sizeof(float)));
  if (nt_q || nt_kv) count_streamed_output();
#pragma omp parallel if (par)
  {
    // Per query block (h, qb): Q^T, dO^T (B operands of the scores), Q, dO (pair layout), lse
    // and D padded with +inf and 0, and the dQ^T accumulator.
    amx::AVec<uint16_t> qt(nblk * opw), gt(nblk * opw), qp(nblk * opw), gp(nblk * opw),
        tmp(opw);
    Buf ls(size_t(nblk) * BQ), dd(size_t(nblk) * BQ), dqt(size_t(nblk) * opw);
    // Per key block: K and V rows, K^T; scores, P^T, dS^T; dK and dV accumulators.
    amx::AVec<uint16_t> ka(BK * hdp), va(BK * hdp), kt(BK * hdp), pa(BK * BQ), dsa(BK * BQ),
        dsb(BK * BQ);
    Buf st(size_t(BK) * BQ), dpt(size_t(BK) * BQ), ktmp(size_t(hdp) * BK), dka(size_t(BK) * hdp),
        dva(size_t(BK) * hdp);
    const Units units;
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < B * Hkv; ++t) {
      const i64 b = t / Hkv, g = t % Hkv;
      const float* kp = k + (b * Lk * Hkv + g) * hd;
      const float* vp = v + (b * Lk * Hkv + g) * hd;
      for (i64 hh = 0; hh < group; ++hh)
        for (i64 qb = 0; qb < nqb; ++qb) {
          const i64 h = g * group + hh, i0 = qb * BQ, mq = std::min(BQ, Lq - i0), x = hh * nqb + qb;
          const i64 rowoff = ((b * Lq + i0) * Hq + h) * hd;
          amx_qt(qt.data() + x * opw, tmp.data(), q + rowoff, ldq, mq, hd, hdp);
          amx_qt(gt.data() + x * opw, tmp.data(), dout + rowoff, ldq, mq, hd, hdp);
          amx_pairs(qp.data() + x * opw, q + rowoff, ldq, mq, BQ, hd, hdp);
          amx_pairs(gp.data() + x * opw, dout + rowoff, ldq, mq, BQ, hd, hdp);
          for (i64 r = 0; r < BQ; ++r) {
            const i64 at = (b * Hq + h) * Lq + i0 + r;
            ls[x * BQ + r] = r < mq ? lse[at] : INFINITY;
            dd[x * BQ + r] = r < mq ? D[at] : 0.0f;
          }
        }
      std::fill(dqt.begin(), dqt.end(), 0.0f);
      units.begin();
      const i64 jend = mask.keys_all(b).second;  // keys some query sees
      for (i64 j0 = 0; j0 < jend; j0 += BK) {
        const i64 nk = std::min(BK, jend - j0);
        // Queries that see some key of the block: [istart, iend).
        const auto [istart, iend] = mask.queries(b, j0, nk);
        if (istart >= iend) {
          if (!acc) zero_key_grads(dk, dv, b, g, j0, j0 + nk, Lk, Hkv, hd);
          continue;
        }
        amx_rows(ka.data(), hdp, kp + j0 * ldk, ldk, nk, BK, hd);
        amx_rows(va.data(), hdp, vp + j0 * ldk, ldk, nk, BK, hd);
        amx_vt(kt.data(), ktmp.data(), kp + j0 * ldk, ldk, nk, hd, hdp);
        std::fill(dka.begin(), dka.end(), 0.0f);
        std::fill(dva.begin(), dva.end(), 0.0f);
        for (i64 hh = 0; hh < group; ++hh)
          for (i64 qb = istart / BQ; qb * BQ < iend; ++qb) {
            const i64 x = hh * nqb + qb, i0 = qb * BQ;
            units.product(st.data(), BQ, ka.data(), hdp, qt.data() + x * opw, 2 * BQ, BK, BQ, hdp,
                          false);
            units.product(dpt.data(), BQ, va.data(), hdp, gt.data() + x * opw, 2 * BQ, BK, BQ, hdp,
                          false);
            // Hidden entries (all BQ columns; padded queries are zeroed by lse = +inf). Keys
            // >= nk are after every query that sees the block: the mask hides them.
            mask.hide(st.data(), b, i0, BQ, j0, BK);
            softmax_grad_tiles(st.data(), dpt.data(), scale, ls.data() + x * BQ,
                               dd.data() + x * BQ, pa.data(), dsa.data(), dsb.data());
            units.product(dva.data(), hdp, pa.data(), BQ, gp.data() + x * opw, 2 * hdp, BK, hdp,
                          BQ, true);
            units.product(dka.data(), hdp, dsa.data(), BQ, qp.data() + x * opw, 2 * hdp, BK, hdp,
                          BQ, true);
            units.product(dqt.data() + x * opw, BQ, kt.data(), BK, dsb.data(), 2 * BQ, hdp, BQ, BK,
                          true);
          }
        add_key_grads(dk, dv, dka.data(), dva.data(), hdp, scale, b, g, j0, nk, Lk, Hkv, hd, acc,
                      nt_kv);
      }
      units.end();
      if (!acc) zero_key_grads(dk, dv, b, g, jend, Lk, Lk, Hkv, hd);
      // dq += scale (dQ^T)^T, 16 x 16 blocks.
      alignas(64) float blk[16 * 16];
      for (i64 hh = 0; hh < group; ++hh)
        for (i64 qb = 0; qb < nqb; ++qb) {
          const i64 h = g * group + hh, i0 = qb * BQ, mq = std::min(BQ, Lq - i0);
          const float* src = dqt.data() + (hh * nqb + qb) * opw;
          for (i64 r0 = 0; r0 < mq; r0 += 16)
            for (i64 c0 = 0; c0 < hd; c0 += 16) {
              simd::transpose16(blk, 16, src + c0 * BQ + r0, BQ);  // blk[r][c]
              const __mmask16 mc = simd::tail_mask(hd - c0);
              for (i64 r = 0; r < 16 && r0 + r < mq; ++r) {
                float* d = dq + ((b * Lq + i0 + r0 + r) * Hq + h) * hd + c0;
                const __m512 prev = acc ? _mm512_maskz_loadu_ps(mc, d) : _mm512_setzero_ps();
                const __m512 x =
                    _mm512_fmadd_ps(_mm512_load_ps(blk + r * 16), _mm512_set1_ps(scale), prev);
                if (nt_q && mc == 0xFFFF && (reinterpret_cast<uintptr_t>(d) & 63) == 0)
                  _mm512_stream_ps(d, x);
                else
                  _mm512_mask_storeu_ps(d, mc, x);
              }
            }
        }
    }
    if (nt_q || nt_kv) _mm_sfence();  // this thread's streamed lines before the region's barrier
  }
}
#endif

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
  parallel_region(par, [&] {
    // this thread's scratch, kept between calls (a decode step makes one call per layer):
    // Q's rows, S, O, m, l, and K^T's block on the tile path; segments of whole cache lines
    const auto seg = [](i64 n) { return (n + 15) / 16 * 16; };
    const bool tiles = R > kDotRows;
    float* const qs = attention_scratch(size_t(seg(R * hd) + seg(R * BK) + seg(R * hd) +
                                               2 * seg(R) + (tiles ? hd * BK : 0)));
    float* const s = qs + seg(R * hd);
    float* const o = s + seg(R * BK);
    float* const m = o + seg(R * hd);
    float* const l = m + seg(R);
    float* const kt = l + seg(R);
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < B * Hkv; ++t) {
      const i64 b = t / Hkv, g = t % Hkv;
      for (i64 i = 0; i < Lq; ++i)  // the group's heads are adjacent rows of q
        std::copy_n(q + ((b * Lq + i) * Hq + g * group) * hd, group * hd,
                    qs + i * group * hd);
      const float* kp = k + (b * Lk * Hkv + g) * hd;
      const float* vp = v + (b * Lk * Hkv + g) * hd;
      std::fill(m, m + R, -INFINITY);
      std::fill(l, l + R, 0.0f);
      std::fill(o, o + R * hd, 0.0f);
      for (i64 j0 = jbeg; j0 < jend; j0 += BK) {
        const i64 nk = std::min(BK, jend - j0);
        if (!tiles) {  // S [R, nk]
          scores_dot(s, BK, qs, R, kp + j0 * ldk, ldk, nk, hd, scale);
        } else {
          pack_t(kt, BK, kp + j0 * ldk, ldk, nk, hd);
          tile_mm(s, BK, qs, hd, 1, kt, BK, R, nk, hd, scale, false);
        }
        for (i64 r = 0; r < R; ++r) {
          float* row = s + r * BK;
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
            float* orow = o + r * hd;
#pragma omp simd
            for (i64 x = 0; x < hd; ++x) orow[x] *= corr;
          }
        }
        tile_mm(o, hd, s, BK, 1, vp + j0 * ldk, ldk, R, hd, nk, 1.0f, true);  // O += P V
      }
      for (i64 r = 0; r < R; ++r) {
        const i64 i = r / group, h = g * group + r % group;
        const float inv = 1.0f / l[r];
        float* dst = out + ((b * Lq + i) * Hq + h) * hd;
        const float* orow = o + r * hd;
#pragma omp simd
        for (i64 x = 0; x < hd; ++x) dst[x] = orow[x] * inv;
        lse[(b * Hq + h) * Lq + i] = m[r] + std::log(l[r]);
      }
    }
  });
}

}  // namespace

namespace {
// D[b, h, i] = dO_i . O_i (the softmax Jacobian's row term) for out/dout [B, Lq, Hq, hd], in
// lse's layout [B, Hq, Lq].
Buf row_terms(const float* dout, const float* out, i64 B, i64 Lq, i64 Hq, i64 hd, bool par) {
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
  return D;
}
}  // namespace

#ifdef DLCM_AVX512
void concept_attention_forward_bf16(AttentionUnits u, float* out, float* lse, const float* q,
                                    const float* k, const float* v, i64 B, i64 L, i64 K1, i64 Hq,
                                    i64 Hkv, i64 hd, float scale, const float* sf,
                                    const float* logd, const float* logm, bool par) {
  const ConceptMask mask{L, K1, scale, sf, logd, logm};
  with_units(u, [&](auto units) {
    attention_forward_bf16<decltype(units)>(out, lse, q, k, v, B, L, K1, Hq, Hkv, hd, scale, mask,
                                            par);
  });
}

void concept_attention_backward_bf16(AttentionUnits u, float* dq, float* dk, float* dv,
                                     const float* dout, const float* out, const float* lse,
                                     const float* q, const float* k, const float* v, i64 B, i64 L,
                                     i64 K1, i64 Hq, i64 Hkv, i64 hd, float scale, const float* sf,
                                     const float* logd, const float* logm, bool par) {
  const Buf D = row_terms(dout, out, B, L, Hq, hd, par);
  const ConceptMask mask{L, K1, scale, sf, logd, logm};
  with_units(u, [&](auto units) {
    attention_backward_bf16<decltype(units)>(dq, dk, dv, dout, lse, D.data(), q, k, v, B, L, K1,
                                             Hq, Hkv, hd, scale, mask, par, true);
  });
}
#endif

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       i64 B, i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset,
                       float scale, i64 window) {
  check_shapes("attention_forward", B, Lq, Lk, Hq, Hkv, hd, q_offset, window);
  note_parallel_entry();
  const i64 group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const i64 nqb = (Lq + BQ - 1) / BQ;
  const i64 ntask = B * Hq * nqb;
  const bool par = parallel_worth(B * Hq * Lq * keys_seen(Lq, Lk, q_offset, window) * hd);
  static_assert(BQ == 64, "attention_forward_uses_rows (ops.h) assumes 64 rows per tile");
  if (attention_forward_uses_rows(Lq, Hq, Hkv))
    return attention_forward_rows(out, lse, q, k, v, B, Lq, Lk, Hq, Hkv, hd, q_offset, scale,
                                  window, par);
  const TileProduct mm;
#ifdef DLCM_AVX512
  if (const AttentionUnits u = attention_units(); u != AttentionUnits::Fp32 && scale > 0) {
    const CausalMask mask{Lq, Lk, q_offset, window};
    return with_units(u, [&](auto units) {
      attention_forward_bf16<decltype(units)>(out, lse, q, k, v, B, Lq, Lk, Hq, Hkv, hd, scale,
                                              mask, par);
    });
  }
#endif
  parallel_region(par, [&] {
    // Q^T [hd, BQ], S^T [BK, BQ], O [BQ, hd]: each task writes what it reads
    float* const qt = attention_scratch(size_t(hd) * BQ + size_t(BK) * BQ + size_t(BQ) * hd);
    float* const st = qt + hd * BQ;
    float* const o = st + BK * BQ;
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
      pack_t(qt, BQ, qp, ldq, mq, hd);  // Q^T [hd, mq], packed once for all key blocks
      std::fill(m, m + BQ, -INFINITY);
      std::fill(l, l + BQ, 0.0f);
      std::fill(o, o + mq * hd, 0.0f);
      for (i64 j0 = jbeg; j0 < jend; j0 += BK) {
        const i64 nk = std::min(BK, jend - j0);
        const i64 off = q_offset + i0 - j0;  // tile query r sees tile key j iff j <= r + off
        const bool diag = nk - 1 > off;       // some key in this block is hidden from row 0
        if (!diag) {
          mm(st, BQ, kp + j0 * ldk, ldk, 1, qt, BQ, nk, mq, hd, scale, false);
        } else {
          mm_causal(mm, st, BQ, kp + j0 * ldk, ldk, 1, qt, BQ, nk, mq, hd, scale,
                    false, off, false, false);
          // Causal mask (also covers entries mm_causal skipped): key j hides from i < j - off.
          for (i64 j = 0; j < nk; ++j)
            std::fill_n(st + j * BQ, std::clamp<i64>(j - off, 0, mq), -INFINITY);
        }
        // Window mask: key j hides from rows r >= j - off + window (the last row sees key 0
        // of the block iff mq - 1 + off < window).
        if (window > 0 && mq - 1 + off >= window)
          for (i64 j = 0; j < nk; ++j) {
            const i64 r0 = std::clamp<i64>(j - off + window, 0, mq);
            std::fill(st + j * BQ + r0, st + j * BQ + mq, -INFINITY);
          }
        softmax_cols(st, nk, mq, m, l, corr);  // S^T -> P^T, running stats
        for (i64 r = 0; r < mq; ++r)
          if (corr[r] != 1.0f) {
            float* orow = o + r * hd;
            const float c = corr[r];
#pragma omp simd
            for (i64 x = 0; x < hd; ++x) orow[x] *= c;
          }
        // O += P V, P read transposed out of P^T.
        if (!diag)
          mm(o, hd, st, 1, BQ, vp + j0 * ldk, ldk, mq, hd, nk, 1.0f, true);
        else
          mm_causal(mm, o, hd, st, 1, BQ, vp + j0 * ldk, ldk, mq, hd, nk, 1.0f, true,
                    off, true, true);
      }
      for (i64 r = 0; r < mq; ++r) {
        const float inv = 1.0f / l[r];
        float* dst = out + ((b * Lq + i0 + r) * Hq + h) * hd;
        const float* orow = o + r * hd;
#pragma omp simd
        for (i64 x = 0; x < hd; ++x) dst[x] = orow[x] * inv;
        lse[(b * Hq + h) * Lq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v, i64 B,
                        i64 Lq, i64 Lk, i64 Hq, i64 Hkv, i64 hd, i64 q_offset, float scale,
                        i64 window, bool accumulate) {
  check_shapes("attention_backward", B, Lq, Lk, Hq, Hkv, hd, q_offset, window);
  note_parallel_entry();
  const i64 group = Hq / Hkv, ldq = Hq * hd, ldk = Hkv * hd;
  const bool par = parallel_worth(B * Hq * Lq * keys_seen(Lq, Lk, q_offset, window) * hd);
  const TileProduct mm;

  const Buf D = row_terms(dout, out, B, Lq, Hq, hd, par);

#ifdef DLCM_AVX512
  if (const AttentionUnits u = attention_units(); u != AttentionUnits::Fp32 && scale > 0) {
    const CausalMask mask{Lq, Lk, q_offset, window};
    return with_units(u, [&](auto units) {
      attention_backward_bf16<decltype(units)>(dq, dk, dv, dout, lse, D.data(), q, k, v, B, Lq,
                                               Lk, Hq, Hkv, hd, scale, mask, par, accumulate);
    });
  }
#endif
  // dk and dv overwritten and large: non-temporal stores at the avx512 level, as the BF16
  // kernel's (dq accumulates in place here, so it keeps ordinary ones)
#ifdef DLCM_AVX512
  const bool nt_kv = !accumulate && stream_output(B * Lk * Hkv * hd * i64(sizeof(float)));
#else
  const bool nt_kv = false;
#endif
  if (nt_kv) count_streamed_output();
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
      if (!accumulate) {  // overwrite: this task's dq rows start at 0, unseen keys get 0
        for (i64 i = 0; i < Lq; ++i)
          std::fill_n(dq + ((b * Lq + i) * Hq + g * group) * hd, group * hd, 0.0f);
        zero_key_grads(dk, dv, b, g, jend, Lk, Lk, Hkv, hd);
      }
      for (i64 j0 = 0; j0 < jend; j0 += BK) {
        const i64 nk = std::min(BK, jend - j0);
        const i64 istart = std::max<i64>(0, j0 - q_offset);  // first query that sees key j0
        // One past the last query that sees the block's last key (position < key + window).
        const i64 iend =
            window > 0 ? std::clamp<i64>(j0 + nk - 1 + window - q_offset, 0, Lq) : Lq;
        if (istart >= iend) {  // cached keys below every query's window
          if (!accumulate) zero_key_grads(dk, dv, b, g, j0, j0 + nk, Lk, Hkv, hd);
          continue;
        }
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
        add_key_grads(dk, dv, dka.data(), dva.data(), hd, 1.0f, b, g, j0, nk, Lk, Hkv, hd,
                      accumulate, nt_kv);
      }
    }
    if (nt_kv) _mm_sfence();  // this thread's streamed lines before the region's barrier
  }
}

}  // namespace dlcm::ops::DLCM_ISA_NS
