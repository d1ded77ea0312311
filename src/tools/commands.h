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
  bool torch_default = false;           // PyTorch peer without jemalloc and ATen AVX-512
  std::vector<std::string> precisions;  // engines to time side by side; empty = the config's
  bool breakdown = false;               // per-component time of a step (StepProfiler)
  double R = -1;                        // dlcm: given concepts of mean length R (-1: target_R,
                                        // 0: sample boundaries from the router)
};
int cmd_bench_train(const BenchTrainArgs& a);

// The concept cross-attention benchmark (paper Table 6): masked vs replicate vs compact.
struct BenchXattnArgs {
  std::vector<i64> lengths = {2048, 4096, 8192, 16384};
  i64 batch = 1, heads = 8, kv_heads = 8, head_dim = 64, repeats = 3;
  i64 interval = 6;       // fixed-length concepts ("Interval=6")
  double mean_len = 5.0;  // variable-length concepts: 1 + Geometric, this mean
  bool fixed = true, variable = true;
};
int cmd_bench_xattn(const BenchXattnArgs& a);

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
