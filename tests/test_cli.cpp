// The dlcm binary as a user meets it: one-line errors naming the problem, non-zero exits,
// and the forward/flops commands on a real (tiny) checkpoint.
#include <cstdio>
#include <fstream>

#include "core/safetensors.h"
#include "model_fixtures.h"
#include "testing.h"

using namespace dlcm;

using test::CmdResult;
static CmdResult run(const std::string& args) { return test::run_dlcm(args); }

TEST(Cli, BadInputsGiveOneLineErrors) {
  test::TempDir tmp;
  struct Case {
    std::string args, expect;
  } cases[] = {
      {"generate --ckpt " + tmp.path + "/nope --prompt hi", "no such checkpoint"},
      {"forward --ckpt " + tmp.path + " --tokens x --out y", "not a checkpoint"},
      {"train --config " + tmp.path + "/missing.json --data d --out o", "cannot open config"},
      {"flops --config " + tmp.path + "/bad.json", "invalid JSON"},
      {"flops --config " + tmp.path + "/unknown.json", "unknown config key 'd_modle'"},
      {"flops --config " + tmp.path + "/good.json --set x", "expected key=value"},
      {"flops --config " + tmp.path + "/good.json --set n_kv_heads=3", "must divide"},
  };
  std::ofstream(tmp.path + "/bad.json") << "{\"d_token\": ";
  std::ofstream(tmp.path + "/unknown.json") << "{\"d_modle\": 3}";
  std::ofstream(tmp.path + "/good.json") << "{}";
  for (auto& c : cases) {
    CmdResult r = run(c.args);
    EXPECT_NE(r.rc, 0) << c.args;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << " -> " << r.out;
    EXPECT_NE(r.out.find("dlcm: error:"), std::string::npos) << r.out;
  }
}

TEST(Cli, ForwardWritesLogitsMatchingTheLibrary) {
  test::TempDir tmp;
  Config c = test::tiny_baseline();
  auto m = make_initialised_model(c.model, 5);
  test::save_model_only(tmp.path + "/ck", c, m->params());
  const i64 B = 2, L = 6, V = c.model.vocab_size;
  auto tok = test::random_tokens(B * L, V, 3);
  test::write_rows(tmp.path + "/t.txt", tok, B, L);
  CmdResult r = run("forward --ckpt " + tmp.path + "/ck --tokens " + tmp.path + "/t.txt --out " +
              tmp.path + "/o.safetensors");
  ASSERT_EQ(r.rc, 0) << r.out;
  SafeTensorsFile f(tmp.path + "/o.safetensors");
  auto got = f.read_f32("logits");
  Buf want(B * L * V);
  m->logits(tok.data(), B, L, want.data());
  ASSERT_EQ(got.size(), want.size());
  EXPECT_LT(test::rel_err(got.data(), want.data(), got.size()), 1e-6);
  // a token outside the vocabulary is named
  std::ofstream(tmp.path + "/bad.txt") << "1 2 999\n";
  r = run("forward --ckpt " + tmp.path + "/ck --tokens " + tmp.path + "/bad.txt --out " +
          tmp.path + "/o2.safetensors");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("outside the vocabulary"), std::string::npos) << r.out;
}
