// Zero-shot benchmark evaluation as lm-evaluation-harness scores it (docs/evaluation.md):
// task items -> (context, continuation) token requests -> batched log-likelihoods -> metrics.
//   MultipleChoice: acc = argmax of summed log-likelihood; acc_norm = argmax of log-likelihood
//                   divided by the choice's length in characters.
//   Partial:        acc = argmax over the contexts of the shared continuation's log-likelihood.
//   Greedy:         acc = every target token is the argmax; perplexity = exp(-mean over items
//                   of the target's summed log-likelihood).
// Standard error of a mean of per-item 0/1 scores: sqrt(p (1 - p) / (n - 1)) (the sample
// standard deviation over sqrt(n), as lm-evaluation-harness). MMLU: subjects averaged
// (macro mean), its standard error from the item weights 1/(S n_s).
// Chance: mean over items of 1 / number of choices (0 for Greedy tasks).
// Few-shot (--num-fewshot K): each item's context is preceded by K examples drawn with a fixed
// seed from the task's other items (of the same subject for MMLU), formatted as
// lm-evaluation-harness formats them: description + (example + fewshot delimiter) x K + context,
// an example being its context + target delimiter + its gold continuation.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "eval/scorer.h"
#include "eval/tasks.h"

namespace dlcm {

struct EvalOptions {
  std::string bench_dir = "../shared/bench";
  i64 limit = -1;            // items per task (per subject for MMLU), -1 = all
  i64 num_fewshot = 0;       // examples before each item's context
  uint64_t fewshot_seed = 1234;
  bool log_samples = false;  // one JSON object per request in TaskResult::samples
  i64 batch_tokens = 2048;   // padded tokens per forward pass
  bool share_prefixes = true;
  bool progress = false;
  bool keep_items = false;   // keep per-item log-likelihoods in TaskResult (tests)
};

struct ItemResult {
  std::vector<double> loglik;  // per choice (or per context, Partial)
  i32 pred = -1, pred_norm = -1;
  bool greedy = false;         // Greedy tasks
};

struct GroupResult {
  std::string name;
  i64 n = 0, n_original = 0;  // items scored, items in the file (before --limit)
  double acc = 0, acc_norm = 0;
  double acc_stderr = NAN, acc_norm_stderr = NAN;
};

struct TaskResult {
  std::string name, layout, error;  // error non-empty: the task could not run
  TaskSpec spec;
  TaskKind kind = TaskKind::MultipleChoice;
  i64 n = 0;
  i64 n_original = 0;   // items in the file(s), before --limit
  i64 num_fewshot = 0;
  double acc = 0, acc_stderr = 0;
  double acc_norm = NAN, acc_norm_stderr = NAN;  // MultipleChoice only
  double perplexity = NAN, perplexity_stderr = NAN;  // Greedy only (stderr: delta method)
  double chance = 0;
  double seconds = 0;      // wall clock: reading, tokenizing, scoring
  double cpu_seconds = 0;  // process CPU time over the same span (all threads)
  ScoreStats stats;
  std::vector<GroupResult> groups;  // MMLU subjects
  std::vector<std::string> files;
  std::vector<ItemResult> items;    // with EvalOptions::keep_items
  std::vector<nlohmann::json> samples;  // with EvalOptions::log_samples (task_samples)
  bool ok() const { return error.empty(); }
};

// The strings of one request, as the task builds them (before lm-eval's whitespace move).
struct RequestText {
  std::string context, continuation;
};

// (context, continuation) strings -> tokens following lm-evaluation-harness: trailing
// whitespace of the context moves to the continuation; context tokens = encode(context);
// continuation tokens = encode(context + continuation) past the context's token count.
ScoreRequest make_request(const Tokenizer& tok, const std::string& context, const std::string& continuation);

// The requests of a task, item by item (choices or contexts in order). The context is
// description + few-shot examples + the item's context; the continuation string is delimiter +
// choice, except when the context is empty or ends in whitespace, or the choice starts with
// whitespace.
std::vector<RequestText> task_request_texts(const TaskData& d);
std::vector<ScoreRequest> task_requests(const TaskData& d, const Tokenizer& tok);

// Sets each item's few-shot prefix: k examples drawn from the other items of the task (of its
// group when it has one), by a generator seeded with (seed, doc_id), so an item's examples do
// not depend on --limit. Needs the full task (call before limit_items); errors when fewer than
// k other items exist.
void add_fewshot(TaskData& d, i64 k, uint64_t seed);

// One JSON object per request for --log-samples: task, doc_id, choice index, context,
// continuation, loglik, greedy, continuation tokens scored, truncated, gold, and the item's
// pred / acc (/ pred_norm / acc_norm). `r` must hold the items (keep_items).
std::vector<nlohmann::json> task_samples(const TaskData& d, const std::vector<RequestText>& texts,
                                         const std::vector<Score>& scores, const TaskResult& r);

// Metrics from the requests' scores (in task_requests order).
TaskResult task_metrics(const TaskData& d, const std::vector<Score>& scores, bool keep_items);

// Reads, scores and measures one task; errors (missing file, malformed line) are caught into
// TaskResult::error so that the other tasks still run.
TaskResult run_task(LanguageModel& model, const Tokenizer& tok, const TaskSpec& spec,
                    const EvalOptions& o);

nlohmann::json task_result_json(const TaskResult& r);

// The run's settings, for the lm-evaluation-harness-shaped part of the report.
struct LmEvalConfig {
  std::string model_args;  // "ckpt=DIR,arch=ARCH"
  i64 batch_tokens = 2048, limit = -1, num_fewshot = 0;
  uint64_t fewshot_seed = 1234;
  std::string bench_dir;
};

// The fields of lm-evaluation-harness's results.json: "results" (per task "acc,none",
// "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none", "perplexity,none", "alias"; MMLU's
// subjects as "mmlu_<subject>"), "group_subtasks", "configs", "versions", "n-shot",
// "higher_is_better", "n-samples", "config" and "date" (Unix time). Tasks that could not run are
// left out.
nlohmann::json lm_eval_results(const std::vector<TaskResult>& results, const LmEvalConfig& c);
// | task | items | acc | ± | acc_norm | ± | chance | perplexity | seconds | CPU seconds |
std::string markdown_table(const std::vector<TaskResult>& results);

}  // namespace dlcm
