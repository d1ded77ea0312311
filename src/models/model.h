// The interface the trainer, evaluator, CLI and tests use for both architectures.
#pragma once
#include <memory>
#include <vector>

#include "core/params.h"
#include "models/config.h"

namespace dlcm {

// One micro-batch: tokens and next-token targets, both [B, L] (targets < 0 are ignored).
struct Batch {
  const i32* tokens = nullptr;
  const i32* targets = nullptr;
  i64 B = 0, L = 0;
  i64 row0 = 0;  // global index of row 0 within the step (keys the boundary RNG)
};

// What one optimizer step knows before its micro-batches run.
struct StepContext {
  uint64_t seed = 0;
  i64 step = 0;
  i64 total_targets = 0;    // non-ignored targets over all micro-batches (and ranks)
  i64 total_positions = 0;  // token positions over all micro-batches (and ranks)
  // DLCM Global Parser: sum of sampled b over the whole step (all micro-batches, ranks).
  double sum_b = 0;
};

struct MicroStats {
  double ce_sum = 0;   // sum of CE over targets
  i64 n_targets = 0;
  double sum_b = 0, sum_p = 0;  // DLCM: boundary count and probability sum (sampled)
  i64 n_positions = 0;
  i64 n_concepts = 0;
};

class LanguageModel {
 public:
  virtual ~LanguageModel() = default;
  const ModelConfig& config() const { return cfg_; }
  ParamStore& params() { return params_; }

  // Allocate activations for micro-batches up to B x L (idempotent).
  virtual void reserve(i64 B, i64 L) = 0;
  // DLCM: sample the step's boundaries for every micro-batch and return their sum of b
  // (phase 1 of a step, needed because the Global Parser's F spans the whole step).
  // The baseline has nothing to do.
  virtual double prepare_step(const std::vector<Batch>& micro, const StepContext& ctx) {
    return 0;
  }
  // Forward + backward of micro-batch `index` of the step: parameter gradients accumulate,
  // the CE gradient is scaled by 1/ctx.total_targets so that k micro-batches equal one
  // batch k times larger.
  virtual MicroStats train_micro(const Batch& b, i64 index, const StepContext& ctx) = 0;
  // Evaluation (thresholded boundaries for DLCM): CE sum, no gradients. row_loss [B*L]
  // optional.
  virtual MicroStats eval_micro(const Batch& b, float* row_loss = nullptr) = 0;
  // Logits [B, L, V] (DLCM: thresholded boundaries, the inference rule).
  virtual void logits(const i32* tokens, i64 B, i64 L, float* out) = 0;
  // Logits at selected positions only: out [n, V], row i for flat position pos[i] in [0, B*L)
  // of the same forward pass (zero-shot scoring needs the continuation's positions only, so
  // the LM head runs on those rows). Default: logits() into a temporary and a copy.
  virtual void logits_at(const i32* tokens, i64 B, i64 L, const i64* pos, i64 n, float* out);
  // DLCM: router probabilities p [B*L] and inference boundaries b [B*L] (b = [p >= tau] with
  // forced boundaries at row start and BOS; tau < 0 means the config's router.tau). Returns
  // false for architectures without concepts (the baseline), leaving p and b untouched.
  virtual bool boundaries(const i32* tokens, i64 B, i64 L, float* p, uint8_t* b,
                          float tau = -1) {
    return false;
  }

  // Forward FLOPs per token of the model (SPEC 7), for MFU.
  virtual double flops_per_token(i64 L) const = 0;

 protected:
  ModelConfig cfg_;
  ParamStore params_;
};

// Builds the model for cfg.arch with parameters registered and allocated (not initialised).
std::unique_ptr<LanguageModel> make_model(const ModelConfig& cfg);
// make_model + params().init(seed) with the configured initialisation.
std::unique_ptr<LanguageModel> make_initialised_model(const ModelConfig& cfg, uint64_t seed);

}  // namespace dlcm
