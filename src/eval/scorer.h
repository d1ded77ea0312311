// Batched log-likelihood scoring of (context, continuation) token pairs through the
// LanguageModel interface only (logits_at: logits at chosen positions; log-softmax here).
//
// Each request becomes one row [BOS, context..., continuation...] fed without its last token;
// the continuation's log-likelihood is the sum of log p(cont[k] | row up to it), from
// logits_at() at the continuation's positions only (the baseline runs its LM head on those
// rows only). For dlcm the
// model's logits() thresholds boundaries over the whole row it is given (context and
// continuation together), the teacher-forced rule.
//
// Work saved:
//  - Rows are deduplicated by prefix: a request whose fed row is a prefix of another request's
//    fed row is read off that row (causality makes the prefix positions identical). All
//    single-token continuations of a shared context (BoolQ's no/yes, MMLU's A-D) thus cost
//    one row, and identical requests one row.
//  - Rows are sorted by length, longest first, and packed into batches of about
//    `batch_tokens` padded tokens; padding goes at the END of a row only, so causality keeps
//    every real position exact (dlcm: boundaries at t depend on tokens <= t, and a concept is
//    visible only to tokens after it ends).
//  - Buffers (tokens, logits) are allocated once and reused.
// Multi-token continuations of one context still recompute the context once per row (a
// causal-only interface cannot share it without a KV cache).
//
// Truncation: when BOS + context + continuation - 1 exceeds the model's max_seq_len, the
// context loses tokens from the LEFT (BOS is kept). A continuation longer than max_seq_len
// keeps only BOS and its last max_seq_len tokens, which are the ones scored (its first tokens
// are dropped, as lm-evaluation-harness drops the left of context + continuation).
#pragma once
#include <string>
#include <vector>

#include "models/model.h"

namespace dlcm {

struct ScoreRequest {
  std::vector<i32> context;       // without BOS
  std::vector<i32> continuation;  // at least one token
};

struct Score {
  double loglik = 0;   // sum over the continuation's tokens of log p
  bool greedy = false; // every continuation token is the argmax (first index on ties)
  bool truncated = false;  // the context lost tokens
  i64 scored = 0;          // continuation tokens summed (fewer than given only when cut)
};

struct ScoreStats {
  i64 requests = 0, rows = 0, batches = 0;
  i64 tokens = 0;         // real tokens fed (sum of row lengths)
  i64 padded_tokens = 0;  // B * L summed over batches
  i64 logit_rows = 0;     // positions whose logits were computed (continuations)
  i64 truncated = 0;
  i64 cut_continuations = 0;  // continuations longer than max_seq_len (scored on their tail)
  double seconds = 0;
};

struct ScorerOptions {
  i64 batch_tokens = 2048;  // padded tokens per forward pass (at least one row)
  bool share_prefixes = true;  // off: one row per request (to measure what sharing saves)
  bool progress = false;    // progress line on stderr (rate, ETA)
  std::string label;        // names the task in progress lines and errors
};

class Scorer {
 public:
  Scorer(LanguageModel& model, i32 bos_id, i32 pad_id);
  std::vector<Score> score(const std::vector<ScoreRequest>& reqs, const ScorerOptions& o,
                           ScoreStats* stats = nullptr);

  // The row a request is scored with (BOS, left-truncated context, continuation), as the
  // scorer feeds it plus its last token; for cross-checks with other implementations. The
  // last min(continuation, row length - 1) tokens are the scored ones.
  std::vector<i32> full_row(const ScoreRequest& r, bool* truncated = nullptr) const;

 private:
  LanguageModel& m_;
  i32 bos_, pad_;
  std::vector<i32> tok_;
  std::vector<i64> pos_;  // flat positions whose logits a batch needs
  Buf logits_;            // [positions, V]
};

}  // namespace dlcm
