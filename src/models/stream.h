// Streaming inference (SPEC section 5): a model's decoding state for several sequences at once.
//
// A stream has max_seqs slots; each slot holds one sequence of up to max_len tokens. Tokens go
// in through prefill (many tokens of one or several sequences in one batched forward pass) and
// step (one token for each of several sequences, batched); each call returns the logits of the
// next token. reset(seq) empties a slot for a new prompt. The caches live in the stream; the
// model's weights are shared (a stream must not outlive its model).
//
// Each architecture implements the protected do_* methods; the public methods check their
// arguments first (slot range, distinct slots, token ids, room in the context) and keep the
// lengths, so an implementation may assume valid input. Contract of every implementation:
//   - the logits equal those of LanguageModel::logits() over the whole sequence so far (the
//     inference rule: thresholded boundaries for the DLCM), fp32 max abs difference < 1e-4;
//   - the result does not depend on how the tokens were split into prefill and step calls, nor
//     on which other sequences share a call;
//   - the work per step does not grow with the full prefix recomputed (caches, not recompute).
#pragma once
#include <algorithm>
#include <memory>
#include <vector>

#include "core/common.h"
#include "core/params.h"
#include "kernels/gemm.h"
#include "kernels/packed_gemm.h"

namespace dlcm {

struct StreamOptions {
  i64 max_seqs = 1;  // slots decoded together
  i64 max_len = 0;   // tokens per slot (0 = the model's max_seq_len; never more)
  float tau = -1;    // DLCM boundary threshold (< 0: the config's router.tau)
  // Weights of the stream's products (kernels/packed_gemm.h): FP32 copies packed for products
  // of few rows, or BF16 / int8 copies (the "bf16" and "int8" decode paths: every weight
  // product of the stream from weight-only BF16 or per-column-scaled int8 copies with FP32
  // accumulation, whatever its row count; the rest of the arithmetic stays FP32).
  ops::PackFormat precision = ops::PackFormat::F32;
  // FP32: products of at most this many rows use the packed copies, larger ones the general
  // GEMM (-1: kPackedRowsDefault; 0: no copies; none either where the AVX-512 kernel is not
  // compiled in, ops::packed_gemm_native()). Ignored with BF16 and int8.
  i64 packed_rows = -1;
  // A prefill that asks for each prompt's last logits only runs the final block's attention,
  // wo and FFN for those positions alone (TransformerStack::forward_cached's last_rows: the
  // same values to rounding; 13% fewer FLOPs for baseline-small's 128-token prompts). false:
  // every position, as a prefill asking for all logits does (`bench prefill --last-rows
  // on,off` compares them).
  bool last_rows = true;
};
// Rows up to which the stream's FP32 products use the packed kernel: on the development
// machine (Zen 5) it matched or beat oneDNN's sgemm from 1 to 2048 rows (docs/performance.md);
// beyond, a long multi-prompt prefill goes to the general GEMM.
constexpr i64 kPackedRowsDefault = 1024;

// Rows one prefill pass takes at most: a whole prompt, one token of every slot, or several
// prompts together up to kPrefillRows, so that each weight is read once for all of them and
// the DLCM's backbone multiplies their concepts together (4 prompts of 128 tokens: 156 concept
// rows, not 39 four times). At most kPackedRowsDefault: every row stays on the packed kernel,
// whose rows do not depend on the rows beside them.
constexpr i64 kPrefillRows = 1024;
inline i64 stream_rows(i64 max_seqs, i64 max_len) {
  return std::max({max_len, max_seqs, std::min(max_seqs * max_len, kPrefillRows)});
}

// Tokens of one sequence for prefill.
struct PrefillItem {
  i64 seq = 0;
  const i32* tokens = nullptr;
  i64 n = 0;
};

// What a concept model knows about a token once it has been fed: its boundary probability p
// and the index of the concept it belongs to within its sequence (seg(t), SPEC 4.3).
struct TokenConcept {
  float p = 0;
  i32 concept_index = -1;
  bool boundary = false;  // the token starts a concept (b_t = 1)
};

// Work counters of one slot since its last reset.
struct StreamCounters {
  i64 tokens = 0;              // tokens fed
  i64 concepts = 0;            // concepts begun (closed ones + the open one); 0 for the baseline
  i64 concepts_closed = 0;     // concepts closed (their pooled vector went through the backbone)
  i64 backbone_positions = 0;  // positions run through the concept backbone: concepts_closed
                               // (concepts with inclusive "first"), plus one prefix row per
                               // token with "prefix_mean" + inclusive
};

class InferenceStream {
 public:
  virtual ~InferenceStream() = default;

  i64 max_seqs() const { return max_seqs_; }
  i64 max_len() const { return max_len_; }
  i64 vocab_size() const { return vocab_; }
  i64 length(i64 seq) const;  // tokens held by the slot
  i64 room(i64 seq) const { return max_len_ - length(seq); }

  // Empties slot seq.
  void reset(i64 seq);
  // Appends n >= 1 tokens to slot seq in one batched forward pass. logits: [n, V] for every
  // fed position when all_logits, else [V] for the last one (the next-token distribution).
  void prefill(i64 seq, const i32* tokens, i64 n, float* logits, bool all_logits = false);
  // Several sequences (distinct slots) at once; logits [sum n, V] (all_logits) or [n_items, V].
  void prefill(const PrefillItem* items, i64 n_items, float* logits, bool all_logits = false);
  // Appends tokens[i] to slot seqs[i] for i < n (distinct slots), batched; logits [n, V].
  void step(const i64* seqs, const i32* tokens, i64 n, float* logits);

  // Concepts: false for models without concepts (the baseline).
  virtual bool has_concepts() const { return false; }
  // Token pos (< length(seq)) of slot seq; only meaningful when has_concepts().
  virtual TokenConcept token_concept(i64 seq, i64 pos) const { return {}; }
  virtual StreamCounters counters(i64 seq) const;

  // Bytes of the stream's packed weight copies (0 when its products run on the weights as
  // they are: FP32 without the AVX-512 kernel), and of those no product has read yet.
  i64 packed_weight_bytes() const { return packed_ ? packed_->bytes() : 0; }
  i64 packed_weight_bytes_unread() const { return packed_ ? packed_->unread_bytes() : 0; }

  // The options beyond the slots' shape, applied by the model's new_stream: the packed weights
  // (pack_weights) and last_rows.
  void apply_options(const ParamStore& ps, const StreamOptions& o);

 protected:
  InferenceStream(i64 max_seqs, i64 max_len, i64 vocab)
      : max_seqs_(max_seqs), max_len_(max_len), vocab_(vocab), len_(max_seqs, 0) {}
  // Called with checked arguments; lengths (length(seq)) are updated after each returns.
  virtual void do_reset(i64 seq) = 0;
  // May process the items one by one (results must not depend on it).
  virtual void do_prefill(const PrefillItem* items, i64 n_items, float* logits,
                          bool all_logits) = 0;
  virtual void do_step(const i64* seqs, const i32* tokens, i64 n, float* logits) = 0;

  // do_prefill for a model whose forward pass over new positions is run(items, n, last_only)
  // -> final hidden states, [sum n, d], or with last_only [n, d] (each item's last position
  // only: the final layer runs its q, attention, wo and FFN for those rows alone), and whose head
  // is head(h, N, logits): runs consecutive items in groups of at most `rows` positions; with
  // !all_logits only each item's last position goes through the final layer's tail and the head.
  // (Without StreamOptions::last_rows, run gets last_only = false and the items' last rows are
  // gathered into `last` [n_items in a group, d].)
  template <class Run, class Head>
  void prefill_in_groups(const PrefillItem* items, i64 n_items, float* logits, bool all_logits,
                         i64 rows, i64 d, float* last, Run&& run, Head&& head) {
    i64 out_row = 0;
    for (i64 i0 = 0; i0 < n_items;) {
      i64 i1 = i0, R = 0;
      while (i1 < n_items && R + items[i1].n <= rows) R += items[i1++].n;
      const float* h = run(items + i0, i1 - i0, !all_logits && last_rows_);
      if (all_logits) {
        head(h, R, logits + out_row * vocab_);
        out_row += R;
      } else if (last_rows_) {
        head(h, i1 - i0, logits + i0 * vocab_);
      } else {  // every position's final hidden state: gather the items' last ones
        i64 r = 0;
        for (i64 i = i0; i < i1; ++i) {
          r += items[i].n;
          std::copy_n(h + (r - 1) * d, d, last + (i - i0) * d);
        }
        head(last, i1 - i0, logits + i0 * vocab_);
      }
      i0 = i1;
    }
  }

 private:
  // Copies of the weight matrices (every 2-D parameter but the token embedding, which is read
  // by row) in the layout and precision `o` asks for; prefill and step run their products on
  // them. The weights must not change while the stream is used (a new stream copies them
  // again).
  void pack_weights(const ParamStore& ps, const StreamOptions& o);
  void check_seq(i64 seq, const char* who) const;
  void check_tokens(const i32* tokens, i64 n) const;
  void check_distinct(const i64* seqs, i64 n, const char* who) const;
  i64 max_seqs_, max_len_, vocab_;
  std::vector<i64> len_;
  std::unique_ptr<ops::PackedWeights> packed_;
  bool last_rows_ = true;  // StreamOptions::last_rows
};

}  // namespace dlcm
