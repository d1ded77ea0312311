#include "models/baseline.h"

#include <cstring>

#include "core/profiler.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "models/flops.h"

namespace dlcm {

BaselineModel::BaselineModel(const ModelConfig& cfg) {
  cfg_ = cfg;
  const i64 d = cfg.d_token, V = cfg.vocab_size;
  tok_emb_ = params_.add("tok_embeddings.weight", {V, d}, ParamGroup::Other, true);
  BlockDims dims{d, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.qk_norm,
                 cfg.norm_eps, cfg.rope_theta};
  extras_ = cfg.baseline_extras;
  if (extras_) {
    // Registration follows the reference's inventory order (python/dlcm_ref/model.py).
    auto norm = [&](const std::string& n) {
      Param* p = params_.add(n, {d}, ParamGroup::Other, false);
      p->init_one = true;
      return p;
    };
    const i64 k = cfg.layers_pre(), xf = cfg.x_d_ff;
    layers_.init(params_, "encoder.layers.", k, dims, ParamGroup::TokenHidden);
    mid_norm_ = norm("encoder.norm.weight");
    ffn_norm_ = norm("xattn.ffn_norm.weight");
    w1_ = params_.add("xattn.ffn.w1.weight", {xf, d}, ParamGroup::TokenHidden, true);
    w2_ = params_.add("xattn.ffn.w2.weight", {d, xf}, ParamGroup::TokenHidden, true);
    w3_ = params_.add("xattn.ffn.w3.weight", {xf, d}, ParamGroup::TokenHidden, true);
    post_.init(params_, "decoder.layers.", cfg.n_layers - k, dims, ParamGroup::TokenHidden);
  } else {
    layers_.init(params_, "layers.", cfg.n_layers, dims, ParamGroup::TokenHidden);
  }
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
  if (extras_) {
    const i64 xf = cfg_.x_d_ff;
    post_.reserve(B, L);
    for (Buf* b : {&H_, &pn_, &X_, &g_X_, &g_pn_, &g_H_, &g_mid_}) b->assign(N * d, 0);
    for (Buf* b : {&h_rstd_, &pn_rstd_}) b->assign(N, 0);
    for (Buf* b : {&fa_, &fb_, &fh_, &g_fa_, &g_fb_, &g_fh_}) b->assign(N * xf, 0);
  }
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
  last_out_ = layers_.forward(x_.data(), pos_.data(), B, L);
  if (extras_) {
    mid_ = last_out_;
    extras_forward(X_.data(), H_.data(), h_rstd_.data(), pn_.data(), pn_rstd_.data(), fa_.data(),
                   fb_.data(), fh_.data(), mid_, N);
    last_out_ = post_.forward(X_.data(), pos_.data(), B, L);
  }
  last_rows_ = N;
  return last_out_;
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
  grad_ready(norm_->offset);  // norm and lm_head (the block's tail) are complete
  sec.next("layers");
  std::memset(g_x_.data(), 0, sizeof(float) * N * d);
  if (extras_) {
    std::memset(g_X_.data(), 0, sizeof(float) * N * d);
    post_.backward(g_X_.data(), g_out_.data(), b.B, b.L, grad_ready_);
    extras_backward(g_mid_.data(), g_X_.data(), mid_, N);
    grad_ready(mid_norm_->offset);  // encoder.norm and xattn.ffn* are complete
    layers_.backward(g_x_.data(), g_mid_.data(), b.B, b.L, grad_ready_);
  } else {
    layers_.backward(g_x_.data(), g_out_.data(), b.B, b.L, grad_ready_);
  }
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

void BaselineModel::extras_forward(float* X, float* H, float* h_rstd, float* pn, float* pn_rstd,
                                   float* fa, float* fb, float* fh, const float* mid,
                                   i64 N) const {
  const i64 d = cfg_.d_token, xf = cfg_.x_d_ff;
  const float eps = cfg_.norm_eps;
  // H = encoder.norm(mid); X = H + w2(silu(w1 pn) * w3 pn), pn = xattn.ffn_norm(H)
  ops::rmsnorm_forward(H, h_rstd, mid, mid_norm_->w, N, d, eps);
  ops::rmsnorm_forward(pn, pn_rstd, H, ffn_norm_->w, N, d, eps);
  float* y[2] = {fa, fb};
  const float* W[2] = {w1_->w, w3_->w};
  const i64 out[2] = {xf, xf};
  ops::linear_forward_multi(y, pn, W, N, d, out, 2);
  ops::swiglu_forward(fh, fa, fb, N * xf);
  ops::linear_forward(X, fh, w2_->w, N, xf, d);
  ops::add_inplace(X, H, N * d);
}

void BaselineModel::extras_backward(float* dmid, const float* dX, const float* mid, i64 N) {
  const i64 d = cfg_.d_token, xf = cfg_.x_d_ff;
  // the scratch gradients are written by their first producer (no clearing pass)
  ops::linear_backward(g_fh_.data(), w2_->g, dX, fh_.data(), w2_->w, N, xf, d, nullptr, false);
  ops::swiglu_backward(g_fa_.data(), g_fb_.data(), g_fh_.data(), fa_.data(), fb_.data(), N * xf,
                       false);
  ops::linear_backward(g_pn_.data(), w1_->g, g_fa_.data(), pn_.data(), w1_->w, N, d, xf, nullptr,
                       false);
  ops::linear_backward(g_pn_.data(), w3_->g, g_fb_.data(), pn_.data(), w3_->w, N, d, xf);
  // dH = dX (the residual) + the ffn_norm branch; dmid through encoder.norm
  // (each written in one pass, without clearing)
  ops::rmsnorm_backward(g_H_.data(), ffn_norm_->g, g_pn_.data(), H_.data(), ffn_norm_->w,
                        pn_rstd_.data(), N, d, dX, false);
  ops::rmsnorm_backward(dmid, mid_norm_->g, g_H_.data(), mid, mid_norm_->w, h_rstd_.data(), N, d,
                        nullptr, false);
}

// Streaming: one KV cache for the layer stack (two with baseline_extras, whose extra block is
// per token); the embedding and the head are per-token maps.
class BaselineStream final : public InferenceStream {
 public:
  BaselineStream(BaselineModel& m, i64 max_seqs, i64 max_len)
      : InferenceStream(max_seqs, max_len, m.cfg_.vocab_size), m_(m) {
    const i64 d = m.cfg_.d_token;
    cache_ = m.layers_.make_cache(max_seqs, max_len);
    rows_ = stream_rows(max_seqs, max_len);
    m.layers_.reserve_infer(rows_);
    if (m.extras_) {
      post_cache_ = m.post_.make_cache(max_seqs, max_len);
      m.post_.reserve_infer(rows_);
      m.post_.share_infer(m.layers_);  // run one after the other: one scratch
      for (Buf* b : {&H_, &pn_, &X_}) b->assign(rows_ * d, 0);
      for (Buf* b : {&h_rstd_, &pn_rstd_}) b->assign(rows_, 0);
      for (Buf* b : {&fa_, &fb_, &fh_}) b->assign(rows_ * m.cfg_.x_d_ff, 0);
    }
    x_.assign(rows_ * d, 0);
    last_.assign(max_seqs * d, 0);
    xn_.assign(rows_ * d, 0);
    rstd_.assign(rows_, 0);
    chunks_.reserve(max_seqs);
  }

 protected:
  void do_reset(i64 seq) override {
    cache_.reset(seq);
    if (m_.extras_) post_cache_.reset(seq);
  }

  void do_prefill(const PrefillItem* items, i64 n_items, float* logits, bool all_logits) override {
    prefill_in_groups(
        items, n_items, logits, all_logits, rows_, m_.cfg_.d_token, last_.data(),
        [&](const PrefillItem* it, i64 n, bool last_only) { return run(it, n, last_only); },
        [&](const float* h, i64 N, float* out) { head(h, N, out); });
  }

  void do_step(const i64* seqs, const i32* tokens, i64 n, float* logits) override {
    std::vector<PrefillItem> items(n);
    for (i64 i = 0; i < n; ++i) items[i] = {seqs[i], tokens + i, 1};
    head(run(items.data(), n, false), n, logits);
  }

 private:
  // Embeds the items' tokens as consecutive rows and runs the cached stack over them; with
  // last_only the output holds each item's last position only ([n, d]).
  const float* run(const PrefillItem* items, i64 n, bool last_only) {
    const i64 d = m_.cfg_.d_token;
    chunks_.clear();
    i64 R = 0;
    for (i64 i = 0; i < n; ++i) {
      ops::embedding_forward(x_.data() + R * d, items[i].tokens, m_.tok_emb_->w, items[i].n, d);
      chunks_.push_back({items[i].seq, items[i].n});
      R += items[i].n;
    }
    prof::Scope ps("stream layers");
    const float* mid =
        m_.layers_.forward_cached(x_.data(), chunks_.data(), n, cache_, last_only && !m_.extras_);
    if (!m_.extras_) return mid;
    m_.extras_forward(X_.data(), H_.data(), h_rstd_.data(), pn_.data(), pn_rstd_.data(),
                      fa_.data(), fb_.data(), fh_.data(), mid, R);
    return m_.post_.forward_cached(X_.data(), chunks_.data(), n, post_cache_, last_only);
  }
  void head(const float* h, i64 N, float* out) {
    prof::Scope ps("stream head");
    m_.head_.logits(h, N, out, xn_.data(), rstd_.data());
  }

  BaselineModel& m_;
  KVCache cache_, post_cache_;
  i64 rows_ = 0;
  Buf x_, last_, xn_, rstd_;
  Buf H_, h_rstd_, pn_, pn_rstd_, fa_, fb_, fh_, X_;  // baseline_extras, per new row
  std::vector<CacheChunk> chunks_;
};

std::unique_ptr<InferenceStream> BaselineModel::new_stream(const StreamOptions& o) {
  auto s = std::make_unique<BaselineStream>(*this, o.max_seqs, stream_len(o));
  s->apply_options(params(), o);
  return s;
}

std::vector<std::pair<std::string, double>> BaselineModel::activation_rms() const {
  if (!last_out_) return {};
  const i64 n = last_rows_ * cfg_.d_token;
  return {{"tok_embeddings", rms(x_.data(), n)}, {"layers", rms(last_out_, n)}};
}

void BaselineModel::logits_at(const i32* tokens, i64 B, i64 L, const i64* pos, i64 n, float* out) {
  const float* h = run_forward(tokens, B, L);
  const i64 d = cfg_.d_token;
  if (i64(picked_.size()) < n * d) picked_.resize(n * d);
  for (i64 i = 0; i < n; ++i) {
    DLCM_CHECK(pos[i] >= 0 && pos[i] < B * L, "logits_at: position ", pos[i], " outside [0, ", B * L, ")");
    std::memcpy(picked_.data() + i * d, h + pos[i] * d, sizeof(float) * d);
  }
  head_.logits(picked_.data(), n, out);  // n <= B * L rows: within the reserved head
}

double BaselineModel::flops_per_token(i64 L) const { return flops_report(cfg_, L).total(); }

}  // namespace dlcm
