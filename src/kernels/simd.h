// Internal helpers for the kernels: a vectorised exp and short-row reductions. AVX-512 paths
// in the avx512 variant of the kernels (DLCM_AVX512, kernels/isa_target.h); plain loops
// otherwise. Inline code compiled per variant, so it lives in the variant's namespace.
#pragma once
#include <cmath>

#include "core/common.h"
#include "kernels/isa_target.h"

namespace dlcm::ops::DLCM_ISA_NS::simd {

#ifdef DLCM_AVX512
// Mask with the low n (0..16) lanes set.
inline __mmask16 tail_mask(i64 n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// exp(x) to ~2 ulp: x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor for e^r, then scale by 2^n.
// Inputs below -87.3 (including -inf for masked scores) give exactly 0, so masking is exact.
inline __m512 exp_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.7f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// 2^t for t <= 127, relative error below 3e-6: t = n + f, |f| <= 1/2, degree-5 Taylor for 2^f,
// then scaled by 2^n. Below -125 (and -inf, a masked score) exactly 0: no result in FP32's
// denormal range, whose every production costs a microcode assist. For the BF16 attention's
// probabilities, which are rounded to bf16 (relative error up to 2^-9) before they are used,
// so the ten operations here serve where exp_ps's fifteen bought digits the rounding drops.
inline __m512 exp2_ps(__m512 t) {
  const __m512 lo = _mm512_set1_ps(-125.0f);
  const __mmask16 live = _mm512_cmp_ps_mask(t, lo, _CMP_GE_OQ);  // (-inf: NaN below, masked)
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558146428443e-3f);  // ln(2)^k / k!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}
#endif

DLCM_GCC105593_BEGIN
inline float hmax(const float* x, i64 n) {
#ifdef DLCM_AVX512
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (i64 i = 0; i < n; i += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask(n - i), x + i));
  return _mm512_reduce_max_ps(m);
#else
  float m = -INFINITY;
  for (i64 i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
#endif
}
DLCM_GCC105593_END

// x[i] = exp(x[i] - m) in place; returns the sum (float lanes, summed in double at the end).
inline double exp_sub_sum(float* x, i64 n, float m) {
#ifdef DLCM_AVX512
  __m512 mv = _mm512_set1_ps(m), s = _mm512_setzero_ps();
  for (i64 i = 0; i < n; i += 16) {
    __mmask16 k = tail_mask(n - i);
    __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
    e = _mm512_maskz_mov_ps(k, e);
    _mm512_mask_storeu_ps(x + i, k, e);
    s = _mm512_add_ps(s, e);
  }
  alignas(64) float t[16];
  _mm512_store_ps(t, s);
  double d = 0;
  for (float f : t) d += f;
  return d;
#else
  double d = 0;
  for (i64 i = 0; i < n; ++i) d += (x[i] = std::exp(x[i] - m));
  return d;
#endif
}

// sum_i exp(x[i] - m) without writing x.
inline double exp_sum(const float* x, i64 n, float m) {
#ifdef DLCM_AVX512
  __m512 mv = _mm512_set1_ps(m), s = _mm512_setzero_ps();
  for (i64 i = 0; i < n; i += 16) {
    __mmask16 k = tail_mask(n - i);
    __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
    s = _mm512_add_ps(s, _mm512_maskz_mov_ps(k, e));
  }
  alignas(64) float t[16];
  _mm512_store_ps(t, s);
  double d = 0;
  for (float f : t) d += f;
  return d;
#else
  double d = 0;
  for (i64 i = 0; i < n; ++i) d += std::exp(x[i] - m);
  return d;
#endif
}

#ifdef DLCM_AVX512
// dst[c*ldd + r] = src[r*ld + c] for a full 16x16 tile, in registers: unpack pairs of rows,
// then 4x4 shuffles inside 128-bit lanes, then two rounds of lane shuffles.
DLCM_GCC105593_BEGIN
inline void transpose16(float* dst, i64 ldd, const float* src, i64 ld) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4i+k], 128-bit lane L: column 4L+k of rows 4i..4i+3.
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 x0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    const __m512 x1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 y1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    _mm512_storeu_ps(dst + k * ldd, _mm512_shuffle_f32x4(x0, y0, 0x88));
    _mm512_storeu_ps(dst + (4 + k) * ldd, _mm512_shuffle_f32x4(x1, y1, 0x88));
    _mm512_storeu_ps(dst + (8 + k) * ldd, _mm512_shuffle_f32x4(x0, y0, 0xDD));
    _mm512_storeu_ps(dst + (12 + k) * ldd, _mm512_shuffle_f32x4(x1, y1, 0xDD));
  }
}
DLCM_GCC105593_END
#endif

}  // namespace dlcm::ops::DLCM_ISA_NS::simd
