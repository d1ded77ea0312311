// `dlcm bench xattn`: the decoder's concept cross-attention, forward and backward, in three
// implementations of the same function (the paper's Table 6, on this CPU):
//   (a) masked : dense masked scores with the log-multiplicity bias, sgemm products (the role
//                Flex Attention plays in the paper),
//   (b) replicate + the causal blockwise attention kernel over L x L,
//   (c) compact : attention over the concept list, O(L * M).
// Medians of repeats, the three interleaved in every repeat so that load drifts hit them alike.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "core/rng.h"
#include "kernels/dlcm_ops.h"
#include "kernels/isa.h"
#include "tools/bench_common.h"
#include "tools/commands.h"

namespace dlcm {

namespace {

// Boundaries of one row pattern: "interval" = a concept every `interval` tokens; "variable" =
// concept lengths 1 + Geometric(1/mean_len) (mean mean_len, many 1-2 token concepts and a
// long tail, like word pieces of real text).
void make_boundaries(std::vector<uint8_t>& b, i64 B, i64 L, bool variable, i64 interval,
                     double mean_len, uint64_t seed) {
  b.assign(B * L, 0);
  const double p = 1.0 / mean_len;
  for (i64 r = 0; r < B; ++r) {
    i64 t = 0, j = 0;
    while (t < L) {
      b[r * L + t] = 1;
      i64 len = interval;
      if (variable) {
        // inverse CDF of the geometric number of failures before a success
        const double u = std::max(1e-12, double(counter_uniform(seed, r, j)));
        len = 1 + i64(std::floor(std::log(u) / std::log(1.0 - p)));
      }
      t += len;
      ++j;
    }
  }
}

double max_abs_diff(const Buf& a, const Buf& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::abs(a[i] - b[i])));
  return m;
}

// Outputs and gradients of one implementation: (a), (b), (c) = index 0, 1, 2.
struct XattnImpl {
  Buf out, lse, dq, dk, dv;
};

}  // namespace

int cmd_bench_xattn(const BenchXattnArgs& a) {
  DLCM_CHECK(a.heads > 0 && a.kv_heads > 0 && a.heads % a.kv_heads == 0,
             "--heads must be a positive multiple of --kv-heads");
  DLCM_CHECK(a.head_dim > 0 && a.batch > 0 && a.repeats > 0, "--head-dim, --batch and --repeats must be > 0");
  DLCM_CHECK(a.interval >= 1 && a.mean_len >= 1, "--interval and --mean-len must be >= 1");
  for (i64 L : a.lengths) DLCM_CHECK(L >= 1, "--lengths: sequence lengths must be >= 1, got ", L);
  const i64 B = a.batch, Hq = a.heads, Hkv = a.kv_heads, hd = a.head_dim;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::printf("concept cross-attention, B=%lld, %lld query heads, %lld kv heads, head_dim %lld, "
              "%d threads; median of %lld repeats (ms)\n",
              (long long)B, (long long)Hq, (long long)Hkv, (long long)hd, omp_get_max_threads(),
              (long long)a.repeats);
  std::printf("kernels: %s\n", ops::isa_summary().c_str());
  std::printf("(a) masked dense scores + sgemm, (b) replicate + causal kernel, (c) compact\n");
  const double sgemm_cpu = bench::measure_peak(0.5, 2048).cpu;
  std::printf("FP32 sgemm 2048^3: %.1f GFLOP per process CPU-second\n", sgemm_cpu);
  std::printf("%-9s %6s %6s | %9s %9s %9s %6s %6s | %9s %9s %9s %6s %6s | %6s %6s %8s\n",
              "concepts", "L", "M", "fwd (a)", "fwd (b)", "fwd (c)", "a/b", "b/c", "bwd (a)",
              "bwd (b)", "bwd (c)", "a/b", "b/c", "c GF/s", "c eff", "max|d|");
  for (int variable = 0; variable < 2; ++variable) {
    if (variable ? !a.variable : !a.fixed) continue;
    for (i64 L : a.lengths) {
      std::vector<uint8_t> b;
      make_boundaries(b, B, L, variable, a.interval, a.mean_len, 17 + L);
      ops::Segments sg;
      sg.build(b.data(), nullptr, -1, B, L);
      const i64 K1 = sg.Mmax + 1, nq = B * L * Hq * hd, nk = B * K1 * Hkv * hd;
      const i64 nrep = B * L * Hkv * hd;
      Buf q(nq), k(nk), v(nk), dout(nq), krep(nrep), vrep(nrep), dkrep(nrep), dvrep(nrep);
      Rng rng(L * 31 + variable);
      for (Buf* x : {&q, &k, &v, &dout})
        for (auto& e : *x) e = rng.normal();
      XattnImpl im[3];
      for (auto& m : im) {
        m.out.assign(nq, 0);
        m.lse.assign(B * Hq * L, 0);
        m.dq.assign(nq, 0);
        m.dk.assign(nk, 0);
        m.dv.assign(nk, 0);
      }
      auto fwd = [&](int i) {
        XattnImpl& m = im[i];
        if (i == 0)
          ops::concept_attention_masked_forward(m.out.data(), m.lse.data(), q.data(), k.data(),
                                                v.data(), sg, B, L, Hq, Hkv, hd, scale);
        else if (i == 1)
          ops::concept_attention_replicate_forward(m.out.data(), m.lse.data(), krep.data(),
                                                   vrep.data(), q.data(), k.data(), v.data(), sg,
                                                   B, L, Hq, Hkv, hd, scale);
        else
          ops::concept_attention_forward(m.out.data(), m.lse.data(), q.data(), k.data(),
                                         v.data(), sg, B, L, Hq, Hkv, hd, scale);
      };
      // Gradients accumulate (+=): each timed backward starts from zeroed buffers, zeroing
      // outside the timed region.
      auto zero_grads = [&](int i) {
        zero(im[i].dq);
        zero(im[i].dk);
        zero(im[i].dv);
      };
      auto bwd = [&](int i) {
        XattnImpl& m = im[i];
        if (i == 0)
          ops::concept_attention_masked_backward(m.dq.data(), m.dk.data(), m.dv.data(),
                                                 dout.data(), m.out.data(), m.lse.data(),
                                                 q.data(), k.data(), v.data(), sg, B, L, Hq, Hkv,
                                                 hd, scale);
        else if (i == 1)
          ops::concept_attention_replicate_backward(
              m.dq.data(), m.dk.data(), m.dv.data(), dkrep.data(), dvrep.data(), dout.data(),
              m.out.data(), m.lse.data(), q.data(), krep.data(), vrep.data(), sg, B, L, Hq, Hkv,
              hd, scale);
        else
          ops::concept_attention_backward(m.dq.data(), m.dk.data(), m.dv.data(), dout.data(),
                                          m.out.data(), m.lse.data(), q.data(), k.data(),
                                          v.data(), sg, B, L, Hq, Hkv, hd, scale);
      };
      // warm-up (first touch), and the outputs/gradients compared below
      for (int i = 0; i < 3; ++i) {
        fwd(i);
        zero_grads(i);
        bwd(i);
      }
      double diff = 0;
      for (int i = 0; i < 2; ++i) {
        diff = std::max(diff, max_abs_diff(im[i].out, im[2].out));
        diff = std::max(diff, max_abs_diff(im[i].dq, im[2].dq));
        diff = std::max(diff, max_abs_diff(im[i].dk, im[2].dk));
        diff = std::max(diff, max_abs_diff(im[i].dv, im[2].dv));
      }
      std::vector<double> tf[3], tb[3], cpu_c;
      for (i64 r = 0; r < a.repeats; ++r)
        for (int i = 0; i < 3; ++i) {
          const double c0 = bench::cpu_seconds();
          tf[i].push_back(1e3 * bench::time_it([&] { fwd(i); }));
          zero_grads(i);
          const double c1 = bench::cpu_seconds();
          tb[i].push_back(1e3 * bench::time_it([&] { bwd(i); }));
          if (i == 2) cpu_c.push_back(c1 - c0 + bench::cpu_seconds() - c1);
        }
      double f[3], g[3];
      for (int i = 0; i < 3; ++i) {
        f[i] = bench::median(tf[i]);
        g[i] = bench::median(tb[i]);
      }
      // useful forward work: 4 hd FLOPs per (query, visible concept) pair per head; backward
      // 2x that (5 products instead of 2, minus the recomputed scores counted once)
      double pairs = 0;
      for (i64 n = 0; n < B * L; ++n) pairs += sg.seg[n] + 1;
      const double useful = 4.0 * hd * Hq * pairs;
      const double gfs = 3 * useful / ((f[2] + g[2]) * 1e-3) / 1e9;
      const double cpu_eff = 3 * useful / bench::median(cpu_c) / 1e9 / sgemm_cpu;
      char label[32];
      if (variable)
        std::snprintf(label, sizeof label, "geo(%.0f)", a.mean_len);
      else
        std::snprintf(label, sizeof label, "every %lld", (long long)a.interval);
      std::printf("%-9s %6lld %6lld | %9.2f %9.2f %9.2f %5.2fx %5.2fx | %9.2f %9.2f %9.2f %5.2fx "
                  "%5.2fx | %6.1f %5.0f%% %8.1e\n",
                  label, (long long)L, (long long)sg.Mmax, f[0], f[1], f[2], f[0] / f[1],
                  f[1] / f[2], g[0], g[1], g[2], g[0] / g[1], g[1] / g[2], gfs, 100 * cpu_eff, diff);
      std::fflush(stdout);
    }
  }
  std::printf("a/b: speed-up of (b) over (a); b/c: of (c) over (b). c GF/s: useful FLOP/s of "
              "(c) forward+backward; c eff: the same per process CPU-second over sgemm's. max|d|: "
              "largest |difference| of (a), (b) to (c) over out, dq, dk, dv.\n");
  return 0;
}

}  // namespace dlcm
