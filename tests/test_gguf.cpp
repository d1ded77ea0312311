// GGUF export (core/gguf.h, models/gguf_llama.h, data/gguf_tokenizer.h, `dlcm export --format
// gguf`), judged by llama.cpp itself: node-llama-cpp's prebuilt CPU build, installed by
// scripts/setup.sh into tests/interop/node_modules (tests/interop/llama_gguf.mjs).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "core/gguf.h"
#include "core/half.h"
#include "core/rng.h"
#include "data/gguf_tokenizer.h"
#include "data/model_loader.h"
#include "data/tokenizer.h"
#include "infer/generate.h"
#include "model_fixtures.h"
#include "testing.h"

namespace dlcm {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

const std::string kInterop = std::string(DLCM_SOURCE_DIR) + "/tests/interop";

// ---- a GGUF parser for the layout tests (llama.cpp is the judge of the rest) ----

struct GgufTensorInfo {
  std::vector<uint64_t> ne;  // innermost first
  uint32_t type = 0;
  uint64_t offset = 0;
};
struct ParsedGguf {
  uint32_t version = 0;
  json kv = json::object();  // arrays as JSON arrays; type codes in kv_type
  std::map<std::string, uint32_t> kv_type;
  std::vector<std::string> order;
  std::map<std::string, GgufTensorInfo> tensors;
  std::vector<std::string> tensor_order;
  uint64_t data_start = 0;
  std::string bytes;
};

ParsedGguf parse_gguf(const std::string& path) {
  ParsedGguf g;
  std::ifstream f(path, std::ios::binary);
  g.bytes.assign(std::istreambuf_iterator<char>(f), {});
  size_t p = 0;
  auto take = [&](void* dst, size_t n) {
    if (p + n > g.bytes.size()) throw std::runtime_error("truncated GGUF at " + std::to_string(p));
    std::memcpy(dst, g.bytes.data() + p, n);
    p += n;
  };
  auto u32 = [&] { uint32_t v; take(&v, 4); return v; };
  auto u64 = [&] { uint64_t v; take(&v, 8); return v; };
  auto str = [&] {
    std::string s(size_t(u64()), '\0');
    take(s.data(), s.size());
    return s;
  };
  std::function<json(uint32_t)> value = [&](uint32_t t) -> json {
    switch (t) {
      case 4: return u32();
      case 5: { int32_t v; take(&v, 4); return v; }
      case 6: { float v; take(&v, 4); return v; }
      case 7: { uint8_t v; take(&v, 1); return bool(v); }
      case 8: return str();
      case 9: {
        const uint32_t et = u32();
        const uint64_t n = u64();
        json a = json::array();
        for (uint64_t i = 0; i < n; ++i) a.push_back(value(et));
        return a;
      }
    }
    throw std::runtime_error("unexpected GGUF value type " + std::to_string(t));
  };
  char magic[4];
  take(magic, 4);
  if (std::string(magic, 4) != "GGUF") throw std::runtime_error("no GGUF magic");
  g.version = u32();
  const uint64_t nt = u64(), nkv = u64();
  for (uint64_t i = 0; i < nkv; ++i) {
    const std::string k = str();
    const uint32_t t = u32();
    g.kv_type[k] = t;
    g.kv[k] = value(t);
    g.order.push_back(k);
  }
  for (uint64_t i = 0; i < nt; ++i) {
    const std::string name = str();
    GgufTensorInfo ti;
    const uint32_t nd = u32();
    for (uint32_t d = 0; d < nd; ++d) ti.ne.push_back(u64());
    ti.type = u32();
    ti.offset = u64();
    g.tensors[name] = ti;
    g.tensor_order.push_back(name);
  }
  const uint64_t align = g.kv.contains("general.alignment") ? g.kv["general.alignment"].get<uint64_t>() : 32;
  g.data_start = (p + align - 1) / align * align;
  return g;
}

const uint8_t* tensor_data(const ParsedGguf& g, const std::string& name) {
  return reinterpret_cast<const uint8_t*>(g.bytes.data()) + g.data_start + g.tensors.at(name).offset;
}

TEST(Gguf, Q8_0RoundsLikeGgmlReference) {
  // Block 1: max |x| = 127 -> d = 1; x = 2.5 rounds away from zero to 3 (nearest-even would
  // give 2), -2.5 to -3, 0.49 to 0. Block 2: all zeros -> d = 0, q = 0. Block 3: d = 0.3 / 127,
  // whose f16 rounding is stored while q uses the float d.
  std::vector<float> x(96, 0.0f);
  x[0] = 127, x[1] = 2.5f, x[2] = -2.5f, x[3] = 0.49f, x[4] = -127, x[5] = 63.5f;
  for (int j = 0; j < 32; ++j) x[64 + j] = 0.3f * float(j - 16) / 16.0f;
  std::vector<uint8_t> q;
  quantize_q8_0(x.data(), 96, q);
  ASSERT_EQ(q.size(), 3u * 34);
  auto d_of = [&](int b) { uint16_t h; std::memcpy(&h, q.data() + 34 * b, 2); return h; };
  auto q_of = [&](int b, int j) { return int(int8_t(q[34 * b + 2 + j])); };
  EXPECT_EQ(d_of(0), 0x3C00);  // 1.0 in f16
  EXPECT_EQ(q_of(0, 0), 127);
  EXPECT_EQ(q_of(0, 1), 3);
  EXPECT_EQ(q_of(0, 2), -3);
  EXPECT_EQ(q_of(0, 3), 0);
  EXPECT_EQ(q_of(0, 4), -127);
  EXPECT_EQ(q_of(0, 5), 64);
  EXPECT_EQ(d_of(1), 0);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(q_of(1, j), 0);
  const float d = 0.3f / 127.0f;
  EXPECT_EQ(d_of(2), f32_to_f16_bits(d));
  EXPECT_NE(f16_bits_to_f32(d_of(2)), d);  // the stored scale is rounded ...
  for (int j = 0; j < 32; ++j)  // ... the quants are not computed from it
    EXPECT_EQ(q_of(2, j), int(std::round(x[64 + j] * (1.0f / d)))) << j;
  EXPECT_EQ(q_of(2, 0), -127);
}

TEST(Gguf, FileLayout) {
  test::TempDir tmp;
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_u32("general.alignment", 64);
  w.set_i32("a.i32", -7);
  w.set_f32("a.f32", 0.25f);
  w.set_bool("a.bool", true);
  w.set_strings("a.strings", {"x", "", "日本"});
  w.set_f32s("a.f32s", {1.5f, -2});
  w.set_i32s("a.i32s", {3, -4, 5});
  EXPECT_THROW(w.set_u32("a.i32", 1), Error);
  std::vector<float> m(3 * 64), v(5);
  for (size_t i = 0; i < m.size(); ++i) m[i] = 0.01f * float(i) - 0.5f;
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(i) + 0.5f;
  w.add_tensor("m.f32", {3, 64}, m, GgmlType::F32);
  w.add_tensor("v", {5}, v, GgmlType::F32);
  w.add_tensor("m.f16", {3, 64}, m, GgmlType::F16);
  w.add_tensor("m.bf16", {3, 64}, m, GgmlType::BF16);
  w.add_tensor("m.q8", {3, 64}, m, GgmlType::Q8_0);
  EXPECT_THROW(w.add_tensor("bad.q8", {64, 3}, m, GgmlType::Q8_0), Error);  // rows of 3
  EXPECT_THROW(w.add_tensor("bad.f16", {1}, {70000.0f}, GgmlType::F16), Error);
  std::vector<float> big(32, 1.0f);
  big[5] = 1e7f;  // scale 1e7 / 127 beyond f16
  EXPECT_THROW(w.add_tensor("bad.q8", {1, 32}, big, GgmlType::Q8_0), Error);
  EXPECT_THROW(w.add_tensor("bad.nan", {1}, {NAN}, GgmlType::F32), Error);
  const std::string path = tmp.path + "/t.gguf";
  w.write(path);
  EXPECT_FALSE(fs::exists(path + ".tmp-" + std::to_string(::getpid())));

  ParsedGguf g = parse_gguf(path);
  EXPECT_EQ(g.version, 3u);
  EXPECT_EQ(g.order, (std::vector<std::string>{"general.architecture", "general.alignment", "a.i32",
                                               "a.f32", "a.bool", "a.strings", "a.f32s", "a.i32s"}));
  EXPECT_EQ(g.kv_type["general.alignment"], 4u);
  EXPECT_EQ(g.kv["a.i32"], -7);
  EXPECT_EQ(g.kv["a.f32"], 0.25);
  EXPECT_EQ(g.kv["a.bool"], true);
  EXPECT_EQ(g.kv["a.strings"], json({"x", "", "日本"}));
  EXPECT_EQ(g.kv["a.f32s"], json({1.5, -2.0}));
  EXPECT_EQ(g.kv["a.i32s"], json({3, -4, 5}));
  EXPECT_EQ(g.tensor_order, (std::vector<std::string>{"m.f32", "v", "m.f16", "m.bf16", "m.q8"}));
  EXPECT_EQ(g.tensors["m.f32"].ne, (std::vector<uint64_t>{64, 3}));  // innermost first
  EXPECT_EQ(g.tensors["v"].ne, (std::vector<uint64_t>{5}));
  const std::map<std::string, uint32_t> types = {{"m.f32", 0}, {"v", 0}, {"m.f16", 1}, {"m.bf16", 30}, {"m.q8", 8}};
  for (auto& [name, t] : types) {
    EXPECT_EQ(g.tensors[name].type, t) << name;
    EXPECT_EQ(g.tensors[name].offset % 64, 0u) << name;
    EXPECT_EQ(g.data_start % 64, 0u);
  }
  EXPECT_EQ(g.tensors["v"].offset, 3u * 64 * 4);
  EXPECT_EQ(g.tensors["m.f16"].offset, 3u * 64 * 4 + 64);  // 20 bytes padded to 64
  const uint8_t* f32 = tensor_data(g, "m.f32");
  const uint8_t* f16 = tensor_data(g, "m.f16");
  const uint8_t* bf16 = tensor_data(g, "m.bf16");
  const uint8_t* q8 = tensor_data(g, "m.q8");
  std::vector<uint8_t> q8_want;
  quantize_q8_0(m.data(), i64(m.size()), q8_want);
  EXPECT_EQ(std::memcmp(q8, q8_want.data(), q8_want.size()), 0);
  for (size_t i = 0; i < m.size(); ++i) {
    float a;
    uint16_t h, b;
    std::memcpy(&a, f32 + 4 * i, 4);
    std::memcpy(&h, f16 + 2 * i, 2);
    std::memcpy(&b, bf16 + 2 * i, 2);
    ASSERT_EQ(a, m[i]) << i;
    ASSERT_EQ(h, f32_to_f16_bits(m[i])) << i;
    ASSERT_EQ(b, f32_to_bf16_bits(m[i])) << i;
  }
  EXPECT_EQ(q8_want.size(), 204u);
  EXPECT_EQ(g.bytes.size(), g.data_start + g.tensors["m.q8"].offset + 256);  // padded to 64
}

// A write that fails after its temporary file exists (here the rename onto a folder that holds
// a file) throws naming the path, and leaves neither a temporary file nor a changed target.
TEST(Gguf, AFailedWriteLeavesNoTemporaryFile) {
  test::TempDir tmp;
  const std::string target = tmp.path + "/out.gguf";
  fs::create_directory(target);
  { std::ofstream(target + "/keep") << "x"; }
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.add_tensor("v", {4}, {1, 2, 3, 4}, GgmlType::F32);
  try {
    w.write(target);
    ADD_FAILURE() << "writing onto a non-empty folder succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(target), std::string::npos) << e.what();
  }
  EXPECT_EQ(test::file_names(tmp.path), std::vector<std::string>{"out.gguf"});
  EXPECT_TRUE(fs::exists(target + "/keep"));
}

// A write that fails on the device (ENOSPC: the temporary file is a link to /dev/full) names
// the cause, closes its file and removes the temporary name.
TEST(Gguf, ADiskFullWriteClosesAndRemovesItsTemporaryFile) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  test::TempDir tmp;
  const std::string target = tmp.path + "/out.gguf";
  const std::string tmp_name = target + ".tmp-" + std::to_string(::getpid());
  fs::create_symlink("/dev/full", tmp_name);
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.add_tensor("v", {4}, {1, 2, 3, 4}, GgmlType::F32);
  const i64 fds = test::open_descriptors();
  const std::string e = test::error_of([&] { w.write(target); });
  EXPECT_NE(e.find("disk full"), std::string::npos) << e;
  EXPECT_EQ(test::open_descriptors(), fds);
  EXPECT_TRUE(fs::is_empty(tmp.path));
}

// ---- the export command ----

std::string error_of(const test::CmdResult& r) { return r.rc == 0 ? "(exit 0) " + r.out : r.out; }

TEST(GgufExport, RefusesWhatLlamaCannotRun) {
  test::TempDir tmp;
  auto save = [&](Config c, const std::string& dir) {
    c.model.vocab_size = 260;
    c.model.max_seq_len = 128;
    auto m = make_initialised_model(c.model, 5);
    test::save_model_only(dir, c, m->params());
    make_byte_tokenizer()->save(dir);
  };
  save(test::tiny_baseline(/*qk_norm=*/true), tmp.path + "/qk");
  save(test::tiny_dlcm(), tmp.path + "/dlcm");
  Config extras = test::tiny_baseline(false);
  extras.model.baseline_extras = true;
  save(extras, tmp.path + "/extras");
  for (auto [dir, key] : {std::pair<const char*, const char*>{"qk", "'qk_norm'"},
                          {"dlcm", "'arch'"},
                          {"extras", "'baseline_extras'"}}) {
    const std::string out = tmp.path + "/" + dir + ".gguf";
    test::CmdResult r = test::run_dlcm("export --ckpt " + tmp.path + "/" + dir + " --format gguf --out " + out);
    EXPECT_NE(r.rc, 0) << dir;
    EXPECT_NE(r.out.find(key), std::string::npos) << error_of(r);
    EXPECT_FALSE(fs::exists(out)) << dir;
  }
}

TEST(GgufExport, KeepsAnExistingOutUnlessForced) {
  test::TempDir tmp;
  Config c = test::tiny_baseline(false);
  c.model.vocab_size = 260;
  auto m = make_initialised_model(c.model, 5);
  test::save_model_only(tmp.path + "/ck", c, m->params());
  make_byte_tokenizer()->save(tmp.path + "/ck");
  const std::string out = tmp.path + "/m.gguf", base = "export --ckpt " + tmp.path + "/ck --format gguf --out ";
  { std::ofstream(out) << "keep me"; }
  test::CmdResult r = test::run_dlcm(base + out);
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--force"), std::string::npos) << error_of(r);
  {
    std::ifstream f(out);
    EXPECT_EQ(std::string(std::istreambuf_iterator<char>(f), {}), "keep me");
  }
  r = test::run_dlcm(base + out + " --dtype q4_0");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--dtype"), std::string::npos) << error_of(r);
  r = test::run_dlcm(base + tmp.path + " --force");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("is a folder"), std::string::npos) << error_of(r);
  r = test::run_dlcm(base + out + " --force --dtype q8_0");
  ASSERT_EQ(r.rc, 0) << r.out;
  ParsedGguf g = parse_gguf(out);
  // d_token 16: rows too short for q8_0 blocks, so the matrices fall back to f16; norms f32.
  EXPECT_EQ(g.tensors["blk.0.attn_q.weight"].type, 1u);
  EXPECT_EQ(g.tensors["blk.1.ffn_norm.weight"].type, 0u);
  EXPECT_EQ(g.kv["general.file_type"], 7);
  for (auto& e : fs::directory_iterator(tmp.path))
    EXPECT_EQ(e.path().string().find(".tmp-"), std::string::npos) << e.path();
}

// The llama.cpp layout of a baseline: names, shapes innermost first, metadata, the q/k row
// permutation and the folded logit_mult, read back with the test's own parser.
TEST(GgufExport, TensorsAndMetadata) {
  test::TempDir tmp;
  Config c = test::tiny_baseline(false, /*kv_heads=*/1);
  c.model.vocab_size = 260;
  c.model.logit_mult = 0.25f;
  c.model.rope_theta = 5000;
  c.model.norm_eps = 1e-6f;
  auto m = make_initialised_model(c.model, 7);
  test::save_model_only(tmp.path + "/ck", c, m->params());
  make_byte_tokenizer()->save(tmp.path + "/ck");
  test::CmdResult r = test::run_dlcm("export --ckpt " + tmp.path + "/ck --format gguf --out " + tmp.path + "/m.gguf");
  ASSERT_EQ(r.rc, 0) << r.out;
  ParsedGguf g = parse_gguf(tmp.path + "/m.gguf");
  const ModelConfig& mc = c.model;
  EXPECT_EQ(g.kv["general.architecture"], "llama");
  EXPECT_EQ(g.kv["llama.context_length"], mc.max_seq_len);
  EXPECT_EQ(g.kv["llama.embedding_length"], mc.d_token);
  EXPECT_EQ(g.kv["llama.block_count"], mc.n_layers);
  EXPECT_EQ(g.kv["llama.feed_forward_length"], mc.d_ff);
  EXPECT_EQ(g.kv["llama.attention.head_count"], mc.n_heads);
  EXPECT_EQ(g.kv["llama.attention.head_count_kv"], 1);
  EXPECT_EQ(g.kv["llama.rope.dimension_count"], mc.head_dim);
  // head_dim stated for keys and values: llama.cpp would assume embedding / heads otherwise.
  EXPECT_EQ(g.kv["llama.attention.key_length"], mc.head_dim);
  EXPECT_EQ(g.kv["llama.attention.value_length"], mc.head_dim);
  EXPECT_EQ(g.kv["llama.rope.freq_base"], 5000.0);
  EXPECT_EQ(g.kv["llama.attention.layer_norm_rms_epsilon"], double(1e-6f));
  EXPECT_EQ(g.kv["llama.vocab_size"], 260);
  EXPECT_EQ(g.tensor_order.size(), 3 + 9 * size_t(mc.n_layers));
  const i64 d = mc.d_token, hd = mc.head_dim;
  EXPECT_EQ(g.tensors["token_embd.weight"].ne, (std::vector<uint64_t>{uint64_t(d), 260}));
  EXPECT_EQ(g.tensors["blk.1.attn_k.weight"].ne, (std::vector<uint64_t>{uint64_t(d), uint64_t(hd)}));
  EXPECT_EQ(g.tensors["blk.0.ffn_down.weight"].ne, (std::vector<uint64_t>{uint64_t(mc.d_ff), uint64_t(d)}));
  auto row = [&](const std::string& name, i64 r, i64 cols) {
    std::vector<float> v(cols);
    std::memcpy(v.data(), tensor_data(g, name) + 4 * r * cols, 4 * cols);
    return v;
  };
  auto param_row = [&](const std::string& name, i64 r, i64 cols) {
    const float* w = m->params().find(name)->w + r * cols;
    return std::vector<float>(w, w + cols);
  };
  // Head h's rotate-half rows i and hd/2 + i become the adjacent rows 2i and 2i + 1.
  for (i64 h = 0; h < mc.n_heads; ++h)
    for (i64 i = 0; i < hd / 2; ++i) {
      EXPECT_EQ(row("blk.1.attn_q.weight", h * hd + 2 * i, d), param_row("layers.1.attn.wq.weight", h * hd + i, d));
      EXPECT_EQ(row("blk.1.attn_q.weight", h * hd + 2 * i + 1, d),
                param_row("layers.1.attn.wq.weight", h * hd + hd / 2 + i, d));
    }
  EXPECT_EQ(row("blk.0.attn_k.weight", 1, d), param_row("layers.0.attn.wk.weight", hd / 2, d));
  EXPECT_EQ(row("blk.0.attn_v.weight", 1, d), param_row("layers.0.attn.wv.weight", 1, d));
  std::vector<float> head = param_row("lm_head.weight", 7, d);
  for (float& x : head) x *= 0.25f;
  EXPECT_EQ(row("output.weight", 7, d), head);
  // The bytes tokenizer: byte b is id 4 + b, the space byte written as "▁" (see gguf_tokenizer.h).
  EXPECT_EQ(g.kv["tokenizer.ggml.model"], "llama");
  EXPECT_EQ(g.kv["tokenizer.ggml.tokens"][4 + 'A'], "<0x41>");
  EXPECT_EQ(g.kv["tokenizer.ggml.tokens"][4 + ' '], "\xE2\x96\x81");
  EXPECT_EQ(g.kv["tokenizer.ggml.token_type"][4 + 'A'], 6);
  EXPECT_EQ(g.kv["tokenizer.ggml.token_type"][1], 3);
  EXPECT_EQ(g.kv["tokenizer.ggml.token_type"][3], 2);
  EXPECT_EQ(g.kv["tokenizer.ggml.bos_token_id"], 1);
  EXPECT_EQ(g.kv["tokenizer.ggml.eos_token_id"], 2);
  // llama.cpp's defaults would be wrong here: unknown 0 (ours is 3), and a pad id it would lack
  EXPECT_EQ(g.kv["tokenizer.ggml.unknown_token_id"], 3);
  EXPECT_EQ(g.kv["tokenizer.ggml.padding_token_id"], 0);
  EXPECT_EQ(g.kv["tokenizer.ggml.add_bos_token"], true);
  EXPECT_EQ(g.kv["tokenizer.ggml.add_eos_token"], false);
  EXPECT_EQ(g.kv["tokenizer.ggml.add_space_prefix"], false);
}

// The SentencePiece model's piece kinds reach the GGUF token types; "\n" is the one
// user-defined symbol dlcm's trainer declares (read from the model proto).
TEST(GgufExport, BpeVocabularyEntries) {
  std::vector<std::string> docs;
  for (int i = 0; i < 40; ++i)
    docs.push_back("the café serves naïve coffee\nat night; 東京 " + std::to_string(i) + "\n");
  BpeOptions o;
  o.vocab_size = 360;
  auto tok = train_bpe(docs, o);
  std::vector<VocabEntry> e = tok->vocab_entries();
  ASSERT_EQ(i64(e.size()), tok->vocab_size());
  using K = VocabEntry::Kind;
  EXPECT_EQ(e[0].piece, "<pad>");
  EXPECT_EQ(e[1].kind, K::Control);
  EXPECT_EQ(e[2].kind, K::Control);
  EXPECT_EQ(e[3].kind, K::Unknown);
  const i32 nl = tok->encode("\n").at(0);
  EXPECT_EQ(e[nl].piece, "\n");
  EXPECT_EQ(e[nl].kind, K::UserDefined);
  int user = 0, bytes = 0, merged = 0;
  for (const VocabEntry& v : e) {
    user += v.kind == K::UserDefined;
    bytes += v.kind == K::Byte;
    merged += v.kind == K::Normal && v.piece.size() > 4;
  }
  EXPECT_EQ(user, 1);
  EXPECT_EQ(bytes, 256);
  EXPECT_GT(merged, 5);
  const i32 serves = tok->encode(" serves").at(0);
  EXPECT_EQ(e[serves].piece, "\xE2\x96\x81serves");
  EXPECT_LT(e[serves].score, 0.0f);  // BPE: merge rank as a negative score

  test::TempDir tmp;
  GgufWriter w;
  add_gguf_tokenizer(w, *tok, tok->vocab_size() + 2);
  w.write(tmp.path + "/t.gguf");
  ParsedGguf g = parse_gguf(tmp.path + "/t.gguf");
  EXPECT_EQ(g.kv["tokenizer.ggml.token_type"][nl], 4);
  EXPECT_EQ(g.kv["tokenizer.ggml.token_type"][serves], 1);
  EXPECT_EQ(g.kv["tokenizer.ggml.tokens"][serves], e[serves].piece);
  EXPECT_EQ(g.kv["tokenizer.ggml.scores"][serves], double(e[serves].score));
  ASSERT_EQ(g.kv["tokenizer.ggml.tokens"].size(), e.size() + 2);  // padded to the model's rows
  EXPECT_EQ(g.kv["tokenizer.ggml.tokens"][e.size() + 1], "<unused_1>");
  EXPECT_EQ(g.kv["tokenizer.ggml.token_type"][e.size() + 1], 5);
  GgufWriter small;
  EXPECT_THROW(add_gguf_tokenizer(small, *tok, tok->vocab_size() - 1), Error);
}

// ---- llama.cpp itself ----

bool llama_cpp_installed() { return fs::exists(kInterop + "/node_modules/node-llama-cpp/package.json"); }

#define REQUIRE_LLAMA_CPP()                                                                       \
  if (!llama_cpp_installed())                                                                     \
  GTEST_SKIP() << "node-llama-cpp is not installed in tests/interop/node_modules (scripts/setup.sh " \
                  "installs it: npm ci --omit=optional --ignore-scripts there)"

// Runs llama_gguf.mjs on jobs [{model, tasks}]; returns one result array per job.
json llama_cpp(const std::string& dir, const json& jobs) {
  const std::string req = dir + "/request.json", res = dir + "/result.json", err = dir + "/node.err";
  std::ofstream(req) << json{{"jobs", jobs}}.dump();
  test::CommandResult r = test::run_command("node " + kInterop + "/llama_gguf.mjs " + req + " > " + res +
                                            " 2> " + err);
  std::ifstream ef(err);
  const std::string errtext((std::istreambuf_iterator<char>(ef)), {});
  if (r.rc != 0) throw std::runtime_error("llama_gguf.mjs failed (rc " + std::to_string(r.rc) + "): " + errtext);
  return json::parse(std::ifstream(res))["jobs"];
}

// Sentences of a small corpus: accents, CJK, emoji, tabs and runs of spaces, digits.
const std::vector<std::string> kSentences = {
    "The café in 東京 serves naïve coffee at night 🌙.",
    "Über the river, Ωμέγα writes résumé text for the model.",
    "Tokens and concepts: 42 readers, 2026 writers — 日本語 too 😀.",
    "The niño reads the straße map\tand   smiles.",
    "Data moves fast; the concept model learns it well.",
};

// A tiny baseline trained on the sentences (memorised, so its predictions have clear margins),
// with GQA, logit_mult 0.5 (folded into output.weight), rope_theta 5000 and eps 1e-6, exported
// at every dtype. Built once per test process.
struct Trained {
  test::TempDir tmp;
  std::string ckpt;
  std::string gguf(const std::string& dtype) const { return tmp.path + "/m_" + dtype + ".gguf"; }
};

const Trained& trained() {
  static Trained* t = [] {
    auto* t = new Trained;
    const std::string& p = t->tmp.path;
    {
      std::ofstream f(p + "/corpus.txt");
      Rng r(5);
      for (int d = 0; d < 300; ++d) {
        const int n = 1 + int(r.next() % 4);
        for (int s = 0; s < n; ++s) f << kSentences[r.next() % kSentences.size()] << (s + 1 < n ? " " : "\n\f");
      }
    }
    test::CmdResult r = test::run_dlcm("prepare --input " + p + "/corpus.txt --out " + p +
                                       "/data --tokenizer bpe --vocab-size 320 --val-fraction 0.1");
    if (r.rc != 0) throw std::runtime_error("prepare: " + r.out);
    const i64 V = load_tokenizer(p + "/data")->vocab_size();
    std::ofstream(p + "/cfg.json") << json{
        {"arch", "baseline"}, {"vocab_size", V}, {"d_token", 64}, {"n_heads", 2}, {"n_kv_heads", 1},
        {"head_dim", 32}, {"d_ff", 128}, {"n_layers", 2}, {"max_seq_len", 128}, {"rope_theta", 5000},
        {"norm_eps", 1e-6}, {"logit_mult", 0.5},
        {"train", {{"seq_len", 32}, {"batch_size", 4}, {"steps", 150}, {"lr", 1e-2}, {"warmup_steps", 10},
                   {"eval_every", 1000}, {"ckpt_every", 1000}, {"log_every", 1000}, {"threads", 1}}}}.dump();
    r = test::run_dlcm("train --config " + p + "/cfg.json --data " + p + "/data --out " + p +
                       "/run --quiet --no-final-eval");
    if (r.rc != 0) throw std::runtime_error("train: " + r.out);
    t->ckpt = p + "/run/checkpoint";
    for (const char* dt : {"f32", "f16", "bf16", "q8_0"}) {
      r = test::run_dlcm("export --ckpt " + t->ckpt + " --format gguf --out " + t->gguf(dt) + " --dtype " + dt);
      if (r.rc != 0) throw std::runtime_error(std::string("export ") + dt + ": " + r.out);
    }
    return t;
  }();
  return *t;
}

// log_softmax over the last dim of [L, V] logits.
std::vector<double> log_softmax(const float* x, i64 L, i64 V) {
  std::vector<double> out(size_t(L * V));
  for (i64 l = 0; l < L; ++l) {
    double mx = -1e300, s = 0;
    for (i64 v = 0; v < V; ++v) mx = std::max(mx, double(x[l * V + v]));
    for (i64 v = 0; v < V; ++v) s += std::exp(double(x[l * V + v]) - mx);
    for (i64 v = 0; v < V; ++v) out[l * V + v] = double(x[l * V + v]) - mx - std::log(s);
  }
  return out;
}

// max |a - b| / max |b| between llama.cpp's log-probs and dlcm's.
double logprob_rel_err(const json& got, const std::vector<double>& want, i64 L, i64 V) {
  double diff = 0, scale = 1e-30;
  for (i64 l = 0; l < L; ++l)
    for (i64 v = 0; v < V; ++v) {
      const json& g = got[l][v];
      if (g.is_null()) return INFINITY;  // a token without probability (underflow or missing)
      diff = test::worse(diff, std::fabs(g.get<double>() - want[l * V + v]));
      scale = std::max(scale, std::fabs(want[l * V + v]));
    }
  return diff / scale;
}

struct Reference {
  std::vector<i32> row;       // BOS + the prompt's tokens
  std::vector<double> logp;   // dlcm's log-probs after each prefix of row
  std::vector<i32> greedy;    // dlcm's greedy continuation of the prompt (32 tokens)
  i64 V = 0;
};

const Reference& reference() {
  static Reference* ref = [] {
    auto* ref = new Reference;
    auto m = load_model_with_tokenizer(trained().ckpt);
    auto tok = load_tokenizer(trained().ckpt);
    const std::string prompt = "Über the river, Ωμέγα writes";
    ref->row = {tok->bos_id()};
    for (i32 id : tok->encode(prompt)) ref->row.push_back(id);
    ref->V = m->config().vocab_size;
    const i64 L = i64(ref->row.size());
    std::vector<float> logits(size_t(L * ref->V));
    m->logits(ref->row.data(), 1, L, logits.data());
    ref->logp = log_softmax(logits.data(), L, ref->V);
    GenerateOptions o;
    o.sampler.temperature = 0;
    o.max_new_tokens = 32;
    o.stop_at_eos = false;
    std::vector<Completion> c = generate(*m, *tok, {prompt}, o);
    if (c[0].prompt_ids != ref->row) throw std::runtime_error("generate encoded the prompt differently");
    ref->greedy = c[0].ids;
    return ref;
  }();
  return *ref;
}

TEST(GgufLlamaCpp, F32LogitsAndGreedyMatchDlcm) {
  REQUIRE_LLAMA_CPP();
  const Reference& ref = reference();
  ASSERT_EQ(ref.greedy.size(), 32u);
  test::TempDir tmp;
  json jobs = json::array({{{"model", trained().gguf("f32")},
                            {"tasks", {{{"kind", "metadata"}},
                                       {{"kind", "logprobs"}, {"tokens", ref.row}},
                                       {{"kind", "greedy"}, {"tokens", ref.row}, {"n", 32}}}}}});
  json out = llama_cpp(tmp.path, jobs)[0];
  const json& meta = out[0]["metadata"];
  EXPECT_EQ(meta["general"]["architecture"], "llama");
  EXPECT_EQ(meta["llama"]["attention"]["head_count_kv"], 1);
  const i64 L = i64(ref.row.size());
  const double err = logprob_rel_err(out[1]["logprobs"], ref.logp, L, ref.V);
  std::printf("[gguf] f32: log-prob relative error %.2e over %lld positions\n", err, (long long)L);
  // The issue asks for 1e-3; with f32 K/V caches llama.cpp agrees to ~1e-6.
  EXPECT_LE(err, 1e-4) << "llama.cpp's log-probs differ from dlcm forward's";
  // And the model is trained: the memorised sentence is predicted with confidence.
  EXPECT_GT(ref.logp[(L - 1) * ref.V + ref.greedy[0]], std::log(0.5));
  EXPECT_EQ(out[2]["ids"].get<std::vector<i32>>(), ref.greedy);
}

TEST(GgufLlamaCpp, HalfPrecisionAndQ8_0Agree) {
  REQUIRE_LLAMA_CPP();
  const Reference& ref = reference();
  test::TempDir tmp;
  json jobs = json::array();
  for (const char* dt : {"f16", "bf16", "q8_0"})
    jobs.push_back({{"model", trained().gguf(dt)},
                    {"tasks", {{{"kind", "metadata"}},
                               {{"kind", "logprobs"}, {"tokens", ref.row}},
                               {{"kind", "greedy"}, {"tokens", ref.row}, {"n", 32}}}}});
  json out = llama_cpp(tmp.path, jobs);
  const std::vector<std::pair<const char*, double>> tol = {{"f16", 1e-2}, {"bf16", 3e-2}, {"q8_0", 3e-2}};
  const std::map<std::string, int> matrix_type = {{"f16", 1}, {"bf16", 30}, {"q8_0", 8}};
  for (size_t j = 0; j < tol.size(); ++j) {
    const auto [dt, rel] = tol[j];
    SCOPED_TRACE(dt);
    for (const json& t : out[j][0]["tensors"]) {
      const bool norm = t["dims"].size() == 1;
      EXPECT_EQ(t["type"], norm ? 0 : matrix_type.at(dt)) << t["name"];
    }
    const double err = logprob_rel_err(out[j][1]["logprobs"], ref.logp, i64(ref.row.size()), ref.V);
    EXPECT_LE(err, rel);
    std::vector<i32> ids = out[j][2]["ids"].get<std::vector<i32>>();
    ASSERT_EQ(ids.size(), 32u);
    i64 same = 0;
    while (same < 32 && ids[same] == ref.greedy[same]) ++same;
    std::printf("[gguf] %s: log-prob relative error %.2e, greedy agrees for %lld of 32 tokens\n", dt, err,
                (long long)same);
    EXPECT_EQ(std::vector<i32>(ids.begin(), ids.begin() + 8),
              std::vector<i32>(ref.greedy.begin(), ref.greedy.begin() + 8));
  }
}

// UTF-8-rich texts, including characters the tokenizer never saw (byte fallback), whitespace
// runs, tabs and newlines, tokenize to dlcm's ids; and the ids decode to the same text.
const std::vector<std::string> kTexts = {
    "The café in 東京 serves naïve coffee at night 🌙.",
    "  leading spaces,\ttabs\t\tand   runs     of spaces  ",
    "new\nlines\n\n and \r\n windows ones",
    "Ünïcödé ÀÉÎÕÜ ñ ß ø å æ œ — “quotes” ‘single’ …",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "emoji 😀🌙🚀👩‍💻 flags 🇫🇷 and 🤖!",
    "digits 0123456789 3.14159 1e-3 -42",
    "Ωμέγα αβγ Привет мир עברית العربية",
};

void check_tokenizer(const std::string& ckpt_dir, const std::string& gguf, const std::string& tmp) {
  auto tok = load_tokenizer(ckpt_dir);
  json tasks = json::array();
  std::vector<std::vector<i32>> want;
  for (const std::string& s : kTexts) {
    want.push_back(tok->encode(s));
    tasks.push_back({{"kind", "tokenize"}, {"text", s}});
    tasks.push_back({{"kind", "detokenize"}, {"ids", want.back()}});
  }
  json out = llama_cpp(tmp, json::array({{{"model", gguf}, {"tasks", tasks}}}))[0];
  for (size_t i = 0; i < kTexts.size(); ++i) {
    EXPECT_EQ(out[2 * i]["ids"].get<std::vector<i32>>(), want[i]) << kTexts[i];
    EXPECT_EQ(out[2 * i + 1]["text"].get<std::string>(), tok->decode(want[i])) << kTexts[i];
  }
}

TEST(GgufLlamaCpp, BpeTokenizerMatchesDlcm) {
  REQUIRE_LLAMA_CPP();
  test::TempDir tmp;
  check_tokenizer(trained().ckpt, trained().gguf("f32"), tmp.path);
}

// Also a model with more embedding rows than tokenizer ids (padded with unused pieces).
TEST(GgufLlamaCpp, BytesTokenizerMatchesDlcm) {
  REQUIRE_LLAMA_CPP();
  test::TempDir tmp;
  Config c = test::tiny_baseline(false);
  c.model.vocab_size = 264;
  c.model.max_seq_len = 128;
  auto m = make_initialised_model(c.model, 5);
  test::save_model_only(tmp.path + "/ck", c, m->params());
  make_byte_tokenizer()->save(tmp.path + "/ck");
  test::CmdResult r = test::run_dlcm("export --ckpt " + tmp.path + "/ck --format gguf --out " + tmp.path + "/b.gguf");
  ASSERT_EQ(r.rc, 0) << r.out;
  check_tokenizer(tmp.path + "/ck", tmp.path + "/b.gguf", tmp.path);
}

}  // namespace
}  // namespace dlcm
