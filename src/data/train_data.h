// The batches a training run reads (TrainData), and how a prepared data folder (dlcm prepare)
// provides them.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "models/config.h"

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
  std::shared_ptr<void> staged;  // keeps checkpoint_files alive when they were re-saved
  // The tokenizer's word-start flags (Tokenizer::word_starts()), for a DLCM with
  // router.kind = "word"; empty when there is no tokenizer.
  std::vector<uint8_t> word_starts;
};

// Opens DIR/train.bin, DIR/val.bin and the tokenizer in DIR; checks the vocabulary against
// the model config. The returned TrainData keeps the shards open (memory-mapped).
TrainData open_train_data(const std::string& dir, const Config& cfg);

}  // namespace dlcm
