#include "data/loader.h"

#include <cmath>

#include "core/rng.h"

namespace dlcm {
namespace {

void shape(TokenBatch& b, int64_t rows, int64_t L) {
  b.rows = rows;
  b.L = L;
  b.tokens.assign(size_t(rows * (L + 1)), -1);
  b.inputs.resize(size_t(rows * L));
  b.targets.resize(size_t(rows * L));
  b.n_targets = b.n_bytes = b.valid_rows = 0;
}

// Derives inputs/targets from tokens and counts targets (and bytes).
void finish(TokenBatch& b, int32_t pad, const std::vector<int32_t>& bytes) {
  const int64_t L = b.L;
  for (int64_t r = 0; r < b.rows; ++r) {
    const int32_t* t = b.tokens.data() + r * (L + 1);
    int32_t* in = b.inputs.data() + r * L;
    int32_t* tg = b.targets.data() + r * L;
    int64_t nt = 0;
    for (int64_t i = 0; i < L; ++i) {
      in[i] = t[i] < 0 ? pad : t[i];
      tg[i] = t[i] < 0 ? -1 : t[i + 1];
      if (tg[i] >= 0) {
        ++nt;
        if (!bytes.empty()) b.n_bytes += bytes[tg[i]];
      }
    }
    b.n_targets += nt;
    b.valid_rows += nt > 0;
  }
}

}  // namespace

TrainLoader::TrainLoader(std::shared_ptr<const ShardReader> train, int64_t seq_len, uint64_t seed,
                         int32_t pad_id)
    : shard_(std::move(train)), L_(seq_len), seed_(seed), pad_(pad_id) {
  DLCM_CHECK(shard_, "TrainLoader: no shard");
  DLCM_CHECK(seq_len >= 1, "TrainLoader: sequence length must be >= 1, got ", seq_len);
  DLCM_CHECK(shard_->size() >= seq_len + 1, "token shard ", shard_->path(), " has ",
             shard_->size(), " tokens, fewer than one training window of seq_len+1 = ",
             seq_len + 1);
}

int64_t TrainLoader::offset(int64_t step, int64_t micro, int64_t rank, int64_t row) const {
  const uint64_t range = uint64_t(shard_->size() - L_);  // starts in [0, n - (L+1)]
  return int64_t(counter_hash(seed_, uint64_t(step), uint64_t(micro), uint64_t(rank),
                              uint64_t(row)) %
                 range);
}

void TrainLoader::get(int64_t step, int64_t micro, int64_t rank, int64_t rows, TokenBatch& out) const {
  DLCM_CHECK(rows >= 1, "TrainLoader: rows must be >= 1, got ", rows);
  shape(out, rows, L_);
  for (int64_t r = 0; r < rows; ++r)
    shard_->read(offset(step, micro, rank, r), L_ + 1, out.tokens.data() + r * (L_ + 1));
  finish(out, pad_, {});
}

ValIterator::ValIterator(std::shared_ptr<const ShardReader> val, int64_t seq_len, int32_t pad_id,
                         std::vector<int32_t> piece_bytes)
    : shard_(std::move(val)), L_(seq_len), pad_(pad_id), bytes_(std::move(piece_bytes)) {
  DLCM_CHECK(shard_, "ValIterator: no shard");
  DLCM_CHECK(seq_len >= 1, "ValIterator: sequence length must be >= 1, got ", seq_len);
  DLCM_CHECK(bytes_.empty() || int64_t(bytes_.size()) == shard_->vocab_size(),
             "ValIterator: byte-length table has ", bytes_.size(), " entries, shard ",
             shard_->path(), " has vocab ", shard_->vocab_size());
  const int64_t n = shard_->size();
  n_windows_ = n >= 2 ? (n - 1 + L_ - 1) / L_ : 0;
}

int64_t ValIterator::num_targets() const { return shard_->size() >= 2 ? shard_->size() - 1 : 0; }

bool ValIterator::next(int64_t rows, TokenBatch& out) {
  DLCM_CHECK(rows >= 1, "ValIterator: rows must be >= 1, got ", rows);
  shape(out, rows, L_);
  if (next_ >= n_windows_) {
    finish(out, pad_, bytes_);
    return false;
  }
  const int64_t n = shard_->size();
  for (int64_t r = 0; r < rows && next_ < n_windows_; ++r, ++next_) {
    const int64_t start = next_ * L_;
    const int64_t len = std::min(L_ + 1, n - start);
    shard_->read(start, len, out.tokens.data() + r * (L_ + 1));
  }
  finish(out, pad_, bytes_);
  return true;
}

double bits_per_byte(double total_ce_nats, int64_t bytes) {
  DLCM_CHECK(bytes > 0, "bits_per_byte: byte count must be positive, got ", bytes);
  return total_ce_nats / std::log(2.0) / double(bytes);
}

}  // namespace dlcm
