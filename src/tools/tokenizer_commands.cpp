// `dlcm tokenizer ...`: look at a tokenizer from the command line, and move tokenizers between
// dlcm and Hugging Face's files (docs/interop.md, "Tokenizers").
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "core/common.h"
#include "data/hf_tokenizer.h"
#include "data/tokenizer.h"
#include "tools/commands.h"

namespace dlcm {
namespace {

struct TokArgs {
  std::string dir, text, file, ids, out, encoder, merges;
  bool lines = false;
  int64_t model_max_length = 0;
};

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  DLCM_CHECK(f, path, ": cannot open (check --file)");
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

int run_encode(const TokArgs& a) {
  DLCM_CHECK(a.text.empty() != a.file.empty(), "tokenizer encode: give exactly one of --text and --file");
  const auto tok = load_tokenizer(a.dir);
  const std::string text = a.file.empty() ? a.text : read_all(a.file);
  nlohmann::json out;
  if (a.lines) {
    out = nlohmann::json::array();
    // n newlines make n + 1 lines (the last one possibly empty).
    for (size_t i = 0;;) {
      const size_t e = text.find('\n', i);
      out.push_back(tok->encode(std::string_view(text).substr(i, e == std::string::npos ? e : e - i)));
      if (e == std::string::npos) break;
      i = e + 1;
    }
  } else {
    out = tok->encode(text);
  }
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

int run_decode(const TokArgs& a) {
  const auto tok = load_tokenizer(a.dir);
  std::vector<int32_t> ids;
  std::string s = a.ids;
  for (char& c : s)
    if (c == ',' || c == '[' || c == ']') c = ' ';
  std::istringstream is(s);
  for (std::string w; is >> w;) {
    char* end = nullptr;
    const long long v = std::strtoll(w.c_str(), &end, 10);
    DLCM_CHECK(end && *end == '\0' && v >= 0 && v <= INT32_MAX, "--ids: expected token ids, got \"", w, "\"");
    ids.push_back(int32_t(v));
  }
  const std::string text = tok->decode(ids);
  std::fwrite(text.data(), 1, text.size(), stdout);
  return 0;
}

int run_export(const TokArgs& a) {
  const auto tok = load_tokenizer(a.dir);
  std::filesystem::create_directories(a.out);
  HfWriteOptions o;
  o.model_max_length = a.model_max_length;
  write_hf_tokenizer_files(*tok, a.out, o);
  std::fprintf(stderr, "[tokenizer] %s tokenizer (vocab %d) written in HF's format to %s\n",
               tok->kind().c_str(), tok->vocab_size(), a.out.c_str());
  return 0;
}

int run_from_gpt2(const TokArgs& a) {
  std::filesystem::create_directories(a.out);
  convert_gpt2_tokenizer(a.encoder, a.merges, a.out);
  std::fprintf(stderr, "[tokenizer] GPT-2 tokenizer converted to %s/tokenizer.json\n", a.out.c_str());
  return 0;
}

}  // namespace

std::function<int()> add_tokenizer_commands(CLI::App& app) {
  auto a = std::make_shared<TokArgs>();
  auto* t = app.add_subcommand("tokenizer", "encode/decode with a tokenizer; convert to and from HF's tokenizer.json");
  t->require_subcommand(1);
  auto* enc = t->add_subcommand("encode", "print the ids of a text as JSON");
  enc->add_option("--dir", a->dir, "folder with the tokenizer (checkpoint, prepared data, HF tokenizer folder)")->required();
  enc->add_option("--text", a->text, "text to encode");
  enc->add_option("--file", a->file, "file to encode");
  enc->add_flag("--lines", a->lines, "encode each line (split at \\n, without it) separately: a JSON array per line");
  auto* dec = t->add_subcommand("decode", "print the text of token ids");
  dec->add_option("--dir", a->dir, "folder with the tokenizer")->required();
  dec->add_option("--ids", a->ids, "ids separated by commas or spaces")->required();
  auto* exp = t->add_subcommand("export-hf", "write the tokenizer as HF files (tokenizer.json, tokenizer_config.json, ...)");
  exp->add_option("--dir", a->dir, "folder with the tokenizer")->required();
  exp->add_option("--out", a->out, "output folder (created)")->required();
  exp->add_option("--model-max-length", a->model_max_length, "tokenizer_config.json's model_max_length")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  auto* g2 = t->add_subcommand("from-gpt2", "convert GPT-2's encoder.json + vocab.bpe to an HF tokenizer.json");
  g2->add_option("--encoder", a->encoder, "encoder.json (token -> id)")->required();
  g2->add_option("--merges", a->merges, "vocab.bpe (merges)")->required();
  g2->add_option("--out", a->out, "output folder (created)")->required();
  return [a, enc, dec, exp, g2]() -> int {
    if (*enc) return run_encode(*a);
    if (*dec) return run_decode(*a);
    if (*exp) return run_export(*a);
    if (*g2) return run_from_gpt2(*a);
    return -1;
  };
}

}  // namespace dlcm
