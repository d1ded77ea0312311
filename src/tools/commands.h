// The subcommands of the dlcm tool, as library functions (the CLI parses flags into these
// structs and calls them; tests may call them directly).
#pragma once
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/common.h"
#include "data/model_loader.h"   // load_model_with_tokenizer
#include "models/checkpoint.h"  // resolve_checkpoint
#include "models/config.h"
#include "eval/validate.h"      // ValResult

namespace CLI {
class App;
}

namespace dlcm {

// `dlcm tokenizer encode|decode|export-hf|from-gpt2` (tools/tokenizer_commands.cpp): adds the
// subcommands to app; the returned function runs the one parsed (-1 when none was).
std::function<int()> add_tokenizer_commands(CLI::App& app);
// `dlcm serve` and `dlcm bench serve` (tools/serve_command.cpp), added like the above.
std::function<int()> add_serve_commands(CLI::App& app, CLI::App& bench);

struct TrainArgs {
  std::string config, data, out, init_from;  // config: optional with --resume (the run's own)
  i64 steps = -1;
  i64 threads = 0;      // > 0: train.threads
  i64 keep = -1;        // checkpoint-step-N folders kept (-1: as the resumed run, else none)
  bool keep_best = false;
  std::vector<std::string> sets;
  bool resume = false, overwrite = false, quiet = false;
  bool final_eval = true;  // full validation pass at the end
  bool concept_usage = false;  // dlcm: concept-usage diagnostics at every logged eval
  // Not flags (the Python package): the config itself when not null (`config` then only names
  // it in errors), and the trainer's hooks (TrainOptions::on_log, stop_requested).
  nlohmann::json config_json;
  std::function<void(const std::string& json_line)> on_log;
  std::function<bool()> stop_requested;
};
// What a training run left: the step reached, its checkpoint folder ("" when no steps ran and
// none was written), whether stop_requested ended it early, and the full validation.
struct TrainSummary {
  i64 step = 0;
  std::string checkpoint;
  bool stopped = false;
  bool validated = false;  // final_eval ran (not after a stop)
  ValResult val;
};
TrainSummary train_run(const TrainArgs& a);
int cmd_train(const TrainArgs& a);  // train_run and a closing line on stderr

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
  std::string precision = "fp32";  // the stream's weights: fp32 | bf16 | int8 (StreamOptions)
  bool show_concepts = false, ignore_eos = false, quiet = false;
  bool ids = false;  // print token ids, not text: "PROMPT_IDS -> COMPLETION_IDS" per prompt
  bool json = false;  // one JSON object per completion on stdout
};
// One prompt: streams the completion as it is produced. Several (--prompt-file, "-" for
// stdin): prints each completion when it is done, under a header line "[i/n] stop: REASON, K
// tokens". --json: one line per completion, {"index", "name", "prompt", "text", "tokens",
// "prompt_tokens", "new_tokens", "stop_reason"} (+ "concepts" with --show-concepts on a dlcm);
// bytes of "text" that are not valid UTF-8 become U+FFFD ("tokens" holds the exact ids).
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
  std::vector<std::string> precisions = {"fp32"};  // the cached decode in each, side by side
  // With --ckpt: the quality of each precision's stream on the first val_windows validation
  // windows of this prepared folder (CE, and argmax agreement with the first precision).
  std::string data;
  i64 val_windows = 16;
  // Skip the recompute baseline (it re-reads the whole prefix for every new token: minutes at
  // long prompts); greedy tokens are then checked against the first precision's cached decode.
  bool no_recompute = false;
};
// Decode tokens/s with the streaming caches against recomputing the whole prefix each step.
int cmd_bench_decode(const BenchDecodeArgs& a);

struct BenchPrefillArgs {
  std::vector<std::string> ckpts;  // checkpoints compared in one run (the first is the reference)
  i64 prompt_len = 128, batch = 1, repeats = 11;
  // Prefills of one model in a row per repeat, the first of each run not kept: > 1 times a
  // model whose weights its own previous prefill left in the caches (a server running one
  // model); 1 = each prefill right after the other models' work (the default).
  i64 in_a_row = 1;
  std::string precision = "fp32";  // the streams' weight format: fp32 | bf16 | int8
  // Prompts from a prepared data folder's validation split (DIR/val.bin), one document start
  // per sequence from token `data_at` on; empty: `batch` copies of one random-token prompt. A
  // DLCM's concept count depends on the text, and random tokens are not what it was trained on.
  std::string data;
  i64 data_at = 0;
  bool breakdown = false;  // CPU time per component of the stream's prefill
  bool breakdown_gemm = false;  // with breakdown: GEMMs as own rows, and time per product shape
  bool products_in_order = false;  // breakdown_gemm with each product of a prefill apart, in order
  // The stream products' output prefetch (ops::set_packed_prefetch_c), "on" and/or "off": each
  // checkpoint runs once per value, side by side in the same repeats (an A/B in one process);
  // empty: as set (on, or DLCM_PACKED_PREFETCH_C).
  std::vector<std::string> prefetch_c;
  // StreamOptions::last_rows, "on" and/or "off", the same way (entries: each --prefetch-c
  // value with each --last-rows value); empty: on.
  std::vector<std::string> last_rows;
};
// Prefill tokens/s of several checkpoints, interleaved, against the first (tools/bench_prefill.cpp).
int cmd_bench_prefill(const BenchPrefillArgs& a);

// `dlcm config [--config FILE] [--set k=v]...`: prints the resolved, validated config JSON;
// `--keys` lists every key with its type, default and allowed range (`--markdown`: the table
// of docs/config.md).
struct ConfigArgs {
  std::string config;
  std::vector<std::string> sets;
  bool keys = false, markdown = false;
};
int cmd_config(const ConfigArgs& a);

struct FlopsArgs {
  std::string config;
  i64 seq_len = 0;
  double R = 0;
  std::vector<std::string> sets;
  bool json = false;  // print the report as JSON
};
int cmd_flops(const FlopsArgs& a);

// `dlcm plan --match CONFIG --R R --P P`: a dlcm config with the baseline's forward FLOPs per
// token (models/plan.h), printed side by side with the baseline; --out writes its config JSON.
struct PlanArgs {
  std::string match, out;
  std::vector<std::string> sets;  // applied to the baseline config
  double R = 4, P = 0.5, flops_tol = 0.05, p_tol = 0.03;
  i64 d_concept = 0, d_token = 0, seq_len = 0;
};
int cmd_plan(const PlanArgs& a);

struct BenchTrainArgs {
  std::string config;
  std::vector<std::string> sets;
  i64 steps = 5, repeats = 3;
  bool no_torch = false;
  bool torch_default = false;           // PyTorch peer without jemalloc and ATen AVX-512
  std::vector<std::string> torch;       // peers "PY[:autocast][:sdpa][:compile]"; empty = Debian's
                                        // torch 1.13 (/usr/bin/python3)
  std::vector<std::string> precisions;  // engines to time side by side; empty = the config's
  std::vector<std::string> gemm_paths;  // "runtime"/"fixed" engines side by side; empty = the
                                        // process's (DLCM_GEMM, else fixed on AMX CPUs)
  bool breakdown = false;               // per-component time of a step (StepProfiler)
  bool breakdown_gemm = false;          // with breakdown: GEMMs (and BF16 rounding) as own rows
  double R = -1;                        // dlcm: given concepts of mean length R (-1: target_R,
                                        // 0: sample boundaries from the router)
  std::vector<std::string> compare;     // more models' configs timed in the same repeats (their
                                        // MFU against the first model's, in points)
};
int cmd_bench_train(const BenchTrainArgs& a);

// GEMM GFLOP/s of the runtime-shape vs fixed-shape oneDNN paths (bench_gemm.cpp); FP32 also
// with oneDNN's sgemm alone (no dlcm blocked sgemm) and, with --torch, PyTorch's matmul.
struct BenchGemmArgs {
  i64 repeats = 5;
  double seconds = 0.3;  // per path and repeat
  std::string torch;     // python interpreter of the PyTorch peer ("" = none)
};
int cmd_bench_gemm(const BenchGemmArgs& a);

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
  std::string out, tokenizer = "bpe", tokenizer_from;
  i64 vocab_size = 8192;
  double val_fraction = 0.01;
  i64 threads = 0;  // 0: OpenMP default
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
  bool concept_usage = false;  // dlcm: concept-usage diagnostics on the validation split
  i64 usage_batches = -1;      // their batches (-1 = the full split)
  i64 num_fewshot = 0;         // zero-shot: examples before each context
  uint64_t fewshot_seed = 1234;
  bool log_samples = false;    // OUT_samples_<task>.jsonl beside the report (--out OUT.json)
};
// `--tasks list` prints the tasks and their data files instead (no --ckpt needed).
int cmd_eval(const EvalArgs& a);
// cmd_eval's report (and --markdown table) without printing it; rc as cmd_eval's exit code.
nlohmann::json eval_report(const EvalArgs& a, int* rc = nullptr);

// `dlcm plot RUN... --out FILE.svg|FILE.html`: training curves of the runs' train_log.jsonl
// overlaid (loss, validation bits per byte, compression, aux, learning rate, tokens/s against
// tokens seen; tools/run_plot.h).
struct PlotArgs {
  std::vector<std::string> runs;
  std::string out, x = "tokens", metrics, title;  // metrics: comma-separated, empty = the defaults
};
int cmd_plot(const PlotArgs& a);

// `dlcm analyze`: the concept analysis of a dlcm checkpoint on the validation split of --data
// (eval/concept_analysis.h) written as OUT/analysis.json and OUT/analysis.html (SVG figures);
// --baseline adds the baseline's loss on the same tokens by position inside a concept.
struct AnalyzeArgs {
  std::string ckpt, data, out = "analysis", baseline;
  i64 batches = -1, batch_size = 8, seq_len = 0, top = 30;  // batches -1: the whole split
  double tau = -1;  // < 0: the checkpoint's router.tau
};
int cmd_analyze(const AnalyzeArgs& a);
struct AnalysisReport;
// The self-contained analysis.html page (tables and inline SVG figures) of a report.
std::string analysis_html(const AnalysisReport& r);

// `dlcm mup coord-check`: the µP coordinate check (train/coord_check.h) written as
// OUT/coord_check.{csv,json,svg}, with a summary of the spread across widths on stdout.
struct CoordCheckArgs {
  std::string config, data, out = "coord_check";
  std::vector<std::string> sets;
  std::string widths = "1,2,4,8", steps = "0,1,10", scale = "both", params = "mup,sp";
  i64 seeds = 1;
};
int cmd_coord_check(const CoordCheckArgs& a);

// `dlcm mup lr-sweep`: learning-rate transfer. Trains the config at each width multiplier x
// base learning rate (x parametrisation) into OUT/<param>_w<mult>_lr<lr>/, skipping finished
// runs and resuming interrupted ones, then writes OUT/lr_sweep.{md,csv,json,svg} with the final
// validation loss of each run and the best learning rate per width.
struct LrSweepArgs {
  std::string config, data, out;
  std::vector<std::string> sets;
  std::string widths = "1,2,4", lrs = "1e-3,3e-3,1e-2,3e-2", params = "mup";
  std::string scale = "both";  // which widths the multipliers scale: both, token or concept
  i64 steps = -1;
  bool quiet = false;
};
int cmd_lr_sweep(const LrSweepArgs& a);

// `dlcm scaling fit RUNS... --out DIR`: fits SPEC 8's law to the runs' curves and writes
// DIR/scaling_fit.{json,md,svg} (constants, R^2, residuals, fitted vs observed curves).
struct ScalingFitArgs {
  std::vector<std::string> runs, fix;  // fix: name=value
  std::string out = "scaling_fit", metric = "val_loss";
  double huber = 0.01, min_frac = 0.1;
  bool realized_R = false;
};
int cmd_scaling_fit(const ScalingFitArgs& a);

// `dlcm scaling predict --fit FILE --N N --D D --R R --P P`: the law's loss and its terms.
struct ScalingPredictArgs {
  std::string fit;
  double N = 0, D = 0, R = 1, P = 0;
};
int cmd_scaling_predict(const ScalingPredictArgs& a);

// `dlcm scaling allocate --fit FILE --flops C --R R`: the P (and N, D) minimising the predicted
// loss under a training FLOPs budget (scaling/scaling_law.h: allocate_budget).
struct ScalingAllocateArgs {
  std::string fit;
  double flops = 0, R = 4, p_min = 0.05, p_max = 0.95, p_step = 0.01;
  double n_min = 1e4, n_max = 1e13, N = 0;  // N > 0 fixes the model size
};
int cmd_scaling_allocate(const ScalingAllocateArgs& a);

// `dlcm export --ckpt DIR --format hf --out DIR`: a baseline checkpoint as a transformers
// LlamaForCausalLM folder (models/hf_llama.h); written atomically, an existing --out only
// replaced with --force.
struct ExportArgs {
  std::string ckpt, format = "hf", out, dtype = "f32";
  std::string shard_size;  // bytes per safetensors file ("500MB"); empty = 5GB
  bool force = false;
};
int cmd_export(const ExportArgs& a);
// `--format gguf` (tools/export_gguf.cpp, docs/interop.md): a baseline as one GGUF file for
// llama.cpp at --out; dtype f32, f16, bf16 or q8_0; no shards.
int cmd_export_gguf(const ExportArgs& a);

// `dlcm import --format hf --in DIR --out CKPT`: a transformers LlamaForCausalLM folder as a
// dlcm baseline checkpoint.
struct ImportArgs {
  std::string format = "hf", in, out;
  bool force = false;
};
int cmd_import(const ImportArgs& a);

// JSON file + `--set` overrides -> validated Config (an empty path means the defaults).
Config config_with_overrides(const std::string& path, const std::vector<std::string>& sets);
// The same for config JSON in hand; `source` names it in errors.
Config config_with_overrides(nlohmann::json j, const std::string& source,
                             const std::vector<std::string>& sets);
// "1,2,4" -> {1, 2, 4}; errors name the flag.
std::vector<double> parse_number_list(const std::string& flag, const std::string& text);
std::vector<std::string> split_list(const std::string& text);

// Reads a token-rows file (one row of space-separated ids per line, all rows equally long).
std::vector<std::vector<i32>> read_token_rows(const std::string& path);

}  // namespace dlcm
