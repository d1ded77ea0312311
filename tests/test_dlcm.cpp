// Whole-model tests of the DLCM (SPEC section 4): finite-difference gradients of every
// parameter with boundary samples held fixed, agreement with the PyTorch reference (loss, p,
// b, logits, every gradient, weights after AdamW steps), replicate == compact, causality with
// thresholded boundaries, gradient-accumulation equivalence of the Global Parser. (Exact resume:
// tests/test_baseline.cpp, Trainer.ResumeIsBitIdentical, runs both architectures.)
#include <cstring>
#include <filesystem>
#include <span>

#include "core/safetensors.h"
#include "kernels/dlcm_ops.h"
#include "model_fixtures.h"
#include "models/dlcm.h"
#include "models/flops.h"
#include "testing.h"
#include "train/optimizer.h"
#include "train/trainer.h"

using namespace dlcm;

namespace {

using Data = test::DlcmData;
using test::batch_of;
using test::context_for;

// Rows with packed documents (BOS inside), plus the shapes that break naive bookkeeping:
// row 1 is a single concept (no BOS, no boundary after t = 0), the last row has one-token
// concepts only.
Data make_data(const Config& c, uint64_t seed, double bos_rate = 0.08, double b_rate = 0.3) {
  const i64 B = c.train.batch_size, L = c.train.seq_len, V = c.model.vocab_size;
  const i32 bos = c.model.bos_id;
  Data d{{}, {}, {}, B, L};
  d.tok = test::random_tokens(B * L, V, seed, bos, bos_rate);
  Rng r(seed + 17);
  d.b.resize(B * L);
  for (i64 row = 0; row < B; ++row) {
    for (i64 t = 0; t < L; ++t) {
      const i64 n = row * L + t;
      if (row == 1 && t > 0 && d.tok[n] == bos) d.tok[n] = (bos + 2) % V;
      bool bnd = r.uniform() < b_rate;
      if (row == 1) bnd = false;
      if (row == B - 1 && B > 2) bnd = true;
      d.b[n] = (t == 0 || d.tok[n] == bos || bnd) ? 1 : 0;
    }
  }
  d.tok[0] = bos;
  d.tgt.resize(B * L);
  auto next = test::random_tokens(B * L, V, seed + 1);
  for (i64 row = 0; row < B; ++row)
    for (i64 t = 0; t < L; ++t)
      d.tgt[row * L + t] = t + 1 < L ? d.tok[row * L + t + 1] : -1;
  return d;
}


// Total loss CE + aux_weight * L_aux with the given boundaries (gradients accumulate as a side
// effect). Also returns the micro stats.
double loss_and_grads(LanguageModel& m, const Data& d, MicroStats* stats = nullptr) {
  StepContext ctx = context_for(d);
  Batch bt{d.tok.data(), d.tgt.data(), d.B, d.L, 0, d.b.data()};
  ctx.sum_b = m.prepare_step({bt}, ctx);
  MicroStats s = m.train_micro(bt, 0, ctx);
  if (stats) *stats = s;
  const auto aux = ops::global_parser_loss(ctx.sum_b, s.sum_p, double(ctx.total_positions),
                                           m.config().target_R);
  return s.ce_sum / double(s.n_targets) + m.config().aux_weight * aux.value;
}

// The same loss, forward only.
double loss_only(LanguageModel& m, const Data& d) {
  MicroStats s = m.eval_micro(Batch{d.tok.data(), d.tgt.data(), d.B, d.L, 0, d.b.data()});
  const auto aux = ops::global_parser_loss(s.sum_b, s.sum_p, double(s.n_positions),
                                           m.config().target_R);
  return s.ce_sum / double(s.n_targets) + m.config().aux_weight * aux.value;
}

bool depends_on_p(const std::string& name) {
  return name.rfind("encoder.", 0) == 0 || name.rfind("router.", 0) == 0 ||
         name == "tok_embeddings.weight";
}

}  // namespace

TEST(Dlcm, ParameterNamesFollowSpec) {
  auto m = make_model(test::tiny_dlcm().model);
  std::vector<std::string> want = {
      "tok_embeddings.weight", "encoder.layers.0.attn.wq.weight", "encoder.norm.weight",
      "router.wq.weight", "router.wk.weight", "pool.w_up.weight",
      "backbone.layers.1.ffn.w2.weight", "backbone.norm.weight", "xattn.null_concept",
      "xattn.norm.weight", "xattn.wq.weight", "xattn.wk.weight", "xattn.wv.weight",
      "xattn.wo.weight", "xattn.q_norm.weight", "xattn.k_norm.weight", "xattn.ffn_norm.weight",
      "xattn.ffn.w1.weight", "xattn.ffn.w2.weight", "xattn.ffn.w3.weight",
      "decoder.layers.0.ffn_norm.weight", "decoder.norm.weight", "lm_head.weight"};
  for (auto& n : want) EXPECT_NE(m->params().find(n), nullptr) << n;
  EXPECT_EQ(m->params().find("router.wq.weight")->shape, (std::vector<i64>{12, 16}));
  EXPECT_EQ(m->params().find("pool.w_up.weight")->shape, (std::vector<i64>{24, 16}));
  EXPECT_EQ(m->params().find("xattn.wk.weight")->shape, (std::vector<i64>{8, 24}));
  auto raw = make_model(test::tiny_dlcm("raw").model);
  EXPECT_EQ(raw->params().find("router.wq.weight"), nullptr);
  // identity-initialised router projections
  auto mi = make_initialised_model(test::tiny_dlcm().model, 1);
  const Param* wq = mi->params().find("router.wq.weight");
  for (i64 i = 0; i < 12; ++i)
    for (i64 j = 0; j < 16; ++j) EXPECT_EQ(wq->w[i * 16 + j], i == j ? 1.f : 0.f);
}

// Every parameter against central differences of CE + lambda * L_aux with the boundary
// samples fixed. Without smooth_grad the smoother's gate is detached from p, which finite
// differences cannot reproduce for parameters upstream of p; those are checked in the
// smooth_grad configuration (and against PyTorch in both).
TEST(Dlcm, FiniteDifferenceGradientsEveryParameter) {
  struct Case {
    const char* router;
    const char* xattn;
    bool smooth;
  };
  for (Case cs : {Case{"projected", "compact", false}, Case{"projected", "replicate", true},
                  Case{"raw", "compact", true}}) {
    Config c = test::tiny_dlcm(cs.router, cs.xattn, cs.smooth);
    c.model.aux_weight = 0.5f;  // make the aux path visible next to CE
    auto m = make_initialised_model(c.model, 11);
    Data d = make_data(c, 5);
    m->params().zero_grad();
    loss_and_grads(*m, d);
    std::vector<float> an(m->params().grad(), m->params().grad() + m->params().total());
    for (auto& p : m->params().params()) {
      if (!cs.smooth && depends_on_p(p.name)) continue;
      test::check_grad(std::string(cs.router) + "/" + cs.xattn + " " + p.name, p.w,
                       an.data() + p.offset, p.numel,
                       [&] { return loss_only(*m, d); }, 5e-3, 3e-2, 10);
    }
  }
}

TEST(Dlcm, ReplicateAndCompactAgreeOnOutputsAndGradients) {
  for (bool smooth : {false, true}) {
    Config a = test::tiny_dlcm("projected", "compact", smooth);
    Config b = test::tiny_dlcm("projected", "replicate", smooth);
    a.train.seq_len = b.train.seq_len = 70;  // more than one 64-token block
    auto ma = make_initialised_model(a.model, 3);
    auto mb = make_initialised_model(b.model, 3);
    Data d = make_data(a, 21);
    ma->params().zero_grad();
    mb->params().zero_grad();
    MicroStats sa, sb;
    double la = loss_and_grads(*ma, d, &sa), lb = loss_and_grads(*mb, d, &sb);
    EXPECT_NEAR(la, lb, 1e-5 * std::abs(la));
    EXPECT_EQ(sa.n_concepts, sb.n_concepts);
    EXPECT_LT(test::rel_err(ma->params().grad(), mb->params().grad(), ma->params().total()), 1e-4);
    const i64 V = a.model.vocab_size, N = d.B * d.L;
    Buf xa(N * V), xb(N * V);
    ma->logits(d.tok.data(), d.B, d.L, xa.data());
    mb->logits(d.tok.data(), d.B, d.L, xb.data());
    EXPECT_LT(test::rel_err(xa.data(), xb.data(), N * V), 1e-5);
  }
}

namespace {

// Engine against python/reference.py for config c (xattn_impl taken from c): the training path
// with given boundaries (loss, F, G, every gradient), the inference path (p, thresholded b,
// logits) and the weights after two AdamW steps.
void check_against_reference(Config c, const std::string& what) {
  SCOPED_TRACE(what);
  c.model.aux_weight = 0.2f;
  c.model.router.tau = 0.45f;
  c.train.weight_decay = 0.1f;
  const std::string xattn = c.model.xattn_impl;
  auto m = make_initialised_model(c.model, 21);
  // The reference's tiny fixtures perturb norms away from 1; do the same so norm gradients
  // are not special.
  Rng jr(4);
  for (auto& p : m->params().params())
    if (p.init_one)
      for (i64 i = 0; i < p.numel; ++i) p.w[i] += 0.2f * (jr.uniform() - 0.5f);
  Data d = make_data(c, 13);
  test::TempDir tmp;
  std::string ck = tmp.path + "/ckpt";
  test::save_model_only(ck, c, m->params());
  test::write_rows(tmp.path + "/tokens.txt", d.tok, d.B, d.L);
  test::write_rows(tmp.path + "/targets.txt", d.tgt, d.B, d.L);
  test::write_rows(tmp.path + "/b.txt", d.b, d.B, d.L);
  const float lr = 1e-3f;
  std::string log;
  char args[2048];
  std::snprintf(args, sizeof args,
                "--ckpt %s --tokens %s/tokens.txt --targets %s/targets.txt --boundaries %s/b.txt "
                "--xattn %s --out %s/train.safetensors --adam-steps 2 --lr %g --beta1 %g "
                "--beta2 %g --eps %g --weight-decay %g",
                ck.c_str(), tmp.path.c_str(), tmp.path.c_str(), tmp.path.c_str(), xattn.c_str(),
                tmp.path.c_str(), lr, c.train.beta1, c.train.beta2, c.train.eps,
                c.train.weight_decay);
  ASSERT_EQ(test::run_reference(args, &log), 0) << log;
  std::snprintf(args, sizeof args,
                "--ckpt %s --tokens %s/tokens.txt --targets %s/targets.txt --xattn %s "
                "--mode infer --out %s/infer.safetensors",
                ck.c_str(), tmp.path.c_str(), tmp.path.c_str(), xattn.c_str(), tmp.path.c_str());
  ASSERT_EQ(test::run_reference(args, &log), 0) << log;
  SafeTensorsFile tr(tmp.path + "/train.safetensors"), inf(tmp.path + "/infer.safetensors");
  const i64 N = d.B * d.L, V = c.model.vocab_size;

  // training path with the given boundaries: loss, F, G, every gradient
  m->params().zero_grad();
  MicroStats s;
  double loss = loss_and_grads(*m, d, &s);
  EXPECT_NEAR(loss, tr.read_f32("loss")[0], 2e-5 * std::abs(loss));
  EXPECT_NEAR(s.sum_b / N, tr.read_f32("F")[0], 1e-6);
  EXPECT_NEAR(s.sum_p / N, tr.read_f32("G")[0], 1e-5);
  for (auto& p : m->params().params()) {
    auto g = tr.read_f32("grad." + p.name);
    EXPECT_LT(test::rel_err(p.g, g.data(), p.numel), 1e-4) << p.name;
  }
  // inference path: p, thresholded b, logits
  Buf p(N), logits(N * V);
  std::vector<uint8_t> b(N);
  ASSERT_TRUE(m->boundaries(d.tok.data(), d.B, d.L, p.data(), b.data(), -1));
  auto rp = inf.read_f32("p"), rb = inf.read_f32("b");
  EXPECT_LT(test::max_abs_diff(p.data(), rp.data(), N), 1e-5);
  i64 b_diff = 0;
  for (i64 n = 0; n < N; ++n) b_diff += (b[n] != 0) != (rb[n] != 0);
  EXPECT_EQ(b_diff, 0);
  m->logits(d.tok.data(), d.B, d.L, logits.data());
  auto rl = inf.read_f32("logits");
  EXPECT_LT(test::rel_err(logits.data(), rl.data(), N * V), 1e-4);

  // two AdamW steps with the boundaries held fixed
  AdamW opt;
  opt.init(m->params());
  for (int step = 0; step < 2; ++step) {
    m->params().zero_grad();
    loss_and_grads(*m, d);
    opt.step(m->params(), lr, c.train);
  }
  for (auto& p : m->params().params()) {
    auto w = tr.read_f32("param_after." + p.name);
    EXPECT_LT(test::rel_err(p.w, w.data(), p.numel), 1e-4) << p.name;
  }
}

}  // namespace

TEST(Dlcm, MatchesPyTorchReference) {
  if (!test::torch_available()) GTEST_SKIP() << "/usr/bin/python3 with torch not found";
  struct Case {
    const char* router;
    const char* xattn;
    bool smooth;
    i64 x_kv;
  };
  for (Case cs : {Case{"projected", "compact", false, 1}, Case{"raw", "replicate", true, 2},
                  Case{"projected", "replicate", true, 1}}) {
    Config c = test::tiny_dlcm(cs.router, cs.xattn, cs.smooth);
    c.model.x_kv_heads = cs.x_kv;
    check_against_reference(c, std::string(cs.router) + "/" + cs.xattn +
                                   (cs.smooth ? "/smooth" : ""));
  }
}

namespace {

// With thresholded boundaries, logits, p and b at positions <= t of a model with config c do
// not depend on tokens after t; `what` names the case in failures.
void check_causality(const Config& c, uint64_t seed, const std::string& what) {
  auto m = make_initialised_model(c.model, seed);
  const i64 L = 80, V = c.model.vocab_size, B = 2;
  auto tok = test::random_tokens(B * L, V, 100 + seed, c.model.bos_id, 0.05);
  tok[0] = tok[L] = c.model.bos_id;
  Buf base(B * L * V), pert(B * L * V), p0(B * L), p1(B * L);
  std::vector<uint8_t> b0(B * L), b1(B * L);
  m->logits(tok.data(), B, L, base.data());
  m->boundaries(tok.data(), B, L, p0.data(), b0.data(), -1);
  i64 concepts = 0;
  for (i64 n = 0; n < B * L; ++n) concepts += b0[n];
  ASSERT_GT(concepts, 2 * B) << what << ": the test needs several concepts per row";
  ASSERT_LT(concepts, B * L - 2 * B) << what << ": the test needs multi-token concepts";
  for (i64 t : {0, 5, 31, 63, 64, 78}) {
    auto tok2 = tok;
    for (i64 row = 0; row < B; ++row)
      for (i64 j = t + 1; j < L; ++j) tok2[row * L + j] = i32((tok2[row * L + j] + 3 + j) % V);
    m->logits(tok2.data(), B, L, pert.data());
    m->boundaries(tok2.data(), B, L, p1.data(), b1.data(), -1);
    for (i64 row = 0; row < B; ++row) {
      const i64 o = row * L;
      EXPECT_EQ(test::max_abs_diff(base.data() + o * V, pert.data() + o * V, (t + 1) * V), 0.0)
          << what << " seed " << seed << " row " << row << " t=" << t;
      EXPECT_EQ(test::max_abs_diff(p0.data() + o, p1.data() + o, t + 1), 0.0);
      EXPECT_EQ(std::memcmp(b0.data() + o, b1.data() + o, t + 1), 0);
      // the perturbation is visible after t (so the test can fail)
      if (t + 1 < L) {
        EXPECT_GT(test::max_abs_diff(base.data() + (o + t + 1) * V,
                                     pert.data() + (o + t + 1) * V, (L - t - 1) * V),
                  1e-4);
      }
    }
  }
}

}  // namespace

// With thresholded boundaries, logits, p and b at positions <= t do not depend on tokens after
// t (the leak-free cross-attention of SPEC 4.7), over random models and inputs.
TEST(Dlcm, CausalityFutureTokensChangeNoPastLogitOrBoundary) {
  for (const char* xattn : {"compact", "replicate"})
    for (uint64_t seed : {1, 2, 3})
      check_causality(test::tiny_dlcm("projected", xattn), seed, xattn);
}

// k micro-batches of one row each give the same gradient as one batch of k rows, with the
// boundaries sampled (same keys: global row index within the step) and F over the whole step.
TEST(Dlcm, GradientAccumulationEqualsOneBigBatch) {
  for (bool smooth : {false, true}) {
    Config c = test::tiny_dlcm("projected", "compact", smooth);
    c.model.aux_weight = 0.3f;
    c.train.batch_size = 4;
    auto m = make_initialised_model(c.model, 8);
    Data d = make_data(c, 31);
    StepContext ctx = context_for(d);
    Batch big{d.tok.data(), d.tgt.data(), d.B, d.L, 0};
    m->params().zero_grad();
    ctx.sum_b = m->prepare_step({big}, ctx);
    MicroStats sbig = m->train_micro(big, 0, ctx);
    std::vector<float> g_big(m->params().grad(), m->params().grad() + m->params().total());
    const double sum_b_big = ctx.sum_b;
    EXPECT_GT(sum_b_big, d.B);  // sampled boundaries beyond the row starts
    EXPECT_LT(sum_b_big, d.B * d.L);

    std::vector<Batch> micro;
    for (i64 r = 0; r < d.B; ++r)
      micro.push_back(Batch{d.tok.data() + r * d.L, d.tgt.data() + r * d.L, 1, d.L, r});
    m->params().zero_grad();
    ctx.sum_b = m->prepare_step(micro, ctx);
    EXPECT_EQ(ctx.sum_b, sum_b_big);
    double sum_p = 0, ce = 0;
    for (i64 k = 0; k < d.B; ++k) {
      MicroStats s = m->train_micro(micro[k], k, ctx);
      sum_p += s.sum_p;
      ce += s.ce_sum;
    }
    EXPECT_NEAR(sum_p, sbig.sum_p, 1e-4);
    EXPECT_NEAR(ce, sbig.ce_sum, 1e-4 * ce);
    EXPECT_LT(test::rel_err(m->params().grad(), g_big.data(), g_big.size()), 2e-5);
  }
}

TEST(Dlcm, AuxLossGradientReachesTheRouter) {
  // With lambda > 0 and F far from 1/R, the router projections get a gradient even when CE
  // ignores every target (the aux path alone), and none when lambda = 0.
  Config c = test::tiny_dlcm();
  for (float w : {0.f, 1.f}) {
    c.model.aux_weight = w;
    auto m = make_initialised_model(c.model, 2);
    Data d = make_data(c, 3, 0.0, 0.9);
    std::fill(d.tgt.begin(), d.tgt.end(), -1);
    m->params().zero_grad();
    loss_and_grads(*m, d);
    const Param* wq = m->params().find("router.wq.weight");
    double ss = 0;
    for (i64 i = 0; i < wq->numel; ++i) ss += double(wq->g[i]) * wq->g[i];
    if (w == 0.f) {
      EXPECT_EQ(ss, 0.0);
    } else {
      EXPECT_GT(ss, 1e-12);
    }
  }
}


TEST(Dlcm, BadInputsGiveClearErrors) {
  Config c = test::tiny_dlcm();
  auto m = make_initialised_model(c.model, 1);
  std::vector<i32> tok(10, 3);
  tok[4] = 999;
  Buf out(10 * c.model.vocab_size);
  try {
    m->logits(tok.data(), 1, 10, out.data());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("outside the vocabulary"), std::string::npos);
  }
  Config bad = c;
  bad.model.router.kind = "learned";
  EXPECT_THROW(validate(bad, "cfg.json"), Error);
}

// ---- research variants (SPEC 4.9): concept_repr, concept_visibility, concept_path ----------

namespace {

struct Variant {
  const char* repr;
  const char* vis;
  bool path;
};
const Variant kVariants[] = {{"first", "shifted", true},
                             {"first", "inclusive", true},
                             {"prefix_mean", "shifted", true},
                             {"prefix_mean", "inclusive", true},
                             {"mean", "shifted", false}};

// Whether the variant has a replicate form: not without the concept path (no attention), nor
// with prefix_mean + inclusive (a token's own concept differs per token; refused).
bool replicable(const Variant& v) {
  return v.path && !(std::string(v.repr) == "prefix_mean" && std::string(v.vis) == "inclusive");
}

Config variant(const Variant& v, const std::string& xattn = "compact", bool smooth = false) {
  Config c = test::tiny_dlcm("projected", xattn, smooth);
  c.model.concept_repr = v.repr;
  c.model.concept_visibility = v.vis;
  c.model.concept_path = v.path;
  return c;
}

std::string variant_name(const Variant& v, const std::string& xattn) {
  return std::string(v.repr) + "/" + v.vis + (v.path ? "" : "/no_concept_path") + "/" + xattn;
}

using MakeVariant = Config (*)(const Variant&, const std::string&, bool);

// Every parameter of each variant (compact, and replicate where it exists) against central
// differences (smooth_grad on, so the parameters upstream of p are checked too; the boundary
// samples are fixed).
void check_gradients_every_parameter(std::span<const Variant> vs, MakeVariant make,
                                     const std::string& tag) {
  for (const Variant& v : vs)
    for (const char* xattn : {"compact", "replicate"}) {
      if (!replicable(v) && std::string(xattn) == "replicate") continue;
      Config c = make(v, xattn, true);
      c.model.aux_weight = 0.5f;
      auto m = make_initialised_model(c.model, 11);
      Data d = make_data(c, 5);
      m->params().zero_grad();
      loss_and_grads(*m, d);
      std::vector<float> an(m->params().grad(), m->params().grad() + m->params().total());
      for (auto& p : m->params().params())
        test::check_grad(tag + variant_name(v, xattn) + " " + p.name, p.w, an.data() + p.offset,
                         p.numel, [&] { return loss_only(*m, d); }, 5e-3, 3e-2, 6);
    }
}

// The replicate and compact forms of each replicable variant: loss, gradients and logits.
void check_replicate_equals_compact(std::span<const Variant> vs, MakeVariant make,
                                    const std::string& tag) {
  for (const Variant& v : vs) {
    if (!replicable(v)) continue;
    Config a = make(v, "compact", true), b = make(v, "replicate", true);
    a.train.seq_len = b.train.seq_len = 70;  // more than one 64-token block
    auto ma = make_initialised_model(a.model, 3);
    auto mb = make_initialised_model(b.model, 3);
    Data d = make_data(a, 21);
    ma->params().zero_grad();
    mb->params().zero_grad();
    double la = loss_and_grads(*ma, d), lb = loss_and_grads(*mb, d);
    const std::string name = tag + variant_name(v, "");
    EXPECT_NEAR(la, lb, 1e-5 * std::abs(la)) << name;
    EXPECT_LT(test::rel_err(ma->params().grad(), mb->params().grad(), ma->params().total()), 1e-4)
        << name;
    const i64 V = a.model.vocab_size, N = d.B * d.L;
    Buf xa(N * V), xb(N * V);
    ma->logits(d.tok.data(), d.B, d.L, xa.data());
    mb->logits(d.tok.data(), d.B, d.L, xb.data());
    EXPECT_LT(test::rel_err(xa.data(), xb.data(), N * V), 1e-5) << name;
  }
}

}  // namespace

TEST(DlcmVariants, FiniteDifferenceGradientsEveryParameter) {
  check_gradients_every_parameter(kVariants, variant, "");
}

TEST(DlcmVariants, CausalityFutureTokensChangeNoPastLogitOrBoundary) {
  for (const Variant& v : kVariants)
    for (const char* xattn : {"compact", "replicate"})
      if (replicable(v) || std::string(xattn) == "compact")
        for (uint64_t seed : {1, 2})
          check_causality(variant(v, xattn), seed, variant_name(v, xattn));
}

TEST(DlcmVariants, ReplicateAndCompactAgree) {
  check_replicate_equals_compact(kVariants, variant, "");
}

// Each option changes the function (the same weights give other logits than the default),
// except prefix_mean with shifted visibility: every concept a token sees is closed, its prefix
// is the whole concept, so it is the mean model exactly.
TEST(DlcmVariants, OptionsChangeTheFunctionExceptPrefixMeanShifted) {
  Config base = test::tiny_dlcm();
  auto mb = make_initialised_model(base.model, 4);
  Data d = make_data(base, 9);
  const i64 V = base.model.vocab_size, N = d.B * d.L;
  Buf want(N * V), got(N * V);
  mb->logits(d.tok.data(), d.B, d.L, want.data());
  for (const Variant& v : kVariants) {
    Config c = variant(v);
    auto m = make_model(c.model);
    // the shared parameters by name (concept_path = false registers a subset)
    for (auto& p : m->params().params())
      std::copy_n(mb->params().find(p.name)->w, p.numel, p.w);
    m->logits(d.tok.data(), d.B, d.L, got.data());
    const double diff = test::max_abs_diff(got.data(), want.data(), N * V);
    if (std::string(v.repr) == "prefix_mean" && std::string(v.vis) == "shifted")
      EXPECT_EQ(diff, 0.0) << variant_name(v, "compact");
    else
      EXPECT_GT(diff, 1e-3) << variant_name(v, "compact");
  }
}

// ---- xattn_rope: RoPE in the concept cross-attention (docs/dlcm.md) -----------------------

namespace {

const Variant kRopeVariants[] = {{"mean", "shifted", true},
                                 {"first", "inclusive", true},
                                 {"prefix_mean", "inclusive", true}};

Config rope_variant(const Variant& v, const std::string& xattn = "compact", bool smooth = false) {
  Config c = variant(v, xattn, smooth);
  c.model.xattn_rope = true;
  return c;
}

}  // namespace

// The rotation's backward (its transpose on q and k, z_null's key position-free) against
// central differences, every parameter, compact and replicate.
TEST(XattnRope, FiniteDifferenceGradientsEveryParameter) {
  check_gradients_every_parameter(kRopeVariants, rope_variant, "rope ");
}

TEST(XattnRope, CausalityFutureTokensChangeNoPastLogitOrBoundary) {
  for (const Variant& v : kRopeVariants)
    for (const char* xattn : {"compact", "replicate"})
      if (replicable(v) || std::string(xattn) == "compact")
        check_causality(rope_variant(v, xattn), 1, "rope " + variant_name(v, xattn));
}

// Every replicated copy of concept j carries the key rotated at start_j: replicate == compact.
TEST(XattnRope, ReplicateAndCompactAgree) {
  check_replicate_equals_compact(kRopeVariants, rope_variant, "rope ");
}

// The rotation does something: the same weights (xattn_rope adds none) give other logits.
TEST(XattnRope, ChangesTheFunctionWithTheSameWeights) {
  for (const Variant& v : kRopeVariants) {
    Config a = variant(v), b = rope_variant(v);
    auto ma = make_initialised_model(a.model, 4);
    auto mb = make_model(b.model);
    ASSERT_EQ(ma->params().total(), mb->params().total());
    std::copy_n(ma->params().data(), ma->params().total(), mb->params().data());
    Data d = make_data(a, 9);
    const i64 V = a.model.vocab_size, N = d.B * d.L;
    Buf xa(N * V), xb(N * V);
    ma->logits(d.tok.data(), d.B, d.L, xa.data());
    mb->logits(d.tok.data(), d.B, d.L, xb.data());
    EXPECT_GT(test::max_abs_diff(xa.data(), xb.data(), N * V), 1e-3) << variant_name(v, "");
  }
}

// The model's FLOPs are the function's; the kernels run widened heads (2 hd): more work.
TEST(XattnRope, FlopsModelUnchangedKernelAttentionDoubled) {
  for (const char* xattn : {"compact", "replicate"}) {
    const ModelConfig a = variant({"mean", "shifted", true}, xattn).model;
    const ModelConfig b = rope_variant({"mean", "shifted", true}, xattn).model;
    const auto ra = flops_report(a, 64), rb = flops_report(b, 64);
    EXPECT_EQ(ra.flops("cross_attention"), rb.flops("cross_attention")) << xattn;
    EXPECT_GT(rb.kernel_total(), ra.kernel_total()) << xattn;
  }
}

// Engine against the PyTorch reference (python/dlcm_ref: the definition, per-query rotated
// keys): loss, every gradient, logits, AdamW steps.
TEST(XattnRope, MatchesPyTorchReference) {
  if (!test::torch_available()) GTEST_SKIP() << "/usr/bin/python3 with torch not found";
  struct Case {
    Variant v;
    const char* xattn;
    i64 x_kv;
  };
  for (const Case& cs : {Case{{"mean", "shifted", true}, "compact", 2},
                         Case{{"mean", "shifted", true}, "replicate", 1},
                         Case{{"first", "inclusive", true}, "replicate", 2},
                         Case{{"prefix_mean", "inclusive", true}, "compact", 2}}) {
    Config c = rope_variant(cs.v, cs.xattn, true);
    c.model.x_kv_heads = cs.x_kv;
    check_against_reference(c, "rope " + variant_name(cs.v, cs.xattn));
  }
}

TEST(DlcmVariants, ConceptPathOffRegistersOnlyTheTokenPath) {
  Config c = variant({"mean", "shifted", false});
  auto m = make_model(c.model);
  for (const char* gone : {"pool.w_up.weight", "backbone.norm.weight",
                           "backbone.layers.0.attn.wq.weight", "xattn.null_concept",
                           "xattn.norm.weight", "xattn.wq.weight", "xattn.wk.weight",
                           "xattn.wv.weight", "xattn.wo.weight", "xattn.q_norm.weight",
                           "xattn.k_norm.weight"})
    EXPECT_EQ(m->params().find(gone), nullptr) << gone;
  for (const char* kept : {"router.wq.weight", "xattn.ffn_norm.weight", "xattn.ffn.w1.weight",
                           "xattn.ffn.w2.weight", "xattn.ffn.w3.weight", "decoder.norm.weight"})
    EXPECT_NE(m->params().find(kept), nullptr) << kept;
  // FLOPs accounting follows what runs
  for (const Variant& v : kVariants) {
    Config cv = variant(v);
    auto mv = make_model(cv.model);
    FlopsReport r = flops_report(cv.model, cv.train.seq_len);
    i64 n = 0;
    for (auto& p : mv->params().params()) n += p.numel;
    EXPECT_EQ(r.total_params(), n) << variant_name(v, "compact");
    EXPECT_EQ(r.flops("backbone") > 0, v.path);
    EXPECT_EQ(r.flops("cross_attention") > 0, v.path);
  }
  // inclusive admits one more concept per token than shifted
  const double inc = flops_report(variant(kVariants[1]).model, 64).flops("cross_attention");
  const double sh = flops_report(variant(kVariants[0]).model, 64).flops("cross_attention");
  EXPECT_NEAR(inc - sh, 4.0 * 8 * 2, 1e-9);  // 4 * head_dim * x_heads
  // prefix_mean + inclusive: one backbone prefix row and W_up per token on top of the concepts'
  // (R per concept), and the K/V of every token's own concept
  const ModelConfig pi = variant({"prefix_mean", "inclusive", true}).model;
  const ModelConfig ps = variant({"prefix_mean", "shifted", true}).model;
  const FlopsReport a = flops_report(pi, 64), b = flops_report(ps, 64);
  const double R = pi.target_R;
  EXPECT_NEAR(a.flops("backbone"), b.flops("backbone") * (1 + R), 1e-6 * a.flops("backbone"));
  EXPECT_NEAR(a.flops("pooling"), b.flops("pooling") * (1 + R), 1e-6 * a.flops("pooling"));
  EXPECT_NEAR(a.flops("cross_attention"), inc + 2.0 * 2 * 24 * 8, 1e-6 * inc);  // 2 dc xkv x 2
}

// Why validation refuses inclusive + mean: built anyway, the model leaks (a token's logits
// depend on later tokens of its concept), which the causality probe used above detects.
TEST(DlcmVariants, InclusiveMeanWouldLeak) {
  Config c = variant({"mean", "inclusive", true});
  auto m = make_initialised_model(c.model, 2);  // make_model does not validate
  const i64 L = 40, V = c.model.vocab_size;
  auto tok = test::random_tokens(L, V, 77, c.model.bos_id, 0.0);
  tok[0] = c.model.bos_id;
  std::vector<float> p(L);
  std::vector<uint8_t> b(L);
  m->boundaries(tok.data(), 1, L, p.data(), b.data(), -1);
  Buf base(L * V), pert(L * V);
  m->logits(tok.data(), 1, L, base.data());
  i64 leaks = 0;
  for (i64 t = 0; t + 1 < L; ++t) {
    if (b[t + 1]) continue;  // t + 1 in t's concept: its H enters t's concept mean
    auto tok2 = tok;
    tok2[t + 1] = i32((tok2[t + 1] + 5) % V);
    std::vector<uint8_t> b2(L);
    m->boundaries(tok2.data(), 1, L, p.data(), b2.data(), -1);
    if (std::memcmp(b.data(), b2.data(), t + 2) != 0) continue;  // same segmentation up to t+1
    m->logits(tok2.data(), 1, L, pert.data());
    leaks += test::max_abs_diff(base.data() + t * V, pert.data() + t * V, V) > 1e-6;
  }
  EXPECT_GT(leaks, 0);
}

TEST(DlcmVariants, LeakingOrMissingCombinationsAreRefused) {
  Config c = variant({"mean", "inclusive", true});
  try {
    validate(c, "cfg.json");
    FAIL() << "inclusive + mean must be refused";
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("cfg.json"), std::string::npos) << w;
    EXPECT_NE(w.find("leaks the future"), std::string::npos) << w;
  }
  Config bad = test::tiny_dlcm();
  bad.model.concept_repr = "median";
  EXPECT_THROW(validate(bad, "cfg.json"), Error);
  bad = test::tiny_dlcm();
  bad.model.concept_visibility = "all";
  EXPECT_THROW(validate(bad, "cfg.json"), Error);
  for (const Variant& v : kVariants) EXPECT_NO_THROW(validate(variant(v), "cfg.json"));
  // prefix_mean + inclusive has no replicate form: a clear error at model creation
  Config pm = variant({"prefix_mean", "inclusive", true}, "replicate");
  EXPECT_NO_THROW(make_model(variant({"prefix_mean", "inclusive", true}).model));
  try {
    validate(pm, "cfg.json");
    FAIL() << "prefix_mean + inclusive with replicate must be refused by validation";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cfg.json"), std::string::npos) << e.what();
  }
  try {
    make_model(pm.model);
    FAIL() << "prefix_mean + inclusive with replicate is not implemented";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not implemented"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("compact"), std::string::npos) << e.what();
  }
}

// prefix_mean + inclusive against the PyTorch reference (python/dlcm_ref/model.py evaluates
// every token's own concept with one backbone sequence per token): loss, every gradient,
// logits, AdamW steps; with the smoother's gate detached and live (smooth_grad), GQA in the
// cross-attention.
TEST(DlcmVariants, PrefixMeanInclusiveMatchesPyTorchReference) {
  if (!test::torch_available()) GTEST_SKIP() << "/usr/bin/python3 with torch not found";
  for (bool smooth : {false, true}) {
    SCOPED_TRACE(smooth ? "smooth" : "detached");
    Config c = variant({"prefix_mean", "inclusive", true}, "compact", smooth);
    c.model.x_kv_heads = smooth ? 2 : 1;
    check_against_reference(c, "compact");
  }
}

// With one-token concepts every prefix is its whole concept and every prefix row is its
// concept's own backbone row, so prefix_mean + inclusive is first + inclusive (same function,
// same gradients); with multi-token concepts the two differ.
TEST(DlcmVariants, PrefixMeanInclusiveEqualsFirstOnOneTokenConcepts) {
  Config a = variant({"prefix_mean", "inclusive", true}, "compact", true);
  Config b = variant({"first", "inclusive", true}, "compact", true);
  auto ma = make_initialised_model(a.model, 6);
  auto mb = make_initialised_model(b.model, 6);
  Data one = make_data(a, 8);
  std::fill(one.b.begin(), one.b.end(), 1);  // every token starts a concept
  ma->params().zero_grad();
  mb->params().zero_grad();
  const double la = loss_and_grads(*ma, one), lb = loss_and_grads(*mb, one);
  EXPECT_NEAR(la, lb, 1e-5 * std::abs(lb));
  EXPECT_LT(test::rel_err(ma->params().grad(), mb->params().grad(), ma->params().total()), 1e-4);
  Data multi = make_data(a, 8);
  EXPECT_GT(std::abs(loss_only(*ma, multi) - loss_only(*mb, multi)), 1e-4);
}

// The SPEC 4.9 variants against the PyTorch reference: logits, loss, every gradient, AdamW
// (concept_path = false: the engine registers no pool/backbone/xattn-attention tensor, and the
// reference loads what the checkpoint has).
TEST(DlcmVariants, MatchesPyTorchReference) {
  if (!test::torch_available()) GTEST_SKIP() << "/usr/bin/python3 with torch not found";
  struct Case {
    Variant v;
    const char* xattn;
    i64 enc_window, dec_window;
  };
  for (const Case& cs : {Case{{"first", "shifted", true}, "compact", 0, 0},
                         Case{{"first", "inclusive", true}, "compact", 0, 0},
                         Case{{"first", "inclusive", true}, "replicate", 0, 0},
                         Case{{"prefix_mean", "shifted", true}, "compact", 0, 0},
                         Case{{"mean", "shifted", false}, "compact", 0, 0},
                         Case{{"mean", "shifted", true}, "compact", 4, 6},
                         Case{{"first", "inclusive", true}, "replicate", 5, 3}}) {
    Config c = variant(cs.v, cs.xattn, true);
    c.model.enc_window = cs.enc_window;
    c.model.dec_window = cs.dec_window;
    check_against_reference(c, variant_name(cs.v, cs.xattn) + " windows " +
                                   std::to_string(cs.enc_window) + "/" +
                                   std::to_string(cs.dec_window));
  }
}
