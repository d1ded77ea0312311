// The DLCM's boundary decisions (SPEC 4 step 2, the 4.9 controls and the auxiliary loss), in
// one place so that training, evaluation and streaming decide identically.
//
// Learned routers ("projected", "raw") give p from the cosine rule; training samples
// b ~ Bernoulli(sigmoid(logit(p)/alpha)), inference thresholds b = [p >= tau].
// Rule routers give b by a fixed rule, the same in training, evaluation and streaming:
//   "fixed": b_t = 1 when (t - s) % stride == 0, s = the last forced boundary at or before t
//            (row start or BOS): a concept every `stride` tokens, restarted at every document;
//   "word":  b_t = word_starts[token_t] (Tokenizer::word_starts(): the piece begins with
//            whitespace or punctuation), plus the forced boundaries.
// For rule routers p is defined as the rule's 0/1 decision, so the smoother's gate
// (clamp(p) = 1 - 1e-4 at a rule boundary, 1 at a forced one) and every statistic built on p
// stay defined; there are no router parameters, p carries no gradient and the auxiliary loss
// is 0 (the realised compression is still reported as F).
#pragma once
#include <string>
#include <vector>

#include "models/model.h"

namespace dlcm {

class BoundaryDecider {
 public:
  void init(const ModelConfig& c);
  bool is_rule() const { return kind_ != Kind::Learned; }
  // router.kind = "word": one flag per vocabulary id (size vocab_size, values 0/1).
  void set_word_starts(std::vector<uint8_t> w);
  bool has_word_starts() const { return !word_starts_.empty(); }
  // Error (with the fix) when router.kind = "word" has no table yet.
  void check_ready() const;

  // Rule kinds: the decision for `token` lying `since` positions after the last forced
  // boundary (0 at the forced boundary itself, which is always a boundary).
  bool rule_at(i32 token, i64 since) const;
  // Rule kinds: p [B*L] = the rule's 0/1 decision over rows of L tokens (forced positions 1).
  void rule_probs(float* p, const i32* tokens, i64 B, i64 L) const;

  // Training decisions: rule kinds copy the rule (p), learned kinds sample
  // (ops::sample_boundaries, keyed by seed, step, row0 + row, position).
  void sample(uint8_t* b, const float* p, const i32* tokens, i64 B, i64 L, float alpha,
              uint64_t seed, uint64_t step, i64 row0) const;
  // Inference decisions: rule kinds copy the rule, learned kinds b = [p >= tau]; forced
  // positions are boundaries either way.
  void threshold(uint8_t* b, const float* p, const i32* tokens, i64 B, i64 L, float tau) const;
  // One non-forced position's inference decision from its p (streaming, statistics).
  bool decide(float p, float tau) const { return is_rule() ? p > 0.5f : p >= tau; }

  // The auxiliary loss of one micro-batch of the step: writes dp [B*L] = weight * dL_aux/dp
  // (overwrites) and returns this batch's share of the loss value that the trainer sums:
  //   "global": F over the step (ctx.sum_b), every p gets the same gradient; returns 0
  //             (DlcmModel::loss_terms computes L_aux from the step's sums of b and p);
  //   "sequence": per-row F_r, G_r, averaged over the step's ctx.total_positions / L rows;
  //             returns sum_r L_r over this batch's rows (unweighted);
  //   rule routers: dp = 0, returns 0.
  double aux_grad(float* dp, const uint8_t* b, const float* p, i64 B, i64 L,
                  const StepContext& ctx) const;

 private:
  enum class Kind { Learned, Fixed, Word };
  Kind kind_ = Kind::Learned;
  i64 stride_ = 4;
  i32 bos_ = 1;
  i64 vocab_ = 0;
  bool sequence_aux_ = false;
  double R_ = 4, weight_ = 0;
  std::vector<uint8_t> word_starts_;
};

}  // namespace dlcm
