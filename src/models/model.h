// The interface the trainer, evaluator, CLI and tests use for both architectures.
#pragma once
#include <array>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/params.h"
#include "models/stream.h"
#include "models/config.h"

namespace dlcm {

// One micro-batch: tokens and next-token targets, both [B, L] (targets < 0 are ignored).
struct Batch {
  const i32* tokens = nullptr;
  const i32* targets = nullptr;
  i64 B = 0, L = 0;
  i64 row0 = 0;  // global index of row 0 within the step (keys the boundary RNG)
  // DLCM: given boundary decisions b [B, L] (0/1) used instead of sampling them (tests,
  // replays of a recorded step); forced positions (row start, BOS) are boundaries regardless.
  // Rule routers (router.kind "fixed", "word") ignore them: the rule decides.
  const uint8_t* boundaries = nullptr;
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

// What one micro-batch's forward pass counted. The trainer adds them up over a step's
// micro-batches and ranks without looking inside; the model turns the step's sums into its
// loss terms (LanguageModel::loss_terms). A new statistic goes into all three members below.
struct MicroStats {
  double ce_sum = 0;   // sum of CE over targets
  i64 n_targets = 0;
  double sum_b = 0, sum_p = 0;  // DLCM: boundary count and probability sum (sampled)
  double aux_rows = 0;  // DLCM, aux_kind "sequence": sum of the rows' L_r (unweighted)
  i64 n_rows = 0;       // rows (sequences) of the batch, for the per-row mean of aux_rows
  i64 n_positions = 0;
  i64 n_concepts = 0;   // concepts the forward pass used (sampled in training)
  i64 n_thresholded = 0;  // DLCM training: concepts the inference rule (p >= tau) would cut

  static constexpr int kFields = 9;
  MicroStats& operator+=(const MicroStats& o);
  // Flat form for the MPI all-reduce (counts are exact in double up to 2^53).
  std::array<double, kFields> to_array() const;
  static MicroStats from_array(const std::array<double, kFields>& a);
};

// A model's contribution to a training step's loss and log, from the step's summed stats.
struct LossTerms {
  double aux_loss = 0;  // added to the mean CE, weights included: loss = ce + aux_loss
  // Named values for the step's train_log.jsonl line (DLCM: aux, F, G, compression, ...).
  std::vector<std::pair<std::string, double>> fields;
  // The field called `name`, or `missing` when the model logs no such field.
  double value(const std::string& name, double missing = 0) const;
};

// Concept-usage diagnostics of batches, as sums that add up over batches (eval/concept_usage.h
// turns them into means; the definitions are those of python/dlcm_ref/diagnostics.py): CE sums
// over the kept targets of the forward as is (ce), with every concept the decoder sees replaced
// by z_null (ce_null), with concepts shuffled across the batch's rows (ce_shuffle); sums of
// ||Wo att_t||_2 and ||H_t||_2 over all positions; CE sum and count of the kept targets by
// position inside the token's concept, pos(t) = t - start of its concept.
struct ConceptUsageSums {
  double ce = 0, ce_null = 0, ce_shuffle = 0;
  i64 n_targets = 0;
  double xo_norm = 0, h_norm = 0;
  i64 n_positions = 0, n_concepts = 0;
  std::vector<double> pos_ce;
  std::vector<i64> pos_count;
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
  // The step's auxiliary loss and log fields from its MicroStats summed over micro-batches
  // and ranks. Default: none (the loss is the CE alone).
  virtual LossTerms loss_terms(const MicroStats& step) const { return {}; }
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

  // DLCM: adds the concept-usage sums of one batch (thresholded boundaries, or the batch's
  // given ones) to acc; no gradients. Returns false, leaving acc untouched, for architectures
  // without concepts (the baseline).
  virtual bool concept_usage(const Batch& b, ConceptUsageSums& acc) { return false; }

  // Streaming inference (SPEC 5): a stream with o.max_seqs slots of up to stream_len(o) tokens,
  // its caches allocated once here. It reads this model's weights (it must not outlive the
  // model) and its logits equal logits() over each slot's tokens (see models/stream.h for the
  // contract). The baseline keeps a KV cache per layer; the DLCM keeps the state of SPEC 5
  // (encoder/backbone/decoder KV caches, router's last q, open concept, smoother, concept K/V
  // with multiplicities) and thresholds p with o.tau. A model's streams share its layers'
  // inference scratch: run one of them at a time (one per thread needs a model per thread).
  virtual std::unique_ptr<InferenceStream> new_stream(const StreamOptions& o) = 0;
  // µP coordinate check: RMS of each stack's output over the rows of the last forward pass
  // (train_micro, eval_micro or logits), as (name, RMS) pairs in a fixed order. Stack outputs
  // are taken before the stack's final norm. Empty before any forward pass.
  virtual std::vector<std::pair<std::string, double>> activation_rms() const { return {}; }

  // DLCM with router.kind = "word": the per-vocabulary-id word-start flags of its tokenizer
  // (Tokenizer::word_starts()); whatever builds a model together with its tokenizer (trainer,
  // checkpoint loader) passes them. Other models ignore them.
  virtual void set_word_starts(std::vector<uint8_t> w) {}

  // Forward FLOPs per token of the model (SPEC 7), for MFU.
  virtual double flops_per_token(i64 L) const = 0;

  // Optional, for data-parallel training: train_micro may call the callback during backward
  // with an offset into params().grad() from which on every gradient is complete for this
  // micro-batch (offsets only decrease within one call). The trainer sets it for the step's
  // last micro-batch to start all-reducing gradient buckets while backward goes on. A model
  // that never calls it stays correct: whatever was not announced is reduced after backward.
  using GradReadyFn = std::function<void(i64 offset)>;
  void set_grad_ready_callback(GradReadyFn f) { grad_ready_ = std::move(f); }

 protected:
  void grad_ready(i64 offset) const {
    if (grad_ready_) grad_ready_(offset);
  }
  // o.max_len, or max_seq_len when 0; Error when it exceeds max_seq_len or max_seqs < 1.
  i64 stream_len(const StreamOptions& o) const;

  ModelConfig cfg_;
  ParamStore params_;
  GradReadyFn grad_ready_;
};

// Root mean square of x[0..n) (accumulated in double); 0 for n = 0.
double rms(const float* x, i64 n);

// Builds the model for cfg.arch with parameters registered and allocated (not initialised).
// Under µP it forces logit_mult (mup_resolve) and sets every parameter's lr/eps scales.
std::unique_ptr<LanguageModel> make_model(const ModelConfig& cfg);
// make_model + params().init(seed) with the configured initialisation.
std::unique_ptr<LanguageModel> make_initialised_model(const ModelConfig& cfg, uint64_t seed);

}  // namespace dlcm
