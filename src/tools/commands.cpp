#include "core/build_info.h"
#include "tools/commands.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/dist.h"
#include "core/safetensors.h"
#include "data/prepare.h"
#include "data/provenance.h"
#include "data/tokenizer.h"
#include "data/train_data.h"
#include "infer/generate.h"
#include "infer/segment.h"
#include "eval/validate.h"
#include "eval/concept_usage.h"
#include "eval/zero_shot.h"
#include "infer/sampler.h"
#include "models/flops.h"
#include "models/plan.h"
#include "models/model.h"
#include "models/checkpoint.h"
#include "train/trainer.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

Config config_with_overrides(const std::string& path, const std::vector<std::string>& sets) {
  return config_with_overrides(path.empty() ? json::object() : load_config_json(path),
                               path.empty() ? "config" : path, sets);
}

Config config_with_overrides(json j, const std::string& source,
                             const std::vector<std::string>& sets) {
  apply_overrides(j, sets);
  return config_from_json(j, source);
}

TrainSummary train_run(const TrainArgs& a) {
  DLCM_CHECK(!(a.resume && a.overwrite), "train: --resume continues the run in --out and "
             "--overwrite starts it over; give one of them");
  std::vector<std::string> sets = a.sets;
  if (a.steps >= 0) sets.push_back("train.steps=" + std::to_string(a.steps));
  if (a.threads > 0) sets.push_back("train.threads=" + std::to_string(a.threads));
  DLCM_CHECK(a.resume || !a.config.empty() || !a.config_json.is_null() || !a.init_from.empty(),
             "train: give --config FILE (only --resume, which continues with the run's own "
             "checkpoint/config.json, or --init-from CKPT, whose config.json stands in for it, may "
             "leave it out)");
  // On --resume the run's saved config is used (and only resumable keys may be --set); a
  // --config given there is checked by the Trainer for the checkpoint's model keys.
  Config cfg;
  if (a.resume) {
    // (a config given as JSON by the Python package is not a file: the run's own is used)
    cfg = resume_config(a.out, a.config_json.is_null() ? a.config : std::string(), sets);
  } else if (!a.config_json.is_null()) {  // a config given as JSON (the Python package)
    cfg = config_with_overrides(a.config_json, a.config.empty() ? "config" : a.config, sets);
  } else if (a.config.empty()) {
    // Fine-tuning with the checkpoint's own settings (model and training keys), --set on top.
    const std::string dir = resolve_checkpoint(a.init_from);
    json j = config_to_json(load_checkpoint_config(dir));
    apply_overrides(j, sets);
    cfg = config_from_json(j, (fs::path(dir) / "config.json").string());
  } else {
    cfg = config_with_overrides(a.config, sets);
  }
  TrainData data = open_train_data(a.data, cfg);
  // Special ids come from the tokenizer of the data.
  TrainOptions opt;
  opt.out_dir = a.out;
  opt.resume = a.resume;
  opt.overwrite = a.overwrite;
  opt.quiet = a.quiet;
  opt.init_from = a.init_from;
  opt.concept_usage = a.concept_usage;
  opt.keep = a.keep;
  opt.keep_best = a.keep_best ? 1 : -1;
  opt.provenance = provenance_json(a.data);
  opt.on_log = a.on_log;
  opt.stop_requested = a.stop_requested;
  const bool rank0 = dist::rank() == 0;  // under MPI only rank 0 talks
  if (rank0)
    for (const auto& s : a.sets) std::fprintf(stderr, "[train] --set %s\n", s.c_str());
  Trainer tr(cfg, std::move(data), opt);
  tr.run();
  TrainSummary r;
  r.step = tr.step();
  r.stopped = tr.step() < cfg.train.steps;
  // A checkpoint holds this step when written now, or it is the one resumed from.
  if (tr.saved_step() == tr.step() || (a.resume && tr.saved_step() < 0))
    r.checkpoint = (fs::path(a.out) / "checkpoint").string();
  if (a.final_eval && !r.stopped) {
    r.val = tr.validate(-1);
    r.validated = true;
  }
  return r;
}

int cmd_train(const TrainArgs& a) {
  const TrainSummary r = train_run(a);
  if (dist::rank() != 0) return 0;
  const std::string where = !r.checkpoint.empty() ? "checkpoint in " + a.out + "/checkpoint"
                                                  : "no steps run, no checkpoint written";
  if (!r.validated) {
    std::fprintf(stderr, "[train] done: step %lld, %s\n", (long long)r.step, where.c_str());
    return 0;
  }
  const ValResult& v = r.val;
  std::fprintf(stderr, "[train] done: step %lld, full validation loss %.4f (ppl %.2f%s), %s\n",
               (long long)r.step, v.loss, v.ppl,
               v.bpb > 0 ? (", bpb " + std::to_string(v.bpb)).c_str() : "", where.c_str());
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

int cmd_forward(const ForwardArgs& a) {
  auto m = load_model_with_tokenizer(a.ckpt);
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
  Buf logits(B * L * V), p(B * L), bf(B * L);
  std::vector<uint8_t> b8(B * L);
  bool concepts = false;
  // One row at a time keeps activation memory at one row's worth.
  for (i64 b = 0; b < B; ++b) {
    m->logits(tok.data() + b * L, 1, L, logits.data() + b * L * V);
    concepts = m->boundaries(tok.data() + b * L, 1, L, p.data() + b * L, b8.data() + b * L);
  }
  std::vector<TensorToWrite> out = {{"logits", {B, L, V}, logits.data(), nullptr}};
  if (concepts) {
    for (i64 n = 0; n < B * L; ++n) bf[n] = b8[n];
    out.push_back({"p", {B, L}, p.data(), nullptr});
    out.push_back({"b", {B, L}, bf.data(), nullptr});
  }
  write_safetensors(a.out, out, {{"arch", m->config().arch}});
  std::fprintf(stderr, "[forward] wrote logits [%lld, %lld, %lld] to %s\n", (long long)B,
               (long long)L, (long long)V, a.out.c_str());
  return 0;
}

// Token bytes for a one-line display: quoted, control characters and bytes of incomplete
// UTF-8 escaped.
static std::string quote_piece(const std::string& s) {
  const bool utf8 = is_valid_utf8(s);
  std::string o = "\"";
  for (unsigned char c : s) {
    char buf[8];
    if (c == '\n') o += "\\n";
    else if (c == '\t') o += "\\t";
    else if (c == '"' || c == '\\') (o += '\\') += char(c);
    else if (c < 0x20 || c == 0x7f || (c >= 0x80 && !utf8)) {
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      o += buf;
    } else {
      o += char(c);
    }
  }
  return o + "\"";
}

static std::vector<std::string> read_prompt_file(const std::string& path,
                                                 std::vector<std::string>& names) {
  // "-" reads the prompts from standard input (a pipe or a here-document).
  const bool stdin_ = path == "-";
  std::ifstream file;
  if (!stdin_) {
    file.open(path);
    DLCM_CHECK(file, path, ": cannot open the prompt file (check --prompt-file)");
  }
  std::istream& f = stdin_ ? std::cin : file;
  const std::string shown = stdin_ ? "stdin" : path;
  std::vector<std::string> prompts;
  std::string line;
  for (i64 n = 1; std::getline(f, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;  // blank lines separate
    prompts.push_back(line);
    names.push_back(shown + ":" + std::to_string(n));
  }
  DLCM_CHECK(!prompts.empty(), shown, ": no prompts (one prompt per line, blank lines skipped)");
  return prompts;
}

int cmd_generate(const GenerateArgs& a) {
  DLCM_CHECK(a.prompt_file.empty() || a.prompt.empty(),
             "give either --prompt or --prompt-file, not both");
  DLCM_CHECK(!a.prompt_file.empty() || !a.prompt.empty(),
             "--prompt: empty prompt; give some text to continue (or --prompt-file F)");
  DLCM_CHECK(a.tau < 0 || (a.tau > 0 && a.tau <= 1), "--tau: expected a value in (0, 1], got ",
             a.tau);
  std::vector<std::string> prompts, names;
  if (!a.prompt_file.empty()) {
    prompts = read_prompt_file(a.prompt_file, names);
  } else {
    prompts = {a.prompt};
    names = {"--prompt"};
  }
  // Before any loading; a double too small for a float would silently become greedy.
  DLCM_CHECK(a.temperature == 0 || float(a.temperature) != 0,
             "--temperature: expected 0 (greedy) or a value in [1e-6, 100], got ", a.temperature);
  validate_sampler({float(a.temperature), a.top_k, float(a.top_p)});
  std::string dir;
  auto m = load_model_with_tokenizer(a.ckpt, &dir);
  auto tok = load_tokenizer(dir);
  GenerateOptions o;
  o.sampler = {float(a.temperature), a.top_k, float(a.top_p)};
  o.seed = a.seed;
  o.max_new_tokens = a.max_new_tokens;
  o.stop = a.stops;
  o.stop_at_eos = !a.ignore_eos;
  o.max_batch = a.batch;
  o.tau = float(a.tau);
  o.precision = ops::parse_pack_format(a.precision, "--precision");
  o.prompt_names = names;
  const bool concepts = a.show_concepts && m->config().is_dlcm();
  o.concepts = concepts;
  if (a.show_concepts && !concepts)
    std::fprintf(stderr, "[generate] --show-concepts: this is a %s checkpoint; concepts do not "
                 "apply (only dlcm models cut text into concepts)\n", m->config().arch.c_str());

  const bool single = prompts.size() == 1;
  GenerateEvents ev;
  if (a.json) {
    // One JSON object per line and completion, in prompt order as each finishes.
    ev.on_done = [&](i64 i, const Completion& c) {
      json j = {{"index", i},
                {"name", names[i]},
                {"prompt", prompts[i]},
                {"text", c.text},
                {"tokens", c.ids},
                {"prompt_tokens", c.prompt_ids.size()},
                {"new_tokens", c.ids.size()},
                {"stop_reason", c.stop_reason}};
      if (concepts) {
        json cs = json::array();
        for (const TokenConcept& tc : c.concepts)
          cs.push_back({{"p", tc.p}, {"concept", tc.concept_index}, {"boundary", tc.boundary}});
        j["concepts"] = cs;
      }
      std::printf("%s\n", j.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
      std::fflush(stdout);
    };
  } else if (a.ids) {
    // Ids only, printed below once every prompt is done (comparisons with other tools).
  } else if (single && concepts) {
    std::printf("%s\n%6s  %-24s %7s  %s\n", prompts[0].c_str(), "token", "text", "p", "concept");
    ev.on_token = [&](i64, i32 id, const TokenConcept* tc) {
      std::string q = quote_piece(tok->decode_piece(id));
      if (tc)
        std::printf("%6d  %-24s %7.3f  %5d%s\n", id, q.c_str(), tc->p, tc->concept_index,
                    tc->boundary ? "  <- new concept" : "");
      else
        std::printf("%6d  %-24s %7s  %5s  (not fed: the context is full)\n", id, q.c_str(), "?", "?");
      std::fflush(stdout);
    };
    ev.on_done = [&](i64, const Completion& c) {
      std::printf("\n%s%s\n", prompts[0].c_str(), c.text.c_str());
    };
  } else if (single) {
    std::fputs(prompts[0].c_str(), stdout);
    std::fflush(stdout);
    ev.on_text = [](i64, const std::string& t) {
      std::fputs(t.c_str(), stdout);
      std::fflush(stdout);
    };
    ev.on_done = [](i64, const Completion&) { std::fputs("\n", stdout); };
  } else {
    ev.on_done = [&](i64 i, const Completion& c) {
      std::printf("[%lld/%zu] %s: stop: %s, %zu tokens\n%s%s\n", (long long)i + 1, prompts.size(),
                  names[i].c_str(), c.stop_reason.c_str(), c.ids.size(), prompts[i].c_str(),
                  c.text.c_str());
      if (concepts) {
        std::printf("concepts:");
        for (size_t k = 0; k < c.ids.size(); ++k) {
          const TokenConcept& tc = c.concepts[k];
          std::printf(" %s/%.2f/%d", quote_piece(tok->decode_piece(c.ids[k])).c_str(), tc.p,
                      tc.concept_index);
        }
        std::printf("\n");
      }
      std::fflush(stdout);
    };
  }
  auto t0 = std::chrono::steady_clock::now();
  auto done = generate(*m, *tok, prompts, o, ev);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (a.ids)
    for (const Completion& c : done) {
      std::string line;
      for (i32 id : c.prompt_ids) line += std::to_string(id) + " ";
      line += "->";
      for (i32 id : c.ids) line += ' ' + std::to_string(id);
      std::printf("%s\n", line.c_str());
    }
  i64 total = 0;
  for (size_t i = 0; i < done.size(); ++i) {
    total += done[i].ids.size();
    if (done[i].stop_reason == "context")
      std::fprintf(stderr, "[generate] %s: stopped at the context limit of %lld tokens\n",
                   names[i].c_str(), (long long)m->config().max_seq_len);
  }
  if (!a.quiet)
    std::fprintf(stderr, "[generate] %zu prompt%s, %lld tokens in %.2f s (%.1f tokens/s, prefill included)\n",
                 done.size(), single ? "" : "s", (long long)total, sec, double(total) / sec);
  return 0;
}

int cmd_segment(const SegmentArgs& a) {
  DLCM_CHECK(!a.texts.empty() || !a.files.empty(), "give --text TEXT or --file F");
  DLCM_CHECK(a.tau < 0 || a.target_R <= 0, "give either --tau or --target-R, not both");
  DLCM_CHECK(a.tau < 0 || (a.tau > 0 && a.tau <= 1), "--tau: expected a value in (0, 1], got ",
             a.tau);
  std::vector<std::string> names, texts;
  for (size_t i = 0; i < a.texts.size(); ++i) {
    DLCM_CHECK(!a.texts[i].empty(), "--text: empty text; nothing to segment");
    names.push_back(a.texts.size() == 1 && a.files.empty() ? "text" : "text " + std::to_string(i + 1));
    texts.push_back(a.texts[i]);
  }
  for (const auto& path : a.files) {
    std::ifstream f(path, std::ios::binary);
    DLCM_CHECK(f, path, ": cannot open the text file (check --file)");
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    DLCM_CHECK(!s.empty(), path, ": empty file; nothing to segment");
    repair_utf8(s);
    names.push_back(path);
    texts.push_back(s);
  }
  std::string dir;
  auto m = load_model_with_tokenizer(a.ckpt, &dir);
  DLCM_CHECK(m->config().is_dlcm(), dir, ": this is a ", m->config().arch,
             " checkpoint without concepts; segment needs a dlcm checkpoint");
  auto tok = load_tokenizer(dir);
  auto seg = segment_texts(*m, *tok, names, texts, float(a.tau));
  std::string how = "tau " + std::to_string(seg[0].tau);
  if (a.target_R > 0) {
    TauSearch s = find_tau_for_R(seg, a.target_R);
    for (auto& t : seg) apply_tau(t, s.tau);
    char buf[320];
    std::snprintf(buf, sizeof buf, "target R %.3f: tau %.6f gives %.3f tokens/concept (reachable "
                  "range on this text: %.3f to %.3f)", s.target, s.tau, s.R, s.R_min, s.R_max);
    how = buf;
  }
  const bool color = !a.no_color && isatty(fileno(stdout)) && !std::getenv("NO_COLOR");
  std::fputs(render_terminal(seg, color).c_str(), stdout);
  if (a.target_R > 0) std::printf("%s\n", how.c_str());
  if (!a.html.empty()) {
    std::ofstream f(a.html, std::ios::binary);
    DLCM_CHECK(f, a.html, ": cannot write the page (check --html)");
    f << render_html(seg, "dlcm concepts", "checkpoint " + dir + ", " + how);
    DLCM_CHECK(f.good(), a.html, ": write failed");
    std::fprintf(stderr, "[segment] wrote %s\n", a.html.c_str());
  }
  return 0;
}

int cmd_prepare(const PrepareArgs& a) {
  PrepareOptions o;
  o.tokenizer = a.tokenizer;
  o.tokenizer_from = a.tokenizer_from;
  o.vocab_size = i32(a.vocab_size);
  o.threads = int(a.threads);
  o.val_fraction = a.val_fraction;
  json meta = prepare(a.inputs, a.out, o);
  std::printf("%s\n", meta.dump(1).c_str());
  return 0;
}

// The --log-samples file of a task: beside the report, named after it.
static std::string samples_path(const std::string& report, const std::string& task) {
  std::string stem = report.ends_with(".json") ? report.substr(0, report.size() - 5) : report;
  return stem + "_samples_" + task + ".jsonl";
}

int cmd_eval(const EvalArgs& a) {
  if (a.tasks == "list") {
    std::fputs(task_listing(a.bench_dir, a.task_file).c_str(), stdout);
    return 0;
  }
  int rc = 0;
  const json r = eval_report(a, &rc);
  std::printf("%s\n", r.dump(1).c_str());
  if (!a.out.empty()) {
    std::ofstream f(a.out);
    DLCM_CHECK(f, a.out, ": cannot write the report (check --out)");
    f << r.dump(1) << "\n";
  }
  return rc;
}

json eval_report(const EvalArgs& a, int* rc_out) {
  DLCM_CHECK(!a.ckpt.empty(), "eval: give --ckpt DIR (a checkpoint or run folder)");
  DLCM_CHECK(!a.data.empty() || !a.tasks.empty(),
             "eval: give --data DIR (validation bits per byte) and/or --tasks LIST (zero-shot benchmarks)");
  DLCM_CHECK(!a.log_samples || !a.out.empty(),
             "--log-samples: give --out FILE.json too (the samples are written beside the report)");
  // -1 is "not given" (all); 0 would report a loss over no tokens (the library and the Python
  // binding come here without the CLI's range check)
  DLCM_CHECK(a.limit == -1 || a.limit >= 1, "--limit must be >= 1 (leave it out for all), got ",
             a.limit);
  DLCM_CHECK(a.usage_batches == -1 || a.usage_batches >= 1,
             "--batches must be >= 1 (leave it out for all), got ", a.usage_batches);
  auto t0 = std::chrono::steady_clock::now();
  std::string dir = resolve_checkpoint(a.ckpt);
  Config cfg = load_checkpoint_config(dir);
  // Resolve the task list first: a typo fails before any work.
  std::vector<std::string> notes;
  std::vector<TaskSpec> specs =
      a.tasks.empty() ? std::vector<TaskSpec>{} : resolve_tasks(a.tasks, a.task_file, &notes);
  for (const std::string& n : notes) std::fprintf(stderr, "[eval] note: %s\n", n.c_str());
  DLCM_CHECK(!a.concept_usage || !a.data.empty(),
             "eval --concept-usage: give --data DIR (the diagnostics run on its validation split)");
  json r = {{"checkpoint", dir}, {"arch", cfg.model.arch}};
  if (!a.data.empty()) {
    if (a.seq_len > 0) cfg.train.seq_len = a.seq_len;
    cfg.train.batch_size = a.batch_size;
    DLCM_CHECK(cfg.train.seq_len <= cfg.model.max_seq_len, "--seq-len ", cfg.train.seq_len,
               " exceeds the model's max_seq_len ", cfg.model.max_seq_len);
    TrainData data = open_train_data(a.data, cfg);
    auto m = load_model_with_tokenizer(dir);
    ValResult v = validate_split(*m, data, cfg.train.batch_size, cfg.train.seq_len, a.limit);
    r["data"] = a.data;
    r["val_loss"] = v.loss;
    r["val_ppl"] = v.ppl;
    r["val_bpb"] = v.bpb;
    r["val_tokens"] = v.tokens;
    r["seq_len"] = cfg.train.seq_len;
    if (v.compression > 0) r["val_compression"] = v.compression;
    r["val_ce_by_row_position"] = {{"from", v.row_pos_from},
                                   {"to", v.row_pos_to},
                                   {"ce", v.row_pos_ce},
                                   {"tokens", v.row_pos_tokens}};
    if (!a.quiet) {
      std::string line = "[eval] validation CE by position in the row:";
      char buf[96];
      for (size_t k = 0; k < v.row_pos_ce.size(); ++k) {
        std::snprintf(buf, sizeof buf, " %lld-%lld: %.4f", (long long)v.row_pos_from[k],
                      (long long)v.row_pos_to[k], v.row_pos_ce[k]);
        line += buf;
      }
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    if (a.concept_usage) {
      // --limit bounds every pass over the validation split unless --batches says otherwise
      const i64 usage_batches = a.usage_batches > 0 ? a.usage_batches : a.limit;
      ConceptUsageResult u = measure_concept_usage(*m, data, cfg.train.batch_size,
                                                   cfg.train.seq_len, usage_batches);
      if (!u.applicable) {
        r["concept_usage"] = {{"applicable", false}};
        if (!a.quiet) std::fprintf(stderr, "[eval] concept usage: not applicable (%s has no concepts)\n",
                                   cfg.model.arch.c_str());
      } else {
        r["concept_usage"] = concept_usage_json(u);
        if (!a.quiet) std::fprintf(stderr, "[eval] %s", concept_usage_text(u).c_str());
      }
    }
  }
  int rc = 0;
  if (!specs.empty()) {
    auto m = load_model_with_tokenizer(dir);
    auto tok = load_tokenizer(dir);
    EvalOptions eo;
    eo.bench_dir = a.bench_dir;
    eo.limit = a.limit;
    eo.batch_tokens = a.batch_tokens;
    eo.progress = !a.quiet;
    eo.share_prefixes = !a.no_prefix_sharing;
    eo.num_fewshot = a.num_fewshot;
    eo.fewshot_seed = a.fewshot_seed;
    eo.log_samples = a.log_samples;
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
      if (a.log_samples && t.ok()) {
        const std::string path = samples_path(a.out, s.name);
        std::ofstream f(path, std::ios::binary);
        DLCM_CHECK(f, path, ": cannot write the samples (check --out)");
        for (const json& line : t.samples) f << line.dump() << "\n";
        f.close();
        DLCM_CHECK(f.good(), path, ": write failed");
        tasks[s.name]["samples_file"] = path;
        t.samples.clear();
      }
      results.push_back(std::move(t));
    }
    r["bench_dir"] = a.bench_dir;
    if (a.limit >= 0) r["limit"] = a.limit;
    // --limit that left items out: a partial evaluation, said on stderr even with --quiet.
    std::string cut;
    for (const TaskResult& t : results)
      if (t.ok() && t.n < t.n_original)
        cut += (cut.empty() ? "" : ", ") + t.name + " (" + std::to_string(t.n) + " of " +
               std::to_string(t.n_original) + " items)";
    if (!cut.empty()) {
      std::fprintf(stderr, "[eval] warning: --limit %lld: a partial evaluation of %s; its scores do not "
                   "compare with full-set results\n", (long long)a.limit, cut.c_str());
      r["partial_evaluation"] = {{"limit", a.limit},
                                 {"tasks", cut},
                                 {"note", "--limit scored the first items of each task (and MMLU subject) only: "
                                          "not comparable with full-set results (n-samples: original and effective "
                                          "item counts)"}};
    }
    r["num_fewshot"] = a.num_fewshot;
    r["tasks"] = tasks;
    // The same results in lm-evaluation-harness's results.json layout, beside the fields above.
    LmEvalConfig lc;
    lc.model_args = "ckpt=" + dir + ",arch=" + cfg.model.arch;
    lc.batch_tokens = a.batch_tokens;
    lc.limit = a.limit;
    lc.num_fewshot = a.num_fewshot;
    lc.fewshot_seed = a.fewshot_seed;
    lc.bench_dir = a.bench_dir;
    r.update(lm_eval_results(results, lc));
    // lm-eval records `git describe --always` of its own tree: the commit this binary was built from.
    const BuildInfo& bi = build_info();
    r["git_hash"] = bi.git_commit.substr(0, 7) + (bi.git_dirty ? "-dirty" : "");
    std::string table = markdown_table(results);
    if (!a.quiet) std::fprintf(stderr, "\n%s\n", table.c_str());
    if (!a.markdown.empty()) {
      std::ofstream f(a.markdown);
      DLCM_CHECK(f, a.markdown, ": cannot write the table (check --markdown)");
      f << table;
    }
  }
  r["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r["provenance"] = provenance_json(a.data);
  if (rc_out) *rc_out = rc;
  return r;
}

static json flops_to_json(const FlopsReport& r, const ModelConfig& m, i64 L) {
  json comp = json::array();
  for (auto& [k, v] : r.model)
    comp.push_back({{"name", k}, {"forward_flops_per_token", v}, {"params", r.param_count(k)}});
  json j = {{"arch", m.arch},
            {"seq_len", L},
            {"components", comp},
            {"forward_flops_per_token", r.total()},
            {"training_flops_per_token", r.training_total()},
            {"kernel_forward_flops_per_token", r.kernel_total()},
            {"params_total", r.total_params()},
            {"params_non_embedding", r.non_embedding_params()}};
  if (m.is_dlcm()) {
    j["R"] = r.R;
    j["backbone_param_share"] = r.backbone_param_share();
    j["backbone_flops_share"] = r.backbone_flops_share();
    j["cross_attention"] = {{"impl", m.xattn_impl},
                            {"model_flops_per_token", r.xattn.model},
                            {"kernel_flops_per_token_compact", r.xattn.compact},
                            {"kernel_flops_per_token_replicate", r.xattn.replicate}};
  }
  return j;
}

int cmd_config(const ConfigArgs& a) {
  if (a.keys) {
    std::fputs(config_keys_listing(a.markdown).c_str(), stdout);
    return 0;
  }
  const Config cfg = config_with_overrides(a.config, a.sets);
  std::printf("%s\n", config_to_json(cfg).dump(2).c_str());
  return 0;
}

int cmd_flops(const FlopsArgs& a) {
  Config cfg = config_with_overrides(a.config, a.sets);
  i64 L = a.seq_len > 0 ? a.seq_len : cfg.train.seq_len;
  DLCM_CHECK(a.R == 0 || a.R > 1, "--R must be > 1 (tokens per concept), got ", a.R);
  FlopsReport r = flops_report(cfg.model, L, a.R);
  if (a.json) {
    std::printf("%s\n", flops_to_json(r, cfg.model, L).dump(1).c_str());
    return 0;
  }
  const ModelConfig& m = cfg.model;
  double total = r.total();
  std::printf("arch %s, seq_len %lld", m.arch.c_str(), (long long)L);
  if (m.is_dlcm())
    std::printf(", R %g (%s), cross-attention %s", r.R, a.R > 0 ? "--R" : "target_R",
                m.xattn_impl.c_str());
  std::printf("\n%-18s %14s %7s %12s\n", "component", "FLOPs/token", "share", "params");
  for (auto& [k, v] : r.model)
    std::printf("%-18s %14.4e %6.1f%% %12lld\n", k.c_str(), v, 100 * v / total,
                (long long)r.param_count(k));
  std::printf("%-18s %14.4e %7s %12lld\n", "forward total", total, "", (long long)r.total_params());
  std::printf("%-18s %14.4e\n", "training (3x)", r.training_total());
  std::printf("non-embedding parameters N = %lld (all but tok_embeddings and lm_head)\n",
              (long long)r.non_embedding_params());
  if (m.is_dlcm()) {
    std::printf("backbone: %.1f%% of forward FLOPs, P = %.3f of non-embedding parameters\n",
                100 * r.backbone_flops_share(), r.backbone_param_share());
    std::printf("cross-attention FLOPs/token: model %.4e | kernel %.4e (%s, chosen); the other "
                "path's kernel: %.4e (%s)\n",
                r.xattn.model, m.xattn_impl == "compact" ? r.xattn.compact : r.xattn.replicate,
                m.xattn_impl.c_str(),
                m.xattn_impl == "compact" ? r.xattn.replicate : r.xattn.compact,
                m.xattn_impl == "compact" ? "replicate" : "compact");
    std::printf("%-18s %14.4e (model FLOPs with the chosen kernels)\n", "kernel total",
                r.kernel_total());
  }
  return 0;
}

static std::string shape_line(const ModelConfig& m) {
  char b[512];
  if (!m.is_dlcm()) {
    std::snprintf(b, sizeof b, "d_token %lld, %lld layers, %lld/%lld heads, d_ff %lld",
                  (long long)m.d_token, (long long)m.n_layers, (long long)m.n_heads,
                  (long long)m.n_kv_heads, (long long)m.d_ff);
  } else {
    std::snprintf(b, sizeof b,
                  "d_token %lld (%lld/%lld heads, d_ff %lld), enc %lld + dec %lld layers; "
                  "d_concept %lld (%lld/%lld heads, bb_d_ff %lld), %lld backbone layers; R %g",
                  (long long)m.d_token, (long long)m.n_heads, (long long)m.n_kv_heads,
                  (long long)m.d_ff, (long long)m.enc_layers, (long long)m.dec_layers,
                  (long long)m.d_concept, (long long)m.bb_heads, (long long)m.bb_kv_heads,
                  (long long)m.bb_d_ff, (long long)m.bb_layers, double(m.target_R));
  }
  return b;
}

int cmd_plan(const PlanArgs& a) {
  Config base = config_with_overrides(a.match, a.sets);
  PlanOptions o;
  o.R = a.R;
  o.P = a.P;
  o.d_concept = a.d_concept;
  o.d_token = a.d_token;
  o.seq_len = a.seq_len;
  o.flops_tol = a.flops_tol;
  o.p_tol = a.p_tol;
  PlanResult p = plan_match(base, o, a.match);
  const i64 L = a.seq_len > 0 ? a.seq_len : base.train.seq_len;
  std::printf("matched-FLOPs plan at seq_len %lld, R %g, P %g (%lld shapes examined)\n",
              (long long)L, a.R, a.P, (long long)p.candidates);
  std::printf("baseline (%s): %s\n", a.match.c_str(), shape_line(base.model).c_str());
  std::printf("dlcm (proposed): %s\n\n", shape_line(p.dlcm.model).c_str());
  std::printf("%-16s | %12s %12s | %12s %12s\n", "component", "base FLOPs", "base params",
              "dlcm FLOPs", "dlcm params");
  std::vector<std::string> names;
  for (auto* r : {&p.base, &p.prop})
    for (auto& [k, v] : r->model)
      if (std::find(names.begin(), names.end(), k) == names.end()) names.push_back(k);
  // keep the head last
  std::stable_partition(names.begin(), names.end(), [](const std::string& n) { return n != "head"; });
  auto cell = [](const FlopsReport& r, const std::string& k, bool params) {
    for (auto& [n, v] : r.model)
      if (n == k) {
        char b[32];
        if (params) std::snprintf(b, sizeof b, "%12lld", (long long)r.param_count(k));
        else std::snprintf(b, sizeof b, "%12.4e", v);
        return std::string(b);
      }
    return std::string(12 - 1, ' ') + "-";
  };
  for (auto& k : names)
    std::printf("%-16s | %s %s | %s %s\n", k.c_str(), cell(p.base, k, false).c_str(),
                cell(p.base, k, true).c_str(), cell(p.prop, k, false).c_str(),
                cell(p.prop, k, true).c_str());
  std::printf("%-16s | %12.4e %12lld | %12.4e %12lld\n", "forward total", p.base.total(),
              (long long)p.base.total_params(), p.prop.total(), (long long)p.prop.total_params());
  std::printf("%-16s | %12s %12lld | %12s %12lld\n", "non-embedding N", "",
              (long long)p.base.non_embedding_params(), "", (long long)p.prop.non_embedding_params());
  std::printf("\ndlcm / baseline forward FLOPs per token: %.4f (tolerance +-%g%%)\n", p.flops_ratio,
              100 * a.flops_tol);
  std::printf("backbone share of non-embedding parameters P = %.4f (asked %g +- %g); of forward "
              "FLOPs %.1f%%\n", p.P, a.P, a.p_tol, 100 * p.prop.backbone_flops_share());
  const std::string text = config_to_json(p.dlcm).dump(2);
  if (!a.out.empty()) {
    std::ofstream f(a.out);
    DLCM_CHECK(f, a.out, ": cannot write the proposed config (check --out)");
    f << text << "\n";
    std::printf("config written to %s\n", a.out.c_str());
  } else {
    std::printf("\n%s\n", text.c_str());
  }
  return 0;
}

}  // namespace dlcm
