// `dlcm bench train`: training throughput and MFU of the engine (one or more precisions), and
// of the PyTorch reference on the same model, all in one run with their repeats interleaved
// (ratios are what count on a noisy machine); optionally the per-component time breakdown of
// a step, and resident memory per step.
#include <fcntl.h>
#include <omp.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/profiler.h"
#include "core/rng.h"
#include "kernels/gemm.h"
#include "models/flops.h"
#include "tools/bench_common.h"
#include "tools/commands.h"
#include "train/trainer.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;
using bench::cpu_seconds;
using bench::measure_peak;
using bench::Peak;

namespace {

// The reference size of the docs: d=512, 8 layers, 8 heads, d_ff 1536, vocab 4096, seq 512,
// 8 sequences per step.
json reference_baseline() {
  return {{"arch", "baseline"}, {"vocab_size", 4096}, {"d_token", 512},   {"n_heads", 8},
          {"n_kv_heads", 8},    {"head_dim", 64},     {"d_ff", 1536},     {"n_layers", 8},
          {"max_seq_len", 512}, {"train", {{"seq_len", 512}, {"batch_size", 8}, {"grad_accum", 1},
                                           {"warmup_steps", 0}, {"schedule", "constant"}}}};
}

// A child process we talk to by lines (the PyTorch peer in --serve mode).
class LineProcess {
 public:
  // Runs `argv` with `env` added to this process's environment (and `unset` removed).
  LineProcess(const std::vector<std::string>& argv, const std::vector<std::string>& env,
              const std::vector<std::string>& unset) {
    int in[2], out[2];
    DLCM_CHECK(pipe(in) == 0 && pipe(out) == 0, "bench: cannot create pipes");
    pid_ = fork();
    DLCM_CHECK(pid_ >= 0, "bench: fork failed");
    if (pid_ == 0) {
      dup2(in[0], 0);
      dup2(out[1], 1);
      dup2(out[1], 2);
      close(in[1]);
      close(out[0]);
      for (auto& u : unset) unsetenv(u.c_str());
      for (auto& e : env) putenv(const_cast<char*>(e.c_str()));
      std::vector<char*> args;
      for (auto& s : argv) args.push_back(const_cast<char*>(s.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      std::fprintf(stderr, "exec %s failed\n", args[0]);
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    to_ = fdopen(in[1], "w");
    from_ = fdopen(out[0], "r");
  }
  ~LineProcess() {
    if (to_) {
      std::fputs("quit\n", to_);
      std::fclose(to_);
    }
    if (from_) std::fclose(from_);
    if (pid_ > 0) waitpid(pid_, nullptr, 0);
  }
  void send(const std::string& line) {
    std::fputs((line + "\n").c_str(), to_);
    std::fflush(to_);
  }
  // The next line that starts with '{' (a JSON reply); other lines are kept as the log.
  bool reply(json& j) {
    char buf[8192];
    while (std::fgets(buf, sizeof buf, from_)) {
      std::string s(buf);
      if (!s.empty() && s[0] == '{') {
        try {
          j = json::parse(s);
          return true;
        } catch (...) {
        }
      }
      log_ += s;
    }
    return false;
  }
  const std::string& log() const { return log_; }

 private:
  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
  std::string log_;
};

// One engine configuration under test (one precision).
struct Engine {
  std::string precision;
  std::unique_ptr<Trainer> tr;
  // per repeat: tokens/s, tokens per process CPU-second, tokens per second of the busiest
  // thread (idle-machine estimate), MFU (wall, idle estimate), the ratio to the PyTorch peer
  // (wall, CPU time, idle estimate)
  std::vector<double> rate, cpu_rate, idle_rate, mfu, idle_mfu, vs_torch, vs_torch_cpu,
      vs_torch_idle;
  std::map<std::string, double> prof_sec, prof_cpu;
  std::vector<std::string> prof_order;
  i64 prof_steps = 0;
  double sum_F = 0;
  i64 n_F = 0;
};

// Concept lengths 1 + Geometric with mean R, a pure function of (step, micro, row).
void geometric_boundaries(uint8_t* b, i64 step, i64 micro, i64 B, i64 L, double R) {
  const double q = std::log(1.0 - 1.0 / R);
  for (i64 r = 0; r < B; ++r) {
    std::fill(b + r * L, b + (r + 1) * L, 0);
    for (i64 t = 0, j = 0; t < L; ++j) {
      b[r * L + t] = 1;
      const double u = std::max(1e-12, double(counter_uniform(31, step, micro, r, j)));
      t += 1 + i64(std::floor(std::log(u) / q));
    }
  }
}

// Forward FLOPs per token of each profiled component (training = 3x), for GFLOP/s columns.
std::map<std::string, double> component_flops(const Config& cfg, double R) {
  const ModelConfig& m = cfg.model;
  const i64 L = cfg.train.seq_len;
  std::map<std::string, double> f;
  FlopsReport rep = flops_report(m, L, R);
  auto get = [&](const char* k) {
    for (auto& [name, v] : rep.model)
      if (name == k) return v;
    return 0.0;
  };
  if (!m.is_dlcm()) {
    f["layers"] = get("layers");
    f["head"] = get("head");
    return f;
  }
  for (auto [comp, key] : {std::pair{"encoder", "encoder"}, {"router", "router"},
                           {"pooling", "pooling"}, {"backbone", "backbone"},
                           {"cross FFN", "cross_ffn"}, {"decoder", "decoder"}, {"head", "head"}})
    f[comp] = get(key);
  // The attention kernel's share of the cross-attention (what it executes: the model's
  // visible-concept pairs for compact, the L x L causal pairs for replicate).
  const double M = L / R;
  const double pairs = m.xattn_impl == "replicate" ? (L + 1) / 2.0 : (M + 1) / 2.0 + 0.5;
  const double kernel = 4.0 * m.head_dim * m.x_heads * pairs;
  f["  concept attention kernel"] = kernel;
  f["cross-attention"] = get("cross_attention") - 4.0 * m.head_dim * m.x_heads * ((M + 1) / 2.0 + 0.5);
  return f;
}

void print_breakdown(const Engine& e, const Config& cfg, double tokens_per_step) {
  if (e.prof_steps == 0) return;
  const double R = e.n_F > 0 && e.sum_F > 0 ? e.n_F / e.sum_F : cfg.model.target_R;
  auto fl = component_flops(cfg, R);
  double total = 0;
  for (auto& [k, v] : e.prof_sec) total += v;
  std::printf("\nbreakdown of one training step (%s, %s, mean over %lld timed steps%s)\n",
              cfg.model.arch.c_str(), e.precision.c_str(), (long long)e.prof_steps,
              cfg.model.is_dlcm() ? (", realised compression " + std::to_string(R).substr(0, 4)).c_str() : "");
  double total_cpu = 0;
  for (auto& [k, v] : e.prof_cpu) total_cpu += v;
  std::printf("  %-28s %10s %7s %10s %12s %7s\n", "component", "ms/step", "share", "GFLOP/s",
              "CPU ms/step", "share");
  double model_flops = 0;
  for (const auto& name : e.prof_order) {
    const double sec = e.prof_sec.at(name) / e.prof_steps;
    auto it = fl.find(name);
    char gf[32] = "";
    if (it != fl.end() && it->second > 0 && sec > 0) {
      std::snprintf(gf, sizeof gf, "%10.1f", 3 * it->second * tokens_per_step / sec / 1e9);
      model_flops += 3 * it->second * tokens_per_step;
    } else if (name == "optimizer" && sec > 0) {
      // AdamW reads w, g, m, v and writes w, m, v; clipping reads g twice; zero_grad writes g.
      const double bytes = 40.0 * e.tr->model().params().total();
      std::snprintf(gf, sizeof gf, "%7.1f GB/s", bytes / sec / 1e9);
    }
    const double cpu = e.prof_cpu.at(name);
    std::printf("  %-28s %10.1f %6.1f%% %-11s %12.1f %6.1f%%\n", name.c_str(), 1e3 * sec,
                100 * e.prof_sec.at(name) / total, gf, 1e3 * cpu / e.prof_steps,
                100 * cpu / total_cpu);
  }
  std::printf("  %-28s %10.1f %6.1f%% %10.1f  %12.1f %6.1f%%\n", "total", 1e3 * total / e.prof_steps,
              100.0, model_flops / (total / e.prof_steps) / 1e9, 1e3 * total_cpu / e.prof_steps,
              100.0);
}

}  // namespace

int cmd_bench_train(const BenchTrainArgs& a) {
  json j;
  if (a.config.empty()) {
    j = reference_baseline();
  } else {
    std::ifstream f(a.config);
    DLCM_CHECK(f, a.config, ": cannot open config file (check --config)");
    try {
      j = json::parse(f);
    } catch (const json::parse_error& e) {
      fail(a.config, ": invalid JSON: ", e.what());
    }
  }
  apply_overrides(j, a.sets);
  Config cfg = config_from_json(j, a.config.empty() ? "reference baseline" : a.config);
  cfg.train.warmup_steps = 0;
  cfg.train.schedule = "constant";
  const TrainConfig& t = cfg.train;
  const i64 B = t.batch_size, L = t.seq_len, V = cfg.model.vocab_size;
  const double tokens_per_step = double(B * L * t.grad_accum);
  DLCM_CHECK(a.steps > 0 && a.repeats > 0, "--steps and --repeats must be > 0");
  std::vector<std::string> precisions = a.precisions;
  if (precisions.empty()) precisions.push_back(t.precision);
  for (auto& p : precisions) ops::parse_precision(p, "--precision");
  const double R = cfg.model.is_dlcm() ? (a.R < 0 ? cfg.model.target_R : a.R) : 0;
  DLCM_CHECK(R == 0 || R > 1, "--R must be > 1 (or 0: sample boundaries from the router)");

  std::printf("threads: %d (OMP_NUM_THREADS)\n", omp_get_max_threads());
  std::printf("model: %s%s\n", a.config.empty() ? "reference baseline" : a.config.c_str(),
              cfg.model.is_dlcm()
                  ? (R > 0 ? (", concepts of 1 + Geometric lengths, mean R = " + std::to_string(R).substr(0, 4))
                           : std::string(", boundaries sampled from the (untrained) router")).c_str()
                  : "");

  // Synthetic but fixed data: the cost of a step does not depend on token values.
  TrainData data;
  data.train_batch = [V](i64 step, i64 micro, i64 rank, i64 Bq, i64 Lq, i32* tok, i32* tgt) {
    for (i64 i = 0; i < Bq * Lq; ++i) {
      tok[i] = i32(2 + counter_hash(7, step, micro, i) % uint64_t(V - 2));  // no BOS
      tgt[i] = i32(counter_hash(8, step, micro, i) % uint64_t(V));
    }
  };
  if (R > 0)
    data.train_boundaries = [R](i64 step, i64 micro, i64, i64 Bq, i64 Lq, uint8_t* b) {
      geometric_boundaries(b, step, micro, Bq, Lq, R);
    };
  TrainOptions opt;
  opt.quiet = true;
  opt.peak_gflops = 1;  // MFU is computed here, against the peak measured in each repeat
  std::vector<Engine> eng(precisions.size());
  for (size_t i = 0; i < eng.size(); ++i) {
    Config c = cfg;
    c.train.precision = precisions[i];
    eng[i].precision = precisions[i];
    eng[i].tr = std::make_unique<Trainer>(c, data, opt);
  }
  std::printf("parameters: %.2fM\n", eng[0].tr->model().params().total() / 1e6);
  // warm-up: first touch of every buffer, primitive caches, concept buffers, and the GEMM-peak
  // products' scratch (so that RSS over the timed steps is the engines' own)
  const bool has16 = ops::cpu_has_bf16() &&
                     std::find(precisions.begin(), precisions.end(), "bf16") != precisions.end();
  measure_peak(0.05, 2048);
  if (has16) {
    ops::PrecisionScope bf(ops::Precision::BF16);
    measure_peak(0.05, 2048);
  }
  for (auto& e : eng)
    for (int w = 0; w < 2; ++w) e.tr->train_step();

  // The PyTorch peer: a child process that has built the same model and answers "run N".
  std::unique_ptr<LineProcess> torch;
  json torch_info;
  if (!a.no_torch) {
    fs::path cfg_path = fs::temp_directory_path() / ("dlcm-bench-" + std::to_string(getpid()) + ".json");
    {
      Config c = cfg;
      std::ofstream f(cfg_path);
      f << config_to_json(c).dump(1);
    }
    std::vector<std::string> env = {"OMP_NUM_THREADS=" + std::to_string(omp_get_max_threads())},
                             unset;
    // Best settings for the PyTorch side: jemalloc without decay, OpenBLAS's own AVX-512
    // kernel choice (an OPENBLAS_CORETYPE forcing an AVX2 core is removed).
    // ATen's own vector kernels default to AVX2; AVX-512 measured faster here.
    const char* jem = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    if (!a.torch_default) {
      if (fs::exists(jem)) {
        env.push_back(std::string("LD_PRELOAD=") + jem);
        env.push_back("MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1");
      }
      env.push_back("ATEN_CPU_CAPABILITY=avx512");
    }
    if (const char* ct = std::getenv("OPENBLAS_CORETYPE")) {
      std::string s(ct);
      for (auto& ch : s) ch = char(std::toupper(ch));
      if (s != "SKYLAKEX" && s != "COOPERLAKE" && s != "SAPPHIRERAPIDS") {
        unset.push_back("OPENBLAS_CORETYPE");
        std::printf("pytorch: OPENBLAS_CORETYPE=%s unset for the peer (not an AVX-512 core)\n", ct);
      }
    }
    std::vector<std::string> argv = {"/usr/bin/python3",
                                     std::string(DLCM_SOURCE_DIR) + "/python/bench_torch.py",
                                     "--config", cfg_path.string(), "--serve",
                                     "--R", std::to_string(R)};
    torch = std::make_unique<LineProcess>(argv, env, unset);
    if (!torch->reply(torch_info) || !torch_info.contains("ready")) {
      std::printf("pytorch: failed to start (%s)\n%s\n", argv[1].c_str(), torch->log().c_str());
      fs::remove(cfg_path);
      return 1;
    }
    fs::remove(cfg_path);
    std::string envs;
    for (auto& e : env) envs += (envs.empty() ? "" : " ") + e;
    std::printf("pytorch %s peer: %s; env: %s\n", torch_info.value("torch", "?").c_str(),
                torch_info.value("settings", "").c_str(), envs.c_str());
  }

  // Repeats, interleaved: GEMM peak, each engine, the PyTorch peer.
  std::vector<double> peaks, idle_peaks, peaks16, idle_peaks16, torch_rates, torch_cpu_rates,
      torch_idle_rates, rss_steps;
  double torch_rss = 0;
  for (i64 r = 0; r < a.repeats; ++r) {
    const Peak pk = measure_peak(0.3, 2048);
    peaks.push_back(pk.wall);
    idle_peaks.push_back(pk.idle);
    Peak p16 = pk;
    if (has16) {
      ops::PrecisionScope bf(ops::Precision::BF16);
      p16 = measure_peak(0.3, 2048);
      peaks16.push_back(p16.wall);
      idle_peaks16.push_back(p16.idle);
    }
    for (auto& e : eng) {
      const double flops_tok =
          3.0 * (cfg.model.is_dlcm() && R > 0 ? flops_report(cfg.model, L, R).total()
                                              : e.tr->model().flops_per_token(L));
      if (a.breakdown) {
        prof::reset();
        prof::enable(true);
      }
      const double c0 = cpu_seconds();
      const auto th0 = bench::thread_cpu_seconds();
      auto t0 = std::chrono::steady_clock::now();
      for (i64 s = 0; s < a.steps; ++s) {
        StepResult sr = e.tr->train_step();
        e.sum_F += sr.F;
        ++e.n_F;
        rss_steps.push_back(bench::read_rss().now_mib);
      }
      const double sec = bench::seconds_since(t0), cpu = cpu_seconds() - c0;
      const double busiest = bench::busiest_thread_seconds(th0, bench::thread_cpu_seconds());
      prof::enable(false);
      if (a.breakdown) {
        for (auto& en : prof::entries()) {
          if (!e.prof_sec.count(en.name)) e.prof_order.push_back(en.name);
          e.prof_sec[en.name] += en.seconds;
          e.prof_cpu[en.name] += en.cpu_seconds;
        }
        e.prof_steps += a.steps;
      }
      const double rate = a.steps * tokens_per_step / sec, cpu_rate = a.steps * tokens_per_step / cpu;
      const double idle_rate = a.steps * tokens_per_step / busiest;
      e.rate.push_back(rate);
      e.cpu_rate.push_back(cpu_rate);
      e.idle_rate.push_back(idle_rate);
      // MFU against the peak of the engine's own precision (SPEC 7)
      const Peak& own = e.precision == "bf16" ? p16 : pk;
      e.mfu.push_back(flops_tok * rate / (own.wall * 1e9));
      e.idle_mfu.push_back(flops_tok * idle_rate / (own.idle * 1e9));
    }
    if (torch) {
      torch->send("run " + std::to_string(a.steps));
      json rep;
      DLCM_CHECK(torch->reply(rep) && rep.contains("tokens_per_s"),
                 "pytorch peer stopped answering:\n", torch->log());
      torch_rates.push_back(rep["tokens_per_s"].get<double>());
      torch_cpu_rates.push_back(rep.value("tokens_per_cpu_s", 0.0));
      torch_idle_rates.push_back(rep.value("tokens_per_busiest_thread_s", 0.0));
      torch_rss = std::max(torch_rss, rep.value("peak_rss_mib", 0.0));
      for (auto& e : eng) {
        e.vs_torch.push_back(e.rate.back() / torch_rates.back());
        e.vs_torch_cpu.push_back(e.cpu_rate.back() / std::max(1e-9, torch_cpu_rates.back()));
        e.vs_torch_idle.push_back(e.idle_rate.back() / std::max(1e-9, torch_idle_rates.back()));
      }
    }
  }

  // ---- report ----
  std::printf("\nFigures: wall = measured tokens/s (the target's definition; on a loaded machine it "
              "depends on the CPU share each program got); idle = tokens per second of the busiest "
              "thread's on-CPU time (what an idle machine would give; needs OMP_WAIT_POLICY=passive "
              "under load, now %s).\n",
              std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "unset");
  std::printf("FP32 GEMM peak (oneDNN sgemm 2048^3, median of repeats): wall %.1f GFLOP/s, idle "
              "%.1f GFLOP/s\n",
              bench::median(peaks), bench::median(idle_peaks));
  if (!peaks16.empty())
    std::printf("BF16 GEMM peak (oneDNN bf16 matmul 2048^3 incl. operand rounding): wall %.1f "
                "GFLOP/s, idle %.1f GFLOP/s (%.2fx FP32)\n",
                bench::median(peaks16), bench::median(idle_peaks16),
                bench::median(idle_peaks16) / bench::median(idle_peaks));
  const double flops_tok = 3.0 * (cfg.model.is_dlcm() && R > 0 ? flops_report(cfg.model, L, R).total()
                                                               : eng[0].tr->model().flops_per_token(L));
  std::printf("model FLOPs: %.4f GFLOP/token (training = 3x forward)\n", flops_tok / 1e9);
  std::printf("median of %lld repeats x %lld steps of %.0f tokens:\n", (long long)a.repeats,
              (long long)a.steps, tokens_per_step);
  std::printf("  (MFU against the FP32 peak, for bf16 engines against the BF16 peak)\n");
  std::printf("  %-18s %11s %8s | %11s %8s | %14s\n", "", "wall tok/s", "MFU", "idle tok/s",
              "MFU", "tok/CPU-second");
  for (auto& e : eng)
    std::printf("  dlcm engine %-6s %11.0f %7.1f%% | %11.0f %7.1f%% | %14.0f\n",
                e.precision.c_str(), bench::median(e.rate), 100 * bench::median(e.mfu),
                bench::median(e.idle_rate), 100 * bench::median(e.idle_mfu),
                bench::median(e.cpu_rate));
  if (eng.size() > 1)
    for (size_t i = 1; i < eng.size(); ++i) {
      std::vector<double> ratio, cpu_ratio, idle_ratio;
      for (size_t r = 0; r < eng[i].rate.size(); ++r) {
        ratio.push_back(eng[i].rate[r] / eng[0].rate[r]);
        cpu_ratio.push_back(eng[i].cpu_rate[r] / eng[0].cpu_rate[r]);
        idle_ratio.push_back(eng[i].idle_rate[r] / eng[0].idle_rate[r]);
      }
      std::printf("  %s / %s tokens/s (medians of per-repeat ratios): wall %.2fx, idle %.2fx, per "
                  "CPU-second %.2fx\n",
                  eng[i].precision.c_str(), eng[0].precision.c_str(), bench::median(ratio),
                  bench::median(idle_ratio), bench::median(cpu_ratio));
    }
  if (torch) {
    const double theirs = bench::median(torch_rates);
    const double theirs_idle = bench::median(torch_idle_rates);
    std::printf("  pytorch            %11.0f %7.1f%% | %11.0f %7.1f%% | %14.0f\n", theirs,
                100 * flops_tok * theirs / (bench::median(peaks) * 1e9), theirs_idle,
                100 * flops_tok * theirs_idle / (bench::median(idle_peaks) * 1e9),
                bench::median(torch_cpu_rates));
    for (auto& e : eng)
      std::printf("  speed-up of the %s engine over pytorch (medians of per-repeat ratios): wall "
                  "%.2fx, idle %.2fx, per CPU-second %.2fx\n",
                  e.precision.c_str(), bench::median(e.vs_torch), bench::median(e.vs_torch_idle),
                  bench::median(e.vs_torch_cpu));
  }
  const auto [lo, hi] = std::minmax_element(rss_steps.begin(), rss_steps.end());
  std::printf("memory: peak RSS (VmHWM) %.1f MiB (the whole process: %zu engine(s), warm-up and "
              "GEMM-peak buffers included); RSS after each of the %zu timed steps %.1f..%.1f MiB, "
              "first %.1f, last %.1f (growth %+.1f MiB)\n",
              bench::read_rss().peak_mib, eng.size(), rss_steps.size(), *lo, *hi,
              rss_steps.front(), rss_steps.back(), rss_steps.back() - rss_steps.front());
  std::printf("        RSS after each timed step (MiB, engines in turn):");
  for (double m : rss_steps) std::printf(" %.1f", m);
  std::printf("\n");
  if (torch) std::printf("        pytorch peer: peak RSS %.1f MiB\n", torch_rss);
  if (a.breakdown)
    for (auto& e : eng) print_breakdown(e, cfg, tokens_per_step);
  return 0;
}

}  // namespace dlcm
