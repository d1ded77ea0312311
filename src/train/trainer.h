// The training loop: gradient accumulation, AdamW, schedules, JSON-lines log, progress line,
// periodic validation and atomic checkpoints, exact resume.
//
// Run directory layout (--out DIR):
//   DIR/train_log.jsonl   the live log, one JSON object per line
//   DIR/checkpoint/       the latest checkpoint (SPEC 9), replaced atomically
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/dist.h"
#include "kernels/gemm.h"
#include "models/model.h"
#include "train/optimizer.h"

namespace dlcm {

// Where batches come from. Every function is deterministic in its arguments, so a resumed
// run sees exactly the batches an uninterrupted run would.
struct TrainData {
  // tokens/targets [B, L] for micro-batch `micro` of optimizer step `step` on rank `rank`.
  // The trainer passes the step's global micro-batch index (rank * grad_accum + k under MPI)
  // and rank 0, so a step's data depends on the global batch only, not on how it is split
  // over processes (docs/distributed.md).
  std::function<void(i64 step, i64 micro, i64 rank, i64 B, i64 L, i32* tokens, i32* targets)>
      train_batch;
  // DLCM, optional: given boundary decisions b [B, L] (0/1) for a micro-batch instead of
  // sampling them from the router (benchmarks fix the compression this way). Empty = sample.
  std::function<void(i64 step, i64 micro, i64 rank, i64 B, i64 L, uint8_t* b)> train_boundaries;
  // Validation split as [B, L] batches covering it once (targets -1 where padded).
  std::function<i64(i64 B, i64 L)> val_count;
  std::function<void(i64 index, i64 B, i64 L, i32* tokens, i32* targets)> val_batch;
  double val_bytes = 0;     // UTF-8 bytes of the validation text (0: unknown)
  i64 val_tokens = 0;       // target tokens of the validation text
  std::vector<std::string> checkpoint_files;  // copied into checkpoints (tokenizer files)
  // The tokenizer's word-start flags (Tokenizer::word_starts()), for a DLCM with
  // router.kind = "word"; empty when there is no tokenizer.
  std::vector<uint8_t> word_starts;
};

struct TrainOptions {
  std::string out_dir;
  bool resume = false;
  bool quiet = false;          // no progress output (tests)
  double peak_gflops = 0;      // FP32 GEMM peak of one process for MFU; 0 = measure at start
  i64 stop_after = -1;         // stop after this many steps in this run (tests); -1 = no
  std::string init_from;       // optional: initial weights from a checkpoint
};

struct StepResult {
  double loss = 0, ce = 0, aux = 0, lr = 0, grad_norm = 0;
  double F = 0, G = 0;
  double F_thresholded = 0;  // DLCM: share of positions the inference rule (p >= tau) cuts
  double seconds = 0;
  double allreduce_seconds = 0;  // MPI: time spent finishing the gradient all-reduce
  i64 buckets = 0, buckets_early = 0;  // MPI: gradient buckets, those started during backward
  i64 tokens = 0;                // over all ranks
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
  // and writes a final checkpoint.
  void run();
  StepResult train_step();
  struct ValResult {
    double loss = 0, ppl = 0, bpb = 0, compression = 0;
    i64 tokens = 0;
  };
  ValResult validate(i64 max_batches = -1);
  void save_checkpoint_now();

  LanguageModel& model() { return *model_; }
  AdamW& optimizer() { return opt_; }
  i64 step() const { return step_; }
  const Config& config() const { return cfg_; }

 private:
  void log_line(const std::string& json_line);
  void restore(const std::string& ckpt_dir);
  void check_same_run_on_all_ranks();
  void check_same_weights_on_all_ranks(const char* when);
  bool talk() const { return !o_.quiet && rank_ == 0; }

  Config cfg_;
  TrainData data_;
  TrainOptions o_;
  std::unique_ptr<LanguageModel> model_;
  AdamW opt_;
  i64 step_ = 0;
  i64 tokens_seen_ = 0;
  double peak_gflops_ = 0;
  int peak_remeasures_ = 0;
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

// Resolves a user-given checkpoint path: DIR itself, or DIR/checkpoint for a run directory.
std::string resolve_checkpoint(const std::string& path);

// FP32 GEMM throughput of this machine (GFLOP/s) measured with the engine's own GEMM on
// large square products for about `seconds` (median of repeats).
double measure_gemm_peak_gflops(double seconds = 0.5, i64 n = 1536);

}  // namespace dlcm
