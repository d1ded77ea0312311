#include "train/trainer.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/json_util.h"
#include "core/profiler.h"
#include "data/provenance.h"
#include "eval/concept_usage.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "models/checkpoint.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

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

// Model keys (JSON paths, "router.tau") whose values differ between a and b, except those in
// `ignore`: "key (checkpoint A, given B), ..." (at most 8 named), or "" when none differ.
static std::string model_key_differences(const ModelConfig& a, const ModelConfig& b,
                                         const std::vector<std::string>& ignore) {
  json was = config_to_json(Config{a, {}}), now = config_to_json(Config{b, {}});
  was.erase("train");
  now.erase("train");
  for (const std::string& k : ignore) {
    std::string path = "/" + k;
    std::replace(path.begin(), path.end(), '.', '/');
    const json::json_pointer ptr(path);
    if (was.contains(ptr)) was.at(ptr) = nullptr;
    if (now.contains(ptr)) now.at(ptr) = nullptr;
  }
  std::string keys;
  int shown = 0;
  for (const json& d : json::diff(was, now)) {
    if (shown++ == 8) {
      keys += ", ...";
      break;
    }
    std::string path = d.value("path", std::string("?"));
    const json::json_pointer ptr(path);
    path = path.substr(1);
    std::replace(path.begin(), path.end(), '/', '.');
    keys += (keys.empty() ? "" : ", ") + path + " (checkpoint " +
            (was.contains(ptr) ? was.at(ptr).dump() : "absent") + ", given " +
            (now.contains(ptr) ? now.at(ptr).dump() : "absent") + ")";
  }
  return keys;
}

Trainer::Trainer(const Config& cfg, TrainData data, TrainOptions opt)
    : cfg_(cfg), data_(std::move(data)), o_(std::move(opt)) {
  rank_ = dist::rank();
  world_ = dist::size();
  if (world_ > 1) check_same_run_on_all_ranks();
  // OpenMP threads: the user's choice (train.threads, then OMP_NUM_THREADS) wins; under MPI
  // the ranks of a host split its cores (the plan is a collective, so every rank makes it).
  if (world_ > 1) threads_ = dist::plan_threads();
  if (cfg_.train.threads > 0) {
    omp_set_num_threads(int(cfg_.train.threads));
    threads_note_ = "forced by train.threads";
    if (talk()) std::fprintf(stderr, "[train] threads forced to %lld\n", (long long)cfg_.train.threads);
  } else if (world_ > 1) {
    const char* env = std::getenv("OMP_NUM_THREADS");
    if (env && *env) {
      threads_note_ = std::string("from OMP_NUM_THREADS=") + env;
    } else {
      omp_set_num_threads(threads_.threads);
      threads_note_ = std::to_string(threads_.cpus) + " CPUs in the rank's affinity mask / " +
                      std::to_string(threads_.sharing) + " local ranks sharing them";
    }
  }
  if (!o_.out_dir.empty() && rank_ == 0) {
    lock_ = std::make_unique<RunDirLock>(o_.out_dir);
    DLCM_CHECK(o_.resume || o_.overwrite || !run_dir_has_run(o_.out_dir), o_.out_dir,
               ": already holds a run (checkpoint or training log); continue it with --resume, "
               "start it over with --overwrite (its checkpoint and log are replaced), or choose "
               "another --out");
    // A save interrupted by a kill (of this process or, under MPI, of the job) leaves a
    // checkpoint.tmp-PID beside the intact checkpoint, or, between its two renames, only
    // checkpoint.old-PID: with the folder locked every such sibling is stale, so the previous
    // checkpoint is put back and the rest removed.
    clean_run_dir(o_.out_dir);
    // Starting over: drop the old checkpoints now, so that a crash before the first save
    // cannot leave them to be resumed (or mistaken for this run's) under the new run's log.
    if (o_.overwrite && !o_.resume) remove_run_checkpoints(o_.out_dir);
  }
  dist::barrier();
  std::string ckpt_dir;
  if (o_.resume) {
    DLCM_CHECK(!o_.out_dir.empty(), "--resume needs --out pointing at the run to continue");
    ckpt_dir = (fs::path(o_.out_dir) / "checkpoint").string();
    DLCM_CHECK(is_checkpoint(ckpt_dir), o_.out_dir, ": --resume given but there is no ",
               "checkpoint in ", ckpt_dir, " (start without --resume)",
               world_ > 1 ? "; under MPI every rank reads it, so --out must be on a file system "
                            "all hosts share" : "");
    Config saved = load_checkpoint_config(ckpt_dir);
    // The model must be the one saved; training settings may change (e.g. more steps).
    const std::string keys = model_key_differences(saved.model, cfg_.model, {});
    if (!keys.empty())
      fail(ckpt_dir, "/config.json: --resume needs the model the run was trained with, but the "
           "given config changes model key(s) ", keys, "; drop those changes (only training "
           "keys may change on resume) or start a new run");
    // A different number of ranks: keep the global batch (ranks x grad_accum micro-batches)
    // by adjusting grad_accum, unless the user changed the batch settings themselves.
    json st = load_trainer_state(ckpt_dir);
    const i64 old_world = st.value("world_size", i64(1));
    resumed_from_world_ = old_world;
    TrainConfig& t = cfg_.train;
    const i64 old_k = saved.train.grad_accum, global = old_world * old_k;
    const bool same_rows = t.batch_size == saved.train.batch_size;
    if (old_world != world_) {
      const bool kept = same_rows && world_ * t.grad_accum == global;
      const bool adjust = !kept && same_rows && t.grad_accum == old_k && global % world_ == 0;
      if (adjust) t.grad_accum = global / world_;
      // Told even with --quiet: the run continues differently from what was asked.
      if (rank_ == 0 && kept)
        std::fprintf(stderr, "[train] resuming a %lld-rank run on %d rank(s) with grad_accum %lld: "
                     "same global batch of %lld micro-batches\n", (long long)old_world, world_,
                     (long long)t.grad_accum, (long long)global);
      else if (rank_ == 0 && adjust)
        std::fprintf(stderr, "[train] resuming a %lld-rank run on %d rank(s): grad_accum %lld -> %lld "
                     "keeps the global batch of %lld micro-batches (%lld rows), same data per step\n",
                     (long long)old_world, world_, (long long)old_k, (long long)t.grad_accum,
                     (long long)global, (long long)(global * t.batch_size));
      else if (rank_ == 0)
        std::fprintf(stderr, "[train] resuming a %lld-rank run on %d rank(s): the global batch changes "
                     "from %lld to %lld rows (grad_accum %lld, batch_size %lld), so steps see "
                     "other data than the original run would\n",
                     (long long)old_world, world_, (long long)(global * saved.train.batch_size),
                     (long long)(world_ * t.grad_accum * t.batch_size), (long long)t.grad_accum,
                     (long long)t.batch_size);
    }
  }
  model_ = make_initialised_model(cfg_.model, cfg_.train.seed);
  if (!data_.word_starts.empty()) model_->set_word_starts(data_.word_starts);
  opt_.init(model_->params());
  if (!o_.init_from.empty()) {
    // Fine-tuning starts from another run's weights with a fresh optimizer: the architecture
    // must be the checkpoint's. Settings that only steer training or inference may change.
    const std::string dir = resolve_checkpoint(o_.init_from);
    const std::string keys = model_key_differences(
        load_checkpoint_config(dir).model, cfg_.model,
        {"max_seq_len", "init_std", "router.tau", "router.alpha", "router.smooth_grad",
         "target_R", "aux_weight", "aux_kind", "xattn_impl", "mup.sigma_base",
         "mup.lr_mult_token", "mup.lr_mult_concept", "mup.lr_mult_other"});
    if (!keys.empty())
      fail(dir, "/config.json: --init-from needs the checkpoint's architecture, but the config "
           "changes model key(s) ", keys, "; drop those changes (or leave out --config to train "
           "with the checkpoint's config)");
    load_checkpoint_params(dir, model_->params());
  }
  const TrainConfig& t = cfg_.train;
  model_->reserve(t.batch_size, t.seq_len);
  tok_.assign(t.grad_accum * t.batch_size * t.seq_len, 0);
  tgt_.assign(tok_.size(), 0);
  if (data_.train_boundaries) bnd_.assign(tok_.size(), 0);
  precision_ = ops::parse_precision(t.precision, "train.precision");
  ops::PrecisionScope check(precision_);  // fails here, clearly, without AVX512-BF16
  if (precision_ == ops::Precision::BF16 && world_ > 1) {
    // every rank's products on the units rank 0 measured best, so the ranks' numerics agree
    std::string units = ops::bf16_units_name(ops::bf16_units());
    dist::broadcast(units);
    ops::set_bf16_units(ops::parse_bf16_units(units, "rank 0's BF16 units"));
  }
  if (!o_.out_dir.empty() && rank_ == 0) {
    fs::create_directories(o_.out_dir);
    log_path_ = (fs::path(o_.out_dir) / "train_log.jsonl").string();
  }
  prov_ = o_.provenance.is_null() ? provenance_json() : o_.provenance;
  keep_ = std::max<i64>(o_.keep, 0);
  keep_best_ = o_.keep_best > 0;
  if (o_.resume) {
    restore(ckpt_dir);
    // A kill between a save and its kept copy: the checkpoint resumed from is one of the last
    // saves, so it is kept like the others.
    if (keep_ > 0 && rank_ == 0 && !is_checkpoint(step_checkpoint_dir(o_.out_dir, step_))) {
      copy_checkpoint(ckpt_dir, step_checkpoint_dir(o_.out_dir, step_));
      prune_step_checkpoints(o_.out_dir, keep_);
    }
  } else if (!log_path_.empty()) {
    std::ofstream(log_path_, std::ios::trunc);
  }
  peak_gflops_ = o_.peak_gflops > 0 ? o_.peak_gflops : measure_gemm_peak_gflops(0.3);
  if (world_ > 1) {
    // The job's peak is the sum of what each rank reaches with its threads.
    dist::allreduce_sum(&peak_gflops_, 1);
    check_same_weights_on_all_ranks("at start");
    const i64 bucket = std::max<i64>(1, i64(double(t.allreduce_bucket_mb) * (1 << 20) / sizeof(float)));
    allreduce_.init(model_->params().grad(), model_->params().total(), bucket, t.allreduce_overlap);
  }
}

// Every rank must run the same configuration on the same run folder; a rank started with
// other flags (mpirun's MPMD form) would silently train something else.
void Trainer::check_same_run_on_all_ranks() {
  json mine = config_to_json(cfg_);
  mine["__run"] = {{"out", o_.out_dir}, {"resume", o_.resume}, {"init_from", o_.init_from},
                   {"stop_after", o_.stop_after}};
  std::string root = mine.dump();
  dist::broadcast(root);
  if (root == mine.dump()) return;
  json r = json::parse(root);
  json diff = json::diff(r, mine);
  std::string where = diff.empty() ? "?" : diff[0].value("path", std::string("?"));
  fail("rank ", rank_, " was started with settings that differ from rank 0's (first difference at ",
       where, "); every rank must get the same config, --set, --out and --resume");
}

static uint64_t weights_hash(const ParamStore& ps) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(ps.data());
  uint64_t h = 0xcbf29ce484222325ull;
  for (i64 i = 0; i < ps.total(); ++i) h = (h ^ w[i]) * 0x100000001b3ull;
  return h;
}

// The ranks apply identical updates to identical weights; a difference means an all-reduce
// did not give every rank the same sum, and training would silently fork.
void Trainer::check_same_weights_on_all_ranks(const char* when) {
  uint64_t lo, hi;
  dist::allreduce_minmax(weights_hash(model_->params()), &lo, &hi);
  DLCM_CHECK(lo == hi, "rank ", rank_, ": the weights differ between ranks ", when, " (step ",
             step_, "); the ranks no longer train the same model");
}

Trainer::~Trainer() = default;

void Trainer::restore(const std::string& ckpt_dir) {
  load_checkpoint_params(ckpt_dir, model_->params());
  DLCM_CHECK(load_checkpoint_optimizer(ckpt_dir, model_->params(), opt_.m, opt_.v), ckpt_dir,
             ": optimizer.safetensors is missing; cannot resume exactly");
  json st = load_trainer_state(ckpt_dir);
  // load_trainer_state checked the ranges; resuming needs the three counters present.
  for (const char* key : {"step", "tokens_seen", "adam_t"})
    DLCM_CHECK(st.contains(key), ckpt_dir, "/trainer_state.json: missing field '", key,
               "'; cannot resume exactly");
  step_ = st["step"].get<i64>();
  tokens_seen_ = st["tokens_seen"].get<i64>();
  opt_.t = st["adam_t"].get<i64>();
  nonfinite_skips_ = st.value("nonfinite_skips", i64(0));
  nonfinite_in_a_row_ = st.value("nonfinite_in_a_row", i64(0));
  // Checkpoints kept: as the run had them unless given again.
  if (o_.keep < 0 && st.contains("keep") && st["keep"].is_number_integer())
    keep_ = std::max<i64>(st["keep"].get<i64>(), 0);
  if (o_.keep_best < 0 && st.contains("keep_best") && st["keep_best"].is_boolean())
    keep_best_ = st["keep_best"].get<bool>();
  if (st.contains("best_val_loss") && st["best_val_loss"].is_number() &&
      st.contains("best_step") && st["best_step"].is_number_integer()) {
    best_val_ = st["best_val_loss"].get<double>();
    best_step_ = st["best_step"].get<i64>();
  }
  // The run keeps its first start and its origin; this process adds a resume record.
  const fs::path prov_file = fs::path(ckpt_dir) / "provenance.json";
  if (fs::exists(prov_file)) {
    json was;
    try {
      was = read_json_file_bounded(prov_file.string());
    } catch (const Error&) {
      // a damaged record must not stop the run: it restarts from this process's provenance
    }
    if (was.is_object()) {
      json now = prov_;
      now.erase("resumes");
      json rec = {{"step", step_}};
      for (auto it = now.begin(); it != now.end(); ++it)
        if (!was.contains(it.key()) || was[it.key()] != it.value() || it.key() == "start")
          rec[it.key()] = it.value();  // what differs from the original run, and when
      prov_ = was;
      if (!prov_.contains("resumes") || !prov_["resumes"].is_array()) prov_["resumes"] = json::array();
      prov_["resumes"].push_back(rec);
    }
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
  if (o_.on_log) o_.on_log(line);
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
  // Parser needs the whole step's boundaries before any backward pass. Micro-batch k of
  // rank r is micro-batch g = r*K + k of the step's global batch: its data and its rows
  // (row0, which keys the boundary RNG) are those of micro-batch g in one process running
  // ranks*K micro-batches, so both runs see the same batches.
  prof::Section sec;  // benchmark breakdown (dlcm bench train --breakdown)
  sec.next("data");
  std::vector<Batch> micro(K);
  StepContext ctx;
  ctx.seed = t.seed;
  ctx.step = step_;
  for (i64 k = 0; k < K; ++k) {
    const i64 g = rank_ * K + k;
    i32* tk = tok_.data() + k * B * L;
    i32* tg = tgt_.data() + k * B * L;
    data_.train_batch(step_, g, 0, B, L, tk, tg);
    micro[k] = Batch{tk, tg, B, L, g * B};
    if (data_.train_boundaries) {
      uint8_t* bk = bnd_.data() + k * B * L;
      data_.train_boundaries(step_, g, 0, B, L, bk);
      micro[k].boundaries = bk;
    }
    for (i64 i = 0; i < B * L; ++i) ctx.total_targets += tg[i] >= 0;
    ctx.total_positions += B * L;
  }
  sec.next("other");
  if (world_ > 1) {  // the loss is a mean over the global batch
    double tot[2] = {double(ctx.total_targets), double(ctx.total_positions)};
    dist::allreduce_sum(tot, 2);
    ctx.total_targets = i64(tot[0]);
    ctx.total_positions = i64(tot[1]);
  }
  ctx.sum_b = model_->prepare_step(micro, ctx);
  dist::allreduce_sum(&ctx.sum_b, 1);  // F spans all ranks (SPEC 4)
  sec.next("optimizer");
  model_->params().zero_grad();
  sec.next("other");
  MicroStats tot;
  if (world_ > 1) allreduce_.begin_step();
  for (i64 k = 0; k < K; ++k) {
    // Gradients become final during the last micro-batch's backward: buckets can start then.
    if (world_ > 1 && k == K - 1 && t.allreduce_overlap)
      model_->set_grad_ready_callback([this](i64 off) { allreduce_.ready_from(off); });
    tot += model_->train_micro(micro[k], k, ctx);
  }
  if (world_ > 1) {
    model_->set_grad_ready_callback(nullptr);
    r.buckets_early = allreduce_.started_early();
    r.buckets = allreduce_.buckets();
    r.allreduce_seconds = allreduce_.finish();
    std::array<double, MicroStats::kFields> st = tot.to_array();
    dist::allreduce_sum(st.data(), i64(st.size()));
    tot = MicroStats::from_array(st);
  }
  r.ce = tot.ce_sum / std::max<i64>(tot.n_targets, 1);
  r.terms = model_->loss_terms(tot);
  r.loss = r.ce + r.terms.aux_loss;
  // After the all-reduce every rank holds the same gradients, hence the same global norm.
  sec.next("optimizer");
  r.grad_norm = clip_grad_norm(model_->params(), t.grad_clip);
  // Every rank holds the same loss and gradients here, so all take the same branch.
  r.nonfinite = nonfinite_component(r);
  if (r.nonfinite.empty()) {
    // Finite gradients can still give a non-finite update (e.g. train.eps 0 over a zero
    // gradient) or overflow the second moment; the weights are then lost, so stop. (The update
    // checks what it writes.)
    ParamStore& ps = model_->params();
    if (!opt_.step(ps, float(r.lr), t)) {
      std::string what = "?";
      for (const Param& p : ps.params()) {
        if (first_nonfinite(p.w, p.numel) >= 0) what = "weight '" + p.name + "'";
        else if (first_nonfinite(opt_.v.data() + p.offset, p.numel) >= 0)
          what = "AdamW second moment of '" + p.name + "'";
        else continue;
        break;
      }
      fail("step ", step_ + 1, ": the AdamW update made the ", what, " non-finite (lr ", r.lr,
           ", train.eps ", t.eps, ", grad norm ", r.grad_norm, "); the run cannot continue from "
           "these weights. Resume from the last checkpoint with a lower train.lr or a larger "
           "train.eps");
    }
  } else {
    handle_nonfinite(r);  // throws under "stop"
  }
  sec.next("other");
  ++step_;
  if (!r.skipped) nonfinite_in_a_row_ = 0;
  r.tokens = K * B * L * world_;
  tokens_seen_ += r.tokens;
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

// What went non-finite in a step, in the order it is computed: "" when all is finite.
std::string Trainer::nonfinite_component(const StepResult& r) const {
  if (!std::isfinite(r.ce)) return "loss (CE = " + std::to_string(r.ce) + ")";
  if (!std::isfinite(r.terms.aux_loss))
    return "loss (aux = " + std::to_string(r.terms.aux_loss) + ")";
  if (!std::isfinite(r.loss)) return "loss (" + std::to_string(r.loss) + ")";
  if (std::isfinite(r.grad_norm)) return "";
  // The norm is a double sum of float squares: it is non-finite only if some gradient is.
  for (const Param& p : model_->params().params())
    if (first_nonfinite(p.g, p.numel) >= 0) return "gradient of '" + p.name + "'";
  return "gradient norm";
}

// The weights were not updated. "skip" counts the step and moves on to the next batch (the
// step counter and schedule advance, AdamW's t does not); "stop", or too many skips in a row,
// ends the run with the step and the component.
void Trainer::handle_nonfinite(StepResult& r) {
  const TrainConfig& t = cfg_.train;
  const i64 step = step_ + 1;  // the number this step is logged under
  const bool skip = t.on_nonfinite == "skip" && nonfinite_in_a_row_ < t.max_nonfinite_skips;
  json j = {{"event", "nonfinite"}, {"step", step}, {"component", r.nonfinite},
            {"action", skip ? "skip" : "stop"}, {"lr", r.lr}};
  if (skip) j["skipped_total"] = nonfinite_skips_ + 1;
  log_line(j.dump());
  if (!skip) {
    if (t.on_nonfinite == "skip")
      fail("step ", step, ": ", r.nonfinite, " went non-finite; ", nonfinite_in_a_row_,
           " steps in a row were already skipped (train.max_nonfinite_skips = ",
           t.max_nonfinite_skips, "), so training stops. The weights were not updated and the "
           "last checkpoint is intact: resume it with a lower train.lr");
    fail("step ", step, ": ", r.nonfinite, " went non-finite (lr ", r.lr,
         "); the weights were not updated and the last checkpoint is intact. Resume it with a "
         "lower train.lr, or set train.on_nonfinite=skip to skip such steps");
  }
  ++nonfinite_skips_;
  ++nonfinite_in_a_row_;
  r.skipped = true;
  if (talk())
    std::fprintf(stderr, "%s[train] step %lld: %s went non-finite; step skipped (%lld in a row, "
                 "%lld in all)\n", isatty(fileno(stderr)) ? "\r\033[K" : "", (long long)step,
                 r.nonfinite.c_str(), (long long)nonfinite_in_a_row_, (long long)nonfinite_skips_);
}

Trainer::ValResult Trainer::validate(i64 max_batches) {
  return validate_split(*model_, data_, cfg_.train.batch_size, cfg_.train.seq_len, max_batches);
}

void Trainer::save_checkpoint_now() {
  if (o_.out_dir.empty()) return;
  const std::string ck = (fs::path(o_.out_dir) / "checkpoint").string();
  save_to(ck);
  saved_step_ = step_;
  if (keep_ > 0 && rank_ == 0) {
    copy_checkpoint(ck, step_checkpoint_dir(o_.out_dir, step_));
    prune_step_checkpoints(o_.out_dir, keep_);
  }
}

// A validation loss was logged: with keep_best, a new lowest one is saved as checkpoint-best/.
void Trainer::note_validation(double val_loss) {
  if (!keep_best_ || o_.out_dir.empty() || !std::isfinite(val_loss)) return;
  if (best_step_ >= 0 && !(val_loss < best_val_)) return;
  best_val_ = val_loss;
  best_step_ = step_;
  save_to(best_checkpoint_dir(o_.out_dir));
}

void Trainer::save_to(const std::string& dir) {
  // Rank 0 writes (atomically: tmp folder + rename); the others wait so that no rank runs
  // ahead of a checkpoint that might still fail.
  if (world_ > 1) check_same_weights_on_all_ranks("before saving a checkpoint");
  if (rank_ != 0) {
    dist::barrier();
    return;
  }
  json st = {{"step", step_},
             {"tokens_seen", tokens_seen_},
             {"adam_t", opt_.t},
             {"seed", cfg_.train.seed},
             {"data_cursor", {{"kind", "counter"}, {"step", step_}}},
             {"schedule", {{"name", cfg_.train.schedule}, {"step", step_}, {"total", cfg_.train.steps}}},
             {"world_size", world_},
             {"nonfinite_skips", nonfinite_skips_},
             {"nonfinite_in_a_row", nonfinite_in_a_row_},
             {"keep", keep_},
             {"keep_best", keep_best_}};
  if (best_step_ >= 0) {
    st["best_val_loss"] = best_val_;
    st["best_step"] = best_step_;
  }
  prov_["end"] = utc_time_iso();
  prov_["step"] = step_;
  CheckpointWrite w;
  w.provenance = prov_;
  w.config = &cfg_;
  w.params = &model_->params();
  w.exp_avg = &opt_.m;
  w.exp_avg_sq = &opt_.v;
  w.trainer_state = st;
  w.extra_files = data_.checkpoint_files;
  if (!log_path_.empty()) w.extra_files.push_back(log_path_);
  save_checkpoint(dir, w);
  dist::barrier();
}

void Trainer::run() {
  const TrainConfig& t = cfg_.train;
  const bool tty = isatty(fileno(stderr));
  const double flops_tok = 3.0 * model_->flops_per_token(t.seq_len);
  if (talk())
    std::fprintf(stderr, "[train] %s, %.2fM parameters, %lld steps of %lld tokens, FP32 GEMM peak %.0f GFLOP/s\n",
                 cfg_.model.arch.c_str(), model_->params().total() / 1e6, (long long)t.steps,
                 (long long)(world_ * t.grad_accum * t.batch_size * t.seq_len), peak_gflops_);
  if (world_ > 1 || (resumed_from_world_ > 0 && resumed_from_world_ != world_)) {
    // The data-parallel layout from this step on, for whoever reads the log later.
    const i64 rows = world_ * t.grad_accum * t.batch_size;
    json j = {{"event", "ranks"}, {"step", step_}, {"ranks", world_},
              {"grad_accum", t.grad_accum}, {"global_batch_rows", rows},
              {"threads_per_rank", omp_get_max_threads()}};
    if (!threads_note_.empty()) j["threads_choice"] = threads_note_;
    if (resumed_from_world_ > 0) j["previous_ranks"] = resumed_from_world_;
    log_line(j.dump());
    if (talk())
      std::fprintf(stderr, "[train] %d ranks x %d OpenMP threads (%s), global batch %d x %lld x %lld = %lld rows\n",
                   world_, omp_get_max_threads(), threads_note_.empty() ? "OpenMP default" : threads_note_.c_str(),
                   world_, (long long)t.grad_accum, (long long)t.batch_size, (long long)rows);
  }
  i64 ran = 0, saved_at = -1;
  double ema_rate = 0;
  // The peak is ours to measure again: not given by the caller, one process only (ranks would
  // have to agree on it).
  const bool own_peak = o_.peak_gflops <= 0 && world_ == 1;
  while (step_ < t.steps && (o_.stop_after < 0 || ran < o_.stop_after)) {
    StepResult r = train_step();
    ++ran;
    double tps = r.tokens / r.seconds;
    ema_rate = ema_rate == 0 ? tps : 0.9 * ema_rate + 0.1 * tps;
    double mfu = flops_tok * tps / (peak_gflops_ * 1e9);
    // A peak measured while the machine was busy is too low (MFU > 100%): measure again, a few
    // times at most.
    if (mfu > 1.0 && own_peak && peak_remeasures_ < 3) {
      ++peak_remeasures_;
      peak_gflops_ = std::max(peak_gflops_, measure_gemm_peak_gflops(0.3));
      mfu = flops_tok * tps / (peak_gflops_ * 1e9);
      if (!o_.quiet)
        std::fprintf(stderr, "%s[train] FP32 GEMM peak measured again: %.0f GFLOP/s\n",
                     tty ? "\r\033[K" : "", peak_gflops_);
    }
    // Still above 100% after the re-measures: the machine runs faster now than in every
    // measurement of its peak (a noisy, shared host). Say so once rather than hide the figure.
    if (mfu > 1.0 && !mfu_over_noted_ && talk() && !(own_peak && peak_remeasures_ < 3)) {
      mfu_over_noted_ = true;
      std::fprintf(stderr,
                   "%s[train] note: MFU reads above 100%% because the host runs faster now than "
                   "when its FP32 GEMM peak (%.0f GFLOP/s) was measured; it is relative to that peak\n",
                   tty ? "\r\033[K" : "", peak_gflops_);
    }
    if (step_ % t.log_every == 0 || step_ == 1 || step_ == t.steps) {
      json j = {{"step", step_}, {"loss", r.loss}, {"ce", r.ce}, {"lr", r.lr},
                {"grad_norm", r.grad_norm}, {"tokens_per_s", tps}, {"mfu", mfu},
                {"tokens", tokens_seen_}};
      if (world_ > 1) {
        j["allreduce_s"] = r.allreduce_seconds;
        j["allreduce_buckets"] = r.buckets;
        j["allreduce_early"] = r.buckets_early;
      }
      for (const auto& [name, value] : r.terms.fields) j[name] = value;
      if (r.skipped) j["skipped"] = true;
      if (nonfinite_skips_ > 0) j["skipped_total"] = nonfinite_skips_;
      log_line(j.dump());
      if (talk()) {
        double eta = (t.steps - step_) * double(r.tokens) / ema_rate;
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
      json j = {{"step", step_}, {"val_loss", v.loss}, {"val_ppl", v.ppl}, {"val_tokens", v.tokens},
                {"tokens", tokens_seen_}};
      if (v.bpb > 0) j["val_bpb"] = v.bpb;
      if (v.compression > 0) j["val_compression"] = v.compression;
      if (o_.concept_usage && rank_ == 0) {
        ConceptUsageResult u = measure_concept_usage(*model_, data_, cfg_.train.batch_size,
                                                     cfg_.train.seq_len, t.eval_batches);
        if (u.applicable) j["concept_usage"] = concept_usage_json(u);
      }
      log_line(j.dump());
      note_validation(v.loss);
      if (talk())
        std::fprintf(stderr, "%sstep %lld | val loss %.4f | ppl %.2f%s\n", tty ? "\r\033[K" : "",
                     (long long)step_, v.loss, v.ppl,
                     v.bpb > 0 ? (" | bpb " + std::to_string(v.bpb)).c_str() : "");
    }
    if ((t.ckpt_every > 0 && step_ % t.ckpt_every == 0) || last) {
      save_checkpoint_now();
      saved_at = step_;
    }
    if (o_.stop_requested && o_.stop_requested()) break;
  }
  // Stopped early (stop_after): leave a checkpoint of where we are.
  if (ran > 0 && saved_at != step_) save_checkpoint_now();
  if (talk() && tty) std::fprintf(stderr, "\n");
}

}  // namespace dlcm
