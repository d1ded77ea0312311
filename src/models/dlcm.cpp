#include "models/dlcm.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/gemm.h"
#include "core/profiler.h"
#include "kernels/ops.h"
#include "models/flops.h"

namespace dlcm {

namespace {

void clear(Buf& b, i64 n) { std::memset(b.data(), 0, sizeof(float) * n); }

// y += x over n elements.
void add_into(float* y, const float* x, i64 n) {
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (i64 i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace

// Given decisions (Batch::boundaries), OR-ed with the forced ones (row start, BOS). A rule
// router ignores them: its rule (in p_, from encode) decides in training as everywhere.
void DlcmModel::given_boundaries(uint8_t* b, const Batch& mb) const {
  if (decider_.is_rule()) return decider_.threshold(b, p_.data(), mb.tokens, mb.B, mb.L, 0.5f);
  for (i64 n = 0; n < mb.B * mb.L; ++n)
    b[n] = (mb.boundaries[n] != 0 || n % mb.L == 0 || mb.tokens[n] == cfg_.bos_id) ? 1 : 0;
}

DlcmModel::DlcmModel(const ModelConfig& cfg) {
  cfg_ = cfg;
  const i64 d = cfg.d_token, dc = cfg.d_concept, V = cfg.vocab_size, hd = cfg.head_dim;
  projected_ = cfg.router.kind == "projected";
  decider_.init(cfg);
  ds_ = projected_ ? cfg.scan_dim() : d;
  xq_ = cfg.x_heads * hd;
  xkv_ = cfg.x_kv_heads * hd;
  auto norm = [&](const std::string& n, i64 dim) {
    Param* p = params_.add(n, {dim}, ParamGroup::Other, false);
    p->init_one = true;
    return p;
  };
  auto mat = [&](const std::string& n, i64 out, i64 in, ParamGroup g) {
    return params_.add(n, {out, in}, g, true);
  };
  // Registration follows the reference's inventory order (python/dlcm_ref/model.py).
  tok_emb_ = params_.add("tok_embeddings.weight", {V, d}, ParamGroup::Other, true);
  BlockDims tok_dims{d, cfg.n_heads, cfg.n_kv_heads, hd, cfg.d_ff, cfg.qk_norm, cfg.norm_eps,
                     cfg.rope_theta};
  BlockDims bb_dims{dc, cfg.bb_heads, cfg.bb_kv_heads, hd, cfg.bb_d_ff, cfg.qk_norm, cfg.norm_eps,
                    cfg.rope_theta};
  enc_.init(params_, "encoder.layers.", cfg.enc_layers, tok_dims, ParamGroup::TokenHidden);
  enc_norm_ = norm("encoder.norm.weight", d);
  if (projected_) {
    r_wq_ = mat("router.wq.weight", ds_, d, ParamGroup::TokenHidden);
    r_wk_ = mat("router.wk.weight", ds_, d, ParamGroup::TokenHidden);
    r_wq_->init_identity = r_wk_->init_identity = true;
  }
  w_up_ = mat("pool.w_up.weight", dc, d, ParamGroup::TokenHidden);  // µP: by fan-in d_token
  bb_.init(params_, "backbone.layers.", cfg.bb_layers, bb_dims, ParamGroup::ConceptHidden);
  bb_norm_ = norm("backbone.norm.weight", dc);
  x_null_ = params_.add("xattn.null_concept", {dc}, ParamGroup::Other, false);
  x_norm_ = norm("xattn.norm.weight", d);
  x_wq_ = mat("xattn.wq.weight", xq_, d, ParamGroup::TokenHidden);
  x_wk_ = mat("xattn.wk.weight", xkv_, dc, ParamGroup::ConceptHidden);  // by fan-in d_concept
  x_wv_ = mat("xattn.wv.weight", xkv_, dc, ParamGroup::ConceptHidden);
  x_wo_ = mat("xattn.wo.weight", d, xq_, ParamGroup::TokenHidden);
  x_qn_ = norm("xattn.q_norm.weight", hd);
  x_kn_ = norm("xattn.k_norm.weight", hd);
  x_ffn_norm_ = norm("xattn.ffn_norm.weight", d);
  x_w1_ = mat("xattn.ffn.w1.weight", cfg.x_d_ff, d, ParamGroup::TokenHidden);
  x_w2_ = mat("xattn.ffn.w2.weight", d, cfg.x_d_ff, ParamGroup::TokenHidden);
  x_w3_ = mat("xattn.ffn.w3.weight", cfg.x_d_ff, d, ParamGroup::TokenHidden);
  dec_.init(params_, "decoder.layers.", cfg.dec_layers, tok_dims, ParamGroup::TokenHidden);
  dec_norm_ = norm("decoder.norm.weight", d);
  lm_head_ = params_.add("lm_head.weight", {V, d}, ParamGroup::Other, true);
  params_.finalize();
  head_.init(dec_norm_, lm_head_, d, V, cfg.norm_eps, cfg.logit_mult);
}

void DlcmModel::reserve(i64 B, i64 L) {
  if (B <= cap_B_ && L <= cap_L_) return;
  B = std::max(B, cap_B_);
  L = std::max(L, cap_L_);
  const i64 N = B * L, d = cfg_.d_token, xf = cfg_.x_d_ff;
  enc_.reserve(B, L);
  dec_.reserve(B, L);
  head_.reserve(N);
  for (Buf* b : {&x0_, &H_, &hn_, &psi_, &pn_, &X_, &g_out_, &g_X_, &g_pn_, &g_psi_, &g_hn_, &g_H_,
                 &g_enc_, &g_x0_})
    b->assign(N * d, 0);
  for (Buf* b : {&enc_rstd_, &p_, &dp_, &aux_dp_, &hn_rstd_, &pn_rstd_}) b->assign(N, 0);
  rcache_.assign(N * ops::kRouterCacheStride, 0);
  if (projected_)
    for (Buf* b : {&rq_, &rk_, &g_rq_, &g_rk_}) b->assign(N * ds_, 0);
  for (Buf* b : {&qx_raw_, &qx_, &att_, &g_att_, &g_q_, &g_qraw_}) b->assign(N * xq_, 0);
  qx_rstd_.assign(N * cfg_.x_heads, 0);
  lse_.assign(N * cfg_.x_heads, 0);
  if (cfg_.xattn_impl == "replicate")
    for (Buf* b : {&krep_, &vrep_, &g_krep_, &g_vrep_}) b->assign(N * xkv_, 0);
  for (Buf* b : {&fa_, &fb_, &fh_, &g_fa_, &g_fb_, &g_fh_}) b->assign(N * xf, 0);
  b_.assign(N, 0);
  pos_.assign(N, 0);
  cap_B_ = B;
  cap_L_ = L;
  // Concept buffers start at twice the target compression's count and grow on demand.
  reserve_concepts(B, i64(std::ceil(2.0 * L / std::max(1.0f, cfg_.target_R))));
}

void DlcmModel::reserve_concepts(i64 B, i64 Mc) {
  if (B <= conc_B_ && Mc <= cap_Mc_) return;
  B = std::max(B, conc_B_);
  // Round up so that a slowly drifting compression does not reallocate every step.
  Mc = std::min<i64>(cap_L_, (std::max(Mc, cap_Mc_) + 31) / 32 * 32);
  const i64 n = B * Mc, n1 = B * (Mc + 1), d = cfg_.d_token, dc = cfg_.d_concept;
  bb_.reserve(B, Mc);
  for (Buf* b : {&pooled_, &g_pooled_}) b->assign(n * d, 0);
  for (Buf* b : {&C_, &Z_, &zs_, &g_zs_, &g_Z_, &g_bb_, &g_C_}) b->assign(n * dc, 0);
  z_rstd_.assign(n, 0);
  for (Buf* b : {&list_, &g_list_}) b->assign(n1 * dc, 0);
  for (Buf* b : {&kx_raw_, &kx_, &vx_, &g_k_, &g_kraw_, &g_v_}) b->assign(n1 * xkv_, 0);
  kx_rstd_.assign(n1 * cfg_.x_kv_heads, 0);
  pos_c_.assign(n, 0);
  conc_B_ = B;
  cap_Mc_ = Mc;
}

void DlcmModel::check_tokens(const i32* tokens, i64 N, i64 L) const {
  DLCM_CHECK(L <= cfg_.max_seq_len, "sequence length ", L, " exceeds max_seq_len ",
             cfg_.max_seq_len);
  for (i64 n = 0; n < N; ++n)
    DLCM_CHECK(tokens[n] >= 0 && tokens[n] < cfg_.vocab_size, "token id ", tokens[n],
               " at position ", n, " is outside the vocabulary [0, ", cfg_.vocab_size, ")");
}

// ---- forward --------------------------------------------------------------------------------

void DlcmModel::encode(const i32* tokens, i64 B, i64 L) {
  const i64 N = B * L, d = cfg_.d_token;
  prof::Section sec;  // benchmark breakdown (dlcm bench train --breakdown); off: a flag test
  sec.next("encoder");
  check_tokens(tokens, N, L);
  reserve(B, L);
  for (i64 n = 0; n < N; ++n) pos_[n] = i32(n % L);
  // x0 [N, d] -> encoder -> H = encoder.norm(.) [N, d]
  ops::embedding_forward(x0_.data(), tokens, tok_emb_->w, N, d);
  enc_out_ = enc_.forward(x0_.data(), pos_.data(), B, L);
  ops::rmsnorm_forward(H_.data(), enc_rstd_.data(), enc_out_, enc_norm_->w, N, d, cfg_.norm_eps);
  // router: q = Wq H, k = Wk H [N, ds] (raw: H itself) -> p [N]
  sec.next("router");
  const float* q = H_.data();
  const float* k = H_.data();
  if (projected_) {
    ops::linear_forward(rq_.data(), H_.data(), r_wq_->w, N, d, ds_);
    ops::linear_forward(rk_.data(), H_.data(), r_wk_->w, N, d, ds_);
    q = rq_.data();
    k = rk_.data();
  }
  if (decider_.is_rule())
    decider_.rule_probs(p_.data(), tokens, B, L);
  else
    ops::router_prob_forward(p_.data(), rcache_.data(), q, k, tokens, cfg_.bos_id, B, L, ds_);
}

const float* DlcmModel::decode(const i32* tokens, const uint8_t* b, i64 B, i64 L) {
  const i64 N = B * L, d = cfg_.d_token, dc = cfg_.d_concept, hd = cfg_.head_dim;
  const float eps = cfg_.norm_eps;
  prof::Section sec;
  sec.next("pooling");
  sg_.build(b, tokens, cfg_.bos_id, B, L);
  const i64 Mc = sg_.Mmax;
  reserve_concepts(B, Mc);
  const i64 nc = B * Mc, nc1 = B * (Mc + 1);
  // pooling: pooled [B, Mc, d] (zero padding) -> C = W_up pooled [B, Mc, dc]
  ops::pool_mean_forward(pooled_.data(), H_.data(), sg_, d);
  ops::linear_forward(C_.data(), pooled_.data(), w_up_->w, nc, d, dc);
  // backbone over concepts, RoPE position = concept index within the row
  sec.next("backbone");
  for (i64 i = 0; i < nc; ++i) pos_c_[i] = i32(i % Mc);
  bb_out_ = bb_.forward(C_.data(), pos_c_.data(), B, Mc);
  ops::rmsnorm_forward(Z_.data(), z_rstd_.data(), bb_out_, bb_norm_->w, nc, dc, eps);
  // smoother (gate from p, detached unless smooth_grad) -> concept list [z_null, zs...]
  sec.next("cross-attention");
  ops::smoother_forward(zs_.data(), Z_.data(), cfg_.smoother ? p_.data() : nullptr, sg_, dc);
  ops::concept_list_forward(list_.data(), x_null_->w, zs_.data(), B, Mc, dc);
  // keys/values of the list [B, Mc+1, Hkv, hd] with QK-norm on keys
  ops::linear_forward(kx_raw_.data(), list_.data(), x_wk_->w, nc1, dc, xkv_);
  ops::linear_forward(vx_.data(), list_.data(), x_wv_->w, nc1, dc, xkv_);
  ops::head_rmsnorm_forward(kx_.data(), kx_rstd_.data(), kx_raw_.data(), x_kn_->w, nc1,
                            cfg_.x_kv_heads, hd, eps);
  // queries [N, Hq, hd] from xattn.norm(H), QK-norm, no RoPE
  ops::rmsnorm_forward(hn_.data(), hn_rstd_.data(), H_.data(), x_norm_->w, N, d, eps);
  ops::linear_forward(qx_raw_.data(), hn_.data(), x_wq_->w, N, d, xq_);
  ops::head_rmsnorm_forward(qx_.data(), qx_rstd_.data(), qx_raw_.data(), x_qn_->w, N, cfg_.x_heads,
                            hd, eps);
  const float scale = 1.0f / std::sqrt(float(hd));
  sec.next("  concept attention kernel");
  if (cfg_.xattn_impl == "replicate")
    ops::concept_attention_replicate_forward(att_.data(), lse_.data(), krep_.data(), vrep_.data(),
                                             qx_.data(), kx_.data(), vx_.data(), sg_, B, L,
                                             cfg_.x_heads, cfg_.x_kv_heads, hd, scale);
  else
    ops::concept_attention_forward(att_.data(), lse_.data(), qx_.data(), kx_.data(), vx_.data(),
                                   sg_, B, L, cfg_.x_heads, cfg_.x_kv_heads, hd, scale);
  sec.next("cross-attention");
  // Psi = H + Wo att; X = Psi + w2(silu(w1 pn) * w3 pn), pn = ffn_norm(Psi)
  ops::linear_forward(psi_.data(), att_.data(), x_wo_->w, N, xq_, d);
  add_into(psi_.data(), H_.data(), N * d);
  ops::rmsnorm_forward(pn_.data(), pn_rstd_.data(), psi_.data(), x_ffn_norm_->w, N, d, eps);
  const i64 xf = cfg_.x_d_ff;
  sec.next("cross FFN");
  ops::linear_forward(fa_.data(), pn_.data(), x_w1_->w, N, d, xf);
  ops::linear_forward(fb_.data(), pn_.data(), x_w3_->w, N, d, xf);
  ops::swiglu_forward(fh_.data(), fa_.data(), fb_.data(), N * xf);
  ops::linear_forward(X_.data(), fh_.data(), x_w2_->w, N, xf, d);
  add_into(X_.data(), psi_.data(), N * d);
  // decoder (token positions as in the encoder)
  sec.next("decoder");
  dec_out_ = dec_.forward(X_.data(), pos_.data(), B, L);
  last_N_ = N;
  return dec_out_;
}

// ---- backward -------------------------------------------------------------------------------

void DlcmModel::backward(const i32* tokens, const float* g_dec_out, const float* aux_dp, i64 B,
                         i64 L) {
  const i64 N = B * L, d = cfg_.d_token, dc = cfg_.d_concept, hd = cfg_.head_dim;
  const i64 Mc = sg_.Mmax, nc = B * Mc, nc1 = B * (Mc + 1), xf = cfg_.x_d_ff;
  prof::Section sec;
  sec.next("decoder");
  // decoder: dX
  clear(g_X_, N * d);
  dec_.backward(g_X_.data(), g_dec_out, B, L, grad_ready_);
  // cross FFN: X = Psi + w2 h  ->  dPsi = dX + norm backward of (w1, w3 branches)
  sec.next("cross FFN");
  clear(g_fh_, N * xf);
  ops::linear_backward(g_fh_.data(), x_w2_->g, g_X_.data(), fh_.data(), x_w2_->w, N, xf, d);
  clear(g_fa_, N * xf);
  clear(g_fb_, N * xf);
  ops::swiglu_backward(g_fa_.data(), g_fb_.data(), g_fh_.data(), fa_.data(), fb_.data(), N * xf);
  clear(g_pn_, N * d);
  ops::linear_backward(g_pn_.data(), x_w1_->g, g_fa_.data(), pn_.data(), x_w1_->w, N, d, xf);
  ops::linear_backward(g_pn_.data(), x_w3_->g, g_fb_.data(), pn_.data(), x_w3_->w, N, d, xf);
  std::memcpy(g_psi_.data(), g_X_.data(), sizeof(float) * N * d);
  ops::rmsnorm_backward(g_psi_.data(), x_ffn_norm_->g, g_pn_.data(), psi_.data(), x_ffn_norm_->w,
                        pn_rstd_.data(), N, d);
  // Psi = H + Wo att: dH starts as dPsi (the residual)
  sec.next("cross-attention");
  std::memcpy(g_H_.data(), g_psi_.data(), sizeof(float) * N * d);
  clear(g_att_, N * xq_);
  ops::linear_backward(g_att_.data(), x_wo_->g, g_psi_.data(), att_.data(), x_wo_->w, N, xq_, d);
  // cross-attention -> dq [N, xq], dk/dv [B*(Mc+1), xkv]
  clear(g_q_, N * xq_);
  clear(g_k_, nc1 * xkv_);
  clear(g_v_, nc1 * xkv_);
  const float scale = 1.0f / std::sqrt(float(hd));
  sec.next("  concept attention kernel");
  if (cfg_.xattn_impl == "replicate")
    ops::concept_attention_replicate_backward(g_q_.data(), g_k_.data(), g_v_.data(),
                                              g_krep_.data(), g_vrep_.data(), g_att_.data(),
                                              att_.data(), lse_.data(), qx_.data(), krep_.data(),
                                              vrep_.data(), sg_, B, L, cfg_.x_heads,
                                              cfg_.x_kv_heads, hd, scale);
  else
    ops::concept_attention_backward(g_q_.data(), g_k_.data(), g_v_.data(), g_att_.data(),
                                    att_.data(), lse_.data(), qx_.data(), kx_.data(), vx_.data(),
                                    sg_, B, L, cfg_.x_heads, cfg_.x_kv_heads, hd, scale);
  // queries: QK-norm, Wq, xattn.norm -> dH
  sec.next("cross-attention");
  clear(g_qraw_, N * xq_);
  ops::head_rmsnorm_backward(g_qraw_.data(), x_qn_->g, g_q_.data(), qx_raw_.data(), x_qn_->w,
                             qx_rstd_.data(), N, cfg_.x_heads, hd);
  clear(g_hn_, N * d);
  ops::linear_backward(g_hn_.data(), x_wq_->g, g_qraw_.data(), hn_.data(), x_wq_->w, N, d, xq_);
  ops::rmsnorm_backward(g_H_.data(), x_norm_->g, g_hn_.data(), H_.data(), x_norm_->w,
                        hn_rstd_.data(), N, d);
  // keys/values -> d list -> d z_null, d zs
  clear(g_kraw_, nc1 * xkv_);
  ops::head_rmsnorm_backward(g_kraw_.data(), x_kn_->g, g_k_.data(), kx_raw_.data(), x_kn_->w,
                             kx_rstd_.data(), nc1, cfg_.x_kv_heads, hd);
  clear(g_list_, nc1 * dc);
  ops::linear_backward(g_list_.data(), x_wk_->g, g_kraw_.data(), list_.data(), x_wk_->w, nc1, dc,
                       xkv_);
  ops::linear_backward(g_list_.data(), x_wv_->g, g_v_.data(), list_.data(), x_wv_->w, nc1, dc,
                       xkv_);
  clear(g_zs_, nc * dc);
  ops::concept_list_backward(x_null_->g, g_zs_.data(), g_list_.data(), B, Mc, dc);
  grad_ready(x_null_->offset);  // every xattn.* gradient is complete
  // router dp: the aux loss's share, plus the smoother's share when the LM loss may reach p
  // (smooth_grad).
  std::copy_n(aux_dp, N, dp_.begin());
  // smoother -> dZ; backbone norm and stack -> dC
  clear(g_Z_, nc * dc);
  ops::smoother_backward(g_Z_.data(),
                         cfg_.router.smooth_grad && cfg_.smoother ? dp_.data() : nullptr,
                         g_zs_.data(), zs_.data(), Z_.data(), cfg_.smoother ? p_.data() : nullptr,
                         sg_, dc);
  sec.next("backbone");
  clear(g_bb_, nc * dc);
  ops::rmsnorm_backward(g_bb_.data(), bb_norm_->g, g_Z_.data(), bb_out_, bb_norm_->w,
                        z_rstd_.data(), nc, dc);
  clear(g_C_, nc * dc);
  bb_.backward(g_C_.data(), g_bb_.data(), B, Mc, grad_ready_);
  // W_up and mean pooling -> dH
  sec.next("pooling");
  clear(g_pooled_, nc * d);
  ops::linear_backward(g_pooled_.data(), w_up_->g, g_C_.data(), pooled_.data(), w_up_->w, nc, d,
                       dc);
  ops::pool_mean_backward(g_H_.data(), g_pooled_.data(), sg_, d);
  // router: dp -> dq, dk -> dH (raw: q = k = H, so both land in dH directly)
  sec.next("router");
  if (projected_) {
    clear(g_rq_, N * ds_);
    clear(g_rk_, N * ds_);
    ops::router_prob_backward(g_rq_.data(), g_rk_.data(), dp_.data(), rcache_.data(), rq_.data(),
                              rk_.data(), tokens, cfg_.bos_id, B, L, ds_);
    ops::linear_backward(g_H_.data(), r_wq_->g, g_rq_.data(), H_.data(), r_wq_->w, N, d, ds_);
    ops::linear_backward(g_H_.data(), r_wk_->g, g_rk_.data(), H_.data(), r_wk_->w, N, d, ds_);
  } else if (!decider_.is_rule()) {  // a rule's p has no gradient
    ops::router_prob_backward(g_H_.data(), g_H_.data(), dp_.data(), rcache_.data(), H_.data(),
                              H_.data(), tokens, cfg_.bos_id, B, L, ds_);
  }
  // encoder norm and stack, embeddings
  sec.next("encoder");
  clear(g_enc_, N * d);
  ops::rmsnorm_backward(g_enc_.data(), enc_norm_->g, g_H_.data(), enc_out_, enc_norm_->w,
                        enc_rstd_.data(), N, d);
  clear(g_x0_, N * d);
  enc_.backward(g_x0_.data(), g_enc_.data(), B, L, grad_ready_);
  ops::embedding_backward(tok_emb_->g, g_x0_.data(), tokens, N, d);
}

// ---- the LanguageModel interface ------------------------------------------------------------

double DlcmModel::prepare_step(const std::vector<Batch>& micro, const StepContext& ctx) {
  const i64 K = micro.size();
  step_b_.resize(K);
  double sum_b = 0;
  // In reverse, so that micro-batch 0's encoder activations are still live when the trainer
  // starts its backward passes with it (no second encoder pass when K = 1).
  for (i64 k = K - 1; k >= 0; --k) {
    const Batch& mb = micro[k];
    const i64 N = mb.B * mb.L;
    encode(mb.tokens, mb.B, mb.L);
    prof::Scope ps("router");
    auto& b = step_b_[k];
    b.resize(N);
    if (mb.boundaries) {
      given_boundaries(b.data(), mb);
    } else {
      decider_.sample(b.data(), p_.data(), mb.tokens, mb.B, mb.L, cfg_.router.alpha, ctx.seed,
                      uint64_t(ctx.step), mb.row0);
    }
    for (i64 n = 0; n < N; ++n) sum_b += b[n];
    live_step_ = ctx.step;
    live_micro_ = k;
    live_tokens_ = mb.tokens;
  }
  return sum_b;
}

MicroStats DlcmModel::train_micro(const Batch& mb, i64 index, const StepContext& ctx) {
  const i64 B = mb.B, L = mb.L, N = B * L, d = cfg_.d_token;
  DLCM_CHECK(index >= 0 && index < i64(step_b_.size()) && i64(step_b_[index].size()) == N,
             "internal: DlcmModel::train_micro before prepare_step for micro-batch ", index);
  if (!(live_step_ == ctx.step && live_micro_ == index && live_tokens_ == mb.tokens))
    encode(mb.tokens, B, L);  // same inputs, same weights: the same p as in prepare_step
  live_micro_ = -1;
  const uint8_t* b = step_b_[index].data();
  const float* out = decode(mb.tokens, b, B, L);
  clear(g_out_, N * d);
  MicroStats s;
  {
    prof::Scope ps("head");
    s.ce_sum = head_.forward_backward(g_out_.data(), out, mb.targets, N,
                                      1.0f / float(std::max<i64>(ctx.total_targets, 1)));
  }
  grad_ready(dec_norm_->offset);  // decoder.norm and lm_head (the block's tail) are complete
  // Auxiliary loss (Global Parser over the whole step, or per sequence; none for rules).
  s.aux_rows = decider_.aux_grad(aux_dp_.data(), b, p_.data(), B, L, ctx);
  backward(mb.tokens, g_out_.data(), aux_dp_.data(), B, L);
  for (i64 n = 0; n < N; ++n) {
    s.n_targets += mb.targets[n] >= 0;
    s.sum_b += b[n];
    s.sum_p += p_[n];
    s.n_thresholded += (n % L == 0 || mb.tokens[n] == cfg_.bos_id ||
                        decider_.decide(p_[n], cfg_.router.tau));
  }
  s.n_positions = N;
  s.n_concepts = sg_.total();
  return s;
}

MicroStats DlcmModel::eval_micro(const Batch& mb, float* row_loss) {
  const i64 B = mb.B, L = mb.L, N = B * L;
  encode(mb.tokens, B, L);
  live_micro_ = -1;
  if (mb.boundaries)
    given_boundaries(b_.data(), mb);
  else
    decider_.threshold(b_.data(), p_.data(), mb.tokens, B, L, cfg_.router.tau);
  const float* out = decode(mb.tokens, b_.data(), B, L);
  MicroStats s;
  s.ce_sum = head_.forward_loss(out, mb.targets, N, row_loss);
  for (i64 n = 0; n < N; ++n) {
    s.n_targets += mb.targets[n] >= 0;
    s.sum_b += b_[n];
    s.sum_p += p_[n];
  }
  s.n_positions = N;
  s.n_concepts = sg_.total();
  s.n_thresholded = s.n_concepts;
  return s;
}

void DlcmModel::logits(const i32* tokens, i64 B, i64 L, float* out) {
  encode(tokens, B, L);
  live_micro_ = -1;
  decider_.threshold(b_.data(), p_.data(), tokens, B, L, cfg_.router.tau);
  const float* h = decode(tokens, b_.data(), B, L);
  head_.logits(h, B * L, out);
}

void DlcmModel::logits_at(const i32* tokens, i64 B, i64 L, const i64* pos, i64 n, float* out) {
  encode(tokens, B, L);
  live_micro_ = -1;
  decider_.threshold(b_.data(), p_.data(), tokens, B, L, cfg_.router.tau);
  const float* h = decode(tokens, b_.data(), B, L);
  const i64 d = cfg_.d_token;
  if (i64(picked_.size()) < n * d) picked_.resize(n * d);
  for (i64 i = 0; i < n; ++i) {
    DLCM_CHECK(pos[i] >= 0 && pos[i] < B * L, "logits_at: position ", pos[i], " outside [0, ",
               B * L, ")");
    std::memcpy(picked_.data() + i * d, h + pos[i] * d, sizeof(float) * d);
  }
  head_.logits(picked_.data(), n, out);  // n <= B * L rows: within the reserved head
}

bool DlcmModel::boundaries(const i32* tokens, i64 B, i64 L, float* p, uint8_t* b, float tau) {
  encode(tokens, B, L);
  live_micro_ = -1;
  decider_.threshold(b, p_.data(), tokens, B, L, tau < 0 ? cfg_.router.tau : tau);
  std::memcpy(p, p_.data(), sizeof(float) * B * L);
  return true;
}

std::vector<std::pair<std::string, double>> DlcmModel::activation_rms() const {
  if (!dec_out_) return {};
  const i64 N = last_N_, d = cfg_.d_token, dc = cfg_.d_concept;
  // Concept-level RMS over the real concepts only (padded slots are zero rows).
  auto concept_rms = [&](const float* x) {
    double ss = 0;
    i64 n = 0;
    for (i64 r = 0; r < sg_.B; ++r)
      for (i64 j = 0; j < sg_.count[r]; ++j) {
        const float* row = x + (r * sg_.Mmax + j) * dc;
        for (i64 u = 0; u < dc; ++u) ss += double(row[u]) * row[u];
        n += dc;
      }
    return n > 0 ? std::sqrt(ss / double(n)) : 0.0;
  };
  return {{"tok_embeddings", rms(x0_.data(), N * d)}, {"encoder", rms(enc_out_, N * d)},
          {"concepts", concept_rms(C_.data())},       {"backbone", concept_rms(bb_out_)},
          {"cross_attention", rms(X_.data(), N * d)}, {"decoder", rms(dec_out_, N * d)}};
}

double DlcmModel::flops_per_token(i64 L) const { return flops_report(cfg_, L).total(); }

}  // namespace dlcm
