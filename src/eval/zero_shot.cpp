#include "eval/zero_shot.h"

#include <chrono>
#include <cmath>
#include <ctime>
#include <cstdio>

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

std::vector<ScoreRequest> task_requests(const TaskData& d, const Tokenizer& tok) {
  std::vector<ScoreRequest> reqs;
  for (const Item& it : d.items) {
    try {
      if (d.kind == TaskKind::Partial) {
        for (const auto& c : it.contexts)
          reqs.push_back(make_request(tok, c, join_continuation(c, it.choices[0], d.spec.delimiter)));
      } else {
        const std::string& c = it.contexts[0];
        for (const auto& ch : it.choices)
          reqs.push_back(make_request(tok, c, join_continuation(c, ch, d.spec.delimiter)));
      }
    } catch (const Error& e) {
      fail(it.where, ": ", e.what());
    }
  }
  return reqs;
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

  std::vector<double> acc(n), acc_norm(n);
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
  if (d.kind == TaskKind::Greedy) r.perplexity = std::exp(-ll_sum / double(n));
  for (size_t g = 0; g < d.groups.size(); ++g) {
    GroupResult gr;
    gr.name = d.groups[g];
    for (i64 i = 0; i < n; ++i)
      if (d.items[i].group == i32(g)) gr.n++, gr.acc += acc[i], gr.acc_norm += acc_norm[i];
    if (gr.n) gr.acc /= gr.n, gr.acc_norm /= gr.n;
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
    TaskData d = read_task(spec, o.bench_dir, o.limit);
    std::vector<ScoreRequest> reqs = task_requests(d, tok);
    Scorer scorer(model, tok.bos_id(), tok.pad_id());
    ScorerOptions so;
    so.batch_tokens = o.batch_tokens;
    so.progress = o.progress;
    so.share_prefixes = o.share_prefixes;
    so.label = spec.name;
    ScoreStats st;
    std::vector<Score> scores = scorer.score(reqs, so, &st);
    r = task_metrics(d, scores, o.keep_items);
    r.stats = st;
  } catch (const Error& e) {
    r = TaskResult();
    r.error = e.what();
    // reports name the task already
    if (r.error.starts_with(spec.name + ": ")) r.error.erase(0, spec.name.size() + 2);
  }
  r.name = spec.name;
  r.layout = spec.layout;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.cpu_seconds = double(std::clock() - c0) / CLOCKS_PER_SEC;
  return r;
}

static json num(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

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
