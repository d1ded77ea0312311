// Zero-shot benchmark tasks: a small table of task specs and readers for the file layouts
// (docs/evaluation.md). Every reader turns a file into Items of one of three kinds, so the
// scorer and the metrics never see a file format:
//   MultipleChoice  one context, one continuation per choice      (acc, acc_norm)
//   Partial         one context per option, one shared continuation (WinoGrande: acc)
//   Greedy          one context, one target continuation           (LAMBADA: acc, perplexity)
// Layouts (the `layout` of a spec):
//   query_choices_gold    JSON lines {"query", "choices": [...], "gold": i}; context =
//                         query + context_suffix (ARC, BoolQ, COPA, OBQA-style files)
//   context_options       JSON lines {"context_options": [...], "continuation", "gold": i}
//                         (partial scoring, llm-foundry's schema layout)
//   context_continuation  JSON lines {"context", "continuation"} (greedy, LAMBADA)
//   mmlu_csv              a CSV file, or a folder of them (one subject each), with a header
//                         row: question, then the choices, then the answer (index or letter)
//   hellaswag             the 6-lines-per-item text file (context, gold, 4 endings)
//   piqa                  JSON lines {"goal", "sol1", "sol2"} + a labels file (0/1 per line)
//   winogrande            JSON lines {"sentence" with one "_", "option1", "option2",
//                         "answer": "1"|"2"} (the official release), read as partial scoring
#pragma once
#include <string>
#include <vector>

#include "core/common.h"

namespace dlcm {

struct TaskSpec {
  std::string name;
  std::string layout;
  std::string path;            // relative to the bench dir unless absolute
  std::string labels;          // piqa: labels file (relative like path)
  std::string context_suffix;  // query_choices_gold: appended to the query
  std::string delimiter = " "; // between context and continuation (lm-eval's target_delimiter)
  std::string description;     // before the few-shot examples and the context (MMLU: per subject)
  std::string fewshot_delimiter = "\n\n";  // after each few-shot example (lm-eval's)
  double version = 1;          // of the prompt and scoring; changes when they change
};

enum class TaskKind { MultipleChoice, Partial, Greedy };

// The scored context of choice (or option) j is description + fewshot + contexts[j].
struct Item {
  std::vector<std::string> contexts;  // 1, or one per option (Partial)
  std::vector<std::string> choices;   // one per choice, or 1 (Partial, Greedy); no delimiter
  i32 gold = 0;
  i32 group = -1;  // index into TaskData::groups (MMLU subject), -1 = none
  i64 doc_id = 0;  // position in the task's file(s), as read
  std::string description;  // the spec's, or the subject's (MMLU)
  std::string fewshot;      // the examples (add_fewshot), each followed by the fewshot delimiter
  std::string where;  // "file:line" for messages
};

struct TaskData {
  TaskSpec spec;
  TaskKind kind = TaskKind::MultipleChoice;
  std::vector<Item> items;
  std::vector<std::string> groups;  // MMLU subjects, in file order
  std::vector<std::string> files;   // what was read
};

// The built-in tasks (hellaswag, piqa, arc_easy, boolq, winogrande, copa, lambada_openai,
// mmlu) with the file names of ../shared/bench.
const std::vector<TaskSpec>& builtin_tasks();
// The layouts a spec may name.
const std::vector<std::string>& task_layouts();

// Resolves a --tasks list: comma-separated names of built-in tasks, "all", names defined in the
// task file (JSON array of {"name", "layout", "path", "labels", "context_suffix", "delimiter",
// "description", "fewshot_delimiter", "version"}; optional), and inline specs
// "name=layout:path". Errors name the entry. A former name ("lambada") resolves to the task's
// name, with a line for the user in `notes`.
std::vector<TaskSpec> resolve_tasks(const std::string& list, const std::string& task_file = "",
                                    std::vector<std::string>* notes = nullptr);

// The tasks a --tasks list may name (built-in, then the task file's), one line each: name,
// layout and data file(s) under bench_dir, marked when missing. For `dlcm eval --tasks list`.
std::string task_listing(const std::string& bench_dir, const std::string& task_file = "");

// Keeps the first `limit` items (of each group, MMLU subjects); limit < 0 keeps all.
void limit_items(TaskData& d, i64 limit);

// Reads a task's items; `limit` >= 0 keeps the first `limit` items (per subject for mmlu_csv).
// Errors (missing file, malformed line) name the file and line.
TaskData read_task(const TaskSpec& spec, const std::string& bench_dir, i64 limit = -1);

// Number of characters of a UTF-8 string (code points, like Python's len), for acc_norm.
i64 utf8_length(const std::string& s);

}  // namespace dlcm
