// `dlcm analyze` (eval/concept_analysis.h): the pure statistics on hand-made inputs with known
// answers (concept lengths, P/R/F1 and the random-boundary expectation, reference boundaries from
// token text, top openers, histograms, the tau curve, loss by position, per-source compression),
// then the whole command on a tiny trained DLCM and baseline: the JSON fields, the HTML figures,
// per-source analysis from val_sources.json and, for an older data folder, from the corpus.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "data/prepare.h"
#include "eval/concept_analysis.h"
#include "models/model.h"
#include "testing.h"
#include "tools/commands.h"

using namespace dlcm;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

TEST(Analyze, ConceptLengthsPerWindow) {
  // Two windows of 5; the second has a padded last position. Window 1 starts without b = 1
  // (a hand-made input): its first valid token still opens a concept.
  const std::vector<uint8_t> b = {1, 0, 1, 0, 0, 0, 1, 0, 0, 1};
  const std::vector<uint8_t> valid = {1, 1, 1, 1, 1, 1, 1, 1, 1, 0};
  LengthHistogram h = concept_lengths(b, valid, 5, 8);
  // concepts: [2, 3] and [1, 3] (the padded position is no token)
  EXPECT_EQ(h.count, (std::vector<i64>{0, 1, 1, 2, 0, 0, 0, 0, 0}));
  EXPECT_EQ(h.concepts, 4);
  EXPECT_EQ(h.tokens, 9);
  EXPECT_EQ(h.max_len, 3);
  EXPECT_DOUBLE_EQ(h.mean, 9.0 / 4.0);
  LengthHistogram capped = concept_lengths(b, valid, 5, 2);  // the last bin holds 2 or more
  EXPECT_EQ(capped.count, (std::vector<i64>{0, 1, 3}));
  EXPECT_THROW(concept_lengths(b, valid, 3, 8), Error);  // 10 is not windows x 3
}

TEST(Analyze, ThresholdKeepsForcedBoundaries) {
  EXPECT_EQ(threshold_boundaries({0.9f, 0.2f, 0.5f, 0.49f}, {0, 1, 0, 0}, 0.5f),
            (std::vector<uint8_t>{1, 1, 1, 0}));
}

TEST(Analyze, PrecisionRecallF1AndRandomExpectation) {
  const std::vector<uint8_t> b = {1, 0, 1, 1, 0, 1}, ref = {1, 1, 0, 1, 0, 1},
                             mask = {1, 1, 1, 1, 1, 0};
  Alignment a = alignment(b, ref, mask, "x");
  EXPECT_EQ(a.reference, "x");
  EXPECT_EQ(a.positions, 5);
  EXPECT_EQ(a.predicted, 3);
  EXPECT_EQ(a.actual, 3);
  EXPECT_EQ(a.hits, 2);
  EXPECT_DOUBLE_EQ(a.precision, 2.0 / 3);
  EXPECT_DOUBLE_EQ(a.recall, 2.0 / 3);
  EXPECT_DOUBLE_EQ(a.f1, 2.0 / 3);
  EXPECT_DOUBLE_EQ(a.random_precision, 3.0 / 5);
  EXPECT_DOUBLE_EQ(a.random_recall, 3.0 / 5);
  EXPECT_DOUBLE_EQ(a.random_f1, 2.0 * 3 * 3 / (5.0 * 6));
  // No boundaries at all: zeros, not NaN.
  Alignment z = alignment({0, 0}, {0, 1}, {1, 1});
  EXPECT_EQ(z.precision, 0);
  EXPECT_EQ(z.f1, 0);
}

// The closed-form expectation against a seeded simulation: k boundaries placed uniformly at
// random among N positions against a fixed reference.
TEST(Analyze, RandomExpectationMatchesSimulation) {
  const i64 N = 1000, k = 300;
  Rng r(5);
  std::vector<uint8_t> ref(N), mask(N, 1), b(N, 0);
  for (auto& v : ref) v = r.uniform() < 0.2;
  for (i64 i = 0; i < k; ++i) b[i] = 1;
  double P = 0, R = 0, F = 0;
  const int trials = 3000;
  Alignment a;
  for (int s = 0; s < trials; ++s) {
    for (i64 i = N - 1; i > 0; --i) std::swap(b[i], b[r.next() % uint64_t(i + 1)]);
    a = alignment(b, ref, mask);
    P += a.precision, R += a.recall, F += a.f1;
  }
  EXPECT_NEAR(P / trials, a.random_precision, 2e-3);
  EXPECT_NEAR(R / trials, a.random_recall, 2e-3);
  EXPECT_NEAR(F / trials, a.random_f1, 2e-3);
  EXPECT_DOUBLE_EQ(a.random_recall, 0.3);
}

TEST(Analyze, ReferenceBoundariesFromTokenText) {
  const std::vector<std::string> pieces = {
      "",       " the", "cat", ".", " ", "t", "\n", "ing", "(", "\xC3\xA9t\xC3\xA9" /* été */,
      "\xC3" /* half of a character */, "\xE2\x80\x94" /* em dash */, "A", " (a", "a)"};
  auto cls = classify_pieces(pieces);
  // the first character after the spaces decides, not the last
  EXPECT_TRUE(cls[13].lead_space && !cls[13].word_char_first && cls[13].ends_word_char);
  EXPECT_TRUE(cls[14].word_char_first && cls[14].ends_punct);
  EXPECT_TRUE(cls[1].lead_space && cls[1].word_char_first && cls[1].ends_word_char);
  EXPECT_TRUE(cls[3].ends_punct && !cls[3].word_char_first);
  EXPECT_TRUE(cls[9].word_char_first && cls[9].ends_word_char);
  EXPECT_TRUE(cls[10].ends_word_char);
  EXPECT_TRUE(cls[11].ends_punct && !cls[11].ends_word_char);
  EXPECT_FALSE(cls[0].lead_space || cls[0].word_char_first || cls[0].ends_punct);
  // Two windows of 8.
  const std::vector<i32> tokens = {1, 2, 3, 4, 5, 7, 6, 12,   // " the|cat|.| |t|ing|\n|A"
                                   8, 2, 11, 9, 10, 2, 3, 1};  // "(|cat|—|été|\xC3|cat|.| the"
  ReferenceBoundaries r = reference_boundaries(tokens, 8, cls);
  EXPECT_EQ(r.space_start, (std::vector<uint8_t>{1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1}));
  EXPECT_EQ(r.word_start, (std::vector<uint8_t>{1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1}));
  EXPECT_EQ(r.after_punct, (std::vector<uint8_t>{0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1}));
  EXPECT_THROW(reference_boundaries({1, 99}, 2, cls), Error);
}

TEST(Analyze, TopOpenersCountsRatesAndTies) {
  const std::vector<i32> tokens = {5, 5, 5, 7, 7, 9, 9, 9, 9};
  const std::vector<uint8_t> b = {1, 1, 0, 1, 1, 1, 0, 0, 0};
  std::vector<uint8_t> mask(9, 1);
  std::vector<std::string> pieces(10);
  pieces[5] = "five";
  auto top = top_openers(tokens, b, mask, 2, pieces);
  ASSERT_EQ(top.size(), 2u);
  EXPECT_EQ(top[0].id, 5);  // 2 opens each: the lower id first
  EXPECT_EQ(top[0].opens, 2);
  EXPECT_EQ(top[0].occurrences, 3);
  EXPECT_DOUBLE_EQ(top[0].rate, 2.0 / 3);
  EXPECT_EQ(top[0].text, "five");
  EXPECT_EQ(top[1].id, 7);
  EXPECT_DOUBLE_EQ(top[1].rate, 1.0);
  auto all = top_openers(tokens, b, mask, 30);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[2].id, 9);
  EXPECT_DOUBLE_EQ(all[2].rate, 0.25);
  mask[0] = 0;  // positions outside the mask count neither way
  auto masked = top_openers(tokens, b, mask, 30);
  EXPECT_EQ(masked[0].id, 7);
  EXPECT_EQ(masked[1].id, 5);
  EXPECT_EQ(masked[1].opens, 1);
  EXPECT_EQ(masked[1].occurrences, 2);
}

TEST(Analyze, HistogramBinsAndEnds) {
  const std::vector<float> x = {0.0f, 0.05f, 0.15f, 0.49f, 0.5f, 0.99f, 1.0f, 1.5f, -0.2f, NAN, 0.7f};
  std::vector<uint8_t> mask(x.size(), 1);
  mask[10] = 0;
  EXPECT_EQ(histogram(x, mask, 10, 0.0, 1.0), (std::vector<i64>{3, 1, 0, 0, 1, 1, 0, 0, 0, 3}));
}

TEST(Analyze, TauCurveIsMonotoneWithKnownEnds) {
  Rng r(3);
  const i64 N = 640;
  std::vector<float> p(N);
  std::vector<uint8_t> forced(N), valid(N, 1);
  for (i64 n = 0; n < N; ++n) p[n] = r.uniform(), forced[n] = n % 16 == 0;
  valid[N - 1] = 0;
  std::vector<double> taus = {0.0};
  for (int i = 1; i <= 19; ++i) taus.push_back(i / 20.0);
  taus.push_back(1.5);
  auto c = tau_curve(p, forced, valid, taus);
  ASSERT_EQ(c.size(), taus.size());
  EXPECT_DOUBLE_EQ(c.front().tokens_per_concept, 1.0);  // tau 0: every token a concept
  EXPECT_DOUBLE_EQ(c.front().boundary_rate, 1.0);
  EXPECT_DOUBLE_EQ(c.back().tokens_per_concept, 639.0 / 40);  // only the forced ones
  EXPECT_DOUBLE_EQ(c.back().boundary_rate, 0.0);
  for (size_t i = 1; i < c.size(); ++i) {
    EXPECT_GE(c[i].tokens_per_concept, c[i - 1].tokens_per_concept) << taus[i];
    EXPECT_LE(c[i].boundary_rate, c[i - 1].boundary_rate) << taus[i];
  }
  EXPECT_GT(c[10].tokens_per_concept, c[5].tokens_per_concept);  // uniform p: strictly between
  // Hand-made: one window of 4, p = (1 forced), 0.2, 0.6, 0.8.
  auto h = tau_curve({1.0f, 0.2f, 0.6f, 0.8f}, {1, 0, 0, 0}, {1, 1, 1, 1}, {0.5, 0.7, 0.9});
  EXPECT_DOUBLE_EQ(h[0].tokens_per_concept, 4.0 / 3);
  EXPECT_DOUBLE_EQ(h[1].tokens_per_concept, 2.0);
  EXPECT_DOUBLE_EQ(h[2].tokens_per_concept, 4.0);
  EXPECT_DOUBLE_EQ(h[1].boundary_rate, 1.0 / 3);
}

TEST(Analyze, LossByPositionInConcept) {
  // One window of 6: concepts [0,1,2] and [3,4,5]; the loss at 4 has no target.
  const std::vector<uint8_t> b = {1, 0, 0, 1, 0, 0}, valid(6, 1);
  const std::vector<float> loss = {1, 2, 3, 4, NAN, 6}, base = {2, 2, 2, 2, 2, 2};
  PositionLoss p = position_loss(b, valid, 6, loss, base, 2);  // slots 0, 1, 2+
  EXPECT_EQ(p.count, (std::vector<i64>{2, 1, 2}));
  EXPECT_EQ(p.loss, (std::vector<double>{2.5, 2.0, 4.5}));
  EXPECT_EQ(p.base_loss, (std::vector<double>{2.0, 2.0, 2.0}));
  EXPECT_EQ(p.first_count, 3);
  EXPECT_DOUBLE_EQ(p.first_loss, 2.0);
  EXPECT_EQ(p.other_count, 2);
  EXPECT_DOUBLE_EQ(p.other_loss, 5.0);
  EXPECT_DOUBLE_EQ(p.other_base_loss, 2.0);
  PositionLoss q = position_loss(b, valid, 6, loss, {}, 1);  // no baseline; slots 0, 1+
  EXPECT_FALSE(q.has_baseline());
  EXPECT_EQ(q.count, (std::vector<i64>{2, 3}));
  EXPECT_DOUBLE_EQ(q.loss[1], (2.0 + 3 + 6) / 3);
}

TEST(Analyze, CompressionPerSource) {
  const std::vector<i32> tokens = {1, 10, 11, 12, 1, 13, 14, 0};
  const std::vector<uint8_t> b = {1, 0, 1, 0, 1, 1, 0, 0}, valid = {1, 1, 1, 1, 1, 1, 1, 0};
  // Not written as {1, 1, 1, 1, 0, 0, 0, 0}: GCC 12.2 with -march=native on Zen 5 compiles that
  // initializer list into a broadcast of 1 here (wrong code, seen at -O2 and -O3).
  std::vector<i32> source(8, 1);
  std::fill(source.begin() + 4, source.end(), 0);
  std::vector<i32> bytes(15, 2);
  bytes[1] = 0;  // BOS has no text
  const std::vector<float> loss = {1, 1, 1, 1, 3, 3, NAN, 0};
  auto s = per_source(tokens, b, valid, source, {"web", "code", "empty"}, bytes, loss);
  ASSERT_EQ(s.size(), 2u);  // "empty" has no validation token
  EXPECT_EQ(s[0].name, "web");
  EXPECT_EQ(s[0].tokens, 3);
  EXPECT_EQ(s[0].concepts, 2);
  EXPECT_EQ(s[0].bytes, 4);
  EXPECT_DOUBLE_EQ(s[0].tokens_per_concept, 1.5);
  EXPECT_DOUBLE_EQ(s[0].bytes_per_concept, 2.0);
  EXPECT_DOUBLE_EQ(s[0].loss, 3.0);
  EXPECT_EQ(s[1].name, "code");
  EXPECT_EQ(s[1].tokens, 4);
  EXPECT_DOUBLE_EQ(s[1].tokens_per_concept, 2.0);
  EXPECT_DOUBLE_EQ(s[1].bytes_per_concept, 3.0);
}

// ---- the command on a tiny trained model ----

const std::string kDlcm = DLCM_BINARY;

// Two sources with different texture: words with spaces ("prose") and short code lines.
std::string corpus_jsonl() {
  Rng r(3);
  const char* words[] = {"the", "concept", "model", "reads", "tokens", "and", "writes",
                         "text", "while", "ranks", "sum", "gradients", "over", "steps"};
  std::string out;
  for (int d = 0; d < 400; ++d) {
    std::string t;
    const bool code = d % 3 == 0;
    const int n = 3 + int(r.next() % 20);
    for (int i = 0; i < n; ++i) {
      if (code) {
        t += 'x';
        t += std::to_string(r.next() % 10);
        t += " = f(";
        t += words[r.next() % 14];
        t += ");\n";
      } else {
        if (i) t += ' ';
        t += words[r.next() % 14];
      }
    }
    out += json{{"text", code ? t : t + "."}, {"source", code ? "code" : "prose"}}.dump() + "\n";
  }
  return out;
}

json tiny_config(const std::string& arch) {
  json m = {{"arch", arch},    {"vocab_size", 260}, {"d_token", 32},  {"n_heads", 2},
            {"n_kv_heads", 1}, {"head_dim", 16},    {"d_ff", 64},     {"max_seq_len", 64},
            {"init_std", 0.1}};
  if (arch == "dlcm") {
    const json extra = {{"enc_layers", 1}, {"dec_layers", 1}, {"d_concept", 48}, {"bb_layers", 1},
                        {"bb_heads", 3},   {"bb_kv_heads", 3}, {"bb_d_ff", 96},  {"x_heads", 2},
                        {"x_kv_heads", 2}, {"x_d_ff", 64}};
    m.update(extra);
  } else {
    m["n_layers"] = 2;
  }
  m["train"] = {{"seq_len", 32}, {"batch_size", 4}, {"steps", 8}, {"lr", 3e-3}, {"warmup_steps", 0},
                {"eval_every", 0}, {"ckpt_every", 0}, {"log_every", 4}};
  return m;
}

struct Fixture {
  test::TempDir dir;
  std::string corpus, data, dlcm, base;
  Fixture() {
    corpus = dir.path + "/corpus.jsonl";
    std::ofstream(corpus) << corpus_jsonl();
    data = dir.path + "/data";
    auto run = [](const std::string& args) {
      test::CmdResult r = test::run_dlcm(args);
      if (r.rc != 0) throw Error("dlcm " + args + " failed: " + r.out);
    };
    run("prepare --input " + corpus + " --out " + data + " --tokenizer bytes --val-fraction 0.05");
    for (const char* arch : {"dlcm", "baseline"}) {
      const std::string cfg = dir.path + "/" + arch + ".json";
      std::ofstream(cfg) << tiny_config(arch).dump();
      run("train --quiet --no-final-eval --config " + cfg + " --data " + data + " --out " + dir.path +
          "/run_" + arch);
    }
    dlcm = dir.path + "/run_dlcm";
    base = dir.path + "/run_baseline";
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

json read_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f);
}

TEST(AnalyzeCommand, WritesJsonAndHtmlWithFigures) {
  Fixture& f = fixture();
  const std::string out = f.dir.path + "/analysis";
  test::CmdResult r = test::run_dlcm("analyze --ckpt " + f.dlcm + " --data " + f.data + " --out " + out +
                                     " --baseline " + f.base + " --top 10");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("word_start F1"), std::string::npos) << r.out;
  json j = read_json(out + "/analysis.json");
  const i64 tokens = j["tokens"], decisions = j["router_decisions"];
  EXPECT_EQ(j["seq_len"], 32);
  EXPECT_EQ(j["data"], f.data);
  EXPECT_DOUBLE_EQ(j["tau"].get<double>(), 0.5);  // the checkpoint's router.tau
  EXPECT_GT(decisions, 0);
  EXPECT_LT(decisions, tokens);
  // The whole validation split: windows at stride 32 whose inputs hold every token once (but
  // the last when it is only a target).
  DataDir dd = open_data_dir(f.data);
  const i64 n = dd.val->size();
  EXPECT_EQ(tokens, (n - 1) % 32 == 0 ? n - 1 : n);
  EXPECT_EQ(j["windows"].get<i64>(), (n - 1 + 31) / 32);

  const json& cl = j["concept_lengths"];
  i64 sum = 0, weighted = 0;
  for (size_t k = 0; k < cl["histogram"].size(); ++k) sum += cl["histogram"][k].get<i64>();
  EXPECT_EQ(sum, cl["concepts"].get<i64>());
  EXPECT_EQ(cl["tokens"].get<i64>(), tokens);
  EXPECT_NEAR(cl["mean_tokens_per_concept"].get<double>(), double(tokens) / cl["concepts"].get<double>(), 1e-12);
  for (size_t k = 1; k + 1 < cl["histogram"].size(); ++k) weighted += i64(k) * cl["histogram"][k].get<i64>();
  EXPECT_LE(weighted, tokens);

  for (const char* ref : {"space_start", "word_start", "after_punct"}) {
    const json& a = j["alignment"][ref];
    EXPECT_EQ(a["positions"].get<i64>(), decisions) << ref;
    for (const char* k : {"precision", "recall", "f1"}) {
      EXPECT_GE(a[k].get<double>(), 0) << ref;
      EXPECT_LE(a[k].get<double>(), 1) << ref;
    }
    EXPECT_NEAR(a["random"]["recall"].get<double>(), a["boundaries"].get<double>() / decisions, 1e-12);
    EXPECT_NEAR(a["random"]["precision"].get<double>(), a["reference"].get<double>() / decisions, 1e-12);
    // the references come from the tokens' text: prose has spaces, words and punctuation
    EXPECT_GT(a["reference"].get<i64>(), 0) << ref;
  }
  const json& op = j["top_openers"];
  ASSERT_GT(op.size(), 0u);
  EXPECT_LE(op.size(), 10u);
  for (size_t i = 1; i < op.size(); ++i) EXPECT_GE(op[i - 1]["opens"], op[i]["opens"]);
  for (const json& t : op) EXPECT_LE(t["opens"].get<i64>(), t["occurrences"].get<i64>());
  for (const json& t : op)
    EXPECT_EQ(t["text"].get<std::string>(), dd.tokenizer->decode_piece(t["id"].get<i32>()));

  i64 p_sum = 0;
  for (const json& v : j["p_histogram"]["bins"]) p_sum += v.get<i64>();
  EXPECT_EQ(j["p_histogram"]["bins"].size(), 20u);
  EXPECT_EQ(p_sum, decisions);
  const json& tc = j["tau_curve"];
  ASSERT_EQ(tc.size(), 19u);
  for (size_t i = 1; i < tc.size(); ++i)
    EXPECT_GE(tc[i]["tokens_per_concept"].get<double>(), tc[i - 1]["tokens_per_concept"].get<double>());
  EXPECT_DOUBLE_EQ(tc[9]["tau"].get<double>(), 0.5);
  EXPECT_NEAR(tc[9]["tokens_per_concept"].get<double>(), cl["mean_tokens_per_concept"].get<double>(), 1e-12);

  const json& pl = j["loss_by_position"];
  ASSERT_EQ(pl["loss"].size(), 8u);  // positions 0..6 and 7+
  ASSERT_EQ(pl["baseline_loss"].size(), 8u);
  ASSERT_EQ(pl["dlcm_minus_baseline"].size(), 8u);
  EXPECT_NEAR(pl["dlcm_minus_baseline"][0].get<double>(),
              pl["loss"][0].get<double>() - pl["baseline_loss"][0].get<double>(), 1e-12);
  i64 targets = 0;
  for (const json& c : pl["count"]) targets += c.get<i64>();
  EXPECT_EQ(targets, n - 1);  // every token but the first is a target once
  EXPECT_EQ(pl["first_concept"]["count"].get<i64>() + pl["other_concepts"]["count"].get<i64>(), targets);
  EXPECT_GT(j["baseline_val_loss"].get<double>(), 0);

  // Sources from val_sources.json, written by prepare.
  EXPECT_EQ(j["sources_origin"], "val_sources.json");
  ASSERT_EQ(j["sources"].size(), 2u);
  i64 src_tokens = 0;
  for (const json& s : j["sources"]) src_tokens += s["tokens"].get<i64>();
  EXPECT_EQ(src_tokens, tokens);
  // The CLI measures concept usage (eval/concept_usage) on the same validation windows.
  ASSERT_EQ(j.count("concept_usage"), 1u);
  EXPECT_GT(j["concept_usage"]["tokens"].get<i64>(), 0);
  EXPECT_TRUE(std::isfinite(j["concept_usage"]["delta_loss_null"].get<double>()));
  EXPECT_GE(j["concept_usage"]["xattn_ratio"].get<double>(), 0);

  const std::string html = test::read_text(out + "/analysis.html");
  EXPECT_GE(test::count_of(html, "<svg "), 5);
  EXPECT_GE(test::count_of(html, "<rect x="), 20);  // histogram bars
  for (const char* s : {"Concept lengths", "Compression against tau", "Boundary alignment",
                        "Loss by position inside a concept", "Compression per corpus source",
                        "Tokens that open a concept", "code", "prose"})
    EXPECT_NE(html.find(s), std::string::npos) << s;
  EXPECT_NE(html.find("concept-usage"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
}

// A data folder prepared before val_sources.json existed: the sources are re-derived from the
// corpus files of meta.json, with the same result; without the corpus the report says why.
TEST(AnalyzeCommand, SourcesOfOlderDataFolders) {
  Fixture& f = fixture();
  test::TempDir tmp;
  const std::string old = tmp.path + "/data";
  fs::copy(f.data, old);
  ValSources expect, got;
  ASSERT_TRUE(load_val_sources(open_data_dir(f.data), expect));
  fs::remove(old + "/" + kValSourcesFile);
  std::string why;
  ASSERT_TRUE(load_val_sources(open_data_dir(old), got, &why)) << why;
  EXPECT_EQ(got.names, expect.names);
  EXPECT_EQ(got.doc, expect.doc);
  EXPECT_NE(got.origin.find("re-derived"), std::string::npos);
  // Each validation document's source matches its text (code lines hold " = f(").
  DataDir dd = open_data_dir(f.data);
  std::vector<std::vector<i32>> docs;
  for (i64 i = 0; i < dd.val->size(); ++i) {
    if (dd.val->at(i) == dd.tokenizer->bos_id()) docs.emplace_back();
    docs.back().push_back(dd.val->at(i));
  }
  ASSERT_EQ(docs.size(), expect.doc.size());
  for (size_t k = 0; k < docs.size(); ++k)
    EXPECT_EQ(dd.tokenizer->decode(docs[k]).find(" = f(") != std::string::npos,
              expect.names[expect.doc[k]] == "code") << k;

  // A relative corpus path (prepare run elsewhere) is found from a folder above the data.
  test::TempDir rel;
  fs::copy(f.corpus, rel.path + "/c.jsonl");
  fs::create_directories(rel.path + "/sub");
  test::CmdResult p = test::run_command("cd " + rel.path + " && " + kDlcm +
                                        " prepare --input c.jsonl --out sub/data --tokenizer bytes --val-fraction 0.05 2>&1");
  ASSERT_EQ(p.rc, 0) << p.out;
  fs::remove(rel.path + "/sub/data/" + kValSourcesFile);
  ASSERT_TRUE(load_val_sources(open_data_dir(rel.path + "/sub/data"), got, &why)) << why;
  EXPECT_EQ(got.doc, expect.doc);

  const std::string args = "analyze --batches 2 --ckpt " + f.dlcm + " --data " + old + " --out " + tmp.path;
  test::CmdResult r = test::run_dlcm(args + "/a1");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(read_json(tmp.path + "/a1/analysis.json")["sources_origin"].get<std::string>().find("re-derived"),
            std::string::npos);
  EXPECT_EQ(read_json(tmp.path + "/a1/analysis.json")["windows"], 16);  // 2 batches of 8

  // The corpus moved away: analysed without sources, and the page says why.
  fs::rename(f.corpus, f.corpus + ".moved");
  EXPECT_FALSE(load_val_sources(open_data_dir(old), got, &why));
  EXPECT_NE(why.find("corpus.jsonl"), std::string::npos) << why;
  r = test::run_dlcm(args + "/a2");
  fs::rename(f.corpus + ".moved", f.corpus);
  ASSERT_EQ(r.rc, 0) << r.out;
  json j = read_json(tmp.path + "/a2/analysis.json");
  EXPECT_EQ(j.count("sources"), 0u);
  EXPECT_NE(j["sources_missing"].get<std::string>().find("not readable"), std::string::npos);
  EXPECT_NE(test::read_text(tmp.path + "/a2/analysis.html").find("Not available: "), std::string::npos);

  // A val_sources.json that does not match val.bin is an error naming the file.
  std::ofstream(old + "/" + kValSourcesFile) << R"({"sources": ["a"], "documents": [0]})";
  r = test::run_dlcm(args + "/a3");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("val_sources.json: lists 1 documents"), std::string::npos) << r.out;
}

// The seam for the concept-usage diagnostics: a measurement passed to analyze_checkpoint
// appears in the JSON and on the page; the tau option changes the boundaries.
TEST(AnalyzeCommand, ConceptUsageSectionAndTau) {
  Fixture& f = fixture();
  auto m = load_model(f.dlcm);
  DataDir d = open_data_dir(f.data);
  AnalyzeOptions o;
  o.seq_len = 32;
  o.max_batches = 2;
  bool called = false;
  o.usage = [&](LanguageModel& model, const AnalysisData& a) {
    called = true;
    EXPECT_EQ(&model, m.get());
    EXPECT_EQ(a.windows, 16);
    return ConceptUsage{3.5, 0.25, 0.125, 0.02, 511};
  };
  AnalysisReport r = analyze_checkpoint(*m, d, o);
  EXPECT_TRUE(called);
  json j = report_json(r);
  ASSERT_EQ(j.count("concept_usage"), 1u);
  EXPECT_DOUBLE_EQ(j["concept_usage"]["delta_loss_null"].get<double>(), 0.25);
  EXPECT_DOUBLE_EQ(j["concept_usage"]["xattn_ratio"].get<double>(), 0.02);
  EXPECT_EQ(j.count("baseline_val_loss"), 0u);
  EXPECT_EQ(j["loss_by_position"].count("baseline_loss"), 0u);
  const std::string html = analysis_html(r);
  EXPECT_NE(html.find("id=\"concept-usage\""), std::string::npos);
  EXPECT_NE(html.find("0.2500"), std::string::npos);

  // A higher tau cuts fewer concepts; the tau curve read at that tau agrees.
  o.usage = nullptr;
  o.tau = 0.7f;
  AnalysisReport hi = analyze_checkpoint(*m, d, o);
  EXPECT_GE(hi.lengths.mean, r.lengths.mean);
  EXPECT_NEAR(hi.lengths.mean, hi.taus[13].tokens_per_concept, 1e-12);  // tau 0.70
  EXPECT_NEAR(report_json(hi)["tau"].get<double>(), 0.7, 0);
}

TEST(AnalyzeCommand, BadInputsGiveOneLineErrors) {
  Fixture& f = fixture();
  const std::string base = "analyze --data " + f.data + " --out " + f.dir.path + "/bad ";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--ckpt " + f.base, "analyze needs a dlcm checkpoint"},
      {"--ckpt " + f.dlcm + " --tau 0", "--tau: expected a value in (0, 1]"},
      {"--ckpt " + f.dlcm + " --seq-len 999", "exceeds the model's max_seq_len"},
      {"--ckpt " + f.dlcm + " --batches 0", "--batches: expected a positive count"},
      {"--ckpt " + f.dlcm + " --baseline " + f.dir.path + "/nothing", "nothing"},
  };
  for (const auto& [args, msg] : cases) {
    test::CmdResult r = test::run_dlcm(base + args);
    EXPECT_NE(r.rc, 0) << args;
    EXPECT_NE(r.out.find(msg), std::string::npos) << args << "\n" << r.out;
    EXPECT_EQ(test::count_of(r.out, "\n"), 1) << r.out;
  }
  test::CmdResult r = test::run_dlcm("analyze --ckpt " + f.dlcm + " --data " + f.dir.path + "/nodata");
  EXPECT_NE(r.out.find("meta.json not found"), std::string::npos) << r.out;
}

}  // namespace
