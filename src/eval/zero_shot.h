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
  i64 n = 0;
  double acc = 0, acc_norm = 0;
};

struct TaskResult {
  std::string name, layout, error;  // error non-empty: the task could not run
  TaskKind kind = TaskKind::MultipleChoice;
  i64 n = 0;
  double acc = 0, acc_stderr = 0;
  double acc_norm = NAN, acc_norm_stderr = NAN;  // MultipleChoice only
  double perplexity = NAN;                       // Greedy only
  double chance = 0;
  double seconds = 0;      // wall clock: reading, tokenizing, scoring
  double cpu_seconds = 0;  // process CPU time over the same span (all threads)
  ScoreStats stats;
  std::vector<GroupResult> groups;  // MMLU subjects
  std::vector<std::string> files;
  std::vector<ItemResult> items;    // with EvalOptions::keep_items
  bool ok() const { return error.empty(); }
};

// (context, continuation) strings -> tokens following lm-evaluation-harness: trailing
// whitespace of the context moves to the continuation; context tokens = encode(context);
// continuation tokens = encode(context + continuation) past the context's token count.
ScoreRequest make_request(const Tokenizer& tok, const std::string& context, const std::string& continuation);

// The requests of a task, item by item (choices or contexts in order). The continuation
// string is delimiter + choice, except when the context is empty or ends in whitespace, or the
// choice starts with whitespace.
std::vector<ScoreRequest> task_requests(const TaskData& d, const Tokenizer& tok);

// Metrics from the requests' scores (in task_requests order).
TaskResult task_metrics(const TaskData& d, const std::vector<Score>& scores, bool keep_items);

// Reads, scores and measures one task; errors (missing file, malformed line) are caught into
// TaskResult::error so that the other tasks still run.
TaskResult run_task(LanguageModel& model, const Tokenizer& tok, const TaskSpec& spec,
                    const EvalOptions& o);

nlohmann::json task_result_json(const TaskResult& r);
// | task | items | acc | ± | acc_norm | ± | chance | perplexity | seconds | CPU seconds |
std::string markdown_table(const std::vector<TaskResult>& results);

}  // namespace dlcm
