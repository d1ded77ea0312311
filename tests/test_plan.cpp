// FLOPs accounting (SPEC 7) and matched-FLOPs planning: parameter counts against the real
// baseline model and the PyTorch reference's parameter inventory, the 2-FLOPs-per-parameter
// identity, the cross-attention model/kernel counts, and plans that meet both constraints.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "model_fixtures.h"
#include "models/flops.h"
#include "models/plan.h"
#include "testing.h"

using namespace dlcm;

namespace {

// Parameters per component from the PyTorch reference's inventory (python/dlcm_ref), one map
// per config (one Python start: importing torch takes seconds).
std::vector<std::map<std::string, i64>> reference_param_counts(const std::vector<Config>& cs,
                                                               const std::string& dir) {
  std::string files;
  for (size_t i = 0; i < cs.size(); ++i) {
    std::string f = dir + "/cfg" + std::to_string(i) + ".json";
    std::ofstream(f) << config_to_json(cs[i]).dump();
    files += " " + f;
  }
  std::string script = dir + "/count.py";
  std::ofstream(script) << "import sys, json\nsys.path.insert(0, '" << DLCM_SOURCE_DIR
                        << "/python')\nfrom dlcm_ref.config import load_config\n"
                           "from dlcm_ref.model import param_specs\n"
                           "for path in sys.argv[1:]:\n"
                           "    out = {}\n"
                           "    for name, shape, _ in param_specs(load_config(path)):\n"
                           "        n = 1\n        for s in shape: n *= s\n"
                           "        k = name.split('.')[0]\n        out[k] = out.get(k, 0) + n\n"
                           "    print(json.dumps(out))\n";
  auto [rc, text] = test::run_command("/usr/bin/python3 " + script + files);
  EXPECT_EQ(rc, 0) << text;
  std::vector<std::map<std::string, i64>> out;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    const nlohmann::json j = nlohmann::json::parse(line);  // outlives the loop below
    out.emplace_back();
    for (auto& [k, v] : j.items()) out.back()[k] = v.get<i64>();
  }
  EXPECT_EQ(out.size(), cs.size()) << text;
  out.resize(cs.size());
  return out;
}

Config small_baseline() {
  Config c;
  c.model.vocab_size = 8192;
  c.model.d_token = 256;
  c.model.n_heads = 4;
  c.model.n_kv_heads = 4;
  c.model.d_ff = 768;
  c.model.n_layers = 6;
  c.model.max_seq_len = 256;
  c.train.seq_len = 256;
  return c;
}

}  // namespace

TEST(Flops, BaselineParamCountsMatchTheModel) {
  Config c = test::tiny_baseline(true, 1);
  auto m = make_model(c.model);
  FlopsReport r = flops_report(c.model, c.train.seq_len);
  EXPECT_EQ(r.total_params(), [&] {
    i64 n = 0;
    for (auto& p : m->params().params()) n += p.numel;
    return n;
  }());
  EXPECT_EQ(r.param_count("embedding"), m->params().find("tok_embeddings.weight")->numel);
  EXPECT_EQ(r.param_count("head"), m->params().find("lm_head.weight")->numel);
  EXPECT_EQ(r.non_embedding_params(), r.total_params() - 2 * c.model.vocab_size * c.model.d_token);
  EXPECT_EQ(r.backbone_param_share(), 0.0);
}

TEST(Flops, TwoFlopsPerMatrixParameterPlusAttention) {
  Config c = small_baseline();
  c.model.n_kv_heads = 2;  // GQA
  const i64 L = 100;
  FlopsReport r = flops_report(c.model, L);
  const ModelConfig& m = c.model;
  // every block matrix multiplies each token once: 2 FLOPs per weight; attention 4*hd per
  // admitted (query, key) pair per head, (L+1)/2 keys on average under the causal mask
  double matrices = 0;
  auto ps = make_model(m);
  for (auto& p : ps->params().params())
    if (p.shape.size() == 2 && p.name.rfind("layers.", 0) == 0) matrices += p.numel;
  double attn = m.n_layers * 4.0 * m.head_dim * m.n_heads * (L + 1) / 2.0;
  EXPECT_NEAR(r.flops("layers"), 2 * matrices + attn, 1e-6 * r.flops("layers"));
  EXPECT_NEAR(r.flops("head"), 2.0 * m.d_token * m.vocab_size, 1);
  EXPECT_DOUBLE_EQ(r.training_total(), 3 * r.total());
}

// The final block's work a last-logits prefill skips = the whole block over P positions minus
// what it still runs: q/k/v for every position, and wo, the FFN and the attention of the last
// query (min(P, window) keys) for one.
TEST(Flops, PrefillLastRowsSkipIsTheFinalBlockLessWhatStillRuns) {
  auto expected = [](i64 d, i64 H, i64 Hkv, i64 hd, i64 dff, i64 P, i64 window) {
    const double block = double(P) * block_flops_per_position(d, H, Hkv, hd, dff, double(P), window);
    const double kv = double(P) * 2.0 * d * (2 * Hkv * hd);
    const double last = 2.0 * 2 * (H * hd) * d + 6.0 * d * dff +
                        4.0 * hd * H * double(window > 0 ? std::min(P, window) : P);
    return block - kv - last;  // the keys and values of every position, the rest of the last
  };
  Config b = small_baseline();
  b.model.n_kv_heads = 2;
  const ModelConfig& m = b.model;
  for (i64 P : {2, 17, 128})
    EXPECT_NEAR(prefill_last_rows_skipped(m, P),
                expected(m.d_token, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff, P, 0),
                1e-9 * expected(m.d_token, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff, P, 0))
        << P;
  EXPECT_EQ(prefill_last_rows_skipped(m, 1), 0.0);
  Config x = small_baseline();  // baseline_extras: the final block is the post stack's last
  x.model.baseline_extras = true;
  x.model.x_d_ff = 96;
  EXPECT_DOUBLE_EQ(prefill_last_rows_skipped(x.model, 40),
                   expected(x.model.d_token, x.model.n_heads, x.model.n_kv_heads,
                            x.model.head_dim, x.model.d_ff, 40, 0));
  Config c = test::tiny_dlcm();  // the DLCM's last decoder layer, with its sliding window
  c.model.dec_window = 5;
  for (i64 P : {3, 5, 30})
    EXPECT_NEAR(prefill_last_rows_skipped(c.model, P),
                expected(c.model.d_token, c.model.n_heads, c.model.n_kv_heads, c.model.head_dim,
                         c.model.d_ff, P, 5),
                1e-6)
        << P;
  c.model.dec_layers = 0;
  EXPECT_EQ(prefill_last_rows_skipped(c.model, 30), 0.0);
}

// A prefill's FLOPs as run: with P / R closed concepts the model count at R, less the head's
// and the final block's skipped rows; each concept closed adds its W_up row, its backbone rows
// and its list keys and values (and the attention they take part in), and none closed counts no
// concept's work. (The bench counted the prompt's open concept too, until session 30: ~0.9% of
// dlcm-small's prefill of 128 tokens in its favour.)
TEST(Flops, PrefillAsRunCountsTheClosedConceptsOnly) {
  Config c = test::tiny_dlcm();
  const ModelConfig& m = c.model;
  const i64 P = 64;
  const FlopsReport fr = flops_report(m, P, 4.0);
  const double full = fr.total() - fr.flops("head") * double(P - 1) / double(P);
  EXPECT_NEAR(prefill_flops_as_run(m, P, 16, false), full, 1e-9 * full);
  EXPECT_NEAR(prefill_flops_as_run(m, P, 16, true),
              full - prefill_last_rows_skipped(m, P) / double(P), 1e-9 * full);
  const i64 d = m.d_token, dc = m.d_concept, hd = m.head_dim;
  const double rows = 2.0 * dc * (m.bb_heads * hd) * 2 + 2.0 * dc * (m.bb_kv_heads * hd) * 2 +
                      6.0 * dc * m.bb_d_ff;  // one backbone row's products, per layer
  const double one = (2.0 * d * dc + double(m.bb_layers) * rows +
                      2.0 * dc * (m.x_kv_heads * hd) * 2) / double(P);
  for (double k : {0.0, 1.0, 15.0}) {
    // the attention: the new backbone row's k + 1 keys in every layer; every token's one more
    // list entry on average of half
    const double att = double(m.bb_layers) * 4.0 * hd * m.bb_heads * (k + 1) / double(P) +
                       4.0 * hd * m.x_heads * 0.5;
    const double diff = prefill_flops_as_run(m, P, k + 1, true) - prefill_flops_as_run(m, P, k, true);
    EXPECT_NEAR(diff, one + att, 1e-9 * one) << k;
  }
  Config b = small_baseline();  // no concepts: `closed` is not read
  EXPECT_EQ(prefill_flops_as_run(b.model, P, 0, true), prefill_flops_as_run(b.model, P, 7, true));
}

TEST(Flops, DlcmParamCountsMatchTheReferenceInventory) {
  if (!test::torch_available()) GTEST_SKIP() << "/usr/bin/python3 with torch not found";
  Config c;
  c.model.arch = "dlcm";
  c.model.vocab_size = 300;
  c.model.d_token = 64;
  c.model.n_heads = 2;
  c.model.n_kv_heads = 1;
  c.model.head_dim = 32;
  c.model.d_ff = 96;
  c.model.d_concept = 96;
  c.model.bb_heads = 3;
  c.model.bb_kv_heads = 3;
  c.model.bb_d_ff = 160;
  c.model.x_heads = 2;
  c.model.x_kv_heads = 2;
  c.model.x_d_ff = 80;
  c.model.d_scan = 48;
  c.model.qk_norm = true;
  test::TempDir tmp;
  Config raw = c;
  raw.model.router.kind = "raw";
  auto refs = reference_param_counts({c, raw}, tmp.path);
  auto& ref = refs[0];
  FlopsReport r = flops_report(c.model, 64);
  EXPECT_EQ(r.param_count("embedding"), ref["tok_embeddings"]);
  EXPECT_EQ(r.param_count("encoder"), ref["encoder"]);
  EXPECT_EQ(r.param_count("router"), ref["router"]);
  EXPECT_EQ(r.param_count("pooling"), ref["pool"]);
  EXPECT_EQ(r.param_count("backbone"), ref["backbone"]);
  EXPECT_EQ(r.param_count("cross_attention") + r.param_count("cross_ffn"), ref["xattn"]);
  EXPECT_EQ(r.param_count("decoder"), ref["decoder"]);
  EXPECT_EQ(r.param_count("head"), ref["lm_head"]);
  EXPECT_EQ(refs[1].count("router"), 0u);
  EXPECT_EQ(flops_report(raw.model, 64).param_count("router"), 0);
  EXPECT_EQ(flops_report(raw.model, 64).total_params(), [&] {
    i64 n = 0;
    for (auto& [k, v] : refs[1]) n += v;
    return n;
  }());
}

TEST(Flops, CrossAttentionModelAndKernelCounts) {
  Config c;
  c.model.arch = "dlcm";
  const i64 L = 256;
  const double R = 4, M = L / R, hd = c.model.head_dim, H = c.model.x_heads;
  FlopsReport r = flops_report(c.model, L, R);
  // model: (M+1)/2 concepts per token on average; replicate kernel: (L+1)/2 positions
  const double pairs_model = 4 * hd * H * (M + 1) / 2, pairs_rep = 4 * hd * H * (L + 1) / 2;
  EXPECT_NEAR(r.xattn.replicate - r.xattn.model, pairs_rep - pairs_model, 1e-6 * r.xattn.replicate);
  EXPECT_EQ(r.xattn.compact, r.xattn.model);
  EXPECT_EQ(r.kernel_total(), r.total());  // compact is the default
  c.model.xattn_impl = "replicate";
  FlopsReport rr = flops_report(c.model, L, R);
  EXPECT_NEAR(rr.kernel_total() - rr.total(), pairs_rep - pairs_model, 1e-6 * rr.total());
  // the backbone runs once per concept: doubling R halves its matrix FLOPs
  FlopsReport r8 = flops_report(c.model, L, 2 * R);
  EXPECT_LT(r8.flops("backbone"), 0.5 * r.flops("backbone") + 1);
  EXPECT_NEAR(r.backbone_flops_share(), r.flops("backbone") / r.total(), 1e-12);
}

TEST(Plan, ProposalsMeetFlopsAndShareConstraints) {
  Config base = small_baseline();
  const double Fb = flops_report(base.model, base.train.seq_len).total();
  for (auto [P, R] : {std::pair{0.3, 2.0}, {0.5, 4.0}, {0.7, 8.0}, {0.5, 3.0}}) {
    PlanOptions o;
    o.P = P;
    o.R = R;
    PlanResult p = plan_match(base, o, "base.json");
    SCOPED_TRACE("P=" + std::to_string(P) + " R=" + std::to_string(R));
    // recomputed independently of the planner's bookkeeping
    FlopsReport r = flops_report(p.dlcm.model, base.train.seq_len);
    EXPECT_EQ(p.dlcm.model.arch, "dlcm");
    EXPECT_FLOAT_EQ(p.dlcm.model.target_R, float(R));
    EXPECT_LE(std::fabs(r.total() / Fb - 1), 0.05);
    EXPECT_LE(std::fabs(r.backbone_param_share() - P), o.p_tol);
    EXPECT_EQ(p.dlcm.model.d_token, base.model.d_token);  // the baseline's width is preferred
    EXPECT_EQ(p.dlcm.model.d_concept % base.model.head_dim, 0);
    EXPECT_NO_THROW(validate(p.dlcm, "plan"));
    EXPECT_NO_THROW(make_model(base.model));  // sanity: the baseline itself builds
  }
  // The token stacks' depths are searched too (not left at the config's default of 2): with
  // a small backbone share and short concepts they carry the FLOPs.
  {
    PlanOptions o;
    o.P = 0.1;
    o.R = 1.5;
    const PlanResult p = plan_match(base, o, "base.json");
    const FlopsReport r = flops_report(p.dlcm.model, base.train.seq_len);
    EXPECT_LE(std::fabs(r.total() / Fb - 1), 0.05);
    EXPECT_LE(std::fabs(r.backbone_param_share() - o.P), o.p_tol);
    EXPECT_GT(p.dlcm.model.enc_layers, 2);
    EXPECT_GT(p.dlcm.model.dec_layers, 2);
  }
  // A fixed concept width is honoured.
  PlanOptions o;
  o.d_concept = 384;
  o.P = 0.6;
  o.R = 4;
  o.p_tol = 0.05;
  PlanResult p = plan_match(base, o, "base.json");
  EXPECT_EQ(p.dlcm.model.d_concept, 384);
  EXPECT_LE(std::fabs(p.flops_ratio - 1), 0.05);
}

TEST(Plan, InfeasibleInputsGiveClearErrors) {
  Config base = small_baseline();
  base.model.n_layers = 1;  // one block: two token blocks + cross-attention cannot fit
  PlanOptions o;
  o.d_token = base.model.d_token;
  o.P = 0.5;
  o.R = 4;
  try {
    plan_match(base, o, "one_layer.json");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("no dlcm shape matches"), std::string::npos) << m;
    EXPECT_NE(m.find("one_layer.json"), std::string::npos) << m;
    EXPECT_NE(m.find("closest"), std::string::npos) << m;
  }
  Config b2 = small_baseline();
  o = PlanOptions{};
  o.P = 1.5;
  EXPECT_THROW(plan_match(b2, o, "x"), Error);
  o.P = 0.5;
  o.R = 1;
  EXPECT_THROW(plan_match(b2, o, "x"), Error);
  o.R = 4;
  o.d_concept = 100;  // not a multiple of head_dim
  EXPECT_THROW(plan_match(b2, o, "x"), Error);
  Config d = small_baseline();
  d.model.arch = "dlcm";
  EXPECT_THROW(plan_match(d, PlanOptions{}, "x"), Error);
}
