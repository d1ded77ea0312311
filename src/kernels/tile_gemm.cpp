#include "kernels/tile_gemm.h"

#include <algorithm>
#include <array>

#include "kernels/isa_target.h"  // last include: the variant's target and namespace
#include "kernels/simd.h"

namespace dlcm::ops::DLCM_ISA_NS {
namespace {
// C[M,N] = (acc ? C : 0) + alpha * A(M,K) B[K,N].
// A(r,k) = A[r*rsa + k*csa] (any strides: lets P^T and dS^T be read without a transpose);
// row k of B starts at B + k*ldb and is contiguous; rows of C are ldc apart.
#ifdef DLCM_AVX512
// Accumulators are named variables, not an array: GCC keeps an array of 16+ zmm on the stack
// and reloads it every k step, which ran this kernel at a fraction of FMA throughput.
#define DLCM_ROW(r)                                                                  \
  __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = c##r##0, c##r##2 = c##r##0,        \
         c##r##3 = c##r##0;
#define DLCM_FMA(r)                                                                  \
  if constexpr (MR > r) {                                                            \
    const __m512 av = _mm512_set1_ps(a[r * rsa]);                                    \
    c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);                                      \
    if constexpr (NV > 1) c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);                \
    if constexpr (NV > 2) c##r##2 = _mm512_fmadd_ps(av, b2, c##r##2);                \
    if constexpr (NV > 3) c##r##3 = _mm512_fmadd_ps(av, b3, c##r##3);                \
  }
#define DLCM_STORE(r)                                                                \
  if constexpr (MR > r) {                                                            \
    float* cr = C + r * ldc;                                                         \
    store(cr, c##r##0, NV == 1 ? last : full);                                       \
    if constexpr (NV > 1) store(cr + 16, c##r##1, NV == 2 ? last : full);            \
    if constexpr (NV > 2) store(cr + 32, c##r##2, NV == 3 ? last : full);            \
    if constexpr (NV > 3) store(cr + 48, c##r##3, last);                             \
  }

// MR rows x NV vectors of 16 columns; the last vector is masked by `last`.
template <int MR, int NV>
void mm_tile(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 K,
             __mmask16 last, float alpha, bool acc) {
  DLCM_ROW(0) DLCM_ROW(1) DLCM_ROW(2) DLCM_ROW(3) DLCM_ROW(4) DLCM_ROW(5)
  const __mmask16 full = 0xFFFF;
  for (i64 k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(NV == 1 ? last : full, b);
    const __m512 b1 = NV > 1 ? _mm512_maskz_loadu_ps(NV == 2 ? last : full, b + 16) : b0;
    const __m512 b2 = NV > 2 ? _mm512_maskz_loadu_ps(NV == 3 ? last : full, b + 32) : b0;
    const __m512 b3 = NV > 3 ? _mm512_maskz_loadu_ps(last, b + 48) : b0;
    const float* a = A + k * csa;
    DLCM_FMA(0) DLCM_FMA(1) DLCM_FMA(2) DLCM_FMA(3) DLCM_FMA(4) DLCM_FMA(5)
  }
  const __m512 al = _mm512_set1_ps(alpha);
  auto store = [&](float* dst, __m512 x, __mmask16 m) {
    x = acc ? _mm512_fmadd_ps(x, al, _mm512_maskz_loadu_ps(m, dst)) : _mm512_mul_ps(x, al);
    _mm512_mask_storeu_ps(dst, m, x);
  };
  DLCM_STORE(0) DLCM_STORE(1) DLCM_STORE(2) DLCM_STORE(3) DLCM_STORE(4) DLCM_STORE(5)
}
#undef DLCM_ROW
#undef DLCM_FMA
#undef DLCM_STORE

using TileFn = void (*)(float*, i64, const float*, i64, i64, const float*, i64, i64, __mmask16,
                        float, bool);
constexpr int MR = 6;
template <int R>
constexpr std::array<TileFn, 4> tile_row() {
  return {mm_tile<R, 1>, mm_tile<R, 2>, mm_tile<R, 3>, mm_tile<R, 4>};
}
const std::array<TileFn, 4> kTiles[MR] = {tile_row<1>(), tile_row<2>(), tile_row<3>(),
                                          tile_row<4>(), tile_row<5>(), tile_row<6>()};

}  // namespace

void tile_mm(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 M,
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
}  // namespace
void tile_mm(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 M,
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

}  // namespace dlcm::ops::DLCM_ISA_NS
