// Validation over a data split: mean cross-entropy, perplexity, bits per UTF-8 byte and the
// realised compression (DLCM). Used by the trainer's periodic evaluation, `dlcm train`'s final
// pass and `dlcm eval --data`.
#pragma once
#include <vector>

#include "data/train_data.h"
#include "models/model.h"

namespace dlcm {

struct ValResult {
  double loss = 0;         // mean CE per target token (nats)
  double ppl = 0;          // exp(loss)
  double bpb = 0;          // bits per UTF-8 byte; 0 when the split's byte count is unknown
  double compression = 0;  // positions per concept (DLCM, thresholded boundaries); 0 otherwise
  i64 tokens = 0;          // target tokens evaluated
  // CE by position in the row: targets at positions [row_pos_from[k], row_pos_to[k]) of their
  // [L] row (buckets 0-16, 16-64, 64-256, ... up to L; see row_position_buckets). Shows how
  // much a model gains from context deep in the row, e.g. beyond a sliding window's reach.
  std::vector<i64> row_pos_from, row_pos_to, row_pos_tokens;
  std::vector<double> row_pos_ce;
};

// Bucket edges over positions [0, L): 0, 16, 64, 256, ... (powers of 4 from 16), the last
// bucket ending at L. Returns the starts; bucket k ends at the next start (or L).
std::vector<i64> row_position_buckets(i64 L);

// Evaluates `model` in FP32 with the inference rule (eval_micro) on the validation batches of
// `data` as [B, L] rows: the first max_batches of them, or all with max_batches < 0. Returns
// zeros when `data` has no validation split. A collective under MPI: every rank calls it,
// rank r evaluates batches r, r + ranks, ... and every rank gets the sums over all ranks.
ValResult validate_split(LanguageModel& model, const TrainData& data, i64 B, i64 L,
                         i64 max_batches = -1);

}  // namespace dlcm
