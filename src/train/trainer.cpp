#include "train/trainer.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/profiler.h"
#include "kernels/gemm.h"
#include "train/checkpoint.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

std::string resolve_checkpoint(const std::string& path) {
  if (is_checkpoint(path)) return path;
  std::string sub = (fs::path(path) / "checkpoint").string();
  if (is_checkpoint(sub)) return sub;
  if (!fs::exists(path))
    fail(path, ": no such checkpoint or run directory (give the --out folder of 'dlcm train')");
  fail(path, ": not a checkpoint (no config.json and model.safetensors here or in ",
       "checkpoint/); give the --out folder of 'dlcm train'");
}

double measure_gemm_peak_gflops(double seconds, i64 n) {
  Buf a(n * n, 0.5f), b(n * n, 0.25f), c(n * n, 0.f);
  std::vector<double> rates;
  auto t_end = Clock::now() + std::chrono::duration<double>(seconds);
  ops::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);  // warm-up
  do {
    auto t0 = Clock::now();
    ops::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
    double s = std::chrono::duration<double>(Clock::now() - t0).count();
    rates.push_back(2.0 * n * n * n / s / 1e9);
  } while (Clock::now() < t_end || rates.size() < 3);
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

Trainer::Trainer(const Config& cfg, TrainData data, TrainOptions opt)
    : cfg_(cfg), data_(std::move(data)), o_(std::move(opt)) {
  if (cfg_.train.threads > 0) {
    omp_set_num_threads(int(cfg_.train.threads));
    if (!o_.quiet) std::fprintf(stderr, "[train] threads forced to %lld\n", (long long)cfg_.train.threads);
  }
  std::string ckpt_dir;
  if (o_.resume) {
    DLCM_CHECK(!o_.out_dir.empty(), "--resume needs --out pointing at the run to continue");
    ckpt_dir = (fs::path(o_.out_dir) / "checkpoint").string();
    DLCM_CHECK(is_checkpoint(ckpt_dir), o_.out_dir, ": --resume given but there is no ",
               "checkpoint in ", ckpt_dir, " (start without --resume)");
    Config saved = load_checkpoint_config(ckpt_dir);
    // The model must be the one saved; training settings may change (e.g. more steps).
    DLCM_CHECK(config_to_json(Config{saved.model, {}}) == config_to_json(Config{cfg_.model, {}}),
               ckpt_dir, "/config.json: model settings differ from the given config; resume ",
               "needs the same model (drop the changed model keys or start a new run)");
  }
  model_ = make_initialised_model(cfg_.model, cfg_.train.seed);
  opt_.init(model_->params());
  if (!o_.init_from.empty()) load_checkpoint_params(resolve_checkpoint(o_.init_from), model_->params());
  const TrainConfig& t = cfg_.train;
  model_->reserve(t.batch_size, t.seq_len);
  tok_.assign(t.grad_accum * t.batch_size * t.seq_len, 0);
  tgt_.assign(tok_.size(), 0);
  if (data_.train_boundaries) bnd_.assign(tok_.size(), 0);
  precision_ = ops::parse_precision(t.precision, "train.precision");
  ops::PrecisionScope check(precision_);  // fails here, clearly, without AVX512-BF16
  if (!o_.out_dir.empty()) {
    fs::create_directories(o_.out_dir);
    log_path_ = (fs::path(o_.out_dir) / "train_log.jsonl").string();
  }
  if (o_.resume) {
    restore(ckpt_dir);
  } else if (!log_path_.empty()) {
    std::ofstream(log_path_, std::ios::trunc);
  }
  peak_gflops_ = o_.peak_gflops > 0 ? o_.peak_gflops : measure_gemm_peak_gflops(0.3);
}

Trainer::~Trainer() = default;

void Trainer::restore(const std::string& ckpt_dir) {
  load_checkpoint_params(ckpt_dir, model_->params());
  DLCM_CHECK(load_checkpoint_optimizer(ckpt_dir, model_->params(), opt_.m, opt_.v), ckpt_dir,
             ": optimizer.safetensors is missing; cannot resume exactly");
  json st = load_trainer_state(ckpt_dir);
  try {
    step_ = st.at("step").get<i64>();
    tokens_seen_ = st.at("tokens_seen").get<i64>();
    opt_.t = st.at("adam_t").get<i64>();
  } catch (const json::exception& e) {
    fail(ckpt_dir, "/trainer_state.json: missing or invalid field (", e.what(), ")");
  }
  // Continue the log from the checkpoint's copy, dropping lines written after it.
  log_lines_.clear();
  std::ifstream in(fs::path(ckpt_dir) / "train_log.jsonl");
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) log_lines_.push_back(line);
  if (!log_path_.empty()) {
    std::ofstream out(log_path_, std::ios::trunc);
    for (auto& l : log_lines_) out << l << "\n";
  }
}

void Trainer::log_line(const std::string& line) {
  log_lines_.push_back(line);
  if (log_path_.empty()) return;
  std::ofstream out(log_path_, std::ios::app);
  out << line << "\n";
}

StepResult Trainer::train_step() {
  const TrainConfig& t = cfg_.train;
  const i64 B = t.batch_size, L = t.seq_len, K = t.grad_accum;
  auto t0 = Clock::now();
  ops::PrecisionScope precision(precision_);
  StepResult r;
  r.lr = lr_at(t, step_, t.steps);
  // Load the step's micro-batches first: the totals scale the loss, and DLCM's Global
  // Parser needs the whole step's boundaries before any backward pass.
  prof::Section sec;  // benchmark breakdown (dlcm bench train --breakdown)
  sec.next("data");
  std::vector<Batch> micro(K);
  StepContext ctx;
  ctx.seed = t.seed;
  ctx.step = step_;
  for (i64 k = 0; k < K; ++k) {
    i32* tk = tok_.data() + k * B * L;
    i32* tg = tgt_.data() + k * B * L;
    data_.train_batch(step_, k, 0, B, L, tk, tg);
    micro[k] = Batch{tk, tg, B, L, k * B};
    if (data_.train_boundaries) {
      uint8_t* bk = bnd_.data() + k * B * L;
      data_.train_boundaries(step_, k, 0, B, L, bk);
      micro[k].boundaries = bk;
    }
    for (i64 i = 0; i < B * L; ++i) ctx.total_targets += tg[i] >= 0;
    ctx.total_positions += B * L;
  }
  sec.next("other");
  ctx.sum_b = model_->prepare_step(micro, ctx);
  sec.next("optimizer");
  model_->params().zero_grad();
  sec.next("other");
  MicroStats tot;
  for (i64 k = 0; k < K; ++k) {
    MicroStats s = model_->train_micro(micro[k], k, ctx);
    tot.ce_sum += s.ce_sum;
    tot.n_targets += s.n_targets;
    tot.sum_b += s.sum_b;
    tot.sum_p += s.sum_p;
    tot.n_positions += s.n_positions;
    tot.n_thresholded += s.n_thresholded;
  }
  r.ce = tot.ce_sum / std::max<i64>(tot.n_targets, 1);
  if (cfg_.model.is_dlcm() && tot.n_positions > 0) {
    const double R = cfg_.model.target_R;
    r.F = tot.sum_b / tot.n_positions;
    r.G = tot.sum_p / tot.n_positions;
    r.aux = R / (R - 1) * ((R - 1) * r.F * r.G + (1 - r.F) * (1 - r.G)) - 1;
    r.F_thresholded = double(tot.n_thresholded) / tot.n_positions;
  }
  r.loss = r.ce + cfg_.model.aux_weight * r.aux * (cfg_.model.is_dlcm() ? 1 : 0);
  sec.next("optimizer");
  r.grad_norm = clip_grad_norm(model_->params(), t.grad_clip);
  opt_.step(model_->params(), float(r.lr), t);
  sec.next("other");
  ++step_;
  r.tokens = K * B * L;
  tokens_seen_ += r.tokens;
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

Trainer::ValResult Trainer::validate(i64 max_batches) {
  ValResult v;
  if (!data_.val_count) return v;
  const i64 B = cfg_.train.batch_size, L = cfg_.train.seq_len;
  i64 n = data_.val_count(B, L);
  if (max_batches >= 0) n = std::min(n, max_batches);
  std::vector<i32> tk(B * L), tg(B * L);
  ops::PrecisionScope fp32(ops::Precision::FP32);  // validation is always FP32
  double ce = 0, concepts = 0, positions = 0;
  i64 count = 0;
  for (i64 i = 0; i < n; ++i) {
    data_.val_batch(i, B, L, tk.data(), tg.data());
    MicroStats s = model_->eval_micro(Batch{tk.data(), tg.data(), B, L, 0});
    ce += s.ce_sum;
    count += s.n_targets;
    concepts += s.n_concepts;
    positions += s.n_positions;
  }
  v.tokens = count;
  v.loss = ce / std::max<i64>(count, 1);
  v.ppl = std::exp(v.loss);
  // bits per UTF-8 byte: scale the byte count to the share of the split evaluated
  if (data_.val_bytes > 0 && data_.val_tokens > 0 && count > 0)
    v.bpb = ce / std::log(2.0) / (data_.val_bytes * double(count) / double(data_.val_tokens));
  if (concepts > 0) v.compression = positions / concepts;
  return v;
}

void Trainer::save_checkpoint_now() {
  if (o_.out_dir.empty()) return;
  json st = {{"step", step_},
             {"tokens_seen", tokens_seen_},
             {"adam_t", opt_.t},
             {"seed", cfg_.train.seed},
             {"data_cursor", {{"kind", "counter"}, {"step", step_}}},
             {"schedule", {{"name", cfg_.train.schedule}, {"step", step_}, {"total", cfg_.train.steps}}}};
  CheckpointWrite w;
  w.config = &cfg_;
  w.params = &model_->params();
  w.exp_avg = &opt_.m;
  w.exp_avg_sq = &opt_.v;
  w.trainer_state = st;
  w.extra_files = data_.checkpoint_files;
  if (!log_path_.empty()) w.extra_files.push_back(log_path_);
  save_checkpoint((fs::path(o_.out_dir) / "checkpoint").string(), w);
}

static std::string fmt_duration(double s) {
  char buf[32];
  if (s < 0 || !std::isfinite(s)) return "?";
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s / 60), int(s) % 60);
  else std::snprintf(buf, sizeof buf, "%.0fs", s);
  return buf;
}

void Trainer::run() {
  const TrainConfig& t = cfg_.train;
  const bool tty = isatty(fileno(stderr));
  const double flops_tok = 3.0 * model_->flops_per_token(t.seq_len);
  if (!o_.quiet)
    std::fprintf(stderr, "[train] %s, %.2fM parameters, %lld steps of %lld tokens, FP32 GEMM peak %.0f GFLOP/s\n",
                 cfg_.model.arch.c_str(), model_->params().total() / 1e6, (long long)t.steps,
                 (long long)(t.grad_accum * t.batch_size * t.seq_len), peak_gflops_);
  i64 ran = 0, saved_at = -1;
  double ema_rate = 0;
  while (step_ < t.steps && (o_.stop_after < 0 || ran < o_.stop_after)) {
    StepResult r = train_step();
    ++ran;
    double tps = r.tokens / r.seconds;
    ema_rate = ema_rate == 0 ? tps : 0.9 * ema_rate + 0.1 * tps;
    double mfu = flops_tok * tps / (peak_gflops_ * 1e9);
    if (step_ % t.log_every == 0 || step_ == 1 || step_ == t.steps) {
      json j = {{"step", step_}, {"loss", r.loss}, {"ce", r.ce}, {"lr", r.lr},
                {"grad_norm", r.grad_norm}, {"tokens_per_s", tps}, {"mfu", mfu},
                {"tokens", tokens_seen_}};
      if (cfg_.model.is_dlcm()) {
        j["aux"] = r.aux;
        j["F"] = r.F;
        j["G"] = r.G;
        j["compression"] = r.F > 0 ? 1.0 / r.F : 0.0;  // sampled boundaries
        j["compression_thresholded"] = r.F_thresholded > 0 ? 1.0 / r.F_thresholded : 0.0;
      }
      log_line(j.dump());
      if (!o_.quiet) {
        double eta = (t.steps - step_) * (t.grad_accum * t.batch_size * t.seq_len) / ema_rate;
        char line[256];
        std::snprintf(line, sizeof line,
                      "step %lld/%lld | loss %.4f | lr %.2e | gnorm %.2f | %.0f tok/s | MFU %.1f%% | ETA %s",
                      (long long)step_, (long long)t.steps, r.loss, r.lr, r.grad_norm, tps,
                      100 * mfu, fmt_duration(eta).c_str());
        if (tty) std::fprintf(stderr, "\r%s\033[K", line);
        else std::fprintf(stderr, "%s\n", line);
      }
    }
    bool last = step_ == t.steps;
    if (t.eval_every > 0 && (step_ % t.eval_every == 0 || last) && data_.val_count) {
      ValResult v = validate(t.eval_batches);
      json j = {{"step", step_}, {"val_loss", v.loss}, {"val_ppl", v.ppl}, {"val_tokens", v.tokens}};
      if (v.bpb > 0) j["val_bpb"] = v.bpb;
      if (v.compression > 0) j["val_compression"] = v.compression;
      log_line(j.dump());
      if (!o_.quiet)
        std::fprintf(stderr, "%sstep %lld | val loss %.4f | ppl %.2f%s\n", tty ? "\r\033[K" : "",
                     (long long)step_, v.loss, v.ppl,
                     v.bpb > 0 ? (" | bpb " + std::to_string(v.bpb)).c_str() : "");
    }
    if ((t.ckpt_every > 0 && step_ % t.ckpt_every == 0) || last) {
      save_checkpoint_now();
      saved_at = step_;
    }
  }
  // Stopped early (stop_after): leave a checkpoint of where we are.
  if (ran > 0 && saved_at != step_) save_checkpoint_now();
  if (!o_.quiet && tty) std::fprintf(stderr, "\n");
}

}  // namespace dlcm
