#include "eval/tasks.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <map>
#include <set>

#include "core/json_util.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

static TaskSpec make_spec(const std::string& name, const std::string& layout, const std::string& path,
                          const std::string& labels = "", const std::string& context_suffix = "") {
  TaskSpec s;
  s.name = name;
  s.layout = layout;
  s.path = path;
  s.labels = labels;
  s.context_suffix = context_suffix;
  return s;
}

const std::vector<TaskSpec>& builtin_tasks() {
  // Prompts as in lm-evaluation-harness (../shared/bench/README.md).
  static const std::vector<TaskSpec> t = {
      make_spec("hellaswag", "hellaswag", "hellaswag_val.txt"),
      make_spec("piqa", "piqa", "piqa_valid.jsonl", "piqa_valid-labels.lst"),
      make_spec("arc_easy", "query_choices_gold", "arc_easy.jsonl", "", "\nAnswer:"),
      make_spec("boolq", "query_choices_gold", "boolq.jsonl", "", "\nAnswer:"),
      make_spec("winogrande", "winogrande", "winogrande_dev.jsonl"),
      make_spec("copa", "query_choices_gold", "copa.jsonl"),
      make_spec("lambada_openai", "context_continuation", "lambada_openai.jsonl"),
      make_spec("mmlu", "mmlu_csv", "mmlu_dev"),
  };
  return t;
}

const std::vector<std::string>& task_layouts() {
  static const std::vector<std::string> l = {"query_choices_gold", "context_options",
                                             "context_continuation", "mmlu_csv",
                                             "hellaswag", "piqa", "winogrande"};
  return l;
}

static std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  size_t a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(ws) - a + 1);
}

static void check_layout(const std::string& layout, const std::string& where) {
  const auto& l = task_layouts();
  if (std::find(l.begin(), l.end(), layout) != l.end()) return;
  std::string known;
  for (auto& s : l) known.append(known.empty() ? "" : ", ").append(s);
  fail(where, ": unknown task layout '", layout, "' (expected one of: ", known, ")");
}

// Defaults for a task given only a layout and a path (inline specs).
static TaskSpec spec_with_defaults(const std::string& name, const std::string& layout,
                                   const std::string& path) {
  TaskSpec s = make_spec(name, layout, path);
  if (layout == "query_choices_gold") s.context_suffix = "\nAnswer:";  // ARC/OBQA style
  if (layout == "piqa") {
    std::string stem = path.size() > 6 && path.ends_with(".jsonl") ? path.substr(0, path.size() - 6) : path;
    s.labels = stem + "-labels.lst";
  }
  return s;
}

static std::vector<TaskSpec> read_task_file(const std::string& path) {
  DLCM_CHECK(fs::exists(path), path, ": cannot open the task file (check --task-file)");
  // A task file lists a few dozen specs; the bounds only stop a wrong or hostile file.
  const json j = read_json_file_bounded(path, JsonLimits{8, size_t(1) << 20});
  DLCM_CHECK(j.is_array(), path, ": expected a JSON array of task objects");
  std::vector<TaskSpec> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const json& o = j[i];
    std::string where = path + ": task " + std::to_string(i);
    DLCM_CHECK(o.is_object(), where, ": expected an object");
    auto str = [&](const char* k, bool required) -> std::string {
      if (!o.contains(k)) {
        DLCM_CHECK(!required, where, ": missing field \"", k, "\"");
        return "";
      }
      DLCM_CHECK(o[k].is_string(), where, ": field \"", k, "\" must be a string");
      return o[k].get<std::string>();
    };
    for (auto& [k, v] : o.items())
      DLCM_CHECK(k == "name" || k == "layout" || k == "path" || k == "labels" || k == "context_suffix" ||
                     k == "delimiter" || k == "description" || k == "fewshot_delimiter" || k == "version",
                 where, ": unknown field \"", k,
                 "\" (expected name, layout, path, labels, context_suffix, delimiter, description, "
                 "fewshot_delimiter, version)");
    TaskSpec s = spec_with_defaults(str("name", true), str("layout", true), str("path", true));
    check_layout(s.layout, where);
    if (o.contains("labels")) s.labels = str("labels", false);
    if (o.contains("context_suffix")) s.context_suffix = str("context_suffix", false);
    if (o.contains("delimiter")) s.delimiter = str("delimiter", false);
    if (o.contains("description")) s.description = str("description", false);
    if (o.contains("fewshot_delimiter")) s.fewshot_delimiter = str("fewshot_delimiter", false);
    if (o.contains("version")) {
      DLCM_CHECK(o["version"].is_number(), where, ": field \"version\" must be a number");
      s.version = o["version"].get<double>();
    }
    DLCM_CHECK(!s.name.empty(), where, ": empty \"name\"");
    out.push_back(s);
  }
  return out;
}

// Former names of built-in tasks.
static const char* renamed(const std::string& name) {
  if (name == "lambada") return "lambada_openai";
  return nullptr;
}

std::vector<TaskSpec> resolve_tasks(const std::string& list, const std::string& task_file,
                                    std::vector<std::string>* notes) {
  std::vector<TaskSpec> defined = task_file.empty() ? std::vector<TaskSpec>{} : read_task_file(task_file);
  std::vector<TaskSpec> out;
  std::set<std::string> seen;
  auto add = [&](const TaskSpec& s) {
    DLCM_CHECK(seen.insert(s.name).second, "--tasks: task '", s.name, "' is listed twice");
    out.push_back(s);
  };
  size_t pos = 0;
  while (pos <= list.size()) {
    size_t comma = list.find(',', pos);
    if (comma == std::string::npos) comma = list.size();
    std::string e = trim(list.substr(pos, comma - pos));
    pos = comma + 1;
    if (e.empty()) continue;
    if (e == "all") {
      for (auto& s : builtin_tasks())
        if (!seen.count(s.name)) add(s);
      continue;
    }
    size_t eq = e.find('=');
    if (eq != std::string::npos) {  // inline: name=layout:path
      std::string name = trim(e.substr(0, eq)), rest = e.substr(eq + 1);
      size_t colon = rest.find(':');
      DLCM_CHECK(!name.empty() && colon != std::string::npos && colon + 1 < rest.size(),
                 "--tasks: '", e, "': expected name=layout:path");
      std::string layout = trim(rest.substr(0, colon));
      check_layout(layout, "--tasks: '" + e + "'");
      add(spec_with_defaults(name, layout, trim(rest.substr(colon + 1))));
      continue;
    }
    auto by_name = [&](const std::vector<TaskSpec>& v) -> const TaskSpec* {
      for (auto& s : v)
        if (s.name == e) return &s;
      return nullptr;
    };
    const TaskSpec* s = by_name(defined);
    if (!s) s = by_name(builtin_tasks());
    if (!s && renamed(e)) {
      if (notes) notes->push_back("--tasks: '" + e + "' is now called '" + renamed(e) + "' (its name in lm-evaluation-harness)");
      e = renamed(e);
      s = by_name(builtin_tasks());
    }
    if (!s) {
      std::string known;
      for (auto& b : builtin_tasks()) known += b.name + ", ";
      for (auto& b : defined) known += b.name + ", ";
      fail("--tasks: unknown task '", e, "' (known: ", known,
           "all; or name=layout:path for a file in a supported layout)");
    }
    add(*s);
  }
  DLCM_CHECK(!out.empty(), "--tasks: no task given");
  return out;
}

std::string task_listing(const std::string& bench_dir, const std::string& task_file) {
  std::vector<TaskSpec> all = builtin_tasks();
  if (!task_file.empty())
    for (auto& s : read_task_file(task_file)) all.push_back(s);
  auto where = [&](const std::string& p) {
    return fs::path(p).is_absolute() || bench_dir.empty() ? p : (fs::path(bench_dir) / p).string();
  };
  std::string out;
  for (const TaskSpec& s : all) {
    std::string files;
    for (const std::string& p : {s.path, s.labels}) {
      if (p.empty()) continue;
      const std::string f = where(p);
      files += (files.empty() ? "" : ", ") + f + (fs::exists(f) ? "" : " (missing)");
    }
    char line[128];
    std::snprintf(line, sizeof line, "%-16s %-22s ", s.name.c_str(), s.layout.c_str());
    out += line + files + "\n";
  }
  return out;
}

void limit_items(TaskData& d, i64 limit) {
  if (limit < 0) return;
  std::map<i32, i64> kept;  // per group (-1: no group)
  std::vector<Item> out;
  for (Item& it : d.items)
    if (kept[it.group]++ < limit) out.push_back(std::move(it));
  d.items = std::move(out);
}

i64 utf8_length(const std::string& s) {
  i64 n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

// ---- readers ----

static std::string resolve_path(const std::string& p, const std::string& bench_dir) {
  fs::path q(p);
  return q.is_absolute() || bench_dir.empty() ? q.string() : (fs::path(bench_dir) / q).string();
}

// Benchmark files are external input: the largest real one (MMLU's test split, HellaSwag's
// validation file) is tens of MB with lines of a few KB, so these bounds only stop a wrong or
// hostile file from exhausting memory.
constexpr std::uintmax_t kMaxBenchFileBytes = std::uintmax_t(1) << 30;  // 1 GiB
constexpr size_t kMaxBenchLineBytes = size_t(1) << 20;                   // 1 MiB
constexpr size_t kMaxBenchLines = size_t(10) << 20;                      // ~10M

static std::ifstream open_input(const std::string& path, const std::string& task) {
  DLCM_CHECK(fs::exists(path), task, ": file not found: ", path,
             " (check --bench-dir; see docs/evaluation.md for the expected files)");
  std::error_code ec;
  const std::uintmax_t size = fs::file_size(path, ec);
  DLCM_CHECK(!ec, task, ": cannot read ", path, " (", ec.message(), ")");
  DLCM_CHECK(size <= kMaxBenchFileBytes, task, ": ", path, " has ", size,
             " bytes, over the limit of ", kMaxBenchFileBytes, " for a benchmark file");
  std::ifstream f(path, std::ios::binary);
  DLCM_CHECK(f, task, ": cannot open ", path);
  return f;
}

// Lines without their trailing "\r".
static std::vector<std::string> read_lines(const std::string& path, const std::string& task) {
  std::ifstream f = open_input(path, task);
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(f, line)) {
    DLCM_CHECK(line.size() <= kMaxBenchLineBytes, path, ":", lines.size() + 1, ": line of ",
               line.size(), " bytes, over the limit of ", kMaxBenchLineBytes,
               " (not a benchmark file?)");
    DLCM_CHECK(lines.size() < kMaxBenchLines, path, ": more than ", kMaxBenchLines,
               " lines (not a benchmark file?)");
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
  }
  return lines;
}

static void check_item(const Item& it, const std::string& where) {
  const i64 n = std::max(it.contexts.size(), it.choices.size());
  DLCM_CHECK(it.gold >= 0 && it.gold < n, where, ": gold index ", it.gold, " is outside [0, ", n, ")");
  for (size_t i = 0; i < it.choices.size(); ++i)
    DLCM_CHECK(!trim(it.choices[i]).empty(), where, ": choice ", i, " is empty");
}

// One item per non-blank line of a JSON-lines file: fill() sets contexts, choices and gold
// from the object; `where` ("file:line") names the line in errors.
using FillItem = std::function<void(const json& j, const std::string& where, Item& it)>;
static void read_json_items(TaskData& d, const std::string& path, i64 limit, const FillItem& fill) {
  auto lines = read_lines(path, d.spec.name);
  for (size_t i = 0; i < lines.size() && (limit < 0 || i64(d.items.size()) < limit); ++i) {
    if (trim(lines[i]).empty()) continue;
    std::string where = path + ":" + std::to_string(i + 1);
    // Items nest two levels (object, list of choices); 8 leaves room for extra fields.
    const json j = parse_json_bounded(lines[i], where, JsonLimits{8, kMaxBenchLineBytes});
    DLCM_CHECK(j.is_object(), where, ": expected a JSON object per line");
    Item it;
    it.where = where;
    fill(j, where, it);
    check_item(it, where);
    d.items.push_back(std::move(it));
  }
}

static std::string str_field(const json& j, const char* k, const std::string& where) {
  DLCM_CHECK(j.contains(k), where, ": missing field \"", k, "\"");
  DLCM_CHECK(j[k].is_string(), where, ": field \"", k, "\" must be a string");
  return j[k].get<std::string>();
}

static std::vector<std::string> str_list_field(const json& j, const char* k, const std::string& where) {
  DLCM_CHECK(j.contains(k), where, ": missing field \"", k, "\"");
  const json& a = j[k];
  DLCM_CHECK(a.is_array() && a.size() >= 2, where, ": field \"", k,
             "\" must be an array of at least 2 strings");
  std::vector<std::string> v;
  for (auto& e : a) {
    DLCM_CHECK(e.is_string(), where, ": field \"", k, "\" must hold strings only");
    v.push_back(e.get<std::string>());
  }
  return v;
}

// An index given as a number or a string of digits.
static i32 index_field(const json& j, const char* k, const std::string& where) {
  DLCM_CHECK(j.contains(k), where, ": missing field \"", k, "\"");
  const json& v = j[k];
  if (v.is_number_integer()) {
    // Out of range would wrap into a valid-looking index.
    DLCM_CHECK(!v.is_number_unsigned() || v.get<uint64_t>() <= uint64_t(INT32_MAX), where,
               ": field \"", k, "\" is out of range");
    const i64 x = v.get<i64>();
    DLCM_CHECK(x >= INT32_MIN && x <= INT32_MAX, where, ": field \"", k, "\" is out of range");
    return i32(x);
  }
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    if (!s.empty() && s.size() < 9 && std::all_of(s.begin(), s.end(), ::isdigit)) return std::stoi(s);
  }
  fail(where, ": field \"", k, "\" must be an integer index");
}


// lm-evaluation-harness's HellaSwag clean-up (a no-op on the already-clean file of the bench dir).
static std::string hellaswag_clean(const std::string& in) {
  std::string s = trim(in), t;
  for (size_t i = 0; i < s.size();) {  // " [title]" -> ". "
    if (s.compare(i, 8, " [title]") == 0) t += ". ", i += 8;
    else t += s[i++];
  }
  s.clear();
  for (size_t i = 0; i < t.size();) {  // drop "[...]" (shortest match)
    size_t q = t[i] == '[' ? t.find(']', i) : std::string::npos;
    if (q != std::string::npos) i = q + 1;
    else s += t[i++];
  }
  t.clear();
  for (size_t i = 0; i < s.size();) {  // "  " -> " ", one left-to-right pass (str.replace)
    if (s.compare(i, 2, "  ") == 0) t += ' ', i += 2;
    else t += s[i++];
  }
  return t;
}

static void read_hellaswag(TaskData& d, const std::string& path, i64 limit) {
  auto lines = read_lines(path, d.spec.name);
  while (!lines.empty() && trim(lines.back()).empty()) lines.pop_back();
  DLCM_CHECK(lines.size() % 6 == 0, path, ": ", lines.size(),
             " lines is not a multiple of 6 (each item: context, gold index, 4 endings)");
  for (size_t i = 0; i < lines.size() && (limit < 0 || i64(d.items.size()) < limit); i += 6) {
    std::string where = path + ":" + std::to_string(i + 1);
    Item it;
    it.where = where;
    it.contexts = {hellaswag_clean(lines[i])};
    std::string g = trim(lines[i + 1]);
    DLCM_CHECK(g.size() == 1 && g[0] >= '0' && g[0] <= '3', path, ":", i + 2,
               ": expected the gold index 0-3, got '", g, "'");
    it.gold = g[0] - '0';
    for (int k = 0; k < 4; ++k) it.choices.push_back(hellaswag_clean(lines[i + 2 + k]));
    check_item(it, where);
    d.items.push_back(std::move(it));
  }
}

static void read_piqa(TaskData& d, const std::string& path, const std::string& labels_path, i64 limit) {
  std::vector<std::string> labels = read_lines(labels_path, d.spec.name);
  while (!labels.empty() && trim(labels.back()).empty()) labels.pop_back();
  size_t n = 0;
  read_json_items(d, path, limit, [&](const json& j, const std::string& where, Item& it) {
    DLCM_CHECK(n < labels.size(), labels_path, ": has ", labels.size(), " labels but ", path,
               " has more items");
    std::string lab = trim(labels[n++]);
    DLCM_CHECK(lab == "0" || lab == "1", labels_path, ":", n, ": expected label 0 or 1, got '", lab, "'");
    it.contexts = {"Question: " + str_field(j, "goal", where) + "\nAnswer:"};
    it.choices = {str_field(j, "sol1", where), str_field(j, "sol2", where)};
    it.gold = lab[0] - '0';
  });
  DLCM_CHECK(limit >= 0 || n == labels.size(), labels_path, ": has ", labels.size(),
             " labels but ", path, " has ", n, " items");
}

// Partial scoring: the option fills the blank in the context; the rest is the continuation.
static void fill_winogrande(const json& j, const std::string& where, Item& it) {
  std::string s = str_field(j, "sentence", where);
  size_t blank = s.find('_');
  DLCM_CHECK(blank != std::string::npos, where, ": \"sentence\" has no \"_\" blank");
  for (const char* k : {"option1", "option2"}) it.contexts.push_back(s.substr(0, blank) + str_field(j, k, where));
  it.choices = {trim(s.substr(blank + 1))};
  i32 a = index_field(j, "answer", where);
  DLCM_CHECK(a == 1 || a == 2, where, ": \"answer\" must be \"1\" or \"2\"");
  it.gold = a - 1;
}

static void fill_context_options(const json& j, const std::string& where, Item& it) {
  it.contexts = str_list_field(j, "context_options", where);
  it.choices = {str_field(j, "continuation", where)};
  it.gold = index_field(j, "gold", where);
}

static void fill_context_continuation(const json& j, const std::string& where, Item& it) {
  it.contexts = {str_field(j, "context", where)};
  it.choices = {str_field(j, "continuation", where)};
  it.gold = 0;
}

// RFC 4180 records: quoted fields may hold commas, "" and newlines. Each record comes with the
// line it starts on.
static std::vector<std::pair<i64, std::vector<std::string>>> parse_csv(const std::string& path,
                                                                       const std::string& task) {
  std::ifstream f = open_input(path, task);
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::pair<i64, std::vector<std::string>>> recs;
  std::vector<std::string> rec;
  std::string field;
  bool quoted = false, any = false;
  i64 line = 1, start = 1;
  auto end_record = [&] {
    rec.push_back(std::move(field));
    field.clear();
    if (!(rec.size() == 1 && rec[0].empty())) recs.push_back({start, std::move(rec)});
    rec.clear();
    any = false;
  };
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (!any) start = line, any = true;
    if (quoted) {
      if (c == '"') {
        if (i + 1 < text.size() && text[i + 1] == '"') field += '"', ++i;
        else quoted = false;
      } else {
        if (c == '\n') ++line;
        field += c;
      }
    } else if (c == '"' && field.empty()) {
      quoted = true;
    } else if (c == ',') {
      rec.push_back(std::move(field));
      field.clear();
    } else if (c == '\n' || c == '\r') {
      if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
      ++line;
      end_record();
    } else {
      field += c;
    }
  }
  DLCM_CHECK(!quoted, path, ":", start, ": unterminated quoted field");
  if (any) end_record();
  return recs;
}

static std::string mmlu_subject(const fs::path& file) {
  std::string s = file.stem().string();
  for (const char* suf : {"_dev", "_test", "_val"})
    if (s.ends_with(suf)) s.resize(s.size() - std::string(suf).size());
  return s;
}

static void read_mmlu(TaskData& d, const std::string& path, i64 limit) {
  std::vector<fs::path> files;
  if (fs::is_directory(path)) {
    for (auto& e : fs::directory_iterator(path))
      if (e.is_regular_file() && e.path().extension() == ".csv") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    DLCM_CHECK(!files.empty(), d.spec.name, ": no .csv files in ", path);
  } else {
    files.push_back(path);  // open_input reports a missing file
  }
  for (auto& file : files) {
    const std::string fp = file.string();
    auto recs = parse_csv(fp, d.spec.name);
    DLCM_CHECK(!recs.empty(), fp, ": empty file (expected a header row)");
    const auto& head = recs[0].second;
    DLCM_CHECK(head.size() >= 4 && trim(head.front()) == "question" && trim(head.back()) == "answer",
               fp, ":1: expected the header question,<choices...>,answer");
    const i64 k = head.size() - 2;
    const std::string subject = mmlu_subject(file);
    std::string topic = subject;
    std::replace(topic.begin(), topic.end(), '_', ' ');
    const i32 group = d.groups.size();
    d.groups.push_back(subject);
    d.files.push_back(fp);
    i64 taken = 0;
    for (size_t r = 1; r < recs.size() && (limit < 0 || taken < limit); ++r, ++taken) {
      const auto& [line, f] = recs[r];
      std::string where = fp + ":" + std::to_string(line);
      DLCM_CHECK(i64(f.size()) == k + 2, where, ": ", f.size(), " fields, the header has ", k + 2);
      Item it;
      it.where = where;
      it.group = group;
      // lm-evaluation-harness's MMLU prompt: the subject line (its description, before any
      // few-shot examples), question, lettered choices, "Answer:".
      it.description = "The following are multiple choice questions (with answers) about " + topic + ".\n\n";
      std::string ctx = trim(f[0]);
      for (i64 c = 0; c < k; ++c) {
        const char letter[2] = {char('A' + c), 0};
        ctx.append("\n").append(letter).append(". ").append(f[1 + c]);
        it.choices.push_back(letter);
      }
      it.contexts = {ctx + "\nAnswer:"};
      std::string a = trim(f[k + 1]);
      if (a.size() == 1 && std::isalpha((unsigned char)a[0])) {
        it.gold = std::toupper((unsigned char)a[0]) - 'A';
      } else {
        DLCM_CHECK(!a.empty() && a.size() < 9 && std::all_of(a.begin(), a.end(), ::isdigit), where,
                   ": answer must be a choice index or letter, got '", a, "'");
        it.gold = std::stoi(a);
      }
      check_item(it, where);
      d.items.push_back(std::move(it));
    }
  }
}

TaskData read_task(const TaskSpec& spec, const std::string& bench_dir, i64 limit) {
  check_layout(spec.layout, "task " + spec.name);
  TaskData d;
  d.spec = spec;
  const std::string path = resolve_path(spec.path, bench_dir);
  if (!bench_dir.empty() && !fs::path(spec.path).is_absolute())
    DLCM_CHECK(fs::is_directory(bench_dir), spec.name, ": benchmark folder not found: ", bench_dir,
               " (give --bench-dir; the data is described in docs/evaluation.md)");
  const std::string& L = spec.layout;
  if (L != "mmlu_csv") d.files.push_back(path);
  if (L == "hellaswag") read_hellaswag(d, path, limit);
  else if (L == "piqa") {
    const std::string labels = resolve_path(spec.labels, bench_dir);
    d.files.push_back(labels);
    read_piqa(d, path, labels, limit);
  } else if (L == "winogrande") read_json_items(d, path, limit, fill_winogrande);
  else if (L == "query_choices_gold") {
    read_json_items(d, path, limit, [&](const json& j, const std::string& where, Item& it) {
      it.contexts = {str_field(j, "query", where) + spec.context_suffix};
      it.choices = str_list_field(j, "choices", where);
      it.gold = index_field(j, "gold", where);
    });
  } else if (L == "context_options") read_json_items(d, path, limit, fill_context_options);
  else if (L == "context_continuation") read_json_items(d, path, limit, fill_context_continuation);
  else read_mmlu(d, path, limit);
  d.kind = (L == "winogrande" || L == "context_options") ? TaskKind::Partial
           : L == "context_continuation"                 ? TaskKind::Greedy
                                                         : TaskKind::MultipleChoice;
  DLCM_CHECK(!d.items.empty(), spec.name, ": no items in ", path);
  for (size_t i = 0; i < d.items.size(); ++i) {
    d.items[i].doc_id = i64(i);
    if (d.items[i].description.empty()) d.items[i].description = spec.description;
  }
  return d;
}

}  // namespace dlcm
