// Batches of token windows from a shard.
//
// Training: window r of (step, micro, rank) starts at
//   counter_hash(seed, step, micro, rank, r) mod (n_tokens - L)
// in the concatenated train stream, so a batch is a pure function of (seed, step, micro_batch,
// rank, rows, L): a resumed run sees exactly the same batches and the only data cursor to save
// is the seed (and the step). Windows may cross document boundaries (each document starts with
// BOS, which the model sees as a separator).
//
// Validation: windows of L+1 tokens at stride L, in order, so every token except the very
// first is a target exactly once; the last window is padded (inputs pad_id, targets -1 =
// ignore). All windows together cover the validation split once.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "data/shards.h"

namespace dlcm {

struct TokenBatch {
  int64_t rows = 0, L = 0;
  std::vector<int32_t> tokens;   // [rows, L+1]; -1 marks padding (validation tail only)
  std::vector<int32_t> inputs;   // [rows, L]   = tokens[:, :L], padding -> pad_id
  std::vector<int32_t> targets;  // [rows, L]   = tokens[:, 1:], padding -> -1 (ignore)
  int64_t n_targets = 0;         // targets != -1
  int64_t n_bytes = 0;           // UTF-8 bytes of the valid targets (when byte lengths given)
  int64_t valid_rows = 0;        // rows holding at least one target
};

class TrainLoader {
 public:
  // seq_len = L (the model sees L inputs and L targets per row).
  TrainLoader(std::shared_ptr<const ShardReader> train, int64_t seq_len, uint64_t seed,
              int32_t pad_id = 0);
  // Fills `out` with `rows` windows for (step, micro, rank).
  void get(int64_t step, int64_t micro, int64_t rank, int64_t rows, TokenBatch& out) const;
  TokenBatch get(int64_t step, int64_t micro, int64_t rank, int64_t rows) const {
    TokenBatch b;
    get(step, micro, rank, rows, b);
    return b;
  }
  // Start offset of one window (exposed for tests and tooling).
  int64_t offset(int64_t step, int64_t micro, int64_t rank, int64_t row) const;
  uint64_t seed() const { return seed_; }
  int64_t seq_len() const { return L_; }

 private:
  std::shared_ptr<const ShardReader> shard_;
  int64_t L_;
  uint64_t seed_;
  int32_t pad_;
};

class ValIterator {
 public:
  // piece_bytes (optional): Tokenizer::piece_byte_lengths(), for TokenBatch::n_bytes.
  ValIterator(std::shared_ptr<const ShardReader> val, int64_t seq_len, int32_t pad_id = 0,
              std::vector<int32_t> piece_bytes = {});
  int64_t num_windows() const { return n_windows_; }
  int64_t num_targets() const;  // = n_tokens - 1 (all targets over all windows)
  // Fills up to `rows` next windows; rows past the end are all padding. Returns false (and
  // leaves out empty-handed: valid_rows 0) when every window has been served.
  bool next(int64_t rows, TokenBatch& out);
  void reset() { next_ = 0; }
  int64_t position() const { return next_; }  // next window index

 private:
  std::shared_ptr<const ShardReader> shard_;
  int64_t L_, n_windows_, next_ = 0;
  int32_t pad_;
  std::vector<int32_t> bytes_;
};

// Bits per UTF-8 byte from a summed cross-entropy (nats) and the byte count it covers.
double bits_per_byte(double total_ce_nats, int64_t bytes);

}  // namespace dlcm
