// Interop with Hugging Face transformers (docs/interop.md): the plain LLaMA layout of a
// baseline, 16-bit safetensors, HF folder export/import and train --init-from. The checks
// against transformers itself are tests/interop/hf_llama_check.py (CTest interop_hf_llama).
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include "core/half.h"
#include "core/safetensors.h"
#include "model_fixtures.h"
#include "core/json_util.h"
#include "models/hf_llama.h"
#include "models/llama_layout.h"
#include "testing.h"
#include "tools/commands.h"

using namespace dlcm;
using namespace dlcm::test;
namespace fs = std::filesystem;

namespace {

using test::error_of;

Config plain_baseline(float logit_mult = 1.0f) {
  Config c = tiny_baseline(/*qk_norm=*/false, /*kv_heads=*/1);
  c.model.logit_mult = logit_mult;
  return c;
}

}  // namespace

TEST(Half, Bf16AndF16RoundToNearestEven) {
  EXPECT_EQ(f32_to_bf16_bits(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16_bits(-2.0f), 0xc000);
  // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
  EXPECT_EQ(f32_to_bf16_bits(1.0f + 1.0f / 256), 0x3f80);
  EXPECT_EQ(f32_to_bf16_bits(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_bits_to_f32(f32_to_bf16_bits(std::nanf("")))));
  EXPECT_EQ(f32_to_f16_bits(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16_bits(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_f16_bits(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16_bits(65520.0f), 0x7c00);  // the tie above the largest finite: infinity
  EXPECT_EQ(f32_to_f16_bits(1.0f + 1.0f / 2048), 0x3c00);  // tie to even
  EXPECT_EQ(f32_to_f16_bits(1.0f + 3.0f / 2048), 0x3c02);
  EXPECT_EQ(f32_to_f16_bits(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(f32_to_f16_bits(std::ldexp(1.0f, -25)), 0x0000);  // tie to even (zero)
  EXPECT_EQ(f32_to_f16_bits(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulp: tie to even (2)
  // Every F16 value converts to float32 and back unchanged.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;  // NaNs
    ASSERT_EQ(f32_to_f16_bits(f16_bits_to_f32(uint16_t(h))), h) << std::hex << h;
  }
  EXPECT_EQ(f16_bits_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_bits_to_f32(0x3555), 0.333251953125f);
}

TEST(Half, SafetensorsWritesAndReads16BitFloats) {
  const std::string dir = ::testing::TempDir() + "/half_st";
  fs::create_directories(dir);
  std::vector<float> x = {0.1f, -3.5f, 1e-6f, 65000.0f, 0.0f, 1.0f / 3};
  const std::string p = dir + "/h.safetensors";
  TensorToWrite a{"a", {2, 3}, x.data(), nullptr, "BF16"};
  TensorToWrite b{"b", {6}, x.data(), nullptr, "F16"};
  TensorToWrite c{"c", {6}, x.data(), nullptr};
  write_safetensors(p, {a, b, c});
  SafeTensorsFile f(p);
  EXPECT_EQ(f.entries().at("a").dtype, "BF16");
  EXPECT_EQ(f.entries().at("b").dtype, "F16");
  EXPECT_EQ(f.entries().at("c").dtype, "F32");
  auto ra = f.read_f32("a"), rb = f.read_f32("b"), rc = f.read_f32("c");
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(ra[i], bf16_bits_to_f32(f32_to_bf16_bits(x[i])));
    EXPECT_EQ(rb[i], f16_bits_to_f32(f32_to_f16_bits(x[i])));
    EXPECT_EQ(rc[i], x[i]);
  }
  std::vector<float> big = {1.0f, 70000.0f};
  const std::string msg = error_of([&] {
    write_safetensors(dir + "/big.safetensors", {{"w", {2}, big.data(), nullptr, "F16"}});
  });
  EXPECT_NE(msg.find("'w' element 1 = 70000 is beyond the F16 range"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir + "/big.safetensors"));
}

TEST(LlamaLayout, NamesCoverEveryParameterOnce) {
  Config c = plain_baseline();
  auto m = make_initialised_model(c.model, 1);
  auto map = llama_name_map(c.model);
  std::set<std::string> ours, hf;
  for (auto& [o, h] : map) {
    EXPECT_TRUE(ours.insert(o).second) << o;
    EXPECT_TRUE(hf.insert(h).second) << h;
  }
  std::set<std::string> params;
  for (const Param& p : m->params().params()) params.insert(p.name);
  EXPECT_EQ(ours, params);
  EXPECT_TRUE(hf.count("model.layers.1.self_attn.k_proj.weight"));
  EXPECT_TRUE(hf.count("model.layers.0.mlp.gate_proj.weight"));
  EXPECT_EQ(map.front().second, "model.embed_tokens.weight");
  EXPECT_EQ(map.back().second, "lm_head.weight");
}

TEST(LlamaLayout, FoldsLogitMultIntoLmHeadAndKeepsTheRest) {
  Config c = plain_baseline(0.25f);
  auto m = make_initialised_model(c.model, 2);
  auto ts = to_llama_layout(c.model, m->params(), "cfg");
  const Param* head = m->params().find("lm_head.weight");
  for (const NamedTensor& t : ts) {
    if (t.name == "lm_head.weight") {
      ASSERT_EQ(t.numel(), head->numel);
      for (i64 i = 0; i < head->numel; ++i) ASSERT_EQ(t.values()[i], head->w[i] * 0.25f);
    } else {
      EXPECT_TRUE(t.owned.empty()) << t.name;  // the parameter itself, no copy
    }
  }
  const NamedTensor& q = ts[2];
  EXPECT_EQ(q.name, "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(q.data, m->params().find("layers.0.attn.wq.weight")->w);
  EXPECT_EQ(q.shape, (std::vector<i64>{c.model.n_heads * c.model.head_dim, c.model.d_token}));
}

TEST(LlamaLayout, RefusesWhatLlamaCannotExpressNamingTheKey) {
  Config q = tiny_baseline(true);
  auto mq = make_initialised_model(q.model, 1);
  EXPECT_NE(error_of([&] { to_llama_layout(q.model, mq->params(), "ck/config.json"); })
                .find("ck/config.json: 'qk_norm' is true"),
            std::string::npos);
  Config x = plain_baseline();
  x.model.baseline_extras = true;
  EXPECT_NE(error_of([&] { check_llama_expressible(x.model, "c"); }).find("'baseline_extras'"),
            std::string::npos);
  Config d = tiny_dlcm();
  EXPECT_NE(error_of([&] { check_llama_expressible(d.model, "c"); }).find("'arch' is \"dlcm\""),
            std::string::npos);
}

TEST(LlamaLayout, BackFromTheLayoutIsBitIdentical) {
  for (float mult : {1.0f, 0.25f, 4.0f}) {
    Config c = plain_baseline(mult);
    auto m = make_initialised_model(c.model, 3);
    auto ts = to_llama_layout(c.model, m->params(), "cfg");
    auto back = make_model(c.model);
    LlamaTensorReader read = [&](const std::string& name, const std::vector<i64>& shape, float* out) {
      for (const NamedTensor& t : ts)
        if (t.name == name) {
          EXPECT_EQ(t.shape, shape);
          std::memcpy(out, t.values(), sizeof(float) * size_t(t.numel()));
          return true;
        }
      return false;
    };
    from_llama_layout(c.model, llama_hparams(c.model), read, back->params(), "cfg");
    for (const Param& p : m->params().params()) {
      const Param* b = back->params().find(p.name);
      ASSERT_EQ(std::memcmp(p.w, b->w, sizeof(float) * size_t(p.numel)), 0) << p.name << " x" << mult;
    }
  }
}

TEST(LlamaLayout, TiedReadsLmHeadFromTheEmbeddingAndNamesMissingTensors) {
  Config c = plain_baseline();
  auto m = make_initialised_model(c.model, 4);
  auto ts = to_llama_layout(c.model, m->params(), "cfg");
  LlamaHParams hp = llama_hparams(c.model);
  hp.tied = true;
  auto back = make_model(c.model);
  std::vector<std::string> asked;
  LlamaTensorReader read = [&](const std::string& name, const std::vector<i64>&, float* out) {
    asked.push_back(name);
    for (const NamedTensor& t : ts)
      if (t.name == name && name != "lm_head.weight") {
        std::memcpy(out, t.values(), sizeof(float) * size_t(t.numel()));
        return true;
      }
    return false;
  };
  from_llama_layout(c.model, hp, read, back->params(), "hf");
  EXPECT_EQ(std::count(asked.begin(), asked.end(), "lm_head.weight"), 0);
  const Param* e = back->params().find("tok_embeddings.weight");
  const Param* h = back->params().find("lm_head.weight");
  EXPECT_EQ(std::memcmp(e->w, h->w, sizeof(float) * size_t(e->numel)), 0);
  hp.tied = false;
  const std::string msg = error_of([&] { from_llama_layout(c.model, hp, read, back->params(), "hf/x"); });
  EXPECT_NE(msg.find("hf/x: missing tensor 'lm_head.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("tie_word_embeddings"), std::string::npos) << msg;
}

TEST(LlamaLayout, QkPermutationInterleavesEachHeadAndInverts) {
  const i64 H = 2, hd = 4, in = 3;
  std::vector<float> w(H * hd * in);
  for (size_t i = 0; i < w.size(); ++i) w[i] = float(i);
  auto p = llama_permute_qk(w.data(), H, hd, in);
  // Head 1, interleaved row 2*1+1 = 3 is rotate-half row half + 1 = 3 of that head.
  for (i64 h = 0; h < H; ++h)
    for (i64 i = 0; i < hd / 2; ++i)
      for (i64 k = 0; k < in; ++k) {
        EXPECT_EQ(p[(h * hd + 2 * i) * in + k], w[(h * hd + i) * in + k]);
        EXPECT_EQ(p[(h * hd + 2 * i + 1) * in + k], w[(h * hd + hd / 2 + i) * in + k]);
      }
  EXPECT_EQ(llama_permute_qk(p.data(), H, hd, in, true), w);
}

// ---- export / import folders ----

namespace {

std::string fresh_dir(const std::string& name) {
  const std::string d = ::testing::TempDir() + "/interop_" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A saved baseline checkpoint with random weights.
std::string saved_checkpoint(const std::string& dir, const Config& c, uint64_t seed) {
  auto m = make_initialised_model(c.model, seed);
  save_model_only(dir, c, m->params());
  return dir;
}

ExportArgs export_args(const std::string& ckpt, const std::string& out) {
  ExportArgs a;
  a.ckpt = ckpt;
  a.out = out;
  return a;
}

ImportArgs import_args(const std::string& in, const std::string& out) {
  ImportArgs a;
  a.in = in;
  a.out = out;
  return a;
}

bool same_bits(const std::string& a, const std::string& b) {
  SafeTensorsFile fa(a), fb(b);
  if (fa.entries().size() != fb.entries().size()) return false;
  for (const auto& [name, e] : fa.entries()) {
    if (!fb.has(name)) return false;
    auto x = fa.read_f32(name), y = fb.read_f32(name);
    if (x.size() != y.size() || std::memcmp(x.data(), y.data(), 4 * x.size()) != 0) return false;
  }
  return true;
}

// Rewrites one key of an HF folder's config.json.
void edit_config(const std::string& dir, const std::string& key, const nlohmann::json& v) {
  nlohmann::json j = read_json_file_bounded(dir + "/config.json");
  j[key] = v;
  std::ofstream(dir + "/config.json") << j.dump(2);
}

// Rewrites a safetensors file with the tensors `keep` accepts, then `extra`.
void rewrite_weights(const std::string& file, const std::function<bool(const std::string&)>& keep,
                     const std::vector<TensorToWrite>& extra = {}) {
  std::vector<std::vector<float>> values;  // alive until written
  std::vector<TensorToWrite> ts;
  {
    SafeTensorsFile f(file);
    values.reserve(f.entries().size());
    for (const auto& [name, e] : f.entries()) {
      if (!keep(name)) continue;
      values.push_back(f.read_f32(name));
      ts.push_back({name, e.shape, values.back().data(), nullptr});
    }
  }
  ts.insert(ts.end(), extra.begin(), extra.end());
  write_safetensors(file, ts, {{"format", "pt"}});
}

}  // namespace

TEST(HfFolders, ExportImportIsBitIdenticalAndShardsAreNamedAsTransformersDoes) {
  const std::string w = fresh_dir("roundtrip");
  for (float mult : {1.0f, 0.25f}) {
    Config c = plain_baseline(mult);
    c.model.n_kv_heads = 1;
    const std::string tag = mult == 1.0f ? "sp" : "mup";
    const std::string ck = saved_checkpoint(w + "/ck_" + tag, c, 11);
    ExportArgs e = export_args(ck, w + "/hf_" + tag);
    e.shard_size = "2KB";  // several shards
    ASSERT_EQ(cmd_export(e), 0);
    EXPECT_TRUE(fs::exists(e.out + "/model.safetensors.index.json"));
    EXPECT_FALSE(fs::exists(e.out + "/model.safetensors"));
    const auto index = read_json_file_bounded(e.out + "/model.safetensors.index.json");
    std::set<std::string> files;
    for (auto& [k, v] : index["weight_map"].items()) files.insert(v.get<std::string>());
    EXPECT_GT(files.size(), 2u);
    char first[64];
    std::snprintf(first, sizeof first, "model-00001-of-%05zu.safetensors", files.size());
    EXPECT_TRUE(files.count(first)) << first;
    const auto hc = read_json_file_bounded(e.out + "/config.json");
    EXPECT_EQ(hc["num_key_value_heads"], 1);
    EXPECT_EQ(hc["rms_norm_eps"].get<double>(), 1e-5);  // the decimal, not float noise
    EXPECT_EQ(hc["tie_word_embeddings"], false);

    ASSERT_EQ(cmd_import(import_args(e.out, w + "/back_" + tag)), 0);
    EXPECT_TRUE(same_bits(ck + "/model.safetensors", w + "/back_" + tag + "/model.safetensors"));
    EXPECT_EQ(read_json_file_bounded(ck + "/config.json"),
              read_json_file_bounded(w + "/back_" + tag + "/config.json"));
  }
}

// save_pretrained's rule: a shard takes tensors in order while they fit (a sum equal to the
// limit fits); the next one starts a new file.
TEST(HfFolders, ShardsAreCutWhereTransformersCutsThem) {
  const std::string w = fresh_dir("shard_cut");
  const Config c = plain_baseline();
  const std::string ck = saved_checkpoint(w + "/ck", c, 12);
  auto m = make_initialised_model(c.model, 12);
  const std::vector<NamedTensor> ts = to_llama_layout(c.model, m->params(), "test");
  ASSERT_GT(ts.size(), 3u);
  const i64 two = 4 * (ts[0].numel() + ts[1].numel());  // exactly the first two tensors
  ASSERT_GE(two, 1000) << "--shard-size must be at least 1KB";
  ExportArgs e = export_args(ck, w + "/hf");
  e.shard_size = std::to_string(two);
  ASSERT_EQ(cmd_export(e), 0);
  const auto map = read_json_file_bounded(e.out + "/model.safetensors.index.json")["weight_map"];
  const std::string first = map[ts[0].name];
  EXPECT_EQ(first.rfind("model-00001-of-", 0), 0u) << first;
  EXPECT_EQ(map[ts[1].name], first) << "a tensor that fills the shard exactly belongs in it";
  EXPECT_NE(map[ts[2].name], first);
}

// A folder whose weights lack tensors: the import names the first six and counts the rest,
// rather than keeping the model's initial values for them.
TEST(HfFolders, ImportNamesMissingTensors) {
  const std::string w = fresh_dir("missing");
  const std::string ck = saved_checkpoint(w + "/ck", plain_baseline(), 13);
  ASSERT_EQ(cmd_export(export_args(ck, w + "/hf")), 0);
  const std::string st = w + "/hf/model.safetensors";
  const size_t total = SafeTensorsFile(st).entries().size();
  rewrite_weights(st, [](const std::string& name) { return name == "model.embed_tokens.weight"; });
  const std::string msg = error_of([&] { cmd_import(import_args(w + "/hf", w + "/out")); });
  const std::string more = " and " + std::to_string(total - 1 - 6) + " more";
  const size_t at = msg.find("missing tensors '"), end = msg.find(more);
  ASSERT_NE(at, std::string::npos) << msg;
  ASSERT_NE(end, std::string::npos) << msg;
  const std::string names = msg.substr(at, end - at);
  EXPECT_EQ(std::count(names.begin(), names.end(), '\''), 12) << "six names: " << names;
  EXPECT_NE(names.find("'model.layers.0.input_layernorm.weight'"), std::string::npos) << names;
  EXPECT_FALSE(fs::exists(w + "/out"));
}

TEST(HfFolders, ExportRefusesWhatItCannotWriteAndLeavesNothing) {
  const std::string w = fresh_dir("export_refuse");
  const std::string qk = saved_checkpoint(w + "/qk", tiny_baseline(true), 1);
  const std::string dl = saved_checkpoint(w + "/dl", tiny_dlcm(), 1);
  std::string msg = error_of([&] { cmd_export(export_args(qk, w + "/x1")); });
  EXPECT_NE(msg.find("'qk_norm' is true"), std::string::npos) << msg;
  ExportArgs dl16 = export_args(dl, w + "/x2");  // a DLCM goes to remote code, f32 only
  dl16.dtype = "bf16";
  msg = error_of([&] { cmd_export(dl16); });
  EXPECT_NE(msg.find("a DLCM exports in f32 only"), std::string::npos) << msg;
  ExportArgs bad = export_args(saved_checkpoint(w + "/ok", plain_baseline(), 1), w + "/x3");
  bad.dtype = "fp8";
  EXPECT_NE(error_of([&] { cmd_export(bad); }).find("--dtype: expected f32, bf16 or f16"),
            std::string::npos);
  bad.dtype = "f32";
  bad.shard_size = "12 apples";
  EXPECT_NE(error_of([&] { cmd_export(bad); }).find("--shard-size"), std::string::npos);
  // Weights beyond F16's range: the error comes while writing, and nothing is left behind.
  Config c = plain_baseline();
  auto m = make_initialised_model(c.model, 1);
  m->params().find("layers.1.ffn.w2.weight")->w[3] = 1e6f;
  save_model_only(w + "/huge", c, m->params());
  ExportArgs f16 = export_args(w + "/huge", w + "/x4");
  f16.dtype = "f16";
  msg = error_of([&] { cmd_export(f16); });
  EXPECT_NE(msg.find("model.layers.1.mlp.down_proj.weight' element 3"), std::string::npos) << msg;
  for (const auto& e : fs::directory_iterator(w))
    EXPECT_EQ(e.path().filename().string().rfind("x", 0), std::string::npos)
        << "left behind: " << e.path();
}

// An export stages its folder as OUT.tmp-PID. A folder of that name left by an earlier process
// with the same pid (a crash, then pid reuse, as in containers) is cleared first, not shipped
// with its files; and the export leaves no file descriptor open.
TEST(HfFolders, AStaleStagingFolderIsClearedAndNoFileStaysOpen) {
  const std::string w = fresh_dir("stale");
  const std::string ck = saved_checkpoint(w + "/ck", plain_baseline(), 14);
  const std::string stale = w + "/hf.tmp-" + std::to_string(::getpid());
  fs::create_directories(stale);
  std::ofstream(stale + "/stray.bin") << "from a crashed run";
  auto open_fds = [] {
    // (the iterator's own descriptor is among them, in both counts alike)
    return std::distance(fs::directory_iterator("/proc/self/fd"), fs::directory_iterator());
  };
  const auto before = open_fds();
  ASSERT_EQ(cmd_export(export_args(ck, w + "/hf")), 0);
  EXPECT_EQ(open_fds(), before);
  EXPECT_TRUE(fs::exists(w + "/hf/config.json"));
  EXPECT_FALSE(fs::exists(w + "/hf/stray.bin"));
  EXPECT_FALSE(fs::exists(stale));
}

TEST(HfFolders, ExistingOutputNeedsForceAndOnlyModelFoldersAreReplaced) {
  const std::string w = fresh_dir("force");
  const std::string ck = saved_checkpoint(w + "/ck", plain_baseline(), 2);
  ExportArgs e = export_args(ck, w + "/hf");
  ASSERT_EQ(cmd_export(e), 0);
  EXPECT_NE(error_of([&] { cmd_export(e); }).find("already exists; give --force"),
            std::string::npos);
  e.force = true;
  e.dtype = "bf16";
  ASSERT_EQ(cmd_export(e), 0);
  EXPECT_EQ(read_json_file_bounded(e.out + "/config.json")["torch_dtype"], "bfloat16");
  // A folder that is not a model folder is never replaced, even with --force.
  fs::create_directories(w + "/notes");
  std::ofstream(w + "/notes/todo.txt") << "keep me";
  e.out = w + "/notes";
  EXPECT_NE(error_of([&] { cmd_export(e); }).find("holds no config.json"), std::string::npos);
  EXPECT_TRUE(fs::exists(w + "/notes/todo.txt"));
  // Nor a dlcm checkpoint (it holds a config.json too).
  e.out = ck;
  EXPECT_NE(error_of([&] { cmd_export(e); }).find("is a dlcm checkpoint; refusing"),
            std::string::npos);
  EXPECT_TRUE(fs::exists(ck + "/trainer_state.json"));
  // Import: an existing --out needs --force too.
  ImportArgs i = import_args(w + "/hf", w + "/ck");
  EXPECT_NE(error_of([&] { cmd_import(i); }).find("already exists; give --force"),
            std::string::npos);
  i.force = true;
  EXPECT_EQ(cmd_import(i), 0);
}

TEST(HfFolders, ImportRefusesUnsupportedFeaturesNamingTheField) {
  const std::string w = fresh_dir("import_refuse");
  const std::string ck = saved_checkpoint(w + "/ck", plain_baseline(), 3);
  ASSERT_EQ(cmd_export(export_args(ck, w + "/hf")), 0);
  const std::vector<std::tuple<std::string, nlohmann::json, std::string>> cases = {
      {"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}}, "'rope_scaling' is"},
      {"sliding_window", 4096, "'sliding_window' is 4096"},
      {"attention_bias", true, "'attention_bias' is true"},
      {"mlp_bias", true, "'mlp_bias' is true"},
      {"hidden_act", "gelu", "'hidden_act' is \"gelu\""},
      {"model_type", "mistral", "'model_type' is \"mistral\""},
      {"architectures", {"LlamaForSequenceClassification"}, "'architectures' is"},
      {"num_hidden_layers", 1, "unexpected tensor 'model.layers.1."},
      {"num_key_value_heads", 2, "k_proj.weight' has shape"},
  };
  for (const auto& [key, value, phrase] : cases) {
    const std::string d = w + "/hf_" + key;
    fs::copy(w + "/hf", d);
    edit_config(d, key, value);
    const std::string out = w + "/out_" + key;
    const std::string msg = error_of([&] { cmd_import(import_args(d, out)); });
    EXPECT_NE(msg.find(phrase), std::string::npos) << key << ": " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << key << ": one line: " << msg;
    EXPECT_FALSE(fs::exists(out)) << key;
  }
  // Weights: a bias tensor, a missing shard, PyTorch .bin only.
  {
    const std::string d = w + "/hf_bias";
    fs::copy(w + "/hf", d);
    std::vector<float> b(16, 0.5f);
    rewrite_weights(d + "/model.safetensors", [](const std::string&) { return true; },
                    {{"model.layers.0.self_attn.q_proj.bias", {16}, b.data(), nullptr}});
    EXPECT_NE(error_of([&] { cmd_import(import_args(d, w + "/out_bias")); })
                  .find("'model.layers.0.self_attn.q_proj.bias' is a bias"),
              std::string::npos);
  }
  {
    ExportArgs e = export_args(ck, w + "/hf_sharded");
    e.shard_size = "2KB";
    ASSERT_EQ(cmd_export(e), 0);
    fs::remove(e.out + "/model-00002-of-" +
               std::string(read_json_file_bounded(e.out + "/model.safetensors.index.json")
                               ["weight_map"]["lm_head.weight"])
                   .substr(15));
    const std::string msg = error_of([&] { cmd_import(import_args(e.out, w + "/out_sh")); });
    EXPECT_NE(msg.find("names shard 'model-00002-of-"), std::string::npos) << msg;
  }
  {
    const std::string d = w + "/hf_bin";
    fs::copy(w + "/hf", d);
    fs::rename(d + "/model.safetensors", d + "/pytorch_model.bin");
    EXPECT_NE(error_of([&] { cmd_import(import_args(d, w + "/out_bin")); })
                  .find("PyTorch .bin weights only"),
              std::string::npos);
  }
}

TEST(HfFolders, ImportOfAForeignConfigUsesThePlainLlamaKeys) {
  const std::string w = fresh_dir("foreign");
  Config c = plain_baseline(0.25f);
  const std::string ck = saved_checkpoint(w + "/ck", c, 4);
  ASSERT_EQ(cmd_export(export_args(ck, w + "/hf")), 0);
  // Without the dlcm_config that an export carries (a folder from elsewhere), with a tied
  // lm_head, a list of eos ids and no pad id.
  nlohmann::json j = read_json_file_bounded(w + "/hf/config.json");
  j.erase("dlcm_config");
  j.erase("head_dim");  // configs written before transformers had the key: hidden / heads
  j["eos_token_id"] = {2, 5};
  j["pad_token_id"] = nullptr;
  j["tie_word_embeddings"] = true;
  std::ofstream(w + "/hf/config.json") << j.dump(2);
  HfLlamaModel h = read_hf_llama_config(w + "/hf");
  EXPECT_FALSE(h.restored);
  EXPECT_EQ(h.config.model.logit_mult, 1.0f);
  EXPECT_FALSE(h.config.model.mup.enabled);
  EXPECT_EQ(h.config.model.eos_id, 2);
  EXPECT_EQ(h.config.model.pad_id, 2);
  EXPECT_TRUE(h.hp.tied);
  EXPECT_EQ(h.hp.head_dim, c.model.d_token / c.model.n_heads);
  EXPECT_EQ(h.notes.size(), 2u);
  auto m = make_model(h.config.model);
  read_hf_llama_weights(w + "/hf", h, m->params());
  const Param* e = m->params().find("tok_embeddings.weight");
  const Param* head = m->params().find("lm_head.weight");
  EXPECT_EQ(std::memcmp(e->w, head->w, 4 * size_t(e->numel)), 0);  // tied: the embedding
}

TEST(HfFolders, TrainInitFromStartsFromTheWeightsAndChecksTheArchitecture) {
  const std::string w = fresh_dir("init_from");
  Config c = plain_baseline();
  auto src = make_initialised_model(c.model, 5);
  save_model_only(w + "/ck", c, src->params());
  TrainOptions o;
  o.quiet = true;
  o.peak_gflops = 100;
  o.init_from = w + "/ck";
  {
    Config run = c;
    run.train.seed = 999;  // another init: the checkpoint's weights must win
    run.model.max_seq_len = 128;  // may change when fine-tuning
    Trainer tr(run, pattern_data(c.model.vocab_size), o);
    const ParamStore& ps = tr.model().params();
    for (const Param& p : src->params().params())
      ASSERT_EQ(std::memcmp(p.w, ps.find(p.name)->w, 4 * size_t(p.numel)), 0) << p.name;
  }
  Config other = c;
  other.model.d_ff = 32;
  const std::string msg = error_of([&] { Trainer tr(other, pattern_data(c.model.vocab_size), o); });
  EXPECT_NE(msg.find("--init-from needs the checkpoint's architecture"), std::string::npos) << msg;
  EXPECT_NE(msg.find("d_ff (checkpoint 24, given 32)"), std::string::npos) << msg;
}
