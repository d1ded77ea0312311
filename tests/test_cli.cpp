// The dlcm binary as a user meets it: one-line errors naming the problem, non-zero exits,
// and the forward/flops/generate/segment/bench decode commands on real (tiny) checkpoints.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/build_info.h"
#include "core/safetensors.h"
#include "data/tokenizer.h"
#include "kernels/isa.h"
#include "model_fixtures.h"
#include "testing.h"
#include "tools/cli_help.h"

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

TEST(Cli, ForwardWritesDlcmLogitsAndBoundaries) {
  test::TempDir tmp;
  Config c = test::tiny_dlcm();
  auto m = make_initialised_model(c.model, 6);
  test::save_model_only(tmp.path + "/ck", c, m->params());
  const i64 B = 2, L = 30, V = c.model.vocab_size;
  auto tok = test::random_tokens(B * L, V, 4, c.model.bos_id, 0.1);
  tok[0] = tok[L] = c.model.bos_id;
  test::write_rows(tmp.path + "/t.txt", tok, B, L);
  CmdResult r = run("forward --ckpt " + tmp.path + "/ck --tokens " + tmp.path + "/t.txt --out " +
                    tmp.path + "/o.safetensors");
  ASSERT_EQ(r.rc, 0) << r.out;
  SafeTensorsFile f(tmp.path + "/o.safetensors");
  auto logits = f.read_f32("logits"), p = f.read_f32("p"), b = f.read_f32("b");
  Buf want(B * L * V), wp(B * L);
  std::vector<uint8_t> wb(B * L);
  m->logits(tok.data(), B, L, want.data());
  m->boundaries(tok.data(), B, L, wp.data(), wb.data(), -1);
  ASSERT_EQ(logits.size(), want.size());
  EXPECT_LT(test::rel_err(logits.data(), want.data(), want.size()), 1e-5);
  EXPECT_EQ(test::max_abs_diff(p.data(), wp.data(), B * L), 0.0);
  for (i64 n = 0; n < B * L; ++n) EXPECT_EQ(b[n], float(wb[n])) << n;
  EXPECT_EQ(b[0], 1.f);
  EXPECT_EQ(b[L], 1.f);
}

TEST(Cli, GenerateAndSegmentBadInputs) {
  test::TempDir tmp;
  const std::string ck = test::byte_checkpoint(tmp.path + "/ck", test::tiny_baseline(), 16);
  // a corrupt checkpoint: model.safetensors cut short
  const std::string bad = tmp.path + "/bad";
  std::filesystem::copy(ck, bad);
  std::ofstream(bad + "/model.safetensors", std::ios::trunc) << "\x10\x00\x00";
  std::ofstream(tmp.path + "/prompts.txt") << "\n   \n";
  struct Case {
    std::string args, expect;
  } cases[] = {
      {"generate --ckpt " + ck + " --prompt ''", "empty prompt"},
      {"generate --ckpt " + ck + " --prompt 'this prompt is longer than sixteen bytes'",
       "--prompt: 41 tokens (with BOS) exceed the model's context of 16 tokens"},
      {"generate --ckpt " + tmp.path + "/nope --prompt hi", "no such checkpoint"},
      {"generate --ckpt " + bad + " --prompt hi", "model.safetensors"},
      {"generate --ckpt " + ck + " --prompt-file " + tmp.path + "/prompts.txt", "no prompts"},
      {"generate --ckpt " + ck + " --prompt-file " + tmp.path + "/none.txt", "cannot open the prompt file"},
      {"generate --ckpt " + ck + " --prompt a --prompt-file " + tmp.path + "/prompts.txt", "not both"},
      {"segment --ckpt " + ck + " --text hello", "without concepts; segment needs a dlcm checkpoint"},
      {"segment --ckpt " + ck, "give --text TEXT or --file F"},
      {"segment --ckpt " + ck + " --text ''", "empty text"},
      {"segment --ckpt " + ck + " --text a --tau 0.5 --target-R 3", "not both"},
      {"segment --ckpt " + bad + " --text hello", "model.safetensors"},
  };
  for (auto& c : cases) {
    CmdResult r = run(c.args);
    EXPECT_NE(r.rc, 0) << c.args;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << " -> " << r.out;
    EXPECT_NE(r.out.find("dlcm: error:"), std::string::npos) << r.out;
    // one line
    EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << c.args << " -> " << r.out;
  }
}

TEST(Cli, GenerateStreamsOnePromptAndBatchesAFile) {
  test::TempDir tmp;
  const std::string ck = test::byte_checkpoint(tmp.path + "/ck", test::tiny_baseline());
  CmdResult r = run("generate --ckpt " + ck +
                    " --prompt 'Hello' --max-new-tokens 12 --temperature 0 --ignore-eos --quiet");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(r.out.rfind("Hello", 0), 0u) << r.out;  // the prompt, then the completion
  // Same seed, same text; the baseline has no concepts to show.
  std::string sample = "generate --ckpt " + ck + " --prompt 'Hi' --max-new-tokens 10 --seed 3 --quiet";
  EXPECT_EQ(run(sample).out, run(sample).out);
  // BF16 and int8 weights in the decode: run, and a bad precision is a one-line error
  for (const char* prec : {"bf16", "int8"}) {
    r = run("generate --ckpt " + ck + " --prompt 'Hello' --max-new-tokens 5 --temperature 0 "
            "--ignore-eos --quiet --precision " + prec);
    ASSERT_EQ(r.rc, 0) << prec << ": " << r.out;
    EXPECT_EQ(r.out.rfind("Hello", 0), 0u) << r.out;
  }
  r = run("generate --ckpt " + ck + " --prompt 'Hello' --precision fp16");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--precision: expected \"fp32\", \"bf16\" or \"int8\""), std::string::npos)
      << r.out;
  r = run("generate --ckpt " + ck + " --prompt 'Hi' --max-new-tokens 3 --show-concepts");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("concepts do not apply"), std::string::npos) << r.out;
  std::ofstream(tmp.path + "/p.txt") << "one\n\ntwo\nthree\n";
  r = run("generate --ckpt " + ck + " --prompt-file " + tmp.path +
          "/p.txt --max-new-tokens 5 --batch 2 --temperature 0 --ignore-eos");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* h : {"[1/3] ", "[2/3] ", "[3/3] "})
    EXPECT_NE(r.out.find(h), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("p.txt:4: stop: length, 5 tokens"), std::string::npos) << r.out;
  // the context limit ends generation with a message, not an error
  r = run("generate --ckpt " + ck + " --prompt 'abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz' "
          "--max-new-tokens 50 --temperature 0 --ignore-eos");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("stopped at the context limit of 64 tokens"), std::string::npos) << r.out;
}

// A DLCM at the command line: `generate --show-concepts` (one entry per generated token in the
// batch listing, the same p and concept index as --json gives) and `segment` over two texts,
// each under its own name.
TEST(Cli, DlcmGenerateShowsConceptsAndSegmentNamesTexts) {
  test::TempDir tmp;
  const std::string ck = test::byte_checkpoint(tmp.path + "/ck", test::tiny_dlcm(), 96, 7);
  std::ofstream(tmp.path + "/p.txt") << "one two\nthree\n";
  const std::string gen = "generate --ckpt " + ck + " --max-new-tokens 4 --temperature 0 "
                          "--ignore-eos --show-concepts --quiet ";
  CmdResult r = run(gen + "--prompt-file " + tmp.path + "/p.txt --batch 2");
  ASSERT_EQ(r.rc, 0) << r.out;
  // "concepts: PIECE/P/INDEX ..." after each completion: its p and index per token
  std::vector<std::vector<std::pair<double, int>>> listed;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("concepts:", 0) != 0) continue;
    listed.emplace_back();
    std::istringstream words(line.substr(9));
    for (std::string w; words >> w;) {
      const size_t b = w.rfind('/'), a = w.rfind('/', b - 1);
      ASSERT_TRUE(a != std::string::npos && b != std::string::npos && a < b) << w;
      listed.back().push_back({std::stod(w.substr(a + 1, b - a - 1)), std::stoi(w.substr(b + 1))});
    }
  }
  ASSERT_EQ(listed.size(), 2u) << r.out;
  const char* prompts[2] = {"one two", "three"};
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(listed[i].size(), 4u) << r.out;  // one per generated token, no more
    r = run(gen + "--json --prompt '" + prompts[i] + "'");
    ASSERT_EQ(r.rc, 0) << r.out;
    const auto j = nlohmann::json::parse(r.out.substr(0, r.out.find('\n')));
    ASSERT_EQ(j["concepts"].size(), 4u) << r.out;
    for (int k = 0; k < 4; ++k) {
      // printed with two decimals (0.005), from a batch of two instead of one (~1e-7)
      EXPECT_NEAR(listed[i][k].first, j["concepts"][k]["p"].get<double>(), 0.006) << i << " " << k;
      EXPECT_EQ(listed[i][k].second, j["concepts"][k]["concept"].get<int>()) << i << " " << k;
    }
  }
  // segment: two texts, each under its name ("text" alone only for one text)
  r = run("segment --ckpt " + ck + " --text 'a first text' --text 'and a second'");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* h : {"== text 1 ==", "== text 2 ==", "text 1: 13 tokens (with BOS)",
                        "text 2: 13 tokens (with BOS)"})
    EXPECT_NE(r.out.find(h), std::string::npos) << h << "\n" << r.out;
  r = run("segment --ckpt " + ck + " --text 'one text'");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("text: 9 tokens (with BOS)"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("== text"), std::string::npos) << r.out;
}

// A tiny baseline config file (d 32, 2 layers, 64 tokens) in dir; returns its path.
std::string tiny_config_file(const std::string& dir, const std::string& train_extra = "") {
  const std::string cfg = dir + "/tiny.json";
  std::ofstream(cfg) << "{\"vocab_size\": 64, \"d_token\": 32, \"n_heads\": 2, \"n_kv_heads\": 1,"
                        " \"head_dim\": 16, \"d_ff\": 64, \"n_layers\": 2, \"max_seq_len\": 64,"
                        " \"train\": {\"seq_len\": 64" << train_extra << "}}";
  return cfg;
}

TEST(Cli, BenchDecodeRuns) {
  test::TempDir tmp;
  const std::string cfg = tiny_config_file(tmp.path);
  CmdResult r = run("bench decode --config " + cfg + " --prompt-len 20 --new-tokens 10 --batch 2 "
                    "--precision fp32,bf16");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("[fp32] speed-up of the caches"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("agree with the fp32 recompute for 10 of 10"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[bf16] decode tokens/s against [fp32]"), std::string::npos) << r.out;
  // --no-recompute: no baseline; the second precision's tokens against the first one's
  r = run("bench decode --config " + cfg + " --prompt-len 20 --new-tokens 10 --precision fp32,bf16 "
          "--no-recompute");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("decode by recompute    : skipped (--no-recompute)"), std::string::npos)
      << r.out;
  EXPECT_EQ(r.out.find("speed-up of the caches"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[bf16] greedy tokens agree with [fp32]'s for"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[bf16] decode with caches"), std::string::npos) << r.out;
  // --data: each format's validation CE through its stream, against the first format's
  r = run("bench decode --config " + cfg + " --prompt-len 4 --new-tokens 2 --data " + tmp.path);
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--data measures a trained model's quality; give --ckpt too"),
            std::string::npos) << r.out;
  {
    std::ofstream f(tmp.path + "/corpus.txt");
    for (int d = 0; d < 60; ++d) f << "the model reads tokens and writes text, line " << d << ".\n\f";
  }
  r = run("prepare --input " + tmp.path + "/corpus.txt --out " + tmp.path +
          "/data --tokenizer bytes --val-fraction 0.3");
  ASSERT_EQ(r.rc, 0) << r.out;
  // the progress a user sees: what was read, kept and written
  for (const char* l : {"prepare: read 1 file(s): 61 documents, kept 60", "prepare: tokenizer bytes vocab 260"})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  const std::string qck = test::byte_checkpoint(tmp.path + "/ck", test::tiny_baseline());
  r = run("bench decode --ckpt " + qck + " --prompt-len 8 --new-tokens 4 --precision fp32,bf16,int8 "
          "--data " + tmp.path + "/data --val-windows 3");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("stream quality: 3 validation windows of 64 tokens"), std::string::npos) << r.out;
  for (const char* l : {"[fp32] validation CE through the stream", "[int8] validation CE through the stream",
                        "against [fp32]; argmax agrees on", "[int8] decode tokens/s against [fp32]"})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  // bench prefill: two checkpoints in one run, the second against the first
  const std::string& ck = qck;
  r = run("bench prefill --ckpt " + ck + " --ckpt " + ck + " --prompt-len 16 --repeats 2 --breakdown");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("model 1 / model 0 prefill tokens/s"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  its repeats at matched FLOPs as run (wall): quartiles "),
            std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" of 2\n"), std::string::npos) << r.out;  // 2 repeats
  EXPECT_NE(r.out.find("stream layers"), std::string::npos) << r.out;
  // the passive wait policy with several threads: one note per process (with one thread none)
  for (int threads : {2, 1}) {
    const test::CommandResult w = test::run_command(
        "OMP_WAIT_POLICY=passive " + std::string(DLCM_BINARY) + " bench prefill --ckpt " + ck +
        " --ckpt " + ck + " --prompt-len 16 --repeats 1 --threads " + std::to_string(threads) +
        " 2>&1");
    ASSERT_EQ(w.rc, 0) << w.out;
    const size_t note = w.out.find("OMP_WAIT_POLICY=passive with 2 threads: every parallel region");
    if (threads == 2) {
      EXPECT_NE(note, std::string::npos) << w.out;
      EXPECT_EQ(w.out.find("OMP_WAIT_POLICY=passive with", note + 1), std::string::npos) << w.out;
    } else {
      EXPECT_EQ(w.out.find("OMP_WAIT_POLICY=passive with"), std::string::npos) << w.out;
    }
  }
  // --breakdown-gemm: the products in a row of their own, and by shape (16 prompt rows)
  r = run("bench prefill --ckpt " + ck + " --prompt-len 16 --repeats 2 --breakdown-gemm");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* l : {"model 0 products per prefill", "    GEMM ", "NT       16 x    16 x    16"})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  // --in-a-row: several prefills per repeat, the per-prefill figures divided by the kept ones
  // (the same calls per prefill as one in a row)
  auto calls_of = [](const std::string& out) {
    const size_t at = out.find("NT       16 x    16 x    16");
    return at == std::string::npos ? std::string() : out.substr(at, out.find(" ms", at) - at);
  };
  const std::string one = calls_of(r.out);
  r = run("bench prefill --ckpt " + ck + " --ckpt " + ck +
          " --prompt-len 16 --repeats 2 --in-a-row 3 --breakdown-gemm");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("3 prefills of a model in a row"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("model 1 / model 0 prefill tokens/s"), std::string::npos) << r.out;
  const std::string three = calls_of(r.out);
  ASSERT_FALSE(one.empty());
  EXPECT_EQ(three.substr(0, three.find("calls") + 12), one.substr(0, one.find("calls") + 12))
      << r.out;
  // --products-in-order: each product of a prefill in a row of its own, numbered in call
  // order, one call each per prefill (the shape rows above sum several layers' calls)
  r = run("bench prefill --ckpt " + ck + " --prompt-len 16 --repeats 2 --products-in-order");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* l : {"model 0 products per prefill, in call order", "  #   0  NT       16 x ",
                        "  #   1  NT       16 x "})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  {
    size_t rows = 0, ones = 0;
    for (size_t at = r.out.find("  #"); at != std::string::npos; at = r.out.find("  #", at + 1)) {
      ++rows;
      const std::string line = r.out.substr(at, r.out.find('\n', at) - at);
      ones += line.find("calls   1.0 ") != std::string::npos;
    }
    EXPECT_GE(rows, 3u) << r.out;
    EXPECT_EQ(ones, rows) << r.out;
  }
  // --precision: the streams' weight format, named in the header; a wrong one names the flag
  r = run("bench prefill --ckpt " + ck + " --ckpt " + ck + " --prompt-len 16 --repeats 1 --precision int8");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("prompt 16 tokens (random tokens), int8 weights"), std::string::npos) << r.out;
  // --data: each sequence's prompt is a document of the validation split (BOS first), from
  // --data-at on; too few documents for the batch name the file and the flags to lower
  r = run("bench prefill --ckpt " + ck + " --ckpt " + ck + " --prompt-len 16 --repeats 1 --batch 2 "
          "--data " + tmp.path + "/data");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("prompt 16 tokens (text of " + tmp.path + "/data/val.bin)"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("prompts: " + tmp.path + "/data/val.bin tokens from 0, "), std::string::npos)
      << r.out;  // the split starts with a document; the second prompt starts at a later one
  r = run("bench prefill --ckpt " + ck + " --prompt-len 16 --repeats 1 --data " + tmp.path +
          "/data --data-at 1");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(r.out.find("tokens from 0"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("tokens from 1\n"), std::string::npos) << r.out;  // 1 is not a BOS
  r = run("bench prefill --ckpt " + ck + " --prompt-len 16 --repeats 1 --batch 500 --data " +
          tmp.path + "/data");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--batch asks for 500; lower --batch, --prompt-len or --data-at"),
            std::string::npos) << r.out;
  r = run("bench prefill --ckpt " + ck + " --prompt-len 16 --data " + tmp.path + "/nothing");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find(tmp.path + "/nothing/val.bin"), std::string::npos) << r.out;
  // --prefetch-c on,off: each checkpoint under both settings in the same repeats; the models
  // against the first checkpoint's entry of the same setting, and each setting against the
  // checkpoint's first
  r = run("bench prefill --ckpt " + ck + " --ckpt " + ck + " --prompt-len 16 --repeats 1 "
          "--prefetch-c on,off");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* l : {"model 1: ", "model 3: ", "params, packed weights ",
                        "MiB, prefetch-c off, last-rows on\n",
                        "model 2 / model 0 prefill tokens/s: ", "model 3 / model 1 prefill tokens/s: ",
                        "model 1 / model 0 prefill tokens/s (checkpoint 0, prefetch-c off, "
                        "last-rows on / prefetch-c on, last-rows on): ",
                        "model 3 / model 2 prefill tokens/s (checkpoint 1, prefetch-c off, "
                        "last-rows on / prefetch-c on, last-rows on): "})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  EXPECT_EQ(r.out.find("model 2 / model 1"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("model 4"), std::string::npos) << r.out;
  // --last-rows on,off (with one --prefetch-c value: two entries per checkpoint); "as run"
  // counts the final block's skipped rows only for the entries that skip them
  r = run("bench prefill --ckpt " + ck + " --ckpt " + ck + " --prompt-len 16 --repeats 1 "
          "--last-rows on,off --prefetch-c on");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* l : {"MiB, prefetch-c on, last-rows off\n",
                        "model 2 / model 0 prefill tokens/s: ", "model 3 / model 1 prefill tokens/s: ",
                        "(head and final block's tail once per prompt, x 1.000",
                        "(head once per prompt, x 1.000",
                        "model 1 / model 0 prefill tokens/s (checkpoint 0, prefetch-c on, "
                        "last-rows off / prefetch-c on, last-rows on): "})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  EXPECT_EQ(r.out.find("model 4"), std::string::npos) << r.out;
  // bad values: an error naming the flag
  const std::pair<const char*, const char*> bad[] = {{" --last-rows maybe", "--last-rows"},
                                                     {" --prefetch-c sometimes", "--prefetch-c"},
                                                     {" --precision fp16", "--precision: expected"},
                                                     {" --in-a-row 0", "--in-a-row"}};
  for (const auto& [flags, msg] : bad) {
    r = run("bench prefill --ckpt " + ck + flags);
    EXPECT_NE(r.rc, 0) << flags;
    EXPECT_NE(r.out.find(msg), std::string::npos) << flags << "\n" << r.out;
  }
}

// bench train --breakdown-gemm: the products, the attention kernel and SwiGLU in rows of their
// own, and the products by shape (here the k projection: 2 rows x 64 tokens, 1 kv head of 16,
// d 32).
TEST(Cli, BenchTrainBreakdownGemm) {
  test::TempDir tmp;
  const std::string cfg = tiny_config_file(tmp.path, ", \"batch_size\": 2");
  CmdResult r = run("bench train --config " + cfg + " --no-torch --steps 1 --repeats 1 --breakdown-gemm");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* l : {"breakdown of one training step", "    GEMM ", "    attention kernel",
                        "    SwiGLU ", "GEMMs by shape", "NT      128 x    16 x    32"})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
}

// bench train --compare: a DLCM timed in the same repeats as the baseline, its MFU printed as a
// difference in points from the baseline engine of the same precision; PyTorch peers refused.
TEST(Cli, BenchTrainComparesModelsInOneRun) {
  test::TempDir tmp;
  const std::string base = tiny_config_file(tmp.path, ", \"batch_size\": 2");
  const std::string dl = tmp.path + "/tiny-dlcm.json";
  std::ofstream(dl) << config_to_json(test::tiny_dlcm()).dump(1);
  CmdResult r = run("bench train --config " + base + " --compare " + dl +
                    " --no-torch --steps 1 --repeats 1 --precision fp32,bf16");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* l : {"model tiny-dlcm: " , "parameters tiny-dlcm: ", "model FLOPs tiny-dlcm: ",
                        "(tiny-dlcm: 60)", "dlcm engine tiny fp32", "dlcm engine tiny-dlcm bf16",
                        "MFU of tiny-dlcm fp32 minus tiny fp32 (points",
                        "MFU of tiny-dlcm bf16 minus tiny bf16 (points"})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  // tokens/s ratios stay within one model
  EXPECT_NE(r.out.find("tiny bf16 / tiny fp32 tokens/s"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("tiny-dlcm fp32 / tiny fp32 tokens/s"), std::string::npos) << r.out;
  r = run("bench train --config " + base + " --compare " + dl + " --steps 1 --repeats 1");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--compare: add --no-torch"), std::string::npos) << r.out;
  // --R applies to every DLCM compared, and is checked for each (here only the second is one)
  r = run("bench train --config " + base + " --compare " + dl + " --no-torch --R 0.5");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--R must be > 1"), std::string::npos) << r.out;
  r = run("bench train --config " + base + " --compare " + tmp.path + "/missing.json --no-torch");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("missing.json"), std::string::npos) << r.out;
}

// bench train --gemm runtime,onednn,blocked: the engine with and without dlcm's blocked sgemm,
// side by side (and fixed-brgemm-nt: x W^T on fixed-shape primitives); bench gemm --torch names
// a missing interpreter.
TEST(Cli, BenchTrainOnednnEngineAndBenchGemmPeer) {
  test::TempDir tmp;
  const std::string cfg = tiny_config_file(tmp.path, ", \"batch_size\": 2");
  CmdResult r = run("bench train --config " + cfg + " --no-torch --steps 1 --repeats 1 --gemm runtime,onednn,blocked,fixed-brgemm-nt");
  ASSERT_EQ(r.rc, 0) << r.out;
  for (const char* l : {"dlcm engine fp32/runtime", "dlcm engine fp32/onednn", "dlcm engine fp32/blocked",
                        "dlcm engine fp32/fixed-brgemm-nt"})
    EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  // the hardware's FMA rate beside the GEMM peak, at a vector kernel level
  if (ops::isa() != ops::Isa::Scalar) {
    EXPECT_NE(r.out.find("FP32 FMA ceiling (" + std::string(ops::isa_name(ops::isa())) +
                         " register loop"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("FP32 L1 loop ceiling (" + std::string(ops::isa_name(ops::isa())) +
                         " micro-kernel tile fed from L1"), std::string::npos) << r.out;
  }
  // the AMX tile kernel's whole packs with ordinary stores, side by side with the default's
  // non-temporal ones (on a CPU without AMX both engines run oneDNN: the same command works)
  if (ops::cpu_has_bf16()) {
    r = run("bench train --config " + cfg +
            " --no-torch --steps 1 --repeats 1 --precision bf16 --gemm "
            "tiles,tiles-plain-stores,tiles-plain-outputs");
    ASSERT_EQ(r.rc, 0) << r.out;
    for (const char* l : {"dlcm engine bf16/tiles ", "dlcm engine bf16/tiles-plain-stores",
                          "bf16/tiles-plain-stores / bf16/tiles tokens/s",
                          "dlcm engine bf16/tiles-plain-outputs",
                          "bf16/tiles-plain-outputs / bf16/tiles tokens/s"})
      EXPECT_NE(r.out.find(l), std::string::npos) << l << "\n" << r.out;
  }
  r = run("bench gemm --repeats 1 --seconds 0.01 --torch " + tmp.path + "/no-python");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--torch"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("no such interpreter"), std::string::npos) << r.out;
}

// ---------------------------------------------------------------------------------------------
// Command-line niceties (issue 21): defaults in --help, "did you mean", --prompt-file -,
// generate --json, --threads, --version.

TEST(Cli, HelpShowsDefaults) {
  CmdResult r = run("generate --help");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("=0.8"), std::string::npos) << r.out;  // --temperature
  EXPECT_NE(r.out.find("=100"), std::string::npos) << r.out;  // --max-new-tokens
  r = run("prepare --help");
  EXPECT_NE(r.out.find("=bpe"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("=8192"), std::string::npos) << r.out;
}

TEST(Cli, UnknownSubcommandsAndFlagsSuggestTheNearestName) {
  EXPECT_EQ(edit_distance("trian", "train"), 2u);
  EXPECT_EQ(edit_distance("", "abc"), 3u);
  EXPECT_EQ(edit_distance("steps", "steps"), 0u);
  EXPECT_EQ(closest_name("--stpes", {"--steps", "--set", "--out"}), "--steps");
  EXPECT_EQ(closest_name("zzzzzz", {"train", "eval"}), "");
  struct Case {
    std::string args, expect;
  } cases[] = {
      {"trian", "unknown subcommand 'trian' of 'dlcm' (did you mean 'train'?)"},
      {"evl --ckpt x", "unknown subcommand 'evl' of 'dlcm' (did you mean 'eval'?)"},
      {"bench decod", "unknown subcommand 'decod' of 'dlcm bench' (did you mean 'decode'?)"},
      {"train --stpes 3 --config c --data d --out o",
       "unknown flag '--stpes' of 'dlcm train' (did you mean '--steps'?)"},
      {"generate --ckpt x --max-new-token=5", "(did you mean '--max-new-tokens'?)"},
      {"xyzzyq", "unknown subcommand 'xyzzyq' of 'dlcm' (expected one of: train,"},
  };
  for (auto& c : cases) {
    CmdResult r = run(c.args);
    EXPECT_NE(r.rc, 0) << c.args;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << " -> " << r.out;
  }
}

TEST(Cli, GenerateJsonAndPromptsFromStdin) {
  test::TempDir tmp;
  const std::string ck = test::byte_checkpoint(tmp.path + "/ck", test::tiny_baseline());
  const std::string gen = std::string(DLCM_BINARY) + " generate --ckpt " + ck +
                          " --max-new-tokens 4 --temperature 0 --ignore-eos --quiet --json";
  test::CommandResult r = test::run_command("printf 'one\\n\\ntwo\\n' | " + gen + " --prompt-file - 2>&1");
  ASSERT_EQ(r.rc, 0) << r.out;
  std::istringstream lines(r.out);
  std::vector<nlohmann::json> got;
  for (std::string l; std::getline(lines, l);) got.push_back(nlohmann::json::parse(l));
  ASSERT_EQ(got.size(), 2u) << r.out;
  std::sort(got.begin(), got.end(), [](auto& a, auto& b) { return a["index"] < b["index"]; });
  EXPECT_EQ(got[0]["prompt"], "one");
  EXPECT_EQ(got[1]["prompt"], "two");
  EXPECT_EQ(got[1]["name"], "stdin:3");
  for (const auto& j : got) {
    EXPECT_EQ(j["stop_reason"], "length");
    EXPECT_EQ(j["tokens"].size(), 4u);
    EXPECT_EQ(j["new_tokens"], 4);
    EXPECT_EQ(j["prompt_tokens"], 4);  // BOS + 3 bytes
    EXPECT_TRUE(j["text"].is_string());
  }
  // The same completion as the plain output of one prompt.
  r = test::run_command(gen + " --prompt one 2>&1");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out)["text"], got[0]["text"]);
  CmdResult plain = run("generate --ckpt " + ck + " --prompt one --max-new-tokens 4 --temperature 0 "
                        "--ignore-eos --quiet");
  ASSERT_EQ(plain.out.rfind("one", 0), 0u) << plain.out;
  // JSON text is UTF-8: bytes of incomplete characters (random weights) become U+FFFD there,
  // while "tokens" keeps the exact ids.
  const std::string raw = plain.out.substr(3, plain.out.size() - 4);
  EXPECT_EQ(nlohmann::json::parse(nlohmann::json(raw).dump(-1, ' ', false,
                                                           nlohmann::json::error_handler_t::replace)),
            got[0]["text"]);
  // An empty stdin is an error naming it.
  r = test::run_command(gen + " --prompt-file - < /dev/null 2>&1");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("stdin: no prompts"), std::string::npos) << r.out;
}

TEST(Cli, ThreadsFlagOnComputeCommands) {
  test::TempDir tmp;
  const std::string ck = test::byte_checkpoint(tmp.path + "/ck", test::tiny_baseline());
  CmdResult r = run("generate --ckpt " + ck + " --prompt a --max-new-tokens 2 --quiet --threads 1");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("[dlcm] OpenMP threads: 1 (--threads)"), std::string::npos) << r.out;
  for (const char* cmd : {"train", "forward", "generate", "segment", "prepare", "eval", "analyze",
                          "bench train", "bench decode", "bench xattn", "mup coord-check",
                          "mup lr-sweep"}) {
    r = run(std::string(cmd) + " --help");
    EXPECT_NE(r.out.find("--threads"), std::string::npos) << cmd;
  }
  r = run("generate --ckpt " + ck + " --prompt a --threads -2");
  EXPECT_NE(r.rc, 0) << r.out;
}

TEST(Cli, VersionNamesCommitFlagsAndIsa) {
  CmdResult r = run("--version");
  ASSERT_EQ(r.rc, 0) << r.out;
  const BuildInfo& b = build_info();
  EXPECT_NE(r.out.find("dlcm " + b.version), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("commit   " + b.git_commit), std::string::npos) << r.out;
  EXPECT_TRUE(b.git_commit == "unknown" || b.git_commit.size() == 40) << b.git_commit;
  EXPECT_NE(r.out.find("flags    "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(b.build_type), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("isa      built for:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("kernels  "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("oneDNN "), std::string::npos) << r.out;
#ifdef __AVX2__
  EXPECT_NE(r.out.find("avx2"), std::string::npos) << r.out;
#endif
}

// The kernels' on/off switches (kernels/isa.h env_switch) log what a set value does: "0" turns
// the path off, anything else keeps it on; unset says nothing.
TEST(Cli, KernelSwitchesLogWhatTheyForce) {
  const char* names[] = {"DLCM_AMX_GEMM", "DLCM_BF16_REUSE", "DLCM_BF16_PRODUCERS",
                         "DLCM_BF16_SKIP_FLOATS", "DLCM_FP32_NT_SGEMM"};
  const char* off[] = {"BF16 products on oneDNN only",
                       "linear layers do not reuse their BF16 input copies",
                       "producers do not write the bf16 roundings",
                       "producers write their floats also where only BF16 products read them",
                       "FP32 x W^T products on fixed-shape primitives like the other forms"};
  const char* on[] = {"BF16 products on AMX tiles where they fit",
                      "linear layers reuse their BF16 input copies",
                      "producers write the bf16 roundings",
                      "producers read only by BF16 products skip their floats",
                      "FP32 x W^T products on oneDNN's sgemm on the fixed path too"};
  {
    CmdResult r = run("--version");
    ASSERT_EQ(r.rc, 0) << r.out;
    for (const char* n : names) EXPECT_EQ(r.out.find(n), std::string::npos) << r.out;
  }
  for (const char* value : {"0", "1"}) {
    for (const char* n : names) setenv(n, value, 1);
    CmdResult r = run("--version");
    for (const char* n : names) unsetenv(n);
    ASSERT_EQ(r.rc, 0) << r.out;
    for (int i = 0; i < 5; ++i) {
      const std::string line = std::string("dlcm: ") + names[i] + "=" + value + ": " +
                               (value[0] == '0' ? off[i] : on[i]);
      EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
    }
  }
}

// DLCM_ISA forces the kernels' level (logged once) or fails naming the variable.
TEST(Cli, DlcmIsaForcesTheKernelLevel) {
  struct Env {
    explicit Env(const char* v) { setenv("DLCM_ISA", v, 1); }
    ~Env() { unsetenv("DLCM_ISA"); }
  };
  {
    Env e("scalar");  // every CPU and every build offers it, except a native AVX build
    CmdResult r = run("--version");
    if (r.out.find("native build") == std::string::npos) {
      ASSERT_EQ(r.rc, 0) << r.out;
      EXPECT_NE(r.out.find("kernels  scalar ("), std::string::npos) << r.out;
      EXPECT_NE(r.out.find("DLCM_ISA=scalar: the kernels run their scalar variant"),
                std::string::npos) << r.out;
    }
  }
  {
    Env e("avx3");
    CmdResult r = run("--version");
    EXPECT_EQ(r.rc, 2) << r.out;
    EXPECT_NE(r.out.find("dlcm: error: DLCM_ISA: expected \"scalar\", \"avx2\" or \"avx512\""),
              std::string::npos) << r.out;
  }
}

// The other kernel settings from the environment are read at start-up as DLCM_ISA is: each
// value logged by every command (--version too), a bad one failing it with one line naming the
// variable (not at a first product, which may run inside a parallel region).
TEST(Cli, KernelSettingsFromTheEnvironmentAreReadAtStartUp) {
  struct Case {
    const char* var;
    const char* value;
    const char* log;  // "" for a bad value
  } cases[] = {
      {"DLCM_GEMM", "runtime", "dlcm: DLCM_GEMM=runtime: GEMMs use the runtime-shape oneDNN path"},
      {"DLCM_GEMM", "fixed", "dlcm: DLCM_GEMM=fixed: GEMMs use the fixed-shape oneDNN path"},
      {"DLCM_GEMM", "amx", ""},
      {"DLCM_SGEMM_OWN", "off", "dlcm: DLCM_SGEMM_OWN=off: every FP32 product runs on oneDNN's sgemm"},
      {"DLCM_SGEMM_OWN", "tn", "dlcm: DLCM_SGEMM_OWN=tn: FP32 weight-gradient products (A^T B) run "
                               "on dlcm's blocked sgemm"},
      {"DLCM_SGEMM_OWN", "on", ""},
      {"DLCM_BF16_UNITS", "fp32", "dlcm: DLCM_BF16_UNITS=fp32: BF16 products run on the fp32 units"},
      {"DLCM_BF16_UNITS", "fp16", ""},
  };
  for (const Case& c : cases) {
    setenv(c.var, c.value, 1);
    CmdResult r = run("--version");
    unsetenv(c.var);
    const std::string what = std::string(c.var) + "=" + c.value;
    if (*c.log) {
      EXPECT_EQ(r.rc, 0) << what << "\n" << r.out;
      EXPECT_NE(r.out.find(c.log), std::string::npos) << what << "\n" << r.out;
    } else {
      EXPECT_EQ(r.rc, 2) << what << "\n" << r.out;
      EXPECT_NE(r.out.find(std::string("dlcm: error: ") + c.var + ": expected"), std::string::npos)
          << what << "\n" << r.out;
      EXPECT_EQ(r.out.find("dlcm 0."), std::string::npos) << what << ": the version printed";
    }
  }
}

// DLCM_BF16_UNITS forces the units of the BF16 products instead of measuring them (logged,
// and named by the benchmark), or fails naming the variable.
TEST(Cli, DlcmBf16UnitsForcesTheUnits) {
  if (!ops::cpu_has_bf16()) GTEST_SKIP() << "BF16 training needs AVX512-BF16";
  struct Env {
    explicit Env(const char* v) { setenv("DLCM_BF16_UNITS", v, 1); }
    ~Env() { unsetenv("DLCM_BF16_UNITS"); }
  };
  test::TempDir tmp;
  const std::string bench = "bench train --config " + tiny_config_file(tmp.path, ", \"batch_size\": 2") +
                            " --no-torch --steps 1 --repeats 1 --precision bf16";
  for (const std::string units : {"fp32", "native"}) {
    Env e(units.c_str());
    CmdResult r = run(bench);
    ASSERT_EQ(r.rc, 0) << r.out;
    const std::string set = "DLCM_BF16_UNITS=" + units;
    EXPECT_NE(r.out.find("dlcm: " + set + ": BF16 products run on the " + units + " units"),
              std::string::npos) << r.out;
    EXPECT_NE(r.out.find("BF16 products run on the " + units + " units (" + set + ")"),
              std::string::npos) << r.out;
  }
  Env e("fp16");
  CmdResult r = run(bench);
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("dlcm: error: DLCM_BF16_UNITS: expected \"native\" or \"fp32\""),
            std::string::npos) << r.out;
}
