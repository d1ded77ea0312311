// Controls and the paper's ablations (issue 20 section 3): rule routers (fixed-stride and
// word-boundary concepts) exactly as defined and identical in training, evaluation and
// streaming; the per-sequence ratio loss (aux_kind = "sequence"); the smoother off; the
// baseline with the DLCM's token-path extras (baseline_extras). For each: whole-model finite
// differences, the PyTorch reference, causality, streaming == full forward.
#include <cstring>

#include "core/safetensors.h"
#include "data/model_loader.h"
#include "data/tokenizer.h"
#include "kernels/dlcm_ops.h"
#include "kernels/ops_ref.h"
#include "model_fixtures.h"
#include "models/dlcm.h"
#include "models/flops.h"
#include "testing.h"

using namespace dlcm;

namespace {

using Data = test::DlcmData;
using test::batch_of;
using test::context_for;

// B rows of L random tokens with a few BOS (packed documents), next-token targets and random
// given boundaries at rate 0.3 (forced ones included).
Data make_data(const ModelConfig& m, i64 B, i64 L, uint64_t seed) {
  Data d{test::random_tokens(B * L, m.vocab_size, seed, m.bos_id, 0.08), {}, {}, B, L};
  d.tok[0] = m.bos_id;
  Rng r(seed + 3);
  d.b.resize(B * L);
  d.tgt.resize(B * L);
  for (i64 n = 0; n < B * L; ++n) {
    const i64 t = n % L;
    d.b[n] = (t == 0 || d.tok[n] == m.bos_id || r.uniform() < 0.3) ? 1 : 0;
    d.tgt[n] = t + 1 < L ? d.tok[n + 1] : -1;
  }
  return d;
}



// The auxiliary loss value of the model's config from b and the last forward's p.
double aux_value(LanguageModel& m, const uint8_t* b, i64 B, i64 L) {
  const ModelConfig& c = m.config();
  if (!c.is_dlcm() || c.rule_router()) return 0;
  const float* p = static_cast<DlcmModel&>(m).last_p();
  if (c.aux_kind == "sequence")
    return ops::ref::sequence_parser_loss_forward(b, p, B, L, c.target_R) / double(B);
  double sb = 0, sp = 0;
  for (i64 n = 0; n < B * L; ++n) {
    sb += b[n];
    sp += p[n];
  }
  return ops::global_parser_loss(sb, sp, double(B * L), c.target_R).value;
}

// CE + aux_weight * L_aux of one training step over d (gradients accumulate).
double loss_and_grads(LanguageModel& m, const Data& d, MicroStats* stats = nullptr) {
  StepContext ctx = context_for(d);
  Batch bt = batch_of(d);
  ctx.sum_b = m.prepare_step({bt}, ctx);
  MicroStats s = m.train_micro(bt, 0, ctx);
  if (stats) *stats = s;
  double aux = 0;
  if (m.config().is_dlcm()) {
    const ops::Segments& sg = static_cast<DlcmModel&>(m).segments();
    std::vector<uint8_t> b(d.B * d.L, 0);
    for (i64 r = 0; r < d.B; ++r)
      for (i64 j = 0; j < sg.count[r]; ++j) b[r * d.L + sg.start[sg.slot(r, j)]] = 1;
    aux = aux_value(m, b.data(), d.B, d.L);
  }
  return s.ce_sum / double(s.n_targets) + m.config().aux_weight * aux;
}

// The same loss, forward only (the same boundaries: given ones, or the rule).
double loss_only(LanguageModel& m, const Data& d) {
  MicroStats s = m.eval_micro(batch_of(d));
  double aux = 0;
  if (m.config().is_dlcm()) {
    auto& dm = static_cast<DlcmModel&>(m);
    std::vector<uint8_t> b(d.B * d.L, 0);
    const ops::Segments& sg = dm.segments();
    for (i64 r = 0; r < d.B; ++r)
      for (i64 j = 0; j < sg.count[r]; ++j) b[r * d.L + sg.start[sg.slot(r, j)]] = 1;
    aux = aux_value(m, b.data(), d.B, d.L);
  }
  return s.ce_sum / double(s.n_targets) + m.config().aux_weight * aux;
}

Config fixed_cfg(i64 stride = 3) {
  Config c = test::tiny_dlcm("fixed");
  c.model.router.stride = stride;
  return c;
}

// A word-start table for the tiny vocabulary: ids divisible by 3 begin a word.
std::vector<uint8_t> tiny_word_starts(i64 V) {
  std::vector<uint8_t> w(V);
  for (i64 i = 0; i < V; ++i) w[i] = i % 3 == 0 ? 1 : 0;
  return w;
}

Config baseline_extras_cfg() {
  Config c = test::tiny_baseline();
  c.model.n_layers = 3;
  c.model.n_layers_pre = 1;
  c.model.baseline_extras = true;
  c.model.x_d_ff = 20;
  return c;
}

std::unique_ptr<LanguageModel> model_for(const Config& c, uint64_t seed) {
  auto m = make_initialised_model(c.model, seed);
  if (c.model.router.kind == "word") m->set_word_starts(tiny_word_starts(c.model.vocab_size));
  // Norm weights away from 1 so their gradients are not special (as the reference fixtures).
  Rng jr(seed + 40);
  for (auto& p : m->params().params())
    if (p.init_one)
      for (i64 i = 0; i < p.numel; ++i) p.w[i] += 0.2f * (jr.uniform() - 0.5f);
  return m;
}

}  // namespace

// ---- rule routers ---------------------------------------------------------------------------

TEST(Controls, FixedStrideBoundariesExactly) {
  Config c = fixed_cfg(3);
  auto m = model_for(c, 1);
  const i32 bos = c.model.bos_id;
  // a concept every 3 tokens, counted from each row start and restarted at every BOS
  const std::vector<i32> tok = {bos, 5, 6, 7, 8, 9, bos, 5, 6, 7,  //
                                4,   5, 6, 7, bos, 9, 10, 11, 12, 4};
  const std::vector<uint8_t> want = {1, 0, 0, 1, 0, 0, 1, 0, 0, 1,  //
                                     1, 0, 0, 1, 1, 0, 0, 1, 0, 0};
  const i64 B = 2, L = 10;
  Buf p(B * L);
  std::vector<uint8_t> b(B * L);
  ASSERT_TRUE(m->boundaries(tok.data(), B, L, p.data(), b.data(), 0.9f));  // tau plays no part
  for (i64 n = 0; n < B * L; ++n) {
    EXPECT_EQ(b[n], want[n]) << n;
    EXPECT_EQ(p[n], float(want[n])) << "p is the rule's 0/1 decision, at " << n;
  }
  EXPECT_EQ(m->params().find("router.wq.weight"), nullptr);  // no router parameters
  // stride 1: every token its own concept
  Config c1 = fixed_cfg(1);
  auto m1 = model_for(c1, 1);
  m1->boundaries(tok.data(), B, L, p.data(), b.data());
  for (i64 n = 0; n < B * L; ++n) EXPECT_EQ(b[n], 1) << n;
}

TEST(Controls, WordBoundariesExactlyAndTheTableIsRequired) {
  Config c = test::tiny_dlcm("word");
  const i32 bos = c.model.bos_id;
  const std::vector<i32> tok = {bos, 5, 6, 7, 9, 10, 12, 13, bos, 4, 3, 3};
  // ids divisible by 3 begin a word (tiny_word_starts), plus the forced ones
  const std::vector<uint8_t> want = {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1};
  const i64 L = tok.size(), V = c.model.vocab_size;
  auto bare = make_initialised_model(c.model, 2);
  Buf p(L), lg(L * V);
  std::vector<uint8_t> b(L);
  try {
    bare->logits(tok.data(), 1, L, lg.data());
    FAIL() << "a word router without its table must fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("set_word_starts"), std::string::npos) << e.what();
  }
  EXPECT_THROW(bare->new_stream({1, 0, -1}), Error);
  EXPECT_THROW(bare->set_word_starts(std::vector<uint8_t>(V - 1, 0)), Error);  // wrong size
  auto m = model_for(c, 2);
  m->boundaries(tok.data(), 1, L, p.data(), b.data());
  for (i64 n = 0; n < L; ++n) EXPECT_EQ(b[n], want[n]) << n;

  // The tokenizer's table: whitespace, newline and punctuation begin a word; letters inside a
  // word and specials do not (byte tokenizer: byte x is id 4 + x).
  auto bt = make_byte_tokenizer();
  const auto ws = bt->word_starts();
  ASSERT_EQ(i64(ws.size()), i64(bt->vocab_size()));
  for (unsigned char ch : std::string(" \n\t.,!?(\""))
    EXPECT_EQ(ws[4 + ch], 1) << int(ch);
  for (unsigned char ch : std::string("aZ7\xc3"))
    EXPECT_EQ(ws[4 + ch], 0) << int(ch);
  for (i32 id = 0; id < 4; ++id) EXPECT_EQ(ws[id], 0) << "special " << id;
}

// A word-router checkpoint: models/checkpoint.h's load_model cannot read the tokenizer (it is
// below the data layer), so its model stops with the fix named; load_model_with_tokenizer (what
// the CLI uses) passes the checkpoint tokenizer's table and decides as the original model.
TEST(Controls, CheckpointLoaderPassesTheWordTable) {
  auto bt = make_byte_tokenizer();
  Config c = test::tiny_dlcm("word");
  c.model.vocab_size = bt->vocab_size();
  c.model.bos_id = bt->bos_id();
  c.model.eos_id = bt->eos_id();
  c.model.pad_id = bt->pad_id();
  auto m = make_initialised_model(c.model, 5);
  m->set_word_starts(bt->word_starts());
  test::TempDir d;
  test::save_model_only(d.path, c, m->params());
  bt->save(d.path);
  const std::vector<i32> tok = bt->encode("the cat, sat (on) the\nmat!");
  const i64 L = i64(tok.size());
  std::vector<float> p(L), p2(L);
  std::vector<uint8_t> b(L), b2(L);
  m->boundaries(tok.data(), 1, L, p.data(), b.data());
  auto bare = load_model(d.path);
  try {
    bare->boundaries(tok.data(), 1, L, p2.data(), b2.data());
    ADD_FAILURE() << "a word router without its table ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("set_word_starts"), std::string::npos) << e.what();
  }
  auto loaded = load_model_with_tokenizer(d.path);
  loaded->boundaries(tok.data(), 1, L, p2.data(), b2.data());
  const auto ws = bt->word_starts();
  i64 words = 0;
  for (i64 n = 0; n < L; ++n) {
    EXPECT_EQ(b[n], n == 0 || tok[n] == bt->bos_id() || ws[tok[n]] != 0) << n;
    EXPECT_EQ(b2[n], b[n]) << n;
    words += b[n];
  }
  EXPECT_EQ(words, 10);  // "the", 4 spaces, ",", "(", ")", "\n", "!" open a concept
}

// Training (prepare_step, given samples ignored), evaluation, logits and the stream take the
// same decisions; the stream's logits equal the full forward's; the aux loss is 0.
TEST(Controls, RuleDecisionsIdenticalInTrainingEvaluationAndStreaming) {
  for (const char* kind : {"fixed", "word"}) {
    SCOPED_TRACE(kind);
    Config c = kind == std::string("fixed") ? fixed_cfg(4) : test::tiny_dlcm("word");
    c.model.max_seq_len = 64;
    auto m = model_for(c, 3);
    const i64 L = 40, V = c.model.vocab_size;
    Data d = make_data(c.model, 1, L, 8);
    auto& dm = static_cast<DlcmModel&>(*m);
    Buf p(L);
    std::vector<uint8_t> b(L);
    m->boundaries(d.tok.data(), 1, L, p.data(), b.data());
    // evaluation (given samples ignored)
    m->eval_micro(batch_of(d));
    std::vector<uint8_t> be(L, 0);
    for (i64 j = 0; j < dm.segments().count[0]; ++j) be[dm.segments().start[j]] = 1;
    EXPECT_EQ(be, b);
    // training
    m->params().zero_grad();
    MicroStats s;
    loss_and_grads(*m, d, &s);
    std::vector<uint8_t> bt(L, 0);
    for (i64 j = 0; j < dm.segments().count[0]; ++j) bt[dm.segments().start[j]] = 1;
    EXPECT_EQ(bt, b);
    i64 nb = 0;
    for (uint8_t x : b) nb += x;
    EXPECT_EQ(s.n_thresholded, nb);
    EXPECT_EQ(s.sum_b, double(nb));
    EXPECT_EQ(s.aux_rows, 0.0);
    EXPECT_GT(nb, 4);
    EXPECT_LT(nb, L - 4);
    // streaming: prefill half, then token by token
    Buf full(L * V), lg(L * V);
    m->logits(d.tok.data(), 1, L, full.data());
    auto st = m->new_stream({1, 0, 0.99f});  // tau plays no part for a rule
    const i64 h = 17;
    st->prefill(0, d.tok.data(), h, lg.data(), true);
    for (i64 t = h; t < L; ++t) {
      const i64 seq = 0;
      st->step(&seq, d.tok.data() + t, 1, lg.data() + t * V);
    }
    EXPECT_LT(test::max_abs_diff(lg.data(), full.data(), L * V), 1e-4);
    for (i64 t = 0; t < L; ++t) EXPECT_EQ(st->token_concept(0, t).boundary, b[t] != 0) << t;
  }
}

// ---- whole-model finite differences ---------------------------------------------------------

// Every parameter against central differences of CE + lambda * L_aux, boundaries fixed. With
// the smoother off, a rule router, or smooth_grad on, the loss is a function of the weights
// with no detached gate, so every parameter (router included) is checked.
// The controls of the whole-model gradient checks below, each with aux_weight 0.5 (the aux
// path visible next to CE).
struct ControlCase {
  const char* name;
  Config c;
};
std::vector<ControlCase> control_cases() {
  std::vector<ControlCase> cases;
  {
    Config c = test::tiny_dlcm();
    c.model.smoother = false;
    cases.push_back({"smoother off", c});
  }
  {
    Config c = test::tiny_dlcm("projected", "compact", true);
    c.model.aux_kind = "sequence";
    cases.push_back({"sequence aux + smooth_grad", c});
  }
  {
    Config c = test::tiny_dlcm("raw");
    c.model.aux_kind = "sequence";
    c.model.smoother = false;
    cases.push_back({"sequence aux, raw, smoother off", c});
  }
  {
    // the prefix rows' own-concept smoother (smoother_own_*) is off as well
    Config c = test::tiny_dlcm("projected", "compact", true);
    c.model.smoother = false;
    c.model.concept_repr = "prefix_mean";
    c.model.concept_visibility = "inclusive";
    cases.push_back({"smoother off, prefix_mean inclusive, smooth_grad", c});
  }
  cases.push_back({"fixed", fixed_cfg(3)});
  cases.push_back({"word", test::tiny_dlcm("word")});
  cases.push_back({"baseline extras", baseline_extras_cfg()});
  for (auto& cs : cases) cs.c.model.aux_weight = 0.5f;
  return cases;
}

TEST(Controls, FiniteDifferenceGradientsEveryParameter) {
  std::vector<ControlCase> cases = control_cases();
  for (auto& cs : cases) {
    SCOPED_TRACE(cs.name);
    auto m = model_for(cs.c, 11);
    Data d = make_data(cs.c.model, 3, cs.c.model.is_dlcm() ? 20 : 9, 5);
    m->params().zero_grad();
    loss_and_grads(*m, d);
    std::vector<float> an(m->params().grad(), m->params().grad() + m->params().total());
    for (auto& p : m->params().params())
      test::check_grad(std::string(cs.name) + " " + p.name, p.w, an.data() + p.offset, p.numel,
                       [&] { return loss_only(*m, d); }, 5e-3, 3e-2, 8);
  }
}

// A step after another step gives a fresh model's gradients, to the bit: every scratch gradient
// a backward writes is written or cleared, not added to what the step before left (the
// finite differences above run one backward per model, into buffers still zero). A mutant
// that made the extras' first producers accumulate was seen by no test (session 50).
TEST(Controls, ASecondStepGivesAFreshModelsGradients) {
  std::vector<ControlCase> cases = control_cases();
  cases.push_back({"baseline", test::tiny_baseline()});
  cases.push_back({"dlcm", test::tiny_dlcm()});
  for (auto& cs : cases) {
    SCOPED_TRACE(cs.name);
    const i64 L = cs.c.model.is_dlcm() ? 20 : 9;
    const Data first = make_data(cs.c.model, 3, L, 5), second = make_data(cs.c.model, 3, L, 6);
    auto used = model_for(cs.c, 11), fresh = model_for(cs.c, 11);
    used->params().zero_grad();
    loss_and_grads(*used, first);
    used->params().zero_grad();
    const double loss_used = loss_and_grads(*used, second);
    fresh->params().zero_grad();
    const double loss_fresh = loss_and_grads(*fresh, second);
    EXPECT_EQ(loss_used, loss_fresh);
    const ParamStore &a = used->params(), &b = fresh->params();
    ASSERT_EQ(a.total(), b.total());
    for (const auto& p : a.params()) {
      i64 differ = 0;
      for (i64 i = 0; i < p.numel; ++i) differ += !(a.grad()[p.offset + i] == b.grad()[p.offset + i]);
      EXPECT_EQ(differ, 0) << p.name << ": gradients differing from a fresh model's";
    }
  }
}

// The per-sequence loss on a whole model: the trainer-facing value (aux_rows) is the rows'
// sum of L_r, and it differs from the Global Parser's value when the rows' rates differ.
TEST(Controls, SequenceAuxValueMatchesReference) {
  Config c = test::tiny_dlcm();
  c.model.aux_kind = "sequence";
  auto m = model_for(c, 4);
  Data d = make_data(c.model, 3, 20, 6);
  for (i64 t = 1; t < 20; ++t) d.b[2 * 20 + t] = 1;  // row 2: all boundaries
  MicroStats s;
  loss_and_grads(*m, d, &s);
  const float* p = static_cast<DlcmModel&>(*m).last_p();
  std::vector<uint8_t> b(d.b);
  for (i64 n = 0; n < 60; ++n) b[n] = b[n] || d.tok[n] == c.model.bos_id;
  const double ref = ops::ref::sequence_parser_loss_forward(b.data(), p, 3, 20, c.model.target_R);
  EXPECT_NEAR(s.aux_rows, ref, 1e-9 * std::max(1.0, std::abs(ref)));
  const double global = ops::global_parser_loss(s.sum_b, s.sum_p, 60.0, c.model.target_R).value;
  EXPECT_GT(std::abs(ref / 3 - global), 1e-4) << "rows with different F_r must matter";
}

// ---- streaming ------------------------------------------------------------------------------

TEST(Controls, StreamingEqualsFullForward) {
  std::vector<std::pair<const char*, Config>> cases;
  {
    Config c = test::tiny_dlcm();
    c.model.smoother = false;
    c.model.router.tau = 0.45f;
    cases.push_back({"smoother off", c});
    c.model.concept_repr = "prefix_mean";
    c.model.concept_visibility = "inclusive";
    cases.push_back({"smoother off, prefix_mean inclusive", c});
  }
  cases.push_back({"baseline extras", baseline_extras_cfg()});
  for (auto& [name, c] : cases) {
    SCOPED_TRACE(name);
    c.model.max_seq_len = 64;
    auto m = model_for(c, 7);
    const i64 L = 50, V = c.model.vocab_size;
    Data d = make_data(c.model, 1, L, 9);
    Buf full(L * V), lg(L * V);
    m->logits(d.tok.data(), 1, L, full.data());
    // two slots: slot 1 gets the same tokens in a different split
    auto st = m->new_stream({2, 0, -1});
    st->prefill(0, d.tok.data(), 23, lg.data(), true);
    for (i64 t = 23; t < L; ++t) {
      const i64 seq = 0;
      st->step(&seq, d.tok.data() + t, 1, lg.data() + t * V);
    }
    EXPECT_LT(test::max_abs_diff(lg.data(), full.data(), L * V), 1e-4);
    Buf lg1(L * V);
    st->prefill(1, d.tok.data(), L, lg1.data(), true);
    EXPECT_LT(test::max_abs_diff(lg1.data(), full.data(), L * V), 1e-4);
  }
}

// ---- causality ------------------------------------------------------------------------------

TEST(Controls, CausalityFutureTokensChangeNoPastLogit) {
  std::vector<std::pair<const char*, Config>> cases;
  cases.push_back({"fixed", fixed_cfg(3)});
  cases.push_back({"word", test::tiny_dlcm("word")});
  {
    Config c = test::tiny_dlcm();
    c.model.smoother = false;
    cases.push_back({"smoother off", c});
  }
  cases.push_back({"baseline extras", baseline_extras_cfg()});
  for (auto& [name, c] : cases) {
    SCOPED_TRACE(name);
    c.model.max_seq_len = 64;
    auto m = model_for(c, 12);
    const i64 B = 2, L = 40, V = c.model.vocab_size;
    Data d = make_data(c.model, B, L, 14);
    Buf base(B * L * V), pert(B * L * V), p0(B * L), p1(B * L);
    std::vector<uint8_t> b0(B * L), b1(B * L);
    m->logits(d.tok.data(), B, L, base.data());
    const bool dlcm = c.model.is_dlcm();
    if (dlcm) m->boundaries(d.tok.data(), B, L, p0.data(), b0.data());
    for (i64 t : {0, 7, 21, 38}) {
      auto tok2 = d.tok;
      for (i64 r = 0; r < B; ++r)
        for (i64 j = t + 1; j < L; ++j) tok2[r * L + j] = i32((tok2[r * L + j] + 3 + j) % V);
      m->logits(tok2.data(), B, L, pert.data());
      if (dlcm) m->boundaries(tok2.data(), B, L, p1.data(), b1.data());
      for (i64 r = 0; r < B; ++r) {
        const i64 o = r * L;
        EXPECT_EQ(test::max_abs_diff(base.data() + o * V, pert.data() + o * V, (t + 1) * V), 0.0)
            << "row " << r << " t=" << t;
        EXPECT_GT(test::max_abs_diff(base.data() + (o + t + 1) * V, pert.data() + (o + t + 1) * V,
                                     (L - t - 1) * V),
                  1e-4)
            << "the perturbation must be visible after t (else the test is vacuous)";
        if (dlcm) {
          EXPECT_EQ(std::memcmp(b0.data() + o, b1.data() + o, t + 1), 0);
        }
      }
    }
  }
}

// ---- PyTorch reference ----------------------------------------------------------------------

// Loss, every gradient and (inference) logits against python/reference.py.
TEST(Controls, MatchesPyTorchReference) {
  if (!test::torch_available()) GTEST_SKIP() << "/usr/bin/python3 with torch not found";
  std::vector<std::pair<const char*, Config>> cases;
  {
    Config c = test::tiny_dlcm("projected", "compact", true);
    c.model.aux_kind = "sequence";
    cases.push_back({"sequence aux", c});
  }
  {
    Config c = test::tiny_dlcm("projected", "replicate");
    c.model.smoother = false;
    cases.push_back({"smoother off", c});
  }
  cases.push_back({"fixed", fixed_cfg(3)});
  cases.push_back({"word", test::tiny_dlcm("word")});
  cases.push_back({"baseline extras", baseline_extras_cfg()});
  for (auto& [name, c] : cases) {
    SCOPED_TRACE(name);
    c.model.aux_weight = 0.2f;
    c.model.router.tau = 0.45f;
    auto m = model_for(c, 21);
    const bool dlcm = c.model.is_dlcm();
    Data d = make_data(c.model, 3, dlcm ? 20 : 9, 13);
    test::TempDir tmp;
    const std::string ck = tmp.path + "/ckpt";
    test::save_model_only(ck, c, m->params());
    test::write_rows(tmp.path + "/tokens.txt", d.tok, d.B, d.L);
    test::write_rows(tmp.path + "/targets.txt", d.tgt, d.B, d.L);
    test::write_rows(tmp.path + "/b.txt", d.b, d.B, d.L);
    // training: the given boundaries; inference: thresholded (rules: the rule either way)
    const std::string given = dlcm ? " --boundaries " + tmp.path + "/b.txt" : std::string();
    std::string extra = dlcm ? " --xattn " + c.model.xattn_impl : std::string();
    if (c.model.router.kind == "word") {
      auto w = tiny_word_starts(c.model.vocab_size);
      test::write_rows(tmp.path + "/ws.txt", w, 1, i64(w.size()));
      extra += " --word-starts " + tmp.path + "/ws.txt";
    }
    const std::string io = " --ckpt " + ck + " --tokens " + tmp.path + "/tokens.txt --targets " +
                           tmp.path + "/targets.txt";
    std::string log;
    ASSERT_EQ(test::run_reference(io + given + extra + " --out " + tmp.path + "/train.safetensors",
                                  &log),
              0)
        << log;
    ASSERT_EQ(test::run_reference(io + extra + " --mode infer --out " + tmp.path +
                                      "/infer.safetensors",
                                  &log),
              0)
        << log;
    SafeTensorsFile tr(tmp.path + "/train.safetensors"), inf(tmp.path + "/infer.safetensors");
    m->params().zero_grad();
    const double loss = loss_and_grads(*m, d);
    EXPECT_NEAR(loss, tr.read_f32("loss")[0], 2e-5 * std::abs(loss));
    if (c.model.rule_router()) {
      EXPECT_EQ(tr.read_f32("aux")[0], 0.f);
    }
    for (auto& p : m->params().params()) {
      auto g = tr.read_f32("grad." + p.name);
      EXPECT_LT(test::rel_err(p.g, g.data(), p.numel), 1e-4) << p.name;
    }
    const i64 N = d.B * d.L, V = c.model.vocab_size;
    Buf logits(N * V);
    m->logits(d.tok.data(), d.B, d.L, logits.data());
    auto rl = inf.read_f32("logits");
    EXPECT_LT(test::rel_err(logits.data(), rl.data(), N * V), 1e-4);
    if (dlcm) {
      Buf p(N);
      std::vector<uint8_t> b(N);
      m->boundaries(d.tok.data(), d.B, d.L, p.data(), b.data());
      auto rb = inf.read_f32("b");
      for (i64 n = 0; n < N; ++n) EXPECT_EQ(b[n] != 0, rb[n] != 0) << n;
    }
  }
}

// ---- accounting and config ------------------------------------------------------------------

i64 numel_sum(LanguageModel& m) {
  i64 n = 0;
  for (auto& p : m.params().params()) n += p.numel;
  return n;
}

TEST(Controls, FlopsAndConfig) {
  Config bx = baseline_extras_cfg();
  auto m = make_model(bx.model);
  const FlopsReport r = flops_report(bx.model, 32);
  const i64 d = bx.model.d_token, xf = bx.model.x_d_ff;
  EXPECT_EQ(r.flops("cross_ffn"), 2.0 * 3 * d * xf);
  EXPECT_EQ(r.total_params(), numel_sum(*m));
  for (const char* n : {"encoder.layers.0.attn.wq.weight", "encoder.norm.weight",
                        "xattn.ffn_norm.weight", "xattn.ffn.w2.weight",
                        "decoder.layers.1.ffn.w1.weight", "norm.weight"})
    EXPECT_NE(m->params().find(n), nullptr) << n;
  EXPECT_EQ(m->params().find("layers.0.attn.wq.weight"), nullptr);
  Config f = fixed_cfg();
  EXPECT_EQ(flops_report(f.model, 32).flops("router"), 0.0);
  EXPECT_EQ(flops_report(f.model, 32).total_params(), numel_sum(*make_model(f.model)));
  // config round trip and validation
  nlohmann::json j = config_to_json(f);
  j["aux_kind"] = "sequence";
  j["smoother"] = false;
  Config back = config_from_json(j, "test");
  EXPECT_EQ(back.model.router.kind, "fixed");
  EXPECT_EQ(back.model.router.stride, 3);
  EXPECT_EQ(back.model.aux_kind, "sequence");
  EXPECT_FALSE(back.model.smoother);
  auto bad = [](Config c, const char* what) {
    try {
      validate(c, "cfg");
      ADD_FAILURE() << "accepted " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  Config c1 = test::tiny_dlcm();
  c1.model.aux_kind = "rows";
  bad(c1, "aux_kind");
  Config c2 = fixed_cfg(0);
  bad(c2, "router.stride");
  Config c3 = fixed_cfg();
  c3.model.router.smooth_grad = true;
  bad(c3, "smooth_grad");
  Config c4 = baseline_extras_cfg();
  c4.model.n_layers_pre = 3;
  bad(c4, "n_layers_pre");
}

// ---- the trainer ----------------------------------------------------------------------------

// The trainer hands the data's word-start table to the model, logs aux = 0 and the realised
// compression for a rule router, and logs the mean of the rows' L_r for aux_kind "sequence"
// (grad_accum 2: the rows of both micro-batches count).
TEST(Controls, TrainerPassesTheTableAndReportsTheAuxLoss) {
  {
    Config c = test::tiny_dlcm("word");
    c.train.steps = 3;
    c.train.eval_every = 0;
    TrainOptions o;
    o.quiet = true;
    o.peak_gflops = 100;
    TrainData data = test::pattern_data(c.model.vocab_size, 99, 2, c.model.bos_id);
    EXPECT_THROW(Trainer(c, data, o).train_step(), Error);  // no table: a clear error
    data.word_starts = tiny_word_starts(c.model.vocab_size);
    Trainer tr(c, data, o);
    const StepResult r = tr.train_step();
    EXPECT_EQ(r.terms.value("aux", -9), 0.0);
    EXPECT_GT(r.terms.value("F"), 0.0);
    // one rule for training and inference
    EXPECT_EQ(r.terms.value("compression"), r.terms.value("compression_thresholded"));
    EXPECT_EQ(r.loss, r.ce);
  }
  {
    Config c = test::tiny_dlcm();
    c.model.aux_kind = "sequence";
    c.train.steps = 3;
    c.train.grad_accum = 2;
    c.train.eval_every = 0;
    TrainOptions o;
    o.quiet = true;
    o.peak_gflops = 100;
    Trainer tr(c, test::pattern_data(c.model.vocab_size, 99, 2, c.model.bos_id), o);
    const StepResult r = tr.train_step();
    const double aux = r.terms.value("aux", -9), F = r.terms.value("F"), G = r.terms.value("G");
    // L_r lies in [-1, R - 1]; and the step's value is the model's rows' mean
    EXPECT_GE(aux, -1.0);
    EXPECT_LE(aux, c.model.target_R - 1);
    EXPECT_NEAR(r.loss, r.ce + c.model.aux_weight * aux, 1e-9);
    const double global =
        c.model.target_R / (c.model.target_R - 1) *
            ((c.model.target_R - 1) * F * G + (1 - F) * (1 - G)) -
        1;
    EXPECT_NE(aux, global);  // per-row means differ from the step-wide formula
  }
}
