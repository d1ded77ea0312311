// The config key table (models/config.h): every key reads, writes and overrides through one
// row; checkpoints' config.json is unchanged; every numeric key's range is enforced; sizes and
// nesting are bounded before anything is allocated or printed.
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <cstring>
#include <limits>
#include <random>

#include "core/json_util.h"
#include "core/params.h"
#include "model_fixtures.h"
#include "models/model.h"
#include "testing.h"

using namespace dlcm;
using nlohmann::json;

namespace {

// The message of the Error f throws ("" and a test failure when it does not throw).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an Error";
  return "";
}

void expect_has(const std::string& msg, const std::string& part) {
  EXPECT_NE(msg.find(part), std::string::npos) << "lacks '" << part << "': " << msg;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Every key set away from its default (and valid).
Config all_changed() {
  Config c;
  ModelConfig& m = c.model;
  TrainConfig& t = c.train;
  m.arch = "dlcm"; m.vocab_size = 1000; m.d_token = 96; m.n_heads = 6; m.n_kv_heads = 3;
  m.head_dim = 16; m.d_ff = 200; m.n_layers = 3; m.enc_layers = 1; m.dec_layers = 0;
  m.d_concept = 80; m.bb_layers = 5; m.bb_heads = 5; m.bb_kv_heads = 1; m.bb_d_ff = 100;
  m.x_heads = 2; m.x_kv_heads = 1; m.x_d_ff = 60; m.d_scan = 32; m.router.kind = "raw";
  m.router.alpha = 0.3f; m.router.tau = 0.4f; m.router.smooth_grad = true; m.target_R = 3.5f;
  m.aux_weight = 0.07f; m.xattn_impl = "replicate"; m.qk_norm = true; m.rope_theta = 500000.f;
  m.norm_eps = 1e-6f; m.logit_mult = 0.3f; m.max_seq_len = 1024; m.bos_id = 5; m.eos_id = 6;
  m.pad_id = 7; m.init_std = 0.01f; m.mup.enabled = true; m.mup.d_base = 32;
  m.mup.sigma_base = 0.03f; m.mup.lr_mult_token = 1.5f; m.mup.lr_mult_concept = 2.5f;
  m.mup.lr_mult_other = 0.25f;
  t.seq_len = 128; t.batch_size = 3; t.grad_accum = 2; t.steps = 77; t.schedule = "wsd";
  t.lr = 1e-4f; t.min_lr_ratio = 0.05f; t.warmup_steps = 9; t.wsd_decay_frac = 0.3f;
  t.beta1 = 0.8f; t.beta2 = 0.99f; t.eps = 1e-7f; t.weight_decay = 0.01f; t.grad_clip = 0.5f;
  t.seed = 18446744073709551615ull; t.log_every = 3; t.eval_every = 11; t.eval_batches = 4;
  t.ckpt_every = 13; t.threads = 2; t.allreduce_bucket_mb = 2.5f; t.allreduce_overlap = false;
  t.precision = "bf16";
  m.enc_window = 7; m.dec_window = 9;
  m.concept_repr = "first"; m.concept_visibility = "inclusive"; m.concept_path = false;
  m.xattn_rope = true;
  m.baseline_extras = true; m.n_layers_pre = 1; m.router.stride = 5; m.aux_kind = "sequence";
  m.smoother = false;
  return c;
}

// config_to_json(...).dump() of Config{} and all_changed() as written by the code before the
// key table (commit f5f2677), plus the keys added since (enc_window, dec_window, concept_*, and
// the controls baseline_extras, n_layers_pre, router.stride, aux_kind, smoother): checkpoints
// depend on these keys and values.
const char* kOldDefaults =
    R"({"arch":"baseline","aux_kind":"global","aux_weight":0.029999999329447746,"baseline_extras":false,"bb_d_ff":1152,"bb_heads":6,"bb_kv_heads":6,"bb_layers":4,"bos_id":1,"concept_path":true,"concept_repr":"mean","concept_visibility":"shifted","d_concept":384,"d_ff":768,"d_scan":0,"d_token":256,"dec_layers":2,"dec_window":0,"enc_layers":2,"enc_window":0,"eos_id":2,"head_dim":64,"init_std":0.019999999552965164,"logit_mult":1.0,"max_seq_len":512,"mup":{"d_base":64,"enabled":false,"lr_mult_concept":1.0,"lr_mult_other":1.0,"lr_mult_token":1.0,"sigma_base":0.019999999552965164},"n_heads":4,"n_kv_heads":4,"n_layers":4,"n_layers_pre":0,"norm_eps":9.999999747378752e-06,"pad_id":0,"qk_norm":false,"rope_theta":10000.0,"router":{"alpha":0.10000000149011612,"kind":"projected","smooth_grad":false,"stride":4,"tau":0.5},"smoother":true,"target_R":4.0,"train":{"allreduce_bucket_mb":8.0,"allreduce_overlap":true,"batch_size":8,"beta1":0.8999999761581421,"beta2":0.949999988079071,"ckpt_every":500,"eps":9.99999993922529e-09,"eval_batches":16,"eval_every":200,"grad_accum":1,"grad_clip":1.0,"log_every":10,"lr":0.003000000026077032,"min_lr_ratio":0.10000000149011612,"precision":"fp32","schedule":"cosine","seed":1234,"seq_len":256,"steps":1000,"threads":0,"warmup_steps":50,"weight_decay":0.10000000149011612,"wsd_decay_frac":0.20000000298023224},"vocab_size":4096,"x_d_ff":768,"x_heads":4,"x_kv_heads":4,"xattn_impl":"compact"})";
const char* kOldChanged =
    R"({"arch":"dlcm","aux_kind":"sequence","aux_weight":0.07000000029802322,"baseline_extras":true,"bb_d_ff":100,"bb_heads":5,"bb_kv_heads":1,"bb_layers":5,"bos_id":5,"concept_path":false,"concept_repr":"first","concept_visibility":"inclusive","d_concept":80,"d_ff":200,"d_scan":32,"d_token":96,"dec_layers":0,"dec_window":9,"enc_layers":1,"enc_window":7,"eos_id":6,"head_dim":16,"init_std":0.009999999776482582,"logit_mult":0.30000001192092896,"max_seq_len":1024,"mup":{"d_base":32,"enabled":true,"lr_mult_concept":2.5,"lr_mult_other":0.25,"lr_mult_token":1.5,"sigma_base":0.029999999329447746},"n_heads":6,"n_kv_heads":3,"n_layers":3,"n_layers_pre":1,"norm_eps":9.999999974752427e-07,"pad_id":7,"qk_norm":true,"rope_theta":500000.0,"router":{"alpha":0.30000001192092896,"kind":"raw","smooth_grad":true,"stride":5,"tau":0.4000000059604645},"smoother":false,"target_R":3.5,"train":{"allreduce_bucket_mb":2.5,"allreduce_overlap":false,"batch_size":3,"beta1":0.800000011920929,"beta2":0.9900000095367432,"ckpt_every":13,"eps":1.0000000116860974e-07,"eval_batches":4,"eval_every":11,"grad_accum":2,"grad_clip":0.5,"log_every":3,"lr":9.999999747378752e-05,"min_lr_ratio":0.05000000074505806,"precision":"bf16","schedule":"wsd","seed":18446744073709551615,"seq_len":128,"steps":77,"threads":2,"warmup_steps":9,"weight_decay":0.009999999776482582,"wsd_decay_frac":0.30000001192092896},"vocab_size":1000,"x_d_ff":60,"x_heads":2,"x_kv_heads":1,"xattn_impl":"replicate"})";

// Keys added after commit f5f2677: old checkpoints lack them and load with their defaults.
json without_new_keys(json j) {
  for (const char* k : {"on_nonfinite", "max_nonfinite_skips"}) j["train"].erase(k);
  j.erase("xattn_rope");
  return j;
}

// The value of `path` ("router.alpha") inside j.
const json& at_path(const json& j, const std::string& path) {
  const json* t = &j;
  for (size_t a = 0;;) {
    size_t dot = path.find('.', a);
    t = &t->at(path.substr(a, dot == std::string::npos ? dot : dot - a));
    if (dot == std::string::npos) return *t;
    a = dot + 1;
  }
}
json& at_path(json& j, const std::string& path) {
  return const_cast<json&>(at_path(static_cast<const json&>(j), path));
}

// The old writer's JSON with each float printed as the writer now prints it: the shortest text
// of the same float (0.029999999329447746 -> 0.03).
json shortest_floats(json j) {
  if (j.is_object() || j.is_array())
    for (auto& v : j) v = shortest_floats(v);
  else if (j.is_number_float())
    j = std::stod(float_text(float(j.get<double>())));
  return j;
}

bool is_int(const ConfigField& f) {
  return std::holds_alternative<i64*>(f) || std::holds_alternative<i32*>(f);
}

}  // namespace

// The same keys and values as the old writer; floats now as their shortest text.
TEST(ConfigKeys, JsonIdenticalToTheOldWriter) {
  EXPECT_EQ(without_new_keys(config_to_json(Config{})).dump(), shortest_floats(json::parse(kOldDefaults)).dump());
  EXPECT_EQ(without_new_keys(config_to_json(all_changed())).dump(), shortest_floats(json::parse(kOldChanged)).dump());
  // Every key of the table is in the JSON, and the JSON has no other leaf.
  const json j = config_to_json(all_changed());
  size_t leaves = 0;
  std::function<void(const json&)> count = [&](const json& v) {
    for (auto& x : v) x.is_object() ? count(x) : void(++leaves);
  };
  count(j);
  EXPECT_EQ(leaves, config_keys().size());
  for (const ConfigKey& k : config_keys()) EXPECT_NO_THROW(at_path(j, k.path)) << k.path;
}

TEST(ConfigKeys, OldCheckpointConfigsLoad) {
  for (const char* text : {kOldDefaults, kOldChanged}) {
    const json old = json::parse(text);
    const Config c = config_from_json(old, "old/config.json");
    json expect = shortest_floats(old);
    expect["logit_mult"] = std::stod(float_text(c.model.logit_mult));  // forced to 1/s_token under µP
    EXPECT_EQ(without_new_keys(config_to_json(c)), expect);
  }
  EXPECT_FLOAT_EQ(config_from_json(json::parse(kOldChanged), "t").model.logit_mult, 1.0f / 3);
}

// Every key alone: some non-default value is accepted, lands in its field and writes back.
TEST(ConfigKeys, EveryKeyRoundTrips) {
  Config base = test::tiny_dlcm();
  base.model.vocab_size = 100;
  // "first" so that concept_visibility = "inclusive" is valid on its own (not with "mean").
  base.model.concept_repr = "first";
  const json j0 = config_to_json(base);
  for (const ConfigKey& k : config_keys()) {
    Config probe;
    const ConfigField f = k.field(probe);
    const json def = at_path(j0, k.path);
    std::vector<json> cands;
    if (std::holds_alternative<std::string*>(f)) {
      std::string all = k.choices;
      for (size_t a = 0, b; a <= all.size(); a = b + 1) {
        b = all.find('|', a);
        if (b == std::string::npos) b = all.size();
        cands.push_back(all.substr(a, b - a));
      }
    } else if (std::holds_alternative<bool*>(f)) {
      cands = {!def.get<bool>()};
    } else if (std::holds_alternative<uint64_t*>(f)) {
      cands = {json(uint64_t(987654321987654321ull))};
    } else if (is_int(f)) {
      const i64 d = def.get<i64>();
      for (i64 v : {d + 2, d - 2, d + 1, d - 1, d * 2, i64(k.min)})
        if (v >= k.min && v <= k.max) cands.push_back(v);
    } else {
      const double d = def.get<double>();
      for (double v : {d * 0.5, d * 0.9, (d + k.max) / 2, (d + k.min) / 2})
        if (v > k.min && v < k.max) cands.push_back(json(std::stod(float_text(float(v)))));
    }
    bool done = false;
    for (const json& v : cands) {
      if (v == def) continue;
      json j = j0;
      at_path(j, k.path) = v;
      Config c;
      try {
        c = config_from_json(j, "t");
      } catch (const Error&) {
        continue;  // another key's rule (heads dividing, ...): try the next value
      }
      const json back = config_to_json(c);
      if (std::string(k.path) != "logit_mult" || !c.model.mup.enabled) {
        EXPECT_EQ(at_path(back, k.path), v) << k.path;
      }
      EXPECT_EQ(config_to_json(config_from_json(back, "t")), back) << k.path;
      done = true;
      break;
    }
    EXPECT_TRUE(done) << k.path << ": no non-default value was accepted";
  }
}

TEST(ConfigKeys, EveryNumericKeyHasItsRangeEnforced) {
  const json j0 = config_to_json(test::tiny_dlcm());
  for (const ConfigKey& k : config_keys()) {
    Config probe;
    const ConfigField f = k.field(probe);
    if (std::holds_alternative<bool*>(f) || std::holds_alternative<std::string*>(f)) continue;
    const bool integer = is_int(f) || std::holds_alternative<uint64_t*>(f);
    // above the maximum
    json j = j0;
    at_path(j, k.path) = std::holds_alternative<uint64_t*>(f) ? json(1e20)
                         : integer ? json(i64(k.max) + 1) : json(k.max_open ? k.max : k.max * 2);
    std::string e = error_of([&] { config_from_json(j, "cfg.json"); });
    expect_has(e, "cfg.json");
    expect_has(e, std::string("'") + k.path + "'");
    EXPECT_TRUE(e.find("exceeds the maximum") != std::string::npos ||
                e.find("must be less than") != std::string::npos) << e;
    // below the minimum
    j = j0;
    at_path(j, k.path) = integer ? json(i64(k.min) - 1)
                                 : json(k.min_open ? k.min : k.min - 1 - std::abs(k.min));
    e = error_of([&] { config_from_json(j, "cfg.json"); });
    expect_has(e, std::string("'") + k.path + "'");
    EXPECT_TRUE(e.find("below the minimum") != std::string::npos ||
                e.find("must be positive") != std::string::npos ||
                e.find("must be greater than") != std::string::npos) << e;
    // a huge integer, past i64 for the integer keys
    if (std::holds_alternative<uint64_t*>(f)) continue;
    j = j0;
    at_path(j, k.path) = json(uint64_t(1) << 63);
    expect_has(error_of([&] { config_from_json(j, "cfg.json"); }), k.path);
  }
  json j = json::object();
  j["d_token"] = i64(1) << 62;
  EXPECT_EQ(error_of([&] { config_from_json(j, "cfg.json"); }),
            "cfg.json: 'd_token' = 4611686018427387904 exceeds the maximum 65536");
}

TEST(ConfigKeys, NonFiniteFloatsAndNonsenseRefused) {
  for (const ConfigKey& k : config_keys()) {
    Config c = test::tiny_baseline();
    const ConfigField f = k.field(c);
    if (auto p = std::get_if<float*>(&f)) {
      for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity()}) {
        **p = bad;
        const std::string e = error_of([&] { validate(c, "cfg.json"); });
        expect_has(e, std::string("'") + k.path + "'");
        expect_has(e, "finite");
      }
    }
  }
  struct Case {
    const char* set;
    const char* key;
  } cases[] = {{"warmup_steps=-1", "train.warmup_steps"}, {"min_lr_ratio=1.5", "train.min_lr_ratio"},
               {"min_lr_ratio=-0.1", "train.min_lr_ratio"}, {"grad_clip=-1", "train.grad_clip"},
               {"eps=0", "train.eps"}, {"beta1=1", "train.beta1"}, {"beta2=-0.1", "train.beta2"},
               {"lr=0", "train.lr"}, {"lr=-1e-3", "train.lr"}, {"lr=1e300", "train.lr"},
               {"norm_eps=0", "norm_eps"}, {"router.tau=2", "router.tau"}};
  for (const Case& c : cases) {
    json j = json::object();
    apply_overrides(j, {c.set});
    expect_has(error_of([&] { config_from_json(j, "config"); }), std::string("'") + c.key + "'");
  }
}

TEST(ConfigKeys, ConsistencyRules) {
  auto err = [](std::vector<std::string> sets) {
    json j = json::object();
    apply_overrides(j, sets);
    return error_of([&] { config_from_json(j, "config"); });
  };
  expect_has(err({"n_heads=4", "n_kv_heads=3"}), "must divide 'n_heads'");
  expect_has(err({"arch=dlcm", "bb_heads=6", "bb_kv_heads=4"}), "'bb_kv_heads'");
  expect_has(err({"head_dim=7"}), "even");
  expect_has(err({"n_heads=1024", "n_kv_heads=1", "head_dim=128"}), "attention width");
  expect_has(err({"seq_len=600"}), "exceeds 'max_seq_len'");
  expect_has(err({"max_seq_len=1048576", "seq_len=1048576", "batch_size=64"}), "per micro-batch");
  expect_has(err({"bos_id=4096"}), "outside the vocabulary");
  expect_has(err({"vocab_size=16777216", "d_token=65536"}), "parameters, over the limit");
  expect_has(err({"max_seq_len=1048576", "seq_len=1048576", "batch_size=16", "d_token=8192",
                  "n_layers=64"}),
             "activation floats");
  // the largest vocabulary with the default batch is fine: logits are computed in chunks
  EXPECT_NO_THROW(config_from_json(json{{"vocab_size", 16777216}}, "config"));
  expect_has(err({"precision=fp16"}), "'train.precision' must be \"fp32\" or \"bf16\"");
  expect_has(err({"schedule=linear"}), "\"cosine\", \"wsd\" or \"constant\"");
}

TEST(ConfigKeys, OverridesAndErrors) {
  json j = json::object();
  apply_overrides(j, {"lr=1e-3", "train.batch_size=4", "router.alpha=0.7", "arch=dlcm",
                      "mup={\"enabled\": true}", "seed=18446744073709551615"});
  Config c = config_from_json(j, "config");
  EXPECT_FLOAT_EQ(c.train.lr, 1e-3f);
  EXPECT_EQ(c.train.batch_size, 4);
  EXPECT_FLOAT_EQ(c.model.router.alpha, 0.7f);
  EXPECT_EQ(c.model.arch, "dlcm");
  EXPECT_TRUE(c.model.mup.enabled);
  EXPECT_EQ(c.train.seed, 18446744073709551615ull);
  expect_has(error_of([&] { apply_overrides(j, {"lrr=1"}); }), "unknown config key 'lrr'");
  expect_has(error_of([&] { apply_overrides(j, {"router.x=1"}); }), "unknown config key 'router.x'");
  expect_has(error_of([&] { apply_overrides(j, {"d_token=abc"}); }), "--set 'd_token=abc'");
  json bad = json::object();
  apply_overrides(bad, {"d_token=\"64\""});
  expect_has(error_of([&] { config_from_json(bad, "config"); }), "must be a number");
  expect_has(error_of([&] { config_from_json(json{{"router", 3}}, "f.json"); }),
             "'router' must be a JSON object");
  expect_has(error_of([&] { config_from_json(json::array(), "f.json"); }), "top level");
}

TEST(ConfigKeys, DeepJsonRefusedQuickly) {
  const auto t0 = std::chrono::steady_clock::now();
  const int depth = 100000;
  const std::string arrays = std::string(depth, '[') + std::string(depth, ']');
  std::string objects;
  for (int i = 0; i < depth; ++i) objects += "{\"a\":";
  objects += "1" + std::string(depth, '}');
  test::TempDir td;
  for (const std::string& deep : {arrays, objects}) {
    const std::string f = td.path + "/deep.json";
    std::ofstream(f) << "{\"d_token\": " << deep << "}";
    std::string e = error_of([&] { load_config(f); });
    expect_has(e, f);
    expect_has(e, "nested deeper than 64 levels");
    // as a --set value, of a number key and of a group
    json j = json::object();
    e = error_of([&] { apply_overrides(j, {"d_token=" + deep}); });
    expect_has(e, "--set 'd_token=");
    expect_has(e, "nested deeper");
    expect_has(error_of([&] { apply_overrides(j, {"router=" + deep}); }), "nested deeper");
    // a string key takes the text as it is; the error shows an excerpt only
    apply_overrides(j, {"arch=" + deep});
    e = error_of([&] { config_from_json(j, "config"); });
    expect_has(e, "'arch' must be");
    EXPECT_LT(e.size(), 400u);
  }
  // A deep value built in memory (not parsed) is reported without a full dump.
  json deep = 1;
  for (int i = 0; i < depth; ++i) deep = json::array({std::move(deep)});
  json holder = json::object();
  holder["d_token"] = std::move(deep);  // moved, not copied: a copy recurses per level
  const std::string e = error_of([&] { config_from_json(holder, "mem"); });
  expect_has(e, "'d_token' must be a number");
  EXPECT_LT(e.size(), 400u);
  EXPECT_LT(seconds_since(t0), 5.0);
}

TEST(ConfigKeys, HugeModelsRefusedBeforeAllocation) {
  auto t0 = std::chrono::steady_clock::now();
  json j = json::object();
  apply_overrides(j, {"arch=dlcm", "bb_layers=1000000000"});
  expect_has(error_of([&] { config_from_json(j, "config"); }),
             "'bb_layers' = 1000000000 exceeds the maximum 1024");
  // Built directly (no validate): make_model refuses before registering a parameter.
  ModelConfig m = test::tiny_dlcm().model;
  m.bb_layers = 1000000000;
  m.d_concept = 65536;
  expect_has(error_of([&] { make_model(m); }), "parameters, over the limit");
  m = test::tiny_baseline().model;
  m.d_token = i64(1) << 40;
  m.vocab_size = i64(1) << 40;
  expect_has(error_of([&] { make_model(m); }), "overflows 64-bit");
  EXPECT_LT(seconds_since(t0), 1.0);
}

// The estimate counts exactly what the models register.
TEST(ConfigKeys, ParamCountMatchesTheModels) {
  std::vector<Config> cs = {test::tiny_baseline(), test::tiny_baseline(false, 2),
                            test::tiny_dlcm(), test::tiny_dlcm("raw"), test::tiny_dlcm("fixed"),
                            test::tiny_dlcm("word"), all_changed()};
  cs.back().model.mup.enabled = false;
  // the baseline control with the DLCM's token-path extras (default and explicit split)
  for (i64 pre : {0, 1}) {
    Config b = test::tiny_baseline();
    b.model.n_layers = 3;
    b.model.baseline_extras = true;
    b.model.n_layers_pre = pre;
    b.model.x_d_ff = 20;
    cs.push_back(b);
  }
  for (const Config& c : cs) {
    auto model = make_model(c.model);
    i64 n = 0;
    for (const Param& p : model->params().params()) n += p.numel;
    EXPECT_EQ(model_param_count(c.model, "t"), n) << config_to_json(c).dump();
    EXPECT_GT(config_size(c, "t").activations,
              c.train.batch_size * c.train.seq_len * 8 * c.model.d_token + 512 * c.model.vocab_size);
  }
}

TEST(ConfigKeys, ParamRegistrationIsLinear) {
  const auto t0 = std::chrono::steady_clock::now();
  ParamStore ps;
  const int n = 200000;  // a quadratic name check would compare ~2e10 strings
  for (int i = 0; i < n; ++i) ps.add("layers." + std::to_string(i) + ".w", {1}, ParamGroup::Other, false);
  EXPECT_EQ(ps.find("layers.123456.w")->offset, 123456 * 16);
  EXPECT_EQ(ps.find("nope"), nullptr);
  EXPECT_THROW(ps.add("layers.7.w", {1}, ParamGroup::Other, false), Error);
  EXPECT_LT(seconds_since(t0), 2.0);
}

TEST(JsonUtil, BoundedParseAndExcerpt) {
  EXPECT_EQ(parse_json_bounded("[[1]]", "s", {2, 100}), json::parse("[[1]]"));
  expect_has(error_of([&] { parse_json_bounded("[[[1]]]", "src.json", {2, 100}); }),
             "src.json: JSON nested deeper than 2 levels (at byte 2)");
  // brackets inside strings do not count
  EXPECT_EQ(parse_json_bounded(R"(["[[[\"{{{"])", "s", {1, 100})[0], "[[[\"{{{");
  expect_has(error_of([&] { parse_json_bounded("[1,2,3]", "s", {64, 4}); }), "exceeds the limit");
  expect_has(error_of([&] { parse_json_bounded("{", "s"); }), "s: invalid JSON");
  EXPECT_EQ(json_excerpt(json::parse(R"({"a":[1,2],"b":"x"})")), R"({"a":[1,2],"b":"x"})");
  // exactly max_chars long: whole, no "..."; one more character: cut
  EXPECT_EQ(json_excerpt(json::parse(R"({"a":[1,2],"b":"x"})"), 19), R"({"a":[1,2],"b":"x"})");
  EXPECT_EQ(json_excerpt(json::parse(R"({"a":[1,2],"b":"x"})"), 18), R"({"a":[1,2],"b":"x")" "...");
  const std::string cut = json_excerpt(json(std::string(100000, 'z')), 20);
  EXPECT_LE(cut.size(), 23u);
  EXPECT_EQ(cut.substr(cut.size() - 3), "...");
  json deep = 1;
  for (int i = 0; i < 100000; ++i) deep = json::array({std::move(deep)});
  EXPECT_EQ(json_excerpt(deep, 10), "[[[[[[[[[[...");
  std::vector<int> big(1000000, 7);
  EXPECT_LE(json_excerpt(json(big), 50).size(), 53u);
}

// docs/config.md carries the generated table; regenerate with `dlcm config --keys --markdown`.
TEST(ConfigKeys, DocsTableIsCurrent) {
  std::ifstream f(std::string(DLCM_SOURCE_DIR) + "/docs/config.md");
  ASSERT_TRUE(f) << "docs/config.md missing";
  const std::string doc((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_NE(doc.find(config_keys_listing(true)), std::string::npos)
      << "docs/config.md is out of date: paste the output of `dlcm config --keys --markdown`";
}

TEST(ConfigKeys, CliListsKeysAndResolvesConfigs) {
  test::CmdResult r = test::run_dlcm("config --keys");
  EXPECT_EQ(r.rc, 0) << r.out;
  expect_has(r.out, "train.lr");
  expect_has(r.out, "(0, 10]");
  r = test::run_dlcm("config --set d_token=128 --set lr=1e-3");
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(json::parse(r.out)["d_token"], 128);
  r = test::run_dlcm("config --set bb_layers=1000000000");
  EXPECT_NE(r.rc, 0);
  expect_has(r.out, "'bb_layers' = 1000000000 exceeds the maximum 1024");
}

// Floats are written as the shortest text that reads back as the same float.
TEST(ConfigKeys, FloatsAreWrittenAsTheirShortestText) {
  Config c;
  json j = config_to_json(c);
  EXPECT_EQ(j["aux_weight"].dump(), "0.03");
  EXPECT_EQ(j["train"]["lr"].dump(), "0.003");
  EXPECT_EQ(j["norm_eps"].dump(), "1e-05");
  EXPECT_EQ(j.dump().find("0.0299999"), std::string::npos) << j.dump();
  // Every float key of a written config reads back bit for bit, on random values too.
  std::mt19937 rng(7);
  for (int i = 0; i < 20000; ++i) {
    float f;
    const uint32_t bits = rng();
    std::memcpy(&f, &bits, 4);
    if (!std::isfinite(f)) continue;
    const std::string t = float_text(f);
    EXPECT_EQ(float(std::stod(t)), f) << t;
    EXPECT_EQ(float(json::parse(json(std::stod(t)).dump()).get<double>()), f) << t;
  }
  c.model.router.alpha = 0.7f;
  c.train.lr = 1e-3f;
  c.train.wsd_decay_frac = 0.1f;
  const std::string text = config_to_json(c).dump();
  for (const char* want : {"\"alpha\":0.7", "\"lr\":0.001", "\"wsd_decay_frac\":0.1"})
    expect_has(text, want);
  EXPECT_EQ(config_to_json(config_from_json(config_to_json(c), "c")).dump(), text);
  test::CmdResult r = test::run_dlcm("config --set aux_weight=0.03");
  expect_has(r.out, "\"aux_weight\": 0.03,");
}

// The keys that may change on --resume are flagged in the one key table, and the listing
// (docs/config.md) shows them.
TEST(ConfigKeys, ResumableKeysAreFlaggedInTheTable) {
  for (const char* k : {"train.steps", "train.eval_every", "train.ckpt_every", "train.log_every",
                        "train.lr", "train.on_nonfinite", "train.threads"})
    EXPECT_TRUE(find_config_key(k)->on_resume) << k;
  for (const char* k : {"d_token", "arch", "router.alpha", "train.seq_len", "train.batch_size",
                        "train.seed", "train.schedule", "max_seq_len"})
    EXPECT_FALSE(find_config_key(k)->on_resume) << k;
  expect_has(config_keys_listing(true), "| `train.steps` | int | 1000 | [0, 1099511627776] | may change |");
  expect_has(config_keys_listing(true), "| `d_token` | int | 256 | [1, 65536] |  |");
  EXPECT_EQ(override_key("lr=1e-3"), find_config_key("train.lr"));
  EXPECT_EQ(override_key("d_ff=3"), find_config_key("d_ff"));
  EXPECT_EQ(override_key("nope=3"), nullptr);
}
