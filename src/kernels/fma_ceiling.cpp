// The FMA ceiling (see fma_ceiling.h). Each thread runs `chains` independent dependency chains,
// enough to cover the FMA latency on every unit (4-5 cycles x 2 units needs 8-10; 24 zmm or 12
// ymm, within the register files). The AVX code carries its own target attribute and sits in
// namespaces named like the kernel variants' (the isa_baseline check allows it only there).
#include "kernels/fma_ceiling.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>

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
}  // namespace isa_avx2

namespace {
// FP32 operations per iteration of the loop at level i (0 at the scalar level).
double flops_per_iteration(Isa i) {
  if (i == Isa::Avx512) return 2.0 * isa_avx512::kChains * 16;
  if (i == Isa::Avx2) return 2.0 * isa_avx2::kChains * 8;
  return 0;
}
double run_loop(Isa i, i64 n, float b, float c) {
  return i == Isa::Avx512 ? isa_avx512::fma_loop(n, b, c) : isa_avx2::fma_loop(n, b, c);
}
}  // namespace

double fma_loop(i64 n, float b, float c, double* flops) {
  const Isa i = isa();
  DLCM_CHECK(i != Isa::Scalar, "fma_loop: the scalar kernel level has no vector FMA loop");
  if (flops) *flops = flops_per_iteration(i) * double(std::max<i64>(n, 0));
  return run_loop(i, n, b, c);
}

FmaCeiling fma_ceiling(double seconds, int threads) {
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
    sink += run_loop(level, n, b, c);
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
    sink += run_loop(level, n, b, c);
    ++rounds;
  }
  const double sec = std::chrono::duration<double>(clock::now() - t0).count();
  volatile double keep = sink;  // the loops' results are used
  (void)keep;
  r.gflops = flops_per_iteration(level) * double(n) * double(rounds) * r.threads / sec / 1e9;
  return r;
}

}  // namespace dlcm::ops
