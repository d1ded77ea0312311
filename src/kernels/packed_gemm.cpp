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

#include "kernels/gemm.h"
#include "kernels/isa.h"

#define DLCM_PACKED_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))

namespace dlcm::ops {

namespace {

constexpr i64 kNB = 64;     // output columns per block
constexpr i64 kMRf32 = 6;   // rows per FP32 micro-kernel call (24 accumulators)
constexpr i64 kMRbf16 = 4;  // rows per BF16 call (16 accumulators + 8 widened W vectors)
constexpr i64 kRows = 96;   // rows per parallel tile (a multiple of both)

thread_local const PackedWeights* t_active = nullptr;

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

template <int MR>
DLCM_PACKED_AVX512 void kernel_f32(float* C, i64 ldc, const float* A, i64 lda, const float* pb, i64 K, float alpha,
                i64 n) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (i64 k = 0; k < K; ++k) {
    const float* b = pb + k * kNB;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
    }
  }
  for (int i = 0; i < MR; ++i) store_block(C + i * ldc, acc[i], alpha, n);
}

// Weight-only BF16: A stays FP32; each 32-bit lane of the packed block holds (W[c][k],
// W[c][k+1]) as BF16, which widen to FP32 exactly (a shift, a mask).
template <int MR>
DLCM_PACKED_AVX512 void kernel_bf16w(float* C, i64 ldc, const float* A, i64 lda, const uint16_t* pb, i64 K,
                  float alpha, i64 n) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  for (i64 k = 0; k < K; k += 2) {
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
  for (int i = 0; i < MR; ++i) store_block(C + i * ldc, acc[i], alpha, n);
}

// One block of up to MR rows (no lambdas here: they would not inherit the target attribute).
DLCM_PACKED_AVX512 void block_f32(float* C, i64 ldc, const float* A, i64 lda, const float* pb,
                                  i64 K, float alpha, i64 n, i64 mr) {
  switch (mr) {
    case 6: return kernel_f32<6>(C, ldc, A, lda, pb, K, alpha, n);
    case 5: return kernel_f32<5>(C, ldc, A, lda, pb, K, alpha, n);
    case 4: return kernel_f32<4>(C, ldc, A, lda, pb, K, alpha, n);
    case 3: return kernel_f32<3>(C, ldc, A, lda, pb, K, alpha, n);
    case 2: return kernel_f32<2>(C, ldc, A, lda, pb, K, alpha, n);
    default: return kernel_f32<1>(C, ldc, A, lda, pb, K, alpha, n);
  }
}
DLCM_PACKED_AVX512 void block_bf16w(float* C, i64 ldc, const float* A, i64 lda,
                                    const uint16_t* pb, i64 K, float alpha, i64 n, i64 mr) {
  switch (mr) {
    case 4: return kernel_bf16w<4>(C, ldc, A, lda, pb, K, alpha, n);
    case 3: return kernel_bf16w<3>(C, ldc, A, lda, pb, K, alpha, n);
    case 2: return kernel_bf16w<2>(C, ldc, A, lda, pb, K, alpha, n);
    default: return kernel_bf16w<1>(C, ldc, A, lda, pb, K, alpha, n);
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

bool packed_gemm_native() { return isa() == Isa::Avx512; }

void pack_matrix(PackedMatrix& p, const float* W, i64 N, i64 K, bool bf16) {
  p.N = N;
  p.K = K;
  p.bf16 = bf16;
  p.Np = (N + kNB - 1) / kNB * kNB;
  p.Kp = bf16 ? (K + 1) / 2 * 2 : K;
  if (!bf16) {
    p.h.clear();
    p.f.assign(p.Np * K, 0.f);
    for (i64 c = 0; c < N; ++c) {
      float* dst = p.f.data() + (c / kNB) * K * kNB + c % kNB;
      for (i64 k = 0; k < K; ++k) dst[k * kNB] = W[c * K + k];
    }
    return;
  }
  p.f.clear();
  p.h.assign(p.Np * p.Kp, 0);
  std::vector<uint16_t> row(K);
  for (i64 c = 0; c < N; ++c) {
    round_to_bf16(row.data(), W + c * K, K);
    uint16_t* dst = p.h.data() + (c / kNB) * p.Kp * kNB + (c % kNB) * 2;
    for (i64 k = 0; k < K; ++k) dst[(k / 2) * 2 * kNB + k % 2] = row[k];
  }
}

void packed_gemm(float* C, i64 ldc, const float* A, i64 lda, const PackedMatrix& p, i64 M,
                 float alpha) {
  const i64 N = p.N, K = p.K, Kp = p.Kp, nb = p.Np / kNB;
  const i64 MR = p.bf16 ? kMRbf16 : kMRf32;
  const bool avx512 = packed_gemm_native();
  // tiles of (up to kRows rows, one column block), so that narrow products with many rows
  // also split across threads
  const i64 nr = (M + kRows - 1) / kRows, tiles = nr * nb;
  const bool par = !omp_in_parallel() && tiles > 1 && 2.0 * M * N * K >= double(1 << 18);
#pragma omp parallel for schedule(static) if (par)
  for (i64 tile = 0; tile < tiles; ++tile) {
    const i64 blk = tile % nb, rt = tile / nb;
    const i64 c0 = blk * kNB, n = std::min(kNB, N - c0);
    for (i64 r0 = rt * kRows; r0 < std::min(M, (rt + 1) * kRows); r0 += MR) {
      const i64 mr = std::min(MR, std::min(M, (rt + 1) * kRows) - r0);
      float* Cb = C + r0 * ldc + c0;
      const float* Ab = A + r0 * lda;
      if (!p.bf16) {
        const float* pb = p.f.data() + blk * K * kNB;
        if (avx512)
          isa_avx512::block_f32(Cb, ldc, Ab, lda, pb, K, alpha, n, mr);
        else
          block_ref(Cb, ldc, Ab, lda, mr, K, alpha, n, [&](i64 k, i64 c) { return pb[k * kNB + c]; });
      } else {
        const uint16_t* pb = p.h.data() + blk * Kp * kNB;
        if (avx512)
          isa_avx512::block_bf16w(Cb, ldc, Ab, lda, pb, K, alpha, n, mr);
        else
          block_ref(Cb, ldc, Ab, lda, mr, K, alpha, n, [&](i64 k, i64 c) {
            return bf16_to_float(pb[(k / 2) * 2 * kNB + c * 2 + k % 2]);
          });
      }
    }
  }
}

void PackedWeights::add(const float* W, i64 N, i64 K, bool bf16) {
  pack_matrix(mats_[W], W, N, K, bf16);
}

const PackedMatrix* PackedWeights::find(const float* W, i64 N, i64 K, i64 M) const {
  if (M > max_rows_) return nullptr;
  auto it = mats_.find(W);
  if (it == mats_.end() || it->second.N != N || it->second.K != K) return nullptr;
  return &it->second;
}

i64 PackedWeights::bytes() const {
  i64 b = 0;
  for (auto& [w, p] : mats_) b += i64(p.f.size() * sizeof(float) + p.h.size() * sizeof(uint16_t));
  return b;
}

PackedScope::PackedScope(const PackedWeights* w) : prev_(t_active) { t_active = w; }
PackedScope::~PackedScope() { t_active = prev_; }
const PackedWeights* active_packed_weights() { return t_active; }

}  // namespace dlcm::ops
