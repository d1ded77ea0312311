// dlcm's blocked FP32 GEMM (see blocked_sgemm.h).
//
// Loops, for C[M, N] += op(A) op(B):
//   for each block of kKC k (in order; the first applies beta, the rest accumulate):
//     for each block of kNC columns:
//       the team packs op(B)[k block, column block] into panels [kKC][32] (768 KB, one copy
//         for all threads, each packing some of the panels; a barrier)
//       12-row tiles (one micro-kernel row each: fine tiles even out the threads), taken by
//         the threads dynamically: A's 12 x kKC block (in place when A is
//         not transposed, packed as [kKC][16] when it is) stays in L1 while the micro-kernel
//         runs over every panel
//       a barrier: the block is reread for the next one, and a tile's k blocks accumulate in
//         order.
// The micro-kernel: per k, two panel vectors, twelve broadcasts of A, 24 FMAs into 24
// accumulators; the panel is prefetched kPF k ahead (it streams from L2).
// The AVX-512 code carries its own target attribute and runs only when ops::isa() is avx512,
// so the portable build has it too; it sits in a namespace named like the kernel variants'
// (the isa_baseline check allows AVX instructions only there).
#include "kernels/blocked_sgemm.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "kernels/isa.h"

#define DLCM_BLOCKED_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))

namespace dlcm::ops {

namespace {

constexpr int kMR = 12;    // rows per micro-kernel call
constexpr int kNR = 32;    // columns per panel (two vectors)
constexpr int kAS = 16;    // floats per k of a packed A block (12 used; 64-byte rows)
constexpr i64 kKC = 384;   // k per block: A's 12 rows x 384 = 18 KB in L1
constexpr i64 kNC = 512;   // columns per packed B block: 384 x 512 x 4 = 768 KB (L2)
constexpr i64 kPF = 8;     // k steps the panel is prefetched ahead

// Masks of the valid lanes of a panel's two vectors, for w valid columns.
inline void lane_masks(i64 w, __mmask16 m[2]) {
  for (int v = 0; v < 2; ++v) {
    const i64 l = w - 16 * v;
    m[v] = l >= 16 ? __mmask16(0xFFFF) : l <= 0 ? __mmask16(0) : __mmask16((1u << l) - 1);
  }
}

namespace isa_avx512 {

// C[mr x w] (row stride ldc) = alpha * sum_k A[i][k] P[k][:] (+ beta C on the first k block,
// + C on the others). PA: A packed [kc][kAS]; else A rows in place (row stride lda).
template <int mr, bool PA>
DLCM_BLOCKED_AVX512 __attribute__((noinline)) void kernel(i64 kc, const float* A, i64 lda,
                                                          const float* P, float* C, i64 ldc,
                                                          float alpha, bool first, float beta,
                                                          const __mmask16* m) {
  __m512 c0[mr], c1[mr];
  for (int i = 0; i < mr; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (i64 k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(P + k * kNR), b1 = _mm512_loadu_ps(P + k * kNR + 16);
    _mm_prefetch(reinterpret_cast<const char*>(P + (k + kPF) * kNR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(P + (k + kPF) * kNR + 16), _MM_HINT_T0);
    const float* a = PA ? A + k * kAS : A + k;
    for (int i = 0; i < mr; ++i) {
      const __m512 ai = _mm512_set1_ps(a[PA ? i : i * lda]);
      c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const bool read_c = !first || beta != 0.f, scale_c = first && beta != 1.f;
  for (int i = 0; i < mr; ++i) {
    float* c = C + i * ldc;
    __m512 r0 = _mm512_mul_ps(va, c0[i]), r1 = _mm512_mul_ps(va, c1[i]);
    if (read_c) {
      __m512 o0 = _mm512_maskz_loadu_ps(m[0], c), o1 = _mm512_maskz_loadu_ps(m[1], c + 16);
      if (scale_c) o0 = _mm512_mul_ps(vb, o0), o1 = _mm512_mul_ps(vb, o1);
      r0 = _mm512_add_ps(r0, o0);
      r1 = _mm512_add_ps(r1, o1);
    }
    _mm512_mask_storeu_ps(c, m[0], r0);
    _mm512_mask_storeu_ps(c + 16, m[1], r1);
  }
}

template <int... I>
DLCM_BLOCKED_AVX512 void run_kernel(std::integer_sequence<int, I...>, bool packed_a, i64 mr,
                                    i64 kc, const float* A, i64 lda, const float* P, float* C,
                                    i64 ldc, float alpha, bool first, float beta,
                                    const __mmask16* m) {
  // one instantiation per row count, so the last rows of a product run the same loop
  ((mr == I + 1 ? (packed_a ? kernel<I + 1, true>(kc, A, lda, P, C, ldc, alpha, first, beta, m)
                            : kernel<I + 1, false>(kc, A, lda, P, C, ldc, alpha, first, beta, m))
                : void()),
   ...);
}

// op(B)[k0 .. k0+kc, j0 .. j0+n] into panels [kc][32] (columns past n are zero).
DLCM_BLOCKED_AVX512 void pack_b(float* Bp, bool tb, const float* B, i64 ldb, i64 k0, i64 kc,
                                i64 j0, i64 n) {
  const bool gather = tb && ldb <= (i64(1) << 26);  // int32 lane offsets of 15 * ldb
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(int(gather ? ldb : 0)));
  for (i64 p = 0; p < n; p += kNR) {
    float* dst = Bp + p * kc;
    __mmask16 m[2];
    lane_masks(std::min<i64>(kNR, n - p), m);
    if (!tb) {  // B[k][j]: rows of 32 contiguous floats
      for (i64 k = 0; k < kc; ++k) {
        const float* s = B + (k0 + k) * ldb + j0 + p;
        _mm512_storeu_ps(dst + k * kNR, _mm512_maskz_loadu_ps(m[0], s));
        _mm512_storeu_ps(dst + k * kNR + 16, _mm512_maskz_loadu_ps(m[1], s + 16));
      }
    } else if (gather) {  // B^T stored [N][K]: 16 columns' k-th values in one gather
      for (i64 k = 0; k < kc; ++k)
        for (int v = 0; v < 2; ++v) {
          const float* s = B + (j0 + p + 16 * v) * ldb + k0 + k;
          _mm512_storeu_ps(dst + k * kNR + 16 * v,
                           m[v] ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m[v], idx, s, 4)
                                : _mm512_setzero_ps());
        }
    } else {
      const i64 w = std::min<i64>(kNR, n - p);
      for (i64 k = 0; k < kc; ++k)
        for (i64 j = 0; j < kNR; ++j)
          dst[k * kNR + j] = j < w ? B[(j0 + p + j) * ldb + k0 + k] : 0.f;
    }
  }
}

// A^T stored [K][M]: rows i0 .. i0+mr of op(A) for k0 .. k0+kc into [kc][kAS].
DLCM_BLOCKED_AVX512 void pack_a(float* Ap, const float* At, i64 lda, i64 k0, i64 kc, i64 i0,
                                i64 mr) {
  const __mmask16 m = __mmask16((1u << mr) - 1);
  for (i64 k = 0; k < kc; ++k)
    _mm512_storeu_ps(Ap + k * kAS, _mm512_maskz_loadu_ps(m, At + (k0 + k) * lda + i0));
}

DLCM_BLOCKED_AVX512 void blocked(bool ta, bool tb, i64 M, i64 N, i64 K, float alpha,
                                 const float* A, i64 lda, const float* B, i64 ldb, float beta,
                                 float* C, i64 ldc) {
  const i64 tiles = (M + kMR - 1) / kMR;  // 12-row tiles
  const int T = omp_in_parallel() ? 1 : std::max<i64>(1, std::min<i64>(omp_get_max_threads(), tiles));
  // one packed block of B for the team (the calling thread's buffer): the threads pack its
  // panels between them and all read it (each thread packing the whole block cost ~10% of the
  // product's time)
  thread_local Buf bp;
  bp.resize(kKC * ((kNC + kNR - 1) / kNR * kNR));
  float* const pb = bp.data();
#pragma omp parallel num_threads(T)
  {
    thread_local Buf ap;
    ap.resize(kKC * kAS);
    for (i64 k0 = 0; k0 < K; k0 += kKC) {
      const i64 kc = std::min(kKC, K - k0);
      const bool first = k0 == 0;
      for (i64 j0 = 0; j0 < N; j0 += kNC) {
        const i64 n = std::min(kNC, N - j0), np = (n + kNR - 1) / kNR;
#pragma omp for schedule(static)
        for (i64 q = 0; q < np; ++q)
          pack_b(pb + q * kNR * kc, tb, B, ldb, k0, kc, j0 + q * kNR, std::min<i64>(kNR, n - q * kNR));
        // (the implied barrier: the block is packed)
#pragma omp for schedule(dynamic, 1)
        for (i64 t = 0; t < tiles; ++t) {
          const i64 i0 = t * kMR, mr = std::min<i64>(kMR, M - i0);
          const float* a = A + i0 * lda + k0;
          if (ta) {
            pack_a(ap.data(), A, lda, k0, kc, i0, mr);
            a = ap.data();
          }
          for (i64 p = 0; p < n; p += kNR) {
            __mmask16 m[2];
            lane_masks(std::min<i64>(kNR, n - p), m);
            run_kernel(std::make_integer_sequence<int, kMR>{}, ta, mr, kc, a, lda, pb + p * kc,
                       C + i0 * ldc + j0 + p, ldc, alpha, first, beta, m);
          }
        }  // the implied barrier: the block is no longer read, and a k block adds to finished tiles
      }
    }
  }
}

}  // namespace isa_avx512

// Without DLCM_SGEMM_OWN: the weight-gradient products on the blocked kernel on Intel CPUs, where
// oneDNN 2.6's sgemm is slow at them (1.12x there), on oneDNN's sgemm elsewhere: on an AMD Zen 4
// the blocked kernel ran them at 0.71x and 0.88x oneDNN's rate, and FP32 training was 1.03x
// faster without it (docs/performance.md, "AMD EPYC Zen 4").
BlockedUse initial_use() {
  const char* e = std::getenv("DLCM_SGEMM_OWN");
  if (!e || !*e) {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") ? BlockedUse::Tn : BlockedUse::Off;
  }
  const BlockedUse u = parse_blocked_use(e, "DLCM_SGEMM_OWN");
  std::fprintf(stderr, "dlcm: DLCM_SGEMM_OWN=%s: %s\n", e,
               u == BlockedUse::Tn ? "FP32 weight-gradient products (A^T B) run on dlcm's blocked sgemm"
                                   : "every FP32 product runs on oneDNN's sgemm");
  return u;
}

BlockedUse& use_ref() {
  static BlockedUse u = initial_use();
  return u;
}

}  // namespace

bool blocked_sgemm_native() { return isa() == Isa::Avx512; }

void blocked_sgemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A,
                   i64 lda, const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  DLCM_CHECK(blocked_sgemm_native(),
             "blocked_sgemm needs the avx512 kernels (ops::isa() is not avx512 here)");
  DLCM_CHECK(M >= 0 && N >= 0 && K >= 0, "blocked_sgemm: negative size (M=", M, " N=", N,
             " K=", K, ")");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // C = beta C (beta 0: zeros, whatever C held)
    for (i64 i = 0; i < M; ++i)
      for (i64 j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  isa_avx512::blocked(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

BlockedUse parse_blocked_use(const std::string& s, const std::string& what) {
  if (s == "tn") return BlockedUse::Tn;
  if (s == "off") return BlockedUse::Off;
  fail(what, ": expected \"tn\" (weight-gradient products on dlcm's blocked sgemm) or \"off\" "
             "(oneDNN's sgemm for every product), got \"",
       s, "\"");
}

void set_blocked_use(BlockedUse u) { use_ref() = u; }
BlockedUse blocked_use() { return use_ref(); }

bool blocked_sgemm_serves(bool trans_a, bool trans_b, i64 M, i64 N, i64 K) {
  return use_ref() == BlockedUse::Tn && trans_a && !trans_b && K >= 1024 && M * N >= (i64(1) << 19) &&
         blocked_sgemm_native();
}

}  // namespace dlcm::ops
