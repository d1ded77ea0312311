// Streaming DLCM (SPEC 5): incremental decoding with the full streaming state equals the full
// forward pass with thresholded boundaries, over prompts that cross many concept boundaries and
// several documents, batched slots, prefill and steps interleaved, slot reuse; p, b and the
// concept index of every token match; the backbone runs once per closed concept.
#include <algorithm>

#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;

namespace {

struct Full {
  std::vector<float> logits, p;
  std::vector<uint8_t> b;
};

Full full_forward(LanguageModel& m, const std::vector<i32>& tok, float tau) {
  const i64 L = tok.size(), V = m.config().vocab_size;
  Full f{std::vector<float>(L * V), std::vector<float>(L), std::vector<uint8_t>(L)};
  m.logits(tok.data(), 1, L, f.logits.data());
  m.boundaries(tok.data(), 1, L, f.p.data(), f.b.data(), tau);
  return f;
}

struct Case {
  const char* router;
  const char* xattn;
};

class DlcmStreamEquivalence : public ::testing::TestWithParam<Case> {};

TEST_P(DlcmStreamEquivalence, IncrementalEqualsFullForward) {
  Config c = test::tiny_dlcm(GetParam().router, GetParam().xattn);
  c.model.max_seq_len = 160;
  auto m = make_initialised_model(c.model, 17);
  const i64 V = c.model.vocab_size;
  const i32 bos = c.model.bos_id;
  std::vector<std::vector<i32>> seqs;
  for (i64 L : {150, 97, 71, 130}) {
    auto t = test::random_tokens(L, V, 300 + L, bos, 0.04);
    t[0] = bos;
    seqs.push_back(t);
  }
  std::vector<Full> want;
  for (auto& s : seqs) want.push_back(full_forward(*m, s, c.model.router.tau));
  // The inputs exercise the concept machinery: many boundaries, multi-token concepts, BOS.
  i64 concepts0 = std::count(want[0].b.begin(), want[0].b.end(), 1);
  ASSERT_GT(concepts0, 15);
  ASSERT_LT(concepts0, 120);
  ASSERT_GE(std::count(seqs[0].begin(), seqs[0].end(), bos), 3);

  auto st = m->new_stream({3, 0, -1});
  ASSERT_TRUE(st->has_concepts());
  double worst = 0;
  i64 p_mismatch = 0, b_mismatch = 0, seg_mismatch = 0;
  std::vector<i64> which = {0, 1, 2}, fed = {0, 0, 0};
  auto check = [&](i64 slot, i64 pos, const float* got) {
    const i64 w = which[slot];
    worst = std::max(worst, test::max_abs_diff(got, want[w].logits.data() + pos * V, V));
  };
  auto check_concepts = [&](i64 slot) {
    const Full& f = want[which[slot]];
    i32 seg = -1;
    for (i64 t = 0; t < st->length(slot); ++t) {
      seg += f.b[t];
      TokenConcept tc = st->token_concept(slot, t);
      p_mismatch += std::abs(tc.p - f.p[t]) > 1e-5;
      b_mismatch += tc.boundary != (f.b[t] != 0);
      seg_mismatch += tc.concept_index != seg;
    }
    // the backbone ran once per closed concept, never per token
    StreamCounters ct = st->counters(slot);
    EXPECT_EQ(ct.concepts, seg + 1);
    EXPECT_EQ(ct.concepts_closed, seg);
    EXPECT_EQ(ct.backbone_positions, ct.concepts_closed);
  };
  const i64 first[3] = {70, 5, 1};
  std::vector<PrefillItem> items;
  for (i64 s = 0; s < 3; ++s) items.push_back({s, seqs[s].data(), first[s]});
  std::vector<float> lg((70 + 5 + 1) * V), out(3 * V);
  st->prefill(items.data(), 3, lg.data(), true);
  i64 row = 0;
  for (i64 s = 0; s < 3; ++s) {
    for (i64 i = 0; i < first[s]; ++i) check(s, i, lg.data() + row++ * V);
    fed[s] = first[s];
  }
  bool reused = false, mid_prefill = false;
  for (;;) {
    if (!mid_prefill && fed[1] == 20) {
      st->prefill(1, seqs[1].data() + 20, 40, out.data());
      fed[1] += 40;
      check(1, fed[1] - 1, out.data());
      mid_prefill = true;
    }
    std::vector<i64> active;
    std::vector<i32> tok;
    for (i64 s = 0; s < 3; ++s)
      if (fed[s] < (i64)seqs[which[s]].size()) {
        active.push_back(s);
        tok.push_back(seqs[which[s]][fed[s]]);
      }
    if (active.empty()) break;
    st->step(active.data(), tok.data(), active.size(), out.data());
    for (size_t k = 0; k < active.size(); ++k) check(active[k], fed[active[k]]++, out.data() + k * V);
    if (!reused && fed[2] == (i64)seqs[2].size()) {
      check_concepts(2);
      st->reset(2);
      EXPECT_EQ(st->counters(2).concepts, 0);
      which[2] = 3;
      st->prefill(2, seqs[3].data(), 3, out.data());
      check(2, 2, out.data());
      fed[2] = 3;
      reused = true;
    }
  }
  for (i64 s = 0; s < 3; ++s) check_concepts(s);
  EXPECT_TRUE(reused && mid_prefill);
  EXPECT_LT(worst, 1e-4) << "max abs logit difference, incremental vs full";
  EXPECT_EQ(p_mismatch, 0);
  EXPECT_EQ(b_mismatch, 0);
  EXPECT_EQ(seg_mismatch, 0);
  double mag = 0;
  for (float x : want[0].logits) mag = std::max(mag, double(std::abs(x)));
  EXPECT_GT(mag, 0.5);
}

INSTANTIATE_TEST_SUITE_P(Dlcm, DlcmStreamEquivalence,
                         ::testing::Values(Case{"projected", "compact"}, Case{"raw", "replicate"}));

// A different tau at stream creation gives the boundaries of boundaries(tau) and the logits of
// a model whose config has that tau.
TEST(DlcmStream, TauOverride) {
  Config c = test::tiny_dlcm();
  c.model.max_seq_len = 80;
  auto m = make_initialised_model(c.model, 5);
  const i64 V = c.model.vocab_size, L = 60;
  auto t = test::random_tokens(L, V, 4, c.model.bos_id, 0.05);
  t[0] = c.model.bos_id;
  Config c2 = c;
  c2.model.router.tau = 0.42f;
  auto m2 = make_model(c2.model);
  std::copy_n(m->params().data(), m->params().total(), m2->params().data());
  Full f = full_forward(*m2, t, 0.42f);
  auto st = m->new_stream({1, 0, 0.42f});
  std::vector<float> lg(L * V);
  st->prefill(0, t.data(), L, lg.data(), true);
  EXPECT_LT(test::max_abs_diff(lg.data(), f.logits.data(), L * V), 1e-4);
  for (i64 i = 0; i < L; ++i) EXPECT_EQ(st->token_concept(0, i).boundary, f.b[i] != 0) << i;
}

}  // namespace
