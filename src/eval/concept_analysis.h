// Concept analysis of a DLCM checkpoint on validation text (`dlcm analyze`, issue 20 §1): what
// the router cuts and whether the concepts line up with anything a reader would call a unit.
//
// Everything is computed from per-position arrays over validation windows (AnalysisData):
// tokens, router probabilities p, forced boundaries, per-token losses, the corpus source of each
// position. The functions below are pure functions of those arrays (unit-tested on hand-made
// inputs); collect_analysis_data runs the model over the prepared validation split to fill them.
//
// Conventions:
//   b = [p >= tau] | forced, forced = window start or BOS (the model's inference rule).
//   A concept runs from a boundary to the next boundary or the end of the window's valid tokens.
//   "Router decisions" are the valid positions that are not forced: alignment, top openers and
//   the p histogram use only those (forced boundaries say nothing about the router).
//   loss[n] is the cross-entropy of the token after n, predicted from position n; its "position
//   in concept" is n's offset from the start of the concept holding n.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm {

class LanguageModel;
struct DataDir;
struct ValSources;

// Per-position arrays over `windows` validation windows of L tokens ([windows * L] each).
struct AnalysisData {
  i64 L = 0, windows = 0;
  float tau = 0.5f;                // the threshold of the analysis
  std::vector<i32> tokens;         // window inputs (the pad id where !valid)
  std::vector<uint8_t> valid;      // 1 for real tokens (the split's last window is padded)
  std::vector<uint8_t> forced;     // window start or BOS
  std::vector<float> p;            // router probability
  std::vector<float> loss;         // CE of the next token, predicted here (NaN: no target)
  std::vector<float> base_loss;    // the same from a baseline model (empty: no baseline)
  std::vector<i32> source;         // corpus source index of the position (empty: unknown)
  std::vector<std::string> source_names;
};

// b = [p >= tau] | forced.
std::vector<uint8_t> threshold_boundaries(const std::vector<float>& p,
                                          const std::vector<uint8_t>& forced, float tau);

// Concept lengths: count[k] concepts of k tokens for 1 <= k < cap, count[cap] those of cap
// tokens or more (count[0] is always 0).
struct LengthHistogram {
  std::vector<i64> count;
  i64 concepts = 0, tokens = 0, max_len = 0;
  double mean = 0;  // tokens per concept
};
LengthHistogram concept_lengths(const std::vector<uint8_t>& b, const std::vector<uint8_t>& valid,
                                i64 L, i64 cap = 32);

// Precision, recall and F1 of predicted boundaries against reference boundaries over the
// positions in mask, with the exact expectations for the same number of boundaries placed
// uniformly at random among those positions: E[precision] = reference / positions,
// E[recall] = predicted / positions, E[F1] = 2 predicted reference / (positions (predicted +
// reference)) (F1 = 2 hits / (predicted + reference) and only the hits are random).
struct Alignment {
  std::string reference;  // what the reference boundaries are
  i64 positions = 0, predicted = 0, actual = 0, hits = 0;
  double precision = 0, recall = 0, f1 = 0;
  double random_precision = 0, random_recall = 0, random_f1 = 0;
};
Alignment alignment(const std::vector<uint8_t>& b, const std::vector<uint8_t>& ref,
                    const std::vector<uint8_t>& mask, const std::string& reference = "");
// Fills the random_* fields of a from its counts.
void random_expectation(Alignment& a);

// Character classes of each vocabulary piece (raw bytes of decode_piece): letters and digits
// (ASCII alphanumerics and non-ASCII characters outside the punctuation blocks), punctuation
// (ASCII punctuation, U+00A1-U+00BF, U+2000-U+206F, U+3000-U+303F), whitespace.
struct PieceClass {
  bool lead_space = false;       // begins with whitespace
  bool word_char_first = false;  // first non-whitespace character is a letter or digit
  bool ends_word_char = false;   // last character is a letter or digit
  bool ends_punct = false;       // last character is punctuation
};
std::vector<PieceClass> classify_pieces(const std::vector<std::string>& pieces);

// Reference boundaries over windows of L tokens (position 0 of a window has no predecessor):
//   space_start  the token begins with whitespace;
//   word_start   the token holds the first letter/digit of a word: its first non-space
//                character is one, after whitespace inside the token or a predecessor that
//                does not end in a letter/digit ("▁the", or "t" after " " with byte tokens);
//   after_punct  the previous token ends with punctuation.
struct ReferenceBoundaries {
  std::vector<uint8_t> space_start, word_start, after_punct;
};
ReferenceBoundaries reference_boundaries(const std::vector<i32>& tokens, i64 L,
                                         const std::vector<PieceClass>& cls);

// Tokens that open a concept: per token id, opens = positions in mask holding it with b = 1,
// occurrences = positions in mask holding it; the k with the most opens (ties: lower id).
struct TokenOpen {
  i32 id = 0;
  i64 opens = 0, occurrences = 0;
  double rate = 0;  // opens / occurrences
  std::string text;
};
std::vector<TokenOpen> top_openers(const std::vector<i32>& tokens, const std::vector<uint8_t>& b,
                                   const std::vector<uint8_t>& mask, i64 k,
                                   const std::vector<std::string>& pieces = {});

// Histogram of x over the positions in mask: `bins` equal bins on [lo, hi]; x == hi goes to
// the last bin, values outside [lo, hi] to the nearest end.
std::vector<i64> histogram(const std::vector<float>& x, const std::vector<uint8_t>& mask,
                           i64 bins, double lo, double hi);

// Realised compression (valid tokens per concept, forced boundaries included) and the share of
// router decisions that cut, at each tau; tokens_per_concept is nondecreasing in tau.
struct TauPoint {
  double tau = 0, tokens_per_concept = 0, boundary_rate = 0;
};
std::vector<TauPoint> tau_curve(const std::vector<float>& p, const std::vector<uint8_t>& forced,
                                const std::vector<uint8_t>& valid, const std::vector<double>& taus);

// Mean loss by position inside the concept (0, 1, ..., max_pos - 1, and max_pos for max_pos
// or later), of the model and, when base_loss is given, of the baseline on the same tokens;
// also split into the window's first concept (which sees only z_null) and the others.
struct PositionLoss {
  std::vector<i64> count;
  std::vector<double> loss, base_loss;  // base_loss empty without a baseline
  i64 first_count = 0, other_count = 0;
  double first_loss = 0, other_loss = 0, first_base_loss = 0, other_base_loss = 0;
  bool has_baseline() const { return !base_loss.empty(); }
};
PositionLoss position_loss(const std::vector<uint8_t>& b, const std::vector<uint8_t>& valid, i64 L,
                           const std::vector<float>& loss, const std::vector<float>& base_loss,
                           i64 max_pos = 7);

// Compression per corpus source (the paper's Table 5 analogue): valid tokens, concepts
// (boundaries, forced included), UTF-8 bytes and mean loss of the positions of each source.
struct SourceCompression {
  std::string name;
  i64 tokens = 0, concepts = 0, bytes = 0;
  double tokens_per_concept = 0, bytes_per_concept = 0, loss = 0;
};
std::vector<SourceCompression> per_source(const std::vector<i32>& tokens,
                                          const std::vector<uint8_t>& b,
                                          const std::vector<uint8_t>& valid,
                                          const std::vector<i32>& source,
                                          const std::vector<std::string>& names,
                                          const std::vector<i32>& piece_bytes,
                                          const std::vector<float>& loss);

// Concept-usage diagnostics (issue 20 §1): how much the decoder depends on the concepts. They
// need hooks inside the concept cross-attention; whoever measures them passes a ConceptUsageFn
// to analyze_checkpoint, and the report carries the section only when one was given.
struct ConceptUsage {
  double val_loss = 0;             // mean CE with the model's own concepts
  double delta_loss_null = 0;      // every concept replaced by z_null, minus val_loss
  double delta_loss_shuffled = 0;  // each row given another row's concepts, minus val_loss
  double xattn_ratio = 0;          // |Wo att| / |H| at the cross-attention's residual
  i64 tokens = 0;                  // targets measured
};
using ConceptUsageFn = std::function<ConceptUsage(LanguageModel&, const AnalysisData&)>;

struct AnalysisReport {
  std::string checkpoint, baseline, data, sources_origin;
  i64 windows = 0, L = 0, tokens = 0, decisions = 0;  // decisions: valid, not forced
  float tau = 0.5f;
  double val_loss = 0, base_val_loss = 0;
  LengthHistogram lengths;
  std::vector<Alignment> alignments;  // space_start, word_start, after_punct
  std::vector<TokenOpen> openers;
  std::vector<i64> p_hist;            // 20 bins on [0, 1]
  std::vector<TauPoint> taus;         // 0.05, 0.10, ..., 0.95
  PositionLoss positions;
  std::vector<SourceCompression> sources;  // empty when sources are unknown
  std::string sources_missing;             // why they are unknown
  std::optional<ConceptUsage> usage;
};

// Every statistic from the arrays; pieces (decode_piece per id) and piece_bytes index by id.
AnalysisReport analyze_data(const AnalysisData& d, const std::vector<std::string>& pieces,
                            const std::vector<i32>& piece_bytes, i64 top_k = 30);

struct AnalyzeOptions {
  i64 batch_size = 8, max_batches = -1;  // validation windows per forward pass; -1: all
  i64 seq_len = 0;                       // window length (the CLI's default: train.seq_len)
  float tau = -1;                        // < 0: the checkpoint's router.tau
  i64 top_k = 30;
  ConceptUsageFn usage;                  // optional concept-usage measurement
};

// Runs the model (and the baseline, when given, on the same windows) over the validation split
// of d: p and boundaries at tau, per-token losses with those boundaries (eval_micro), the
// source of each position when sources is given. Errors name the flag at fault.
AnalysisData collect_analysis_data(LanguageModel& m, const DataDir& d, const AnalyzeOptions& o,
                                   LanguageModel* baseline, const ValSources* sources);

// collect_analysis_data + analyze_data + the usage callback.
AnalysisReport analyze_checkpoint(LanguageModel& m, const DataDir& d, const AnalyzeOptions& o,
                                  LanguageModel* baseline = nullptr);

nlohmann::json report_json(const AnalysisReport& r);

}  // namespace dlcm
