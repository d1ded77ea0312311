// Streaming DLCM inference (SPEC section 5). Per slot the state is: the encoder, backbone and
// decoder KV caches; the router's last q; the open concept's running sum of H, token count,
// start probability and forced flag; the smoother's last value; and the cross-attention K/V of
// the concept list [z_null, zs_0, ...] with the multiplicity of each entry. For a group of new
// tokens (a prefill of one or several prompts, or one token of each of several slots):
//   1. embed + encoder (cached) + encoder.norm -> H, router q/k, p (threshold tau -> b);
//   2. every boundary closes the open concept: its mean-pooled H goes through W_up, the backbone
//      (cached, one position per closed concept), backbone.norm, the smoother, K/V, and becomes
//      the next list entry; the boundary token opens a new concept;
//   3. each token attends list entries 0..seg(t) with multiplicities (len of closed segments,
//      t - start + 1 for its own), then the cross FFN, the decoder (cached) and the head.
// The arithmetic of every piece matches the full forward pass (same kernels for the router's
// cosine, pooling sums in token order, the smoother's expression), so thresholded decisions
// agree with DlcmModel::logits() and the logits agree to float tolerance.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/dlcm_ops.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "models/dlcm.h"

namespace dlcm {

class DlcmStream final : public InferenceStream {
 public:
  DlcmStream(DlcmModel& m, i64 max_seqs, i64 max_len, float tau)
      : InferenceStream(max_seqs, max_len, m.cfg_.vocab_size), m_(m) {
    const ModelConfig& c = m.cfg_;
    tau_ = tau < 0 ? c.router.tau : tau;
    m.decider_.check_ready();  // router.kind "word" without its table fails here, not mid-run
    DLCM_CHECK(!std::isnan(tau_), "stream: tau must be a number");
    d_ = c.d_token;
    dc_ = c.d_concept;
    ds_ = m.ds_;
    xq_ = m.xq_;
    xkv_ = m.xkv_;
    rows_ = std::max(max_len, max_seqs);
    enc_cache_ = m.enc_.make_cache(max_seqs, max_len);
    bb_cache_ = m.bb_.make_cache(max_seqs, max_len);
    dec_cache_ = m.dec_.make_cache(max_seqs, max_len);
    m.enc_.reserve_infer(rows_);
    m.bb_.reserve_infer(rows_);
    m.dec_.reserve_infer(rows_);
    for (Buf* b : {&x_, &H_, &hn_, &psi_, &pn_, &X_, &pooled_, &last_, &xn_}) b->assign(rows_ * d_, 0);
    for (Buf* b : {&rstd_, &hn_rstd_, &pn_rstd_, &z_rstd_, &p_, &gate_}) b->assign(rows_, 0);
    for (Buf* b : {&qx_raw_, &qx_, &att_}) b->assign(rows_ * xq_, 0);
    qx_rstd_.assign(rows_ * c.x_heads, 0);
    if (m.projected_)
      for (Buf* b : {&rq_, &rk_}) b->assign(rows_ * ds_, 0);
    for (Buf* b : {&fa_, &fb_, &fh_}) b->assign(rows_ * c.x_d_ff, 0);
    for (Buf* b : {&C_, &Z_, &zs_new_}) b->assign(rows_ * dc_, 0);
    for (Buf* b : {&k_raw_, &k_new_, &v_new_}) b->assign(rows_ * xkv_, 0);
    k_rstd_.assign(rows_ * c.x_kv_heads, 0);
    // per slot state
    q_last_.assign(max_seqs * ds_, 0);
    open_sum_.assign(max_seqs * d_, 0);
    zs_prev_.assign(max_seqs * dc_, 0);
    list_k_.assign(max_seqs * (max_len + 1) * xkv_, 0);
    list_v_.assign(max_seqs * (max_len + 1) * xkv_, 0);
    mult_.assign(max_seqs * (max_len + 1), 0);
    slots_.assign(max_seqs, Slot{});
    tokens_.assign(max_seqs * max_len, TokenConcept{});
    // K/V of the null concept, entry 0 of every slot's list.
    null_k_.assign(xkv_, 0);
    null_v_.assign(xkv_, 0);
    Buf raw(xkv_), rs(c.x_kv_heads);
    ops::linear_forward(raw.data(), m.x_null_->w, m.x_wk_->w, 1, dc_, xkv_);
    ops::head_rmsnorm_forward(null_k_.data(), rs.data(), raw.data(), m.x_kn_->w, 1, c.x_kv_heads,
                              c.head_dim, c.norm_eps);
    ops::linear_forward(null_v_.data(), m.x_null_->w, m.x_wv_->w, 1, dc_, xkv_);
    for (i64 s = 0; s < max_seqs; ++s) do_reset(s);
  }

  bool has_concepts() const override { return true; }
  TokenConcept token_concept(i64 seq, i64 pos) const override {
    DLCM_CHECK(pos >= 0 && pos < length(seq), "stream token_concept: position ", pos,
               " outside the slot's ", length(seq), " tokens");
    return tokens_[seq * max_len() + pos];
  }
  StreamCounters counters(i64 seq) const override {
    StreamCounters c;
    c.tokens = length(seq);
    const Slot& s = slots_[seq];
    c.concepts = s.closed + (s.open_count > 0 ? 1 : 0);
    c.concepts_closed = s.closed;
    c.backbone_positions = s.backbone_positions;
    return c;
  }

 protected:
  void do_reset(i64 seq) override {
    enc_cache_.reset(seq);
    bb_cache_.reset(seq);
    dec_cache_.reset(seq);
    slots_[seq] = Slot{};
    std::fill_n(zs_prev_.data() + seq * dc_, dc_, 0.f);
    std::copy_n(null_k_.data(), xkv_, entry_k(seq, 0));
    std::copy_n(null_v_.data(), xkv_, entry_v(seq, 0));
    mult_[seq * (max_len() + 1)] = 0;
  }

  void do_prefill(const PrefillItem* items, i64 n_items, float* logits, bool all_logits) override {
    prefill_in_groups(
        items, n_items, logits, all_logits, rows_, d_, last_.data(),
        [&](const PrefillItem* it, i64 n) { return run(it, n); },
        [&](const float* h, i64 N, float* out) {
          m_.head_.logits(h, N, out, xn_.data(), rstd_.data());
        });
  }

  void do_step(const i64* seqs, const i32* tokens, i64 n, float* logits) override {
    std::vector<PrefillItem> items(n);
    for (i64 i = 0; i < n; ++i) items[i] = {seqs[i], tokens + i, 1};
    m_.head_.logits(run(items.data(), n), n, logits, xn_.data(), rstd_.data());
  }

 private:
  struct Slot {
    i64 closed = 0;              // concepts closed (list entries beyond the null one)
    i64 open_count = 0;          // tokens in the open concept (0 only before the first token)
    i64 open_start = 0;          // position of its first token
    float open_p = 1.f;          // p at its first token
    bool open_forced = true;     // it starts at t = 0 or at a BOS token
    i64 doc_start = 0;           // position of the last forced boundary (rule routers)
    i64 backbone_positions = 0;  // backbone steps run for this slot
  };

  float* entry_k(i64 seq, i64 e) { return list_k_.data() + (seq * (max_len() + 1) + e) * xkv_; }
  float* entry_v(i64 seq, i64 e) { return list_v_.data() + (seq * (max_len() + 1) + e) * xkv_; }
  float* mult(i64 seq) { return mult_.data() + seq * (max_len() + 1); }

  // Runs everything up to the decoder output for the items' tokens (R rows in item order).
  const float* run(const PrefillItem* items, i64 n_items) {
    const ModelConfig& c = m_.cfg_;
    const float eps = c.norm_eps;
    std::vector<CacheChunk> chunks(n_items);
    std::vector<i64> row0(n_items);
    i64 R = 0;
    for (i64 i = 0; i < n_items; ++i) {
      ops::embedding_forward(x_.data() + R * d_, items[i].tokens, m_.tok_emb_->w, items[i].n, d_);
      chunks[i] = {items[i].seq, items[i].n};
      row0[i] = R;
      R += items[i].n;
    }
    // 1. encoder, H, router projections
    std::vector<i64> pos0(n_items);
    for (i64 i = 0; i < n_items; ++i) pos0[i] = enc_cache_.len[items[i].seq];
    const float* enc = m_.enc_.forward_cached(x_.data(), chunks.data(), n_items, enc_cache_);
    ops::rmsnorm_forward(H_.data(), rstd_.data(), enc, m_.enc_norm_->w, R, d_, eps);
    const float* q = H_.data();
    const float* k = H_.data();
    if (m_.projected_) {
      ops::linear_forward(rq_.data(), H_.data(), m_.r_wq_->w, R, d_, ds_);
      ops::linear_forward(rk_.data(), H_.data(), m_.r_wk_->w, R, d_, ds_);
      q = rq_.data();
      k = rk_.data();
    }
    // 2. p, b and concept bookkeeping, item by item, token by token
    i64 nc = 0;  // concepts closed in this call, all items
    std::vector<CacheChunk> bb_chunks;
    std::vector<i64> closed0(n_items), closed_n(n_items);
    seg_.assign(R, 0);
    start_.assign(R, 0);
    for (i64 i = 0; i < n_items; ++i) {
      const i64 s = items[i].seq, n = items[i].n;
      Slot& st = slots_[s];
      const BoundaryDecider& rule = m_.decider_;
      if (!rule.is_rule())
        router_probs(p_.data(), q + row0[i] * ds_, k + row0[i] * ds_, q_last_.data() + s * ds_, n);
      closed0[i] = nc;
      for (i64 t = 0; t < n; ++t) {
        const i64 r = row0[i] + t, pos = pos0[i] + t;
        const bool forced = pos == 0 || items[i].tokens[t] == c.bos_id;
        if (forced) st.doc_start = pos;
        const float p = forced             ? 1.f
                        : rule.is_rule() ? float(rule.rule_at(items[i].tokens[t], pos - st.doc_start))
                                         : p_[t];
        const bool b = forced || rule.decide(p, tau_);
        const float* h = H_.data() + r * d_;
        float* sum = open_sum_.data() + s * d_;
        if (b) {
          if (st.open_count > 0) {  // close the open concept: mean of its H
            float* o = pooled_.data() + nc * d_;
            const float inv = 1.f / float(st.open_count);
            for (i64 j = 0; j < d_; ++j) o[j] = sum[j] * inv;
            gate_[nc] = c.smoother ? ops::smoother_gate(st.open_p, st.open_forced) : 1.f;
            ++nc;
            ++st.closed;
            mult(s)[st.closed] = 0;  // the new entry, carried by the concept opening now
          }
          std::fill_n(sum, d_, 0.f);
          st.open_count = 0;
          st.open_start = pos;
          st.open_p = p;
          st.open_forced = forced;
        }
        for (i64 j = 0; j < d_; ++j) sum[j] += h[j];
        st.open_count += 1;
        mult(s)[st.closed] += 1;
        seg_[r] = i32(st.closed);
        start_[r] = i32(st.open_start);
        tokens_[s * max_len() + pos] = TokenConcept{p, i32(st.closed), b};
      }
      std::copy_n(q + (row0[i] + n - 1) * ds_, ds_, q_last_.data() + s * ds_);
      closed_n[i] = nc - closed0[i];
      if (closed_n[i] > 0) bb_chunks.push_back({s, closed_n[i]});
    }
    // 3. closed concepts: W_up, backbone (cached), norm, smoother, K/V into the lists
    if (nc > 0) {
      ops::linear_forward(C_.data(), pooled_.data(), m_.w_up_->w, nc, d_, dc_);
      const float* z = m_.bb_.forward_cached(C_.data(), bb_chunks.data(), bb_chunks.size(),
                                             bb_cache_);
      ops::rmsnorm_forward(Z_.data(), z_rstd_.data(), z, m_.bb_norm_->w, nc, dc_, eps);
      for (i64 i = 0; i < n_items; ++i) {
        const i64 s = items[i].seq;
        float* prev = zs_prev_.data() + s * dc_;
        for (i64 j = closed0[i]; j < closed0[i] + closed_n[i]; ++j) {
          const float P = gate_[j];
          const float* zj = Z_.data() + j * dc_;
          float* o = zs_new_.data() + j * dc_;
          for (i64 u = 0; u < dc_; ++u) o[u] = P * zj[u] + (1.f - P) * prev[u];
          prev = o;
        }
        if (closed_n[i] > 0) std::copy_n(prev, dc_, zs_prev_.data() + s * dc_);
        slots_[s].backbone_positions += closed_n[i];
      }
      ops::linear_forward(k_raw_.data(), zs_new_.data(), m_.x_wk_->w, nc, dc_, xkv_);
      ops::head_rmsnorm_forward(k_new_.data(), k_rstd_.data(), k_raw_.data(), m_.x_kn_->w, nc,
                                c.x_kv_heads, c.head_dim, eps);
      ops::linear_forward(v_new_.data(), zs_new_.data(), m_.x_wv_->w, nc, dc_, xkv_);
      for (i64 i = 0; i < n_items; ++i) {
        const i64 s = items[i].seq;
        const i64 first_entry = slots_[s].closed - closed_n[i] + 1;
        for (i64 j = 0; j < closed_n[i]; ++j) {
          std::copy_n(k_new_.data() + (closed0[i] + j) * xkv_, xkv_, entry_k(s, first_entry + j));
          std::copy_n(v_new_.data() + (closed0[i] + j) * xkv_, xkv_, entry_v(s, first_entry + j));
        }
      }
    }
    // 4. cross-attention queries and attention over each token's visible entries
    ops::rmsnorm_forward(hn_.data(), hn_rstd_.data(), H_.data(), m_.x_norm_->w, R, d_, eps);
    ops::linear_forward(qx_raw_.data(), hn_.data(), m_.x_wq_->w, R, d_, xq_);
    ops::head_rmsnorm_forward(qx_.data(), qx_rstd_.data(), qx_raw_.data(), m_.x_qn_->w, R,
                              c.x_heads, c.head_dim, eps);
    const float scale = 1.0f / std::sqrt(float(c.head_dim));
    std::vector<i64> item_of(R);
    for (i64 i = 0; i < n_items; ++i)
      for (i64 t = 0; t < items[i].n; ++t) item_of[row0[i] + t] = i;
#pragma omp parallel if (R * c.x_heads * c.head_dim * 8 > (1 << 15))
    {
      std::vector<float> mt(max_len() + 1);
#pragma omp for schedule(dynamic, 4)
      for (i64 r = 0; r < R; ++r) {
        const i64 i = item_of[r], s = items[i].seq, pos = pos0[i] + (r - row0[i]);
        const i64 nk = seg_[r] + 1;
        std::copy_n(mult(s), nk - 1, mt.data());
        mt[nk - 1] = float(pos - start_[r] + 1);  // positions of its own segment so far
        ops::concept_attention_step(att_.data() + r * xq_, qx_.data() + r * xq_, entry_k(s, 0),
                                    entry_v(s, 0), xkv_, mt.data(), nk, c.x_heads, c.x_kv_heads,
                                    c.head_dim, scale);
      }
    }
    // 5. Psi = H + Wo att, cross FFN, decoder (cached)
    ops::linear_forward(psi_.data(), att_.data(), m_.x_wo_->w, R, xq_, d_);
    for (i64 j = 0; j < R * d_; ++j) psi_[j] += H_[j];
    ops::rmsnorm_forward(pn_.data(), pn_rstd_.data(), psi_.data(), m_.x_ffn_norm_->w, R, d_, eps);
    const i64 xf = c.x_d_ff;
    ops::linear_forward(fa_.data(), pn_.data(), m_.x_w1_->w, R, d_, xf);
    ops::linear_forward(fb_.data(), pn_.data(), m_.x_w3_->w, R, d_, xf);
    ops::swiglu_forward(fh_.data(), fa_.data(), fb_.data(), R * xf);
    ops::linear_forward(X_.data(), fh_.data(), m_.x_w2_->w, R, xf, d_);
    for (i64 j = 0; j < R * d_; ++j) X_[j] += psi_[j];
    return m_.dec_.forward_cached(X_.data(), chunks.data(), n_items, dec_cache_);
  }

  // p for n consecutive new tokens of one slot: rows q/k [n, ds], q_prev the slot's last q.
  // Uses the training kernel on [q_prev; q] so the cosine is computed bit for bit as in the
  // full forward pass (p_[t] for token t; forced positions are the caller's business).
  void router_probs(float* p, const float* q, const float* k, const float* q_prev, i64 n) {
    pair_q_.resize((n + 1) * ds_);
    pair_k_.resize((n + 1) * ds_);
    pair_p_.resize(n + 1);
    pair_cache_.resize((n + 1) * ops::kRouterCacheStride);
    std::copy_n(q_prev, ds_, pair_q_.data());
    std::copy_n(q, n * ds_, pair_q_.data() + ds_);
    std::fill_n(pair_k_.data(), ds_, 0.f);
    std::copy_n(k, n * ds_, pair_k_.data() + ds_);
    ops::router_prob_forward(pair_p_.data(), pair_cache_.data(), pair_q_.data(), pair_k_.data(),
                             nullptr, m_.cfg_.bos_id, 1, n + 1, ds_);
    std::copy_n(pair_p_.data() + 1, n, p);
  }

  DlcmModel& m_;
  float tau_ = 0.5f;
  i64 d_ = 0, dc_ = 0, ds_ = 0, xq_ = 0, xkv_ = 0, rows_ = 0;
  KVCache enc_cache_, bb_cache_, dec_cache_;
  Buf x_, H_, rstd_, rq_, rk_, hn_, hn_rstd_, qx_raw_, qx_, qx_rstd_, att_;
  Buf psi_, pn_, pn_rstd_, fa_, fb_, fh_, X_, last_, xn_;
  Buf pooled_, C_, Z_, z_rstd_, zs_new_, k_raw_, k_new_, k_rstd_, v_new_;
  Buf q_last_, open_sum_, zs_prev_, list_k_, list_v_, mult_, null_k_, null_v_;
  Buf p_, gate_;
  Buf pair_q_, pair_k_, pair_p_, pair_cache_;
  std::vector<i32> seg_, start_;
  std::vector<Slot> slots_;
  std::vector<TokenConcept> tokens_;
};

std::unique_ptr<InferenceStream> DlcmModel::new_stream(const StreamOptions& o) {
  return std::make_unique<DlcmStream>(*this, o.max_seqs, stream_len(o), o.tau);
}

}  // namespace dlcm
