// The FMA ceilings (see fma_ceiling.h). The register loop: each thread runs `chains` independent
// dependency chains, enough to cover the FMA latency on every unit (4-5 cycles x 2 units needs
// 8-10; 24 zmm or 12 ymm, within the register files). The L1 loop: a GEMM micro-kernel's inner
// loop, 6 rows x 4 zmm (2 ymm) of accumulators fed from buffers that stay in L1 (B rows of 64
// (16) floats, six broadcasts of A per k step), k cycling over 64 rows so that nothing leaves
// L1. The AVX code carries its own target attribute and sits in namespaces named like the kernel
// variants' (the isa_baseline check allows it only there).
#include "kernels/fma_ceiling.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <vector>

#include "kernels/isa.h"

namespace dlcm::ops {

namespace isa_avx512 {
constexpr int kChains = 24;
__attribute__((target("avx2,fma,avx512f"), noipa)) double fma_loop(i64 n, float b, float c) {
  __m512 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(float(i));
  const __m512 vb = _mm512_set1_ps(b), vc = _mm512_set1_ps(c);
  for (i64 k = 0; k < n; ++k) {
#pragma GCC unroll 24
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_fmadd_ps(a[i], vb, vc);
  }
  alignas(64) float t[16];
  double s = 0;
  for (int i = 0; i < kChains; ++i) {
    _mm512_store_ps(t, a[i]);
    for (float x : t) s += x;
  }
  return s;
}

// The L1 loop's operands: B [kFedK][64] and A [kFedK][kFedRows] (k-major, as a packed
// micro-kernel reads them), 64-byte aligned, together 17.5 KiB (AVX2: B [kFedK][16], 5.5 KiB).
constexpr int kFedRows = 6, kFedK = 64;
#define DLCM_FED_ROW(r)                                                             \
  __m512 c##r##0 = _mm512_set1_ps(float(r * 4 + 0)), c##r##1 = _mm512_set1_ps(float(r * 4 + 1)), \
         c##r##2 = _mm512_set1_ps(float(r * 4 + 2)), c##r##3 = _mm512_set1_ps(float(r * 4 + 3));
#define DLCM_FED_FMA(r)                                                             \
  {                                                                                 \
    const __m512 av = _mm512_set1_ps(a[r]);                                         \
    c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0);                                     \
    c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1);                                     \
    c##r##2 = _mm512_fmadd_ps(av, b2, c##r##2);                                     \
    c##r##3 = _mm512_fmadd_ps(av, b3, c##r##3);                                     \
  }
#define DLCM_FED_SUM(r)                                                            \
  for (__m512 x : {c##r##0, c##r##1, c##r##2, c##r##3}) {                          \
    _mm512_store_ps(t, x);                                                         \
    for (float v : t) s += v;                                                      \
  }
// Accumulator (r, j) starts at 4r + j (every lane) and adds A[k][r] * B[k][16j..] per step.
// Named accumulators, not an array: GCC may keep an array of zmm on the stack (tile_gemm.cpp).
__attribute__((target("avx2,fma,avx512f"), noipa)) double fed_loop(i64 n, const float* A,
                                                                   const float* B) {
  DLCM_FED_ROW(0) DLCM_FED_ROW(1) DLCM_FED_ROW(2) DLCM_FED_ROW(3) DLCM_FED_ROW(4) DLCM_FED_ROW(5)
  for (i64 k = 0; k < n; ++k) {
    const float* b = B + (k % kFedK) * 64;
    const float* a = A + (k % kFedK) * kFedRows;
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16),
                 b2 = _mm512_load_ps(b + 32), b3 = _mm512_load_ps(b + 48);
    DLCM_FED_FMA(0) DLCM_FED_FMA(1) DLCM_FED_FMA(2) DLCM_FED_FMA(3) DLCM_FED_FMA(4) DLCM_FED_FMA(5)
  }
  alignas(64) float t[16];
  double s = 0;
  DLCM_FED_SUM(0) DLCM_FED_SUM(1) DLCM_FED_SUM(2) DLCM_FED_SUM(3) DLCM_FED_SUM(4) DLCM_FED_SUM(5)
  return s;
}
#undef DLCM_FED_ROW
#undef DLCM_FED_FMA
#undef DLCM_FED_SUM
}  // namespace isa_avx512

namespace isa_avx2 {
constexpr int kChains = 12;
__attribute__((target("avx2,fma"), noipa)) double fma_loop(i64 n, float b, float c) {
  __m256 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(float(i));
  const __m256 vb = _mm256_set1_ps(b), vc = _mm256_set1_ps(c);
  for (i64 k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], vb, vc);
  }
  alignas(32) float t[8];
  double s = 0;
  for (int i = 0; i < kChains; ++i) {
    _mm256_store_ps(t, a[i]);
    for (float x : t) s += x;
  }
  return s;
}

// The L1 loop at this level: 6 rows x 2 ymm (B rows of 16 floats), 12 named accumulators.
constexpr int kFedRows = 6, kFedK = 64;
#define DLCM_FED_ROW(r) \
  __m256 c##r##0 = _mm256_set1_ps(float(r * 2 + 0)), c##r##1 = _mm256_set1_ps(float(r * 2 + 1));
#define DLCM_FED_FMA(r)                               \
  {                                                   \
    const __m256 av = _mm256_broadcast_ss(a + r);     \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);       \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);       \
  }
#define DLCM_FED_SUM(r)                               \
  for (__m256 x : {c##r##0, c##r##1}) {               \
    _mm256_store_ps(t, x);                            \
    for (float v : t) s += v;                         \
  }
__attribute__((target("avx2,fma"), noipa)) double fed_loop(i64 n, const float* A, const float* B) {
  DLCM_FED_ROW(0) DLCM_FED_ROW(1) DLCM_FED_ROW(2) DLCM_FED_ROW(3) DLCM_FED_ROW(4) DLCM_FED_ROW(5)
  for (i64 k = 0; k < n; ++k) {
    const float* b = B + (k % kFedK) * 16;
    const float* a = A + (k % kFedK) * kFedRows;
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    DLCM_FED_FMA(0) DLCM_FED_FMA(1) DLCM_FED_FMA(2) DLCM_FED_FMA(3) DLCM_FED_FMA(4) DLCM_FED_FMA(5)
  }
  alignas(32) float t[8];
  double s = 0;
  DLCM_FED_SUM(0) DLCM_FED_SUM(1) DLCM_FED_SUM(2) DLCM_FED_SUM(3) DLCM_FED_SUM(4) DLCM_FED_SUM(5)
  return s;
}
#undef DLCM_FED_ROW
#undef DLCM_FED_FMA
#undef DLCM_FED_SUM
}  // namespace isa_avx2

namespace {
// FP32 operations per iteration of a loop at level i (0 at the scalar level): the register
// loop's chains, or the L1 loop's 6 x 64 (6 x 16) tile.
double flops_per_iteration(Isa i, FmaLoop loop) {
  const bool fed = loop == FmaLoop::L1Operands;
  if (i == Isa::Avx512) return 2.0 * 16 * (fed ? isa_avx512::kFedRows * 4 : isa_avx512::kChains);
  if (i == Isa::Avx2) return 2.0 * 8 * (fed ? isa_avx2::kFedRows * 2 : isa_avx2::kChains);
  return 0;
}

// This thread's L1 loop operands (A then B, 64-byte aligned), every A value a and B value b;
// written only when the values change, so that a ceiling's timed rounds run the loop alone.
const float* fed_operands(float a, float b) {
  constexpr int kA = 64 * 6, kB = 64 * 64;  // sized for AVX-512; AVX2 reads B's first 64 x 16
  thread_local std::vector<float, AlignedAlloc<float>> buf(kA + kB);
  thread_local float filled_a = NAN, filled_b = NAN;  // NaN: never equal, the first call fills
  if (a != filled_a || b != filled_b) {
    std::fill(buf.begin(), buf.begin() + kA, a);
    std::fill(buf.begin() + kA, buf.end(), b);
    filled_a = a;
    filled_b = b;
  }
  return buf.data();
}

double run_fed(Isa i, i64 n, const float* ab) {
  const float* B = ab + 64 * 6;
  return i == Isa::Avx512 ? isa_avx512::fed_loop(n, ab, B) : isa_avx2::fed_loop(n, ab, B);
}

double run_loop(Isa i, FmaLoop loop, i64 n, float b, float c) {
  if (loop == FmaLoop::L1Operands) return run_fed(i, n, fed_operands(b, c));
  return i == Isa::Avx512 ? isa_avx512::fma_loop(n, b, c) : isa_avx2::fma_loop(n, b, c);
}
}  // namespace

double fma_loop(i64 n, float b, float c, double* flops) {
  const Isa i = isa();
  DLCM_CHECK(i != Isa::Scalar, "fma_loop: the scalar kernel level has no vector FMA loop");
  if (flops) *flops = flops_per_iteration(i, FmaLoop::Registers) * double(std::max<i64>(n, 0));
  return run_loop(i, FmaLoop::Registers, n, b, c);
}

double fma_loop_l1(i64 n, float a, float b, double* flops) {
  const Isa i = isa();
  DLCM_CHECK(i != Isa::Scalar, "fma_loop_l1: the scalar kernel level has no vector FMA loop");
  if (flops) *flops = flops_per_iteration(i, FmaLoop::L1Operands) * double(std::max<i64>(n, 0));
  return run_fed(i, n, fed_operands(a, b));
}

FmaCeiling fma_ceiling(double seconds, int threads, FmaLoop loop) {
  FmaCeiling r;
  const Isa level = isa();
  r.threads = threads > 0 ? threads : omp_get_max_threads();
  if (level == Isa::Scalar) return r;
  r.unit = isa_name(level);
  // b and c through a volatile, so that the compiler cannot fold the loop
  volatile float vb = 1.0f, vc = 1.0f;
  const float b = vb, c = vc;
  using clock = std::chrono::steady_clock;
  // calibrate on this thread: iterations for about a tenth of the time asked for
  // (noipa on the loops and the results kept: a call whose result is unused could otherwise be
  // dropped as pure)
  i64 n = 1 << 16;
  double sink = 0;
  for (;;) {
    const auto t0 = clock::now();
    sink += run_loop(level, loop, n, b, c);
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    if (s > 0.002 || n >= (i64(1) << 30)) {
      n = std::max<i64>(1 << 12, i64(double(n) * std::max(seconds, 1e-3) / 10 / std::max(s, 1e-9)));
      break;
    }
    n *= 4;
  }
  const auto t0 = clock::now();
  i64 rounds = 0;
  while (std::chrono::duration<double>(clock::now() - t0).count() < seconds || rounds == 0) {
#pragma omp parallel num_threads(r.threads) reduction(+ : sink)
    sink += run_loop(level, loop, n, b, c);
    ++rounds;
  }
  const double sec = std::chrono::duration<double>(clock::now() - t0).count();
  volatile double keep = sink;  // the loops' results are used
  (void)keep;
  r.gflops = flops_per_iteration(level, loop) * double(n) * double(rounds) * r.threads / sec / 1e9;
  return r;
}

}  // namespace dlcm::ops
