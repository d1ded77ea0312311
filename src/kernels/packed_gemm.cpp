// Packed small-M products (see packed_gemm.h). Micro-kernel: up to MR rows x 64 columns (four
// 16-wide FP32 accumulators per row), k in order from 0 to K-1 for every row, so a row's result
// is bit for bit the same whatever M is and whichever rows share its block (a step's row equals
// the same row in a prefill). Without AVX-512 a portable loop with the same order runs instead.
// The micro-kernels carry their own target attribute and run only when the kernel level in use
// (kernels/isa.h) is avx512, so the portable build has them too.
#include "kernels/packed_gemm.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/parallel.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "kernels/ops.h"

#define DLCM_PACKED_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,prfchw")))

namespace dlcm::ops {

namespace {

constexpr i64 kNB = 64;     // output columns per block
constexpr i64 kMRf32 = 6;   // rows per FP32 micro-kernel call (24 accumulators)
constexpr i64 kMRf32x = 7;  // the same for one row tile where 7 need fewer calls
constexpr i64 kMRbf16 = 4;  // rows per BF16 call (16 accumulators + 8 widened W vectors)
constexpr i64 kMRq8 = 6;    // rows per int8 call (24 accumulators + 4 widened W vectors)
constexpr i64 kRows = 96;   // rows per parallel tile (a multiple of kMRf32, kMRbf16, kMRq8)
// BF16 / int8 products of at least this many rows widen each column block's weights to FP32
// once per thread (exact) and run the FP32 kernel over them, instead of widening in every
// micro-kernel call: 1.07-1.25x (int8) and 1.01-1.19x (BF16) from 42 to 512 rows, 0.72-0.94x
// below 32 (one core, docs/performance.md, session 22). Each row's k order is the same either
// way, so the bits are too.
constexpr i64 kWidenRows = 40;
std::atomic<bool> g_widen{env_switch("DLCM_PACKED_WIDEN",
                                     "BF16 / int8 stream products of many rows widen each weight block once",
                                     "BF16 / int8 stream products widen the weights in every call")};

thread_local const PackedWeights* t_active = nullptr;
std::atomic<bool> g_swiglu{env_switch("DLCM_PACKED_SWIGLU",
                                      "stream FFNs apply SwiGLU in the gate/up product's epilogue",
                                      "stream FFNs run SwiGLU as a pass of its own")};
// Each micro-kernel call of a product with several calls per panel asks for its output lines
// with write intent when it starts (see prefetch_c).
std::atomic<bool> g_prefetch_c{env_switch("DLCM_PACKED_PREFETCH_C",
                                          "stream products prefetch their output lines for writing",
                                          "stream products store to their output lines unprefetched")};

// Cache lines of the next column block's panel that a micro-kernel call asks for while it
// works (prefetcht0, measured a little ahead of t1): `per_step` lines at each of its k steps
// until `left` are asked for. The calls of one panel split the next panel among them, so that
// it streams in from memory while the current one is multiplied from cache (the hardware
// prefetcher alone leaves a product of a few dozen rows waiting on memory: ~165 against ~250
// GFLOP/s with W in cache).
struct Prefetch {
  const char* p = nullptr;
  i64 per_step = 0, left = 0;
  bool out = false;  // the call prefetches its output lines for writing first (prefetch_c)
  // Call g of `calls` over a panel: its share of the `lines` cache lines of `target` (nullptr:
  // none), spread over its `steps` k steps.
  void share(const char* target, i64 lines, i64 g, i64 calls, i64 steps) {
    if (!target) return;
    const i64 l0 = lines * g / calls, l1 = lines * (g + 1) / calls;
    p = target + 64 * l0;
    left = l1 - l0;
    per_step = (left + steps - 1) / steps;
  }
  void step() {
    if (left <= 0) return;
    for (i64 j = 0; j < per_step; ++j) _mm_prefetch(p + 64 * j, _MM_HINT_T0);
    p += 64 * per_step;
    left -= per_step;
  }
};

// The AVX-512 code sits in a namespace named like the kernel variants' (the isa_baseline check
// allows AVX instructions only there).
namespace isa_avx512 {

// C[c] = alpha * acc for the block's valid columns (n of 64).
DLCM_PACKED_AVX512 inline void store_block(float* C, const __m512 acc[4], float alpha, i64 n) {
  const __m512 va = _mm512_set1_ps(alpha);
  for (int j = 0; j < 4; ++j) {
    const i64 left = n - j * 16;
    if (left <= 0) break;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    _mm512_mask_storeu_ps(C + j * 16, m, _mm512_mul_ps(va, acc[j]));
  }
}

// Asks for a call's MR x n output lines with write intent (prefetchw) before it accumulates, so
// that its stores at the end find them in cache. The output buffers of a stack's first layer
// (and of every other stack, the cross-attention, the router) were last written one prefill
// ago and have left the caches; a store that misses waits for the line's read-for-ownership,
// and a call's 24 missing stores stalled it: those products ran 6-12% slower than the same
// shape in the layers after (docs/performance.md, session 27). Only where a panel serves
// several calls (a prefill's rows, like the next panel's prefetch): a decode step's one call
// per panel writes one row, next to the previous block's. Only cache lines move.
template <int MR>
DLCM_PACKED_AVX512 inline __attribute__((always_inline)) void prefetch_c(float* C, i64 ldc, i64 n,
                                                                         const Prefetch& pf) {
  if (!pf.out) return;
  for (int i = 0; i < MR; ++i)
    for (i64 j = 0; j < n; j += 16) __builtin_prefetch(C + i * ldc + j, 1, 3);
}

// acc[i][:] = sum over k of A[i][k] * W[k][:] for the MR rows of one column block, k in order;
// `load(k, b)` widens step k's 64 weights to FP32 (one loader per packed format).
template <int MR, class Load>
DLCM_PACKED_AVX512 inline __attribute__((always_inline)) void accumulate(
    __m512 (&acc)[MR][4], const float* A, i64 lda, i64 K, const Prefetch& prefetch, Load load) {
  Prefetch pf = prefetch;
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (i64 k = 0; k < K; ++k) {
    pf.step();
    __m512 b[4];
    load(k, b);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
}

struct LoadF32 {
  static constexpr int kMaxRows = kMRf32x;  // rows per call at most (fp32_rows_per_call)
  const float* pb;
  DLCM_PACKED_AVX512 inline __attribute__((always_inline)) void operator()(i64 k, __m512 (&b)[4]) const {
    for (int j = 0; j < 4; ++j) b[j] = _mm512_loadu_ps(pb + k * kNB + 16 * j);
  }
};
struct LoadQ8 {  // int8 -> FP32, exact
  static constexpr int kMaxRows = kMRq8;
  const int8_t* pb;
  DLCM_PACKED_AVX512 inline __attribute__((always_inline)) void operator()(i64 k, __m512 (&b)[4]) const {
    for (int j = 0; j < 4; ++j)
      b[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(pb + k * kNB + 16 * j))));
  }
};

// Weight-only BF16: A stays FP32; each 32-bit lane of the packed block holds (W[c][k],
// W[c][k+1]) as BF16, which widen to FP32 exactly (a shift, a mask). k in order, as accumulate.
template <int MR>
DLCM_PACKED_AVX512 inline __attribute__((always_inline)) void accumulate_bf16w(
    __m512 (&acc)[MR][4], const float* A, i64 lda, const uint16_t* pb, i64 K,
    const Prefetch& prefetch) {
  Prefetch pf = prefetch;
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  for (i64 k = 0; k < K; k += 2) {
    pf.step();
    const uint16_t* b = pb + k * kNB;
    __m512 be[4], bo[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(b + 32 * j);
      be[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      bo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    }
    const bool odd = k + 1 < K;  // an odd K's padding k is zero: skip its product
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(a, be[j], acc[i][j]);
      if (odd) {
        const __m512 a2 = _mm512_set1_ps(A[i * lda + k + 1]);
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(a2, bo[j], acc[i][j]);
      }
    }
  }
}

// acc[i][:] *= the column block's scales (int8: W[c][k] = scale[c] * q).
template <int MR>
DLCM_PACKED_AVX512 inline __attribute__((always_inline)) void scale_sums(__m512 (&acc)[MR][4],
                                                                         const float* scale) {
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_mul_ps(_mm512_loadu_ps(scale + 16 * j), acc[i][j]);
}

// The sums of one call's rows against one column block, per packed format, k in order. SumLoad:
// FP32 weights, int8 ones widened in the call (LoadQ8) or BF16 / int8 ones widened once
// (LoadF32), with int8's column scales (else nullptr): weight-only int8 multiplies the sums by
// the scales once at the end, C[c] = alpha * (scale[c] * sum_k A[k] q[k][c]). SumBf16: BF16
// weights widened in the call (accumulate_bf16w).
template <class Load>
struct SumLoad {
  static constexpr int kMaxRows = Load::kMaxRows;
  Load load;
  const float* scale;
  template <int MR>
  DLCM_PACKED_AVX512 inline __attribute__((always_inline)) void run(
      __m512 (&acc)[MR][4], const float* A, i64 lda, i64 K, const Prefetch& pf) const {
    accumulate<MR>(acc, A, lda, K, pf, load);
    if (scale) scale_sums(acc, scale);
  }
};
struct SumBf16 {  // BF16 weights widened in the call
  static constexpr int kMaxRows = kMRbf16;
  const uint16_t* pb;
  template <int MR>
  DLCM_PACKED_AVX512 inline __attribute__((always_inline)) void run(
      __m512 (&acc)[MR][4], const float* A, i64 lda, i64 K, const Prefetch& pf) const {
    accumulate_bf16w<MR>(acc, A, lda, pb, K, pf);
  }
};

// One call of packed_gemm_parts: C = alpha * the MR x n sums of one column block (every format).
template <int MR, class Sum>
DLCM_PACKED_AVX512 void kernel_block(float* C, i64 ldc, const float* A, i64 lda, const Sum& sum,
                                     i64 K, float alpha, i64 n, const Prefetch& pf) {
  prefetch_c<MR>(C, ldc, n, pf);
  __m512 acc[MR][4];
  sum.template run<MR>(acc, A, lda, K, pf);
  for (int i = 0; i < MR; ++i) store_block(C + i * ldc, acc[i], alpha, n);
}

// A fused gate/up call (packed_gemm_swiglu): the sums over W1's block into sa, then over W3's
// into sb (rows of 64, stored as the plain kernels store them with alpha 1), H's lines
// prefetched first.
template <int MR, class Sum>
DLCM_PACKED_AVX512 void kernel_pair(float* sa, float* sb, float* H, i64 ldh, const float* A,
                                    i64 lda, const Sum& wa, const Sum& wb, i64 K, i64 n,
                                    const Prefetch& pfa, const Prefetch& pfb) {
  prefetch_c<MR>(H, ldh, n, pfa);
  __m512 acc[MR][4];
  wa.template run<MR>(acc, A, lda, K, pfa);
  for (int i = 0; i < MR; ++i) store_block(sa + i * kNB, acc[i], 1.f, kNB);
  wb.template run<MR>(acc, A, lda, K, pfb);
  for (int i = 0; i < MR; ++i) store_block(sb + i * kNB, acc[i], 1.f, kNB);
}

// One block of mr <= MR rows, the row count made a template argument from MR down (no lambdas
// here: they would not inherit the target attribute). Called with Sum::kMaxRows, so BF16 (at
// most kMRbf16 rows per call) instantiates no kernel for more rows than it takes.
template <int MR, class Sum>
DLCM_PACKED_AVX512 void block(float* C, i64 ldc, const float* A, i64 lda, const Sum& sum, i64 K,
                              float alpha, i64 n, i64 mr, const Prefetch& pf) {
  if constexpr (MR > 1)
    if (mr < MR) return block<MR - 1>(C, ldc, A, lda, sum, K, alpha, n, mr, pf);
  kernel_block<MR>(C, ldc, A, lda, sum, K, alpha, n, pf);
}
template <int MR, class Sum>
DLCM_PACKED_AVX512 void block_pair(float* sa, float* sb, float* H, i64 ldh, const float* A,
                                   i64 lda, const Sum& wa, const Sum& wb, i64 K, i64 n, i64 mr,
                                   const Prefetch& pfa, const Prefetch& pfb) {
  if constexpr (MR > 1)
    if (mr < MR) return block_pair<MR - 1>(sa, sb, H, ldh, A, lda, wa, wb, K, n, mr, pfa, pfb);
  kernel_pair<MR>(sa, sb, H, ldh, A, lda, wa, wb, K, n, pfa, pfb);
}
// A column block's weights widened to FP32 [K][64] (exact): int8 values as they are (the
// scales stay for the epilogue), BF16 pairs split into their two k.
DLCM_PACKED_AVX512 void widen_q8(float* dst, const int8_t* pb, i64 K) {
  const LoadQ8 load{pb};
  for (i64 k = 0; k < K; ++k) {
    __m512 b[4];
    load(k, b);
    for (int j = 0; j < 4; ++j) _mm512_store_ps(dst + k * kNB + 16 * j, b[j]);
  }
}
DLCM_PACKED_AVX512 void widen_bf16(float* dst, const uint16_t* pb, i64 K) {
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  for (i64 k = 0; k < K; k += 2)
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(pb + k * kNB + 32 * j);
      _mm512_store_ps(dst + k * kNB + 16 * j, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
      if (k + 1 < K)
        _mm512_store_ps(dst + (k + 1) * kNB + 16 * j,
                        _mm512_castsi512_ps(_mm512_and_si512(v, hi)));
    }
}

}  // namespace isa_avx512

// Portable block: the same order of k, FP32 arithmetic.
template <class GetB>
void block_ref(float* C, i64 ldc, const float* A, i64 lda, i64 mr, i64 K, float alpha, i64 n,
               GetB b_at) {
  for (i64 i = 0; i < mr; ++i)
    for (i64 c = 0; c < n; ++c) {
      float s = 0;
      for (i64 k = 0; k < K; ++k) s += A[i * lda + k] * b_at(k, c);
      C[i * ldc + c] = alpha * s;
    }
}

}  // namespace

// One call's rows against column block `w` of p in the portable loop, in p's format; int8
// (sc: the block's column scales) C = alpha * (scale * sum), as the AVX-512 kernel.
static void block_portable(float* C, i64 ldc, const float* A, i64 lda, const PackedMatrix& p,
                           const char* w, const float* sc, i64 mr, float alpha, i64 n) {
  const i64 K = p.K;
  if (p.fmt == PackFormat::F32) {
    const float* f = reinterpret_cast<const float*>(w);
    block_ref(C, ldc, A, lda, mr, K, alpha, n, [&](i64 k, i64 c) { return f[k * kNB + c]; });
  } else if (p.fmt == PackFormat::BF16) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(w);
    block_ref(C, ldc, A, lda, mr, K, alpha, n,
              [&](i64 k, i64 c) { return bf16_to_float(h[(k / 2) * 2 * kNB + c * 2 + k % 2]); });
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(w);
    block_ref(C, ldc, A, lda, mr, K, 1.f, n, [&](i64 k, i64 c) { return float(q[k * kNB + c]); });
    for (i64 i = 0; i < mr; ++i)
      for (i64 c = 0; c < n; ++c) C[i * ldc + c] = alpha * (sc[c] * C[i * ldc + c]);
  }
}

bool packed_gemm_native() { return isa() == Isa::Avx512; }

void set_packed_widen(bool on) { g_widen = on; }
void set_packed_prefetch_c(bool on) { g_prefetch_c = on; }
bool packed_prefetch_c_on() { return g_prefetch_c.load(); }
bool packed_widen_on() { return g_widen.load(); }

PackFormat parse_pack_format(const std::string& s, const std::string& what) {
  if (s == "fp32") return PackFormat::F32;
  if (s == "bf16") return PackFormat::BF16;
  if (s == "int8") return PackFormat::Q8;
  fail(what, ": expected \"fp32\", \"bf16\" or \"int8\" (weight-only, per-column scales), got \"",
       s, "\"");
}

const char* pack_format_name(PackFormat f) {
  return f == PackFormat::BF16 ? "bf16" : f == PackFormat::Q8 ? "int8" : "fp32";
}

i64 packed_bytes(const i64* N, int n, i64 K, PackFormat fmt) {
  i64 blocks = 0;
  for (int i = 0; i < n; ++i) blocks += (N[i] + kNB - 1) / kNB;
  const i64 Kp = fmt == PackFormat::BF16 ? (K + 1) / 2 * 2 : K;
  const i64 elem = fmt == PackFormat::BF16 ? 2 : fmt == PackFormat::Q8 ? 1 : 4;
  return blocks * kNB * Kp * elem;
}

void pack_matrices(PackedMatrix& p, const float* const* W, const i64* N, int n, i64 K,
                   PackFormat fmt, char* dst) {
  const bool bf16 = fmt == PackFormat::BF16, q8 = fmt == PackFormat::Q8;
  DLCM_CHECK(n >= 1, "internal: pack_matrices without a matrix");
  p.K = K;
  p.fmt = fmt;
  p.Kp = bf16 ? (K + 1) / 2 * 2 : K;
  p.parts.assign(N, N + n);
  p.part_blk0.assign(1, 0);
  p.N = 0;
  for (int i = 0; i < n; ++i) {
    p.N += N[i];
    p.part_blk0.push_back(p.part_blk0.back() + (N[i] + kNB - 1) / kNB);
  }
  p.Np = p.part_blk0.back() * kNB;
  Buf().swap(p.f);
  std::vector<uint16_t>().swap(p.h);
  std::vector<int8_t>().swap(p.q);
  p.qscale.assign(q8 ? p.Np : 0, 0.f);
  p.data_bytes = packed_bytes(N, n, K, fmt);
  if (!dst) {  // a copy of its own
    if (bf16) {
      p.h.resize(p.Np * p.Kp);
      dst = reinterpret_cast<char*>(p.h.data());
    } else if (q8) {
      p.q.resize(p.Np * K);
      dst = reinterpret_cast<char*>(p.q.data());
    } else {
      p.f.resize(p.Np * K);
      dst = reinterpret_cast<char*>(p.f.data());
    }
  }
  std::memset(dst, 0, size_t(p.data_bytes));  // padding columns and k are zero
  p.data = dst;
  float* const f = reinterpret_cast<float*>(dst);
  uint16_t* const h = reinterpret_cast<uint16_t*>(dst);
  int8_t* const q = reinterpret_cast<int8_t*>(dst);
  std::vector<uint16_t> row(bf16 ? K : 0);
  for (int i = 0; i < n; ++i)
    for (i64 c = 0; c < N[i]; ++c) {
      const i64 pc = p.part_blk0[i] * kNB + c;  // the column in the packed layout
      const float* w = W[i] + c * K;
      if (q8) {
        // symmetric, one scale per output column: q = round(w / s) in [-127, 127]
        float amax = 0;
        for (i64 k = 0; k < K; ++k) amax = std::max(amax, std::abs(w[k]));
        const float sc = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
        p.qscale[pc] = sc;
        int8_t* d = q + (pc / kNB) * K * kNB + pc % kNB;
        for (i64 k = 0; k < K; ++k)
          d[k * kNB] = int8_t(std::clamp(std::lrint(w[k] * inv), -127L, 127L));
      } else if (!bf16) {
        float* d = f + (pc / kNB) * K * kNB + pc % kNB;
        for (i64 k = 0; k < K; ++k) d[k * kNB] = w[k];
      } else {
        round_to_bf16(row.data(), w, K);
        uint16_t* d = h + (pc / kNB) * p.Kp * kNB + (pc % kNB) * 2;
        for (i64 k = 0; k < K; ++k) d[(k / 2) * 2 * kNB + k % 2] = row[k];
      }
    }
}

void pack_matrix(PackedMatrix& p, const float* W, i64 N, i64 K, PackFormat fmt) {
  pack_matrices(p, &W, &N, 1, K, fmt);
}

namespace {
// Bytes of one column block's panel.
i64 panel_bytes(const PackedMatrix& p) {
  switch (p.fmt) {
    case PackFormat::BF16: return p.Kp * kNB * i64(sizeof(uint16_t));
    case PackFormat::Q8: return p.K * kNB;
    default: return p.K * kNB * i64(sizeof(float));
  }
}
const char* panel(const PackedMatrix& p, i64 blk) { return p.data + blk * panel_bytes(p); }
}  // namespace

namespace {
// This thread's scratch for widened blocks, at least n floats.
float* widen_scratch(i64 n) {
  thread_local std::vector<float, AlignedAlloc<float>> scratch;
  if (i64(scratch.size()) < n) scratch.resize(n);
  return scratch.data();
}
// Block blk of a BF16 / int8 p widened to FP32 [K][64] (exact; int8 without its scales).
void widen_block(float* dst, const PackedMatrix& p, i64 blk) {
  if (p.fmt == PackFormat::Q8)
    isa_avx512::widen_q8(dst, reinterpret_cast<const int8_t*>(panel(p, blk)), p.K);
  else
    isa_avx512::widen_bf16(dst, reinterpret_cast<const uint16_t*>(panel(p, blk)), p.K);
}

// The FP32 kernel's rows per call (FP32 weights, or widened): 6, or 7 (28 accumulators; GCC
// keeps 27 of them in registers) for a product of one row tile that then needs fewer calls:
// a DLCM backbone's 35 rows in 5 calls instead of 6, each call one pass over W's panel, its
// prefetch of the next panel over fewer calls; dlcm-small's prefill +0.6% (docs/performance.md,
// session 33). Decode's 1-6 rows keep 6; rows are independent, so the bits are the same.
i64 fp32_rows_per_call(i64 M) {
  return M <= kRows && (M + kMRf32x - 1) / kMRf32x < (M + kMRf32 - 1) / kMRf32 ? kMRf32x : kMRf32;
}

// How a product of M rows over nb column blocks runs (packed_gemm_parts, packed_gemm_swiglu: the
// same rows per call, so the same bits): tiles of (up to kRows rows, one column block), so that
// narrow products with many rows also split across threads, a column block's tiles consecutive
// (its panel stays in cache between them); each tile's rows split evenly over micro-kernel
// calls of at most MR rows (39 rows: 7,7,7,6,6,6, not five 7s and a 4, whose call reads W's
// panel for half the work; rows are independent: same bits). The calls of a panel share the
// prefetch of the one after it (of `next`'s first panel after the last).
struct CallPlan {
  // BF16 / int8 products of at least kWidenRows rows (with the switch on) widen each column
  // block once per thread and run the FP32 kernel; the rows and k steps of a call follow.
  bool widen;
  i64 M, MR, steps, nr, tiles, calls;
  bool par;           // a parallel region over the tiles
  bool pf_on, chain;  // the calls prefetch the next panel; after the last, `next`'s first
  bool out_prefetch;  // each call prefetches its output lines (prefetch_c)
  CallPlan(const PackedMatrix& p, i64 M_, i64 nb, i64 out_cols, const NextProduct& next)
      : widen(packed_gemm_native() && p.fmt != PackFormat::F32 && M_ >= kWidenRows &&
              g_widen.load()),
        M(M_),
        MR(widen || p.fmt == PackFormat::F32 ? fp32_rows_per_call(M_)
           : p.fmt == PackFormat::BF16       ? kMRbf16
                                             : kMRq8),
        steps(p.fmt == PackFormat::BF16 && !widen ? p.Kp / 2 : p.K),
        nr((M_ + kRows - 1) / kRows),
        tiles(nr * nb) {
    par = !omp_in_parallel() && tiles > 1 && 2.0 * M * out_cols * p.K >= double(1 << 18);
    calls = (nr - 1) * (kRows / MR) + (M - (nr - 1) * kRows + MR - 1) / MR;
    // Only where a panel serves several calls (more rows than one micro-kernel call takes): a
    // panel read once (decode's few rows) is one sequential stream that the hardware
    // prefetcher follows by itself, and a second stream of software prefetches slowed batch-1
    // decode (DLCM: 2,000 against 2,350 tokens/s; its products also vary from step to step, so
    // `next` is a guess there).
    pf_on = calls > 1;
    chain = pf_on && next.mat != nullptr && next.blk * kNB < next.mat->Np;
    out_prefetch = pf_on && g_prefetch_c.load(std::memory_order_relaxed);
  }
  // f(g, r0, mr) for each call of row tile rt: rows [r0, r0 + mr), call g of `calls`.
  template <class F>
  void for_calls(i64 rt, F f) const {
    const i64 rows = std::min(M, (rt + 1) * kRows) - rt * kRows, n = (rows + MR - 1) / MR;
    const i64 base = rows / n, extra = rows % n;
    for (i64 j = 0, r0 = rt * kRows; j < n; r0 += base + (j < extra), ++j)
      f(rt * (kRows / MR) + j, r0, base + (j < extra));
  }
};
}  // namespace

void packed_gemm_parts(float* const* C, const i64* ldc, const float* A, i64 lda,
                       const PackedMatrix& p, i64 M, float alpha, NextProduct next, int part0,
                       int n_parts) {
  note_parallel_entry();
  const int n_all = int(p.parts.size());
  if (n_parts < 0) n_parts = n_all - part0;
  DLCM_CHECK(part0 >= 0 && n_parts >= 1 && part0 + n_parts <= n_all, "internal: parts [", part0,
             ", ", part0 + n_parts, ") of a packed matrix of ", n_all);
  // the call's column blocks [b0, b1) of the packed layout
  const i64 K = p.K, b0 = p.part_blk0[part0], b1 = p.part_blk0[part0 + n_parts];
  const i64 nb = b1 - b0;
  i64 out_cols = 0;
  for (int i = part0; i < part0 + n_parts; ++i) out_cols += p.parts[i];
  const bool avx512 = packed_gemm_native();
  const CallPlan plan(p, M, nb, out_cols, next);
  const i64 nr = plan.nr, steps = plan.steps;
  parallel_region(plan.par, [&] {
  i64 wide_blk = -1;  // the column block this thread's scratch holds widened (this call)
#pragma omp for schedule(static)
  for (i64 tile = 0; tile < plan.tiles; ++tile) {
    const i64 blk = b0 + tile / nr, rt = tile % nr;
    size_t part = part0;
    while (p.part_blk0[part + 1] <= blk) ++part;
    const i64 c0 = (blk - p.part_blk0[part]) * kNB;  // first column within the part
    const i64 n = std::min(kNB, p.parts[part] - c0);
    const PackedMatrix* target =
        !plan.pf_on ? nullptr : blk + 1 < b1 ? &p : plan.chain ? next.mat : nullptr;
    const i64 target_lines = target ? panel_bytes(*target) / 64 : 0;
    const char* target_panel =
        target ? panel(*target, blk + 1 < b1 ? blk + 1 : next.blk) : nullptr;
    float* wide = nullptr;  // the block's weights widened to FP32 [K][64], if widen
    if (plan.widen) {  // once per block and thread: a block's row tiles are consecutive
      wide = widen_scratch(K * kNB);
      if (blk != wide_blk) widen_block(wide, p, blk);
      wide_blk = blk;
    }
    plan.for_calls(rt, [&](i64 g, i64 r0, i64 mr) {
      const i64 ld = ldc[part - part0];
      float* Cb = C[part - part0] + r0 * ld + c0;
      const float* Ab = A + r0 * lda;
      Prefetch pf;
      pf.out = plan.out_prefetch;
      if (avx512) pf.share(target_panel, target_lines, g, plan.calls, steps);
      // the same sums as packed_gemm_swiglu's halves (SumLoad / SumBf16)
      using isa_avx512::block, isa_avx512::LoadF32, isa_avx512::LoadQ8;
      const char* w = panel(p, blk);
      const float* sc = p.fmt == PackFormat::Q8 ? p.qscale.data() + blk * kNB : nullptr;
      if (wide || (avx512 && p.fmt == PackFormat::F32)) {  // FP32 weights, or widened to FP32
        const float* f = wide ? wide : reinterpret_cast<const float*>(w);
        const isa_avx512::SumLoad<LoadF32> sum{{f}, sc};
        block<LoadF32::kMaxRows>(Cb, ld, Ab, lda, sum, K, alpha, n, mr, pf);
      } else if (avx512 && p.fmt == PackFormat::BF16) {
        const isa_avx512::SumBf16 sum{reinterpret_cast<const uint16_t*>(w)};
        block<isa_avx512::SumBf16::kMaxRows>(Cb, ld, Ab, lda, sum, K, alpha, n, mr, pf);
      } else if (avx512) {
        const isa_avx512::SumLoad<LoadQ8> sum{{reinterpret_cast<const int8_t*>(w)}, sc};
        block<LoadQ8::kMaxRows>(Cb, ld, Ab, lda, sum, K, alpha, n, mr, pf);
      } else {
        block_portable(Cb, ld, Ab, lda, p, w, sc, mr, alpha, n);
      }
    });
  }
  });
}

bool packed_swiglu_fusable(const PackedMatrix& p, int part0) {
  return part0 >= 0 && part0 + 2 <= int(p.parts.size()) && p.parts[part0] == p.parts[part0 + 1];
}

void packed_gemm_swiglu(float* H, i64 ldh, const float* A, i64 lda, const PackedMatrix& p,
                        i64 M, NextProduct next, int part0) {
  note_parallel_entry();
  DLCM_CHECK(packed_swiglu_fusable(p, part0), "internal: packed_gemm_swiglu needs two parts ",
             "of one width from part ", part0);
  const i64 K = p.K, F = p.parts[part0];
  const i64 ba = p.part_blk0[part0], bb = p.part_blk0[part0 + 1], nb = bb - ba;
  const bool avx512 = packed_gemm_native();
  // tiles, calls and widening as packed_gemm_parts lays them out (the same rows per call: the
  // same bits)
  const CallPlan plan(p, M, nb, 2 * F, next);
  const i64 nr = plan.nr, steps = plan.steps;
  const i64 own_lines = panel_bytes(p) / 64;
  const float* const qs = p.fmt == PackFormat::Q8 ? p.qscale.data() : nullptr;
  parallel_region(plan.par, [&] {
  alignas(64) float sa[kMRf32x * kNB], sb[kMRf32x * kNB];  // this call's gate and up rows
  i64 wide_j = -1;  // the pair of blocks this thread's scratch holds widened (this call)
#pragma omp for schedule(static)
  for (i64 tile = 0; tile < plan.tiles; ++tile) {
    const i64 j = tile / nr, rt = tile % nr;
    const i64 c0 = j * kNB, n = std::min(kNB, F - c0);
    const char* pa = panel(p, ba + j);
    const char* pb = panel(p, bb + j);
    const float* sca = qs ? qs + (ba + j) * kNB : nullptr;  // int8: the blocks' column scales
    const float* scb = qs ? qs + (bb + j) * kNB : nullptr;
    float* wide = nullptr;  // W1's and W3's blocks widened to FP32, [2][K][64], if widen
    if (plan.widen) {
      wide = widen_scratch(2 * K * kNB);
      if (j != wide_j) {
        widen_block(wide, p, ba + j);
        widen_block(wide + K * kNB, p, bb + j);
      }
      wide_j = j;
    }
    // while this pair of panels is multiplied, the next pair streams in (after the last pair,
    // `next`'s first panel, during the W1 half)
    const char *ta = nullptr, *tb = nullptr;
    i64 la = own_lines, lb = own_lines;
    if (plan.pf_on && j + 1 < nb) {
      ta = panel(p, ba + j + 1);
      tb = panel(p, bb + j + 1);
    } else if (plan.chain) {
      ta = panel(*next.mat, next.blk);
      la = panel_bytes(*next.mat) / 64;
    }
    plan.for_calls(rt, [&](i64 g, i64 r0, i64 mr) {
      float* Hb = H + r0 * ldh + c0;
      const float* Ab = A + r0 * lda;
      Prefetch pfa, pfb;
      pfa.out = plan.out_prefetch;
      if (avx512) {
        pfa.share(ta, la, g, plan.calls, steps);
        pfb.share(tb, lb, g, plan.calls, steps);
      }
      using isa_avx512::block_pair, isa_avx512::LoadF32, isa_avx512::LoadQ8;
      using SumF32 = isa_avx512::SumLoad<LoadF32>;
      using SumQ8 = isa_avx512::SumLoad<LoadQ8>;
      if (wide || (avx512 && p.fmt == PackFormat::F32)) {  // FP32 weights, or widened to FP32
        const float* fa = wide ? wide : reinterpret_cast<const float*>(pa);
        const float* fb = wide ? wide + K * kNB : reinterpret_cast<const float*>(pb);
        block_pair<SumF32::kMaxRows>(sa, sb, Hb, ldh, Ab, lda, SumF32{{fa}, sca},
                                     SumF32{{fb}, scb}, K, n, mr, pfa, pfb);
      } else if (avx512 && p.fmt == PackFormat::BF16) {
        using SumBf16 = isa_avx512::SumBf16;
        block_pair<SumBf16::kMaxRows>(sa, sb, Hb, ldh, Ab, lda,
                                      SumBf16{reinterpret_cast<const uint16_t*>(pa)},
                                      SumBf16{reinterpret_cast<const uint16_t*>(pb)}, K, n, mr,
                                      pfa, pfb);
      } else if (avx512) {
        block_pair<SumQ8::kMaxRows>(sa, sb, Hb, ldh, Ab, lda,
                                    SumQ8{{reinterpret_cast<const int8_t*>(pa)}, sca},
                                    SumQ8{{reinterpret_cast<const int8_t*>(pb)}, scb}, K, n, mr,
                                    pfa, pfb);
      } else {
        block_portable(sa, kNB, Ab, lda, p, pa, sca, mr, 1.f, n);
        block_portable(sb, kNB, Ab, lda, p, pb, scb, mr, 1.f, n);
      }
      swiglu_rows(Hb, ldh, sa, kNB, sb, kNB, mr, n);
    });
  }
  });
}

void set_packed_swiglu(bool on) { g_swiglu = on; }
bool packed_swiglu_on() { return g_swiglu.load(); }

void packed_gemm(float* C, i64 ldc, const float* A, i64 lda, const PackedMatrix& p, i64 M,
                 float alpha, NextProduct next) {
  DLCM_CHECK(p.parts.size() == 1, "internal: packed_gemm on ", p.parts.size(),
             " stacked matrices (packed_gemm_parts)");
  packed_gemm_parts(&C, &ldc, A, lda, p, M, alpha, next);
}

void PackedWeights::add(const float* W, i64 N, i64 K, PackFormat fmt) {
  pack_matrices(mats_[W], &W, &N, 1, K, fmt, take(packed_bytes(&N, 1, K, fmt)));
}

void PackedWeights::reserve(i64 bytes) {
  arena_ = std::vector<char, AlignedAlloc<char>>(size_t(std::max<i64>(bytes, 0)));
  arena_used_ = 0;
}

char* PackedWeights::take(i64 bytes) {
  const i64 padded = (bytes + 63) / 64 * 64;
  if (arena_used_ + padded > i64(arena_.size())) return nullptr;  // beyond the reservation
  char* p = arena_.data() + arena_used_;
  arena_used_ += padded;
  return p;
}

NextProduct PackedWeights::served(const PackedMatrix* p, int part0) const {
  auto slot = [](const PackedMatrix* m, int part) -> NextProduct& {
    if (m->next.size() < m->parts.size()) m->next.resize(m->parts.size());
    return m->next[part];
  };
  if (last_) slot(last_, last_part_) = {p, p->part_blk0[part0]};
  p->read = true;
  last_ = p;
  last_part_ = part0;
  return slot(p, part0);
}

const PackedMatrix* PackedWeights::find(const float* W, i64 N, i64 K, i64 M) const {
  if (M > max_rows_) return nullptr;
  auto it = mats_.find(W);
  if (it == mats_.end() || it->second.N != N || it->second.K != K) return nullptr;
  return &it->second;
}

void PackedWeights::add_group(const float* const* W, const i64* N, int n, i64 K,
                              PackFormat fmt) {
  Group& g = groups_[W[0]];
  g.srcs.assign(W, W + n);
  pack_matrices(g.mat, W, N, n, K, fmt, take(packed_bytes(N, n, K, fmt)));
  for (int i = 0; i < n; ++i) member_[W[i]] = {W[0], i};
}

const PackedMatrix* PackedWeights::find_group(const float* const* W, const i64* N, int n, i64 K,
                                              i64 M, int* part0) const {
  if (M > max_rows_ || n < 1) return nullptr;
  auto m = member_.find(W[0]);
  if (m == member_.end()) return nullptr;
  const Group& g = groups_.at(m->second.first);
  const int first = m->second.second;
  if (g.mat.K != K || first + n > int(g.srcs.size())) return nullptr;
  for (int i = 0; i < n; ++i)
    if (g.srcs[first + i] != W[i] || g.mat.parts[first + i] != N[i]) return nullptr;
  *part0 = first;
  return &g.mat;
}

i64 PackedWeights::sum_bytes(bool unread_only) const {
  auto of = [&](const PackedMatrix& p) {
    return unread_only && p.read ? 0 : p.data_bytes + i64(p.qscale.size() * sizeof(float));
  };
  i64 b = 0;
  for (auto& [w, p] : mats_) b += of(p);
  for (auto& [w, g] : groups_) b += of(g.mat);
  return b;
}

PackedScope::PackedScope(const PackedWeights* w) : prev_(t_active) { t_active = w; }
PackedScope::~PackedScope() { t_active = prev_; }
const PackedWeights* active_packed_weights() { return t_active; }

}  // namespace dlcm::ops
