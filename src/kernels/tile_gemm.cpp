#include "kernels/tile_gemm.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "kernels/isa.h"

#include "kernels/isa_target.h"  // last include: the variant's target and namespace
#include "kernels/simd.h"
#include "kernels/amx.h"

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

// ---- AMX-BF16 ----
// Packed operands, per thread: A as bf16 rows [Mp][Kp], B in the tiles' pair-interleaved
// ("VNNI") layout [Kp/2][Np][2], C as FP32 [Mp][Np]; Mp, Np, Kp rounded up to 32 and the
// padding zero, so every tile is full. Tile registers: 0-3 C (2 x 2 tiles of 16 x 16 FP32),
// 4-5 A (16 rows x 32 bf16), 6-7 B (16 pairs x 16 columns).
namespace {

using amx::AVec;

struct AmxScratch {
  AVec<uint16_t> a, b;
  AVec<float> c;
};

DLCM_AMX_TARGET inline __m256i to_bf16x16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// A(r, k) for r < M, k < K into a [Mp][Kp] bf16 block (zero padding).
DLCM_AMX_TARGET void amx_pack_a(uint16_t* d, i64 Mp, i64 Kp, const float* A, i64 rsa, i64 csa,
                                i64 M, i64 K) {
  if (csa == 1) {  // rows of A contiguous
    for (i64 r = 0; r < M; ++r)
      for (i64 k = 0; k < Kp; k += 16) {
        const __mmask16 m = k < K ? simd::tail_mask(K - k) : __mmask16(0);
        _mm256_store_si256((__m256i*)(d + r * Kp + k),
                           to_bf16x16(_mm512_maskz_loadu_ps(m, A + r * rsa + k)));
      }
  } else if (rsa == 1) {  // columns of A contiguous (a transposed tile): 16 x 16 transposes
    alignas(64) float src[16 * 16], t[16 * 16];
    for (i64 r0 = 0; r0 < M; r0 += 16) {
      const __mmask16 mr = simd::tail_mask(M - r0);
      for (i64 k0 = 0; k0 < Kp; k0 += 16) {
        for (i64 kk = 0; kk < 16; ++kk) {
          const i64 k = k0 + kk;
          _mm512_store_ps(src + kk * 16, k < K ? _mm512_maskz_loadu_ps(mr, A + r0 + k * csa)
                                               : _mm512_setzero_ps());
        }
        simd::transpose16(t, 16, src, 16);  // t[r][kk]
        for (i64 rr = 0; rr < 16 && r0 + rr < M; ++rr)
          _mm256_store_si256((__m256i*)(d + (r0 + rr) * Kp + k0),
                             to_bf16x16(_mm512_load_ps(t + rr * 16)));
      }
    }
  } else {
    alignas(64) float row[16];
    for (i64 r = 0; r < M; ++r)
      for (i64 k0 = 0; k0 < Kp; k0 += 16) {
        for (i64 kk = 0; kk < 16; ++kk)
          row[kk] = k0 + kk < K ? A[r * rsa + (k0 + kk) * csa] : 0.0f;
        _mm256_store_si256((__m256i*)(d + r * Kp + k0), to_bf16x16(_mm512_load_ps(row)));
      }
  }
  std::fill(d + M * Kp, d + Mp * Kp, uint16_t(0));
}

// B[k][n] for k < K, n < N into pairs of rows interleaved: d[(k/2)*2*Np + 2n + k%2].
DLCM_AMX_TARGET void amx_pack_b(uint16_t* d, i64 Np, i64 Kp, const float* B, i64 ldb, i64 K,
                                i64 N) {
  const __m512i idx = _mm512_load_si512(amx::kPairIdx);
  for (i64 k = 0; k < Kp; k += 2)
    for (i64 n = 0; n < Np; n += 16) {
      const __mmask16 m = n < N ? simd::tail_mask(N - n) : __mmask16(0);
      const __m512 r0 = k < K ? _mm512_maskz_loadu_ps(m, B + k * ldb + n) : _mm512_setzero_ps();
      const __m512 r1 =
          k + 1 < K ? _mm512_maskz_loadu_ps(m, B + (k + 1) * ldb + n) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(r1, r0);
      _mm512_store_si512(d + k * Np + 2 * n, _mm512_permutexvar_epi16(idx, both));
    }
}

DLCM_AMX_TARGET void amx_mm(float* C, i64 ldc, const float* A, i64 rsa, i64 csa,
                            const float* B, i64 ldb, i64 M, i64 N, i64 K, float alpha, bool acc) {
  const auto up = [](i64 x) { return std::max<i64>(32, (x + 31) / 32 * 32); };
  const i64 Mp = up(M), Np = up(N), Kp = up(K);
  thread_local AmxScratch s;
  if (s.a.size() < size_t(Mp * Kp)) s.a.resize(Mp * Kp);
  if (s.b.size() < size_t(Kp * Np)) s.b.resize(Kp * Np);
  if (s.c.size() < size_t(Mp * Np)) s.c.resize(Mp * Np);
  amx_pack_a(s.a.data(), Mp, Kp, A, rsa, csa, M, K);
  amx_pack_b(s.b.data(), Np, Kp, B, ldb, K, N);
  // The tile configuration is per thread and oneDNN's AMX kernels set their own: load ours on
  // every call (tens of cycles against the thousands of a tile product).
  const amx::TileConfig cfg = amx::full_tiles();
  _tile_loadconfig(&cfg);
  const uint16_t* a = s.a.data();
  const uint16_t* b = s.b.data();
  float* c = s.c.data();
  const i64 sa = Kp * 2, sb = Np * 4, sc = Np * 4;  // tile row strides in bytes
  for (i64 i = 0; i < Mp; i += 32)
    for (i64 j = 0; j < Np; j += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (i64 k = 0; k < Kp; k += 32) {
        _tile_loadd(4, a + i * Kp + k, sa);
        _tile_loadd(5, a + (i + 16) * Kp + k, sa);
        _tile_loadd(6, b + k * Np + 2 * j, sb);
        _tile_loadd(7, b + k * Np + 2 * (j + 16), sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c + i * Np + j, sc);
      _tile_stored(1, c + i * Np + j + 16, sc);
      _tile_stored(2, c + (i + 16) * Np + j, sc);
      _tile_stored(3, c + (i + 16) * Np + j + 16, sc);
    }
  _tile_release();  // leave no tile state in use (it would be saved at every context switch)
  const __m512 al = _mm512_set1_ps(alpha);
  for (i64 r = 0; r < M; ++r)
    for (i64 n = 0; n < N; n += 16) {
      const __mmask16 m = simd::tail_mask(N - n);
      float* dst = C + r * ldc + n;
      const __m512 x = _mm512_load_ps(c + r * Np + n);
      _mm512_mask_storeu_ps(dst, m, acc ? _mm512_fmadd_ps(x, al, _mm512_maskz_loadu_ps(m, dst))
                                        : _mm512_mul_ps(x, al));
    }
}

}  // namespace

// (The AMX target stays on the internal function: a target attribute on a declared kernel
// would make GCC treat the definition as one version of a multi-versioned function.)
void tile_mm_amx(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb,
                 i64 M, i64 N, i64 K, float alpha, bool acc) {
  DLCM_CHECK(amx_bf16_usable(), "tile_mm_amx: this CPU (or the kernel) offers no AMX-BF16 tiles");
  if (M <= 0 || N <= 0) return;
  amx_mm(C, ldc, A, rsa, csa, B, ldb, M, N, K, alpha, acc);
}
#else
}  // namespace
void tile_mm_amx(float*, i64, const float*, i64, i64, const float*, i64, i64, i64, i64, float,
                 bool) {
  fail("tile_mm_amx: AMX tile products need the avx512 kernels (DLCM_ISA=avx512) on a CPU with "
       "AMX-BF16; this process runs the ", isa_name(isa()), " kernels");
}
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
