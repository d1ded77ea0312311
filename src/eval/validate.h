// Validation over a data split: mean cross-entropy, perplexity, bits per UTF-8 byte and the
// realised compression (DLCM). Used by the trainer's periodic evaluation, `dlcm train`'s final
// pass and `dlcm eval --data`.
#pragma once
#include "data/train_data.h"
#include "models/model.h"

namespace dlcm {

struct ValResult {
  double loss = 0;         // mean CE per target token (nats)
  double ppl = 0;          // exp(loss)
  double bpb = 0;          // bits per UTF-8 byte; 0 when the split's byte count is unknown
  double compression = 0;  // positions per concept (DLCM, thresholded boundaries); 0 otherwise
  i64 tokens = 0;          // target tokens evaluated
};

// Evaluates `model` in FP32 with the inference rule (eval_micro) on the validation batches of
// `data` as [B, L] rows: the first max_batches of them, or all with max_batches < 0. Returns
// zeros when `data` has no validation split. A collective under MPI: every rank calls it,
// rank r evaluates batches r, r + ranks, ... and every rank gets the sums over all ranks.
ValResult validate_split(LanguageModel& model, const TrainData& data, i64 B, i64 L,
                         i64 max_batches = -1);

}  // namespace dlcm
