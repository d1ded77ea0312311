#include "nn/transformer.h"

#include <algorithm>
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

void TransformerStack::init(ParamStore& ps, const std::string& prefix, i64 n_layers,
                            const BlockDims& dims, ParamGroup group) {
  dims_ = dims;
  layers_.clear();
  for (i64 i = 0; i < n_layers; ++i)
    layers_.push_back(add_block_params(ps, prefix + std::to_string(i) + ".", dims, group));
  acts_.resize(n_layers);
}

// Buffers of one block's forward for N rows.
static void alloc_block_acts(BlockActs& a, const BlockDims& d, i64 N) {
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
}

void TransformerStack::reserve(i64 B, i64 L) {
  if (B * L <= cap_rows_ && B <= cap_B_ && L <= cap_L_) return;
  const BlockDims& d = dims_;
  i64 N = B * L;
  cap_rows_ = N;
  cap_B_ = B;
  cap_L_ = L;
  for (auto& a : acts_) {
    alloc_block_acts(a, d, N);
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
  BlockActs& A = acts_[l];
  block_qkv(l, x, pos, B * L, A);
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  ops::attention_forward(A.att.data(), A.lse.data(), A.q.data(), A.k.data(), A.v.data(), B, L, L,
                         d.n_heads, d.n_kv_heads, d.head_dim, 0, scale, d.window);
  block_out(l, x, A.out.data(), B * L, A);
}

void TransformerStack::block_qkv(i64 l, const float* x, const i32* pos, i64 N, BlockActs& A) {
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  ops::rmsnorm_forward(A.xn1.data(), A.rstd1.data(), x, P.attn_norm->w, N, d.d, d.norm_eps);
  float* qdst = d.qk_norm ? A.q_raw.data() : A.q.data();
  float* kdst = d.qk_norm ? A.k_raw.data() : A.k.data();
  ops::linear_forward(qdst, A.xn1.data(), P.wq->w, N, d.d, d.q_dim());
  ops::linear_forward(kdst, A.xn1.data(), P.wk->w, N, d.d, d.kv_dim());
  ops::linear_forward(A.v.data(), A.xn1.data(), P.wv->w, N, d.d, d.kv_dim());
  if (d.qk_norm) {
    ops::head_rmsnorm_forward(A.q.data(), A.q_rstd.data(), A.q_raw.data(), P.q_norm->w, N,
                              d.n_heads, d.head_dim, d.norm_eps);
    ops::head_rmsnorm_forward(A.k.data(), A.k_rstd.data(), A.k_raw.data(), P.k_norm->w, N,
                              d.n_kv_heads, d.head_dim, d.norm_eps);
  }
  ops::rope_apply(A.q.data(), pos, N, d.n_heads, d.head_dim, d.rope_theta, false);
  ops::rope_apply(A.k.data(), pos, N, d.n_kv_heads, d.head_dim, d.rope_theta, false);
}

void TransformerStack::block_out(i64 l, const float* x, float* out, i64 N, BlockActs& A) {
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  ops::linear_forward(A.mid.data(), A.att.data(), P.wo->w, N, d.q_dim(), d.d);
  float* mid = A.mid.data();
#pragma omp parallel for schedule(static) if (N * d.d > (1 << 15))
  for (i64 i = 0; i < N * d.d; ++i) mid[i] += x[i];
  // feed-forward sub-layer
  ops::rmsnorm_forward(A.xn2.data(), A.rstd2.data(), mid, P.ffn_norm->w, N, d.d, d.norm_eps);
  ops::linear_forward(A.a.data(), A.xn2.data(), P.w1->w, N, d.d, d.d_ff);
  ops::linear_forward(A.b.data(), A.xn2.data(), P.w3->w, N, d.d, d.d_ff);
  ops::swiglu_forward(A.h.data(), A.a.data(), A.b.data(), N * d.d_ff);
  ops::linear_forward(out, A.h.data(), P.w2->w, N, d.d_ff, d.d);
#pragma omp parallel for schedule(static) if (N * d.d > (1 << 15))
  for (i64 i = 0; i < N * d.d; ++i) out[i] += mid[i];
}

// ---- inference with a KV cache ----

void KVCache::init(i64 layers, i64 kvd, i64 seqs, i64 maxlen) {
  DLCM_CHECK(seqs >= 1 && maxlen >= 1, "KVCache: need at least one sequence of one position, got ",
             seqs, " x ", maxlen);
  n_layers = layers;
  kv_dim = kvd;
  max_seqs = seqs;
  max_len = maxlen;
  k.assign(layers, Buf(seqs * maxlen * kvd, 0.0f));
  v.assign(layers, Buf(seqs * maxlen * kvd, 0.0f));
  len.assign(seqs, 0);
  positions_run = 0;
}

KVCache TransformerStack::make_cache(i64 max_seqs, i64 max_len) const {
  KVCache c;
  c.init(n_layers(), dims_.kv_dim(), max_seqs, max_len);
  return c;
}

void TransformerStack::reserve_infer(i64 max_rows) {
  if (max_rows <= inf_rows_) return;
  alloc_block_acts(inf_, dims_, max_rows);
  inf_out_[0].assign(max_rows * dims_.d, 0);
  inf_out_[1].assign(max_rows * dims_.d, 0);
  inf_pos_.assign(max_rows, 0);
  inf_rows_ = max_rows;
}

const float* TransformerStack::forward_cached(const float* x, const CacheChunk* chunks,
                                              i64 n_chunks, KVCache& cache) {
  const BlockDims& d = dims_;
  DLCM_CHECK(cache.n_layers == n_layers() && cache.kv_dim == d.kv_dim(),
             "internal: KVCache shaped for another stack");
  // Validate everything before any parallel region; build the rows' RoPE positions.
  std::vector<i64> row0(n_chunks);
  i64 R = 0, max_n = 0;
  for (i64 c = 0; c < n_chunks; ++c) {
    const CacheChunk& ch = chunks[c];
    DLCM_CHECK(ch.seq >= 0 && ch.seq < cache.max_seqs, "internal: sequence ", ch.seq,
               " outside the cache's ", cache.max_seqs, " slots");
    DLCM_CHECK(ch.n >= 1, "internal: empty chunk for sequence ", ch.seq);
    DLCM_CHECK(cache.len[ch.seq] + ch.n <= cache.max_len, "sequence ", ch.seq, " holds ",
               cache.len[ch.seq], " positions; ", ch.n, " more exceed the cache's ",
               cache.max_len);
    for (i64 c2 = 0; c2 < c; ++c2)
      DLCM_CHECK(chunks[c2].seq != ch.seq, "internal: sequence ", ch.seq,
                 " appears twice in one forward_cached call");
    row0[c] = R;
    R += ch.n;
    max_n = std::max(max_n, ch.n);
  }
  DLCM_CHECK(R <= inf_rows_, "internal: forward_cached with ", R, " rows beyond the reserved ",
             inf_rows_);
  for (i64 c = 0; c < n_chunks; ++c)
    for (i64 i = 0; i < chunks[c].n; ++i) inf_pos_[row0[c] + i] = i32(cache.len[chunks[c].seq] + i);

  BlockActs& A = inf_;
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  const i64 kvd = d.kv_dim(), qd = d.q_dim();
  const float* cur = x;
  for (i64 l = 0; l < n_layers(); ++l) {
    block_qkv(l, cur, inf_pos_.data(), R, A);
    // Append the new keys and values, then attend per sequence over everything it holds.
    for (i64 c = 0; c < n_chunks; ++c) {
      const CacheChunk& ch = chunks[c];
      const i64 p0 = cache.len[ch.seq];
      std::copy_n(A.k.data() + row0[c] * kvd, ch.n * kvd, cache.k_at(l, ch.seq, p0));
      std::copy_n(A.v.data() + row0[c] * kvd, ch.n * kvd, cache.v_at(l, ch.seq, p0));
    }
    // Decode (all chunks short): one sequence per thread, the kernel runs serially inside.
    // Prefill: chunk after chunk, the kernel parallel inside.
#pragma omp parallel for schedule(dynamic, 1) if (n_chunks > 1 && max_n < 16)
    for (i64 c = 0; c < n_chunks; ++c) {
      const CacheChunk& ch = chunks[c];
      const i64 p0 = cache.len[ch.seq];
      ops::attention_forward(A.att.data() + row0[c] * qd, A.lse.data() + row0[c] * d.n_heads,
                             A.q.data() + row0[c] * qd, cache.k_at(l, ch.seq, 0),
                             cache.v_at(l, ch.seq, 0), 1, ch.n, p0 + ch.n, d.n_heads,
                             d.n_kv_heads, d.head_dim, p0, scale, d.window);
    }
    float* out = inf_out_[l % 2].data();
    block_out(l, cur, out, R, A);
    cur = out;
  }
  for (i64 c = 0; c < n_chunks; ++c) cache.len[chunks[c].seq] += chunks[c].n;
  cache.positions_run += R;
  return cur;
}

void TransformerStack::backward(float* dx, const float* dout, i64 B, i64 L,
                                const std::function<void(i64)>& block_done) {
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
    if (block_done) block_done(layers_[l].attn_norm->offset);  // registered first in a block
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
                          d.n_kv_heads, d.head_dim, 0, scale, d.window);
  ops::rope_apply(g_q_.data(), pos_, N, d.n_heads, d.head_dim, d.rope_theta, true);
  ops::rope_apply(g_k_.data(), pos_, N, d.n_kv_heads, d.head_dim, d.rope_theta, true);
  if (d.qk_norm) {
    clear(g_raw_, N * d.q_dim());
    ops::head_rmsnorm_backward(g_raw_.data(), P.q_norm->g, g_q_.data(), A.q_raw.data(), P.q_norm->w,
                               A.q_rstd.data(), N, d.n_heads, d.head_dim);
    std::memcpy(g_q_.data(), g_raw_.data(), sizeof(float) * N * d.q_dim());
    clear(g_raw_, N * d.kv_dim());
    ops::head_rmsnorm_backward(g_raw_.data(), P.k_norm->g, g_k_.data(), A.k_raw.data(), P.k_norm->w,
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
