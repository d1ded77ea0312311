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

#include "core/dist.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "kernels/amx_gemm.h"
#include "kernels/blocked_sgemm.h"
#include "kernels/fma_ceiling.h"
#include "kernels/gemm.h"
#include "kernels/isa.h"
#include "kernels/ops.h"
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
using bench::LineProcess;

namespace {

// The reference size of the docs: d=512, 8 layers, 8 heads, d_ff 1536, vocab 4096, seq 512,
// 8 sequences per step.
json reference_baseline() {
  return {{"arch", "baseline"}, {"vocab_size", 4096}, {"d_token", 512},   {"n_heads", 8},
          {"n_kv_heads", 8},    {"head_dim", 64},     {"d_ff", 1536},     {"n_layers", 8},
          {"max_seq_len", 512}, {"train", {{"seq_len", 512}, {"batch_size", 8}, {"grad_accum", 1},
                                           {"warmup_steps", 0}, {"schedule", "constant"}}}};
}

// The oneDNN implementation of the GEMM-peak product (2048^3) at the current precision and path.
static std::string peak_impl() {
  return ops::gemm_impl(false, false, 2048, 2048, 2048, 1.f, 2048, 2048, 0.f, 2048);
}

// --gemm: "runtime" or "fixed" (oneDNN's paths only) or "tiles" (BF16 products on the AMX tile
// kernel where they fit, kernels/amx_gemm.h; the rest on the fixed path).
struct GemmChoice {
  ops::GemmPath path;
  bool amx;
  std::string name;
  ops::BlockedUse blocked = ops::blocked_use();  // FP32 products on dlcm's blocked sgemm
  i64 column_budget = ops::amx_column_budget();  // the tile kernel's column chunks (0: none)
  i64 k_block = ops::amx_k_block();              // the tile kernel's k per chunk of K
  bool strip_packing = ops::amx_strip_packing();  // the tile kernel's A packed per strip
  i64 stream_bytes = ops::amx_stream_bytes();  // whole packs from this size: non-temporal stores
  i64 stream_outputs = ops::stream_outputs();  // SwiGLU's, BF16 attention's outputs: NT
  bool skip_floats = ops::bf16_skip_floats();  // producers read only by products: bf16 only
  bool nt_sgemm = ops::fp32_nt_sgemm();  // FP32 x W^T on sgemm on the fixed path too
  void apply() const {  // makes it the process's
    ops::set_gemm_path(path);
    ops::set_amx_gemm(amx);
    ops::set_blocked_use(blocked);
    ops::set_amx_column_budget(column_budget);
    ops::set_amx_k_block(k_block);
    ops::set_amx_strip_packing(strip_packing);
    ops::set_amx_stream_bytes(stream_bytes);
    ops::set_stream_outputs(stream_outputs);
    ops::set_bf16_skip_floats(skip_floats);
    ops::set_fp32_nt_sgemm(nt_sgemm);
  }
};
static GemmChoice parse_gemm_choice(const std::string& s) {
  if (s == "tiles") return {ops::GemmPath::Fixed, true, s};
  if (s == "tiles-nochunk") return {ops::GemmPath::Fixed, true, s, ops::blocked_use(), 0};
  if (s == "tiles-k512")
    return {ops::GemmPath::Fixed, true, s, ops::blocked_use(), ops::amx_column_budget(), 512};
  if (s == "tiles-whole-a")
    return {ops::GemmPath::Fixed, true, s, ops::blocked_use(), ops::amx_column_budget(),
            ops::amx_k_block(), false};
  if (s == "tiles-plain-stores")
    return {ops::GemmPath::Fixed, true, s, ops::blocked_use(), ops::amx_column_budget(),
            ops::amx_k_block(), ops::amx_strip_packing(), 0};
  if (s == "tiles-plain-outputs")
    return {ops::GemmPath::Fixed, true, s, ops::blocked_use(), ops::amx_column_budget(),
            ops::amx_k_block(), ops::amx_strip_packing(), ops::amx_stream_bytes(), 0};
  if (s == "tiles-floats")
    return {ops::GemmPath::Fixed, true, s, ops::blocked_use(), ops::amx_column_budget(),
            ops::amx_k_block(), ops::amx_strip_packing(), ops::amx_stream_bytes(),
            ops::stream_outputs(), false};
  if (s == "fixed-brgemm-nt") {  // fixed, with FP32 x W^T on fixed-shape brgemm too
    GemmChoice c{ops::GemmPath::Fixed, false, s};
    c.nt_sgemm = false;
    return c;
  }
  if (s == "onednn") return {ops::GemmPath::Runtime, false, s, ops::BlockedUse::Off};
  if (s == "blocked") return {ops::GemmPath::Runtime, false, s, ops::BlockedUse::Tn};
  const ops::GemmPath p =
      ops::parse_gemm_path(s, "--gemm (or \"tiles\", \"tiles-nochunk\", \"tiles-k512\", "
                              "\"tiles-whole-a\", \"tiles-plain-stores\", "
                              "\"tiles-plain-outputs\", \"tiles-floats\", \"fixed-brgemm-nt\", "
                              "\"onednn\", \"blocked\")");
  return {p, false, ops::gemm_path_name(p)};
}

// One engine configuration under test (one precision, one GEMM path).
struct Engine {
  size_t model = 0;              // index into the models timed (--config, then --compare)
  std::string precision, label;  // label: "fp32", or "fp32/fixed" when paths are compared
  GemmChoice gemm;  // path, AMX tile kernel (kernels/amx_gemm.h), blocked sgemm
  std::unique_ptr<Trainer> tr;
  // per repeat: tokens/s, tokens per process CPU-second, tokens per second of the busiest
  // thread (idle-machine estimate), MFU (wall, idle estimate), the ratio to the PyTorch peer
  // (wall, CPU time, idle estimate)
  std::vector<double> rate, cpu_rate, idle_rate, mfu, idle_mfu;
  std::map<std::string, double> prof_sec, prof_cpu, prof_flops;
  bench::GemmShapeRows gemm_shapes;  // --breakdown-gemm: per product shape
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

void print_breakdown(const Engine& e, const Config& cfg, double tokens_per_step, bool gemm_rows) {
  if (e.prof_steps == 0) return;
  const double R = e.n_F > 0 && e.sum_F > 0 ? e.n_F / e.sum_F : cfg.model.target_R;
  auto fl = component_flops(cfg, R);
  double total = 0;
  for (auto& [k, v] : e.prof_sec) total += v;
  std::printf("\nbreakdown of one training step (%s, %s, mean over %lld timed steps%s)\n",
              cfg.model.arch.c_str(), e.label.c_str(), (long long)e.prof_steps,
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
    if (it != fl.end() && it->second > 0) model_flops += 3 * it->second * tokens_per_step;
    const double counted = e.prof_flops.count(name) ? e.prof_flops.at(name) : 0;
    if (counted > 0 && sec > 0) {  // the GEMM rows: the products' own FLOPs
      std::snprintf(gf, sizeof gf, "%10.1f", counted / e.prof_steps / sec / 1e9);
    } else if (it != fl.end() && it->second > 0 && sec > 0 && !gemm_rows) {
      // (with GEMM rows a component's time no longer includes its products)
      std::snprintf(gf, sizeof gf, "%10.1f", 3 * it->second * tokens_per_step / sec / 1e9);
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
  if (e.gemm_shapes.empty()) return;
  // the products by time, with the operand rounding of BF16 inside each product's time
  std::vector<std::pair<std::string, bench::GemmShapeRow>> rows(e.gemm_shapes.begin(),
                                                             e.gemm_shapes.end());
  std::sort(rows.begin(), rows.end(),
            [](auto& x, auto& y) { return x.second.sec > y.second.sec; });
  std::printf("  GEMMs by shape (op M x N x K, +C accumulates; time includes BF16 operand rounding):\n");
  std::printf("    %-26s %9s %10s %9s  %s\n", "product", "calls/step", "ms/step", "GFLOP/s",
              "implementation");
  for (auto& [k, r] : rows)
    std::printf("    %-26s %9.1f %10.1f %9.1f  %s\n", k.c_str(), double(r.calls) / e.prof_steps,
                1e3 * r.sec / e.prof_steps, r.flops / r.sec / 1e9, r.impl.c_str());
}

}  // namespace

// The config of --config (or the reference baseline) with --set overrides.
static Config bench_config(const std::string& path, const std::vector<std::string>& sets) {
  json j;
  if (path.empty()) {
    j = reference_baseline();
  } else {
    j = load_config_json(path);
  }
  apply_overrides(j, sets);
  return config_from_json(j, path.empty() ? "reference baseline" : path);
}

// Synthetic but fixed data: the cost of a step does not depend on token values.
static TrainData bench_data(i64 V) {
  TrainData data;
  data.train_batch = [V](i64 step, i64 micro, i64 rank, i64 Bq, i64 Lq, i32* tok, i32* tgt) {
    for (i64 i = 0; i < Bq * Lq; ++i) {
      tok[i] = i32(2 + counter_hash(7, step, micro, i) % uint64_t(V - 2));  // no BOS
      tgt[i] = i32(counter_hash(8, step, micro, i) % uint64_t(V));
    }
  };
  return data;
}

// `dlcm bench train` under mpirun: the ranks train one model data-parallel (the Trainer does
// the MPI part and sets each rank's threads); rank 0 prints the job's figures in the table
// format of the one-process benchmark, plus the all-reduce wait (scripts/bench_mpi.sh).
static int bench_train_ranks(const BenchTrainArgs& a, const Config& cfg) {
  const TrainConfig& t = cfg.train;
  const i64 B = t.batch_size, L = t.seq_len;
  const int ranks = dist::size();
  const bool rank0 = dist::rank() == 0;
  DLCM_CHECK(a.no_torch, "bench train: under mpirun give --no-torch (the PyTorch reference runs "
             "one process)");
  DLCM_CHECK(a.compare.empty(), "bench train: under mpirun --compare is not supported (one model "
             "per job)");
  DLCM_CHECK(a.precisions.size() <= 1 && a.gemm_paths.size() <= 1 && !a.breakdown,
             "bench train: under mpirun give at most one --precision, at most one --gemm and no "
             "--breakdown");
  if (!a.gemm_paths.empty()) {
    parse_gemm_choice(a.gemm_paths[0]).apply();
  }
  auto say = [&](auto... args) {
    if (rank0) std::printf(args...);
  };
  TrainOptions opt;
  opt.quiet = true;
  opt.peak_gflops = 1;  // MFU is computed here
  Config c = cfg;
  if (!a.precisions.empty()) c.train.precision = a.precisions[0];
  Trainer tr(c, bench_data(cfg.model.vocab_size), opt);
  say("threads: %d per process (chosen by the trainer, see docs/distributed.md), %d processes\n",
      omp_get_max_threads(), ranks);
  double peak = measure_gemm_peak_gflops(1.0, 2048), job_peak = peak;
  dist::allreduce_sum(&job_peak, 1);
  say("FP32 GEMM peak (2048^3, %s path: %s; median, measured on all ranks at once): %.1f GFLOP/s "
      "(rank 0: %.1f)\n", ops::gemm_path_name(ops::gemm_path()), peak_impl().c_str(), job_peak, peak);
  const double flops_tok = 3.0 * tr.model().flops_per_token(L);
  tr.train_step();  // warm-up: first touch of every buffer
  std::vector<double> rates, comm, cpu_rate;
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
    const double sec = bench::seconds_since(t0);
    double used = cpu_seconds() - c0;
    dist::allreduce_sum(&used, 1);  // the job's CPU time (busy-waiting included)
    const double tokens = double(a.steps * B * L * t.grad_accum * ranks);
    rates.push_back(tokens / sec);
    comm.push_back(wait / sec);
    cpu_rate.push_back(tokens / used);
  }
  say("model: %s, %.2fM params, %.4f GFLOP/token (training, 3x forward)\n", cfg.model.arch.c_str(),
      tr.model().params().total() / 1e6, flops_tok / 1e9);
  say("median of %lld repeats x %lld steps of %lld tokens (all ranks):\n", (long long)a.repeats,
      (long long)a.steps, (long long)(B * L * t.grad_accum * ranks));
  say("  %-18s %11s %8s | %14s\n", "", "wall tok/s", "MFU", "tok/CPU-second");
  say("  dlcm engine %-6s %11.0f %7.1f%% | %14.0f\n", c.train.precision.c_str(),
      bench::median(rates), 100 * flops_tok * bench::median(rates) / (job_peak * 1e9),
      bench::median(cpu_rate));
  say("gradient all-reduce: %.1f%% of the step waiting in it (rank 0, median; %s, %lld buckets "
      "of %.0f MB, %lld started during backward)\n",
      100 * bench::median(comm), t.allreduce_overlap ? "overlapped with backward" : "after backward",
      (long long)buckets, double(t.allreduce_bucket_mb), (long long)early);
  return 0;
}

// A PyTorch peer of `bench train --torch`: "PY[:autocast][:sdpa][:compile]" -> the interpreter
// and bench_torch.py's flags; checked before any engine is built.
struct PeerSpec {
  std::string python;
  std::vector<std::string> flags;  // --autocast, --sdpa, --compile
  std::string opts;                // "autocast+sdpa" for the label
};
static PeerSpec parse_peer_spec(const std::string& spec) {
  PeerSpec p;
  std::vector<std::string> parts;
  for (size_t b = 0;;) {
    const size_t e = spec.find(':', b);
    parts.push_back(spec.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  p.python = parts[0];
  DLCM_CHECK(!p.python.empty() && fs::exists(p.python), "bench train: --torch ", spec,
             ": no Python interpreter at '", p.python,
             "' (expected PY[:autocast][:sdpa][:compile]; torch 2.x: bash scripts/setup_bench.sh "
             "makes .venv-torch2/bin/python)");
  for (size_t i = 1; i < parts.size(); ++i) {
    DLCM_CHECK(parts[i] == "autocast" || parts[i] == "sdpa" || parts[i] == "compile",
               "bench train: --torch ", spec, ": unknown setting '", parts[i],
               "' (expected autocast, sdpa or compile)");
    p.flags.push_back("--" + parts[i]);
    p.opts += (p.opts.empty() ? "" : "+") + parts[i];
  }
  return p;
}

int cmd_bench_train(const BenchTrainArgs& args) {
  BenchTrainArgs a = args;
  a.breakdown = a.breakdown || a.breakdown_gemm;
  prof::set_detail(a.breakdown_gemm);
  Config cfg = bench_config(a.config, a.sets);
  cfg.train.warmup_steps = 0;
  cfg.train.schedule = "constant";
  if (dist::size() > 1) return bench_train_ranks(a, cfg);
  DLCM_CHECK(a.compare.empty() || a.no_torch,
             "bench train --compare: add --no-torch (a PyTorch peer builds one model)");
  const TrainConfig& t = cfg.train;
  DLCM_CHECK(a.steps > 0 && a.repeats > 0, "--steps and --repeats must be > 0");
  std::vector<std::string> precisions = a.precisions;
  if (precisions.empty()) precisions.push_back(t.precision);
  for (auto& p : precisions) ops::parse_precision(p, "--precision");
  // The models timed: --config's, then each --compare's (as its file says: --set is the first's).
  struct BenchModel {
    std::string path, name;  // name: the file's stem (or "reference baseline")
    Config cfg;
    double R = 0, tokens_per_step = 0, flops_tok = 0;
  };
  std::vector<BenchModel> models;
  models.push_back({a.config,
                    a.config.empty() ? "reference baseline" : fs::path(a.config).stem().string(),
                    cfg});
  for (const std::string& path : a.compare) {
    Config c = bench_config(path, {});
    c.train.warmup_steps = 0;
    c.train.schedule = "constant";
    models.push_back({path, fs::path(path).stem().string(), c});
  }
  for (BenchModel& m : models) {
    const TrainConfig& mt = m.cfg.train;
    m.tokens_per_step = double(mt.batch_size * mt.seq_len * mt.grad_accum);
    m.R = m.cfg.model.is_dlcm() ? (a.R < 0 ? m.cfg.model.target_R : a.R) : 0;
    DLCM_CHECK(m.R == 0 || m.R > 1, "--R must be > 1 (or 0: sample boundaries from the router)");
  }
  const double R = models[0].R, tokens_per_step = models[0].tokens_per_step;
  std::vector<PeerSpec> peer_specs;
  if (!a.no_torch)
    for (const std::string& spec :
         a.torch.empty() ? std::vector<std::string>{"/usr/bin/python3"} : a.torch)
      peer_specs.push_back(parse_peer_spec(spec));

  // " name" after a line's label when several models are compared
  auto tag = [&](const BenchModel& m) { return models.size() > 1 ? " " + m.name : std::string(); };
  std::printf("threads: %d (OMP_NUM_THREADS)\n", omp_get_max_threads());
  std::printf("kernels: %s\n", ops::isa_summary().c_str());
  for (const BenchModel& m : models)
    std::printf("model%s: %s%s\n", tag(m).c_str(),
                m.path.empty() ? (models.size() > 1 ? "built in" : "reference baseline")
                               : m.path.c_str(),
                m.cfg.model.is_dlcm()
                    ? (m.R > 0 ? (", concepts of 1 + Geometric lengths, mean R = " + std::to_string(m.R).substr(0, 4))
                               : std::string(", boundaries sampled from the (untrained) router")).c_str()
                    : "");

  TrainOptions opt;
  opt.quiet = true;
  opt.peak_gflops = 1;  // MFU is computed here, against the peak measured in each repeat
  // GEMM peaks on the process's path; each engine switches to its own around its steps
  const ops::GemmPath path0 = ops::gemm_path();
  const GemmChoice gemm0{path0, ops::amx_gemm_on(), ops::gemm_path_name(path0)};
  std::vector<GemmChoice> paths;
  for (auto& p : a.gemm_paths) paths.push_back(parse_gemm_choice(p));
  if (paths.empty()) paths.push_back(gemm0);
  std::vector<Engine> eng;
  for (size_t mi = 0; mi < models.size(); ++mi) {
    BenchModel& m = models[mi];
    TrainData data = bench_data(m.cfg.model.vocab_size);
    if (m.R > 0)
      data.train_boundaries = [R = m.R](i64 step, i64 micro, i64, i64 Bq, i64 Lq, uint8_t* b) {
        geometric_boundaries(b, step, micro, Bq, Lq, R);
      };
    for (const std::string& prec : precisions)
      for (const GemmChoice& g : paths) {
        Config c = m.cfg;
        c.train.precision = prec;
        Engine& e = eng.emplace_back();
        e.model = mi;
        e.precision = prec;
        e.gemm = g;
        e.label = paths.size() > 1 ? prec + "/" + g.name : prec;
        if (models.size() > 1) e.label = m.name + " " + e.label;
        e.tr = std::make_unique<Trainer>(c, data, opt);
      }
    const Engine& first = eng.back();
    const i64 Lm = m.cfg.train.seq_len;
    m.flops_tok = 3.0 * (m.cfg.model.is_dlcm() && m.R > 0 ? flops_report(m.cfg.model, Lm, m.R).total()
                                                          : first.tr->model().flops_per_token(Lm));
    std::printf("parameters%s: %.2fM\n", tag(m).c_str(),
                first.tr->model().params().total() / 1e6);
  }
  // warm-up: first touch of every buffer, primitive caches, concept buffers, and the GEMM-peak
  // products' scratch (so that RSS over the timed steps is the engines' own)
  const bool has16 = ops::cpu_has_bf16() &&
                     std::find(precisions.begin(), precisions.end(), "bf16") != precisions.end();
  measure_peak(0.05, 2048);
  if (has16) {
    ops::PrecisionScope bf(ops::Precision::BF16);
    measure_peak(0.05, 2048);
  }
  for (auto& e : eng) {
    e.gemm.apply();
    for (int w = 0; w < 2; ++w) e.tr->train_step();
  }
  gemm0.apply();

  // The PyTorch peers: child processes that have built the same model and answer "run N".
  // Each is an interpreter with settings (--torch PY[:autocast][:sdpa][:compile]); the default is
  // Debian's torch 1.13 (/usr/bin/python3).
  struct Peer {
    std::string spec, label;
    std::unique_ptr<LineProcess> proc;
    std::vector<double> rates, cpu_rates, idle_rates;
    double rss = 0;
    std::vector<std::vector<double>> vs, vs_cpu, vs_idle;  // [engine][repeat]
  };
  std::vector<Peer> peers;
  if (!a.no_torch) {
    fs::path cfg_path = fs::temp_directory_path() / ("dlcm-bench-" + std::to_string(getpid()) + ".json");
    {
      Config c = cfg;
      std::ofstream f(cfg_path);
      f << config_to_json(c).dump(1);
    }
    std::vector<std::string> unset;
    const std::vector<std::string> env = bench::torch_peer_env(!a.torch_default, unset);
    std::string envs;
    for (auto& e : env) envs += (envs.empty() ? "" : " ") + e;
    for (size_t k = 0; k < peer_specs.size(); ++k) {
      const PeerSpec& ps = peer_specs[k];
      Peer pr;
      pr.spec = a.torch.empty() ? ps.python : a.torch[k];
      std::vector<std::string> argv = {ps.python,
                                       bench::peer_script("bench_torch.py"),
                                       "--config", cfg_path.string(), "--serve",
                                       "--R", std::to_string(R)};
      argv.insert(argv.end(), ps.flags.begin(), ps.flags.end());
      pr.proc = std::make_unique<LineProcess>(argv, env, unset);
      json info;
      if (!pr.proc->reply(info) || !info.contains("ready")) {
        std::printf("pytorch: failed to start (%s)\n%s\n", pr.spec.c_str(), pr.proc->log().c_str());
        fs::remove(cfg_path);
        return 1;
      }
      pr.label = "pytorch " + info.value("torch", std::string("?")) + (ps.opts.empty() ? "" : " " + ps.opts);
      pr.vs.resize(eng.size());
      pr.vs_cpu.resize(eng.size());
      pr.vs_idle.resize(eng.size());
      std::printf("%s peer (%s): %s; env: %s\n", pr.label.c_str(), ps.python.c_str(),
                  info.value("settings", "").c_str(), envs.c_str());
      peers.push_back(std::move(pr));
    }
    fs::remove(cfg_path);
  }

  // Repeats, interleaved: GEMM peak, each engine, the PyTorch peer.
  std::vector<double> peaks, idle_peaks, peaks16, idle_peaks16, rss_steps, ceilings, peak_share;
  std::vector<double> l1_ceilings, l1_share;  // the L1 loop's ceiling, the GEMM peak's share
  for (i64 r = 0; r < a.repeats; ++r) {
    const Peak pk = measure_peak(0.3, 2048);
    peaks.push_back(pk.wall);
    idle_peaks.push_back(pk.idle);
    // the hardware's FP32 FMA rate beside the GEMM peak that MFU is computed against
    if (const ops::FmaCeiling fc = ops::fma_ceiling(0.1); fc.gflops > 0) {
      ceilings.push_back(fc.gflops);
      peak_share.push_back(pk.wall / fc.gflops);
    }
    // and the rate of a GEMM micro-kernel's inner loop with its operands in L1, which no GEMM
    // exceeds (on some hosts two cores lose a third of the register loop's rate this way)
    if (const ops::FmaCeiling fc = ops::fma_ceiling(0.1, 0, ops::FmaLoop::L1Operands);
        fc.gflops > 0) {
      l1_ceilings.push_back(fc.gflops);
      l1_share.push_back(pk.wall / fc.gflops);
    }
    Peak p16 = pk;
    if (has16) {
      ops::PrecisionScope bf(ops::Precision::BF16);
      p16 = measure_peak(0.3, 2048);
      peaks16.push_back(p16.wall);
      idle_peaks16.push_back(p16.idle);
    }
    for (auto& e : eng) {
      const double flops_tok = models[e.model].flops_tok;
      const double tokens_per_step = models[e.model].tokens_per_step;
      if (a.breakdown) {
        prof::reset();
        prof::enable(true);
      }
      e.gemm.apply();
      const double c0 = cpu_seconds();
      const auto th0 = bench::thread_cpu_seconds();
      auto t0 = std::chrono::steady_clock::now();
      for (i64 s = 0; s < a.steps; ++s) {
        StepResult sr = e.tr->train_step();
        e.sum_F += sr.terms.value("F");
        ++e.n_F;
        rss_steps.push_back(bench::read_rss().now_mib);
      }
      const double sec = bench::seconds_since(t0), cpu = cpu_seconds() - c0;
      const double busiest = bench::busiest_thread_seconds(th0, bench::thread_cpu_seconds());
      gemm0.apply();
      prof::enable(false);
      if (a.breakdown) {
        for (auto& en : prof::entries()) {
          if (!e.prof_sec.count(en.name)) e.prof_order.push_back(en.name);
          e.prof_sec[en.name] += en.seconds;
          e.prof_cpu[en.name] += en.cpu_seconds;
          e.prof_flops[en.name] += en.flops;
        }
        bench::take_gemm_shape_stats(e.gemm_shapes);
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
    for (auto& pr : peers) {
      pr.proc->send("run " + std::to_string(a.steps));
      json rep;
      DLCM_CHECK(pr.proc->reply(rep) && rep.contains("tokens_per_s"), pr.label,
                 " peer stopped answering:\n", pr.proc->log());
      pr.rates.push_back(rep["tokens_per_s"].get<double>());
      pr.cpu_rates.push_back(rep.value("tokens_per_cpu_s", 0.0));
      pr.idle_rates.push_back(rep.value("tokens_per_busiest_thread_s", 0.0));
      pr.rss = std::max(pr.rss, rep.value("peak_rss_mib", 0.0));
      for (size_t i = 0; i < eng.size(); ++i) {
        const auto& e = eng[i];
        pr.vs[i].push_back(e.rate.back() / pr.rates.back());
        pr.vs_cpu[i].push_back(e.cpu_rate.back() / std::max(1e-9, pr.cpu_rates.back()));
        pr.vs_idle[i].push_back(e.idle_rate.back() / std::max(1e-9, pr.idle_rates.back()));
      }
    }
  }

  // ---- report ----
  std::printf("\nFigures: wall = measured tokens/s (the target's definition; on a loaded machine it "
              "depends on the CPU share each program got); idle = tokens per second of the busiest "
              "thread's on-CPU time (what an idle machine would give; needs OMP_WAIT_POLICY=passive "
              "under load, now %s).\n",
              std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "unset");
  std::printf("FP32 GEMM peak (ops::gemm 2048^3, %s path: %s; median of repeats): wall %.1f "
              "GFLOP/s, idle %.1f GFLOP/s\n",
              ops::gemm_path_name(path0), peak_impl().c_str(), bench::median(peaks),
              bench::median(idle_peaks));
  if (!ceilings.empty())
    std::printf("FP32 FMA ceiling (%s register loop of FMAs, no memory; median of repeats): wall "
                "%.1f GFLOP/s; the FP32 GEMM peak is %.0f%% of it\n",
                ops::isa_name(ops::isa()), bench::median(ceilings), 100 * bench::median(peak_share));
  if (!l1_ceilings.empty())
    std::printf("FP32 L1 loop ceiling (%s micro-kernel tile fed from L1, all threads; median of "
                "repeats): wall %.1f GFLOP/s (%.0f%% of the register loop); the FP32 GEMM peak is "
                "%.0f%% of it\n",
                ops::isa_name(ops::isa()), bench::median(l1_ceilings),
                100 * bench::median(l1_ceilings) / bench::median(ceilings),
                100 * bench::median(l1_share));
  if (!peaks16.empty()) {
    ops::PrecisionScope bf(ops::Precision::BF16);
    std::printf("BF16 GEMM peak (ops::gemm 2048^3 incl. operand rounding, %s path: %s): wall %.1f "
                "GFLOP/s, idle %.1f GFLOP/s (%.2fx FP32)\n",
                ops::gemm_path_name(path0), peak_impl().c_str(), bench::median(peaks16),
                bench::median(idle_peaks16), bench::median(idle_peaks16) / bench::median(idle_peaks));
    const ops::Bf16UnitsChoice u = ops::bf16_units_choice();
    std::printf("BF16 products run on the %s units (%s); BF16 attention: %s\n",
                ops::bf16_units_name(u.units), u.how.c_str(),
                ops::attention_units_name(ops::attention_units()));
  }
  const double flops_tok = models[0].flops_tok;
  for (const BenchModel& m : models)
    std::printf("model FLOPs%s: %.4f GFLOP/token (training = 3x forward)\n",
                tag(m).c_str(), m.flops_tok / 1e9);
  std::printf("median of %lld repeats x %lld steps of %.0f tokens", (long long)a.repeats,
              (long long)a.steps, tokens_per_step);
  for (size_t mi = 1; mi < models.size(); ++mi)
    std::printf(" (%s: %.0f)", models[mi].name.c_str(), models[mi].tokens_per_step);
  std::printf(":\n");
  std::printf("  (MFU against the FP32 peak, for bf16 engines and autocast peers against the BF16 "
              "peak)\n");
  int w = 18;  // the row labels' column
  for (auto& pr : peers) w = std::max(w, int(pr.label.size()));
  for (auto& e : eng) w = std::max(w, int(e.label.size()) + 12);  // "dlcm engine " + label
  std::printf("  %-*s %11s %8s | %11s %8s | %14s\n", w, "", "wall tok/s", "MFU", "idle tok/s",
              "MFU", "tok/CPU-second");
  for (auto& e : eng)
    std::printf("  %-*s %11.0f %7.1f%% | %11.0f %7.1f%% | %14.0f\n", w,
                ("dlcm engine " + e.label).c_str(), bench::median(e.rate), 100 * bench::median(e.mfu),
                bench::median(e.idle_rate), 100 * bench::median(e.idle_mfu),
                bench::median(e.cpu_rate));
  if (eng.size() > 1)
    for (size_t i = 1; i < eng.size(); ++i) {
      if (eng[i].model != 0) continue;  // other models: their MFU against the first's, below
      std::vector<double> ratio, cpu_ratio, idle_ratio;
      for (size_t r = 0; r < eng[i].rate.size(); ++r) {
        ratio.push_back(eng[i].rate[r] / eng[0].rate[r]);
        cpu_ratio.push_back(eng[i].cpu_rate[r] / eng[0].cpu_rate[r]);
        idle_ratio.push_back(eng[i].idle_rate[r] / eng[0].idle_rate[r]);
      }
      std::printf("  %s / %s tokens/s (medians of per-repeat ratios): wall %.2fx, idle %.2fx, per "
                  "CPU-second %.2fx\n",
                  eng[i].label.c_str(), eng[0].label.c_str(), bench::median(ratio),
                  bench::median(idle_ratio), bench::median(cpu_ratio));
    }
  // Each other model's engine against the first model's engine of the same precision and GEMM
  // path, in MFU points (each repeat's engines ran between the same peak measurements).
  const size_t per_model = eng.size() / models.size();
  for (size_t i = per_model; i < eng.size(); ++i) {
    const Engine& e = eng[i];
    const Engine& e0 = eng[i % per_model];
    std::vector<double> d, d_idle;
    for (size_t r = 0; r < e.mfu.size(); ++r) {
      d.push_back(100 * (e.mfu[r] - e0.mfu[r]));
      d_idle.push_back(100 * (e.idle_mfu[r] - e0.idle_mfu[r]));
    }
    std::printf("  MFU of %s minus %s (points, medians of per-repeat differences): wall %+.1f, "
                "idle %+.1f\n",
                e.label.c_str(), e0.label.c_str(), bench::median(d), bench::median(d_idle));
  }
  for (auto& pr : peers) {
    // MFU of a peer against the peak of its precision (autocast: the BF16 peak).
    const bool bf = pr.spec.find(":autocast") != std::string::npos && !peaks16.empty();
    const double pk = bench::median(bf ? peaks16 : peaks), pk_idle = bench::median(bf ? idle_peaks16 : idle_peaks);
    const double theirs = bench::median(pr.rates), theirs_idle = bench::median(pr.idle_rates);
    std::printf("  %-*s %11.0f %7.1f%% | %11.0f %7.1f%% | %14.0f\n", w, pr.label.c_str(), theirs,
                100 * flops_tok * theirs / (pk * 1e9), theirs_idle,
                100 * flops_tok * theirs_idle / (pk_idle * 1e9), bench::median(pr.cpu_rates));
  }
  for (auto& pr : peers)
    for (size_t i = 0; i < eng.size(); ++i)
      std::printf("  speed-up of the %s engine over %s (medians of per-repeat ratios): wall "
                  "%.2fx, idle %.2fx, per CPU-second %.2fx\n",
                  eng[i].label.c_str(), pr.label.c_str(), bench::median(pr.vs[i]),
                  bench::median(pr.vs_idle[i]), bench::median(pr.vs_cpu[i]));
  const auto [lo, hi] = std::minmax_element(rss_steps.begin(), rss_steps.end());
  std::printf("memory: peak RSS (VmHWM) %.1f MiB (the whole process: %zu engine(s), warm-up and "
              "GEMM-peak buffers included); RSS after each of the %zu timed steps %.1f..%.1f MiB, "
              "first %.1f, last %.1f (growth %+.1f MiB)\n",
              bench::read_rss().peak_mib, eng.size(), rss_steps.size(), *lo, *hi,
              rss_steps.front(), rss_steps.back(), rss_steps.back() - rss_steps.front());
  std::printf("        RSS after each timed step (MiB, engines in turn):");
  for (double m : rss_steps) std::printf(" %.1f", m);
  std::printf("\n");
  for (auto& pr : peers)
    std::printf("        %s peer: peak RSS %.1f MiB\n", pr.label.c_str(), pr.rss);
  if (a.breakdown)
    for (auto& e : eng)
      print_breakdown(e, models[e.model].cfg, models[e.model].tokens_per_step, a.breakdown_gemm);
  return 0;
}

// The quality of each weight format's stream on trained weights: validation windows of the
// model's max_seq_len tokens prefilled in one call (all positions' logits), their mean CE and
// how often the argmax matches the first format's. The decode figures say how fast a format
// is; these say what it costs.
static void stream_quality(LanguageModel& m, Config cfg, const std::string& data, i64 windows,
                    const std::vector<ops::PackFormat>& precs) {
  const i64 L = m.config().max_seq_len, V = m.config().vocab_size;
  cfg.train.seq_len = L;
  TrainData d = open_train_data(data, cfg);
  DLCM_CHECK(d.val_count, "bench decode --data ", data, ": no validation split (val.bin)");
  const i64 n = std::min(windows, d.val_count(1, L));
  std::vector<i32> tk(L), tg(L);
  std::vector<std::vector<i32>> argmax(precs.size());
  std::printf("stream quality: %lld validation windows of %lld tokens from %s\n", (long long)n,
              (long long)L, data.c_str());
  double ce0 = 0;
  for (size_t pi = 0; pi < precs.size(); ++pi) {
    StreamOptions so;
    so.precision = precs[pi];
    auto st = m.new_stream(so);
    Buf lg(L * V);
    double ce = 0;
    i64 count = 0, agree = 0;
    for (i64 w = 0; w < n; ++w) {
      d.val_batch(w, 1, L, tk.data(), tg.data());
      st->reset(0);
      st->prefill(0, tk.data(), L, lg.data(), true);
      for (i64 t = 0; t < L; ++t) {
        const float* l = lg.data() + t * V;
        const i32 am = i32(std::max_element(l, l + V) - l);
        if (pi == 0) argmax[0].push_back(am);
        else agree += am == argmax[0][w * L + t];
        if (tg[t] < 0) continue;
        ce += ops::logsumexp(l, V) - l[tg[t]];
        ++count;
      }
    }
    ce /= std::max<i64>(count, 1);
    if (pi == 0) ce0 = ce;
    std::printf("[%s] validation CE through the stream: %.4f nats", ops::pack_format_name(precs[pi]), ce);
    if (pi > 0)
      std::printf(" (%+.4f against [%s]; argmax agrees on %.2f%% of %lld positions)",
                  ce - ce0, ops::pack_format_name(precs[0]),
                  100.0 * double(agree) / double(argmax[0].size()), (long long)argmax[0].size());
    std::printf("\n");
  }
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
    m = load_model_with_tokenizer(a.ckpt, &what);
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
  std::printf("kernels: %s\n", ops::isa_summary().c_str());
  std::printf("decode: batch %lld, prompt %lld tokens, %lld new tokens per sequence (greedy)\n",
              (long long)B, (long long)P, (long long)T);
  {  // warm-up: first touch of buffers, GEMM kernel set-up
    auto st = m->new_stream({B, P + T, -1});
    Buf lg(V);
    st->prefill(0, prompt.data(), P, lg.data());
    i64 s0 = 0;
    st->step(&s0, prompt.data() + 1, 1, lg.data());
  }
  std::vector<ops::PackFormat> precs;
  for (const std::string& p : a.precisions) precs.push_back(ops::parse_pack_format(p, "--precision"));
  DLCM_CHECK(!precs.empty(), "bench decode: --precision needs one or more of fp32, bf16, int8");
  DLCM_CHECK(a.data.empty() || !a.ckpt.empty(),
             "bench decode: --data measures a trained model's quality; give --ckpt too");
  if (!a.data.empty()) stream_quality(*m, load_checkpoint_config(resolve_checkpoint(a.ckpt)), a.data,
                                      a.val_windows, precs);
  const i64 NP = precs.size();
  std::vector<std::vector<double>> cached_rates(NP), prefill_rates(NP), idle_rates(NP);
  std::vector<double> recompute_rates;
  std::vector<std::vector<i32>> gen_cached(NP);
  std::vector<i32> gen_recompute;
  for (i64 r = 0; r < a.repeats; ++r) {
    // Cached, in each precision: prefill every sequence in one batched pass, then T batched steps.
    for (i64 pi = 0; pi < NP; ++pi) {
      StreamOptions so;
      so.max_seqs = B;
      so.max_len = P + T;
      so.precision = precs[pi];
      auto st = m->new_stream(so);
      std::vector<PrefillItem> items;
      for (i64 b = 0; b < B; ++b) items.push_back({b, prompt.data(), P});
      Buf lg(B * V);
      std::vector<i64> seqs(B);
      std::vector<i32> next(B);
      for (i64 b = 0; b < B; ++b) seqs[b] = b;
      {  // warm-up of this stream's kernels and buffers, then a fresh slot
        st->prefill(0, prompt.data(), 1, lg.data());
        st->reset(0);
      }
      gen_cached[pi].clear();
      auto t0 = clk::now();
      st->prefill(items.data(), B, lg.data());
      prefill_rates[pi].push_back(double(B * P) / secs(t0));
      t0 = clk::now();
      const auto th0 = bench::thread_cpu_seconds();
      for (i64 t = 0; t < T; ++t) {
        for (i64 b = 0; b < B; ++b) next[b] = argmax(lg.data() + b * V);
        gen_cached[pi].push_back(next[0]);
        if (t + 1 < T) st->step(seqs.data(), next.data(), B, lg.data());
      }
      cached_rates[pi].push_back(double(B * T) / secs(t0));
      const double busy = bench::busiest_thread_seconds(th0, bench::thread_cpu_seconds());
      idle_rates[pi].push_back(double(B * T) / std::max(busy, 1e-9));
    }

    if (a.no_recompute) continue;
    // Recompute: the whole prefix of every sequence each step.
    std::vector<i32> rows(B * (P + T));
    std::vector<i32> cur = prompt;
    Buf full(B * (P + T) * V);
    gen_recompute.clear();
    auto t0 = clk::now();
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
  const double rc = a.no_recompute ? 0.0 : bench::median(recompute_rates);
  if (!a.no_recompute)
    std::printf("decode by recompute    : %10.1f tokens/s  (%.2f ms per step)\n", rc, 1e3 * B / rc);
  else
    std::printf("decode by recompute    : skipped (--no-recompute)\n");
  // Greedy tokens against the fp32 recompute, or without it against the first precision's.
  const std::vector<i32>& ref_tokens = a.no_recompute ? gen_cached[0] : gen_recompute;
  for (i64 pi = 0; pi < NP; ++pi) {
    i64 agree = 0;
    while (agree < T && gen_cached[pi][agree] == ref_tokens[agree]) ++agree;
    const double c = bench::median(cached_rates[pi]);
    const char* pn = ops::pack_format_name(precs[pi]);
    std::printf("[%s] prefill (cached)       : %10.1f tokens/s\n", pn,
                bench::median(prefill_rates[pi]));
    std::printf("[%s] decode with caches     : %10.1f tokens/s  (%.2f ms per step; idle %.1f "
                "tokens/s: per busiest-thread CPU-second)\n",
                pn, c, 1e3 * B / c, bench::median(idle_rates[pi]));
    if (!a.no_recompute)
      std::printf("[%s] speed-up of the caches : %.2fx   (median of %lld repeats; greedy tokens "
                  "agree with the fp32 recompute for %lld of %lld)\n",
                  pn, c / rc, (long long)a.repeats, (long long)agree, (long long)T);
    else if (pi > 0)
      std::printf("[%s] greedy tokens agree with [%s]'s for %lld of %lld\n", pn,
                  ops::pack_format_name(precs[0]), (long long)agree, (long long)T);
    if (pi > 0)
      std::printf("[%s] decode tokens/s against [%s]: %.2fx\n", pn,
                  ops::pack_format_name(precs[0]), c / bench::median(cached_rates[0]));
  }
  return 0;
}

}  // namespace dlcm
