// Streaming DLCM inference (SPEC section 5). Per slot the state is: the encoder, backbone and
// decoder KV caches; the router's last q; the open concept's running sum of H (its first H
// with concept_repr "first"), token count, start probability and forced flag; and the concept
// list of the cross-attention layer (ConceptCache: K/V of [z_null, zs_0, ...] with the
// multiplicity of each entry, the smoother's last value). For a group of new tokens (a prefill
// of one or several prompts, or one token of each of several slots):
//   1. embed + encoder (cached) + encoder.norm -> H, router q/k, p (threshold tau -> b);
//   2. every boundary closes the open concept: its pooled H goes through W_up, the backbone
//      (cached, one position per concept), backbone.norm, the smoother, K/V, and becomes the
//      next list entry; the boundary token opens a new concept (visibility "inclusive": the
//      concept goes through that path when it opens, from its first token);
//      with "prefix_mean" + inclusive every token also runs one backbone prefix row: the mean
//      of its open concept so far, at the position after the closed concepts, not cached;
//      its output continues the smoother from the last closed concept for that token only;
//   3. each token attends its visible entries with multiplicities (ConceptCrossAttention::
//      forward_cached), then the cross FFN, the decoder (cached) and the head.
// The arithmetic of every piece matches the full forward pass (same kernels for the router's
// cosine, pooling sums in token order, the smoother's expression), so thresholded decisions
// agree with DlcmModel::logits() and the logits agree to float tolerance.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/profiler.h"
#include "kernels/dlcm_ops.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "models/dlcm.h"

namespace dlcm {

class DlcmStream final : public InferenceStream {
 public:
  DlcmStream(DlcmModel& m, i64 max_seqs, i64 max_len, float tau)
      : InferenceStream(max_seqs, max_len, m.config().vocab_size), c_(m.config()),
        m_(m.parts()) {
    tau_ = tau < 0 ? c_.router.tau : tau;
    m_.decider->check_ready();  // router.kind "word" without its table fails here, not mid-run
    DLCM_CHECK(!std::isnan(tau_), "stream: tau must be a number");
    d_ = c_.d_token;
    dc_ = c_.d_concept;
    ds_ = m_.ds;
    concepts_ = m_.xattn->options().concept_path;
    first_ = concepts_ && m_.pool->repr() == ConceptRepr::First;
    inclusive_ = concepts_ && m_.xattn->options().inclusive();
    prefix_ = concepts_ && m_.xattn->options().prefix_rows();
    rows_ = stream_rows(max_seqs, max_len);
    enc_cache_ = m_.encoder->make_cache(max_seqs, max_len);
    dec_cache_ = m_.decoder->make_cache(max_seqs, max_len);
    m_.encoder->reserve_infer(rows_);
    m_.decoder->reserve_infer(rows_);
    m_.xattn->reserve_infer(rows_);
    // One list entry per concept plus z_null.
    list_ = m_.xattn->make_cache(max_seqs, max_len + 1);
    if (concepts_) {
      bb_cache_ = m_.backbone->make_cache(max_seqs, max_len);
      m_.backbone->reserve_infer(rows_);
      m_.backbone->share_infer(*m_.encoder);
    }
    // the stacks run one after another and use each output before the next runs: one scratch
    m_.decoder->share_infer(*m_.encoder);
    for (Buf* b : {&x_, &H_, &pooled_, &last_, &xn_}) b->assign(rows_ * d_, 0);
    for (Buf* b : {&rstd_, &z_rstd_, &p_, &gate_, &own_}) b->assign(rows_, 0);
    if (m_.router_wq)
      for (Buf* b : {&rq_, &rk_}) b->assign(rows_ * ds_, 0);
    for (Buf* b : {&C_, &Z_}) b->assign(rows_ * dc_, 0);
    if (prefix_) {
      ppooled_.assign(rows_ * d_, 0);
      for (Buf* b : {&Cp_, &Zp_}) b->assign(rows_ * dc_, 0);
      for (Buf* b : {&zp_rstd_, &own_gate_}) b->assign(rows_, 0);
      pseq_.assign(rows_, 0);
      ppos_.assign(rows_, 0);
    }
    // per slot state
    q_last_.assign(max_seqs * ds_, 0);
    open_sum_.assign(max_seqs * d_, 0);
    slots_.assign(max_seqs, Slot{});
    tokens_.assign(max_seqs * max_len, TokenConcept{});
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
    if (concepts_) bb_cache_.reset(seq);
    dec_cache_.reset(seq);
    slots_[seq] = Slot{};
    m_.xattn->reset(list_, seq);
  }

  void do_prefill(const PrefillItem* items, i64 n_items, float* logits, bool all_logits) override {
    prefill_in_groups(
        items, n_items, logits, all_logits, rows_, d_, last_.data(),
        [&](const PrefillItem* it, i64 n, bool last_only) { return run(it, n, last_only); },
        [&](const float* h, i64 N, float* out) {
          prof::Scope ps("stream head");
          m_.head->logits(h, N, out, xn_.data(), rstd_.data());
        });
  }

  void do_step(const i64* seqs, const i32* tokens, i64 n, float* logits) override {
    std::vector<PrefillItem> items(n);
    for (i64 i = 0; i < n; ++i) items[i] = {seqs[i], tokens + i, 1};
    m_.head->logits(run(items.data(), n, false), n, logits, xn_.data(), rstd_.data());
  }

 private:
  struct Slot {
    i64 closed = 0;              // concepts closed
    i64 open_count = 0;          // tokens in the open concept (0 only before the first token)
    i64 open_start = 0;          // position of its first token
    float open_p = 1.f;          // p at its first token
    bool open_forced = true;     // it starts at t = 0 or at a BOS token
    i64 doc_start = 0;           // position of the last forced boundary (rule routers)
    i64 backbone_positions = 0;  // backbone steps run for this slot
  };

  // Queues concept row nc for the backbone: its pooled H is already in pooled_[nc].
  void queue_concept(i64& nc, i64 seq, float p, bool forced, i64 start) {
    gate_[nc] = c_.smoother ? ops::smoother_gate(p, forced) : 1.f;  // smoother off: gate 1
    concept_seq_.push_back(seq);
    concept_start_.push_back(start);  // xattn_rope: the key's position
    ++nc;
  }

  // Runs everything up to the decoder output for the items' tokens (R rows in item order; with
  // last_only each item's last position only, [n_items, d]).
  const float* run(const PrefillItem* items, i64 n_items, bool last_only) {
    const float eps = c_.norm_eps;
    prof::Section sec;
    sec.next("stream encoder");
    std::vector<CacheChunk> chunks(n_items);
    std::vector<i64> row0(n_items);
    i64 R = 0;
    for (i64 i = 0; i < n_items; ++i) {
      ops::embedding_forward(x_.data() + R * d_, items[i].tokens, m_.tok_embeddings->w,
                             items[i].n, d_);
      chunks[i] = {items[i].seq, items[i].n};
      row0[i] = R;
      R += items[i].n;
    }
    // 1. encoder, H, router projections
    std::vector<i64> pos0(n_items);
    for (i64 i = 0; i < n_items; ++i) pos0[i] = enc_cache_.len[items[i].seq];
    const float* enc = m_.encoder->forward_cached(x_.data(), chunks.data(), n_items, enc_cache_);
    ops::rmsnorm_forward(H_.data(), rstd_.data(), enc, m_.encoder_norm->w, R, d_, eps);
    sec.next("stream router");
    const float* q = H_.data();
    const float* k = H_.data();
    if (m_.router_wq) {
      float* y[2] = {rq_.data(), rk_.data()};
      const float* W[2] = {m_.router_wq->w, m_.router_wk->w};
      const i64 out[2] = {ds_, ds_};
      ops::linear_forward_multi(y, H_.data(), W, R, d_, out, 2);
      q = rq_.data();
      k = rk_.data();
    }
    // 2. p, b and concept bookkeeping, item by item, token by token. A concept goes through
    // the backbone when its representation is final: at its close (shifted), or at its first
    // token (inclusive with "first": the first token is all it holds).
    sec.next("stream concepts");
    i64 nc = 0;  // concepts queued for the backbone in this call, all items
    concept_seq_.clear();
    concept_start_.clear();
    std::vector<CacheChunk> bb_chunks;
    seq_of_.assign(R, 0);
    pos_of_.assign(R, 0);
    last_entry_.assign(R, 0);
    for (i64 i = 0; i < n_items; ++i) {
      const i64 s = items[i].seq, n = items[i].n, nc0 = nc;
      Slot& st = slots_[s];
      float* mult = concepts_ ? list_.mult_of(s) : nullptr;
      const BoundaryDecider& rule = *m_.decider;
      if (!rule.is_rule())
        ops::router_prob_rows(p_.data(), q_last_.data() + s * ds_, q + row0[i] * ds_,
                              k + row0[i] * ds_, n, ds_);
      for (i64 t = 0; t < n; ++t) {
        const i64 r = row0[i] + t, pos = pos0[i] + t;
        const bool forced = pos == 0 || items[i].tokens[t] == c_.bos_id;
        if (forced) st.doc_start = pos;
        const float p = forced           ? 1.f
                        : rule.is_rule() ? float(rule.rule_at(items[i].tokens[t], pos - st.doc_start))
                                         : p_[t];
        const bool b = forced || rule.decide(p, tau_);
        const float* h = H_.data() + r * d_;
        float* sum = open_sum_.data() + s * d_;
        if (b) {
          if (st.open_count > 0) {  // close the open concept
            if (concepts_ && (!inclusive_ || prefix_)) {
              float* o = pooled_.data() + nc * d_;
              if (first_) {  // sum holds its first token's H
                std::copy_n(sum, d_, o);
              } else {  // mean of its H
                const float inv = 1.f / float(st.open_count);
                for (i64 j = 0; j < d_; ++j) o[j] = sum[j] * inv;
              }
              queue_concept(nc, s, st.open_p, st.open_forced, st.open_start);
            }
            ++st.closed;
          }
          std::fill_n(sum, d_, 0.f);
          st.open_count = 0;
          st.open_start = pos;
          st.open_p = p;
          st.open_forced = forced;
          // the entry the new concept's tokens count into
          if (concepts_) mult[m_.xattn->open_entry(st.closed)] = 0;
          if (inclusive_ && !prefix_) {  // "first": the concept is its first token, known now
            std::copy_n(h, d_, pooled_.data() + nc * d_);
            queue_concept(nc, s, p, forced, pos);
          }
        }
        if (first_) {
          if (st.open_count == 0) std::copy_n(h, d_, sum);
        } else {
          ops::add_inplace(sum, h, d_);
        }
        st.open_count += 1;
        if (prefix_) {  // the open concept's mean so far, for this token's prefix row
          const float inv = 1.f / float(st.open_count);
          float* o = ppooled_.data() + r * d_;
          for (i64 j = 0; j < d_; ++j) o[j] = sum[j] * inv;
          own_gate_[r] = c_.smoother ? ops::smoother_gate(st.open_p, st.open_forced) : 1.f;
          pseq_[r] = i32(s);
          ppos_[r] = i32(st.closed);
        }
        const i64 e = m_.xattn->open_entry(st.closed);
        if (concepts_) mult[e] += 1;
        seq_of_[r] = s;
        pos_of_[r] = pos;
        last_entry_[r] = e;
        own_[r] = float(pos - st.open_start + 1);  // positions of its own segment so far
        tokens_[s * max_len() + pos] = TokenConcept{p, i32(st.closed), b};
      }
      std::copy_n(q + (row0[i] + n - 1) * ds_, ds_, q_last_.data() + s * ds_);
      if (nc > nc0) {
        bb_chunks.push_back({s, nc - nc0});
        st.backbone_positions += nc - nc0;
      }
      if (prefix_) st.backbone_positions += n;  // one prefix row per token
    }
    // 3. queued concepts: W_up, backbone (cached), norm; smoother and K/V into the lists
    sec.next("stream pooling");
    if (nc > 0) {
      m_.pool->project(C_.data(), pooled_.data(), nc);
      sec.next("stream backbone stack");
      const float* z = m_.backbone->forward_cached(C_.data(), bb_chunks.data(), bb_chunks.size(),
                                                   bb_cache_);
      sec.next("stream concept list");
      ops::rmsnorm_forward(Z_.data(), z_rstd_.data(), z, m_.backbone_norm->w, nc, dc_, eps);
      m_.xattn->append_concepts(Z_.data(), gate_.data(), concept_seq_.data(),
                                 concept_start_.data(), nc, list_);
    }
    // prefix rows: every token's open concept on its prefix after its closed ones (all cached
    // by now, including those closed in this call), without entering the cache
    if (prefix_) {
      m_.pool->project(Cp_.data(), ppooled_.data(), R);
      const float* zp = m_.backbone->forward_cached_prefix_rows(Cp_.data(), pseq_.data(),
                                                                ppos_.data(), R, bb_cache_);
      ops::rmsnorm_forward(Zp_.data(), zp_rstd_.data(), zp, m_.backbone_norm->w, R, dc_, eps);
    }
    sec.next("stream cross-attention");
    // 4. each token attends its visible entries; Psi, cross FFN; decoder (cached)
    const float* X = m_.xattn->forward_cached(H_.data(), seq_of_.data(), pos_of_.data(),
                                              last_entry_.data(),
                                              own_.data(), R, list_,
                                              prefix_ ? Zp_.data() : nullptr,
                                              prefix_ ? own_gate_.data() : nullptr);
    sec.next("stream decoder");
    return m_.decoder->forward_cached(X, chunks.data(), n_items, dec_cache_, last_only);
  }

  const ModelConfig& c_;
  DlcmModel::Parts m_;
  float tau_ = 0.5f;
  i64 d_ = 0, dc_ = 0, ds_ = 0, rows_ = 0;
  bool concepts_ = true, first_ = false, inclusive_ = false, prefix_ = false;
  KVCache enc_cache_, bb_cache_, dec_cache_;
  ConceptCache list_;
  Buf x_, H_, rstd_, rq_, rk_, last_, xn_;
  Buf pooled_, C_, Z_, z_rstd_;
  Buf q_last_, open_sum_;  // open_sum_: running sum of H ("mean"), or its first H ("first")
  Buf p_, gate_, own_;
  Buf ppooled_, Cp_, Zp_, zp_rstd_, own_gate_;  // prefix rows [R, ...]
  std::vector<i32> pseq_, ppos_;                // their sequence and backbone position
  std::vector<i64> concept_seq_, seq_of_, last_entry_;
  std::vector<i64> concept_start_, pos_of_;  // xattn_rope positions
  std::vector<Slot> slots_;
  std::vector<TokenConcept> tokens_;
};

std::unique_ptr<InferenceStream> DlcmModel::new_stream(const StreamOptions& o) {
  auto s = std::make_unique<DlcmStream>(*this, o.max_seqs, stream_len(o), o.tau);
  s->apply_options(params(), o);
  return s;
}

}  // namespace dlcm
