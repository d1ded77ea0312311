#include "eval/concept_analysis.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "data/loader.h"
#include "data/prepare.h"
#include "kernels/gemm.h"
#include "models/model.h"

namespace dlcm {
using nlohmann::json;

namespace {

constexpr float kNoTarget = std::numeric_limits<float>::quiet_NaN();

// First / last code point of a piece; a malformed or cut-off sequence (a byte-fallback piece)
// reads as -1.
int32_t decode_at(const std::string& s, size_t i, size_t* len) {
  const unsigned char c = uint8_t(s[i]);
  int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  *len = 1;
  if (n == 0 || i + n > s.size()) return -1;
  int32_t cp = n == 1 ? c : c & (0x7F >> n);
  for (int k = 1; k < n; ++k) {
    const unsigned char d = uint8_t(s[i + k]);
    if ((d & 0xC0) != 0x80) return -1;
    cp = (cp << 6) | (d & 0x3F);
  }
  *len = size_t(n);
  return cp;
}
int32_t last_code_point(const std::string& s) {
  size_t i = s.size() - 1, len = 0;
  while (i > 0 && s.size() - i < 4 && (uint8_t(s[i]) & 0xC0) == 0x80) --i;
  const int32_t cp = decode_at(s, i, &len);
  return i + len == s.size() ? cp : -1;
}

bool is_space(int32_t c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' || c == 0xA0;
}
bool is_punct(int32_t c) {
  if (c >= 0 && c < 0x80) return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) ||
                                 (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E);
  return (c >= 0xA1 && c <= 0xBF) || (c >= 0x2000 && c <= 0x206F) || (c >= 0x3000 && c <= 0x303F);
}
// Letters and digits; a piece of a split multi-byte character (-1) counts as a letter.
bool is_word(int32_t c) {
  if (c >= 0 && c < 0x80) return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
  return !is_space(c) && !is_punct(c);
}

double ratio(double a, double b) { return b > 0 ? a / b : 0.0; }

// A float as the 7 significant digits it holds (0.3, not 0.30000001192092896).
double float_value(float v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.7g", double(v));
  return std::strtod(b, nullptr);
}

}  // namespace

std::vector<uint8_t> threshold_boundaries(const std::vector<float>& p,
                                          const std::vector<uint8_t>& forced, float tau) {
  DLCM_CHECK(p.size() == forced.size(), "threshold_boundaries: p and forced differ in size");
  std::vector<uint8_t> b(p.size());
  for (size_t n = 0; n < p.size(); ++n) b[n] = forced[n] || p[n] >= tau;
  return b;
}

LengthHistogram concept_lengths(const std::vector<uint8_t>& b, const std::vector<uint8_t>& valid,
                                i64 L, i64 cap) {
  DLCM_CHECK(L > 0 && cap >= 1 && b.size() == valid.size() && i64(b.size()) % L == 0,
             "concept_lengths: arrays must be [windows * L]");
  LengthHistogram h;
  h.count.assign(cap + 1, 0);
  auto close = [&](i64 len) {
    if (len <= 0) return;
    h.count[std::min(len, cap)]++;
    h.concepts++;
    h.max_len = std::max(h.max_len, len);
  };
  for (i64 w = 0; w < i64(b.size()) / L; ++w) {
    i64 len = 0;
    for (i64 t = 0; t < L; ++t) {
      const i64 n = w * L + t;
      if (!valid[n]) continue;
      h.tokens++;
      if (b[n] || len == 0) close(len), len = 0;  // a window's first valid token opens a concept
      ++len;
    }
    close(len);
  }
  h.mean = ratio(double(h.tokens), double(h.concepts));
  return h;
}

void random_expectation(Alignment& a) {
  const double N = double(a.positions);
  a.random_precision = ratio(double(a.actual), N);
  a.random_recall = ratio(double(a.predicted), N);
  a.random_f1 = ratio(2.0 * double(a.predicted) * double(a.actual), N * double(a.predicted + a.actual));
}

Alignment alignment(const std::vector<uint8_t>& b, const std::vector<uint8_t>& ref,
                    const std::vector<uint8_t>& mask, const std::string& reference) {
  DLCM_CHECK(b.size() == ref.size() && b.size() == mask.size(), "alignment: arrays differ in size");
  Alignment a;
  a.reference = reference;
  for (size_t n = 0; n < b.size(); ++n) {
    if (!mask[n]) continue;
    a.positions++;
    a.predicted += b[n] != 0;
    a.actual += ref[n] != 0;
    a.hits += b[n] && ref[n];
  }
  a.precision = ratio(double(a.hits), double(a.predicted));
  a.recall = ratio(double(a.hits), double(a.actual));
  a.f1 = ratio(2.0 * double(a.hits), double(a.predicted + a.actual));
  random_expectation(a);
  return a;
}

std::vector<PieceClass> classify_pieces(const std::vector<std::string>& pieces) {
  std::vector<PieceClass> out(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) {
    const std::string& s = pieces[i];
    if (s.empty()) continue;
    PieceClass& c = out[i];
    size_t len = 0;
    c.lead_space = is_space(decode_at(s, 0, &len));
    for (size_t k = 0; k < s.size(); k += len) {
      const int32_t cp = decode_at(s, k, &len);
      if (is_space(cp)) continue;
      c.word_char_first = is_word(cp);
      break;
    }
    const int32_t last = last_code_point(s);
    c.ends_word_char = is_word(last);
    c.ends_punct = is_punct(last);
  }
  return out;
}

ReferenceBoundaries reference_boundaries(const std::vector<i32>& tokens, i64 L,
                                         const std::vector<PieceClass>& cls) {
  DLCM_CHECK(L > 0 && i64(tokens.size()) % L == 0, "reference_boundaries: tokens must be [windows * L]");
  const size_t N = tokens.size();
  ReferenceBoundaries r;
  r.space_start.assign(N, 0);
  r.word_start.assign(N, 0);
  r.after_punct.assign(N, 0);
  auto at = [&](i32 id) -> const PieceClass& {
    DLCM_CHECK(id >= 0 && size_t(id) < cls.size(), "reference_boundaries: token id ", id,
               " outside the vocabulary [0, ", cls.size(), ")");
    return cls[id];
  };
  for (size_t n = 0; n < N; ++n) {
    const PieceClass& c = at(tokens[n]);
    const bool first = i64(n) % L == 0;
    r.space_start[n] = c.lead_space;
    r.word_start[n] = c.word_char_first && (c.lead_space || first || !at(tokens[n - 1]).ends_word_char);
    r.after_punct[n] = !first && at(tokens[n - 1]).ends_punct;
  }
  return r;
}

std::vector<TokenOpen> top_openers(const std::vector<i32>& tokens, const std::vector<uint8_t>& b,
                                   const std::vector<uint8_t>& mask, i64 k,
                                   const std::vector<std::string>& pieces) {
  DLCM_CHECK(tokens.size() == b.size() && tokens.size() == mask.size(), "top_openers: arrays differ in size");
  i32 V = 0;
  for (i32 t : tokens) V = std::max(V, t + 1);
  std::vector<i64> opens(V, 0), occ(V, 0);
  for (size_t n = 0; n < tokens.size(); ++n) {
    if (!mask[n]) continue;
    occ[tokens[n]]++;
    opens[tokens[n]] += b[n] != 0;
  }
  std::vector<TokenOpen> all;
  for (i32 id = 0; id < V; ++id)
    if (opens[id] > 0)
      all.push_back({id, opens[id], occ[id], ratio(double(opens[id]), double(occ[id])),
                     size_t(id) < pieces.size() ? pieces[id] : std::string()});
  std::stable_sort(all.begin(), all.end(),
                   [](const TokenOpen& a, const TokenOpen& c) { return a.opens > c.opens; });
  if (i64(all.size()) > k) all.resize(std::max<i64>(k, 0));
  return all;
}

std::vector<i64> histogram(const std::vector<float>& x, const std::vector<uint8_t>& mask,
                           i64 bins, double lo, double hi) {
  DLCM_CHECK(bins > 0 && hi > lo && x.size() == mask.size(), "histogram: bad arguments");
  std::vector<i64> h(bins, 0);
  for (size_t n = 0; n < x.size(); ++n) {
    if (!mask[n] || std::isnan(x[n])) continue;
    const i64 i = i64(std::floor((double(x[n]) - lo) / (hi - lo) * double(bins)));
    h[std::clamp<i64>(i, 0, bins - 1)]++;
  }
  return h;
}

std::vector<TauPoint> tau_curve(const std::vector<float>& p, const std::vector<uint8_t>& forced,
                                const std::vector<uint8_t>& valid, const std::vector<double>& taus) {
  DLCM_CHECK(p.size() == forced.size() && p.size() == valid.size(), "tau_curve: arrays differ in size");
  std::vector<TauPoint> out;
  for (double tau : taus) {
    i64 tokens = 0, concepts = 0, decisions = 0, cuts = 0;
    for (size_t n = 0; n < p.size(); ++n) {
      if (!valid[n]) continue;
      ++tokens;
      const bool cut = p[n] >= float(tau);
      concepts += forced[n] || cut;
      if (!forced[n]) ++decisions, cuts += cut;
    }
    out.push_back({tau, ratio(double(tokens), double(concepts)), ratio(double(cuts), double(decisions))});
  }
  return out;
}

PositionLoss position_loss(const std::vector<uint8_t>& b, const std::vector<uint8_t>& valid, i64 L,
                           const std::vector<float>& loss, const std::vector<float>& base_loss,
                           i64 max_pos) {
  DLCM_CHECK(L > 0 && max_pos >= 1 && b.size() == valid.size() && b.size() == loss.size() &&
                 (base_loss.empty() || base_loss.size() == b.size()) && i64(b.size()) % L == 0,
             "position_loss: arrays must be [windows * L]");
  const bool base = !base_loss.empty();
  PositionLoss r;
  std::vector<double> s(max_pos + 1, 0.0), sb(max_pos + 1, 0.0);
  r.count.assign(max_pos + 1, 0);
  double first = 0, other = 0, first_b = 0, other_b = 0;
  for (i64 w = 0; w < i64(b.size()) / L; ++w) {
    i64 k = 0, ci = -1;
    for (i64 t = 0; t < L; ++t) {
      const i64 n = w * L + t;
      if (!valid[n]) continue;
      if (b[n] || ci < 0) k = 0, ++ci;
      else ++k;
      if (std::isnan(loss[n]) || (base && std::isnan(base_loss[n]))) continue;
      const i64 slot = std::min(k, max_pos);
      r.count[slot]++;
      s[slot] += loss[n];
      if (base) sb[slot] += base_loss[n];
      if (ci == 0) {
        r.first_count++, first += loss[n];
        if (base) first_b += base_loss[n];
      } else {
        r.other_count++, other += loss[n];
        if (base) other_b += base_loss[n];
      }
    }
  }
  for (i64 i = 0; i <= max_pos; ++i) {
    r.loss.push_back(ratio(s[i], double(r.count[i])));
    if (base) r.base_loss.push_back(ratio(sb[i], double(r.count[i])));
  }
  r.first_loss = ratio(first, double(r.first_count));
  r.other_loss = ratio(other, double(r.other_count));
  r.first_base_loss = ratio(first_b, double(r.first_count));
  r.other_base_loss = ratio(other_b, double(r.other_count));
  return r;
}

std::vector<SourceCompression> per_source(const std::vector<i32>& tokens,
                                          const std::vector<uint8_t>& b,
                                          const std::vector<uint8_t>& valid,
                                          const std::vector<i32>& source,
                                          const std::vector<std::string>& names,
                                          const std::vector<i32>& piece_bytes,
                                          const std::vector<float>& loss) {
  DLCM_CHECK(tokens.size() == b.size() && b.size() == valid.size() && b.size() == source.size() &&
                 b.size() == loss.size(),
             "per_source: arrays differ in size");
  std::vector<SourceCompression> out(names.size());
  std::vector<double> loss_sum(names.size(), 0.0);
  std::vector<i64> loss_n(names.size(), 0);
  for (size_t i = 0; i < names.size(); ++i) out[i].name = names[i];
  for (size_t n = 0; n < b.size(); ++n) {
    if (!valid[n]) continue;
    const i32 s = source[n];
    DLCM_CHECK(s >= 0 && size_t(s) < names.size(), "per_source: source index ", s,
               " outside [0, ", names.size(), ")");
    SourceCompression& c = out[s];
    c.tokens++;
    c.concepts += b[n] != 0;
    c.bytes += size_t(tokens[n]) < piece_bytes.size() ? piece_bytes[tokens[n]] : 0;
    if (!std::isnan(loss[n])) loss_sum[s] += loss[n], loss_n[s]++;
  }
  std::vector<SourceCompression> seen;
  for (size_t i = 0; i < out.size(); ++i) {
    SourceCompression& c = out[i];
    if (c.tokens == 0) continue;  // no validation document from this source
    c.tokens_per_concept = ratio(double(c.tokens), double(c.concepts));
    c.bytes_per_concept = ratio(double(c.bytes), double(c.concepts));
    c.loss = ratio(loss_sum[i], double(loss_n[i]));
    seen.push_back(c);
  }
  return seen;
}

AnalysisReport analyze_data(const AnalysisData& d, const std::vector<std::string>& pieces,
                            const std::vector<i32>& piece_bytes, i64 top_k) {
  const size_t N = d.tokens.size();
  DLCM_CHECK(d.L > 0 && N == size_t(d.windows * d.L) && d.valid.size() == N &&
                 d.forced.size() == N && d.p.size() == N && d.loss.size() == N,
             "analyze_data: arrays must be [windows * L]");
  AnalysisReport r;
  r.windows = d.windows;
  r.L = d.L;
  r.tau = d.tau;
  const std::vector<uint8_t> b = threshold_boundaries(d.p, d.forced, d.tau);
  std::vector<uint8_t> decisions(N);
  double ls = 0, bls = 0;
  i64 ln = 0;
  for (size_t n = 0; n < N; ++n) {
    decisions[n] = d.valid[n] && !d.forced[n];
    r.tokens += d.valid[n];
    r.decisions += decisions[n];
    if (d.valid[n] && !std::isnan(d.loss[n]) && (d.base_loss.empty() || !std::isnan(d.base_loss[n]))) {
      ls += d.loss[n], ++ln;
      if (!d.base_loss.empty()) bls += d.base_loss[n];
    }
  }
  r.val_loss = ratio(ls, double(ln));
  r.base_val_loss = ratio(bls, double(ln));
  r.lengths = concept_lengths(b, d.valid, d.L);
  const ReferenceBoundaries ref = reference_boundaries(d.tokens, d.L, classify_pieces(pieces));
  r.alignments = {alignment(b, ref.space_start, decisions, "space_start"),
                  alignment(b, ref.word_start, decisions, "word_start"),
                  alignment(b, ref.after_punct, decisions, "after_punct")};
  r.openers = top_openers(d.tokens, b, decisions, top_k, pieces);
  r.p_hist = histogram(d.p, decisions, 20, 0.0, 1.0);
  std::vector<double> taus;
  for (int i = 1; i <= 19; ++i) taus.push_back(i / 20.0);
  r.taus = tau_curve(d.p, d.forced, d.valid, taus);
  r.positions = position_loss(b, d.valid, d.L, d.loss, d.base_loss);
  if (!d.source.empty())
    r.sources = per_source(d.tokens, b, d.valid, d.source, d.source_names, piece_bytes, d.loss);
  return r;
}

AnalysisData collect_analysis_data(LanguageModel& m, const DataDir& d, const AnalyzeOptions& o,
                                   LanguageModel* baseline, const ValSources* sources) {
  const ModelConfig& mc = m.config();
  DLCM_CHECK(mc.is_dlcm(), "--ckpt: this is a ", mc.arch,
             " checkpoint without concepts; analyze needs a dlcm checkpoint");
  DLCM_CHECK(d.tokenizer->vocab_size() == mc.vocab_size, "--data ", d.dir, ": the tokenizer has ",
             d.tokenizer->vocab_size(), " tokens but the checkpoint's vocab_size is ", mc.vocab_size,
             " (give the data the model was trained on)");
  const i64 L = o.seq_len;
  DLCM_CHECK(L > 0, "--seq-len must be positive, got ", L);
  DLCM_CHECK(L <= mc.max_seq_len, "--seq-len ", L, " exceeds the model's max_seq_len ", mc.max_seq_len);
  DLCM_CHECK(o.batch_size > 0, "--batch-size must be positive, got ", o.batch_size);
  DLCM_CHECK(o.max_batches != 0 && o.max_batches >= -1, "--batches: expected a positive count (or -1 for all), got ",
             o.max_batches);
  DLCM_CHECK(o.tau < 0 || (o.tau > 0 && o.tau <= 1), "--tau: expected a value in (0, 1], got ", o.tau);
  if (baseline) {
    const ModelConfig& bc = baseline->config();
    DLCM_CHECK(bc.vocab_size == mc.vocab_size && bc.bos_id == mc.bos_id, "--baseline: its vocabulary (",
               bc.vocab_size, " tokens, bos ", bc.bos_id, ") differs from the dlcm's (", mc.vocab_size,
               ", bos ", mc.bos_id, "); give a baseline trained on the same tokenizer");
    DLCM_CHECK(L <= bc.max_seq_len, "--baseline: windows of ", L,
               " tokens exceed the baseline's max_seq_len ", bc.max_seq_len);
  }
  AnalysisData a;
  a.L = L;
  a.tau = o.tau < 0 ? mc.router.tau : o.tau;
  // Document starts of the split, for the source of each position.
  std::vector<i64> doc_start;
  if (sources) {
    for (i64 i = 0; i < d.val->size(); ++i)
      if (d.val->at(i) == d.tokenizer->bos_id()) doc_start.push_back(i);
    DLCM_CHECK(doc_start.size() == sources->doc.size(), d.dir, ": val.bin has ", doc_start.size(),
               " documents but the sources list ", sources->doc.size());
    a.source_names = sources->names;
  }
  ops::PrecisionScope fp32(ops::Precision::FP32);  // like validation
  const i64 B = o.batch_size;
  ValIterator it(d.val, L, d.tokenizer->pad_id());
  m.reserve(B, L);
  if (baseline) baseline->reserve(B, L);
  std::vector<float> p(B * L), row(B * L), brow(B * L);
  std::vector<uint8_t> bnd(B * L);
  TokenBatch tb;
  for (i64 batch = 0; o.max_batches < 0 || batch < o.max_batches; ++batch) {
    const i64 first_window = it.position();
    if (!it.next(B, tb) || tb.valid_rows == 0) break;
    m.boundaries(tb.inputs.data(), B, L, p.data(), bnd.data(), a.tau);
    Batch mb{tb.inputs.data(), tb.targets.data(), B, L, 0, bnd.data()};
    m.eval_micro(mb, row.data());
    if (baseline) baseline->eval_micro(Batch{tb.inputs.data(), tb.targets.data(), B, L, 0}, brow.data());
    for (i64 r = 0; r < B; ++r) {
      if (tb.tokens[r * (L + 1)] == -1) continue;  // a padding row past the end
      for (i64 t = 0; t < L; ++t) {
        const i64 n = r * L + t;
        const bool valid = tb.tokens[r * (L + 1) + t] != -1;
        const i32 tok = tb.inputs[n];
        a.tokens.push_back(tok);
        a.valid.push_back(valid);
        a.forced.push_back(t == 0 || tok == mc.bos_id);
        a.p.push_back(p[n]);
        const bool target = tb.targets[n] >= 0;
        a.loss.push_back(target ? row[n] : kNoTarget);
        if (baseline) a.base_loss.push_back(target ? brow[n] : kNoTarget);
        if (sources) {
          const i64 pos = (first_window + r) * L + t;  // validation windows are at stride L
          const i64 doc = std::upper_bound(doc_start.begin(), doc_start.end(), pos) - doc_start.begin() - 1;
          a.source.push_back(valid && doc >= 0 ? sources->doc[doc] : 0);
        }
      }
      a.windows++;
    }
  }
  DLCM_CHECK(a.windows > 0, "--data ", d.dir, ": the validation split has no window of ", L, " tokens");
  return a;
}

AnalysisReport analyze_checkpoint(LanguageModel& m, const DataDir& d, const AnalyzeOptions& o,
                                  LanguageModel* baseline) {
  const AnalyzeOptions& opt = o;
  ValSources vs;
  std::string why;
  const bool have_sources = load_val_sources(d, vs, &why);
  AnalysisData a = collect_analysis_data(m, d, opt, baseline, have_sources ? &vs : nullptr);
  std::vector<std::string> pieces(d.tokenizer->vocab_size());
  for (i32 i = 0; i < d.tokenizer->vocab_size(); ++i) pieces[i] = d.tokenizer->decode_piece(i);
  AnalysisReport r = analyze_data(a, pieces, d.tokenizer->piece_byte_lengths(), opt.top_k);
  r.data = d.dir;
  if (have_sources) r.sources_origin = vs.origin;
  else r.sources_missing = why;
  if (opt.usage) r.usage = opt.usage(m, a);
  return r;
}

json report_json(const AnalysisReport& r) {
  json j = {{"checkpoint", r.checkpoint},
            {"data", r.data},
            {"tau", float_value(r.tau)},
            {"windows", r.windows},
            {"seq_len", r.L},
            {"tokens", r.tokens},
            {"router_decisions", r.decisions},
            {"val_loss", r.val_loss}};
  j["concept_lengths"] = {{"histogram", r.lengths.count},
                          {"cap_note", "histogram[k]: concepts of k tokens; the last bin holds longer ones"},
                          {"concepts", r.lengths.concepts},
                          {"tokens", r.lengths.tokens},
                          {"mean_tokens_per_concept", r.lengths.mean},
                          {"max_length", r.lengths.max_len}};
  json al = json::object();
  for (const Alignment& a : r.alignments)
    al[a.reference] = {{"positions", a.positions},   {"boundaries", a.predicted},
                       {"reference", a.actual},      {"hits", a.hits},
                       {"precision", a.precision},   {"recall", a.recall},
                       {"f1", a.f1},
                       {"random", {{"precision", a.random_precision}, {"recall", a.random_recall},
                                   {"f1", a.random_f1}}}};
  j["alignment"] = al;
  json op = json::array();
  for (const TokenOpen& t : r.openers)
    op.push_back({{"id", t.id}, {"text", t.text}, {"opens", t.opens}, {"occurrences", t.occurrences},
                  {"rate", t.rate}});
  j["top_openers"] = op;
  j["p_histogram"] = {{"bins", r.p_hist}, {"lo", 0.0}, {"hi", 1.0}};
  json tc = json::array();
  for (const TauPoint& t : r.taus)
    tc.push_back({{"tau", t.tau}, {"tokens_per_concept", t.tokens_per_concept},
                  {"boundary_rate", t.boundary_rate}});
  j["tau_curve"] = tc;
  const PositionLoss& pl = r.positions;
  json pos = {{"count", pl.count},
              {"loss", pl.loss},
              {"first_concept", {{"count", pl.first_count}, {"loss", pl.first_loss}}},
              {"other_concepts", {{"count", pl.other_count}, {"loss", pl.other_loss}}}};
  if (pl.has_baseline()) {
    std::vector<double> diff;
    for (size_t i = 0; i < pl.loss.size(); ++i) diff.push_back(pl.loss[i] - pl.base_loss[i]);
    pos["baseline_loss"] = pl.base_loss;
    pos["dlcm_minus_baseline"] = diff;
    pos["first_concept"]["baseline_loss"] = pl.first_base_loss;
    pos["first_concept"]["dlcm_minus_baseline"] = pl.first_loss - pl.first_base_loss;
    pos["other_concepts"]["baseline_loss"] = pl.other_base_loss;
    pos["other_concepts"]["dlcm_minus_baseline"] = pl.other_loss - pl.other_base_loss;
    j["baseline"] = r.baseline;
    j["baseline_val_loss"] = r.base_val_loss;
  }
  j["loss_by_position"] = pos;
  if (!r.sources_missing.empty()) {
    j["sources_missing"] = r.sources_missing;
  } else {
    json sc = json::array();
    for (const SourceCompression& s : r.sources)
      sc.push_back({{"name", s.name}, {"tokens", s.tokens}, {"concepts", s.concepts}, {"bytes", s.bytes},
                    {"tokens_per_concept", s.tokens_per_concept},
                    {"bytes_per_concept", s.bytes_per_concept}, {"loss", s.loss}});
    j["sources"] = sc;
    j["sources_origin"] = r.sources_origin;
  }
  if (r.usage)
    j["concept_usage"] = {{"val_loss", r.usage->val_loss},
                          {"delta_loss_null", r.usage->delta_loss_null},
                          {"delta_loss_shuffled", r.usage->delta_loss_shuffled},
                          {"xattn_ratio", r.usage->xattn_ratio},
                          {"tokens", r.usage->tokens}};
  return j;
}

}  // namespace dlcm
