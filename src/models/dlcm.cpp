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
  copt_.repr = parse_concept_repr(cfg.concept_repr, "model config");
  copt_.visibility = parse_concept_visibility(cfg.concept_visibility, "model config");
  copt_.replicate = cfg.xattn_impl == "replicate";
  copt_.concept_path = cfg.concept_path;
  copt_.smoother = cfg.smoother;
  copt_.rope = cfg.xattn_rope;
  copt_.rope_theta = cfg.rope_theta;
  auto norm = [&](const std::string& n, i64 dim) {
    Param* p = params_.add(n, {dim}, ParamGroup::Other, false);
    p->init_one = true;
    return p;
  };
  // Registration follows the reference's inventory order (python/dlcm_ref/model.py).
  tok_emb_ = params_.add("tok_embeddings.weight", {V, d}, ParamGroup::Other, true);
  BlockDims tok_dims{d, cfg.n_heads, cfg.n_kv_heads, hd, cfg.d_ff, cfg.qk_norm, cfg.norm_eps,
                     cfg.rope_theta};
  BlockDims bb_dims{dc, cfg.bb_heads, cfg.bb_kv_heads, hd, cfg.bb_d_ff, cfg.qk_norm, cfg.norm_eps,
                    cfg.rope_theta};
  // Sliding windows (SPEC 4.9) restrict the token-level stacks only, never the backbone.
  BlockDims enc_dims = tok_dims, dec_dims = tok_dims;
  enc_dims.window = cfg.enc_window;
  dec_dims.window = cfg.dec_window;
  enc_.init(params_, "encoder.layers.", cfg.enc_layers, enc_dims, ParamGroup::TokenHidden);
  enc_norm_ = norm("encoder.norm.weight", d);
  if (projected_) {
    r_wq_ = params_.add("router.wq.weight", {ds_, d}, ParamGroup::TokenHidden, true);
    r_wk_ = params_.add("router.wk.weight", {ds_, d}, ParamGroup::TokenHidden, true);
    r_wq_->init_identity = r_wk_->init_identity = true;
  }
  // Without the concept path (control) nothing of pooling and backbone runs: not registered.
  if (copt_.concept_path) {
    pool_.init(params_, "pool.w_up.weight", d, dc, copt_.repr);  // µP: by fan-in d_token
    bb_.init(params_, "backbone.layers.", cfg.bb_layers, bb_dims, ParamGroup::ConceptHidden);
    bb_norm_ = norm("backbone.norm.weight", dc);
  }
  XAttnDims xd{d, dc, cfg.x_heads, cfg.x_kv_heads, hd, cfg.x_d_ff, cfg.norm_eps};
  xattn_.init(params_, "xattn.", xd, copt_);
  dec_.init(params_, "decoder.layers.", cfg.dec_layers, dec_dims, ParamGroup::TokenHidden);
  dec_norm_ = norm("decoder.norm.weight", d);
  lm_head_ = params_.add("lm_head.weight", {V, d}, ParamGroup::Other, true);
  params_.finalize();
  head_.init(dec_norm_, lm_head_, d, V, cfg.norm_eps, cfg.logit_mult);
}

DlcmModel::Parts DlcmModel::parts() {
  return Parts{tok_emb_, &enc_, enc_norm_, r_wq_, r_wk_, ds_,   &pool_,
               &bb_,     bb_norm_, &xattn_, &dec_, &head_, &decider_};
}

void DlcmModel::reserve(i64 B, i64 L) {
  if (B <= cap_B_ && L <= cap_L_) return;
  B = std::max(B, cap_B_);
  L = std::max(L, cap_L_);
  const i64 N = B * L, d = cfg_.d_token;
  enc_.reserve(B, L);
  dec_.reserve(B, L);
  xattn_.reserve(B, L);
  head_.reserve(N);
  for (Buf* b : {&x0_, &H_, &g_out_, &g_X_, &g_H_, &g_enc_, &g_x0_}) b->assign(N * d, 0);
  for (Buf* b : {&enc_rstd_, &p_, &dp_, &aux_dp_}) b->assign(N, 0);
  rcache_.assign(N * ops::kRouterCacheStride, 0);
  if (projected_)
    for (Buf* b : {&rq_, &rk_, &g_rq_, &g_rk_}) b->assign(N * ds_, 0);
  b_.assign(N, 0);
  pos_.assign(N, 0);
  if (copt_.concept_path && copt_.prefix_rows()) {
    // one prefix row per token through W_up, the backbone and its norm
    pool_.reserve_prefix(N);
    bb_.reserve_prefix_rows(N);
    for (Buf* b : {&Zp_, &g_Zp_, &g_bbp_, &g_Cp_}) b->assign(N * cfg_.d_concept, 0);
    zp_rstd_.assign(N, 0);
    pos_p_.assign(N, 0);
    seq_p_.assign(N, 0);
  }
  cap_B_ = B;
  cap_L_ = L;
  // Concept buffers start at twice the target compression's count and grow on demand.
  reserve_concepts(B, i64(std::ceil(2.0 * L / std::max(1.0f, cfg_.target_R))));
}

void DlcmModel::reserve_concepts(i64 B, i64 Mc) {
  if (!copt_.concept_path || (B <= conc_B_ && Mc <= cap_Mc_)) return;
  B = std::max(B, conc_B_);
  // Round up so that a slowly drifting compression does not reallocate every step.
  Mc = std::min<i64>(cap_L_, (std::max(Mc, cap_Mc_) + 31) / 32 * 32);
  const i64 n = B * Mc, dc = cfg_.d_concept;
  bb_.reserve(B, Mc);
  pool_.reserve(n);
  xattn_.reserve_concepts(B, Mc);
  for (Buf* b : {&Z_, &g_Z_, &g_bb_, &g_C_}) b->assign(n * dc, 0);
  z_rstd_.assign(n, 0);
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

const float* DlcmModel::decode(const i32* tokens, const uint8_t* b, i64 B, i64 L,
                              ConceptAblation ablation, XAttnNorms* norms) {
  const i64 N = B * L, dc = cfg_.d_concept;
  prof::Section sec;
  sec.next("pooling");
  sg_.build(b, tokens, cfg_.bos_id, B, L);
  const float* Z = nullptr;
  if (copt_.concept_path) {
    const i64 Mc = sg_.Mmax;
    reserve_concepts(B, Mc);
    const i64 nc = B * Mc;
    // pooling -> C = W_up pooled [B, Mc, dc] (zero padding)
    C_ = pool_.forward(H_.data(), sg_);
    // backbone over concepts, RoPE position = concept index within the row
    sec.next("backbone");
    for (i64 i = 0; i < nc; ++i) pos_c_[i] = i32(i % Mc);
    bb_out_ = bb_.forward(C_, pos_c_.data(), B, Mc);
    ops::rmsnorm_forward(Z_.data(), z_rstd_.data(), bb_out_, bb_norm_->w, nc, dc, cfg_.norm_eps);
    Z = Z_.data();
    if (copt_.prefix_rows()) {
      // every token's own concept on its prefix: c_j(t) at concept position j = seg(t), after
      // the row's closed concepts c_0..c_{j-1} (the prefix rows of the same backbone pass)
      sec.next("pooling");
      const float* Cp = pool_.forward_prefix(H_.data(), sg_);
      sec.next("backbone");
      for (i64 n = 0; n < N; ++n) {
        pos_p_[n] = sg_.seg[n];
        seq_p_[n] = i32(n / L);
      }
      bbp_out_ = bb_.forward_prefix_rows(Cp, seq_p_.data(), pos_p_.data(), N);
      ops::rmsnorm_forward(Zp_.data(), zp_rstd_.data(), bbp_out_, bb_norm_->w, N, dc,
                           cfg_.norm_eps);
    }
  }
  // smoother (gate from p, detached unless smooth_grad), concept attention, Psi, cross FFN
  sec.next("cross-attention");
  X_ = xattn_.forward(H_.data(), Z, p_.data(), sg_, B, L,
                      copt_.prefix_rows() ? Zp_.data() : nullptr, ablation, norms);
  // decoder (token positions as in the encoder)
  sec.next("decoder");
  dec_out_ = dec_.forward(X_, pos_.data(), B, L);
  last_N_ = N;
  return dec_out_;
}

// ---- backward -------------------------------------------------------------------------------

void DlcmModel::backward(const i32* tokens, const float* g_dec_out, const float* aux_dp, i64 B,
                         i64 L) {
  const i64 N = B * L, d = cfg_.d_token, dc = cfg_.d_concept;
  const i64 Mc = sg_.Mmax, nc = B * Mc;
  prof::Section sec;
  sec.next("decoder");
  // decoder: dX
  clear(g_X_, N * d);
  dec_.backward(g_X_.data(), g_dec_out, B, L, grad_ready_);
  // router dp: the aux loss's share, plus the smoother's share when the LM loss may reach p
  // (smooth_grad).
  std::copy_n(aux_dp, N, dp_.begin());
  // cross-attention layer -> dH (residual, queries), dZ, dp
  sec.next("cross-attention");
  clear(g_H_, N * d);
  const bool prefix = copt_.concept_path && copt_.prefix_rows();
  if (copt_.concept_path) clear(g_Z_, nc * dc);
  if (prefix) clear(g_Zp_, N * dc);
  xattn_.backward(g_H_.data(), g_Z_.data(), cfg_.router.smooth_grad ? dp_.data() : nullptr,
                  g_X_.data(), B, L, prefix ? g_Zp_.data() : nullptr);
  grad_ready(xattn_.param_offset());  // every xattn.* gradient is complete
  if (copt_.concept_path) {
    // backbone norm and stack -> dC
    sec.next("backbone");
    clear(g_bb_, nc * dc);
    ops::rmsnorm_backward(g_bb_.data(), bb_norm_->g, g_Z_.data(), bb_out_, bb_norm_->w,
                          z_rstd_.data(), nc, dc);
    clear(g_C_, nc * dc);
    if (prefix) {  // the prefix rows go back through the same norm and stack
      clear(g_bbp_, N * dc);
      ops::rmsnorm_backward(g_bbp_.data(), bb_norm_->g, g_Zp_.data(), bbp_out_, bb_norm_->w,
                            zp_rstd_.data(), N, dc);
      clear(g_Cp_, N * dc);
    }
    bb_.backward(g_C_.data(), g_bb_.data(), B, Mc, grad_ready_,
                 prefix ? g_Cp_.data() : nullptr, prefix ? g_bbp_.data() : nullptr);
    // W_up and pooling -> dH
    sec.next("pooling");
    pool_.backward(g_H_.data(), g_C_.data(), sg_);
    if (prefix) pool_.backward_prefix(g_H_.data(), g_Cp_.data(), sg_);
  }
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
  s.n_rows = B;
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

LossTerms DlcmModel::loss_terms(const MicroStats& st) const {
  LossTerms t;
  double aux = 0, F = 0, G = 0, F_thresholded = 0;
  if (st.n_positions > 0) {
    const ops::AuxLoss a = ops::global_parser_loss(st.sum_b, st.sum_p, double(st.n_positions),
                                                   double(cfg_.target_R));
    // Rule routers have no auxiliary loss (F is their compression); aux_kind "sequence" is
    // the mean of the rows' L_r.
    if (decider_.is_rule())
      aux = 0;
    else if (cfg_.aux_kind == "sequence")
      aux = st.aux_rows / double(std::max<i64>(st.n_rows, 1));
    else
      aux = a.value;
    F = a.F;
    G = a.G;
    F_thresholded = double(st.n_thresholded) / double(st.n_positions);
  }
  t.aux_loss = cfg_.aux_weight * aux;
  t.fields = {{"aux", aux}, {"F", F}, {"G", G},
              {"compression", F > 0 ? 1.0 / F : 0.0},  // sampled boundaries
              {"compression_thresholded", F_thresholded > 0 ? 1.0 / F_thresholded : 0.0}};
  return t;
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

bool DlcmModel::concept_usage(const Batch& mb, ConceptUsageSums& u) {
  const i64 B = mb.B, L = mb.L, N = B * L;
  encode(mb.tokens, B, L);
  live_micro_ = -1;
  if (mb.boundaries)
    given_boundaries(b_.data(), mb);
  else
    ops::threshold_boundaries(b_.data(), p_.data(), mb.tokens, cfg_.bos_id, B, L,
                              cfg_.router.tau);
  if (i64(nll_.size()) < N) nll_.assign(N, 0);
  // The ablations first, so that the last forward (activation_rms, segments()) is the real one.
  double ce_null = 0, ce_shuffle = 0;
  if (copt_.concept_path) {
    ce_null = head_.forward_loss(decode(mb.tokens, b_.data(), B, L, ConceptAblation::Null),
                                 mb.targets, N);
    ce_shuffle = head_.forward_loss(
        decode(mb.tokens, b_.data(), B, L, ConceptAblation::Shuffle), mb.targets, N);
  }
  XAttnNorms nr;
  const double ce = head_.forward_loss(decode(mb.tokens, b_.data(), B, L,
                                              ConceptAblation::None, &nr),
                                       mb.targets, N, nll_.data());
  u.ce += ce;
  u.xo_norm += nr.xo;
  u.h_norm += nr.h;
  u.n_positions += N;
  u.n_concepts += sg_.total();
  // Without the concept path the decoder sees no concept: nothing to replace.
  u.ce_null += copt_.concept_path ? ce_null : ce;
  u.ce_shuffle += copt_.concept_path ? ce_shuffle : ce;
  // CE by position inside the concept
  for (i64 n = 0; n < N; ++n) {
    if (mb.targets[n] < 0) continue;
    const i64 r = n / L, k = n % L - sg_.start[sg_.slot(r, sg_.seg[n])];
    if (k >= i64(u.pos_count.size())) {
      u.pos_count.resize(k + 1, 0);
      u.pos_ce.resize(k + 1, 0.0);
    }
    u.pos_count[k] += 1;
    u.pos_ce[k] += nll_[n];
    u.n_targets += 1;
  }
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
  if (!copt_.concept_path)
    return {{"tok_embeddings", rms(x0_.data(), N * d)}, {"encoder", rms(enc_out_, N * d)},
            {"cross_attention", rms(X_, N * d)},       {"decoder", rms(dec_out_, N * d)}};
  return {{"tok_embeddings", rms(x0_.data(), N * d)}, {"encoder", rms(enc_out_, N * d)},
          {"concepts", concept_rms(C_)},              {"backbone", concept_rms(bb_out_)},
          {"cross_attention", rms(X_, N * d)},        {"decoder", rms(dec_out_, N * d)}};
}

double DlcmModel::flops_per_token(i64 L) const { return flops_report(cfg_, L).total(); }

}  // namespace dlcm
