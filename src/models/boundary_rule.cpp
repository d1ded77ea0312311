#include "models/boundary_rule.h"

#include <algorithm>

#include "kernels/dlcm_ops.h"

namespace dlcm {

void BoundaryDecider::init(const ModelConfig& c) {
  kind_ = c.router.kind == "fixed" ? Kind::Fixed
          : c.router.kind == "word" ? Kind::Word
                                    : Kind::Learned;
  stride_ = c.router.stride;
  bos_ = c.bos_id;
  vocab_ = c.vocab_size;
  sequence_aux_ = c.aux_kind == "sequence";
  R_ = c.target_R;
  weight_ = c.aux_weight;
  DLCM_CHECK(stride_ >= 1, "router.stride must be >= 1, got ", stride_);
}

void BoundaryDecider::set_word_starts(std::vector<uint8_t> w) {
  DLCM_CHECK(i64(w.size()) == vocab_, "word-start table: ", w.size(),
             " entries but the model's vocab_size is ", vocab_,
             " (build it with Tokenizer::word_starts() of the model's own tokenizer)");
  for (uint8_t x : w)
    DLCM_CHECK(x <= 1, "word-start table: values must be 0 or 1, got ", int(x));
  word_starts_ = std::move(w);
}

void BoundaryDecider::check_ready() const {
  DLCM_CHECK(kind_ != Kind::Word || !word_starts_.empty(),
             "router.kind = \"word\" needs the tokenizer's word-start table, and this model has "
             "none: call set_word_starts(tokenizer.word_starts()) after building it (the trainer "
             "and the checkpoint loader do this from the data or checkpoint's tokenizer files)");
}

bool BoundaryDecider::rule_at(i32 token, i64 since) const {
  if (since == 0) return true;
  if (kind_ == Kind::Fixed) return since % stride_ == 0;
  check_ready();
  return word_starts_[token] != 0;  // tokens are validated against the vocabulary upstream
}

void BoundaryDecider::rule_probs(float* p, const i32* tokens, i64 B, i64 L) const {
  DLCM_CHECK(is_rule(), "internal: rule_probs for a learned router");
  check_ready();
  for (i64 r = 0; r < B; ++r) {
    i64 s = 0;  // last forced boundary of the row
    for (i64 t = 0; t < L; ++t) {
      const i64 n = r * L + t;
      if (t == 0 || tokens[n] == bos_) s = t;
      p[n] = rule_at(tokens[n], t - s) ? 1.f : 0.f;
    }
  }
}

void BoundaryDecider::sample(uint8_t* b, const float* p, const i32* tokens, i64 B, i64 L,
                             float alpha, uint64_t seed, uint64_t step, i64 row0) const {
  if (is_rule())
    threshold(b, p, tokens, B, L, 0.5f);
  else
    ops::sample_boundaries(b, p, tokens, bos_, B, L, alpha, seed, step, row0);
}

void BoundaryDecider::threshold(uint8_t* b, const float* p, const i32* tokens, i64 B, i64 L,
                                float tau) const {
  if (!is_rule()) return ops::threshold_boundaries(b, p, tokens, bos_, B, L, tau);
  for (i64 n = 0; n < B * L; ++n)
    b[n] = (n % L == 0 || tokens[n] == bos_ || p[n] > 0.5f) ? 1 : 0;
}

double BoundaryDecider::aux_grad(float* dp, const uint8_t* b, const float* p, i64 B, i64 L,
                                 const StepContext& ctx) const {
  const i64 N = B * L;
  std::fill(dp, dp + N, 0.f);
  if (is_rule()) return 0;
  if (!sequence_aux_) {
    const double count = double(std::max<i64>(ctx.total_positions, 1));
    ops::aux_loss_backward(dp, N, float(ops::global_parser_loss(ctx.sum_b, 0.0, count, R_,
                                                                weight_).grad_p));
    return 0;
  }
  const i64 rows = std::max<i64>(ctx.total_positions / L, B);
  ops::sequence_parser_loss_backward(dp, b, B, L, rows, R_, weight_);
  return ops::sequence_parser_loss_forward(b, p, B, L, R_);
}

}  // namespace dlcm
