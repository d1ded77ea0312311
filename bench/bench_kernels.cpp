// Micro-benchmarks of the hot kernels (Google Benchmark). Figures, not tests:
//   ./build/bench_kernels --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/rng.h"
#include "kernels/dlcm_ops.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "kernels/packed_gemm.h"

using namespace dlcm;

static void fill(Buf& b, uint64_t seed) {
  Rng r(seed);
  for (auto& x : b) x = r.normal() * 0.5f;
}

static void fill_attention(Buf& q, Buf& k, Buf& v, Buf& dout) {
  fill(q, 1);
  fill(k, 2);
  fill(v, 3);
  fill(dout, 4);
}

// Square FP32 GEMM; reports FLOP/s (the MFU denominator of the training benchmark).
static void BM_Sgemm(benchmark::State& st) {
  const i64 n = st.range(0);
  Buf a(n * n), b(n * n), c(n * n);
  fill(a, 1);
  fill(b, 2);
  for (auto _ : st) ops::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
  st.counters["FLOP/s"] = benchmark::Counter(2.0 * n * n * n, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Sgemm)->Arg(512)->Arg(1024)->Arg(2048)->UseRealTime();

// A DLCM training step's backbone product on the fixed-shape path: its rows are the step's
// concept count, new at every step, and each of its layers calls it (here 3 calls per step,
// x W^T at the dlcm-small backbone's FFN shape, 1024 x 384). Arg: GemmCacheConfig::varying_values
// (0: a primitive is created at each step's second call; 4, the default: only for the first
// values). Compare the two rows' time per step (docs/performance.md, session 26).
static void BM_GemmFixedVaryingRows(benchmark::State& st) {
  const ops::GemmPath path0 = ops::gemm_path();
  const ops::GemmCacheConfig cfg0 = ops::gemm_cache_config();
  ops::set_gemm_path(ops::GemmPath::Fixed);
  ops::GemmCacheConfig cfg = cfg0;
  cfg.varying_values = st.range(0);
  ops::set_gemm_cache_config(cfg);  // empty cache
  const i64 N = 1024, K = 384, M0 = 520, spread = 96;
  Buf a((M0 + spread) * K), w(N * K), c((M0 + spread) * N);
  fill(a, 1);
  fill(w, 2);
  const i64 created0 = ops::gemm_cache_stats().created;
  i64 step = 0, flops = 0;
  for (auto _ : st) {
    const i64 M = M0 + (step++ * 37) % spread;  // a different count at each step
    for (int layer = 0; layer < 3; ++layer)
      ops::gemm(false, true, M, N, K, 1.f, a.data(), K, w.data(), K, 0.f, c.data(), N);
    flops += 3 * 2 * M * N * K;
  }
  st.counters["FLOP/s"] = benchmark::Counter(double(flops), benchmark::Counter::kIsRate);
  st.counters["created/step"] = double(ops::gemm_cache_stats().created - created0) / double(std::max<i64>(step, 1));
  ops::set_gemm_cache_config(cfg0);
  ops::set_gemm_path(path0);
}
BENCHMARK(BM_GemmFixedVaryingRows)->Arg(0)->Arg(4)->UseRealTime();

// The same products in BF16 mixed precision (operands rounded to bf16 on the way in, FP32
// accumulation and output): train.precision = "bf16".
static void BM_GemmBf16(benchmark::State& st) {
  if (!ops::cpu_has_bf16()) {
    st.SkipWithError("no AVX512-BF16");
    return;
  }
  const i64 n = st.range(0);
  Buf a(n * n), b(n * n), c(n * n);
  fill(a, 1);
  fill(b, 2);
  ops::PrecisionScope bf(ops::Precision::BF16);
  for (auto _ : st) ops::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
  st.counters["FLOP/s"] = benchmark::Counter(2.0 * n * n * n, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_GemmBf16)->Arg(512)->Arg(1024)->Arg(2048)->UseRealTime();

// Causal attention forward + backward at the reference training shape (B=8, L=512, H=8, hd=64).
static void BM_AttentionFwdBwd(benchmark::State& st) {
  const i64 B = 8, L = st.range(0), H = 8, hd = 64, N = B * L * H * hd;
  Buf q(N), k(N), v(N), o(N), lse(B * H * L), dq(N), dk(N), dv(N), dout(N);
  fill_attention(q, k, v, dout);
  const float scale = 1.0f / std::sqrt(float(hd));
  for (auto _ : st) {
    ops::attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, L, L, H, H, hd, 0, scale);
    ops::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), o.data(), lse.data(),
                            q.data(), k.data(), v.data(), B, L, L, H, H, hd, 0, scale);
  }
  // model FLOPs: 4*hd per admitted pair forward, 2x that backward
  double pairs = double(B) * H * L * (L + 1) / 2;
  st.counters["FLOP/s"] = benchmark::Counter(3 * 4.0 * hd * pairs, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_AttentionFwdBwd)->Arg(512)->Arg(2048)->UseRealTime()->Unit(benchmark::kMillisecond);

// Sliding-window causal attention (enc_window / dec_window), forward + backward at L = 2048,
// B = 1, 8 heads, hd 64, over the window (0 = full causal): time should grow with L * w.
static void BM_WindowAttentionFwdBwd(benchmark::State& st) {
  const i64 B = 1, L = 2048, H = 8, hd = 64, w = st.range(0), N = B * L * H * hd;
  Buf q(N), k(N), v(N), o(N), lse(B * H * L), dq(N), dk(N), dv(N), dout(N);
  fill_attention(q, k, v, dout);
  const float scale = 1.0f / std::sqrt(float(hd));
  for (auto _ : st) {
    ops::attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, L, L, H, H, hd, 0,
                           scale, w);
    ops::attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), o.data(), lse.data(),
                            q.data(), k.data(), v.data(), B, L, L, H, H, hd, 0, scale, w);
  }
  double pairs = 0;
  for (i64 t = 0; t < L; ++t) pairs += w > 0 ? std::min<i64>(t + 1, w) : t + 1;
  st.counters["FLOP/s"] = benchmark::Counter(3 * 4.0 * hd * H * B * pairs,
                                             benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_WindowAttentionFwdBwd)->Arg(64)->Arg(256)->Arg(1024)->Arg(0)->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Concept cross-attention (compact) forward + backward at the decoder shape of a
// reference-sized dlcm: B=1, 8 heads, hd 64, a concept every 6 tokens (`dlcm bench xattn`
// compares it with the masked and replicate forms).
static void BM_ConceptAttentionFwdBwd(benchmark::State& st) {
  const i64 B = 1, L = st.range(0), H = 8, hd = 64;
  std::vector<uint8_t> bnd(L);
  for (i64 t = 0; t < L; ++t) bnd[t] = t % 6 == 0;
  ops::Segments sg;
  sg.build(bnd.data(), nullptr, -1, B, L);
  const i64 nq = B * L * H * hd, nk = B * (sg.Mmax + 1) * H * hd;
  Buf q(nq), k(nk), v(nk), o(nq), lse(B * H * L), dq(nq), dk(nk), dv(nk), dout(nq);
  fill_attention(q, k, v, dout);
  const float scale = 1.0f / std::sqrt(float(hd));
  for (auto _ : st) {
    ops::concept_attention_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), sg, B, L, H, H, hd, scale);
    ops::concept_attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), o.data(), lse.data(),
                                    q.data(), k.data(), v.data(), sg, B, L, H, H, hd, scale);
  }
  double pairs = 0;
  for (i64 t = 0; t < L; ++t) pairs += sg.seg[t] + 1;
  st.counters["FLOP/s"] = benchmark::Counter(3 * 4.0 * hd * H * pairs, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_ConceptAttentionFwdBwd)->Arg(2048)->Arg(8192)->UseRealTime()->Unit(benchmark::kMillisecond);

static void BM_RmsNormFwdBwd(benchmark::State& st) {
  const i64 N = 4096, d = 512;
  Buf x(N * d), y(N * d), w(d, 1.f), r(N), dx(N * d), dw(d), dy(N * d);
  fill(x, 1);
  fill(dy, 2);
  for (auto _ : st) {
    ops::rmsnorm_forward(y.data(), r.data(), x.data(), w.data(), N, d, 1e-5f);
    ops::rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), r.data(), N, d);
  }
  st.counters["bytes/s"] = benchmark::Counter(5.0 * N * d * 4, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_RmsNormFwdBwd)->UseRealTime();

static void BM_CrossEntropyFused(benchmark::State& st) {
  const i64 N = 256, V = 8192;
  Buf logits(N * V), work(N * V);
  fill(logits, 1);
  std::vector<i32> tg(N);
  for (i64 i = 0; i < N; ++i) tg[i] = i32((i * 37) % V);
  for (auto _ : st) {
    std::copy(logits.begin(), logits.end(), work.begin());
    benchmark::DoNotOptimize(ops::cross_entropy_fused(work.data(), tg.data(), N, V, 1.0f / N));
  }
}
BENCHMARK(BM_CrossEntropyFused)->UseRealTime();

// Products of an inference stream's prefill against weights packed once (kernels/packed_gemm.h),
// FP32: M rows x N x K. Shapes of a 128-token prompt through the small configs: token layers
// (d 256, d_ff 768), the backbone's ~26 concept rows (d 384, d_ff 1024), fused and separate.
static void BM_PackedGemm(benchmark::State& st) {
  const i64 M = st.range(0), N = st.range(1), K = st.range(2);
  Buf x(M * K), w(N * K), y(M * N);
  fill(x, 1);
  fill(w, 2);
  // copies of W rotated through, 64 MiB in all, so that W comes from memory as in a forward
  // pass whose weights exceed the caches
  std::vector<ops::PackedMatrix> ps(std::max<i64>(1, (i64(64) << 20) / (4 * N * K)));
  for (auto& p : ps) ops::pack_matrix(p, w.data(), N, K, ops::PackFormat::F32);
  size_t i = 0;
  const bool chain = st.range(3) != 0;  // each product told the next one (PackedWeights::served)
  for (auto _ : st) {
    const size_t j = i++ % ps.size();
    ops::packed_gemm(y.data(), N, x.data(), K, ps[j], M, 1.f,
                     chain ? ops::NextProduct{&ps[(j + 1) % ps.size()], 0} : ops::NextProduct{});
  }
  st.counters["FLOP/s"] =
      benchmark::Counter(2.0 * M * N * K, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_PackedGemm)
    ->ArgsProduct({{128}, {256, 768, 1536}, {256}, {0, 1}})
    ->Args({128, 256, 768, 0})->Args({128, 256, 768, 1})
    ->ArgsProduct({{26}, {384, 1152, 2048}, {384}, {0, 1}})
    ->Args({26, 384, 1024, 0})->Args({26, 384, 1024, 1})
    ->Args({1, 768, 256, 0})->Args({1, 768, 256, 1});

// The same products from weight-only BF16 (fmt 1) or int8 (fmt 2) copies, widened to FP32 in
// every micro-kernel call (widen 0) or once per column block for the FP32 kernel (widen 1, the
// default from 40 rows; ops::set_packed_widen). Compare the pairs with
// --benchmark_enable_random_interleaving=true --benchmark_repetitions=N.
static void BM_PackedGemmWeightOnly(benchmark::State& st) {
  const i64 M = st.range(0), N = st.range(1), K = st.range(2);
  const ops::PackFormat fmt = st.range(3) == 1 ? ops::PackFormat::BF16 : ops::PackFormat::Q8;
  Buf x(M * K), w(N * K), y(M * N);
  fill(x, 1);
  fill(w, 2);
  const i64 bytes = N * K * (fmt == ops::PackFormat::BF16 ? 2 : 1);
  std::vector<ops::PackedMatrix> ps(std::max<i64>(1, (i64(64) << 20) / bytes));
  for (auto& p : ps) ops::pack_matrix(p, w.data(), N, K, fmt);
  const bool widen0 = ops::packed_widen_on();
  ops::set_packed_widen(st.range(4) != 0);
  size_t i = 0;
  for (auto _ : st) {
    const size_t j = i++ % ps.size();
    ops::packed_gemm(y.data(), N, x.data(), K, ps[j], M, 1.f, {&ps[(j + 1) % ps.size()], 0});
  }
  ops::set_packed_widen(widen0);
  st.counters["FLOP/s"] =
      benchmark::Counter(2.0 * M * N * K, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_PackedGemmWeightOnly)
    ->ArgsProduct({{42, 128}, {1536}, {256}, {1, 2}, {0, 1}})
    ->ArgsProduct({{42}, {2048}, {384}, {1, 2}, {0, 1}});

BENCHMARK_MAIN();
