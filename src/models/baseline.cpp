#include "models/baseline.h"

#include <cstring>

#include "core/profiler.h"
#include "kernels/ops.h"
#include "models/flops.h"

namespace dlcm {

BaselineModel::BaselineModel(const ModelConfig& cfg) {
  cfg_ = cfg;
  const i64 d = cfg.d_token, V = cfg.vocab_size;
  tok_emb_ = params_.add("tok_embeddings.weight", {V, d}, ParamGroup::Other, true);
  BlockDims dims{d, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.qk_norm,
                 cfg.norm_eps, cfg.rope_theta};
  layers_.init(params_, "layers.", cfg.n_layers, dims, ParamGroup::TokenHidden);
  norm_ = params_.add("norm.weight", {d}, ParamGroup::Other, false);
  norm_->init_one = true;
  lm_head_ = params_.add("lm_head.weight", {V, d}, ParamGroup::Other, true);
  params_.finalize();
  head_.init(norm_, lm_head_, d, V, cfg.norm_eps, cfg.logit_mult);
}

void BaselineModel::reserve(i64 B, i64 L) {
  if (B <= cap_B_ && L <= cap_L_) return;
  B = std::max(B, cap_B_);
  L = std::max(L, cap_L_);
  const i64 N = B * L, d = cfg_.d_token;
  layers_.reserve(B, L);
  head_.reserve(N);
  x_.assign(N * d, 0);
  g_x_.assign(N * d, 0);
  g_out_.assign(N * d, 0);
  pos_.assign(N, 0);
  cap_B_ = B;
  cap_L_ = L;
}

const float* BaselineModel::run_forward(const i32* tokens, i64 B, i64 L) {
  DLCM_CHECK(L <= cfg_.max_seq_len, "sequence length ", L, " exceeds max_seq_len ",
             cfg_.max_seq_len);
  reserve(B, L);
  const i64 N = B * L;
  prof::Section sec;  // benchmark breakdown (dlcm bench train --breakdown)
  sec.next("embedding");
  for (i64 n = 0; n < N; ++n) {
    DLCM_CHECK(tokens[n] >= 0 && tokens[n] < cfg_.vocab_size, "token id ", tokens[n],
               " at position ", n, " is outside the vocabulary [0, ", cfg_.vocab_size, ")");
    pos_[n] = i32(n % L);
  }
  ops::embedding_forward(x_.data(), tokens, tok_emb_->w, N, cfg_.d_token);
  sec.next("layers");
  return layers_.forward(x_.data(), pos_.data(), B, L);
}

MicroStats BaselineModel::train_micro(const Batch& b, i64, const StepContext& ctx) {
  const i64 N = b.B * b.L, d = cfg_.d_token;
  const float* out = run_forward(b.tokens, b.B, b.L);
  prof::Section sec;
  sec.next("head");
  std::memset(g_out_.data(), 0, sizeof(float) * N * d);
  MicroStats s;
  s.ce_sum = head_.forward_backward(g_out_.data(), out, b.targets, N,
                                    1.0f / float(std::max<i64>(ctx.total_targets, 1)));
  sec.next("layers");
  std::memset(g_x_.data(), 0, sizeof(float) * N * d);
  layers_.backward(g_x_.data(), g_out_.data(), b.B, b.L);
  sec.next("embedding");
  ops::embedding_backward(tok_emb_->g, g_x_.data(), b.tokens, N, d);
  for (i64 n = 0; n < N; ++n) s.n_targets += b.targets[n] >= 0;
  s.n_positions = N;
  return s;
}

MicroStats BaselineModel::eval_micro(const Batch& b, float* row_loss) {
  const i64 N = b.B * b.L;
  const float* out = run_forward(b.tokens, b.B, b.L);
  MicroStats s;
  s.ce_sum = head_.forward_loss(out, b.targets, N, row_loss);
  for (i64 n = 0; n < N; ++n) s.n_targets += b.targets[n] >= 0;
  s.n_positions = N;
  return s;
}

void BaselineModel::logits(const i32* tokens, i64 B, i64 L, float* out) {
  const float* h = run_forward(tokens, B, L);
  head_.logits(h, B * L, out);
}

double BaselineModel::flops_per_token(i64 L) const { return flops_report(cfg_, L).total(); }

}  // namespace dlcm
