// `dlcm bench train`: training throughput and MFU of the engine, and of the PyTorch reference
// on the same model in the same run (ratios are what count on a noisy machine).
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/dist.h"
#include "core/rng.h"
#include "models/flops.h"
#include "tools/commands.h"
#include "train/trainer.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

// The reference size of the docs: d=512, 8 layers, 8 heads, d_ff 1536, vocab 4096, seq 512,
// 8 sequences per step.
static json reference_baseline() {
  return {{"arch", "baseline"}, {"vocab_size", 4096}, {"d_token", 512},   {"n_heads", 8},
          {"n_kv_heads", 8},    {"head_dim", 64},     {"d_ff", 1536},     {"n_layers", 8},
          {"max_seq_len", 512}, {"train", {{"seq_len", 512}, {"batch_size", 8}, {"grad_accum", 1},
                                           {"warmup_steps", 0}, {"schedule", "constant"}}}};
}

// CPU seconds (user + system) this process has used, all threads.
static double cpu_seconds() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

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

  // Under mpirun the ranks train one model data-parallel (Trainer does the MPI part); rank 0
  // prints figures for the whole job.
  const int ranks = dist::size();
  const bool rank0 = dist::rank() == 0;
  DLCM_CHECK(ranks == 1 || a.no_torch, "bench train: under mpirun give --no-torch (the PyTorch ",
             "reference runs one process)");
  auto say = [&](auto... args) {
    if (rank0) std::printf(args...);
  };
  // Synthetic but fixed data: the cost of a step does not depend on token values.
  TrainData data;
  data.train_batch = [V](i64 step, i64 micro, i64 rank, i64 Bq, i64 Lq, i32* tok, i32* tgt) {
    for (i64 i = 0; i < Bq * Lq; ++i) {
      tok[i] = i32(counter_hash(7, step, micro, i) % uint64_t(V));
      tgt[i] = i32(counter_hash(8, step, micro, i) % uint64_t(V));
    }
  };
  TrainOptions opt;
  opt.quiet = true;
  opt.peak_gflops = 1;  // the trainer's MFU is not used here; the peak is measured below
  Trainer tr(cfg, data, opt);  // under MPI this also sets the threads of each rank
  say("threads: %d per process (%s), %d process(es)\n", omp_get_max_threads(),
      ranks > 1 ? "chosen by the trainer, see docs/distributed.md" : "OMP_NUM_THREADS", ranks);
  double peak = measure_gemm_peak_gflops(1.0, 2048);
  double job_peak = peak;
  dist::allreduce_sum(&job_peak, 1);
  if (ranks > 1)
    say("FP32 GEMM peak (oneDNN sgemm 2048^3, median, measured on all ranks at once): %.1f GFLOP/s "
        "(rank 0: %.1f)\n", job_peak, peak);
  else
    say("FP32 GEMM peak (oneDNN sgemm 2048^3, median): %.1f GFLOP/s\n", peak);

  const double flops_tok = 3.0 * tr.model().flops_per_token(L);
  tr.train_step();  // warm-up: first-touch of every buffer
  std::vector<double> rates, comm, cpu;
  i64 buckets = 0, early = 0;
  for (i64 r = 0; r < a.repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    double c0 = cpu_seconds(), wait = 0;
    for (i64 s = 0; s < a.steps; ++s) {
      StepResult st = tr.train_step();
      wait += st.allreduce_seconds;
      buckets = st.buckets;
      early = st.buckets_early;
    }
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double c = cpu_seconds() - c0;
    dist::allreduce_sum(&c, 1);  // the job's CPU time (busy-waiting included)
    const double tokens = double(a.steps * B * L * t.grad_accum * ranks);
    rates.push_back(tokens / sec);
    comm.push_back(wait / sec);
    cpu.push_back(c / tokens * 1e3);
  }
  double ours = median(rates);
  double mfu = flops_tok * ours / (job_peak * 1e9);
  say("model: %s, %.2fM params, %.3f GFLOP/token (training, 3x forward)\n",
      cfg.model.arch.c_str(), tr.model().params().total() / 1e6, flops_tok / 1e9);
  say("dlcm engine : %10.0f tokens/s  (median of %lld x %lld steps)  MFU %.1f%%\n", ours,
      (long long)a.repeats, (long long)a.steps, 100 * mfu);
  // On a shared machine wall time measures the load of others; CPU time per token measures
  // the work (and waiting) of this job.
  say("CPU time: %.2f s per 1k tokens (all processes and threads, median)\n", median(cpu));
  if (ranks > 1)
    say("gradient all-reduce: %.1f%% of the step waiting in it (rank 0, median; %s, %lld buckets "
        "of %.0f MB, %lld started during backward)\n",
        100 * median(comm), t.allreduce_overlap ? "overlapped with backward" : "after backward",
        (long long)buckets, double(t.allreduce_bucket_mb), (long long)early);

  if (!a.no_torch) {
    fs::path cfg_path = fs::temp_directory_path() / ("dlcm-bench-" + std::to_string(getpid()) + ".json");
    {
      std::ofstream f(cfg_path);
      f << config_to_json(cfg).dump(1);
    }
    std::string script = std::string(DLCM_SOURCE_DIR) + "/python/bench_torch.py";
    std::string cmd = "/usr/bin/python3 " + script + " --config " + cfg_path.string() +
                      " --steps " + std::to_string(a.steps) + " --repeats " +
                      std::to_string(a.repeats) + " 2>&1";
    std::string out;
    if (FILE* p = popen(cmd.c_str(), "r")) {
      char buf[4096];
      while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
      int rc = pclose(p);
      fs::remove(cfg_path);
      auto pos = out.rfind("{\"tokens_per_s\"");
      if (rc != 0 || pos == std::string::npos) {
        std::printf("pytorch     : failed to run (%s)\n%s\n", cmd.c_str(), out.c_str());
        return 1;
      }
      json r = json::parse(out.substr(pos));
      double theirs = r["tokens_per_s"].get<double>();
      std::printf("pytorch %s: %10.0f tokens/s  MFU %.1f%%  (%s)\n",
                  r.value("torch", std::string("?")).c_str(), theirs,
                  100 * flops_tok * theirs / (peak * 1e9), r.value("settings", std::string()).c_str());
      std::printf("speed-up over pytorch: %.2fx\n", ours / theirs);
    }
  }
  return 0;
}

}  // namespace dlcm
