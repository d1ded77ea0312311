// Streaming DLCM (SPEC 5) beyond the architecture-independent equivalence test of
// tests/test_stream.cpp (which runs the DLCM configs too: logits, p, b, concept indices and
// backbone steps against the full forward pass): the boundary threshold chosen per stream.
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
