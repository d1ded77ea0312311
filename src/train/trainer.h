// The training loop: gradient accumulation, AdamW, schedules, JSON-lines log, progress line,
// periodic validation and atomic checkpoints, exact resume.
//
// Run directory layout (--out DIR):
//   DIR/train_log.jsonl   the live log, one JSON object per line
//   DIR/checkpoint/       the latest checkpoint (SPEC 9), replaced atomically
//   DIR/checkpoint-step-N/  with keep > 0: the last `keep` checkpoints (train/run_dir.h)
//   DIR/checkpoint-best/  with keep_best: the lowest logged validation loss
// Every checkpoint holds provenance.json: the options' provenance (data/provenance.h) with the
// run's first start, "end" (the time of the save), "step", and a "resumes" record per resume.
#pragma once
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/dist.h"
#include "data/train_data.h"
#include "eval/validate.h"
#include "kernels/gemm.h"
#include "models/model.h"
#include "train/optimizer.h"
#include "train/run_dir.h"

namespace dlcm {

struct TrainOptions {
  std::string out_dir;
  bool resume = false;
  bool overwrite = false;      // train into an existing run folder from scratch (no --resume)
  bool quiet = false;          // no progress output (tests)
  double peak_gflops = 0;      // FP32 GEMM peak of one process for MFU; 0 = measure at start
  i64 stop_after = -1;         // stop after this many steps in this run (tests); -1 = no
  std::string init_from;       // optional: initial weights from a checkpoint
  // DLCM: concept-usage diagnostics (eval/concept_usage.h) on the eval batches at every
  // logged evaluation, under "concept_usage" in the log line (three decoder passes a batch;
  // rank 0 only under MPI).
  bool concept_usage = false;
  // Checkpoints kept besides checkpoint/ (-1: as the resumed run had it, else 0 / false).
  i64 keep = -1;        // the last N saves as checkpoint-step-N/
  int keep_best = -1;   // 1: checkpoint-best/ at each new lowest logged validation loss
  // Where the run comes from (provenance_json(data dir) in `dlcm train`); null: provenance_json().
  nlohmann::json provenance;
  // For callers that drive training from elsewhere (the Python package): on_log gets each log
  // record (one JSON object) as it is appended to train_log.jsonl; stop_requested is asked
  // after every step, and true ends the run there with a checkpoint, as stop_after does. One
  // process only: under MPI the ranks would have to agree on stopping.
  std::function<void(const std::string& json_line)> on_log;
  std::function<bool()> stop_requested;
};

struct StepResult {
  double loss = 0, ce = 0, lr = 0, grad_norm = 0;  // loss = ce + terms.aux_loss
  LossTerms terms;  // the model's auxiliary loss and log fields (DLCM: aux, F, G, ...)
  double seconds = 0;
  double allreduce_seconds = 0;  // MPI: time spent finishing the gradient all-reduce
  i64 buckets = 0, buckets_early = 0;  // MPI: gradient buckets, those started during backward
  i64 tokens = 0;                // over all ranks
  // Non-finite guard (train.on_nonfinite = skip): the step left the weights untouched.
  bool skipped = false;
  std::string nonfinite;  // what went non-finite ("loss (CE)", "gradient of 'x'"), "" = none
};

// Under MPI (dist::size() > 1) every rank builds a Trainer with the same config: each rank
// runs grad_accum micro-batches per step, gradients and step statistics are summed over the
// ranks, every rank applies the same update, rank 0 alone writes logs and checkpoints, and
// validation batches are split over the ranks.
class Trainer {
 public:
  Trainer(const Config& cfg, TrainData data, TrainOptions opt);
  ~Trainer();
  // Trains until cfg.train.steps (or stop_after), validating and checkpointing on schedule,
  // and writes a final checkpoint. A non-finite step under train.on_nonfinite = "stop" (or too
  // many skipped in a row) throws Error naming the step and the component; the last
  // checkpoint is left as it was.
  void run();
  StepResult train_step();
  using ValResult = dlcm::ValResult;
  // validate_split (eval/validate.h) of the model on the run's validation data with the
  // training batch shape, the first max_batches batches (-1: all).
  ValResult validate(i64 max_batches = -1);
  void save_checkpoint_now();
  // Lowest logged validation loss and its step (keep_best; step -1 while none).
  double best_val_loss() const { return best_val_; }
  i64 best_step() const { return best_step_; }

  LanguageModel& model() { return *model_; }
  AdamW& optimizer() { return opt_; }
  i64 step() const { return step_; }
  i64 nonfinite_skips() const { return nonfinite_skips_; }
  // Step of the checkpoint this trainer wrote last (-1: none written by it).
  i64 saved_step() const { return saved_step_; }
  const Config& config() const { return cfg_; }

 private:
  void log_line(const std::string& json_line);
  void save_to(const std::string& dir);
  void note_validation(double val_loss);
  void restore(const std::string& ckpt_dir);
  void check_same_run_on_all_ranks();
  void check_same_weights_on_all_ranks(const char* when);
  std::string nonfinite_component(const StepResult& r) const;
  void handle_nonfinite(StepResult& r);
  bool talk() const { return !o_.quiet && rank_ == 0; }

  Config cfg_;
  TrainData data_;
  TrainOptions o_;
  std::unique_ptr<RunDirLock> lock_;  // rank 0 owns --out for the trainer's life
  std::unique_ptr<LanguageModel> model_;
  AdamW opt_;
  i64 step_ = 0;
  i64 tokens_seen_ = 0;
  i64 nonfinite_skips_ = 0, nonfinite_in_a_row_ = 0;  // train.on_nonfinite = skip
  i64 saved_step_ = -1;
  i64 keep_ = 0;
  bool keep_best_ = false;
  double best_val_ = 0;
  i64 best_step_ = -1;
  nlohmann::json prov_;  // provenance.json of the next checkpoint
  double peak_gflops_ = 0;
  int peak_remeasures_ = 0;
  bool mfu_over_noted_ = false;  // the one-time note when MFU stays above 100%
  std::vector<i32> tok_, tgt_;  // [grad_accum, B, L]
  std::vector<uint8_t> bnd_;    // given boundaries [grad_accum, B, L] (train_boundaries)
  ops::Precision precision_ = ops::Precision::FP32;
  std::string log_path_;
  std::vector<std::string> log_lines_;
  // data parallel
  int rank_ = 0, world_ = 1;
  i64 resumed_from_world_ = 0;  // ranks of the checkpoint resumed from (0: not resumed)
  dist::ThreadPlan threads_;
  std::string threads_note_;
  dist::GradAllreduce allreduce_;
};

// FP32 GEMM throughput of this machine (GFLOP/s) measured with the engine's own GEMM on
// large square products for about `seconds` (median of repeats).
double measure_gemm_peak_gflops(double seconds = 0.5, i64 n = 1536);

}  // namespace dlcm
