#include "eval/zero_shot.h"

#include <chrono>
#include <cmath>
#include <ctime>
#include <cstdio>
#include <map>

#include "core/rng.h"

namespace dlcm {
using nlohmann::json;

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

ScoreRequest make_request(const Tokenizer& tok, const std::string& context, const std::string& continuation) {
  std::string ctx = context, cont = continuation;
  size_t keep = ctx.size();
  while (keep > 0 && is_space(ctx[keep - 1])) --keep;
  cont = ctx.substr(keep) + cont;
  ctx.resize(keep);
  ScoreRequest r;
  r.context = tok.encode(ctx);
  std::vector<i32> whole = tok.encode(ctx + cont);
  if (whole.size() > r.context.size())
    r.continuation.assign(whole.begin() + r.context.size(), whole.end());
  DLCM_CHECK(!r.continuation.empty(), "the continuation \"", continuation, "\" encodes to no tokens");
  return r;
}

static std::string join_continuation(const std::string& ctx, const std::string& choice,
                                     const std::string& delim) {
  if (ctx.empty() || is_space(ctx.back()) || (!choice.empty() && is_space(choice[0]))) return choice;
  return delim + choice;
}

// Requests per item: one per context (Partial) or one per choice.
static size_t request_count(const TaskData& d, const Item& it) {
  return d.kind == TaskKind::Partial ? it.contexts.size() : it.choices.size();
}

static RequestText request_text(const TaskData& d, const Item& it, size_t j) {
  const bool partial = d.kind == TaskKind::Partial;
  const std::string& c = it.contexts[partial ? j : 0];
  const std::string& ch = it.choices[partial ? 0 : j];
  return {it.description + it.fewshot + c, join_continuation(c, ch, d.spec.delimiter)};
}

std::vector<RequestText> task_request_texts(const TaskData& d) {
  std::vector<RequestText> out;
  for (const Item& it : d.items)
    for (size_t j = 0; j < request_count(d, it); ++j) out.push_back(request_text(d, it, j));
  return out;
}

std::vector<ScoreRequest> task_requests(const TaskData& d, const Tokenizer& tok) {
  std::vector<ScoreRequest> reqs;
  for (const Item& it : d.items) {
    try {
      for (size_t j = 0; j < request_count(d, it); ++j) {
        const RequestText t = request_text(d, it, j);
        reqs.push_back(make_request(tok, t.context, t.continuation));
      }
    } catch (const Error& e) {
      fail(it.where, ": ", e.what());
    }
  }
  return reqs;
}

void add_fewshot(TaskData& d, i64 k, uint64_t seed) {
  if (k <= 0) return;
  // An item as an example: its (gold) context, the target delimiter, its gold continuation.
  std::vector<std::string> example(d.items.size());
  for (size_t i = 0; i < d.items.size(); ++i) {
    const Item& it = d.items[i];
    const std::string& c = it.contexts[d.kind == TaskKind::Partial ? it.gold : 0];
    const std::string& ch = it.choices[d.kind == TaskKind::MultipleChoice ? it.gold : 0];
    example[i] = c + join_continuation(c, ch, d.spec.delimiter);
  }
  std::map<i32, std::vector<size_t>> pool;  // item indices per group (-1: no group)
  for (size_t i = 0; i < d.items.size(); ++i) pool[d.items[i].group].push_back(i);
  for (size_t i = 0; i < d.items.size(); ++i) {
    Item& it = d.items[i];
    std::vector<size_t> others;
    for (size_t j : pool[it.group])
      if (j != i) others.push_back(j);
    DLCM_CHECK(i64(others.size()) >= k, d.spec.name, ": --num-fewshot ", k, " needs ", k,
               " other items", it.group >= 0 ? " of subject " + d.groups[it.group] : std::string(),
               ", the task has ", others.size(), " (use a smaller --num-fewshot)");
    // Partial Fisher-Yates: the first k of a seeded shuffle of the other items.
    Rng rng(seed ^ (0x9E3779B97F4A7C15ull * uint64_t(it.doc_id + 1)));
    it.fewshot.clear();
    for (i64 e = 0; e < k; ++e) {
      const size_t pick = e + size_t(rng.next() % uint64_t(others.size() - e));
      std::swap(others[e], others[pick]);
      it.fewshot += example[others[e]] + d.spec.fewshot_delimiter;
    }
  }
}

static i32 argmax(const std::vector<double>& v) {
  i32 best = 0;
  for (i32 i = 1; i < i32(v.size()); ++i)
    if (v[i] > v[best]) best = i;  // first maximum on ties (numpy.argmax)
  return best;
}

// Weighted mean of 0/1 scores and its standard error: weights w_i sum to 1; the variance of the
// mean is sum w_i^2 p (1 - p) n / (n - 1), which is p (1 - p) / (n - 1) for equal weights.
static std::pair<double, double> mean_stderr(const std::vector<double>& x, const std::vector<double>& w) {
  const i64 n = x.size();
  double p = 0, w2 = 0;
  for (i64 i = 0; i < n; ++i) p += w[i] * x[i], w2 += w[i] * w[i];
  double se = n > 1 ? std::sqrt(std::max(0.0, w2 * p * (1 - p) * double(n) / double(n - 1))) : NAN;
  return {p, se};
}

TaskResult task_metrics(const TaskData& d, const std::vector<Score>& scores, bool keep_items) {
  TaskResult r;
  r.name = d.spec.name;
  r.layout = d.spec.layout;
  r.kind = d.kind;
  r.files = d.files;
  const i64 n = d.items.size();
  r.n = n;
  // Item weights: equal, or 1/(S n_s) so that subjects count equally (MMLU).
  std::vector<double> w(n, 1.0 / double(n));
  std::vector<i64> group_n(d.groups.size(), 0);
  for (const Item& it : d.items)
    if (it.group >= 0) group_n[it.group]++;
  i64 S = 0;
  for (i64 c : group_n) S += c > 0;
  if (S > 0)
    for (i64 i = 0; i < n; ++i) w[i] = 1.0 / double(S * group_n[d.items[i].group]);

  std::vector<double> acc(n), acc_norm(n), greedy_ll;
  double ll_sum = 0;
  size_t k = 0;
  for (i64 i = 0; i < n; ++i) {
    const Item& it = d.items[i];
    ItemResult ir;
    const size_t m = d.kind == TaskKind::Partial ? it.contexts.size() : it.choices.size();
    DLCM_CHECK(k + m <= scores.size(), "internal: fewer scores than requests");
    for (size_t j = 0; j < m; ++j) ir.loglik.push_back(scores[k + j].loglik);
    if (d.kind == TaskKind::Greedy) {
      ir.greedy = scores[k].greedy;
      acc[i] = ir.greedy;
      ll_sum += ir.loglik[0];
      greedy_ll.push_back(ir.loglik[0]);
    } else {
      ir.pred = argmax(ir.loglik);
      acc[i] = ir.pred == it.gold;
      r.chance += w[i] / double(m);
      if (d.kind == TaskKind::MultipleChoice) {
        std::vector<double> norm(m);
        for (size_t j = 0; j < m; ++j)
          norm[j] = ir.loglik[j] / double(std::max<i64>(1, utf8_length(it.choices[j])));
        ir.pred_norm = argmax(norm);
        acc_norm[i] = ir.pred_norm == it.gold;
      }
    }
    k += m;
    if (keep_items) r.items.push_back(std::move(ir));
  }
  DLCM_CHECK(k == scores.size(), "internal: ", scores.size(), " scores for ", k, " requests");
  std::tie(r.acc, r.acc_stderr) = mean_stderr(acc, w);
  if (d.kind == TaskKind::MultipleChoice) std::tie(r.acc_norm, r.acc_norm_stderr) = mean_stderr(acc_norm, w);
  if (d.kind == TaskKind::Greedy) {
    const double mean = ll_sum / double(n);
    r.perplexity = std::exp(-mean);
    // Delta method: d exp(-m) = exp(-m) dm, with dm the sample standard error of the mean.
    double ss = 0;
    for (double v : greedy_ll) ss += (v - mean) * (v - mean);
    if (n > 1) r.perplexity_stderr = r.perplexity * std::sqrt(ss / double(n - 1) / double(n));
  }
  for (size_t g = 0; g < d.groups.size(); ++g) {
    GroupResult gr;
    gr.name = d.groups[g];
    std::vector<double> a, an;
    for (i64 i = 0; i < n; ++i)
      if (d.items[i].group == i32(g)) a.push_back(acc[i]), an.push_back(acc_norm[i]);
    gr.n = a.size();
    if (gr.n) {
      const std::vector<double> w(gr.n, 1.0 / double(gr.n));
      std::tie(gr.acc, gr.acc_stderr) = mean_stderr(a, w);
      std::tie(gr.acc_norm, gr.acc_norm_stderr) = mean_stderr(an, w);
    }
    r.groups.push_back(gr);
  }
  return r;
}

TaskResult run_task(LanguageModel& model, const Tokenizer& tok, const TaskSpec& spec, const EvalOptions& o) {
  auto t0 = std::chrono::steady_clock::now();
  const std::clock_t c0 = std::clock();
  TaskResult r;
  try {
    DLCM_CHECK(tok.vocab_size() <= model.config().vocab_size, "the tokenizer's vocabulary (",
               tok.vocab_size(), ") is larger than the model's (", model.config().vocab_size, ")");
    // The whole task is read: few-shot examples come from all of it, and the report gives the
    // item count that --limit leaves out.
    TaskData d = read_task(spec, o.bench_dir);
    const i64 n_original = d.items.size();
    std::vector<i64> group_original(d.groups.size(), 0);
    for (const Item& it : d.items)
      if (it.group >= 0) group_original[it.group]++;
    add_fewshot(d, o.num_fewshot, o.fewshot_seed);
    limit_items(d, o.limit);
    std::vector<ScoreRequest> reqs = task_requests(d, tok);
    Scorer scorer(model, tok.bos_id(), tok.pad_id());
    ScorerOptions so;
    so.batch_tokens = o.batch_tokens;
    so.progress = o.progress;
    so.share_prefixes = o.share_prefixes;
    so.label = spec.name;
    ScoreStats st;
    std::vector<Score> scores = scorer.score(reqs, so, &st);
    r = task_metrics(d, scores, o.keep_items || o.log_samples);
    r.stats = st;
    r.n_original = n_original;
    r.num_fewshot = std::max<i64>(0, o.num_fewshot);
    for (size_t g = 0; g < r.groups.size(); ++g) r.groups[g].n_original = group_original[g];
    if (o.log_samples) {
      r.samples = task_samples(d, task_request_texts(d), scores, r);
      if (!o.keep_items) r.items.clear();
    }
  } catch (const Error& e) {
    r = TaskResult();
    r.error = e.what();
    // reports name the task already
    if (r.error.starts_with(spec.name + ": ")) r.error.erase(0, spec.name.size() + 2);
  }
  r.name = spec.name;
  r.layout = spec.layout;
  r.spec = spec;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.cpu_seconds = double(std::clock() - c0) / CLOCKS_PER_SEC;
  return r;
}

static json num(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

std::vector<json> task_samples(const TaskData& d, const std::vector<RequestText>& texts,
                               const std::vector<Score>& scores, const TaskResult& r) {
  DLCM_CHECK(texts.size() == scores.size() && r.items.size() == d.items.size(),
             "internal: task_samples needs every request's text and score and the item results");
  std::vector<json> out;
  size_t k = 0;
  for (size_t i = 0; i < d.items.size(); ++i) {
    const Item& it = d.items[i];
    const ItemResult& ir = r.items[i];
    for (size_t j = 0; j < request_count(d, it); ++j, ++k) {
      json s = {{"task", d.spec.name}, {"doc_id", it.doc_id}, {"choice", j},
                {"context", texts[k].context}, {"continuation", texts[k].continuation},
                {"loglik", scores[k].loglik}, {"greedy", scores[k].greedy},
                {"tokens", scores[k].scored}, {"truncated", scores[k].truncated}, {"gold", it.gold}};
      if (it.group >= 0) s["subject"] = d.groups[it.group];
      if (d.kind == TaskKind::Greedy) {
        s["acc"] = ir.greedy ? 1 : 0;
      } else {
        s["pred"] = ir.pred;
        s["acc"] = ir.pred == it.gold ? 1 : 0;
      }
      if (d.kind == TaskKind::MultipleChoice) {
        s["pred_norm"] = ir.pred_norm;
        s["acc_norm"] = ir.pred_norm == it.gold ? 1 : 0;
      }
      out.push_back(std::move(s));
    }
  }
  return out;
}

json lm_eval_results(const std::vector<TaskResult>& results, const LmEvalConfig& c) {
  json res = json::object(), groups = json::object(), subtasks = json::object(), configs = json::object(),
       versions = json::object(), nshot = json::object(), better = json::object(), nsamples = json::object();
  for (const TaskResult& r : results) {
    if (!r.ok()) continue;
    const bool mc = r.kind == TaskKind::MultipleChoice, greedy = r.kind == TaskKind::Greedy;
    json e = {{"alias", r.name}, {"acc,none", num(r.acc)}, {"acc_stderr,none", num(r.acc_stderr)}};
    json hib = {{"acc", true}};
    json metrics = json::array({{{"metric", "acc"}, {"aggregation", "mean"}, {"higher_is_better", true}}});
    if (mc) {
      e["acc_norm,none"] = num(r.acc_norm);
      e["acc_norm_stderr,none"] = num(r.acc_norm_stderr);
      hib["acc_norm"] = true;
      metrics.push_back({{"metric", "acc_norm"}, {"aggregation", "mean"}, {"higher_is_better", true}});
    }
    if (greedy) {
      e["perplexity,none"] = num(r.perplexity);
      e["perplexity_stderr,none"] = num(r.perplexity_stderr);
      hib["perplexity"] = false;
      metrics.push_back({{"metric", "perplexity"}, {"aggregation", "perplexity"}, {"higher_is_better", false}});
    }
    res[r.name] = e;
    versions[r.name] = r.spec.version;
    nshot[r.name] = r.num_fewshot;
    better[r.name] = hib;
    nsamples[r.name] = {{"original", r.n_original}, {"effective", r.n}};
    configs[r.name] = {{"task", r.name}, {"layout", r.layout}, {"dataset_path", r.files},
                       {"output_type", greedy ? "loglikelihood" : "multiple_choice"},
                       {"description", r.spec.description}, {"target_delimiter", r.spec.delimiter},
                       {"fewshot_delimiter", r.spec.fewshot_delimiter}, {"num_fewshot", r.num_fewshot},
                       {"metric_list", metrics}, {"metadata", {{"version", r.spec.version}}}};
    if (r.groups.empty()) {
      subtasks[r.name] = json::array();
      continue;
    }
    // MMLU: each subject a subtask "mmlu_<subject>", the task itself their group.
    groups[r.name] = e;
    json names = json::array();
    for (const GroupResult& g : r.groups) {
      const std::string sub = r.name + "_" + g.name;
      names.push_back(sub);
      res[sub] = {{"alias", " - " + g.name}, {"acc,none", num(g.acc)}, {"acc_stderr,none", num(g.acc_stderr)},
                  {"acc_norm,none", num(g.acc_norm)}, {"acc_norm_stderr,none", num(g.acc_norm_stderr)}};
      versions[sub] = r.spec.version;
      nshot[sub] = r.num_fewshot;
      better[sub] = hib;
      nsamples[sub] = {{"original", g.n_original}, {"effective", g.n}};
    }
    subtasks[r.name] = names;
  }
  json j = {{"results", res}, {"group_subtasks", subtasks}, {"configs", configs}, {"versions", versions},
            {"n-shot", nshot}, {"higher_is_better", better}, {"n-samples", nsamples}};
  if (!groups.empty()) j["groups"] = groups;
  j["config"] = {{"model", "dlcm"}, {"model_args", c.model_args},
                 {"batch_size", std::to_string(c.batch_tokens) + " tokens"}, {"device", "cpu"},
                 {"limit", c.limit >= 0 ? json(c.limit) : json(nullptr)}, {"num_fewshot", c.num_fewshot},
                 {"fewshot_seed", c.fewshot_seed}, {"bootstrap_iters", 0}, {"bench_dir", c.bench_dir}};
  j["date"] = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  return j;
}

json task_result_json(const TaskResult& r) {
  if (!r.ok()) return {{"layout", r.layout}, {"error", r.error}, {"seconds", r.seconds}};
  json j = {{"layout", r.layout}, {"n", r.n}, {"acc", num(r.acc)}, {"acc_stderr", num(r.acc_stderr)},
            {"chance", r.chance}, {"seconds", r.seconds}, {"cpu_seconds", r.cpu_seconds}, {"files", r.files},
            {"requests", r.stats.requests}, {"rows", r.stats.rows}, {"batches", r.stats.batches},
            {"tokens", r.stats.tokens}, {"padded_tokens", r.stats.padded_tokens}, {"logit_rows", r.stats.logit_rows},
            {"truncated", r.stats.truncated}, {"cut_continuations", r.stats.cut_continuations}, {"scoring_seconds", r.stats.seconds},
            {"tokens_per_s", r.stats.tokens / std::max(r.stats.seconds, 1e-9)}};
  if (r.kind == TaskKind::MultipleChoice) {
    j["acc_norm"] = num(r.acc_norm);
    j["acc_norm_stderr"] = num(r.acc_norm_stderr);
  }
  if (r.kind == TaskKind::Greedy) j["perplexity"] = num(r.perplexity);
  if (!r.groups.empty()) {
    json g = json::object();
    for (auto& s : r.groups) g[s.name] = {{"n", s.n}, {"acc", s.acc}, {"acc_norm", s.acc_norm}};
    j["subjects"] = g;
  }
  return j;
}

std::string markdown_table(const std::vector<TaskResult>& results) {
  auto f = [](double v, const char* fmt) -> std::string {
    if (!std::isfinite(v)) return "-";
    char b[32];
    std::snprintf(b, sizeof b, fmt, v);
    return b;
  };
  std::string s =
      "| task | items | acc | ± | acc_norm | ± | chance | perplexity | seconds | CPU seconds |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  std::string failed;
  for (const auto& r : results) {
    if (!r.ok()) {
      failed += "- " + r.name + ": not run: " + r.error + "\n";
      continue;
    }
    s += "| " + r.name + " | " + std::to_string(r.n) + " | " + f(r.acc, "%.4f") + " | " +
         f(r.acc_stderr, "%.4f") + " | " + f(r.acc_norm, "%.4f") + " | " + f(r.acc_norm_stderr, "%.4f") +
         " | " + f(r.chance, "%.4f") + " | " + f(r.perplexity, "%.2f") + " | " + f(r.seconds, "%.1f") + " | " +
         f(r.cpu_seconds, "%.1f") + " |\n";
  }
  return s + failed;
}

}  // namespace dlcm
