// The subcommands of the dlcm tool, as library functions (the CLI parses flags into these
// structs and calls them; tests may call them directly).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm {

class LanguageModel;
// A model with a checkpoint's weights (`path`: checkpoint or run folder); dir_out gets the
// checkpoint folder. Errors name the folder and file at fault.
std::unique_ptr<LanguageModel> load_model(const std::string& path, std::string* dir_out = nullptr);

struct TrainArgs {
  std::string config, data, out, init_from;
  i64 steps = -1;
  std::vector<std::string> sets;
  bool resume = false, quiet = false;
};
int cmd_train(const TrainArgs& a);

struct ForwardArgs {
  std::string ckpt, tokens, out;
};
int cmd_forward(const ForwardArgs& a);

struct GenerateArgs {
  std::string ckpt, prompt, prompt_file;  // one of prompt / prompt_file (one prompt per line)
  i64 max_new_tokens = 100;
  double temperature = 0.8, top_p = 1.0;
  i64 top_k = 0;
  uint64_t seed = 0;
  std::vector<std::string> stops;
  i64 batch = 8;             // prompts decoded together
  double tau = -1;           // dlcm boundary threshold (< 0: the checkpoint's)
  bool show_concepts = false, ignore_eos = false, quiet = false;
};
// One prompt: streams the completion as it is produced. Several (--prompt-file): prints each
// completion when it is done, under a header line "[i/n] stop: REASON, K tokens".
int cmd_generate(const GenerateArgs& a);

struct SegmentArgs {
  std::string ckpt, html;
  std::vector<std::string> texts, files;  // each --text and each --file is one text
  double tau = -1, target_R = 0;
  bool no_color = false;
};
int cmd_segment(const SegmentArgs& a);

struct BenchDecodeArgs {
  std::string ckpt, config;  // a checkpoint, or a config (random weights; default: the reference)
  std::vector<std::string> sets;
  i64 prompt_len = 128, new_tokens = 128, batch = 1, repeats = 1;
};
// Decode tokens/s with the streaming caches against recomputing the whole prefix each step.
int cmd_bench_decode(const BenchDecodeArgs& a);

struct FlopsArgs {
  std::string config;
  i64 seq_len = 0;
  double R = 0;
  std::vector<std::string> sets;
};
int cmd_flops(const FlopsArgs& a);

struct BenchTrainArgs {
  std::string config;
  std::vector<std::string> sets;
  i64 steps = 5, repeats = 3;
  bool no_torch = false;
};
int cmd_bench_train(const BenchTrainArgs& a);

struct PrepareArgs {
  std::vector<std::string> inputs;
  std::string out, tokenizer = "bpe";
  i64 vocab_size = 8192;
  double val_fraction = 0.01;
};
int cmd_prepare(const PrepareArgs& a);

struct EvalArgs {
  std::string ckpt, data, out;
  i64 limit = -1;  // validation batches (-1 = all)
  i64 batch_size = 8, seq_len = 0;
};
int cmd_eval(const EvalArgs& a);

// Reads a token-rows file (one row of space-separated ids per line, all rows equally long).
std::vector<std::vector<i32>> read_token_rows(const std::string& path);

}  // namespace dlcm
