// The public C++ API (include/dlcm/dlcm.h, docs/library.md) against the engine calls it wraps:
// forward and boundaries bit-identical to the loaded LanguageModel's, generate's streamed pieces
// adding up to its result and to generate()'s, clear errors for a baseline's boundaries and for
// bad token ids.
#include <dlcm/dlcm.h>

#include <cstring>

#include "infer/generate.h"
#include "model_fixtures.h"
#include "models/checkpoint.h"
#include "testing.h"

using namespace dlcm;

TEST(Api, MatchesTheEngineOnBaselineAndDlcm) {
  test::TempDir tmp;
  for (bool dlcm_arch : {false, true}) {
    const std::string dir = test::byte_checkpoint(tmp.path + (dlcm_arch ? "/dlcm" : "/base"),
                                            dlcm_arch ? test::tiny_dlcm() : test::tiny_baseline());
    api::Model m = api::Model::load(dir);
    EXPECT_EQ(m.arch(), dlcm_arch ? "dlcm" : "baseline");
    EXPECT_EQ(m.vocab_size(), 260);
    std::vector<int32_t> ids = m.tokenize("the cat sat on the mat");
    EXPECT_EQ(m.detokenize(ids), "the cat sat on the mat");
    ids.insert(ids.begin(), m.bos_id());
    const i64 L = i64(ids.size());

    auto ref = load_model(dir);
    std::vector<float> want(L * 260);
    ref->logits(ids.data(), 1, L, want.data());
    std::vector<float> got = m.forward(ids);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);

    if (dlcm_arch) {
      std::vector<float> p(L);
      std::vector<uint8_t> b(L);
      ASSERT_TRUE(ref->boundaries(ids.data(), 1, L, p.data(), b.data()));
      api::Boundaries bd = m.boundaries(ids);
      EXPECT_EQ(bd.p, p);
      EXPECT_EQ(bd.b, b);
      EXPECT_EQ(bd.b[0], 1);  // BOS starts a concept
    } else {
      try {
        m.boundaries(ids);
        FAIL();
      } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("boundaries need a dlcm checkpoint"), std::string::npos) << e.what();
      }
    }

    api::GenerateConfig g;
    g.max_new_tokens = 12;
    std::string streamed;
    const std::string text = m.generate("the", g, [&](const std::string& s) { streamed += s; });
    EXPECT_EQ(streamed, text);
    GenerateOptions o;
    o.sampler.temperature = 0;
    o.max_new_tokens = 12;
    auto tok = make_byte_tokenizer();
    EXPECT_EQ(generate(*ref, *tok, {"the"}, o).at(0).text, text);
  }
}

TEST(Api, BadInputsGiveClearErrors) {
  test::TempDir tmp;
  try {
    api::Model::load(tmp.path + "/nope");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos) << e.what();
  }
  api::Model m = api::Model::load(test::byte_checkpoint(tmp.path + "/ck", test::tiny_baseline()));
  struct Case {
    std::vector<int32_t> ids;
    const char* expect;
  } cases[] = {{{}, "empty token list"},
               {{1, 260}, "token 1 is 260, outside the vocabulary [0, 260)"},
               {{1, -3}, "token 1 is -3"},
               {std::vector<int32_t>(65, 1), "65 tokens exceed the model's max_seq_len 64"}};
  for (const Case& c : cases) {
    try {
      m.forward(c.ids);
      FAIL() << c.expect;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << e.what();
    }
  }
  api::GenerateConfig g;
  g.max_new_tokens = 0;
  EXPECT_THROW(m.generate("the", g), std::runtime_error);
}
