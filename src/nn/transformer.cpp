#include "nn/transformer.h"

#include <cmath>
#include <cstring>

#include "kernels/gemm.h"
#include "kernels/ops.h"

namespace dlcm {

BlockParams add_block_params(ParamStore& ps, const std::string& p, const BlockDims& d,
                             ParamGroup group) {
  auto norm = [&](const std::string& n, i64 dim) {
    Param* x = ps.add(p + n, {dim}, ParamGroup::Other, false);
    x->init_one = true;
    return x;
  };
  auto mat = [&](const std::string& n, i64 out, i64 in) {
    return ps.add(p + n, {out, in}, group, true);
  };
  BlockParams b;
  b.attn_norm = norm("attn_norm.weight", d.d);
  b.wq = mat("attn.wq.weight", d.q_dim(), d.d);
  b.wk = mat("attn.wk.weight", d.kv_dim(), d.d);
  b.wv = mat("attn.wv.weight", d.kv_dim(), d.d);
  b.wo = mat("attn.wo.weight", d.d, d.q_dim());
  if (d.qk_norm) {
    b.q_norm = norm("attn.q_norm.weight", d.head_dim);
    b.k_norm = norm("attn.k_norm.weight", d.head_dim);
  }
  b.ffn_norm = norm("ffn_norm.weight", d.d);
  b.w1 = mat("ffn.w1.weight", d.d_ff, d.d);
  b.w2 = mat("ffn.w2.weight", d.d, d.d_ff);
  b.w3 = mat("ffn.w3.weight", d.d_ff, d.d);
  return b;
}

void head_rmsnorm_forward(float* y, float* rstd, const float* x, const float* w, i64 N, i64 H,
                          i64 hd, float eps) {
  // [N, H, hd] is [N*H, hd] rows: one RMSNorm per (token, head).
  ops::rmsnorm_forward(y, rstd, x, w, N * H, hd, eps);
}

void head_rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                           const float* rstd, i64 N, i64 H, i64 hd) {
  ops::rmsnorm_backward(dx, dw, dy, x, w, rstd, N * H, hd);
}

void TransformerStack::init(ParamStore& ps, const std::string& prefix, i64 n_layers,
                            const BlockDims& dims, ParamGroup group) {
  dims_ = dims;
  layers_.clear();
  for (i64 i = 0; i < n_layers; ++i)
    layers_.push_back(add_block_params(ps, prefix + std::to_string(i) + ".", dims, group));
  acts_.resize(n_layers);
}

void TransformerStack::reserve(i64 B, i64 L) {
  if (B * L <= cap_rows_ && B <= cap_B_ && L <= cap_L_) return;
  const BlockDims& d = dims_;
  i64 N = B * L;
  cap_rows_ = N;
  cap_B_ = B;
  cap_L_ = L;
  for (auto& a : acts_) {
    a.xn1.assign(N * d.d, 0);
    a.rstd1.assign(N, 0);
    if (d.qk_norm) {
      a.q_raw.assign(N * d.q_dim(), 0);
      a.k_raw.assign(N * d.kv_dim(), 0);
      a.q_rstd.assign(N * d.n_heads, 0);
      a.k_rstd.assign(N * d.n_kv_heads, 0);
    }
    a.q.assign(N * d.q_dim(), 0);
    a.k.assign(N * d.kv_dim(), 0);
    a.v.assign(N * d.kv_dim(), 0);
    a.att.assign(N * d.q_dim(), 0);
    a.lse.assign(N * d.n_heads, 0);
    a.mid.assign(N * d.d, 0);
    a.xn2.assign(N * d.d, 0);
    a.rstd2.assign(N, 0);
    a.a.assign(N * d.d_ff, 0);
    a.b.assign(N * d.d_ff, 0);
    a.h.assign(N * d.d_ff, 0);
    a.out.assign(N * d.d, 0);
  }
  g_res_.assign(N * d.d, 0);
  g_res2_.assign(N * d.d, 0);
  g_xn_.assign(N * d.d, 0);
  g_mid_.assign(N * d.d, 0);
  g_q_.assign(N * d.q_dim(), 0);
  g_k_.assign(N * d.kv_dim(), 0);
  g_v_.assign(N * d.kv_dim(), 0);
  g_att_.assign(N * d.q_dim(), 0);
  g_a_.assign(N * d.d_ff, 0);
  g_b_.assign(N * d.d_ff, 0);
  g_h_.assign(N * d.d_ff, 0);
  if (d.qk_norm) g_raw_.assign(N * std::max(d.q_dim(), d.kv_dim()), 0);
}

const float* TransformerStack::forward(const float* x, const i32* pos, i64 B, i64 L) {
  DLCM_CHECK(B * L <= cap_rows_ && B <= cap_B_ && L <= cap_L_,
             "internal: TransformerStack::forward beyond reserved size");
  input_ = x;
  pos_ = pos;
  const float* cur = x;
  for (i64 l = 0; l < n_layers(); ++l) {
    block_forward(l, cur, pos, B, L);
    cur = acts_[l].out.data();
  }
  return cur;
}

void TransformerStack::block_forward(i64 l, const float* x, const i32* pos, i64 B, i64 L) {
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  BlockActs& A = acts_[l];
  const i64 N = B * L;
  // attention sub-layer
  ops::rmsnorm_forward(A.xn1.data(), A.rstd1.data(), x, P.attn_norm->w, N, d.d, d.norm_eps);
  float* qdst = d.qk_norm ? A.q_raw.data() : A.q.data();
  float* kdst = d.qk_norm ? A.k_raw.data() : A.k.data();
  ops::linear_forward(qdst, A.xn1.data(), P.wq->w, N, d.d, d.q_dim());
  ops::linear_forward(kdst, A.xn1.data(), P.wk->w, N, d.d, d.kv_dim());
  ops::linear_forward(A.v.data(), A.xn1.data(), P.wv->w, N, d.d, d.kv_dim());
  if (d.qk_norm) {
    head_rmsnorm_forward(A.q.data(), A.q_rstd.data(), A.q_raw.data(), P.q_norm->w, N, d.n_heads,
                         d.head_dim, d.norm_eps);
    head_rmsnorm_forward(A.k.data(), A.k_rstd.data(), A.k_raw.data(), P.k_norm->w, N,
                         d.n_kv_heads, d.head_dim, d.norm_eps);
  }
  ops::rope_apply(A.q.data(), pos, N, d.n_heads, d.head_dim, d.rope_theta, false);
  ops::rope_apply(A.k.data(), pos, N, d.n_kv_heads, d.head_dim, d.rope_theta, false);
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  ops::attention_forward(A.att.data(), A.lse.data(), A.q.data(), A.k.data(), A.v.data(), B, L, L,
                         d.n_heads, d.n_kv_heads, d.head_dim, 0, scale);
  ops::linear_forward(A.mid.data(), A.att.data(), P.wo->w, N, d.q_dim(), d.d);
  float* mid = A.mid.data();
#pragma omp parallel for schedule(static) if (N * d.d > (1 << 15))
  for (i64 i = 0; i < N * d.d; ++i) mid[i] += x[i];
  // feed-forward sub-layer
  ops::rmsnorm_forward(A.xn2.data(), A.rstd2.data(), mid, P.ffn_norm->w, N, d.d, d.norm_eps);
  ops::linear_forward(A.a.data(), A.xn2.data(), P.w1->w, N, d.d, d.d_ff);
  ops::linear_forward(A.b.data(), A.xn2.data(), P.w3->w, N, d.d, d.d_ff);
  ops::swiglu_forward(A.h.data(), A.a.data(), A.b.data(), N * d.d_ff);
  float* out = A.out.data();
  ops::linear_forward(out, A.h.data(), P.w2->w, N, d.d_ff, d.d);
#pragma omp parallel for schedule(static) if (N * d.d > (1 << 15))
  for (i64 i = 0; i < N * d.d; ++i) out[i] += mid[i];
}

void TransformerStack::backward(float* dx, const float* dout, i64 B, i64 L) {
  const i64 N = B * L, D = dims_.d;
  const float* g_cur = dout;
  for (i64 l = n_layers() - 1; l >= 0; --l) {
    const float* x = l == 0 ? input_ : acts_[l - 1].out.data();
    float* g_prev;
    if (l == 0) {
      g_prev = dx;  // accumulate into the caller's buffer
    } else {
      g_prev = (g_cur == g_res_.data()) ? g_res2_.data() : g_res_.data();
      std::memset(g_prev, 0, sizeof(float) * N * D);
    }
    block_backward(l, g_prev, g_cur, x, B, L);
    g_cur = g_prev;
  }
}

void TransformerStack::block_backward(i64 l, float* dx, const float* dout, const float* x, i64 B,
                                      i64 L) {
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  BlockActs& A = acts_[l];
  const i64 N = B * L;
  auto clear = [](Buf& b, i64 n) { std::memset(b.data(), 0, sizeof(float) * n); };
  // out = mid + w2(h): dh = dout W2, dW2 += dout^T h
  clear(g_h_, N * d.d_ff);
  ops::linear_backward(g_h_.data(), P.w2->g, dout, A.h.data(), P.w2->w, N, d.d_ff, d.d);
  clear(g_a_, N * d.d_ff);
  clear(g_b_, N * d.d_ff);
  ops::swiglu_backward(g_a_.data(), g_b_.data(), g_h_.data(), A.a.data(), A.b.data(),
                       N * d.d_ff);
  clear(g_xn_, N * d.d);
  ops::linear_backward(g_xn_.data(), P.w1->g, g_a_.data(), A.xn2.data(), P.w1->w, N, d.d, d.d_ff);
  ops::linear_backward(g_xn_.data(), P.w3->g, g_b_.data(), A.xn2.data(), P.w3->w, N, d.d, d.d_ff);
  // d mid = dout (residual) + norm backward
  std::memcpy(g_mid_.data(), dout, sizeof(float) * N * d.d);
  ops::rmsnorm_backward(g_mid_.data(), P.ffn_norm->g, g_xn_.data(), A.mid.data(), P.ffn_norm->w,
                        A.rstd2.data(), N, d.d);
  // mid = x + wo(att)
  clear(g_att_, N * d.q_dim());
  ops::linear_backward(g_att_.data(), P.wo->g, g_mid_.data(), A.att.data(), P.wo->w, N,
                       d.q_dim(), d.d);
  clear(g_q_, N * d.q_dim());
  clear(g_k_, N * d.kv_dim());
  clear(g_v_, N * d.kv_dim());
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  ops::attention_backward(g_q_.data(), g_k_.data(), g_v_.data(), g_att_.data(), A.att.data(),
                          A.lse.data(), A.q.data(), A.k.data(), A.v.data(), B, L, L, d.n_heads,
                          d.n_kv_heads, d.head_dim, 0, scale);
  ops::rope_apply(g_q_.data(), pos_, N, d.n_heads, d.head_dim, d.rope_theta, true);
  ops::rope_apply(g_k_.data(), pos_, N, d.n_kv_heads, d.head_dim, d.rope_theta, true);
  if (d.qk_norm) {
    clear(g_raw_, N * d.q_dim());
    head_rmsnorm_backward(g_raw_.data(), P.q_norm->g, g_q_.data(), A.q_raw.data(), P.q_norm->w,
                          A.q_rstd.data(), N, d.n_heads, d.head_dim);
    std::memcpy(g_q_.data(), g_raw_.data(), sizeof(float) * N * d.q_dim());
    clear(g_raw_, N * d.kv_dim());
    head_rmsnorm_backward(g_raw_.data(), P.k_norm->g, g_k_.data(), A.k_raw.data(), P.k_norm->w,
                          A.k_rstd.data(), N, d.n_kv_heads, d.head_dim);
    std::memcpy(g_k_.data(), g_raw_.data(), sizeof(float) * N * d.kv_dim());
  }
  clear(g_xn_, N * d.d);
  ops::linear_backward(g_xn_.data(), P.wq->g, g_q_.data(), A.xn1.data(), P.wq->w, N, d.d,
                       d.q_dim());
  ops::linear_backward(g_xn_.data(), P.wk->g, g_k_.data(), A.xn1.data(), P.wk->w, N, d.d,
                       d.kv_dim());
  ops::linear_backward(g_xn_.data(), P.wv->g, g_v_.data(), A.xn1.data(), P.wv->w, N, d.d,
                       d.kv_dim());
  // x feeds both the residual and the norm
  float* g_mid = g_mid_.data();
#pragma omp parallel for schedule(static) if (N * d.d > (1 << 15))
  for (i64 i = 0; i < N * d.d; ++i) dx[i] += g_mid[i];
  ops::rmsnorm_backward(dx, P.attn_norm->g, g_xn_.data(), x, P.attn_norm->w, A.rstd1.data(), N,
                        d.d);
}

}  // namespace dlcm
