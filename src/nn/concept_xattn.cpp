#include "nn/concept_xattn.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/parallel.h"
#include "core/profiler.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "nn/transformer.h"

namespace dlcm {

namespace {

void clear(Buf& b, i64 n) { std::memset(b.data(), 0, sizeof(float) * n); }

void grow(Buf& b, i64 n) {
  if (i64(b.size()) < n) b.assign(n, 0);
}

}  // namespace

ConceptRepr parse_concept_repr(const std::string& s, const std::string& what) {
  if (s == "mean") return ConceptRepr::Mean;
  if (s == "first") return ConceptRepr::First;
  if (s == "prefix_mean") return ConceptRepr::PrefixMean;
  throw Error(what + ": 'concept_repr' must be \"mean\", \"first\" or \"prefix_mean\", got \"" +
              s + "\"");
}

ConceptVisibility parse_concept_visibility(const std::string& s, const std::string& what) {
  if (s == "shifted") return ConceptVisibility::Shifted;
  if (s == "inclusive") return ConceptVisibility::Inclusive;
  throw Error(what + ": 'concept_visibility' must be \"shifted\" or \"inclusive\", got \"" + s +
              "\"");
}

// ---- ConceptPool ----------------------------------------------------------------------------

void ConceptPool::init(ParamStore& ps, const std::string& name, i64 d, i64 dc, ConceptRepr repr) {
  w_up_ = ps.add(name, {dc, d}, ParamGroup::TokenHidden, true);
  d_ = d;
  dc_ = dc;
  repr_ = repr;
}

void ConceptPool::reserve(i64 n) {
  if (n <= cap_) return;
  for (Buf* b : {&pooled_, &g_pooled_}) b->assign(n * d_, 0);
  C_.assign(n * dc_, 0);
  cap_ = n;
}

const float* ConceptPool::forward(const float* H, const ops::Segments& sg) {
  const i64 nc = sg.B * sg.Mmax;
  DLCM_CHECK(nc <= cap_, "internal: ConceptPool::forward before reserve (", nc, " > ", cap_, ")");
  H_ = H;
  // pooled [B, Mc, d] (zero padding) -> C = W_up pooled [B, Mc, dc]
  if (repr_ == ConceptRepr::First)
    ops::pool_first_forward(pooled_.data(), H, sg, d_);
  else
    ops::pool_mean_forward(pooled_.data(), H, sg, d_);
  ops::linear_forward(C_.data(), pooled_.data(), w_up_->w, nc, d_, dc_);
  return C_.data();
}

void ConceptPool::backward(float* dH, const float* dC, const ops::Segments& sg) {
  const i64 nc = sg.B * sg.Mmax;
  clear(g_pooled_, nc * d_);
  ops::linear_backward(g_pooled_.data(), w_up_->g, dC, pooled_.data(), w_up_->w, nc, d_, dc_);
  if (repr_ == ConceptRepr::First)
    ops::pool_first_backward(dH, g_pooled_.data(), sg, d_);
  else
    ops::pool_mean_backward(dH, g_pooled_.data(), sg, d_);
}

void ConceptPool::reserve_prefix(i64 n) {
  if (n <= cap_prefix_) return;
  for (Buf* b : {&ppooled_, &g_ppooled_}) b->assign(n * d_, 0);
  Cp_.assign(n * dc_, 0);
  cap_prefix_ = n;
}

const float* ConceptPool::forward_prefix(const float* H, const ops::Segments& sg) {
  const i64 N = sg.B * sg.L;
  DLCM_CHECK(N <= cap_prefix_, "internal: ConceptPool::forward_prefix before reserve_prefix");
  H_ = H;
  // prefix means [N, d] -> Cp = W_up prefix means [N, dc]
  ops::pool_prefix_mean_forward(ppooled_.data(), H, sg, d_);
  ops::linear_forward(Cp_.data(), ppooled_.data(), w_up_->w, N, d_, dc_);
  return Cp_.data();
}

void ConceptPool::backward_prefix(float* dH, const float* dCp, const ops::Segments& sg) {
  const i64 N = sg.B * sg.L;
  clear(g_ppooled_, N * d_);
  ops::linear_backward(g_ppooled_.data(), w_up_->g, dCp, ppooled_.data(), w_up_->w, N, d_, dc_);
  ops::pool_prefix_mean_backward(dH, g_ppooled_.data(), sg, d_);
}

void ConceptPool::project(float* C, const float* pooled, i64 n) const {
  ops::linear_forward(C, pooled, w_up_->w, n, d_, dc_);
}

// ---- ConceptCrossAttention: parameters and buffers ------------------------------------------

void ConceptCrossAttention::init(ParamStore& ps, const std::string& prefix, const XAttnDims& dims,
                                 const ConceptOptions& opt) {
  DLCM_CHECK(!(opt.prefix_rows() && opt.replicate),
             "model config: 'xattn_impl' \"replicate\" is not implemented for 'concept_repr' "
             "\"prefix_mean\" with 'concept_visibility' \"inclusive\" (a token's own concept "
             "differs per token, so no replicated K/V serves a causal kernel); use \"compact\"");
  dims_ = dims;
  opt_ = opt;
  const i64 d = dims.d, dc = dims.dc, hd = dims.head_dim;
  auto norm = [&](const std::string& n, i64 dim) {
    Param* p = ps.add(prefix + n, {dim}, ParamGroup::Other, false);
    p->init_one = true;
    return p;
  };
  auto mat = [&](const std::string& n, i64 out, i64 in, ParamGroup g) {
    return ps.add(prefix + n, {out, in}, g, true);
  };
  if (opt.concept_path) {
    null_ = ps.add(prefix + "null_concept", {dc}, ParamGroup::Other, false);
    norm_ = norm("norm.weight", d);
    wq_ = mat("wq.weight", dims.q_dim(), d, ParamGroup::TokenHidden);
    wk_ = mat("wk.weight", dims.kv_dim(), dc, ParamGroup::ConceptHidden);  // by fan-in d_concept
    wv_ = mat("wv.weight", dims.kv_dim(), dc, ParamGroup::ConceptHidden);
    wo_ = mat("wo.weight", d, dims.q_dim(), ParamGroup::TokenHidden);
    qn_ = norm("q_norm.weight", hd);
    kn_ = norm("k_norm.weight", hd);
  }
  ffn_norm_ = norm("ffn_norm.weight", d);
  w1_ = mat("ffn.w1.weight", dims.d_ff, d, ParamGroup::TokenHidden);
  w2_ = mat("ffn.w2.weight", d, dims.d_ff, ParamGroup::TokenHidden);
  w3_ = mat("ffn.w3.weight", dims.d_ff, d, ParamGroup::TokenHidden);
}

i64 ConceptCrossAttention::param_offset() const {
  return opt_.concept_path ? null_->offset : ffn_norm_->offset;
}

void ConceptCrossAttention::reserve(i64 B, i64 L) {
  if (B <= cap_B_ && L <= cap_L_) return;
  B = std::max(B, cap_B_);
  L = std::max(L, cap_L_);
  const i64 N = B * L, d = dims_.d, xf = dims_.d_ff, xq = dims_.q_dim(), xkv = dims_.kv_dim();
  for (Buf* b : {&psi_, &pn_, &X_, &g_pn_, &g_psi_}) b->assign(N * d, 0);
  pn_rstd_.assign(N, 0);
  for (Buf* b : {&fa_, &fb_, &fh_, &g_fa_, &g_fb_, &g_fh_}) b->assign(N * xf, 0);
  if (opt_.concept_path) {
    for (Buf* b : {&hn_, &g_hn_}) b->assign(N * d, 0);
    hn_rstd_.assign(N, 0);
    for (Buf* b : {&qx_raw_, &qx_, &att_, &g_att_, &g_q_, &g_qraw_}) b->assign(N * xq, 0);
    qx_rstd_.assign(N * dims_.n_heads, 0);
    lse_.assign(N * dims_.n_heads, 0);
    // inclusive replication adds one leading z_null position per row
    const i64 Lr = L + (opt_.inclusive() ? 1 : 0);
    const i64 w = opt_.rope ? 2 : 1;  // xattn_rope: augmented heads
    if (opt_.replicate)
      for (Buf* b : {&krep_, &vrep_, &g_krep_, &g_vrep_}) b->assign(B * Lr * xkv * w, 0);
    if (opt_.prefix_rows()) {
      for (Buf* b : {&zso_, &g_zso_}) b->assign(N * dims_.dc, 0);
      for (Buf* b : {&ko_raw_, &ko_, &vo_, &g_ko_, &g_koraw_, &g_vo_}) b->assign(N * xkv, 0);
      ko_rstd_.assign(N * dims_.n_kv_heads, 0);
      if (opt_.rope)
        for (Buf* b : {&koa_, &voa_, &g_koa_, &g_voa_}) b->assign(N * xkv * 2, 0);
    }
    if (opt_.rope) {
      for (Buf* b : {&qa_, &atta_, &g_qa_, &g_atta_}) b->assign(N * xq * 2, 0);
      grow(rot_, N * std::max(xq, xkv));
      tpos_.assign(N, 0);
      opos_.assign(N, 0);
    }
  }
  cap_B_ = B;
  cap_L_ = L;
}

void ConceptCrossAttention::reserve_concepts(i64 B, i64 Mc) {
  if (!opt_.concept_path || (B <= conc_B_ && Mc <= cap_Mc_)) return;
  B = std::max(B, conc_B_);
  Mc = std::max(Mc, cap_Mc_);
  const i64 n = B * Mc, n1 = B * (Mc + 1), dc = dims_.dc, xkv = dims_.kv_dim();
  for (Buf* b : {&zs_, &g_zs_}) b->assign(n * dc, 0);
  for (Buf* b : {&list_, &g_list_}) b->assign(n1 * dc, 0);
  for (Buf* b : {&kx_raw_, &kx_, &vx_, &g_k_, &g_kraw_, &g_v_}) b->assign(n1 * xkv, 0);
  kx_rstd_.assign(n1 * dims_.n_kv_heads, 0);
  if (opt_.rope) {
    for (Buf* b : {&ka_, &va_, &g_ka_, &g_va_}) b->assign(n1 * xkv * 2, 0);
    grow(rot_, n1 * xkv);
    kpos_.assign(n1, 0);
  }
  conc_B_ = B;
  cap_Mc_ = Mc;
}

// ---- shared pieces of the training and streaming forwards -----------------------------------

// keys/values of list rows [n, dc] -> [n, Hkv, hd], QK-norm on keys
void ConceptCrossAttention::kv_forward(float* k_raw, float* k, float* k_rstd, float* v,
                                       const float* list, i64 n) const {
  float* y[2] = {k_raw, v};
  const float* W[2] = {wk_->w, wv_->w};
  const i64 out[2] = {dims_.kv_dim(), dims_.kv_dim()};
  ops::linear_forward_multi(y, list, W, n, dims_.dc, out, 2);
  ops::head_rmsnorm_forward(k, k_rstd, k_raw, kn_->w, n, dims_.n_kv_heads, dims_.head_dim,
                       dims_.norm_eps);
}

// queries [N, Hq, hd] from xattn.norm(H), QK-norm, no RoPE
void ConceptCrossAttention::query_forward(float* hn, float* hn_rstd, float* q_raw, float* q,
                                          float* q_rstd, const float* H, i64 N) const {
  ops::rmsnorm_forward(hn, hn_rstd, H, norm_->w, N, dims_.d, dims_.norm_eps);
  ops::linear_forward(q_raw, hn, wq_->w, N, dims_.d, dims_.q_dim());
  ops::head_rmsnorm_forward(q, q_rstd, q_raw, qn_->w, N, dims_.n_heads, dims_.head_dim,
                       dims_.norm_eps);
}

// xattn_rope without touching the attention kernels: every head becomes 2 hd wide,
//   query of token t   [R_t q ; q]      (R_p: RoPE at position p, rotate-half, rope_theta)
//   key of concept j   [R_start_j k ; 0]
//   key of z_null      [0 ; k]
//   values             [v ; 0]
// so q.k = (R_t q).(R_start_j k) for a concept, q.k = (R_t q).(R_t k_null) for z_null, and the
// output's first hd of each head is the attention output (scale stays 1/sqrt(hd)). Every
// replicated copy of concept j is the same augmented key, so replicate == compact still holds.
// xa [n, H, 2hd] = [R_pos x ; both ? x : 0] (pos nullptr: no rotation).
void ConceptCrossAttention::rope_rows(float* xa, const float* x, const i32* pos, i64 n, i64 H,
                                      bool both, float* scratch) const {
  const i64 hd = dims_.head_dim;
  const float* lo = x;
  if (pos) {
    std::memcpy(scratch, x, sizeof(float) * n * H * hd);
    ops::rope_apply(scratch, pos, n, H, hd, opt_.rope_theta, false);
    lo = scratch;
  }
#pragma omp parallel for schedule(static) if (parallel_worth(n * H * hd))
  for (i64 r = 0; r < n * H; ++r) {
    std::copy_n(lo + r * hd, hd, xa + r * 2 * hd);
    if (both)
      std::copy_n(x + r * hd, hd, xa + r * 2 * hd + hd);
    else
      std::fill_n(xa + r * 2 * hd + hd, hd, 0.f);
  }
}

// dx += R_pos^T dxa[first hd] (+ dxa[second hd] when both): the rotation's transpose.
void ConceptCrossAttention::rope_rows_backward(float* dx, const float* dxa, const i32* pos,
                                               i64 n, i64 H, bool both, float* scratch) const {
  const i64 hd = dims_.head_dim;
#pragma omp parallel for schedule(static) if (parallel_worth(n * H * hd))
  for (i64 r = 0; r < n * H; ++r) std::copy_n(dxa + r * 2 * hd, hd, scratch + r * hd);
  if (pos) ops::rope_apply(scratch, pos, n, H, hd, opt_.rope_theta, true);
  ops::add_inplace(dx, scratch, n * H * hd);
  if (both)
    for (i64 r = 0; r < n * H; ++r)
      for (i64 u = 0; u < hd; ++u) dx[r * hd + u] += dxa[r * 2 * hd + hd + u];
}

// Positions and augmented rows of a training forward: token t at t (row-local, as in the
// self-attention), list entry e >= 1 of row r at start of concept e-1, a token's own entry
// (prefix rows) at its concept's start.
void ConceptCrossAttention::rope_forward_rows(const ops::Segments& sg, i64 B, i64 L, bool own) {
  const i64 N = B * L, Mc = sg.Mmax, M1 = Mc + 1, nc1 = B * M1, hd = dims_.head_dim;
  const i64 Hq = dims_.n_heads, Hkv = dims_.n_kv_heads, xkv = dims_.kv_dim();
  for (i64 n = 0; n < N; ++n) {
    tpos_[n] = i32(n % L);
    opos_[n] = sg.start[sg.slot(n / L, sg.seg[n])];
  }
  for (i64 r = 0; r < B; ++r)
    for (i64 e = 0; e < M1; ++e)
      kpos_[r * M1 + e] = e >= 1 && e - 1 < sg.count[r] ? sg.start[sg.slot(r, e - 1)] : 0;
  rope_rows(qa_.data(), qx_.data(), tpos_.data(), N, Hq, true, rot_.data());
  rope_rows(ka_.data(), kx_.data(), kpos_.data(), nc1, Hkv, false, rot_.data());
  for (i64 r = 0; r < B; ++r)  // z_null: [0 ; k]
    for (i64 h = 0; h < Hkv; ++h) {
      float* a = ka_.data() + r * M1 * xkv * 2 + h * 2 * hd;
      std::fill_n(a, hd, 0.f);
      std::copy_n(kx_.data() + r * M1 * xkv + h * hd, hd, a + hd);
    }
  rope_rows(va_.data(), vx_.data(), nullptr, nc1, Hkv, false, rot_.data());
  if (own) {
    rope_rows(koa_.data(), ko_.data(), opos_.data(), N, Hkv, false, rot_.data());
    rope_rows(voa_.data(), vo_.data(), nullptr, N, Hkv, false, rot_.data());
  }
}

// Gradients of the augmented rows -> g_q_, g_k_, g_v_ (, g_ko_, g_vo_) +=.
void ConceptCrossAttention::rope_backward_rows(i64 B, i64 Mc, i64 N, bool own) {
  const i64 M1 = Mc + 1, nc1 = B * M1, hd = dims_.head_dim;
  const i64 Hq = dims_.n_heads, Hkv = dims_.n_kv_heads, xkv = dims_.kv_dim();
  rope_rows_backward(g_q_.data(), g_qa_.data(), tpos_.data(), N, Hq, true, rot_.data());
  for (i64 r = 0; r < B; ++r)  // z_null's key is the second half only; its first half is 0
    for (i64 h = 0; h < Hkv; ++h) {
      float* a = g_ka_.data() + r * M1 * xkv * 2 + h * 2 * hd;
      float* g = g_k_.data() + r * M1 * xkv + h * hd;
      for (i64 u = 0; u < hd; ++u) g[u] += a[hd + u];
      std::fill_n(a, hd, 0.f);
    }
  rope_rows_backward(g_k_.data(), g_ka_.data(), kpos_.data(), nc1, Hkv, false, rot_.data());
  rope_rows_backward(g_v_.data(), g_va_.data(), nullptr, nc1, Hkv, false, rot_.data());
  if (own) {
    rope_rows_backward(g_ko_.data(), g_koa_.data(), opos_.data(), N, Hkv, false, rot_.data());
    rope_rows_backward(g_vo_.data(), g_voa_.data(), nullptr, N, Hkv, false, rot_.data());
  }
}

// X = Psi + w2(silu(w1 pn) * w3 pn), pn = ffn_norm(Psi); psi holds Psi on entry.
ConceptCrossAttention::KernelOperands ConceptCrossAttention::kernel_operands() {
  if (opt_.rope)
    return {qa_.data(), ka_.data(), va_.data(), koa_.data(), voa_.data(), atta_.data()};
  return {qx_.data(), kx_.data(), vx_.data(), ko_.data(), vo_.data(), att_.data()};
}

void ConceptCrossAttention::ffn_forward(float* X, float* psi, float* pn, float* pn_rstd,
                                        float* fa, float* fb, float* fh, i64 N) const {
  const i64 d = dims_.d, xf = dims_.d_ff;
  ops::rmsnorm_forward(pn, pn_rstd, psi, ffn_norm_->w, N, d, dims_.norm_eps);
  prof::Scope ps("cross FFN");
  const float* W[2] = {w1_->w, w3_->w};
  if (!ops::linear_swiglu_packed(fh, pn, W, N, d, xf)) {  // a stream's packed FFN: fused
    float* y[2] = {fa, fb};
    const i64 out[2] = {xf, xf};
    ops::linear_forward_multi(y, pn, W, N, d, out, 2);
    ops::swiglu_forward(fh, fa, fb, N * xf);
  }
  ops::linear_forward(X, fh, w2_->w, N, xf, d);
  ops::add_inplace(X, psi, N * d);
}

// ---- forward --------------------------------------------------------------------------------

namespace {

// Sum over N rows of ||x_n||_2 (float64).
double row_norm_sum(const float* x, i64 N, i64 d) {
  double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static) if (parallel_worth(N * d))
  for (i64 n = 0; n < N; ++n) {
    double q = 0;
    for (i64 u = 0; u < d; ++u) q += double(x[n * d + u]) * x[n * d + u];
    s += std::sqrt(q);
  }
  return s;
}

}  // namespace

// list_ [B, Mc+1, dc] holds [z_null, zs_0 ..] per row; rewrite the entries 1..M_r (padding
// slots beyond are never attended).
void ConceptCrossAttention::ablate_list(ConceptAblation a, const ops::Segments& sg, i64 B) {
  const i64 Mc = sg.Mmax, dc = dims_.dc;
  const float* zn = null_->w;
  for (i64 r = 0; r < B; ++r) {
    float* row = list_.data() + r * (Mc + 1) * dc;
    const i64 src = (r + 1) % B, M = sg.count[r];
    const i64 keep = a == ConceptAblation::Shuffle ? std::min<i64>(M, sg.count[src]) : 0;
    for (i64 j = 0; j < M; ++j) {
      float* e = row + (1 + j) * dc;
      if (j < keep)
        std::copy_n(zs_.data() + (src * Mc + j) * dc, dc, e);
      else
        std::copy_n(zn, dc, e);
    }
  }
}

const float* ConceptCrossAttention::forward(const float* H, const float* Z, const float* p,
                                            const ops::Segments& sg, i64 B, i64 L,
                                            const float* Zp, ConceptAblation ablation,
                                            XAttnNorms* norms) {
  const i64 N = B * L, d = dims_.d, dc = dims_.dc, hd = dims_.head_dim;
  ablation_ = opt_.concept_path ? ablation : ConceptAblation::None;
  // An ablation replaces every entry a token sees, its own included: with prefix rows the own
  // entry then comes from the (ablated) list, as the reference's diagnostics define it.
  const bool own = opt_.prefix_rows() && ablation_ == ConceptAblation::None;
  DLCM_CHECK(!own || Zp != nullptr, "internal: ConceptCrossAttention::forward without the "
             "prefix rows' backbone output");
  H_ = H;
  Z_ = Z;
  Zp_ = Zp;
  p_ = p;
  sg_ = &sg;
  if (norms) {
    norms->h += row_norm_sum(H, N, d);
    norms->n += N;
  }
  if (!opt_.concept_path) {
    std::memcpy(psi_.data(), H, sizeof(float) * N * d);  // Psi = H
    ffn_forward(X_.data(), psi_.data(), pn_.data(), pn_rstd_.data(), fa_.data(), fb_.data(),
                fh_.data(), N);
    return X_.data();
  }
  const i64 Mc = sg.Mmax, nc1 = B * (Mc + 1);
  DLCM_CHECK(B <= conc_B_ && Mc <= cap_Mc_,
             "internal: ConceptCrossAttention::forward before reserve_concepts");
  // smoother (gate from p; off: p = nullptr, every gate 1) -> concept list [z_null, zs...]
  // -> K/V [B, Mc+1, Hkv, hd]
  ops::smoother_forward(zs_.data(), Z, opt_.smoother ? p : nullptr, sg, dc);
  ops::concept_list_forward(list_.data(), null_->w, zs_.data(), B, Mc, dc);
  if (ablation_ != ConceptAblation::None) ablate_list(ablation_, sg, B);
  kv_forward(kx_raw_.data(), kx_.data(), kx_rstd_.data(), vx_.data(), list_.data(), nc1);
  // prefix rows: every token's own concept zs_j(t) = P_j z_j(t) + (1 - P_j) zs_{j-1} -> K/V
  if (own) {
    ops::smoother_own_forward(zso_.data(), Zp, zs_.data(), opt_.smoother ? p : nullptr, sg, dc);
    kv_forward(ko_raw_.data(), ko_.data(), ko_rstd_.data(), vo_.data(), zso_.data(), N);
  }
  query_forward(hn_.data(), hn_rstd_.data(), qx_raw_.data(), qx_.data(), qx_rstd_.data(), H, N);
  const float scale = 1.0f / std::sqrt(float(hd));
  // The kernels read q/k/v (and own k/v) at head width ahd: plain, or augmented with RoPE.
  if (opt_.rope) rope_forward_rows(sg, B, L, own);
  const auto [q, k, v, ko, vo, att] = kernel_operands();
  const i64 ahd = att_hd();
  {
    prof::Scope ps("  concept attention kernel");
    if (own)
      ops::concept_attention_own_forward(att, q, k, v, ko, vo, sg, B, L, dims_.n_heads,
                                         dims_.n_kv_heads, ahd, scale);
    else if (opt_.replicate)
      ops::concept_attention_replicate_forward(att, lse_.data(), krep_.data(), vrep_.data(), q,
                                               k, v, sg, B, L, dims_.n_heads, dims_.n_kv_heads,
                                               ahd, scale, opt_.inclusive());
    else
      ops::concept_attention_forward(att, lse_.data(), q, k, v, sg, B, L, dims_.n_heads,
                                     dims_.n_kv_heads, ahd, scale, opt_.inclusive());
  }
  if (opt_.rope)  // the first hd of every augmented head
    for (i64 r = 0; r < N * dims_.n_heads; ++r)
      std::copy_n(atta_.data() + r * 2 * hd, hd, att_.data() + r * hd);
  // Psi = H + Wo att
  ops::linear_forward(psi_.data(), att_.data(), wo_->w, N, dims_.q_dim(), d);
  if (norms) norms->xo += row_norm_sum(psi_.data(), N, d);
  ops::add_inplace(psi_.data(), H, N * d);
  ffn_forward(X_.data(), psi_.data(), pn_.data(), pn_rstd_.data(), fa_.data(), fb_.data(),
              fh_.data(), N);
  return X_.data();
}

// ---- backward -------------------------------------------------------------------------------

void ConceptCrossAttention::backward(float* dH, float* dZ, float* dp, const float* dX, i64 B,
                                     i64 L, float* dZp) {
  const i64 N = B * L, d = dims_.d, dc = dims_.dc, hd = dims_.head_dim, xf = dims_.d_ff;
  const i64 xq = dims_.q_dim(), xkv = dims_.kv_dim();
  DLCM_CHECK(ablation_ == ConceptAblation::None,
             "internal: ConceptCrossAttention::backward after an ablated (evaluation) forward");
  // cross FFN: X = Psi + w2 h  ->  dPsi = dX + norm backward of (w1, w3 branches)
  {
    prof::Scope ps("cross FFN");
    // the scratch gradients are written by their first producer (no clearing pass)
    ops::linear_backward(g_fh_.data(), w2_->g, dX, fh_.data(), w2_->w, N, xf, d, nullptr, false);
    ops::swiglu_backward(g_fa_.data(), g_fb_.data(), g_fh_.data(), fa_.data(), fb_.data(),
                         N * xf, false);
    ops::linear_backward(g_pn_.data(), w1_->g, g_fa_.data(), pn_.data(), w1_->w, N, d, xf,
                         nullptr, false);
    ops::linear_backward(g_pn_.data(), w3_->g, g_fb_.data(), pn_.data(), w3_->w, N, d, xf);
    // d Psi = dX (the residual) + the norm's branch, written in one pass
    ops::rmsnorm_backward(g_psi_.data(), ffn_norm_->g, g_pn_.data(), psi_.data(), ffn_norm_->w,
                          pn_rstd_.data(), N, d, dX, false);
  }
  // Psi = H + Wo att: the residual
  ops::add_inplace(dH, g_psi_.data(), N * d);
  if (!opt_.concept_path) return;
  const ops::Segments& sg = *sg_;
  const i64 Mc = sg.Mmax, nc = B * Mc, nc1 = B * (Mc + 1);
  ops::linear_backward(g_att_.data(), wo_->g, g_psi_.data(), att_.data(), wo_->w, N, xq, d,
                       nullptr, false);
  // attention -> dq [N, xq], dk/dv [B*(Mc+1), xkv]
  clear(g_q_, N * xq);
  clear(g_k_, nc1 * xkv);
  clear(g_v_, nc1 * xkv);
  const float scale = 1.0f / std::sqrt(float(hd));
  const bool own = opt_.prefix_rows();
  DLCM_CHECK(!own || dZp != nullptr, "internal: ConceptCrossAttention::backward without dZp");
  if (own) {
    clear(g_ko_, N * xkv);
    clear(g_vo_, N * xkv);
  }
  // xattn_rope: the kernels run on the augmented heads; their gradients are mapped back below.
  const bool rope = opt_.rope;
  const i64 ahd = att_hd(), w = rope ? 2 : 1;
  float* gq = rope ? g_qa_.data() : g_q_.data();
  float* gk = rope ? g_ka_.data() : g_k_.data();
  float* gv = rope ? g_va_.data() : g_v_.data();
  float* gko = rope ? g_koa_.data() : g_ko_.data();
  float* gvo = rope ? g_voa_.data() : g_vo_.data();
  const float* gatt = g_att_.data();
  const auto [q, k, v, ko, vo, att] = kernel_operands();
  if (rope) {
    std::memset(gq, 0, sizeof(float) * N * xq * w);
    std::memset(gk, 0, sizeof(float) * nc1 * xkv * w);
    std::memset(gv, 0, sizeof(float) * nc1 * xkv * w);
    if (own) {
      std::memset(gko, 0, sizeof(float) * N * xkv * w);
      std::memset(gvo, 0, sizeof(float) * N * xkv * w);
    }
    // d att_aug = [d att ; 0]
    rope_rows(g_atta_.data(), g_att_.data(), nullptr, N, dims_.n_heads, false, rot_.data());
    gatt = g_atta_.data();
  }
  {
    prof::Scope ps("  concept attention kernel");
    if (own) {
      ops::concept_attention_own_backward(gq, gk, gv, gko, gvo, gatt, q, k, v, ko, vo, sg, B, L,
                                          dims_.n_heads, dims_.n_kv_heads, ahd, scale);
    } else if (opt_.replicate) {
      ops::concept_attention_replicate_backward(gq, gk, gv, g_krep_.data(), g_vrep_.data(), gatt,
                                                att, lse_.data(), q, krep_.data(), vrep_.data(),
                                                sg, B, L, dims_.n_heads, dims_.n_kv_heads, ahd,
                                                scale, opt_.inclusive());
    } else {
      ops::concept_attention_backward(gq, gk, gv, gatt, att, lse_.data(), q, k, v, sg, B, L,
                                      dims_.n_heads, dims_.n_kv_heads, ahd, scale,
                                      opt_.inclusive());
    }
  }
  if (rope) rope_backward_rows(B, Mc, N, own);
  // queries: QK-norm, Wq, xattn.norm -> dH
  clear(g_qraw_, N * xq);
  ops::head_rmsnorm_backward(g_qraw_.data(), qn_->g, g_q_.data(), qx_raw_.data(), qn_->w,
                        qx_rstd_.data(), N, dims_.n_heads, hd);
  clear(g_hn_, N * d);
  ops::linear_backward(g_hn_.data(), wq_->g, g_qraw_.data(), hn_.data(), wq_->w, N, d, xq);
  ops::rmsnorm_backward(dH, norm_->g, g_hn_.data(), H_, norm_->w, hn_rstd_.data(), N, d);
  // keys/values -> d list -> d z_null, d zs
  clear(g_kraw_, nc1 * xkv);
  ops::head_rmsnorm_backward(g_kraw_.data(), kn_->g, g_k_.data(), kx_raw_.data(), kn_->w,
                        kx_rstd_.data(), nc1, dims_.n_kv_heads, hd);
  clear(g_list_, nc1 * dc);
  ops::linear_backward(g_list_.data(), wk_->g, g_kraw_.data(), list_.data(), wk_->w, nc1, dc,
                       xkv);
  ops::linear_backward(g_list_.data(), wv_->g, g_v_.data(), list_.data(), wv_->w, nc1, dc, xkv);
  clear(g_zs_, nc * dc);
  ops::concept_list_backward(null_->g, g_zs_.data(), g_list_.data(), B, Mc, dc);
  // prefix rows: own K/V -> own concept -> dZp, and zs_{j-1} (before the smoother's backward)
  if (own) {
    clear(g_koraw_, N * xkv);
    ops::head_rmsnorm_backward(g_koraw_.data(), kn_->g, g_ko_.data(), ko_raw_.data(), kn_->w,
                               ko_rstd_.data(), N, dims_.n_kv_heads, hd);
    clear(g_zso_, N * dc);
    ops::linear_backward(g_zso_.data(), wk_->g, g_koraw_.data(), zso_.data(), wk_->w, N, dc,
                         xkv);
    ops::linear_backward(g_zso_.data(), wv_->g, g_vo_.data(), zso_.data(), wv_->w, N, dc, xkv);
    ops::smoother_own_backward(dZp, g_zs_.data(), opt_.smoother ? dp : nullptr, g_zso_.data(),
                               Zp_, zs_.data(), opt_.smoother ? p_ : nullptr, sg, dc);
  }
  // smoother -> dZ (and dp with a live gate; none when the smoother is off)
  ops::smoother_backward(dZ, opt_.smoother ? dp : nullptr, g_zs_.data(), zs_.data(), Z_,
                         opt_.smoother ? p_ : nullptr, sg, dc);
}

// ---- streaming ------------------------------------------------------------------------------

void ConceptCrossAttention::reserve_infer(i64 rows) {
  if (rows <= inf_rows_) return;
  const i64 d = dims_.d, xq = dims_.q_dim(), xkv = dims_.kv_dim(), xf = dims_.d_ff;
  for (Buf* b : {&i_psi_, &i_pn_, &i_X_}) grow(*b, rows * d);
  grow(i_pn_rstd_, rows);
  for (Buf* b : {&i_fa_, &i_fb_, &i_fh_}) grow(*b, rows * xf);
  if (opt_.concept_path) {
    grow(i_hn_, rows * d);
    grow(i_hn_rstd_, rows);
    for (Buf* b : {&i_qraw_, &i_q_, &i_att_}) grow(*b, rows * xq);
    grow(i_q_rstd_, rows * dims_.n_heads);
    grow(i_zs_, rows * dims_.dc);
    for (Buf* b : {&i_kraw_, &i_k_, &i_v_}) grow(*b, rows * xkv);
    grow(i_krstd_, rows * dims_.n_kv_heads);
    if (opt_.rope) {
      for (Buf* b : {&i_qa_, &i_atta_}) grow(*b, rows * xq * 2);
      for (Buf* b : {&i_ka_, &i_va_}) grow(*b, rows * xkv * 2);
      grow(i_rot_, rows * std::max(xq, xkv));
      i_pos_.resize(rows);
    }
  }
  inf_rows_ = rows;
}

ConceptCache ConceptCrossAttention::make_cache(i64 max_seqs, i64 max_entries) const {
  ConceptCache c;
  c.max_seqs = max_seqs;
  c.max_entries = max_entries;
  c.kv_dim = dims_.n_kv_heads * att_hd();  // xattn_rope: augmented heads
  c.dc = dims_.dc;
  c.n.assign(max_seqs, 0);
  if (!opt_.concept_path) return c;
  c.k.assign(max_seqs * max_entries * c.kv_dim, 0);
  c.v.assign(max_seqs * max_entries * c.kv_dim, 0);
  c.mult.assign(max_seqs * max_entries, 0);
  c.zs_last.assign(max_seqs * c.dc, 0);
  if (opt_.prefix_rows()) c.zs.assign(max_seqs * max_entries * c.dc, 0);
  return c;
}

// A sequence slot of the cache, checked before any entry of it is touched.
static void check_slot(const ConceptCache& c, i64 seq, const char* who) {
  DLCM_CHECK(seq >= 0 && seq < c.max_seqs, "ConceptCrossAttention::", who, ": sequence ", seq,
             " outside the concept cache's ", c.max_seqs, " slots");
}

void ConceptCrossAttention::reset(ConceptCache& c, i64 seq) const {
  check_slot(c, seq, "reset");
  c.n[seq] = 1;
  if (!opt_.concept_path) return;
  // K/V of the null concept, entry 0 (computed like any list entry, one row)
  const i64 xkv = dims_.kv_dim(), hd = dims_.head_dim;
  Buf raw(xkv), rs(dims_.n_kv_heads), k(xkv), v(xkv);
  ops::linear_forward(raw.data(), null_->w, wk_->w, 1, dims_.dc, xkv);
  ops::head_rmsnorm_forward(k.data(), rs.data(), raw.data(), kn_->w, 1, dims_.n_kv_heads, hd,
                            dims_.norm_eps);
  ops::linear_forward(v.data(), null_->w, wv_->w, 1, dims_.dc, xkv);
  if (opt_.rope) {  // z_null: key [0 ; k], value [v ; 0]
    for (i64 h = 0; h < dims_.n_kv_heads; ++h) {
      std::fill_n(c.k_at(seq, 0) + h * 2 * hd, hd, 0.f);
      std::copy_n(k.data() + h * hd, hd, c.k_at(seq, 0) + h * 2 * hd + hd);
    }
    rope_rows(c.v_at(seq, 0), v.data(), nullptr, 1, dims_.n_kv_heads, false, raw.data());
  } else {
    std::copy_n(k.data(), xkv, c.k_at(seq, 0));
    std::copy_n(v.data(), xkv, c.v_at(seq, 0));
  }
  // inclusive: z_null is one fixed slot; shifted: it carries the first concept's tokens
  c.mult_of(seq)[0] = opt_.inclusive() ? 1.f : 0.f;
  std::fill_n(c.zs_last.data() + seq * c.dc, c.dc, 0.f);
  if (opt_.prefix_rows()) std::fill_n(c.zs_at(seq, 0), c.dc, 0.f);
}

void ConceptCrossAttention::append_concepts(const float* Z, const float* gate, const i64* seqs,
                                            const i64* start, i64 n, ConceptCache& c) {
  if (n == 0) return;
  DLCM_CHECK(n <= inf_rows_, "internal: ConceptCrossAttention::append_concepts: ", n,
             " concepts exceed the reserved ", inf_rows_, " rows");
  for (i64 j = 0; j < n; ++j) check_slot(c, seqs[j], "append_concepts");
  const i64 dc = dims_.dc;
  // smoother, in order within each sequence
  for (i64 j = 0; j < n; ++j) {
    const float P = gate[j];
    const float* zj = Z + j * dc;
    float* prev = c.zs_last.data() + seqs[j] * dc;
    float* o = i_zs_.data() + j * dc;
    for (i64 u = 0; u < dc; ++u) o[u] = P * zj[u] + (1.f - P) * prev[u];
    std::copy_n(o, dc, prev);
  }
  kv_forward(i_kraw_.data(), i_k_.data(), i_krstd_.data(), i_v_.data(), i_zs_.data(), n);
  const float *k = i_k_.data(), *v = i_v_.data();
  if (opt_.rope) {  // keys rotated once, at their concept's start
    for (i64 j = 0; j < n; ++j) i_pos_[j] = i32(start[j]);
    rope_rows(i_ka_.data(), k, i_pos_.data(), n, dims_.n_kv_heads, false, i_rot_.data());
    rope_rows(i_va_.data(), v, nullptr, n, dims_.n_kv_heads, false, i_rot_.data());
    k = i_ka_.data();
    v = i_va_.data();
  }
  for (i64 j = 0; j < n; ++j) {
    const i64 s = seqs[j], e = c.n[s];
    DLCM_CHECK(e < c.max_entries, "stream: concept list of sequence ", s, " is full (",
               c.max_entries, " entries)");
    std::copy_n(k + j * c.kv_dim, c.kv_dim, c.k_at(s, e));
    std::copy_n(v + j * c.kv_dim, c.kv_dim, c.v_at(s, e));
    if (opt_.prefix_rows()) std::copy_n(i_zs_.data() + j * c.dc, c.dc, c.zs_at(s, e));
    c.n[s] = e + 1;
  }
}

const float* ConceptCrossAttention::forward_cached(const float* H, const i64* seqs,
                                                   const i64* pos, const i64* last,
                                                   const float* own, i64 R,
                                                   ConceptCache& c, const float* own_z,
                                                   const float* own_gate) {
  DLCM_CHECK(R <= inf_rows_, "internal: ConceptCrossAttention::forward_cached: ", R,
             " rows exceed the reserved ", inf_rows_);
  for (i64 r = 0; r < R; ++r) {
    check_slot(c, seqs[r], "forward_cached");
    DLCM_CHECK(last[r] >= 0 && last[r] < c.max_entries, "ConceptCrossAttention::forward_cached: ",
               "token ", r, " sees entries up to ", last[r], ", outside the cache's ",
               c.max_entries, " entries");
  }
  const i64 d = dims_.d, xq = dims_.q_dim(), hd = dims_.head_dim;
  if (!opt_.concept_path) {
    std::memcpy(i_psi_.data(), H, sizeof(float) * R * d);
  } else {
    query_forward(i_hn_.data(), i_hn_rstd_.data(), i_qraw_.data(), i_q_.data(), i_q_rstd_.data(),
                  H, R);
    // prefix rows: each token's own entry, zs = P z + (1 - P) zs of the entry before it
    const bool per_token = own_z != nullptr;
    DLCM_CHECK(per_token == opt_.prefix_rows() && (!per_token || own_gate != nullptr),
               "internal: ConceptCrossAttention::forward_cached: own entries are given "
               "exactly with prefix rows");
    if (per_token) {
      const i64 dc = dims_.dc;
      for (i64 r = 0; r < R; ++r) {
        const float P = own_gate[r];
        const float* z = own_z + r * dc;
        const float* prev = c.zs_at(seqs[r], last[r] - 1);
        float* o = i_zs_.data() + r * dc;
        for (i64 u = 0; u < dc; ++u) o[u] = P * z[u] + (1.f - P) * prev[u];
      }
      kv_forward(i_kraw_.data(), i_k_.data(), i_krstd_.data(), i_v_.data(), i_zs_.data(), R);
    }
    const float scale = 1.0f / std::sqrt(float(hd));
    // xattn_rope: queries at their position, own keys at their concept's start (pos - own + 1)
    const float *q = i_q_.data(), *ko = i_k_.data(), *vo = i_v_.data();
    float* att = i_att_.data();
    const i64 ahd = att_hd(), aq = dims_.n_heads * ahd;
    if (opt_.rope) {
      for (i64 r = 0; r < R; ++r) i_pos_[r] = i32(pos[r]);
      rope_rows(i_qa_.data(), i_q_.data(), i_pos_.data(), R, dims_.n_heads, true, i_rot_.data());
      if (per_token) {
        for (i64 r = 0; r < R; ++r) i_pos_[r] = i32(pos[r] - i64(own[r]) + 1);
        rope_rows(i_ka_.data(), i_k_.data(), i_pos_.data(), R, dims_.n_kv_heads, false,
                  i_rot_.data());
        rope_rows(i_va_.data(), i_v_.data(), nullptr, R, dims_.n_kv_heads, false, i_rot_.data());
      }
      q = i_qa_.data();
      ko = i_ka_.data();
      vo = i_va_.data();
      att = i_atta_.data();
    }
    // Runs of consecutive positions of one sequence (a prefill chunk) go through the compact
    // kernel in one pass, as training runs it; single rows (decode steps), own entries given per
    // token and rotated heads go token by token.
    step_rows_.clear();
    for (i64 r0 = 0; r0 < R;) {
      i64 r1 = r0 + 1;
      while (r1 < R && seqs[r1] == seqs[r0] && pos[r1] == pos[r1 - 1] + 1) ++r1;
      if (!per_token && !opt_.rope && r1 - r0 >= kListMinRows) {
        const i64 s = seqs[r0];
        ops::concept_attention_list_forward(att + r0 * aq, q + r0 * aq, c.k_at(s, 0),
                                            c.v_at(s, 0), c.kv_dim, c.mult_of(s),
                                            last[r1 - 1] + 1, last + r0, own + r0, r1 - r0,
                                            dims_.n_heads, dims_.n_kv_heads, ahd, scale);
      } else {
        for (i64 r = r0; r < r1; ++r) step_rows_.push_back(r);
      }
      r0 = r1;
    }
    const i64 n_step = i64(step_rows_.size());
    parallel_region(parallel_worth(n_step * dims_.n_heads * hd * 8), [&] {
      std::vector<float> mt(c.max_entries);
#pragma omp for schedule(dynamic, 4)
      for (i64 i = 0; i < n_step; ++i) {
        const i64 r = step_rows_[i];
        const i64 s = seqs[r], nk = last[r] + 1;
        std::copy_n(c.mult_of(s), nk - 1, mt.data());
        mt[nk - 1] = own[r];
        ops::concept_attention_step(att + r * aq, q + r * aq, c.k_at(s, 0), c.v_at(s, 0),
                                    c.kv_dim, mt.data(), nk, dims_.n_heads, dims_.n_kv_heads,
                                    ahd, scale, per_token ? ko + r * c.kv_dim : nullptr,
                                    per_token ? vo + r * c.kv_dim : nullptr);
      }
    });
    if (opt_.rope)  // the first hd of every augmented head
      for (i64 r = 0; r < R * dims_.n_heads; ++r)
        std::copy_n(i_atta_.data() + r * 2 * hd, hd, i_att_.data() + r * hd);
    // Psi = H + Wo att
    ops::linear_forward(i_psi_.data(), i_att_.data(), wo_->w, R, xq, d);
    ops::add_inplace(i_psi_.data(), H, R * d);
  }
  ffn_forward(i_X_.data(), i_psi_.data(), i_pn_.data(), i_pn_rstd_.data(), i_fa_.data(),
              i_fb_.data(), i_fh_.data(), R);
  return i_X_.data();
}

}  // namespace dlcm
