// The subcommands of the dlcm tool, as library functions (the CLI parses flags into these
// structs and calls them; tests may call them directly).
#pragma once
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm {

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
  std::string ckpt, prompt;
  i64 max_new_tokens = 100;
  double temperature = 0.8, top_p = 1.0;
  i64 top_k = 0;
  uint64_t seed = 0;
};
int cmd_generate(const GenerateArgs& a);

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

// Validation (--data: loss, perplexity, bits per byte, dlcm compression) and/or zero-shot
// tasks (--tasks, read from --bench-dir); one JSON report. Returns 1 when a task could not run
// (the others still run and are reported), 0 otherwise.
struct EvalArgs {
  std::string ckpt, data, out;
  i64 limit = -1;  // validation batches and items per task (-1 = all)
  i64 batch_size = 8, seq_len = 0;
  std::string tasks, bench_dir = "../shared/bench", task_file, markdown;
  i64 batch_tokens = 2048;  // zero-shot: padded tokens per forward pass
  bool no_prefix_sharing = false;  // zero-shot: one row per request (measurement)
  bool quiet = false;       // no progress lines or table on stderr
};
int cmd_eval(const EvalArgs& a);

// Reads a token-rows file (one row of space-separated ids per line, all rows equally long).
std::vector<std::vector<i32>> read_token_rows(const std::string& path);

}  // namespace dlcm
