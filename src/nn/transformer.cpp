#include "nn/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/parallel.h"
#include "core/profiler.h"
#include "kernels/dlcm_ops.h"
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

// Sizes the buffers of one block's forward for N rows: size(buf, n) for each.
template <class Size>
static void size_block_acts(BlockActs& a, const BlockDims& d, i64 N, Size size) {
  for (Buf* b : {&a.xn1, &a.mid, &a.xn2}) size(*b, N * d.d);
  for (Buf* b : {&a.rstd1, &a.rstd2}) size(*b, N);
  if (d.qk_norm) {
    size(a.q_raw, N * d.q_dim());
    size(a.k_raw, N * d.kv_dim());
    size(a.q_rstd, N * d.n_heads);
    size(a.k_rstd, N * d.n_kv_heads);
  }
  for (Buf* b : {&a.q, &a.att}) size(*b, N * d.q_dim());
  for (Buf* b : {&a.k, &a.v}) size(*b, N * d.kv_dim());
  size(a.lse, N * d.n_heads);
  for (Buf* b : {&a.a, &a.b, &a.h}) size(*b, N * d.d_ff);
}

static void alloc_block_acts(BlockActs& a, const BlockDims& d, i64 N) {
  size_block_acts(a, d, N, [](Buf& b, i64 n) { b.assign(n, 0); });
}

static void alloc_block_grads(BlockGrads& g, const BlockDims& d, i64 N) {
  for (Buf* b : {&g.res, &g.res2, &g.xn, &g.mid}) b->assign(N * d.d, 0);
  for (Buf* b : {&g.q, &g.att}) b->assign(N * d.q_dim(), 0);
  for (Buf* b : {&g.k, &g.v}) b->assign(N * d.kv_dim(), 0);
  for (Buf* b : {&g.a, &g.b, &g.h}) b->assign(N * d.d_ff, 0);
  if (d.qk_norm) g.raw.assign(N * std::max(d.q_dim(), d.kv_dim()), 0);
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
  alloc_block_grads(grads_, d, N);
}

const float* TransformerStack::forward(const float* x, const i32* pos, i64 B, i64 L) {
  DLCM_CHECK(B * L <= cap_rows_ && B <= cap_B_ && L <= cap_L_,
             "internal: TransformerStack::forward beyond reserved size");
  input_ = x;
  pos_ = pos;
  last_B_ = B;
  last_L_ = L;
  n_ext_ = 0;
  const float* cur = x;
  for (i64 l = 0; l < n_layers(); ++l) {
    block_forward(l, cur, pos, B, L);
    cur = acts_[l].out.data();
  }
  return cur;
}

// (query, key) pairs the causal (or windowed) attention of B rows of L tokens computes (FLOP
// counts of the benchmark's detail rows).
double TransformerStack::attention_pairs(i64 B, i64 L) const {
  const i64 w = dims_.window;
  double per_row = 0;
  if (w > 0 && w < L)
    per_row = double(w) * (w + 1) / 2 + double(L - w) * w;
  else
    per_row = double(L) * (L + 1) / 2;
  return double(B) * per_row;
}

void TransformerStack::block_forward(i64 l, const float* x, const i32* pos, i64 B, i64 L) {
  const BlockDims& d = dims_;
  BlockActs& A = acts_[l];
  block_qkv(l, x, pos, B * L, A);
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  {
    prof::DetailScope ps("  attention kernel",
                         4.0 * attention_pairs(B, L) * d.n_heads * d.head_dim);
    ops::attention_forward(A.att.data(), A.lse.data(), A.q.data(), A.k.data(), A.v.data(), B, L,
                           L, d.n_heads, d.n_kv_heads, d.head_dim, 0, scale, d.window);
  }
  block_out(l, x, A.out.data(), B * L, A);
}

void TransformerStack::block_qkv(i64 l, const float* x, const i32* pos, i64 N, BlockActs& A,
                                 float* K, float* V) {
  if (!K) K = A.k.data();
  if (!V) V = A.v.data();
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  {  // BF16: the norm writes the rounding the q/k/v products read (ops::CopyProducer), and
     // only that: the products' forward and backward are xn1's only readers
    ops::CopyProducer p16(&A.xn1_16, N, d.d);
    ops::rmsnorm_forward(p16.floats(A.xn1.data()), A.rstd1.data(), x, P.attn_norm->w, N, d.d,
                         d.norm_eps, p16.data());
    p16.done(A.xn1.data());
  }
  float* qdst = d.qk_norm ? A.q_raw.data() : A.q.data();
  float* kdst = d.qk_norm ? A.k_raw.data() : K;
  {
    float* y[3] = {qdst, kdst, V};
    const float* W[3] = {P.wq->w, P.wk->w, P.wv->w};
    const i64 out[3] = {d.q_dim(), d.kv_dim(), d.kv_dim()};
    ops::Bf16Copy* wk16[3] = {&A.wq_16, &A.wk_16, &A.wv_16};
    ops::linear_forward_multi(y, A.xn1.data(), W, N, d.d, out, 3, &A.xn1_16, wk16);
  }
  qk_norm_rope(l, pos, N, pos, N, A, K);
}

void TransformerStack::qk_norm_rope(i64 l, const i32* qpos, i64 nq, const i32* kpos, i64 nk,
                                    BlockActs& A, float* K) {
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  if (d.qk_norm) {
    ops::head_rmsnorm_forward(A.q.data(), A.q_rstd.data(), A.q_raw.data(), P.q_norm->w, nq,
                              d.n_heads, d.head_dim, d.norm_eps);
    ops::head_rmsnorm_forward(K, A.k_rstd.data(), A.k_raw.data(), P.k_norm->w, nk,
                              d.n_kv_heads, d.head_dim, d.norm_eps);
  }
  ops::rope_apply(A.q.data(), qpos, nq, d.n_heads, d.head_dim, d.rope_theta, false);
  ops::rope_apply(K, kpos, nk, d.n_kv_heads, d.head_dim, d.rope_theta, false);
}

void TransformerStack::block_qkv_last(i64 l, const float* x, const i32* pos, i64 N,
                                      const i64* last, i64 n_last, BlockActs& A, float* K,
                                      float* V) {
  if (!K) K = A.k.data();
  if (!V) V = A.v.data();
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  ops::rmsnorm_forward(A.xn1.data(), A.rstd1.data(), x, P.attn_norm->w, N, d.d, d.norm_eps);
  float* qdst = d.qk_norm ? A.q_raw.data() : A.q.data();
  float* kdst = d.qk_norm ? A.k_raw.data() : K;
  {  // k and v of every row: the group's parts after q (packed), or two products
    float* y[2] = {kdst, V};
    const float* W[2] = {P.wk->w, P.wv->w};
    const i64 out[2] = {d.kv_dim(), d.kv_dim()};
    ops::linear_forward_multi(y, A.xn1.data(), W, N, d.d, out, 2);
  }
  std::vector<i32> qpos(n_last);
  for (i64 c = 0; c < n_last; ++c) {
    std::copy_n(A.xn1.data() + last[c] * d.d, d.d, inf_->xq.data() + c * d.d);
    qpos[c] = pos[last[c]];
  }
  {  // q of the listed rows: the group's first part
    float* y[1] = {qdst};
    const float* W[1] = {P.wq->w};
    const i64 out[1] = {d.q_dim()};
    ops::linear_forward_multi(y, inf_->xq.data(), W, n_last, d.d, out, 1);
  }
  qk_norm_rope(l, qpos.data(), n_last, pos, N, A, K);
}

void TransformerStack::block_out(i64 l, const float* x, float* out, i64 N, BlockActs& A) {
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  ops::linear_forward(A.mid.data(), A.att.data(), P.wo->w, N, d.q_dim(), d.d, &A.att_16,
                      &A.wo_16);
  float* mid = A.mid.data();
  ops::add_inplace(mid, x, N * d.d);
  // feed-forward sub-layer
  {
    ops::CopyProducer p16(&A.xn2_16, N, d.d);  // w1/w3 read xn2 alone (forward and backward)
    ops::rmsnorm_forward(p16.floats(A.xn2.data()), A.rstd2.data(), mid, P.ffn_norm->w, N, d.d,
                         d.norm_eps, p16.data());
    p16.done(A.xn2.data());
  }
  const float* W13[2] = {P.w1->w, P.w3->w};
  ops::Bf16Copy* wk16[2] = {&A.w1_16, &A.w3_16};
  // a stream's packed FFN: SwiGLU in the gate/up product (A.a, A.b left untouched)
  if (!ops::linear_swiglu_packed(A.h.data(), A.xn2.data(), W13, N, d.d, d.d_ff, &A.xn2_16, wk16,
                                 &A.h_16)) {
    float* y[2] = {A.a.data(), A.b.data()};
    const i64 out[2] = {d.d_ff, d.d_ff};
    ops::linear_forward_multi(y, A.xn2.data(), W13, N, d.d, out, 2, &A.xn2_16, wk16);
    ops::CopyProducer p16(&A.h_16, N, d.d_ff);
    prof::DetailScope ps("  SwiGLU");  // a pass bound by memory: its own row (--breakdown-gemm)
    // w2 reads h alone (forward and backward)
    ops::swiglu_forward(p16.floats(A.h.data()), A.a.data(), A.b.data(), N * d.d_ff, p16.data());
    p16.done(A.h.data());
  }
  ops::linear_forward(out, A.h.data(), P.w2->w, N, d.d_ff, d.d, &A.h_16, &A.w2_16);
  ops::add_inplace(out, mid, N * d.d);
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

namespace {
template <class V>
void grow(V& b, i64 n) {
  if (i64(b.size()) < n) b.assign(n, 0);
}
}  // namespace

void TransformerStack::reserve_infer(i64 max_rows) {
  if (max_rows <= inf_rows_) return;
  // grow only: another stack may share these buffers (share_infer)
  const i64 N = max_rows;
  InferBuffers& b = *inf_;
  size_block_acts(b.acts, dims_, N, [](Buf& x, i64 n) { grow(x, n); });
  for (Buf* x : {&b.out[0], &b.out[1], &b.last, &b.xq}) grow(*x, N * dims_.d);
  grow(b.pos, N);
  inf_rows_ = max_rows;
}

void TransformerStack::share_infer(TransformerStack& with) {
  if (inf_ == with.inf_) return;
  inf_ = with.inf_;
  const i64 rows = inf_rows_;
  inf_rows_ = 0;
  if (rows > 0) reserve_infer(rows);
}

const float* TransformerStack::forward_cached(const float* x, const CacheChunk* chunks,
                                              i64 n_chunks, KVCache& cache, bool last_rows) {
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
    for (i64 i = 0; i < chunks[c].n; ++i) inf_->pos[row0[c] + i] = i32(cache.len[chunks[c].seq] + i);

  BlockActs& A = inf_->acts;
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  const i64 kvd = d.kv_dim(), qd = d.q_dim();
  std::vector<i64> last_row(n_chunks);  // each chunk's last row
  for (i64 c = 0; c < n_chunks; ++c) last_row[c] = row0[c] + chunks[c].n - 1;
  const float* cur = x;
  for (i64 l = 0; l < n_layers(); ++l) {
    // The final layer with last_rows: only each chunk's last query, into row c (its keys and
    // values are every position's); it skips (n - 1) rows of q, attention, wo and FFN per
    // chunk, an eighth of a 6-layer prefill's products.
    const bool only_last = last_rows && l == n_layers() - 1 && R > n_chunks;
    // One sequence (a prefill, a single decode step): its new keys and values go straight into
    // its cache rows; several: into A, then each sequence's rows into its cache.
    const bool direct = n_chunks == 1;
    const i64 s0 = direct ? chunks[0].seq : 0;
    float* K = direct ? cache.k_at(l, s0, cache.len[s0]) : nullptr;
    float* V = direct ? cache.v_at(l, s0, cache.len[s0]) : nullptr;
    if (only_last)
      block_qkv_last(l, cur, inf_->pos.data(), R, last_row.data(), n_chunks, A, K, V);
    else
      block_qkv(l, cur, inf_->pos.data(), R, A, K, V);
    for (i64 c = 0; c < n_chunks && !direct; ++c) {
      const CacheChunk& ch = chunks[c];
      const i64 p0 = cache.len[ch.seq];
      std::copy_n(A.k.data() + row0[c] * kvd, ch.n * kvd, cache.k_at(l, ch.seq, p0));
      std::copy_n(A.v.data() + row0[c] * kvd, ch.n * kvd, cache.v_at(l, ch.seq, p0));
    }
    // Then attend per sequence over everything it holds.
    // Decode (all chunks short): one sequence per thread, the kernel runs serially inside.
    // Prefill: chunk after chunk, the kernel parallel inside, outside any parallel region (not
    // in one made inactive by an if clause: the kernel's region would then be a nested one,
    // for which libgomp starts and ends a thread at every call, beside its pool's own).
    auto attend = [&](i64 c) {
      const CacheChunk& ch = chunks[c];
      const i64 p0 = cache.len[ch.seq];
      const i64 first = only_last ? ch.n - 1 : 0;  // the chunk's first query attended
      const i64 orow = only_last ? c : row0[c];
      ops::attention_forward(A.att.data() + orow * qd, A.lse.data() + orow * d.n_heads,
                             A.q.data() + orow * qd, cache.k_at(l, ch.seq, 0),
                             cache.v_at(l, ch.seq, 0), 1, ch.n - first, p0 + ch.n, d.n_heads,
                             d.n_kv_heads, d.head_dim, p0 + first, scale, d.window);
    };
    if (n_chunks > 1 && max_n < 16 && team_possible()) {  // no region for a team of one
#pragma omp parallel for schedule(dynamic, 1)
      for (i64 c = 0; c < n_chunks; ++c) attend(c);
    } else {
      for (i64 c = 0; c < n_chunks; ++c) attend(c);
    }
    float* out = inf_->out[l % 2].data();
    if (only_last) {
      for (i64 c = 0; c < n_chunks; ++c)
        std::copy_n(cur + last_row[c] * d.d, d.d, inf_->last.data() + c * d.d);
      block_out(l, inf_->last.data(), out, n_chunks, A);
    } else {
      block_out(l, cur, out, R, A);
    }
    cur = out;
  }
  if (last_rows && n_layers() == 0) {  // no layer to run: the input's last rows
    float* out = inf_->out[0].data();
    for (i64 c = 0; c < n_chunks; ++c) std::copy_n(x + last_row[c] * d.d, d.d, out + c * d.d);
    cur = out;
  }
  for (i64 c = 0; c < n_chunks; ++c) cache.len[chunks[c].seq] += chunks[c].n;
  cache.positions_run += R;
  return cur;
}

void TransformerStack::backward(float* dx, const float* dout, i64 B, i64 L,
                                const std::function<void(i64)>& block_done, float* dxe,
                                const float* doute) {
  DLCM_CHECK(n_ext_ == 0 || (dxe != nullptr && doute != nullptr),
             "internal: TransformerStack::backward without the gradients of its prefix rows");
  const i64 ne = n_ext_;
  const float* g_cur = dout;
  const float* ge_cur = doute;
  for (i64 l = n_layers() - 1; l >= 0; --l) {
    const float* x = l == 0 ? input_ : acts_[l - 1].out.data();
    const float* xe = l == 0 ? ext_input_ : (ne ? ext_acts_[l - 1].out.data() : nullptr);
    float* g_prev = dx;  // layer 0 accumulates into the caller's buffers
    float* ge_prev = dxe;
    if (l > 0) {  // the block writes these (no clearing), layer 0 adds into the caller's
      g_prev = (g_cur == grads_.res.data()) ? grads_.res2.data() : grads_.res.data();
      if (ne)
        ge_prev = (ge_cur == ext_grads_.res.data()) ? ext_grads_.res2.data()
                                                    : ext_grads_.res.data();
    }
    block_backward(l, g_prev, g_cur, x, B, L, ge_prev, ge_cur, xe, /*dx_accumulate=*/l == 0);
    if (block_done) block_done(layers_[l].attn_norm->offset);  // registered first in a block
    g_cur = g_prev;
    ge_cur = ge_prev;
  }
}

namespace {

void clear(Buf& b, i64 n) { std::memset(b.data(), 0, sizeof(float) * n); }

// Prefix rows' attention: row i (queries q, own key/value ke/ve) attends the positions < pos[i]
// of sequence seq[i], whose keys/values start at K/V + seq[i] * stride (dense [len, kv]), and
// itself: concept_attention_step with multiplicities 1 and the own entry last.
void prefix_attention_forward(float* att, const float* q, const float* ke, const float* ve,
                              const float* K, const float* V, i64 stride, const i32* seq,
                              const i32* pos, i64 n, const BlockDims& d) {
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  const i64 qd = d.q_dim(), kvd = d.kv_dim();
  i64 max_pos = 0;
  for (i64 i = 0; i < n; ++i) max_pos = std::max<i64>(max_pos, pos[i]);
#pragma omp parallel if (parallel_worth(n * qd * (max_pos + 1)))
  {
    std::vector<float> sc(max_pos + 1);
#pragma omp for schedule(dynamic, 16)
    for (i64 i = 0; i < n; ++i)
      ops::concept_attention_step(att + i * qd, q + i * qd, K + seq[i] * stride,
                                  V + seq[i] * stride, kvd, nullptr, pos[i] + 1, d.n_heads,
                                  d.n_kv_heads, d.head_dim, scale, ke + i * kvd, ve + i * kvd,
                                  sc.data());
  }
}

// Its backward: dq/dke/dve of the rows and dK/dV of the positions they read (+=), parallel over
// (sequence, kv head); rows of one sequence are contiguous (seq non-decreasing).
void prefix_attention_backward(float* dq, float* dke, float* dve, float* dK, float* dV,
                               const float* datt, const float* q, const float* ke,
                               const float* ve, const float* K, const float* V, i64 stride,
                               const i32* seq, const i32* pos, i64 n, const BlockDims& d) {
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  const i64 qd = d.q_dim(), kvd = d.kv_dim(), Hkv = d.n_kv_heads;
  std::vector<i64> first;  // first row of each run of equal seq, plus the end
  i64 max_pos = 0;
  for (i64 i = 0; i < n; ++i) {
    if (i == 0 || seq[i] != seq[i - 1]) first.push_back(i);
    max_pos = std::max<i64>(max_pos, pos[i]);
  }
  first.push_back(n);
  const i64 runs = i64(first.size()) - 1;
#pragma omp parallel if (parallel_worth(n * qd * (max_pos + 1)))
  {
    std::vector<float> sc(2 * (max_pos + 1));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (i64 u = 0; u < runs; ++u)
      for (i64 g = 0; g < Hkv; ++g)
        for (i64 i = first[u]; i < first[u + 1]; ++i) {
          const i64 o = seq[i] * stride;
          ops::concept_attention_step_backward(
              dq + i * qd, dK + o, dV + o, dke + i * kvd, dve + i * kvd, datt + i * qd,
              q + i * qd, K + o, V + o, kvd, nullptr, pos[i] + 1, d.n_heads, Hkv, d.head_dim,
              scale, g, ke + i * kvd, ve + i * kvd, sc.data());
        }
  }
}

}  // namespace

void TransformerStack::block_backward(i64 l, float* dx, const float* dout, const float* x, i64 B,
                                      i64 L, float* dxe, const float* doute, const float* xe,
                                      bool dx_accumulate) {
  const BlockDims& d = dims_;
  BlockActs& A = acts_[l];
  BlockGrads& G = grads_;
  const i64 N = B * L;
  block_backward_out(l, dout, N, A, G);
  const float scale = 1.0f / std::sqrt(float(d.head_dim));
  {
    prof::DetailScope ps("  attention kernel",
                         8.0 * attention_pairs(B, L) * d.n_heads * d.head_dim);
    ops::attention_backward(G.q.data(), G.k.data(), G.v.data(), G.att.data(), A.att.data(),
                            A.lse.data(), A.q.data(), A.k.data(), A.v.data(), B, L, L, d.n_heads,
                            d.n_kv_heads, d.head_dim, 0, scale, d.window,
                            /*accumulate=*/false);  // writes G.q/k/v: no clearing pass
  }
  if (n_ext_ > 0) {
    // The prefix rows read this layer's keys/values: their share joins G.k/G.v before the
    // keys' RoPE/QK-norm backward.
    const i64 ne = n_ext_;
    BlockActs& E = ext_acts_[l];
    BlockGrads& EG = ext_grads_;
    block_backward_out(l, doute, ne, E, EG);
    clear(EG.q, ne * d.q_dim());
    clear(EG.k, ne * d.kv_dim());
    clear(EG.v, ne * d.kv_dim());
    prefix_attention_backward(EG.q.data(), EG.k.data(), EG.v.data(), G.k.data(), G.v.data(),
                              EG.att.data(), E.q.data(), E.k.data(), E.v.data(), A.k.data(),
                              A.v.data(), L * d.kv_dim(), ext_seq_.data(), ext_pos_.data(), ne,
                              d);
    block_backward_qkv(l, dxe, xe, ext_pos_.data(), ne, E, EG, dx_accumulate);
  }
  block_backward_qkv(l, dx, x, pos_, N, A, G, dx_accumulate);
}

void TransformerStack::block_backward_out(i64 l, const float* dout, i64 N, BlockActs& A,
                                          BlockGrads& G) {
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  // out = mid + w2(h): dh = dout W2, dW2 += dout^T h. The scratch gradients G.* are written by
  // their first producer (dx_accumulate / accumulate false) instead of cleared and accumulated:
  // a pass less over each.
  // BF16: dout's rounding comes from the block above's attention norm backward (G.res_16) when
  // dout is that block's dx; the producers below write the roundings of G.a, G.b and G.mid.
  ops::linear_backward(G.h.data(), P.w2->g, dout, A.h.data(), P.w2->w, N, d.d_ff, d.d,
                       &A.h_16, false, &A.w2_16, &G.res_16);
  {
    ops::CopyProducer pa(&G.a_16, N, d.d_ff), pb(&G.b_16, N, d.d_ff);
    prof::DetailScope ps("  SwiGLU");
    // da, db are w1's and w3's dy, read by their two products alone
    ops::swiglu_backward(pa.floats(G.a.data()), pb.floats(G.b.data()), G.h.data(), A.a.data(),
                         A.b.data(), N * d.d_ff, false, pa.data(), pb.data());
    pa.done(G.a.data());
    pb.done(G.b.data());
  }
  ops::linear_backward(G.xn.data(), P.w1->g, G.a.data(), A.xn2.data(), P.w1->w, N, d.d, d.d_ff,
                       &A.xn2_16, false, &A.w1_16, &G.a_16);
  ops::linear_backward(G.xn.data(), P.w3->g, G.b.data(), A.xn2.data(), P.w3->w, N, d.d, d.d_ff,
                       &A.xn2_16, true, &A.w3_16, &G.b_16);
  // d mid = dout (residual) + norm backward, written in one pass
  {
    ops::CopyProducer p16(&G.mid_16, N, d.d);
    ops::rmsnorm_backward(G.mid.data(), P.ffn_norm->g, G.xn.data(), A.mid.data(),
                          P.ffn_norm->w, A.rstd2.data(), N, d.d, dout, false, p16.data());
    p16.done(G.mid.data());
  }
  // mid = x + wo(att)
  ops::linear_backward(G.att.data(), P.wo->g, G.mid.data(), A.att.data(), P.wo->w, N, d.q_dim(),
                       d.d, &A.att_16, false, &A.wo_16, &G.mid_16);
}

void TransformerStack::block_backward_qkv(i64 l, float* dx, const float* x, const i32* pos,
                                          i64 N, BlockActs& A, BlockGrads& G,
                                          bool dx_accumulate) {
  const BlockDims& d = dims_;
  const BlockParams& P = layers_[l];
  // BF16 without QK-norm: the rotation writes dq's and dk's roundings, the q and k products'
  // dy (and only those: the products are their only readers)
  ops::CopyProducer pq(&G.q_16, d.qk_norm ? 0 : N, d.q_dim()),
      pk(&G.k_16, d.qk_norm ? 0 : N, d.kv_dim());
  ops::rope_apply(G.q.data(), pos, N, d.n_heads, d.head_dim, d.rope_theta, true, pq.data(),
                  pq.floats(G.q.data()) != nullptr);
  ops::rope_apply(G.k.data(), pos, N, d.n_kv_heads, d.head_dim, d.rope_theta, true, pk.data(),
                  pk.floats(G.k.data()) != nullptr);
  pq.done(G.q.data());
  pk.done(G.k.data());
  if (d.qk_norm) {
    clear(G.raw, N * d.q_dim());
    ops::head_rmsnorm_backward(G.raw.data(), P.q_norm->g, G.q.data(), A.q_raw.data(),
                               P.q_norm->w, A.q_rstd.data(), N, d.n_heads, d.head_dim);
    std::memcpy(G.q.data(), G.raw.data(), sizeof(float) * N * d.q_dim());
    clear(G.raw, N * d.kv_dim());
    ops::head_rmsnorm_backward(G.raw.data(), P.k_norm->g, G.k.data(), A.k_raw.data(),
                               P.k_norm->w, A.k_rstd.data(), N, d.n_kv_heads, d.head_dim);
    std::memcpy(G.k.data(), G.raw.data(), sizeof(float) * N * d.kv_dim());
  }
  ops::linear_backward(G.xn.data(), P.wq->g, G.q.data(), A.xn1.data(), P.wq->w, N, d.d,
                       d.q_dim(), &A.xn1_16, false, &A.wq_16, &G.q_16);
  ops::linear_backward(G.xn.data(), P.wk->g, G.k.data(), A.xn1.data(), P.wk->w, N, d.d,
                       d.kv_dim(), &A.xn1_16, true, &A.wk_16, &G.k_16);
  ops::linear_backward(G.xn.data(), P.wv->g, G.v.data(), A.xn1.data(), P.wv->w, N, d.d,
                       d.kv_dim(), &A.xn1_16, true, &A.wv_16);
  // x feeds both the residual and the norm: dx (+)= d mid + norm backward, in one pass. BF16:
  // where dx is the block below's dout (written, not added into the caller's buffer), its
  // rounding too, for that block's w2 products (no rows: no copy).
  ops::CopyProducer p16(&G.res_16, dx_accumulate ? 0 : N, d.d);
  ops::rmsnorm_backward(dx, P.attn_norm->g, G.xn.data(), x, P.attn_norm->w, A.rstd1.data(), N,
                        d.d, G.mid.data(), dx_accumulate, p16.data());
  p16.done(dx);
}

// ---- prefix rows ----

void TransformerStack::reserve_prefix_rows(i64 n) {
  if (n <= cap_ext_) return;
  ext_acts_.resize(n_layers());
  for (auto& a : ext_acts_) {
    alloc_block_acts(a, dims_, n);
    a.out.assign(n * dims_.d, 0);
  }
  alloc_block_grads(ext_grads_, dims_, n);
  ext_pos_.assign(n, 0);
  ext_seq_.assign(n, 0);
  cap_ext_ = n;
}

const float* TransformerStack::forward_prefix_rows(const float* xe, const i32* seq,
                                                   const i32* pos, i64 n) {
  const BlockDims& d = dims_;
  DLCM_CHECK(n <= cap_ext_, "internal: TransformerStack::forward_prefix_rows beyond reserved (",
             n, " > ", cap_ext_, ")");
  DLCM_CHECK(d.window == 0, "internal: prefix rows need full causal attention");
  for (i64 i = 0; i < n; ++i)
    DLCM_CHECK(seq[i] >= 0 && seq[i] < last_B_ && pos[i] >= 0 && pos[i] < last_L_ &&
                   (i == 0 || seq[i] >= seq[i - 1]),
               "internal: prefix row ", i, " at (", seq[i], ", ", pos[i],
               ") outside the last forward's ", last_B_, " x ", last_L_, " or out of order");
  std::copy_n(pos, n, ext_pos_.data());
  std::copy_n(seq, n, ext_seq_.data());
  ext_input_ = xe;
  n_ext_ = n;
  const float* cur = xe;
  for (i64 l = 0; l < n_layers(); ++l) {
    BlockActs& A = acts_[l];
    BlockActs& E = ext_acts_[l];
    block_qkv(l, cur, ext_pos_.data(), n, E);
    prefix_attention_forward(E.att.data(), E.q.data(), E.k.data(), E.v.data(), A.k.data(),
                             A.v.data(), last_L_ * d.kv_dim(), ext_seq_.data(), ext_pos_.data(),
                             n, d);
    block_out(l, cur, E.out.data(), n, E);
    cur = E.out.data();
  }
  return cur;
}

const float* TransformerStack::forward_cached_prefix_rows(const float* x, const i32* seq,
                                                          const i32* pos, i64 n,
                                                          KVCache& cache) {
  const BlockDims& d = dims_;
  DLCM_CHECK(cache.n_layers == n_layers() && cache.kv_dim == d.kv_dim(),
             "internal: KVCache shaped for another stack");
  DLCM_CHECK(d.window == 0, "internal: prefix rows need full causal attention");
  DLCM_CHECK(n <= inf_rows_, "internal: forward_cached_prefix_rows with ", n,
             " rows beyond the reserved ", inf_rows_);
  for (i64 i = 0; i < n; ++i)
    DLCM_CHECK(seq[i] >= 0 && seq[i] < cache.max_seqs && pos[i] >= 0 &&
                   pos[i] <= cache.len[seq[i]],
               "internal: prefix row ", i, " at position ", pos[i], " of sequence ", seq[i],
               " beyond its cached positions");
  std::copy_n(pos, n, inf_->pos.data());
  BlockActs& A = inf_->acts;
  const float* cur = x;
  for (i64 l = 0; l < n_layers(); ++l) {
    block_qkv(l, cur, inf_->pos.data(), n, A);
    prefix_attention_forward(A.att.data(), A.q.data(), A.k.data(), A.v.data(),
                             cache.k[l].data(), cache.v[l].data(), cache.max_len * d.kv_dim(),
                             seq, inf_->pos.data(), n, d);
    float* out = inf_->out[l % 2].data();
    block_out(l, cur, out, n, A);
    cur = out;
  }
  cache.positions_run += n;
  return cur;
}

}  // namespace dlcm
