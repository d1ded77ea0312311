// Concept-usage diagnostics of a DLCM over a validation split: does the decoder use its
// concepts? The definitions are those of python/dlcm_ref/diagnostics.py (docs/dlcm.md):
//   delta_null    = CE with every concept the decoder sees replaced by z_null - CE
//   delta_shuffle = CE with concepts shuffled across the rows of each batch (row r takes row
//                   (r + 1) mod B's list) - CE
//   xattn_ratio   = mean_t ||Wo att_t||_2 / mean_t ||H_t||_2 (the cross-attention's share of
//                   the residual Psi = H + Wo att)
//   pos_ce[k]     = CE of the targets at position k inside their concept (pos_count[k] of them)
// All with thresholded boundaries (the inference rule), FP32, sums in float64. The shuffle
// needs batches of at least 2 rows (a single row gets its own concepts back).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/train_data.h"
#include "models/model.h"

namespace dlcm {

struct ConceptUsageResult {
  bool applicable = false;  // false: the model has no concepts (baseline); nothing below is set
  i64 batches = 0;          // batches evaluated
  bool full_split = false;  // every batch of the split
  i64 tokens = 0;           // kept targets evaluated
  double ce = 0, ce_null = 0, ce_shuffle = 0;
  double delta_null = 0, delta_shuffle = 0;
  double xattn_ratio = 0;
  double compression = 0;  // realised tokens per concept (positions / concepts)
  std::vector<double> pos_ce;
  std::vector<i64> pos_count;
};

// Evaluates the first max_batches (all when < 0) of the validation batches of `data` as [B, L]
// rows, on this process (not a collective). Not applicable when `data` has no validation split.
ConceptUsageResult measure_concept_usage(LanguageModel& m, const TrainData& data, i64 B,
                                         i64 L, i64 max_batches = -1);
// The means of summed diagnostics (what measure_concept_usage does after its batches).
ConceptUsageResult concept_usage_from_sums(const ConceptUsageSums& s);

// {"ce", "ce_null", "ce_shuffle", "delta_null", "delta_shuffle", "xattn_ratio",
//  "compression", "pos_ce", "pos_count", "tokens", "batches", "full_split"}.
nlohmann::json concept_usage_json(const ConceptUsageResult& u);
// A few human-readable lines (the first positions of pos_ce).
std::string concept_usage_text(const ConceptUsageResult& u);

}  // namespace dlcm
