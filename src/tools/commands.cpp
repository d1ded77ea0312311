#include "tools/commands.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/safetensors.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "data/train_data.h"
#include "infer/sampler.h"
#include "models/flops.h"
#include "models/plan.h"
#include "models/model.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

Config config_with_overrides(const std::string& path, const std::vector<std::string>& sets) {
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
  if (!a.final_eval) {
    std::fprintf(stderr, "[train] done: step %lld, checkpoint in %s/checkpoint\n", (long long)tr.step(),
                 a.out.c_str());
    return 0;
  }
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
  std::string dir = resolve_checkpoint(a.ckpt);
  Config cfg = load_checkpoint_config(dir);
  if (a.seq_len > 0) cfg.train.seq_len = a.seq_len;
  cfg.train.batch_size = a.batch_size;
  DLCM_CHECK(cfg.train.seq_len <= cfg.model.max_seq_len, "--seq-len ", cfg.train.seq_len,
             " exceeds the model's max_seq_len ", cfg.model.max_seq_len);
  TrainData data = open_train_data(a.data, cfg);
  TrainOptions o;
  o.quiet = true;
  o.peak_gflops = 1;
  o.init_from = dir;
  auto t0 = std::chrono::steady_clock::now();
  Trainer tr(cfg, std::move(data), o);
  auto v = tr.validate(a.limit);
  double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json r = {{"checkpoint", dir}, {"data", a.data}, {"arch", cfg.model.arch},
            {"val_loss", v.loss}, {"val_ppl", v.ppl}, {"val_bpb", v.bpb},
            {"val_tokens", v.tokens}, {"seq_len", cfg.train.seq_len}, {"seconds", sec}};
  if (v.compression > 0) r["val_compression"] = v.compression;
  std::printf("%s\n", r.dump(1).c_str());
  if (!a.out.empty()) {
    std::ofstream f(a.out);
    DLCM_CHECK(f, a.out, ": cannot write the report (check --out)");
    f << r.dump(1) << "\n";
  }
  return 0;
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

static std::string fmt_g7(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.7g", v);
  return b;
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
  // floats as the 7 significant digits they hold (0.03, not 0.029999999329447746)
  std::function<void(json&)> tidy = [&](json& j) {
    if (j.is_object() || j.is_array())
      for (auto& v : j) tidy(v);
    else if (j.is_number_float())
      j = std::stod(fmt_g7(j.get<double>()));
  };
  json cj = config_to_json(p.dlcm);
  tidy(cj);
  std::string text = cj.dump(2);
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
