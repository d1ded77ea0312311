#include "models/stream.h"

#include <omp.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_set>

namespace dlcm {

i64 InferenceStream::length(i64 seq) const {
  check_seq(seq, "length");
  return len_[seq];
}

namespace {
// Once per process: the passive wait policy with several threads makes every parallel region of
// a prefill or a decode step wake sleeping threads (~40 us each on a VM against 0.6 us
// spinning; a 128-token prefill enters 70-100 regions: a third slower at 2 threads,
// docs/inference.md).
void note_wait_policy() {
  static const bool once = [] {
    const char* w = std::getenv("OMP_WAIT_POLICY");
    std::string v = w ? w : "";
    for (char& c : v) c = char(std::tolower(static_cast<unsigned char>(c)));
    if (v == "passive" && omp_get_max_threads() > 1)
      std::fprintf(stderr,
                   "dlcm: note: OMP_WAIT_POLICY=passive with %d threads: every parallel region of "
                   "a prefill or decode step wakes sleeping threads; inference can run a third "
                   "slower than with the default policy (unset it, or use 1 thread)\n",
                   omp_get_max_threads());
    return true;
  }();
  (void)once;
}
}  // namespace

void InferenceStream::apply_options(const ParamStore& ps, const StreamOptions& o) {
  note_wait_policy();
  last_rows_ = o.last_rows;
  pack_weights(ps, o);
}

void InferenceStream::pack_weights(const ParamStore& ps, const StreamOptions& o) {
  const ops::PackFormat fmt = o.precision;
  // FP32 copies only pay with the AVX-512 kernel; BF16 and int8 need the copies whatever runs
  // them
  const i64 rows = fmt != ops::PackFormat::F32  ? i64(1) << 40
                   : !ops::packed_gemm_native() ? 0
                   : o.packed_rows < 0          ? kPackedRowsDefault
                                                : o.packed_rows;
  if (rows == 0) {
    packed_.reset();
    return;
  }
  packed_ = std::make_unique<ops::PackedWeights>(rows);
  // Products that share their input run as one over stacked copies, as the layers call them
  // through ops::linear_forward_multi: a block's q/k/v, the router's q/k, the cross-attention's
  // k/v (its q reads another input) and every FFN's w1/w3, found by their names under one
  // prefix. Every other matrix gets a copy of its own (a group not found here only costs
  // speed: linear_forward_multi then runs the products one by one).
  auto ends_with = [](const std::string& s, const std::string& e) {
    return s.size() >= e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0;
  };
  // First what to pack (stacked groups, then single matrices), then one arena of their total
  // size, packed straight into (PackedWeights::reserve: huge pages, one packed copy at a time).
  struct Job {
    std::vector<const float*> W;
    std::vector<i64> N;
    i64 K = 0;
    bool group = false;
  };
  std::vector<Job> jobs;
  std::unordered_set<const float*> grouped;
  auto group = [&](const std::string& prefix, std::initializer_list<const char*> names) {
    Job j;
    j.group = true;
    j.K = -1;
    for (const char* n : names) {
      const Param* q = ps.find(prefix + n);
      if (!q || q->shape.size() != 2 || (j.K >= 0 && q->shape[1] != j.K) || grouped.count(q->w))
        return;
      j.K = q->shape[1];
      j.W.push_back(q->w);
      j.N.push_back(q->shape[0]);
    }
    grouped.insert(j.W.begin(), j.W.end());
    jobs.push_back(std::move(j));
  };
  auto prefix_of = [](const std::string& name, const std::string& last) {
    return name.substr(0, name.size() - last.size());
  };
  for (const Param& p : ps.params()) {
    if (p.shape.size() != 2) continue;
    if (ends_with(p.name, "w1.weight")) {  // an FFN
      group(prefix_of(p.name, "w1.weight"), {"w1.weight", "w3.weight"});
    } else if (ends_with(p.name, "wq.weight")) {
      const std::string prefix = prefix_of(p.name, "wq.weight");
      if (ends_with(prefix, ".attn."))  // a transformer block (block_qkv)
        group(prefix, {"wq.weight", "wk.weight", "wv.weight"});
      else if (!ps.find(prefix + "wv.weight"))  // the router
        group(prefix, {"wq.weight", "wk.weight"});
      else  // the cross-attention: k/v of the concept list (kv_forward)
        group(prefix, {"wk.weight", "wv.weight"});
    }
  }
  // The token embedding is read by row (its lookup), never as a product's weight: no copy (it
  // was 22% of baseline-small's packed bytes and 15% of dlcm-small's, never read).
  for (const Param& p : ps.params())
    if (p.shape.size() == 2 && !grouped.count(p.w) &&
        !ends_with(p.name, "tok_embeddings.weight"))
      jobs.push_back(Job{{p.w}, {p.shape[0]}, p.shape[1], false});
  i64 bytes = 0;
  for (const Job& j : jobs)
    bytes += (ops::packed_bytes(j.N.data(), int(j.N.size()), j.K, fmt) + 63) / 64 * 64;
  packed_->reserve(bytes);
  for (const Job& j : jobs) {
    if (j.group)
      packed_->add_group(j.W.data(), j.N.data(), int(j.W.size()), j.K, fmt);
    else
      packed_->add(j.W[0], j.N[0], j.K, fmt);
  }
}

StreamCounters InferenceStream::counters(i64 seq) const {
  StreamCounters c;
  c.tokens = length(seq);
  return c;
}

void InferenceStream::check_seq(i64 seq, const char* who) const {
  DLCM_CHECK(seq >= 0 && seq < max_seqs_, "stream ", who, ": slot ", seq, " outside [0, ",
             max_seqs_, ")");
}

void InferenceStream::check_tokens(const i32* tokens, i64 n) const {
  for (i64 i = 0; i < n; ++i)
    DLCM_CHECK(tokens[i] >= 0 && tokens[i] < vocab_, "token id ", tokens[i],
               " is outside the vocabulary [0, ", vocab_, ")");
}

void InferenceStream::check_distinct(const i64* seqs, i64 n, const char* who) const {
  std::vector<char> seen(max_seqs_, 0);
  for (i64 i = 0; i < n; ++i) {
    check_seq(seqs[i], who);
    DLCM_CHECK(!seen[seqs[i]], "stream ", who, ": slot ", seqs[i], " given twice in one call");
    seen[seqs[i]] = 1;
  }
}

void InferenceStream::reset(i64 seq) {
  check_seq(seq, "reset");
  do_reset(seq);
  len_[seq] = 0;
}

void InferenceStream::prefill(i64 seq, const i32* tokens, i64 n, float* logits, bool all_logits) {
  PrefillItem it{seq, tokens, n};
  prefill(&it, 1, logits, all_logits);
}

void InferenceStream::prefill(const PrefillItem* items, i64 n_items, float* logits,
                              bool all_logits) {
  DLCM_CHECK(n_items >= 1, "stream prefill: no sequences given");
  std::vector<i64> seqs(n_items);
  for (i64 i = 0; i < n_items; ++i) {
    const PrefillItem& it = items[i];
    seqs[i] = it.seq;
    check_seq(it.seq, "prefill");
    DLCM_CHECK(it.n >= 1, "stream prefill: empty prompt for slot ", it.seq);
    DLCM_CHECK(len_[it.seq] + it.n <= max_len_, "prompt of ", it.n, " tokens does not fit: slot ",
               it.seq, " holds ", len_[it.seq], " of the context's ", max_len_, " tokens");
    check_tokens(it.tokens, it.n);
  }
  check_distinct(seqs.data(), n_items, "prefill");
  ops::PackedScope packed(packed_.get());
  do_prefill(items, n_items, logits, all_logits);
  for (i64 i = 0; i < n_items; ++i) len_[items[i].seq] += items[i].n;
}

void InferenceStream::step(const i64* seqs, const i32* tokens, i64 n, float* logits) {
  DLCM_CHECK(n >= 1, "stream step: no sequences given");
  check_distinct(seqs, n, "step");
  for (i64 i = 0; i < n; ++i)
    DLCM_CHECK(len_[seqs[i]] < max_len_, "context full: slot ", seqs[i], " holds ", max_len_,
               " tokens, the model's context");
  check_tokens(tokens, n);
  ops::PackedScope packed(packed_.get());
  do_step(seqs, tokens, n, logits);
  for (i64 i = 0; i < n; ++i) len_[seqs[i]] += 1;
}

}  // namespace dlcm
