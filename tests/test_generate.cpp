// Sampling and generation: the samplers' distributions and reproducibility, the text streamer
// (whole UTF-8 characters, stop strings), and the batched generation driver on a scripted model
// (EOS, stop strings, lengths, the context limit, concept info of every generated token) and on
// a real baseline (batching and seeds do not change the text).
#include <cstring>
#include <map>

#include "core/rng.h"
#include "data/tokenizer.h"
#include "infer/generate.h"
#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;

namespace {

// ---- samplers ----

TEST(Sampler, GreedyAndDegenerateCutsPickTheArgmax) {
  std::vector<float> lg = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f};
  std::vector<std::pair<float, i32>> scratch;
  Rng rng(1);
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(sample_token(lg.data(), 5, {0.0f, 0, 1.0f}, rng, scratch), 1);
    EXPECT_EQ(sample_token(lg.data(), 5, {1.5f, 1, 1.0f}, rng, scratch), 1);   // top-k 1
    EXPECT_EQ(sample_token(lg.data(), 5, {1.5f, 0, 0.01f}, rng, scratch), 1);  // tiny nucleus
  }
}

// Empirical frequencies over many draws against the intended distribution.
std::vector<double> frequencies(const std::vector<float>& lg, SamplerConfig c, int draws) {
  std::vector<std::pair<float, i32>> scratch;
  Rng rng(42);
  std::vector<double> f(lg.size(), 0);
  for (int i = 0; i < draws; ++i) f[sample_token(lg.data(), lg.size(), c, rng, scratch)] += 1.0 / draws;
  return f;
}

TEST(Sampler, DistributionsMatchTemperatureTopKTopP) {
  // probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1
  std::vector<float> lg = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  const int n = 40000;
  const double tol = 0.012;  // ~5 standard deviations at n = 40000
  auto f = frequencies(lg, {1.0f, 0, 1.0f}, n);
  const double want1[4] = {0.5, 0.3, 0.15, 0.05};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f[i], want1[i], tol) << i;
  // temperature 2: p ~ sqrt(p)
  double z = 0;
  for (double p : want1) z += std::sqrt(p);
  f = frequencies(lg, {2.0f, 0, 1.0f}, n);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f[i], std::sqrt(want1[i]) / z, tol) << i;
  // top-k 2: renormalised 0.625 / 0.375
  f = frequencies(lg, {1.0f, 2, 1.0f}, n);
  EXPECT_NEAR(f[0], 0.625, tol);
  EXPECT_NEAR(f[1], 0.375, tol);
  EXPECT_EQ(f[2] + f[3], 0.0);
  // top-p 0.7: the smallest prefix reaching 0.7 is {0.5, 0.3}
  f = frequencies(lg, {1.0f, 0, 0.7f}, n);
  EXPECT_NEAR(f[0], 0.625, tol);
  EXPECT_EQ(f[2] + f[3], 0.0);
  // top-p 0.85 keeps three
  f = frequencies(lg, {1.0f, 0, 0.85f}, n);
  EXPECT_NEAR(f[2], 0.15 / 0.95, tol);
  EXPECT_EQ(f[3], 0.0);
}

TEST(Sampler, SameSeedSameDraws) {
  std::vector<float> lg(50);
  test::fill_normal(lg.data(), 50, 3);
  std::vector<std::pair<float, i32>> s;
  SamplerConfig c{0.9f, 20, 0.95f};
  Rng a(7), b(7), other(8);
  std::vector<i32> x, y, z;
  for (int i = 0; i < 100; ++i) {
    x.push_back(sample_token(lg.data(), 50, c, a, s));
    y.push_back(sample_token(lg.data(), 50, c, b, s));
    z.push_back(sample_token(lg.data(), 50, c, other, s));
  }
  EXPECT_EQ(x, y);
  EXPECT_NE(x, z);
}

// ---- text streamer ----

TEST(TextStreamer, HoldsBackPartialCharactersAndStopPrefixes) {
  TextStreamer ts({"STOP"});
  EXPECT_EQ(ts.push("ab"), "ab");
  EXPECT_EQ(ts.push("\xC3"), "");           // first byte of "é"
  EXPECT_EQ(ts.push("\xA9" "c"), "\xC3\xA9" "c");
  EXPECT_EQ(ts.push(" ST"), " ");           // "ST" may begin "STOP"
  EXPECT_EQ(ts.push("ay"), "STay");         // it did not
  EXPECT_EQ(ts.push("xSTO"), "x");
  EXPECT_EQ(ts.push("P and more"), "");     // stop: nothing from the stop string on
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(ts.push("later"), "");
  EXPECT_EQ(ts.finish(), "");
  EXPECT_EQ(ts.text(), "ab\xC3\xA9" "c STayx");
}

TEST(TextStreamer, EarliestOfSeveralStopsAndFinish) {
  TextStreamer ts({"\n\n", "END"});
  std::string shown = ts.push("one\n");
  shown += ts.push("twoEND\n\n");
  EXPECT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "one\ntwo");
  shown += ts.finish();
  EXPECT_EQ(shown, "one\ntwo");
  TextStreamer plain;
  EXPECT_EQ(plain.push("x\xE2\x82"), "x");  // incomplete 3-byte character held back
  EXPECT_EQ(plain.finish(), "\xE2\x82");    // given out at the end as it is
  EXPECT_EQ(utf8_complete_prefix("\x80\x80", 2), 2u);  // stray continuation bytes: nothing to wait for
}

// Every lead-byte range at its edges: a character cut anywhere is held back whole, a complete one
// is given; bytes that cannot lead a character (C0, C1, F5-FF) wait for nothing.
TEST(TextStreamer, Utf8CompletePrefixAtEveryLeadByteEdge) {
  for (const std::string ch : {"\xC2\x80", "\xDF\xBF", "\xE0\xA0\x80", "\xE0\xB8\x81",
                               "\xEF\xBF\xBD", "\xF0\x90\x80\x80", "\xF0\x9F\x98\x80",
                               "\xF4\x8F\xBF\xBF"}) {
    const std::string s = "a" + ch;
    for (size_t cut = 2; cut < s.size(); ++cut)
      EXPECT_EQ(utf8_complete_prefix(s.data(), cut), 1u) << "lead " << int(uint8_t(ch[0])) << " cut "
                                                          << cut;
    EXPECT_EQ(utf8_complete_prefix(s.data(), s.size()), s.size()) << int(uint8_t(ch[0]));
  }
  for (const char* bad : {"a\xC0", "a\xC1", "a\xF5", "a\xFF", "a\xF8\x80"})
    EXPECT_EQ(utf8_complete_prefix(bad, std::strlen(bad)), std::strlen(bad)) << bad;
}

// ---- the generation driver on a scripted model ----

// A model whose stream follows a script: after a sequence of length L the next token is
// 'a' + (L % 5) (byte tokenizer ids: 4 + byte), except EOS when L == eos_at. It reports
// p = (pos % 4) / 4 and concept index pos / 4 for the token at pos. The driver sees it only
// through the LanguageModel / InferenceStream interfaces.
class ScriptModel : public LanguageModel {
 public:
  i64 eos_at;
  explicit ScriptModel(i64 eos_at_, i64 ctx) : eos_at(eos_at_) {
    cfg_.vocab_size = 260;
    cfg_.max_seq_len = ctx;
  }
  void reserve(i64, i64) override {}
  MicroStats train_micro(const Batch&, i64, const StepContext&) override { return {}; }
  MicroStats eval_micro(const Batch&, float*) override { return {}; }
  void logits(const i32*, i64, i64, float*) override {}
  double flops_per_token(i64) const override { return 0; }
  std::unique_ptr<InferenceStream> new_stream(const StreamOptions& o) override;
};

class ScriptStream : public InferenceStream {
 public:
  ScriptStream(ScriptModel& m, i64 S, i64 L) : InferenceStream(S, L, 260), m_(m) {}
  bool has_concepts() const override { return true; }
  TokenConcept token_concept(i64 seq, i64 pos) const override {
    EXPECT_LT(pos, length(seq));
    return {float(pos % 4) / 4, i32(pos / 4), pos % 4 == 0};
  }
  i64 steps = 0;

 protected:
  void do_reset(i64) override {}
  void next(i64 seq, i64 len_after, float* lg) {
    std::fill(lg, lg + 260, 0.0f);
    lg[len_after == m_.eos_at ? 2 : 4 + 'a' + len_after % 5] = 100.0f;
  }
  void do_prefill(const PrefillItem* it, i64 n, float* lg, bool all) override {
    ASSERT_FALSE(all);
    for (i64 i = 0; i < n; ++i) next(it[i].seq, length(it[i].seq) + it[i].n, lg + i * 260);
  }
  void do_step(const i64* seqs, const i32* tok, i64 n, float* lg) override {
    ++steps;
    for (i64 i = 0; i < n; ++i) next(seqs[i], length(seqs[i]) + 1, lg + i * 260);
  }

 private:
  ScriptModel& m_;
};

std::unique_ptr<InferenceStream> ScriptModel::new_stream(const StreamOptions& o) {
  return std::make_unique<ScriptStream>(*this, o.max_seqs, stream_len(o));
}

TEST(Generate, StopReasonsAndConceptInfoOnAScriptedModel) {
  auto tok = make_byte_tokenizer();
  ScriptModel m(/*eos_at=*/12, /*ctx=*/16);
  GenerateOptions o;
  o.sampler.temperature = 0;
  o.max_new_tokens = 6;
  o.max_batch = 2;
  o.concepts = true;
  std::map<i64, std::string> streamed;
  std::map<i64, i64> tokens_seen;
  GenerateEvents ev;
  ev.on_text = [&](i64 i, const std::string& s) { streamed[i] += s; };
  ev.on_token = [&](i64 i, i32, const TokenConcept* tc) {
    ++tokens_seen[i];
    if (i == 0) {
      ASSERT_NE(tc, nullptr);
    }
  };
  // prompt lengths with BOS: 3, 8, 15, 9 (the driver refills the two slots as prompts finish)
  std::vector<std::string> prompts = {"xy", "abcdefg", "abcdefghijklmn", "abcdefgh"};
  auto out = generate(m, *tok, prompts, o, ev);
  ASSERT_EQ(out.size(), 4u);
  // 0: lengths 3 -> tokens after lengths 3..8 = "dea bcd"... six tokens, stop by length
  EXPECT_EQ(out[0].stop_reason, "length");
  EXPECT_EQ(out[0].text, "deabcd");
  // every generated token's concept info, the last one fed once more to learn it
  ASSERT_EQ(out[0].concepts.size(), 6u);
  for (i64 k = 0; k < 6; ++k) {
    const i64 pos = 3 + k;
    EXPECT_EQ(out[0].concepts[k].concept_index, pos / 4);
    EXPECT_FLOAT_EQ(out[0].concepts[k].p, float(pos % 4) / 4);
  }
  // 1: length 8 -> 4 tokens, then EOS once the length reaches 12
  EXPECT_EQ(out[1].stop_reason, "eos");
  EXPECT_EQ(out[1].text, "deab");
  EXPECT_EQ(out[1].concepts.size(), 4u);
  // 2: length 15 of 16: one token fed, the next cannot be: context
  EXPECT_EQ(out[2].stop_reason, "context");
  EXPECT_EQ(out[2].ids.size(), 2u);
  ASSERT_EQ(out[2].concepts.size(), 2u);
  EXPECT_EQ(out[2].concepts[1].concept_index, -1);  // never fed: unknown
  EXPECT_EQ(out[3].stop_reason, "eos");
  for (i64 i = 0; i < 4; ++i) {
    EXPECT_EQ(streamed[i], out[i].text) << i;
    EXPECT_EQ(tokens_seen[i], i64(out[i].ids.size())) << i;
  }
  // a stop string cuts the text before it
  o.stop = {"ab"};
  o.concepts = false;
  out = generate(m, *tok, {"xy"}, o);
  EXPECT_EQ(out[0].stop_reason, "stop");
  EXPECT_EQ(out[0].text, "de");
}

TEST(Generate, BadPromptsAreNamedErrors) {
  auto tok = make_byte_tokenizer();
  ScriptModel m(100, 8);
  GenerateOptions o;
  o.prompt_names = {"p.txt:1", "p.txt:2"};
  try {
    generate(m, *tok, {"fine", ""}, o);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("p.txt:2: empty prompt"), std::string::npos) << e.what();
  }
  try {
    generate(m, *tok, {"much too long"}, o);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceed the model's context of 8"), std::string::npos)
        << e.what();
  }
  // a prompt filling the whole context still gets one token
  auto out = generate(m, *tok, {"1234567"}, GenerateOptions{});
  EXPECT_EQ(out[0].stop_reason, "context");
  EXPECT_EQ(out[0].ids.size(), 1u);
}

// ---- a real baseline: batching and seeds ----

TEST(Generate, BatchedEqualsOneByOneAndSeedsReproduce) {
  Config c = test::tiny_baseline(true, 1);
  c.model.vocab_size = 260;  // the byte tokenizer
  c.model.max_seq_len = 48;
  auto m = make_initialised_model(c.model, 17);
  auto tok = make_byte_tokenizer();
  std::vector<std::string> prompts = {"The cat", "A", "some longer prompt here", "xyz", "q"};
  GenerateOptions o;
  o.sampler = {0.9f, 40, 0.95f};
  o.seed = 5;
  o.max_new_tokens = 20;
  o.max_batch = 3;  // 5 prompts over 3 slots: refills
  auto batched = generate(*m, *tok, prompts, o);
  o.max_batch = 1;
  auto single = generate(*m, *tok, prompts, o);
  auto again = generate(*m, *tok, prompts, o);
  o.seed = 6;
  auto other = generate(*m, *tok, prompts, o);
  bool differs = false;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(batched[i].ids, single[i].ids) << i;
    EXPECT_EQ(single[i].ids, again[i].ids) << i;
    differs |= other[i].ids != single[i].ids;
    EXPECT_EQ(batched[i].prompt_ids.size(), prompts[i].size() + 1);  // bytes + BOS
  }
  EXPECT_TRUE(differs);
  // greedy decoding equals the argmax of the full forward pass at every step
  o.sampler.temperature = 0;
  o.max_new_tokens = 12;
  o.stop_at_eos = false;
  auto g = generate(*m, *tok, {"The cat"}, o);
  std::vector<i32> seq = g[0].prompt_ids;
  const i64 V = c.model.vocab_size;
  for (i32 t : g[0].ids) {
    std::vector<float> lg(seq.size() * V);
    m->logits(seq.data(), 1, seq.size(), lg.data());
    const float* last = lg.data() + (seq.size() - 1) * V;
    // the argmax over the tokenizer's ids (all of them here)
    EXPECT_EQ(t, i32(std::max_element(last, last + V) - last));
    seq.push_back(t);
  }
}

}  // namespace
