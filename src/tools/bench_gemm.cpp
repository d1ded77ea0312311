// `dlcm bench gemm`: GFLOP/s of the engine's products (ops::gemm) on the runtime-shape and the
// fixed-shape oneDNN paths, FP32 and BF16, for the reference baseline's training shapes and
// 2048^3, with the oneDNN implementation each path runs. The two paths alternate within every
// repeat so that load drifts hit them alike; medians of repeats and of per-repeat ratios
// (fixed / runtime). FP32 rows add, in the same repeats, the runtime path with the other
// choice of blocked sgemm use (kernels/blocked_sgemm.h: every product on oneDNN's sgemm where
// the weight gradients run on dlcm's blocked kernel by default, as on Intel CPUs; the blocked
// kernel for them where they do not, as on AMD) and, with --torch, the same product through
// PyTorch (a peer process, python/bench_torch_gemm.py).
#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "core/rng.h"
#include "kernels/blocked_sgemm.h"
#include "kernels/fma_ceiling.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "tools/bench_common.h"
#include "tools/commands.h"

namespace dlcm {

using nlohmann::json;

namespace {

struct Shape {
  const char* what;
  bool ta, tb;
  i64 M, N, K;
  float beta;
};

// The reference baseline (d = 512, d_ff = 1536, B*L = 4096 tokens): each linear layer's
// forward x W^T, input gradient dy W (accumulating) and weight gradient dy^T x (accumulating).
const Shape kShapes[] = {
    {"square 2048^3", false, false, 2048, 2048, 2048, 0.f},
    {"q/k/v/o forward", false, true, 4096, 512, 512, 0.f},
    {"q/k/v/o dx", false, false, 4096, 512, 512, 1.f},
    {"q/k/v/o dW", true, false, 512, 512, 4096, 1.f},
    {"FFN up forward", false, true, 4096, 1536, 512, 0.f},
    {"FFN up dx", false, false, 4096, 512, 1536, 1.f},
    {"FFN up dW", true, false, 1536, 512, 4096, 1.f},
    {"FFN down forward", false, true, 4096, 512, 1536, 0.f},
    {"FFN down dx", false, false, 4096, 1536, 512, 1.f},
    {"FFN down dW", true, false, 512, 1536, 4096, 1.f},
};

struct Operands {
  Buf A, B, C;
  i64 lda, ldb, ldc;
};

Operands make_operands(const Shape& s) {
  Operands o;
  o.lda = s.ta ? s.M : s.K;
  o.ldb = s.tb ? s.K : s.N;
  o.ldc = s.N;
  o.A.resize(s.M * s.K);
  o.B.resize(s.K * s.N);
  o.C.assign(s.M * s.N, 0.f);
  for (size_t i = 0; i < o.A.size(); ++i) o.A[i] = counter_uniform(1, 0, i) - 0.5f;
  for (size_t i = 0; i < o.B.size(); ++i) o.B[i] = counter_uniform(2, 0, i) - 0.5f;
  return o;
}

void run(const Shape& s, Operands& o) {
  ops::gemm(s.ta, s.tb, s.M, s.N, s.K, 1.f, o.A.data(), o.lda, o.B.data(), o.ldb, s.beta,
            o.C.data(), o.ldc);
}

// GFLOP/s of calls for about `seconds` (at least 3 calls): per wall second, and per second of
// the busiest thread's on-CPU time (the idle-machine estimate of docs/performance.md, robust to
// load with OMP_WAIT_POLICY=passive).
struct Rate {
  double wall, idle;
};
Rate rate(const Shape& s, Operands& o, double seconds) {
  const double flop = 2.0 * s.M * s.N * s.K / 1e9;
  const auto th0 = bench::thread_cpu_seconds();
  const auto t0 = std::chrono::steady_clock::now();
  i64 calls = 0;
  do {
    run(s, o);
    ++calls;
  } while (bench::seconds_since(t0) < seconds || calls < 3);
  const double wall = bench::seconds_since(t0);
  const double busiest = bench::busiest_thread_seconds(th0, bench::thread_cpu_seconds());
  return {calls * flop / wall, calls * flop / std::max(1e-9, busiest)};
}

}  // namespace

int cmd_bench_gemm(const BenchGemmArgs& a) {
  DLCM_CHECK(a.repeats > 0 && a.seconds > 0, "bench gemm: --repeats and --seconds must be > 0");
  std::unique_ptr<bench::LineProcess> peer;
  if (!a.torch.empty()) {
    DLCM_CHECK(std::filesystem::exists(a.torch), "bench gemm: --torch ", a.torch,
               ": no such interpreter (torch 2.x: bash scripts/setup_bench.sh, then "
               ".venv-torch2/bin/python)");
    std::vector<std::string> unset;
    const std::vector<std::string> env = bench::torch_peer_env(true, unset);  // as bench train's
    peer = std::make_unique<bench::LineProcess>(
        std::vector<std::string>{a.torch, bench::peer_script("bench_torch_gemm.py"),
                                 "--serve"},
        env, unset);
    json info;
    DLCM_CHECK(peer->reply(info) && info.contains("ready"), "bench gemm: the PyTorch peer (",
               a.torch, ") did not start:\n", peer->log());
    std::printf("pytorch %s peer (%s): %s\n", info.value("torch", std::string("?")).c_str(),
                a.torch.c_str(), info.value("settings", std::string("")).c_str());
  }
  auto torch_rate = [&](const Shape& s, double seconds) {
    char line[160];
    std::snprintf(line, sizeof line, "gemm %d %d %lld %lld %lld %g %g", int(s.ta), int(s.tb),
                  (long long)s.M, (long long)s.N, (long long)s.K, double(s.beta), seconds);
    peer->send(line);
    json r;
    const bool ok = peer->reply(r);
    DLCM_CHECK(ok && r.contains("gflops"), "bench gemm: the PyTorch peer failed on \"", line,
               "\": ", ok ? r.value("error", std::string("no rate in its reply")) : "no reply",
               "\n", peer->log());
    return Rate{r["gflops"].get<double>(), r["gflops_idle"].get<double>()};
  };
  const ops::GemmPath path0 = ops::gemm_path();
  const ops::Precision prec0 = ops::gemm_precision();
  std::vector<ops::Precision> precs = {ops::Precision::FP32};
  if (ops::cpu_has_bf16()) precs.push_back(ops::Precision::BF16);
  std::printf("threads: %d (OMP_NUM_THREADS); oneDNN %s\n", omp_get_max_threads(),
              ops::onednn_version().c_str());
  std::printf("kernels: %s\n", ops::isa_summary().c_str());
  if (!ops::cpu_has_bf16()) std::printf("no AVX512-BF16 on this CPU: FP32 only\n");
  std::printf("median of %lld repeats of ~%.2f s per path (runtime and fixed alternate); BF16 "
              "includes the operands' rounding\n",
              (long long)a.repeats, a.seconds);
  std::printf("GFLOP/s per wall second | per second of the busiest thread's CPU time (idle "
              "estimate; OMP_WAIT_POLICY=%s)\n",
              std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "unset");
  // the runtime path's other blocked-sgemm choice, measured beside it so that either default
  // can be checked on this CPU
  const ops::BlockedUse alt_use =
      ops::blocked_use() == ops::BlockedUse::Tn || !ops::blocked_sgemm_native()
          ? ops::BlockedUse::Off
          : ops::BlockedUse::Tn;
  const char* alt = alt_use == ops::BlockedUse::Off ? "onednn" : "blocked";
  std::printf("FP32 rows end with the runtime path %s%s, per wall second, then each path's "
              "share of the FP32 FMA ceiling (a register loop of FMAs, no memory) and of the L1 "
              "loop (a micro-kernel tile fed from L1), both measured in each repeat\n",
              alt_use == ops::BlockedUse::Off
                  ? "on oneDNN's sgemm alone (onednn: no dlcm blocked sgemm)"
                  : "with the weight gradients on dlcm's blocked sgemm (blocked: not the default "
                    "on this CPU)",
              peer ? " and PyTorch's matmul" : "");
  std::printf("%-5s %-17s %-4s %15s %7s %7s %7s | %7s %7s %7s  %s\n", "prec", "product", "op",
              "M x N x K", "runtime", "fixed", "ratio", "runtime", "fixed", "ratio",
              ("implementation (runtime | fixed) | fp32: " + std::string(alt) + ", runtime/" + alt +
               "[, torch, runtime/torch] | ceiling: runtime fixed | L1 loop: runtime fixed").c_str());
  std::vector<double> ceilings, l1_ceilings;  // the FP32 FMA ceilings, per FP32 repeat
  // The fixed column times the fixed-shape primitive for every form, x W^T included (training
  // runs FP32 x W^T on sgemm on the fixed path, ops::set_fp32_nt_sgemm).
  const ops::Fp32NtSgemmScope primitives_for_every_form(false);
  std::printf("fixed: a fixed-shape primitive for every product here, FP32 x W^T (NT) included; "
              "training's fixed path runs FP32 x W^T on sgemm instead (DLCM_FP32_NT_SGEMM)\n");
  for (ops::Precision p : precs) {
    ops::set_gemm_precision(p);
    for (const Shape& s : kShapes) {
      Operands o = make_operands(s);
      std::string impl[2];
      const ops::GemmPath paths[2] = {ops::GemmPath::Runtime, ops::GemmPath::Fixed};
      for (int k = 0; k < 2; ++k) {
        ops::set_gemm_path(paths[k]);
        impl[k] = ops::gemm_impl(s.ta, s.tb, s.M, s.N, s.K, 1.f, o.lda, o.ldb, s.beta, o.ldc);
        for (int w = 0; w < 3; ++w) run(s, o);  // warm-up; the fixed path's primitive creation
      }
      const bool fp32 = p == ops::Precision::FP32;
      if (fp32) {  // the other blocked-sgemm choice's warm-up
        ops::set_gemm_path(ops::GemmPath::Runtime);
        ops::BlockedUseScope other(alt_use);
        for (int w = 0; w < 3; ++w) run(s, o);
      }
      std::vector<double> wall[2], idle[2], ratio, idle_ratio, alt_rates, vs_alt, torch, vs_torch;
      // FP32: each path's wall rate / the register loop's ceiling, / the L1 loop's
      std::vector<double> of_ceiling[2], of_l1[2];
      for (i64 rep = 0; rep < a.repeats; ++rep) {
        for (int k = 0; k < 2; ++k) {
          ops::set_gemm_path(paths[k]);
          const Rate r = rate(s, o, a.seconds);
          wall[k].push_back(r.wall);
          idle[k].push_back(r.idle);
        }
        ratio.push_back(wall[1].back() / wall[0].back());
        idle_ratio.push_back(idle[1].back() / idle[0].back());
        if (fp32) {
          ops::set_gemm_path(ops::GemmPath::Runtime);
          {
            ops::BlockedUseScope other(alt_use);
            alt_rates.push_back(rate(s, o, a.seconds).wall);
          }
          vs_alt.push_back(wall[0].back() / alt_rates.back());
          const ops::FmaCeiling fc = ops::fma_ceiling(a.seconds / 2);
          if (fc.gflops > 0) {
            ceilings.push_back(fc.gflops);
            for (int k = 0; k < 2; ++k) of_ceiling[k].push_back(wall[k].back() / fc.gflops);
          }
          const ops::FmaCeiling l1 = ops::fma_ceiling(a.seconds / 2, 0, ops::FmaLoop::L1Operands);
          if (l1.gflops > 0) {
            l1_ceilings.push_back(l1.gflops);
            for (int k = 0; k < 2; ++k) of_l1[k].push_back(wall[k].back() / l1.gflops);
          }
          if (peer) {
            torch.push_back(torch_rate(s, a.seconds).wall);
            vs_torch.push_back(wall[0].back() / torch.back());
          }
        }
      }
      char dims[48];
      std::snprintf(dims, sizeof dims, "%lldx%lldx%lld", (long long)s.M, (long long)s.N,
                    (long long)s.K);
      std::string extra;
      if (fp32) {
        char buf[96];
        std::snprintf(buf, sizeof buf, " | %.1f %.2fx", bench::median(alt_rates),
                      bench::median(vs_alt));
        extra = buf;
        if (peer) {
          std::snprintf(buf, sizeof buf, ", %.1f %.2fx", bench::median(torch),
                        bench::median(vs_torch));
          extra += buf;
        }
        if (!of_ceiling[0].empty()) {
          std::snprintf(buf, sizeof buf, " | ceiling %.0f%% %.0f%% | L1 loop %.0f%% %.0f%%",
                        100 * bench::median(of_ceiling[0]), 100 * bench::median(of_ceiling[1]),
                        100 * bench::median(of_l1[0]), 100 * bench::median(of_l1[1]));
          extra += buf;
        }
      }
      std::printf("%-5s %-17s %c%c%s %15s %7.1f %7.1f %6.2fx | %7.1f %7.1f %6.2fx  %s | %s%s\n",
                  ops::precision_name(p), s.what, s.ta ? 'T' : 'N', s.tb ? 'T' : 'N',
                  s.beta == 0.f ? "  " : "+C", dims, bench::median(wall[0]),
                  bench::median(wall[1]), bench::median(ratio), bench::median(idle[0]),
                  bench::median(idle[1]), bench::median(idle_ratio), impl[0].c_str(),
                  impl[1].c_str(), extra.c_str());
      std::fflush(stdout);
    }
  }
  ops::set_gemm_path(path0);
  ops::set_gemm_precision(prec0);
  if (!ceilings.empty())
    std::printf("FP32 FMA ceiling (%s register loop, %d threads; median of the FP32 repeats): "
                "%.1f GFLOP/s; L1 loop (a micro-kernel tile fed from L1): %.1f GFLOP/s (%.0f%% "
                "of the register loop)\n",
                ops::isa_name(ops::isa()), omp_get_max_threads(), bench::median(ceilings),
                bench::median(l1_ceilings),
                100 * bench::median(l1_ceilings) / bench::median(ceilings));
  else
    std::printf("FP32 FMA ceiling: not measured (scalar kernel level)\n");
  return 0;
}

}  // namespace dlcm
