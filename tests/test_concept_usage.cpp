// Concept-usage diagnostics (eval/concept_usage.h, DlcmModel::concept_usage): the four
// quantities against python/dlcm_ref/diagnostics.py (via reference.py --diagnostics) for the
// default design and the SPEC 4.9 variants; exact zeros where the decoder cannot see concepts;
// aggregation over a validation split; evaluation leaves training untouched.
#include <cmath>
#include <fstream>

#include "core/safetensors.h"
#include "eval/concept_usage.h"
#include "eval/validate.h"
#include "model_fixtures.h"
#include "testing.h"
#include "train/trainer.h"

using namespace dlcm;

namespace {

struct Rows {
  std::vector<i32> tok, tgt;
  std::vector<uint8_t> b;  // given boundaries, forced ones included
  i64 B, L;
};

// B rows with BOS inside and different concept counts per row (so the shuffle truncates and
// pads); row 1 is a single concept; an ignored target in row 0.
Rows make_rows(const Config& c, i64 B, i64 L, uint64_t seed) {
  const i64 V = c.model.vocab_size;
  const i32 bos = c.model.bos_id;
  Rows d{test::random_tokens(B * L, V, seed, bos, 0.06), {}, std::vector<uint8_t>(B * L), B, L};
  Rng r(seed + 3);
  for (i64 row = 0; row < B; ++row)
    for (i64 t = 0; t < L; ++t) {
      const i64 n = row * L + t;
      if (row == 1 && t > 0 && d.tok[n] == bos) d.tok[n] = (bos + 2) % V;
      const double rate = row == 1 ? 0.0 : 0.15 + 0.2 * row;
      d.b[n] = (t == 0 || d.tok[n] == bos || r.uniform() < rate) ? 1 : 0;
    }
  d.tok[0] = bos;
  d.tgt.resize(B * L);
  for (i64 row = 0; row < B; ++row)
    for (i64 t = 0; t < L; ++t) d.tgt[row * L + t] = t + 1 < L ? d.tok[row * L + t + 1] : -1;
  d.tgt[3] = -1;
  return d;
}

std::unique_ptr<LanguageModel> jittered_model(const Config& c, uint64_t seed) {
  auto m = make_initialised_model(c.model, seed);
  Rng jr(seed + 1);
  for (auto& p : m->params().params())
    if (p.init_one)
      for (i64 i = 0; i < p.numel; ++i) p.w[i] += 0.2f * (jr.uniform() - 0.5f);
  return m;
}

ConceptUsageResult usage(LanguageModel& m, const Rows& d, bool given) {
  ConceptUsageSums s;
  EXPECT_TRUE(m.concept_usage(
      Batch{d.tok.data(), d.tgt.data(), d.B, d.L, 0, given ? d.b.data() : nullptr}, s));
  return concept_usage_from_sums(s);
}

Config variant(const char* repr, const char* vis, bool path, const char* xattn,
               i64 enc_window = 0, i64 dec_window = 0) {
  Config c = test::tiny_dlcm("projected", xattn);
  c.model.concept_repr = repr;
  c.model.concept_visibility = vis;
  c.model.concept_path = path;
  c.model.enc_window = enc_window;
  c.model.dec_window = dec_window;
  c.model.router.tau = 0.45f;
  return c;
}

}  // namespace

TEST(ConceptUsage, MatchesPyTorchReference) {
  if (!test::torch_available()) GTEST_SKIP() << "/usr/bin/python3 with torch not found";
  struct Case {
    const char *repr, *vis;
    bool path;
    const char* xattn;
    i64 enc_window, dec_window;
    bool given;         // given boundaries (else thresholded)
    bool rope = false;  // xattn_rope (the ablations keep the row's own key positions)
  };
  for (const Case& cs : {Case{"mean", "shifted", true, "compact", 0, 0, false},
                         Case{"mean", "shifted", true, "replicate", 0, 0, true},
                         Case{"first", "shifted", true, "compact", 0, 0, true},
                         Case{"first", "inclusive", true, "compact", 0, 0, true},
                         Case{"first", "inclusive", true, "replicate", 0, 0, false},
                         Case{"prefix_mean", "shifted", true, "compact", 0, 0, true},
                         Case{"mean", "shifted", true, "compact", 4, 6, true},
                         Case{"first", "inclusive", true, "compact", 5, 3, true},
                         Case{"mean", "shifted", false, "compact", 0, 0, true},
                         Case{"mean", "shifted", true, "compact", 4, 4, true, true},
                         Case{"first", "inclusive", true, "replicate", 0, 0, false, true}}) {
    const std::string what = std::string(cs.repr) + "/" + cs.vis + (cs.path ? "" : "/no_path") +
                             "/" + cs.xattn + " windows " + std::to_string(cs.enc_window) + "/" +
                             std::to_string(cs.dec_window) + (cs.given ? " given b" : " thresholded") +
                             (cs.rope ? " rope" : "");
    SCOPED_TRACE(what);
    Config c = variant(cs.repr, cs.vis, cs.path, cs.xattn, cs.enc_window, cs.dec_window);
    c.model.xattn_rope = cs.rope;
    auto m = jittered_model(c, 31);
    Rows d = make_rows(c, 4, 24, 17);
    test::TempDir tmp;
    const std::string ck = tmp.path + "/ckpt";
    test::save_model_only(ck, c, m->params());
    test::write_rows(tmp.path + "/tokens.txt", d.tok, d.B, d.L);
    test::write_rows(tmp.path + "/targets.txt", d.tgt, d.B, d.L);
    test::write_rows(tmp.path + "/b.txt", d.b, d.B, d.L);
    std::string args = "--ckpt " + ck + " --tokens " + tmp.path + "/tokens.txt --targets " +
                       tmp.path + "/targets.txt --mode infer --diagnostics --xattn " + cs.xattn +
                       " --out " + tmp.path + "/diag.safetensors";
    if (cs.given) args += " --boundaries " + tmp.path + "/b.txt";
    std::string log;
    ASSERT_EQ(test::run_reference(args, &log), 0) << log;
    SafeTensorsFile ref(tmp.path + "/diag.safetensors");
    const double ce = ref.read_f32("diag.ce")[0], ce_null = ref.read_f32("diag.ce_null")[0],
                 ce_shuf = ref.read_f32("diag.ce_shuffle")[0];
    auto pos_ce = ref.read_f32("diag.pos_ce"), pos_count = ref.read_f32("diag.pos_count");

    ConceptUsageResult u = usage(*m, d, cs.given);
    EXPECT_NEAR(u.ce, ce, 2e-5 * ce);
    EXPECT_NEAR(u.ce_null, ce_null, 2e-5 * ce_null);
    EXPECT_NEAR(u.ce_shuffle, ce_shuf, 2e-5 * ce_shuf);
    EXPECT_NEAR(u.delta_null, ce_null - ce, 3e-5 * ce);
    EXPECT_NEAR(u.delta_shuffle, ce_shuf - ce, 3e-5 * ce);
    EXPECT_NEAR(u.xattn_ratio, ref.read_f32("diag.xattn_ratio")[0], 1e-5);
    ASSERT_EQ(u.pos_count.size(), pos_count.size());
    for (size_t k = 0; k < pos_count.size(); ++k) {
      EXPECT_EQ(double(u.pos_count[k]), double(pos_count[k])) << "position " << k;
      EXPECT_NEAR(u.pos_ce[k], pos_ce[k], 3e-5 * std::max(1.0, double(pos_ce[k])))
          << "position " << k;
    }
    EXPECT_EQ(u.tokens, i64(std::count_if(d.tgt.begin(), d.tgt.end(), [](i32 t) { return t >= 0; })));
    // the tiny random model uses its concepts: the comparison above is not between zeros
    if (cs.path) {
      EXPECT_GT(std::abs(u.delta_null), 1e-3);
      EXPECT_GT(std::abs(u.delta_shuffle), 1e-4);
      EXPECT_GT(u.xattn_ratio, 1e-2);
    }
    EXPECT_GT(pos_count.size(), 2u);  // several positions inside concepts
  }
}

// The sums to the report: each mean over its own count (an empty position bucket 0, never
// 0 / 0), and the text's positions (the first eight, "..." only when more follow).
TEST(ConceptUsage, FromSumsMeansAndText) {
  ConceptUsageSums s;
  s.ce = 6;
  s.ce_null = 7.5;
  s.ce_shuffle = 9;
  s.n_targets = 3;
  s.xo_norm = 1;
  s.h_norm = 4;
  s.n_positions = 6;
  s.n_concepts = 2;
  s.pos_ce = {3.0, 0.0, 1.5};
  s.pos_count = {2, 0, 1};
  const ConceptUsageResult u = concept_usage_from_sums(s);
  EXPECT_EQ(u.tokens, 3);
  EXPECT_EQ(u.ce, 2.0);
  EXPECT_EQ(u.ce_null, 2.5);
  EXPECT_EQ(u.delta_null, 0.5);
  EXPECT_EQ(u.ce_shuffle, 3.0);
  EXPECT_EQ(u.delta_shuffle, 1.0);
  EXPECT_EQ(u.xattn_ratio, 0.25);
  EXPECT_EQ(u.compression, 3.0);
  EXPECT_EQ(u.pos_ce, (std::vector<double>{1.5, 0.0, 1.5}));
  std::string text = concept_usage_text(u);
  EXPECT_NE(text.find(" 0: 1.500 (2) 1: 0.000 (0) 2: 1.500 (1)\n"), std::string::npos) << text;
  EXPECT_EQ(text.find("..."), std::string::npos) << text;
  s.pos_ce.assign(10, 2.0);
  s.pos_count.assign(10, 2);
  text = concept_usage_text(concept_usage_from_sums(s));
  EXPECT_NE(text.find(" 7: 1.000 (2) ...\n"), std::string::npos) << text;
  EXPECT_EQ(text.find(" 8: "), std::string::npos) << text;
  // nothing counted (no targets, no concepts): zeros, not 0 / 0
  ConceptUsageSums none;
  none.n_positions = 4;
  const ConceptUsageResult z = concept_usage_from_sums(none);
  EXPECT_EQ(z.ce, 0.0);
  EXPECT_EQ(z.compression, 0.0);
  EXPECT_EQ(z.xattn_ratio, 0.0);
}

// Without the concept path the decoder sees no concept: both deltas and the ratio are exactly
// 0, the per-position CE is still measured.
TEST(ConceptUsage, NoConceptPathGivesExactZeros) {
  Config c = variant("mean", "shifted", false, "compact");
  auto m = jittered_model(c, 5);
  Rows d = make_rows(c, 3, 20, 2);
  for (bool given : {false, true}) {
    ConceptUsageResult u = usage(*m, d, given);
    EXPECT_EQ(u.delta_null, 0.0);
    EXPECT_EQ(u.delta_shuffle, 0.0);
    EXPECT_EQ(u.xattn_ratio, 0.0);
    EXPECT_GT(u.ce, 0.0);
    EXPECT_FALSE(u.pos_count.empty());
  }
}

// Hand-checkable: with xattn.wo = 0 the concept term Wo att is exactly zero, so no ablation
// changes anything (deltas and ratio exactly 0); with B = 1 the shuffle gives the row its own
// concepts back (delta_shuffle exactly 0) while z_null concepts still change the loss.
TEST(ConceptUsage, ZeroOutputProjectionAndSingleRowGiveExactZeros) {
  for (const char* vis : {"shifted", "inclusive"}) {
    SCOPED_TRACE(vis);
    Config c = variant("first", vis, true, "compact");
    auto m = jittered_model(c, 8);
    Rows d = make_rows(c, 3, 20, 6);
    Rows one{std::vector<i32>(d.tok.begin(), d.tok.begin() + d.L),
             std::vector<i32>(d.tgt.begin(), d.tgt.begin() + d.L),
             std::vector<uint8_t>(d.b.begin(), d.b.begin() + d.L), 1, d.L};
    ConceptUsageResult u1 = usage(*m, one, true);
    EXPECT_EQ(u1.delta_shuffle, 0.0);
    EXPECT_GT(std::abs(u1.delta_null), 1e-4);
    Param* wo = m->params().find("xattn.wo.weight");
    ASSERT_NE(wo, nullptr);
    std::fill_n(wo->w, wo->numel, 0.f);
    ConceptUsageResult u = usage(*m, d, true);
    EXPECT_EQ(u.delta_null, 0.0);
    EXPECT_EQ(u.delta_shuffle, 0.0);
    EXPECT_EQ(u.xattn_ratio, 0.0);
  }
}

// The per-position CE is a split of the CE: its count-weighted mean is the CE, its counts add
// up to the kept targets, and position k counts the tokens k steps after their concept start.
TEST(ConceptUsage, PositionCeSplitsTheCe) {
  Config c = variant("mean", "shifted", true, "compact");
  auto m = jittered_model(c, 12);
  Rows d = make_rows(c, 3, 20, 4);
  ConceptUsageResult u = usage(*m, d, true);
  double sum = 0;
  i64 n = 0;
  for (size_t k = 0; k < u.pos_ce.size(); ++k) {
    sum += u.pos_ce[k] * double(u.pos_count[k]);
    n += u.pos_count[k];
  }
  EXPECT_EQ(n, u.tokens);
  // float per-token losses summed in another order: ~1e-8 apart; one token missing or counted
  // twice would move the mean by about 1/n (n = 60 here)
  EXPECT_NEAR(sum / double(n), u.ce, 1e-6 * u.ce);
  // counts by hand from the given boundaries
  std::vector<i64> want;
  for (i64 row = 0; row < d.B; ++row) {
    i64 k = 0;
    for (i64 t = 0; t < d.L; ++t) {
      k = d.b[row * d.L + t] ? 0 : k + 1;
      if (d.tgt[row * d.L + t] < 0) continue;
      if (k >= i64(want.size())) want.resize(k + 1, 0);
      ++want[k];
    }
  }
  EXPECT_EQ(u.pos_count, want);
  i64 concepts = 0;
  for (uint8_t b : d.b) concepts += b;
  EXPECT_NEAR(u.compression, double(d.B * d.L) / double(concepts), 1e-12);
}

// measure_concept_usage adds up batches (sums, not a mean of batch means), reports whether the
// whole split was used, and says "not applicable" for the baseline. The diagnostics leave the
// model's training path as it was (an ablated forward is never what backward sees).
TEST(ConceptUsage, AggregatesOverTheSplitAndLeavesTrainingAlone) {
  Config c = variant("first", "inclusive", true, "replicate");
  auto m = jittered_model(c, 3);
  std::vector<Rows> batches = {make_rows(c, 3, 16, 1), make_rows(c, 3, 16, 2),
                               make_rows(c, 3, 16, 3)};
  TrainData split;
  split.val_count = [](i64 B, i64 L) { return B == 3 && L == 16 ? 3 : 0; };
  split.val_batch = [&](i64 i, i64, i64, i32* tok, i32* tgt) {
    std::copy(batches[i].tok.begin(), batches[i].tok.end(), tok);
    std::copy(batches[i].tgt.begin(), batches[i].tgt.end(), tgt);
  };
  ConceptUsageSums s;
  for (i64 i = 0; i < 2; ++i)
    m->concept_usage(Batch{batches[i].tok.data(), batches[i].tgt.data(), 3, 16, 0}, s);
  ConceptUsageResult want = concept_usage_from_sums(s);
  ConceptUsageResult got = measure_concept_usage(*m, split, 3, 16, 2);
  EXPECT_TRUE(got.applicable);
  EXPECT_FALSE(got.full_split);
  EXPECT_EQ(got.batches, 2);
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_DOUBLE_EQ(got.ce, want.ce);
  EXPECT_DOUBLE_EQ(got.delta_null, want.delta_null);
  EXPECT_DOUBLE_EQ(got.delta_shuffle, want.delta_shuffle);
  EXPECT_DOUBLE_EQ(got.xattn_ratio, want.xattn_ratio);
  EXPECT_EQ(got.pos_count, want.pos_count);
  ConceptUsageResult all = measure_concept_usage(*m, split, 3, 16);
  EXPECT_TRUE(all.full_split);
  EXPECT_EQ(all.batches, 3);
  EXPECT_GT(all.tokens, got.tokens);
  const auto j = concept_usage_json(all);
  for (const char* k : {"ce", "ce_null", "ce_shuffle", "delta_null", "delta_shuffle",
                        "xattn_ratio", "compression", "pos_ce", "pos_count", "tokens", "batches",
                        "full_split"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_NE(concept_usage_text(all).find("validation tokens"), std::string::npos);

  // training path: the same loss and gradients before and after the diagnostics
  const Rows& d = batches[0];
  Batch bt{d.tok.data(), d.tgt.data(), d.B, d.L, 0, d.b.data()};
  StepContext ctx;
  ctx.total_targets = i64(std::count_if(d.tgt.begin(), d.tgt.end(), [](i32 t) { return t >= 0; }));
  ctx.total_positions = d.B * d.L;
  auto grads = [&] {
    m->params().zero_grad();
    ctx.sum_b = m->prepare_step({bt}, ctx);
    const double ce = m->train_micro(bt, 0, ctx).ce_sum;
    return std::make_pair(ce, std::vector<float>(m->params().grad(),
                                                 m->params().grad() + m->params().total()));
  };
  auto before = grads();
  ConceptUsageSums ignored;
  m->concept_usage(bt, ignored);
  ctx.sum_b = m->prepare_step({bt}, ctx);
  m->params().zero_grad();
  const double ce_after = m->train_micro(bt, 0, ctx).ce_sum;
  EXPECT_EQ(ce_after, before.first);
  EXPECT_EQ(test::max_abs_diff(m->params().grad(), before.second.data(), m->params().total()),
            0.0);

  Config bc = test::tiny_baseline();
  auto base = make_initialised_model(bc.model, 1);
  EXPECT_FALSE(measure_concept_usage(*base, split, 3, 16).applicable);
  EXPECT_FALSE(measure_concept_usage(*m, TrainData{}, 3, 16).applicable);  // no split
}

// Validation's CE by position in the row (dlcm eval's val_ce_by_row_position): the buckets
// 0-16, 16-64, ... split the validation CE and its targets exactly, ignored targets excluded,
// each bucket's CE is the mean of the per-position losses at those positions.
TEST(Validation, CeByRowPositionSplitsTheLoss) {
  EXPECT_EQ(row_position_buckets(0), std::vector<i64>{});
  EXPECT_EQ(row_position_buckets(16), std::vector<i64>{0});
  EXPECT_EQ(row_position_buckets(17), (std::vector<i64>{0, 16}));
  EXPECT_EQ(row_position_buckets(1024), (std::vector<i64>{0, 16, 64, 256}));
  EXPECT_EQ(row_position_buckets(1025), (std::vector<i64>{0, 16, 64, 256, 1024}));
  for (const bool dlcm : {false, true}) {
    SCOPED_TRACE(dlcm ? "dlcm" : "baseline");
    Config c = dlcm ? variant("first", "inclusive", true, "replicate") : test::tiny_baseline();
    c.model.max_seq_len = 64;
    const i64 B = 2, L = 40;  // buckets 0-16, 16-40
    auto m = jittered_model(c, 5);
    std::vector<Rows> batches = {make_rows(c, B, L, 7), make_rows(c, B, L, 8)};
    batches[1].tgt[B * L - 20] = -1;  // an ignored target in the second bucket (row 1, t = 20)
    TrainData split;
    split.val_count = [](i64, i64) { return 2; };
    split.val_batch = [&](i64 i, i64, i64, i32* tok, i32* tgt) {
      std::copy(batches[i].tok.begin(), batches[i].tok.end(), tok);
      std::copy(batches[i].tgt.begin(), batches[i].tgt.end(), tgt);
    };
    const ValResult v = validate_split(*m, split, B, L);
    ASSERT_EQ(v.row_pos_from, (std::vector<i64>{0, 16}));
    ASSERT_EQ(v.row_pos_to, (std::vector<i64>{16, 40}));
    // by hand: each batch's per-position losses, bucketed
    double ce[2] = {0, 0};
    i64 n[2] = {0, 0}, concepts = 0;
    for (const Rows& d : batches) {
      std::vector<float> rl(B * L);
      concepts += m->eval_micro(Batch{d.tok.data(), d.tgt.data(), B, L, 0}, rl.data()).n_concepts;
      for (i64 j = 0; j < B * L; ++j)
        if (d.tgt[j] >= 0) ce[j % L >= 16] += rl[j], ++n[j % L >= 16];
    }
    // the realised compression: positions per concept (the DLCM's thresholded boundaries)
    if (dlcm) {
      ASSERT_GT(concepts, 2 * B);
      EXPECT_NEAR(v.compression, double(2 * B * L) / double(concepts), 1e-12);
    } else {
      EXPECT_EQ(v.compression, 0.0);
    }
    // make_rows ignores each row's last target and target 3 of row 0; plus the one above
    EXPECT_EQ(n[0], 2 * (B * 16) - 2);
    EXPECT_EQ(n[1], 2 * (B * 24 - B) - 1);
    for (int k = 0; k < 2; ++k) {
      EXPECT_EQ(v.row_pos_tokens[k], n[k]);
      EXPECT_NEAR(v.row_pos_ce[k], ce[k] / n[k], 1e-9);
    }
    EXPECT_EQ(v.row_pos_tokens[0] + v.row_pos_tokens[1], v.tokens);
    EXPECT_NEAR((v.row_pos_ce[0] * n[0] + v.row_pos_ce[1] * n[1]) / v.tokens, v.loss, 1e-6);
    EXPECT_GT(std::abs(v.row_pos_ce[0] - v.row_pos_ce[1]), 1e-4);  // two different means
    EXPECT_NEAR(v.ppl, std::exp(v.loss), 1e-9 * v.ppl);
    // a bucket without a target reports 0 tokens and a CE of 0, not 0 / 0
    for (Rows& d : batches)
      for (i64 j = 0; j < B * L; ++j)
        if (j % L >= 16) d.tgt[j] = -1;
    const ValResult e = validate_split(*m, split, B, L);
    EXPECT_EQ(e.row_pos_tokens, (std::vector<i64>{n[0], 0}));
    EXPECT_NEAR(e.row_pos_ce[0], ce[0] / n[0], 1e-9);
    EXPECT_EQ(e.row_pos_ce[1], 0.0);
  }
}

// TrainOptions::concept_usage (dlcm train --concept-usage): every logged evaluation carries the
// diagnostics of its eval batches, on the same tokens as val_loss; the baseline's and a run
// without the option carry none; training itself is unchanged (same final weights).
TEST(ConceptUsage, TrainingLogCarriesTheDiagnostics) {
  for (Config c : {test::tiny_dlcm(), test::tiny_baseline()}) {
    SCOPED_TRACE(c.model.arch);
    c.train.steps = 4;
    c.train.warmup_steps = 1;
    c.train.eval_every = 2;
    c.train.eval_batches = -1;
    c.train.ckpt_every = 0;
    const i32 bos = c.model.is_dlcm() ? c.model.bos_id : -1;
    test::TempDir tmp;
    std::vector<float> weights[2];
    for (bool on : {false, true}) {
      TrainOptions o;
      o.quiet = true;
      o.peak_gflops = 100;
      o.concept_usage = on;
      o.out_dir = tmp.path + (on ? "/on" : "/off");
      Trainer tr(c, test::pattern_data(c.model.vocab_size, 7, 2, bos), o);
      tr.run();
      weights[on].assign(tr.model().params().data(),
                         tr.model().params().data() + tr.model().params().total());
      std::ifstream f(o.out_dir + "/train_log.jsonl");
      int evals = 0;
      for (std::string line; std::getline(f, line);) {
        auto j = nlohmann::json::parse(line);
        if (!j.contains("val_loss")) continue;
        ++evals;
        const bool want = on && c.model.is_dlcm();
        ASSERT_EQ(j.contains("concept_usage"), want) << line;
        if (!want) continue;
        const auto& u = j["concept_usage"];
        EXPECT_EQ(u["tokens"], j["val_tokens"]);
        EXPECT_NEAR(u["ce"].get<double>(), j["val_loss"].get<double>(), 1e-9);
        EXPECT_TRUE(u["full_split"].get<bool>());
        EXPECT_TRUE(u.contains("delta_null") && u.contains("delta_shuffle") &&
                    u.contains("xattn_ratio") && u.contains("pos_ce"));
      }
      EXPECT_EQ(evals, 2);
    }
    EXPECT_EQ(weights[0], weights[1]);
  }
}
