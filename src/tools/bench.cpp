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
#include "models/model.h"
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

// The config of --config (or the reference baseline) with --set overrides.
static Config bench_config(const std::string& path, const std::vector<std::string>& sets) {
  json j;
  if (path.empty()) {
    j = reference_baseline();
  } else {
    std::ifstream f(path);
    DLCM_CHECK(f, path, ": cannot open config file (check --config)");
    try {
      j = json::parse(f);
    } catch (const json::parse_error& e) {
      fail(path, ": invalid JSON: ", e.what());
    }
  }
  apply_overrides(j, sets);
  return config_from_json(j, path.empty() ? "reference baseline" : path);
}

int cmd_bench_train(const BenchTrainArgs& a) {
  Config cfg = bench_config(a.config, a.sets);
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

// `dlcm bench decode`: greedy decoding of `batch` copies of a random prompt, once with the
// streaming caches (prefill + one step per token) and once recomputing the whole prefix every
// step (LanguageModel::logits over all positions, as generation did before the caches). Both
// decode the same tokens; the ratio is what counts on a shared machine.
int cmd_bench_decode(const BenchDecodeArgs& a) {
  std::unique_ptr<LanguageModel> m;
  std::string what;
  if (!a.ckpt.empty()) {
    DLCM_CHECK(a.config.empty() && a.sets.empty(), "give --ckpt or --config/--set, not both");
    m = load_model(a.ckpt, &what);
  } else {
    Config cfg = bench_config(a.config, a.sets);
    m = make_initialised_model(cfg.model, 1);
    what = a.config.empty() ? "reference baseline config, random weights" : a.config + ", random weights";
  }
  const ModelConfig& mc = m->config();
  const i64 B = a.batch, P = a.prompt_len, T = a.new_tokens, V = mc.vocab_size;
  DLCM_CHECK(P >= 1 && T >= 1 && B >= 1 && a.repeats >= 1,
             "bench decode: --prompt-len, --new-tokens, --batch and --repeats must be >= 1");
  DLCM_CHECK(P + T <= mc.max_seq_len, "bench decode: --prompt-len ", P, " + --new-tokens ", T,
             " exceed the model's max_seq_len ", mc.max_seq_len);
  std::vector<i32> prompt(P);
  for (i64 i = 0; i < P; ++i) prompt[i] = i32(4 + counter_hash(3, i) % uint64_t(V - 4));
  prompt[0] = mc.bos_id;
  auto argmax = [V](const float* l) { return i32(std::max_element(l, l + V) - l); };
  using clk = std::chrono::steady_clock;
  auto secs = [](clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); };

  std::printf("model: %s (%s), %.2fM params, threads %d\n", mc.arch.c_str(), what.c_str(),
              m->params().total() / 1e6, omp_get_max_threads());
  std::printf("decode: batch %lld, prompt %lld tokens, %lld new tokens per sequence (greedy)\n",
              (long long)B, (long long)P, (long long)T);
  {  // warm-up: first touch of buffers, GEMM kernel set-up
    auto st = m->new_stream({B, P + T, -1});
    Buf lg(V);
    st->prefill(0, prompt.data(), P, lg.data());
    i64 s0 = 0;
    st->step(&s0, prompt.data() + 1, 1, lg.data());
  }
  std::vector<double> cached_rates, prefill_rates, recompute_rates;
  std::vector<i32> gen_cached, gen_recompute;
  for (i64 r = 0; r < a.repeats; ++r) {
    // Cached: prefill every sequence in one batched pass, then T batched steps.
    StreamOptions so;
    so.max_seqs = B;
    so.max_len = P + T;
    auto st = m->new_stream(so);
    std::vector<PrefillItem> items;
    for (i64 b = 0; b < B; ++b) items.push_back({b, prompt.data(), P});
    Buf lg(B * V);
    std::vector<i64> seqs(B);
    std::vector<i32> next(B);
    for (i64 b = 0; b < B; ++b) seqs[b] = b;
    gen_cached.clear();
    auto t0 = clk::now();
    st->prefill(items.data(), B, lg.data());
    prefill_rates.push_back(double(B * P) / secs(t0));
    t0 = clk::now();
    for (i64 t = 0; t < T; ++t) {
      for (i64 b = 0; b < B; ++b) next[b] = argmax(lg.data() + b * V);
      gen_cached.push_back(next[0]);
      if (t + 1 < T) st->step(seqs.data(), next.data(), B, lg.data());
    }
    cached_rates.push_back(double(B * T) / secs(t0));

    // Recompute: the whole prefix of every sequence each step.
    std::vector<i32> rows(B * (P + T));
    std::vector<i32> cur = prompt;
    Buf full(B * (P + T) * V);
    gen_recompute.clear();
    t0 = clk::now();
    for (i64 t = 0; t < T; ++t) {
      const i64 L = cur.size();
      for (i64 b = 0; b < B; ++b) std::copy(cur.begin(), cur.end(), rows.begin() + b * L);
      m->logits(rows.data(), B, L, full.data());
      const i32 nx = argmax(full.data() + (L - 1) * V);  // row 0 (all rows are equal)
      gen_recompute.push_back(nx);
      cur.push_back(nx);
    }
    recompute_rates.push_back(double(B * T) / secs(t0));
  }
  i64 agree = 0;
  while (agree < T && gen_cached[agree] == gen_recompute[agree]) ++agree;
  const double c = median(cached_rates), rc = median(recompute_rates);
  std::printf("prefill (cached)       : %10.1f tokens/s\n", median(prefill_rates));
  std::printf("decode with caches     : %10.1f tokens/s  (%.2f ms per step)\n", c, 1e3 * B / c);
  std::printf("decode by recompute    : %10.1f tokens/s  (%.2f ms per step)\n", rc, 1e3 * B / rc);
  std::printf("speed-up of the caches : %.2fx   (median of %lld repeats; greedy tokens agree for %lld of %lld)\n",
              c / rc, (long long)a.repeats, (long long)agree, (long long)T);
  return 0;
}

}  // namespace dlcm
