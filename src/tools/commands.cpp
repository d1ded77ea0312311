#include "tools/commands.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/safetensors.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "data/train_data.h"
#include "eval/zero_shot.h"
#include "infer/sampler.h"
#include "models/flops.h"
#include "models/model.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

static Config config_with_overrides(const std::string& path, const std::vector<std::string>& sets) {
  json j;
  if (!path.empty()) {
    std::ifstream f(path);
    DLCM_CHECK(f, path, ": cannot open config file (check --config)");
    try {
      j = json::parse(f);
    } catch (const json::parse_error& e) {
      fail(path, ": invalid JSON: ", e.what());
    }
  } else {
    j = json::object();
  }
  apply_overrides(j, sets);
  return config_from_json(j, path.empty() ? "config" : path);
}

int cmd_train(const TrainArgs& a) {
  std::vector<std::string> sets = a.sets;
  if (a.steps >= 0) sets.push_back("train.steps=" + std::to_string(a.steps));
  Config cfg = config_with_overrides(a.config, sets);
  if (a.resume) {
    // The run's own config is authoritative for the model; training keys come from the
    // given config and --set (so a run can be extended with --steps).
    Config saved = load_checkpoint_config((fs::path(a.out) / "checkpoint").string());
    cfg.model = saved.model;
  }
  TrainData data = open_train_data(a.data, cfg);
  // Special ids come from the tokenizer of the data.
  TrainOptions opt;
  opt.out_dir = a.out;
  opt.resume = a.resume;
  opt.quiet = a.quiet;
  opt.init_from = a.init_from;
  for (const auto& s : a.sets) std::fprintf(stderr, "[train] --set %s\n", s.c_str());
  Trainer tr(cfg, std::move(data), opt);
  tr.run();
  auto v = tr.validate(-1);
  std::fprintf(stderr, "[train] done: step %lld, full validation loss %.4f (ppl %.2f%s), checkpoint in %s/checkpoint\n",
               (long long)tr.step(), v.loss, v.ppl,
               v.bpb > 0 ? (", bpb " + std::to_string(v.bpb)).c_str() : "", a.out.c_str());
  return 0;
}

std::vector<std::vector<i32>> read_token_rows(const std::string& path) {
  std::ifstream f(path);
  DLCM_CHECK(f, path, ": cannot open token file");
  std::vector<std::vector<i32>> rows;
  std::string line;
  i64 lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    std::istringstream is(line);
    std::vector<i32> row;
    std::string tok;
    while (is >> tok) {
      char* end = nullptr;
      long long v = std::strtoll(tok.c_str(), &end, 10);
      DLCM_CHECK(end && *end == 0 && v >= 0 && v < (1ll << 31), path, ":", lineno,
                 ": expected non-negative integer token ids, got '", tok, "'");
      row.push_back(i32(v));
    }
    if (row.empty()) continue;
    DLCM_CHECK(rows.empty() || row.size() == rows[0].size(), path, ":", lineno, ": row has ",
               row.size(), " tokens but the first row has ", rows[0].size(),
               " (all rows must have the same length)");
    rows.push_back(std::move(row));
  }
  DLCM_CHECK(!rows.empty(), path, ": no token rows found");
  return rows;
}

static std::unique_ptr<LanguageModel> load_model(const std::string& path, std::string* dir_out = nullptr) {
  std::string dir = resolve_checkpoint(path);
  Config cfg = load_checkpoint_config(dir);
  auto m = make_model(cfg.model);
  load_checkpoint_params(dir, m->params());
  if (dir_out) *dir_out = dir;
  return m;
}

int cmd_forward(const ForwardArgs& a) {
  auto m = load_model(a.ckpt);
  auto rows = read_token_rows(a.tokens);
  const i64 B = rows.size(), L = rows[0].size(), V = m->config().vocab_size;
  DLCM_CHECK(L <= m->config().max_seq_len, a.tokens, ": rows have ", L,
             " tokens but the model's max_seq_len is ", m->config().max_seq_len);
  std::vector<i32> tok;
  for (auto& r : rows)
    for (i32 t : r) {
      DLCM_CHECK(t < V, a.tokens, ": token id ", t, " is outside the vocabulary [0, ", V, ")");
      tok.push_back(t);
    }
  Buf logits(B * L * V);
  // One row at a time keeps activation memory at one row's worth.
  for (i64 b = 0; b < B; ++b) m->logits(tok.data() + b * L, 1, L, logits.data() + b * L * V);
  std::vector<TensorToWrite> out = {{"logits", {B, L, V}, logits.data(), nullptr}};
  write_safetensors(a.out, out, {{"arch", m->config().arch}});
  std::fprintf(stderr, "[forward] wrote logits [%lld, %lld, %lld] to %s\n", (long long)B,
               (long long)L, (long long)V, a.out.c_str());
  return 0;
}

int cmd_generate(const GenerateArgs& a) {
  std::string dir;
  auto m = load_model(a.ckpt, &dir);
  auto tok = load_tokenizer(dir);
  DLCM_CHECK(!a.prompt.empty(), "--prompt: empty prompt; give some text to continue");
  const ModelConfig& mc = m->config();
  std::vector<i32> ids = {tok->bos_id()};
  auto p = tok->encode(a.prompt);
  ids.insert(ids.end(), p.begin(), p.end());
  DLCM_CHECK(i64(ids.size()) < mc.max_seq_len, "--prompt: ", ids.size(),
             " tokens (with BOS) leaves no room in the context of ", mc.max_seq_len, " tokens");
  SamplerConfig sc{float(a.temperature), a.top_k, float(a.top_p)};
  Rng rng(a.seed);
  std::vector<std::pair<float, i32>> scratch;
  const i64 V = mc.vocab_size;
  Buf logits;
  std::vector<i32> gen;
  std::string printed;
  std::fputs(a.prompt.c_str(), stdout);
  std::fflush(stdout);
  for (i64 n = 0; n < a.max_new_tokens; ++n) {
    if (i64(ids.size()) >= mc.max_seq_len) {
      std::fprintf(stderr, "\n[generate] stopped: reached the context limit of %lld tokens\n",
                   (long long)mc.max_seq_len);
      break;
    }
    // Recomputes the whole prefix each token (the cached streaming engine replaces this).
    const i64 L = ids.size();
    logits.resize(L * V);
    m->logits(ids.data(), 1, L, logits.data());
    i32 next = sample_token(logits.data() + (L - 1) * V, V, sc, rng, scratch);
    if (next == tok->eos_id()) break;
    ids.push_back(next);
    gen.push_back(next);
    std::string text = tok->decode(gen);
    // Print only complete UTF-8: hold back a partial multi-byte sequence at the end.
    if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0 &&
        is_valid_utf8(text)) {
      std::fputs(text.c_str() + printed.size(), stdout);
      std::fflush(stdout);
      printed = text;
    }
  }
  std::string text = tok->decode(gen);
  if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0)
    std::fputs(text.c_str() + printed.size(), stdout);
  std::fputs("\n", stdout);
  return 0;
}

int cmd_prepare(const PrepareArgs& a) {
  PrepareOptions o;
  o.tokenizer = a.tokenizer;
  o.vocab_size = i32(a.vocab_size);
  o.val_fraction = a.val_fraction;
  json meta = prepare(a.inputs, a.out, o);
  std::printf("%s\n", meta.dump(1).c_str());
  return 0;
}

int cmd_eval(const EvalArgs& a) {
  DLCM_CHECK(!a.data.empty() || !a.tasks.empty(),
             "eval: give --data DIR (validation bits per byte) and/or --tasks LIST (zero-shot benchmarks)");
  auto t0 = std::chrono::steady_clock::now();
  std::string dir = resolve_checkpoint(a.ckpt);
  Config cfg = load_checkpoint_config(dir);
  // Resolve the task list first: a typo fails before any work.
  std::vector<TaskSpec> specs = a.tasks.empty() ? std::vector<TaskSpec>{} : resolve_tasks(a.tasks, a.task_file);
  json r = {{"checkpoint", dir}, {"arch", cfg.model.arch}};
  if (!a.data.empty()) {
    if (a.seq_len > 0) cfg.train.seq_len = a.seq_len;
    cfg.train.batch_size = a.batch_size;
    DLCM_CHECK(cfg.train.seq_len <= cfg.model.max_seq_len, "--seq-len ", cfg.train.seq_len,
               " exceeds the model's max_seq_len ", cfg.model.max_seq_len);
    TrainData data = open_train_data(a.data, cfg);
    TrainOptions o;
    o.quiet = true;
    o.peak_gflops = 1;
    o.init_from = dir;
    Trainer tr(cfg, std::move(data), o);
    auto v = tr.validate(a.limit);
    r["data"] = a.data;
    r["val_loss"] = v.loss;
    r["val_ppl"] = v.ppl;
    r["val_bpb"] = v.bpb;
    r["val_tokens"] = v.tokens;
    r["seq_len"] = cfg.train.seq_len;
    if (v.compression > 0) r["val_compression"] = v.compression;
  }
  int rc = 0;
  if (!specs.empty()) {
    auto m = load_model(dir);
    auto tok = load_tokenizer(dir);
    EvalOptions eo;
    eo.bench_dir = a.bench_dir;
    eo.limit = a.limit;
    eo.batch_tokens = a.batch_tokens;
    eo.progress = !a.quiet;
    eo.share_prefixes = !a.no_prefix_sharing;
    std::vector<TaskResult> results;
    json tasks = json::object();
    for (const TaskSpec& s : specs) {
      TaskResult t = run_task(*m, *tok, s, eo);
      if (!t.ok()) {
        std::fprintf(stderr, "[eval] %s: not run: %s\n", s.name.c_str(), t.error.c_str());
        rc = 1;
      } else if (!a.quiet) {
        std::fprintf(stderr, "[eval] %s: acc %.4f (chance %.4f), %lld items, %.1f s\n", s.name.c_str(),
                     t.acc, t.chance, (long long)t.n, t.seconds);
      }
      tasks[s.name] = task_result_json(t);
      results.push_back(std::move(t));
    }
    r["bench_dir"] = a.bench_dir;
    if (a.limit >= 0) r["limit"] = a.limit;
    r["tasks"] = tasks;
    std::string table = markdown_table(results);
    if (!a.quiet) std::fprintf(stderr, "\n%s\n", table.c_str());
    if (!a.markdown.empty()) {
      std::ofstream f(a.markdown);
      DLCM_CHECK(f, a.markdown, ": cannot write the table (check --markdown)");
      f << table;
    }
  }
  r["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s\n", r.dump(1).c_str());
  if (!a.out.empty()) {
    std::ofstream f(a.out);
    DLCM_CHECK(f, a.out, ": cannot write the report (check --out)");
    f << r.dump(1) << "\n";
  }
  return rc;
}

int cmd_flops(const FlopsArgs& a) {
  Config cfg = config_with_overrides(a.config, a.sets);
  i64 L = a.seq_len > 0 ? a.seq_len : cfg.train.seq_len;
  FlopsReport r = flops_report(cfg.model, L, a.R);
  double total = r.total();
  std::printf("arch %s, seq_len %lld%s\n", cfg.model.arch.c_str(), (long long)L,
              cfg.model.is_dlcm() ? (", R " + std::to_string(a.R > 0 ? a.R : cfg.model.target_R)).c_str() : "");
  std::printf("%-18s %14s %7s %12s\n", "component", "FLOPs/token", "share", "params");
  for (auto& [k, v] : r.model) {
    i64 np = 0;
    for (auto& [k2, v2] : r.params)
      if (k2 == k) np = v2;
    std::printf("%-18s %14.4e %6.1f%% %12lld\n", k.c_str(), v, 100 * v / total, (long long)np);
  }
  std::printf("%-18s %14.4e\n", "forward total", total);
  std::printf("%-18s %14.4e\n", "training (3x)", 3 * total);
  if (!r.kernel.empty())
    for (auto& [k, v] : r.kernel)
      std::printf("kernel FLOPs of %s (%s): %.4e per token (model: counted above)\n", k.c_str(),
                  cfg.model.xattn_impl.c_str(), v);
  return 0;
}

}  // namespace dlcm
