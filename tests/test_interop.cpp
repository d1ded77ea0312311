// Interop with Hugging Face transformers (docs/interop.md): the plain LLaMA layout of a
// baseline, 16-bit safetensors, HF folder export/import and train --init-from. The checks
// against transformers itself are tests/interop/hf_llama_check.py (CTest interop_hf_llama).
#include <filesystem>
#include <set>

#include "core/half.h"
#include "core/safetensors.h"
#include "model_fixtures.h"
#include "models/llama_layout.h"
#include "testing.h"

using namespace dlcm;
using namespace dlcm::test;
namespace fs = std::filesystem;

namespace {

template <typename F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

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
