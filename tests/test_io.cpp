// safetensors and checkpoint I/O: round trips, malformed files rejected with clear messages,
// malformed config.json, checkpoint atomicity, and synced text files that cannot be written.
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/params.h"
#include "core/safetensors.h"
#include "models/config.h"
#include "core/staged_dir.h"
#include "testing.h"
#include "models/checkpoint.h"

using namespace dlcm;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char(uint8_t(v >> (8 * i)));
  return s;
}

// A safetensors file from a header string and raw data bytes.
std::string st_file(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

std::string floats(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), std::data(v), s.size());
  return s;
}

// Expects fn to throw dlcm::Error whose message contains every phrase.
template <typename F>
void expect_error(F&& fn, std::initializer_list<std::string> phrases, const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << what << ": no error thrown";
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const std::string& p : phrases)
      EXPECT_NE(msg.find(p), std::string::npos)
          << what << ": message lacks '" << p << "': " << msg;
  }
}

// Small store: a matrix, a vector and a scalar-ish tensor (odd sizes exercise padding).
void make_store(ParamStore& ps, std::vector<i64> a_shape = {3, 5}) {
  ps.add("layers.0.attn.wq.weight", a_shape, ParamGroup::TokenHidden, true);
  ps.add("layers.0.attn_norm.weight", {7}, ParamGroup::Other, false);
  ps.add("norm.weight", {1}, ParamGroup::Other, false);
  ps.finalize();
}

void fill_store(ParamStore& ps, uint64_t seed) {
  for (Param& p : ps.params()) test::fill_normal(p.w, p.numel, seed++);
}

int count_siblings(const std::string& dir) {
  int n = 0;
  fs::path p(dir);
  std::string base = p.filename().string() + ".";
  for (auto& e : fs::directory_iterator(p.parent_path()))
    if (e.path().filename().string().rfind(base, 0) == 0) ++n;
  return n;
}

Config small_config() {
  Config c;
  c.model.vocab_size = 64;
  c.model.d_token = 32;
  c.model.n_heads = 2;
  c.model.n_kv_heads = 1;
  c.model.head_dim = 16;
  c.train.lr = 1.5e-3f;
  return c;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The parameter store: every name finds its own tensor, each tensor 64-byte aligned in one
// block, registration closed by finalize, and init by each tensor's fields.
TEST(ParamStore, FindsEachNameInitialisesAndClosesAtFinalize) {
  ParamStore ps;
  Param* a = ps.add("a.weight", {3, 5}, ParamGroup::TokenHidden, true);
  Param* n = ps.add("a.norm", {7}, ParamGroup::Other, false);
  Param* r = ps.add("router.wq.weight", {4, 6}, ParamGroup::TokenHidden, true);
  Param* z = ps.add("z.weight", {2, 9}, ParamGroup::Other, true);
  n->init_one = true;
  r->init_identity = true;
  a->init_std = 0.5f;
  expect_error([&] { ps.add("a.norm", {2}, ParamGroup::Other, false); }, {"duplicate", "a.norm"},
               "duplicate name");
  ps.finalize();
  for (Param* p : {a, n, r, z}) {
    EXPECT_EQ(ps.find(p->name), p) << p->name;
    EXPECT_EQ(static_cast<const ParamStore&>(ps).find(p->name), p) << p->name;
    EXPECT_EQ(p->offset % 16, 0) << p->name;
    EXPECT_EQ(p->w, ps.data() + p->offset) << p->name;
    EXPECT_EQ(p->g, ps.grad() + p->offset) << p->name;
  }
  EXPECT_EQ(ps.find("no.such"), nullptr);
  EXPECT_EQ(ps.total(), 16 + 16 + 32 + 32);
  expect_error([&] { ps.add("late", {2}, ParamGroup::Other, false); },
               {"late", "after finalize"}, "add after finalize");
  expect_error([&] { ps.finalize(); }, {"finalized twice"}, "finalize twice");

  ps.init(7);
  for (i64 i = 0; i < n->numel; ++i) EXPECT_EQ(n->w[i], 1.0f);
  for (i64 i = 0; i < 4; ++i)
    for (i64 j = 0; j < 6; ++j) EXPECT_EQ(r->w[i * 6 + j], i == j ? 1.0f : 0.0f) << i << "," << j;
  // normal(0, std): a's std 0.5 against z's default 0.02, each tensor's own values
  double sa = 0, sz = 0;
  for (i64 i = 0; i < a->numel; ++i) sa = std::max(sa, double(std::abs(a->w[i])));
  for (i64 i = 0; i < z->numel; ++i) sz = std::max(sz, double(std::abs(z->w[i])));
  EXPECT_GT(sa, 0.1);
  EXPECT_GT(sz, 0.0);
  EXPECT_LT(sz, 0.1);
  const std::vector<float> first(ps.data(), ps.data() + ps.total());
  ps.init(7);
  EXPECT_EQ(std::vector<float>(ps.data(), ps.data() + ps.total()), first);  // seeded
  ps.init(8);
  EXPECT_NE(std::vector<float>(a->w, a->w + a->numel),
            std::vector<float>(first.begin() + a->offset, first.begin() + a->offset + a->numel));
}

// safetensors round trips

TEST(SafeTensors, ParamsRoundTrip) {
  test::TempDir td;
  ParamStore a, b;
  make_store(a);
  make_store(b);
  fill_store(a, 11);
  const std::string p = td.path + "/m.safetensors";
  save_params(p, a);
  load_params(p, b);
  for (size_t i = 0; i < a.params().size(); ++i) {
    const Param &x = a.params()[i], &y = b.params()[i];
    EXPECT_EQ(0, std::memcmp(x.w, y.w, x.numel * 4)) << x.name;
  }
  // Header is padded so that the data section is 8-byte aligned; no temp file remains.
  std::string bytes = read_bytes(p);
  uint64_t hlen = 0;
  std::memcpy(&hlen, bytes.data(), 8);
  EXPECT_EQ(hlen % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + hlen + 4 * (15 + 7 + 1));
  for (auto& e : fs::directory_iterator(td.path))
    EXPECT_EQ(e.path().filename(), "m.safetensors");
  SafeTensorsFile f(p);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.entries().at("layers.0.attn.wq.weight").shape, (std::vector<i64>{3, 5}));
}

TEST(SafeTensors, MetadataAndI32RoundTrip) {
  test::TempDir td;
  const std::string p = td.path + "/x.safetensors";
  std::vector<float> f = {1.f, -2.f, 3.5f, 0.f, 1e-30f, 7.f};
  std::vector<i32> ids = {0, -1, 2147483647, -2147483647 - 1, 42};
  write_safetensors(p, {{"logits", {2, 3}, f.data(), nullptr}, {"ids", {5}, nullptr, ids.data()},
                        {"empty", {0, 4}, nullptr, nullptr}},
                    {{"note", "hello"}, {"step", "12"}});
  SafeTensorsFile r(p);
  EXPECT_EQ(r.metadata().at("note"), "hello");
  EXPECT_EQ(r.metadata().at("step"), "12");
  EXPECT_EQ(r.read_f32("logits"), f);
  EXPECT_EQ(r.read_i32("ids"), ids);
  EXPECT_EQ(r.entries().at("ids").dtype, "I32");
  EXPECT_TRUE(r.read_f32("empty").empty());
  expect_error([&] { r.read_f32("ids"); }, {"ids", "dtype I32"}, "I32 as float");
  expect_error([&] { r.read_i32("logits"); }, {"logits", "dtype F32"}, "F32 as int");
  expect_error([&] { r.read_f32("nope"); }, {"missing tensor 'nope'"}, "missing");
  std::vector<float> out(6);
  expect_error([&] { r.read_f32("logits", {3, 2}, out.data()); },
               {p, "has shape [2, 3]", "expected [3, 2]"}, "shape");
}

TEST(SafeTensors, ReadsHandBuiltBF16AndI64) {
  test::TempDir td;
  const std::string p = td.path + "/h.safetensors";
  // bf16 is the top 16 bits of a float: 1.0 = 0x3F80, -2.0 = 0xC000, 0.5 = 0x3F00.
  std::string bf = std::string("\x80\x3F\x00\xC0\x00\x3F", 6);
  std::string i64s = le64(5) + le64(uint64_t(-3));
  std::string hdr =
      R"({"b":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},)"
      R"("i":{"dtype":"I64","shape":[2],"data_offsets":[6,22]},)"
      R"("__metadata__":{"k":"v"}})";
  write_bytes(p, st_file(hdr, bf + i64s));
  SafeTensorsFile r(p);
  EXPECT_EQ(r.read_f32("b"), (std::vector<float>{1.f, -2.f, 0.5f}));
  EXPECT_EQ(r.read_i32("i"), (std::vector<i32>{5, -3}));
  EXPECT_EQ(r.metadata().at("k"), "v");

  // I64 values outside int32 are rejected, not truncated.
  std::string hdr2 = R"({"i":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})";
  write_bytes(p, st_file(hdr2, le64(uint64_t(1) << 40)));
  SafeTensorsFile r2(p);
  expect_error([&] { r2.read_i32("i"); }, {"does not fit in int32"}, "i64 range");
}

// Each malformed file must be rejected by the reader (or by load_params) with a message
// naming the file and containing the phrase.
TEST(SafeTensors, MalformedFilesRejected) {
  test::TempDir td;
  const std::string good_hdr = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string good_data = floats({1.f, 2.f});
  struct Case {
    const char* name;
    std::string bytes;
    std::vector<std::string> phrases;
  };
  std::vector<Case> cases = {
      {"too_short", std::string("\x10\x00\x00", 3), {"too short"}},
      {"empty", "", {"too short"}},
      {"truncated_header", le64(200) + good_hdr.substr(0, 20), {"truncated header"}},
      {"truncated_data", st_file(good_hdr, good_data.substr(0, 5)), {"out of bounds", "truncated"}},
      {"absurd_header", le64(uint64_t(1) << 60) + good_hdr, {"absurdly large"}},
      {"header_too_big_for_file", le64(50ull << 20) + good_hdr, {"truncated header"}},
      {"bad_json", st_file(R"({"a":{"dtype":"F32",)", ""), {"header: invalid JSON"}},
      {"not_object", st_file("[1,2]", ""), {"must be a JSON object"}},
      {"entry_not_object", st_file(R"({"a":[1,2]})", ""), {"tensor 'a'", "must be an object"}},
      {"unknown_dtype",
       st_file(R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", good_data),
       {"tensor 'a'", "unknown dtype \"F33\""}},
      {"wrong_dtype_size",
       st_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", good_data),
       {"tensor 'a'", "need 12 bytes", "span 8"}},
      {"bf16_size",
       st_file(R"({"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,8]}})", good_data),
       {"byte size mismatch"}},
      {"out_of_bounds",
       st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", good_data),
       {"tensor 'a'", "out of bounds"}},
      {"reversed_offsets",
       st_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", good_data),
       {"end before they begin"}},
      {"overlap",
       st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
               good_data),
       {"'a'", "'b'", "overlap"}},
      {"float_shape",
       st_file(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", good_data),
       {"shape must be a list of non-negative integers"}},
      {"negative_shape",
       st_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", good_data),
       {"non-negative integers"}},
      {"huge_shape",
       st_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
               good_data),
       {"byte size mismatch"}},
      {"bad_offsets", st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", good_data),
       {"data_offsets must be two"}},
      {"missing_dtype", st_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", good_data),
       {"'dtype'"}},
      {"metadata_not_object", st_file(R"({"__metadata__":[1]})", ""), {"__metadata__"}},
      {"metadata_not_str", st_file(R"({"__metadata__":{"k":3}})", ""),
       {"__metadata__", "'k'", "must be a string"}},
  };
  for (const Case& c : cases) {
    const std::string p = td.path + "/" + c.name + ".safetensors";
    write_bytes(p, c.bytes);
    std::vector<std::string> ph = c.phrases;
    ph.push_back(p);
    try {
      SafeTensorsFile f(p);
      ADD_FAILURE() << c.name << ": accepted";
    } catch (const Error& e) {
      std::string msg = e.what();
      for (const std::string& s : ph)
        EXPECT_NE(msg.find(s), std::string::npos) << c.name << ": message lacks '" << s
                                                  << "': " << msg;
    }
  }
  expect_error([&] { SafeTensorsFile f(td.path + "/does_not_exist.safetensors"); },
               {"does_not_exist.safetensors", "cannot open"}, "missing file");
}

TEST(SafeTensors, LoadParamsChecksNamesAndShapes) {
  test::TempDir td;
  ParamStore ref;
  make_store(ref);
  fill_store(ref, 3);
  const std::string p = td.path + "/m.safetensors";
  save_params(p, ref);

  // Missing tensors: the store has two more parameters than the file; both are named.
  ParamStore more;
  more.add("layers.0.attn.wq.weight", {3, 5}, ParamGroup::TokenHidden, true);
  more.add("layers.0.attn_norm.weight", {7}, ParamGroup::Other, false);
  more.add("norm.weight", {1}, ParamGroup::Other, false);
  more.add("lm_head.weight", {4, 4}, ParamGroup::Other, false);
  more.add("tok_embeddings.weight", {4, 4}, ParamGroup::Other, false);
  more.finalize();
  expect_error([&] { load_params(p, more); },
               {p, "missing tensors", "'lm_head.weight'", "'tok_embeddings.weight'"}, "missing");

  ParamStore fewer;
  fewer.add("layers.0.attn.wq.weight", {3, 5}, ParamGroup::TokenHidden, true);
  fewer.add("norm.weight", {1}, ParamGroup::Other, false);
  fewer.finalize();
  expect_error([&] { load_params(p, fewer); },
               {p, "unexpected tensor 'layers.0.attn_norm.weight' in file",
                "does the config match the checkpoint?"},
               "extra");

  ParamStore wrong;
  make_store(wrong, {5, 3});
  expect_error([&] { load_params(p, wrong); },
               {p, "'layers.0.attn.wq.weight'", "has shape [3, 5]", "expected [5, 3]"}, "shape");
}

// ---------------------------------------------------------------------------------------
// config.json

TEST(Config, MalformedConfigRejected) {
  test::TempDir td;
  struct Case {
    const char* name;
    std::string text;
    std::vector<std::string> phrases;
  };
  std::vector<Case> cases = {
      {"bad_json", R"({"d_token": 64,)", {"invalid JSON"}},
      {"unknown_key", R"({"d_tokn": 64})", {"unknown config key 'd_tokn'"}},
      {"unknown_nested", R"({"router": {"alhpa": 0.5}})", {"'router.alhpa'"}},
      {"wrong_type", R"({"d_token": "64"})", {"'d_token'", "must be a number"}},
      {"not_integer", R"({"n_heads": 2.5})", {"'n_heads'", "must be an integer"}},
      {"wrong_bool", R"({"qk_norm": 1})", {"'qk_norm'", "true or false"}},
      {"kv_heads", R"({"n_heads": 4, "n_kv_heads": 3})", {"'n_kv_heads'", "must divide"}},
      {"negative", R"({"d_ff": -1})", {"'d_ff'", "must be positive"}},
      {"bad_arch", R"({"arch": "gpt"})", {"'arch'", "\"gpt\""}},
  };
  for (const Case& c : cases) {
    // Through load_config (a --config file) ...
    const std::string f = td.path + "/" + c.name + ".json";
    write_bytes(f, c.text);
    std::vector<std::string> ph = c.phrases;
    ph.push_back(f);
    try {
      load_config(f);
      ADD_FAILURE() << c.name << ": accepted by load_config";
    } catch (const Error& e) {
      for (const std::string& s : ph)
        EXPECT_NE(std::string(e.what()).find(s), std::string::npos)
            << c.name << ": lacks '" << s << "': " << e.what();
    }
    // ... and through a checkpoint directory.
    const std::string dir = td.path + "/ckpt_" + c.name;
    fs::create_directory(dir);
    write_bytes(dir + "/config.json", c.text);
    ph.back() = dir + "/config.json";
    try {
      load_checkpoint_config(dir);
      ADD_FAILURE() << c.name << ": accepted by load_checkpoint_config";
    } catch (const Error& e) {
      for (const std::string& s : ph)
        EXPECT_NE(std::string(e.what()).find(s), std::string::npos)
            << c.name << " (checkpoint): lacks '" << s << "': " << e.what();
    }
  }
}

// ---------------------------------------------------------------------------------------
// Checkpoints

TEST(Checkpoint, RoundTripWithOptimizerAndExtras) {
  test::TempDir td;
  Config cfg = small_config();
  ParamStore ps;
  make_store(ps);
  fill_store(ps, 5);
  Buf m(ps.total()), v(ps.total());
  test::fill_normal(m.data(), m.size(), 9);
  test::fill_uniform(v.data(), v.size(), 10, 0.f, 1.f);
  const std::string extra = td.path + "/tokenizer.model";
  write_bytes(extra, "tok-bytes");
  CheckpointWrite w;
  w.config = &cfg;
  w.params = &ps;
  w.exp_avg = &m;
  w.exp_avg_sq = &v;
  w.trainer_state = {{"step", 17}, {"tokens", 12345}, {"rng", 99}};
  w.extra_files = {extra};
  const std::string dir = td.path + "/runs/x";  // parent created on demand
  save_checkpoint(dir, w);

  EXPECT_TRUE(is_checkpoint(dir));
  EXPECT_TRUE(is_checkpoint(dir + "/"));
  EXPECT_FALSE(is_checkpoint(td.path));
  EXPECT_EQ(read_bytes(dir + "/tokenizer.model"), "tok-bytes");
  Config c2 = load_checkpoint_config(dir);
  EXPECT_EQ(config_to_json(c2), config_to_json(cfg));
  EXPECT_EQ(load_trainer_state(dir)["step"], 17);

  ParamStore ps2;
  make_store(ps2);
  load_checkpoint_params(dir, ps2);
  for (size_t i = 0; i < ps.params().size(); ++i)
    EXPECT_EQ(0, std::memcmp(ps.params()[i].w, ps2.params()[i].w, ps.params()[i].numel * 4));
  Buf m2, v2;
  ASSERT_TRUE(load_checkpoint_optimizer(dir, ps2, m2, v2));
  ASSERT_EQ(m2.size(), m.size());
  for (const Param& p : ps.params()) {
    EXPECT_EQ(0, std::memcmp(m.data() + p.offset, m2.data() + p.offset, p.numel * 4)) << p.name;
    EXPECT_EQ(0, std::memcmp(v.data() + p.offset, v2.data() + p.offset, p.numel * 4)) << p.name;
  }
  SafeTensorsFile opt(dir + "/optimizer.safetensors");
  EXPECT_TRUE(opt.has("norm.weight.exp_avg"));
  EXPECT_TRUE(opt.has("norm.weight.exp_avg_sq"));
  EXPECT_EQ(opt.entries().size(), 2 * ps.params().size());

  // Without moments there is no optimizer file, and the loader says so by returning false.
  CheckpointWrite w2 = w;
  w2.exp_avg = w2.exp_avg_sq = nullptr;
  w2.extra_files.clear();
  save_checkpoint(dir, w2);
  EXPECT_FALSE(fs::exists(dir + "/optimizer.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/tokenizer.model"));  // replaced wholesale, not merged
  EXPECT_FALSE(load_checkpoint_optimizer(dir, ps2, m2, v2));
  EXPECT_EQ(count_siblings(dir), 0);
}

TEST(Checkpoint, ReadersNameDirectoryAndFile) {
  test::TempDir td;
  const std::string dir = td.path + "/empty";
  fs::create_directory(dir);
  ParamStore ps;
  make_store(ps);
  expect_error([&] { load_checkpoint_config(dir); },
               {dir, "not a checkpoint directory (no config.json)", "dlcm train"}, "no config");
  expect_error([&] { load_checkpoint_params(td.path + "/nope", ps); },
               {"nope", "does not exist"}, "no dir");

  Config cfg = small_config();
  fill_store(ps, 1);
  CheckpointWrite w;
  w.config = &cfg;
  w.params = &ps;
  const std::string ck = td.path + "/ck";
  save_checkpoint(ck, w);
  write_bytes(ck + "/trainer_state.json", "{oops");
  expect_error([&] { load_trainer_state(ck); }, {ck + "/trainer_state.json", "invalid JSON"},
               "bad state");
  fs::remove(ck + "/model.safetensors");
  EXPECT_FALSE(is_checkpoint(ck));
  expect_error([&] { load_checkpoint_params(ck, ps); }, {ck, "no model.safetensors"}, "no model");
  write_bytes(ck + "/optimizer.safetensors", "junk");
  Buf a, b;
  expect_error([&] { load_checkpoint_optimizer(ck, ps, a, b); },
               {ck + "/optimizer.safetensors", "too short"}, "broken optimizer");
  w.extra_files = {td.path + "/missing.model"};
  const std::string ck2 = td.path + "/ck2";
  expect_error([&] { save_checkpoint(ck2, w); }, {"missing.model", "does not exist"}, "extra");
  EXPECT_FALSE(fs::exists(ck2));
  EXPECT_EQ(count_siblings(ck2), 0);  // failed save leaves no temp dir
}

// A small model's checkpoint to write: its config, parameters filled from a seed, a step.
struct CheckpointToWrite {
  Config cfg = small_config();
  ParamStore ps;
  CheckpointWrite w;
  CheckpointToWrite(uint64_t seed, int step) {
    make_store(ps);
    fill_store(ps, seed);
    w.config = &cfg;
    w.params = &ps;
    w.trainer_state = {{"step", step}};
  }
  CheckpointToWrite(const CheckpointToWrite&) = delete;  // w points into it
};

TEST(Checkpoint, AtomicReplaceAndCrashRecovery) {
  test::TempDir td;
  CheckpointToWrite c(21, 1);
  ParamStore& ps = c.ps;
  CheckpointWrite& w = c.w;
  const std::string dir = td.path + "/ck";
  save_checkpoint(dir, w);

  // Simulated crash mid-save: a half-written temp dir from a dead process (pid 0x7ffffff0 is
  // beyond pid_max) beside the intact checkpoint. The checkpoint still loads.
  const std::string stale = dir + ".tmp-2147483632";
  fs::create_directory(stale);
  write_bytes(stale + "/model.safetensors", "half");
  EXPECT_TRUE(is_checkpoint(dir));
  EXPECT_EQ(load_trainer_state(dir)["step"], 1);
  ParamStore ps2;
  make_store(ps2);
  load_checkpoint_params(dir, ps2);
  EXPECT_EQ(ps2.params()[0].w[0], ps.params()[0].w[0]);

  // A save that fails midway (missing extra file) leaves the previous checkpoint untouched.
  CheckpointWrite bad = w;
  bad.trainer_state = {{"step", 99}};
  bad.extra_files = {td.path + "/no_such_tokenizer.model"};
  expect_error([&] { save_checkpoint(dir, bad); }, {"no_such_tokenizer.model"}, "failed save");
  EXPECT_EQ(load_trainer_state(dir)["step"], 1);

  // The next save replaces the old checkpoint and sweeps the stale temp dir.
  fill_store(ps, 22);
  w.trainer_state = {{"step", 2}};
  save_checkpoint(dir, w);
  EXPECT_EQ(load_trainer_state(dir)["step"], 2);
  load_checkpoint_params(dir, ps2);
  EXPECT_EQ(ps2.params()[0].w[0], ps.params()[0].w[0]);
  EXPECT_EQ(count_siblings(dir), 0);

  // Crash between the two renames: only DIR.old-PID survives. Readers point at it, and
  // recovery (also run by the next save) restores it.
  const std::string old = dir + ".old-2147483632";
  fs::rename(dir, old);
  fs::create_directory(dir + ".tmp-2147483632");
  expect_error([&] { load_checkpoint_config(dir); }, {old, "interrupted save", "rename it"},
               "hint at old");
  EXPECT_EQ(clean_stale_checkpoint_siblings(dir), 1);
  EXPECT_TRUE(is_checkpoint(dir));
  EXPECT_EQ(load_trainer_state(dir)["step"], 2);
  EXPECT_EQ(count_siblings(dir), 0);

  // A non-checkpoint folder is never replaced (a typo in --out must not delete files).
  const std::string other = td.path + "/notes";
  fs::create_directory(other);
  write_bytes(other + "/keep.txt", "precious");
  expect_error([&] { save_checkpoint(other, w); }, {other, "not a checkpoint", "refusing"},
               "non-checkpoint dir");
  EXPECT_EQ(read_bytes(other + "/keep.txt"), "precious");
  EXPECT_EQ(count_siblings(other), 0);
  const std::string empty = td.path + "/empty";
  fs::create_directory(empty);
  save_checkpoint(empty, w);  // an empty folder is fine
  EXPECT_TRUE(is_checkpoint(empty));

  // A temp dir owned by a live process (ours counts as stale only for our own pid, so use
  // the parent's pid) is left alone.
  const std::string live = dir + ".tmp-" + std::to_string(getppid());
  fs::create_directory(live);
  clean_stale_checkpoint_siblings(dir);
  EXPECT_TRUE(fs::exists(live));
  fs::remove_all(live);

  // Siblings whose suffix is not a pid are not a save's: left alone, and they stop no save (a
  // suffix that is not a number, or a number too long for a pid, once threw from its parse).
  const std::vector<std::string> foreign = {dir + ".tmp-notes", dir + ".old-1x",
                                            dir + ".tmp-123456789012345678901234",
                                            dir + ".old-99999999999"};
  for (const std::string& f : foreign) fs::create_directory(f);
  EXPECT_EQ(clean_stale_checkpoint_siblings(dir), 0);
  w.trainer_state = {{"step", 3}};
  save_checkpoint(dir, w);
  EXPECT_EQ(load_trainer_state(dir)["step"], 3);
  for (const std::string& f : foreign) EXPECT_TRUE(fs::is_directory(f)) << f;
}

// copy_checkpoint (the trainer's kept step checkpoints) hard-links each file, and copies it
// where a link cannot be made: here across two file systems (the test folder and /dev/shm).
TEST(Checkpoint, CopyLinksOrCopiesEveryFile) {
  test::TempDir td;
  CheckpointToWrite c(23, 7);
  const ParamStore& ps = c.ps;
  const std::string src = td.path + "/ck";
  save_checkpoint(src, c.w);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(src)) files.push_back(e.path().filename().string());
  ASSERT_GE(files.size(), 3u);
  auto same_files = [&](const std::string& dst) {
    for (const std::string& f : files)
      EXPECT_EQ(read_bytes(dst + "/" + f), read_bytes(src + "/" + f)) << dst << "/" << f;
    ParamStore back;
    make_store(back);
    load_checkpoint_params(dst, back);
    EXPECT_EQ(back.params()[0].w[0], ps.params()[0].w[0]);
    EXPECT_EQ(load_trainer_state(dst)["step"], 7);
    EXPECT_EQ(count_siblings(dst), 0);
  };
  // the same file system: links
  const std::string linked = td.path + "/step-7";
  copy_checkpoint(src, linked);
  same_files(linked);
  EXPECT_EQ(fs::hard_link_count(linked + "/model.safetensors"), 2u);

  struct stat a{}, b{};
  if (::stat(td.path.c_str(), &a) != 0 || ::stat("/dev/shm", &b) != 0 || a.st_dev == b.st_dev)
    GTEST_SKIP() << "no second file system at /dev/shm beside " << td.path;
  struct Removed {  // also when a check throws
    std::string path;
    ~Removed() { fs::remove_all(path); }
  } other{"/dev/shm/dlcm-test-copy-" + std::to_string(getpid())};
  fs::remove_all(other.path);
  copy_checkpoint(src, other.path);
  same_files(other.path);
  EXPECT_EQ(fs::hard_link_count(other.path + "/model.safetensors"), 1u);  // a copy, not a link
}

// A text file (an export's config.json, a shard index) that cannot be written whole is an error
// naming the file, never a short file reported as written. The failure is a file-size limit
// (writes fail with EFBIG as they would with ENOSPC; SIGXFSZ ignored), where fsync still
// succeeds: the error must come from the write itself.
TEST(StagedDir, ATextFileThatCannotBeWrittenWholeIsAnError) {
  test::TempDir tmp;
  const std::string path = tmp.path + "/config.json";
  const std::string text(256 * 1024, 'x');
  write_text_file_synced(path, text);
  EXPECT_EQ(fs::file_size(path), text.size());
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit small = old;
  small.rlim_cur = 64 * 1024;
  const auto prev = std::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  expect_error([&] { write_text_file_synced(path, text); }, {path + ": write failed"},
               "a text file written in part");
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, prev);
}
