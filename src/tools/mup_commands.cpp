// `dlcm mup coord-check` and `dlcm mup lr-sweep` (SPEC 6, docs/mup_scaling.md).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "data/train_data.h"
#include "models/mup.h"
#include "tools/commands.h"
#include "tools/plot.h"
#include "models/checkpoint.h"
#include "train/coord_check.h"
#include "train/trainer.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  size_t a = 0;
  while (a <= text.size()) {
    size_t b = text.find(',', a);
    if (b == std::string::npos) b = text.size();
    std::string item = text.substr(a, b - a);
    if (!item.empty()) out.push_back(item);
    a = b + 1;
  }
  return out;
}

std::vector<double> parse_number_list(const std::string& flag, const std::string& text) {
  std::vector<double> out;
  for (const std::string& item : split_list(text)) {
    char* end = nullptr;
    double v = std::strtod(item.c_str(), &end);
    DLCM_CHECK(end && *end == 0 && std::isfinite(v), flag, ": '", item,
               "' is not a number (expected a comma-separated list such as 1,2,4)");
    out.push_back(v);
  }
  DLCM_CHECK(!out.empty(), flag, ": empty list");
  return out;
}

static std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

int cmd_coord_check(const CoordCheckArgs& a) {
  Config cfg = config_with_overrides(a.config, a.sets);
  CoordCheckOptions o;
  o.base = cfg;
  o.mults = parse_number_list("--widths", a.widths);
  for (double m : o.mults) DLCM_CHECK(m > 0, "--widths: multipliers must be positive, got ", m);
  o.record_steps.clear();
  for (double s : parse_number_list("--steps", a.steps)) {
    DLCM_CHECK(s >= 0 && s == std::floor(s), "--steps: expected whole step counts, got ", s);
    o.record_steps.push_back(i64(s));
  }
  DLCM_CHECK(a.scale == "both" || a.scale == "token" || a.scale == "concept",
             "--scale: expected both, token or concept, got '", a.scale, "'");
  o.scale_token = a.scale != "concept";
  o.scale_concept = a.scale != "token";
  o.params = split_list(a.params);
  o.seeds = a.seeds;
  const i64 B = cfg.train.batch_size, L = cfg.train.seq_len, V = cfg.model.vocab_size;
  o.tokens.resize(B * L);
  o.targets.resize(B * L);
  if (!a.data.empty()) {
    TrainData d = open_train_data(a.data, cfg);
    d.train_batch(0, 0, 0, B, L, o.tokens.data(), o.targets.data());
  } else {  // random tokens with next-token targets (memorisable: the batch never changes)
    std::vector<i32> row(L + 1);
    for (i64 b = 0; b < B; ++b) {
      for (i64 t = 0; t <= L; ++t) row[t] = i32(counter_hash(cfg.train.seed, 0xC00D, b, t) % uint64_t(V));
      std::copy(row.begin(), row.begin() + L, o.tokens.begin() + b * L);
      std::copy(row.begin() + 1, row.end(), o.targets.begin() + b * L);
    }
  }
  std::fprintf(stderr, "[coord-check] %s, widths %s x (d_token %lld, d_concept %lld), scale %s, %s batch\n",
               cfg.model.arch.c_str(), a.widths.c_str(), (long long)cfg.model.d_token,
               (long long)cfg.model.d_concept, a.scale.c_str(), a.data.empty() ? "synthetic" : "data");
  auto pts = coord_check(o);

  fs::create_directories(a.out);
  std::ofstream csv(fs::path(a.out) / "coord_check.csv");
  DLCM_CHECK(csv, a.out, ": cannot write coord_check.csv (check --out)");
  csv << "param,mult,d_token,d_concept,step,name,rms\n";
  json jp = json::array();
  std::vector<std::string> names;
  for (auto& p : pts) {
    csv << p.param << "," << p.mult << "," << p.d_token << "," << p.d_concept << "," << p.step
        << "," << p.name << "," << fmt("%.6g", p.rms) << "\n";
    jp.push_back({{"param", p.param}, {"mult", p.mult}, {"d_token", p.d_token},
                  {"d_concept", p.d_concept}, {"step", p.step}, {"name", p.name}, {"rms", p.rms}});
    if (std::find(names.begin(), names.end(), p.name) == names.end()) names.push_back(p.name);
  }
  json spread;
  std::printf("spread of the RMS across widths (max/min; SPEC 6 target under mup: <= 2)\n");
  std::printf("%-6s %-16s", "param", "stack");
  for (i64 s : o.record_steps) std::printf(" %9s", ("step " + std::to_string(s)).c_str());
  std::printf("\n");
  std::vector<PlotPanel> panels;
  for (const std::string& param : o.params) {
    for (const std::string& n : names) {
      std::printf("%-6s %-16s", param.c_str(), n.c_str());
      for (i64 s : o.record_steps) {
        double v = coord_spread(pts, param, s, n);
        spread[param][std::to_string(s)][n] = v;
        std::printf(" %9.2f", v);
      }
      std::printf("\n");
    }
    for (i64 s : o.record_steps) {
      PlotPanel pn;
      pn.title = (param == "mup" ? std::string("µP") : std::string("standard")) + ", after " +
                 std::to_string(s) + " steps";
      pn.xlabel = "width multiplier";
      pn.ylabel = "RMS";
      pn.log_x = pn.log_y = true;
      pn.x_ticks = o.mults;
      for (const std::string& n : names) {
        PlotSeries sr;
        sr.label = n;
        sr.markers = true;
        for (auto& p : pts)
          if (p.param == param && p.step == s && p.name == n) {
            sr.x.push_back(p.mult);
            sr.y.push_back(p.rms);
          }
        pn.series.push_back(sr);
      }
      panels.push_back(pn);
    }
  }
  json out = {{"config", config_to_json(cfg)}, {"widths", o.mults}, {"steps", o.record_steps},
              {"scale", a.scale}, {"seeds", o.seeds}, {"batch", a.data.empty() ? "synthetic" : a.data},
              {"points", jp}, {"spread", spread}};
  std::ofstream(fs::path(a.out) / "coord_check.json") << out.dump(1) << "\n";
  write_svg((fs::path(a.out) / "coord_check.svg").string(), panels, int(o.record_steps.size()),
            "coordinate check: " + cfg.model.arch + ", d_token " + std::to_string(cfg.model.d_token) +
                " x multiplier (scale " + a.scale + ")");
  std::fprintf(stderr, "[coord-check] wrote %s/coord_check.{csv,json,svg}\n", a.out.c_str());
  return 0;
}

// Final validation loss of a finished run: the last val_loss line of its log.
static double last_val_loss(const std::string& log_path) {
  std::ifstream f(log_path);
  DLCM_CHECK(f, log_path, ": cannot open the training log");
  double v = NAN;
  std::string line;
  while (std::getline(f, line)) {
    if (line.find("\"val_loss\"") == std::string::npos) continue;
    try {
      v = json::parse(line).at("val_loss").get<double>();
    } catch (const json::exception& e) {
      fail(log_path, ": malformed val_loss line: ", e.what());
    }
  }
  return v;
}

int cmd_lr_sweep(const LrSweepArgs& a) {
  Config base = config_with_overrides(a.config, a.sets);
  if (a.steps > 0) base.train.steps = a.steps;
  DLCM_CHECK(!a.out.empty(), "--out: give the sweep folder");
  auto mults = parse_number_list("--widths", a.widths);
  auto lrs = parse_number_list("--lrs", a.lrs);
  for (double v : lrs) DLCM_CHECK(v > 0, "--lrs: learning rates must be positive, got ", v);
  auto params = split_list(a.params);
  DLCM_CHECK(a.scale == "both" || a.scale == "token" || a.scale == "concept",
             "--scale: expected both, token or concept, got '", a.scale, "'");
  if (base.train.eval_every <= 0 || base.train.eval_every > base.train.steps)
    base.train.eval_every = base.train.steps;  // at least the final validation
  fs::create_directories(a.out);
  const double peak = measure_gemm_peak_gflops(0.3);
  struct Row {
    std::string param, dir;
    double mult, lr, loss;
    i64 width;  // the scaled width: d_token, or d_concept with --scale concept
  };
  const std::string wname = a.scale == "concept" ? "d_concept" : "d_token";
  std::vector<Row> rows;
  const size_t total = params.size() * mults.size() * lrs.size();
  for (const std::string& param : params)
    for (double mult : mults)
      for (double lr : lrs) {
        Config c = base;
        c.model = parametrised(scale_width(base.model, a.scale != "concept" ? mult : 1,
                                           a.scale != "token" ? mult : 1),
                               param);
        c.train.lr = float(lr);
        validate(c, "lr-sweep");
        std::string name = param + (a.scale == "both" ? "" : "_" + a.scale) + "_w" + fmt("%g", mult) +
                           "_lr" + fmt("%g", lr);
        std::string dir = (fs::path(a.out) / name).string();
        std::string ck = (fs::path(dir) / "checkpoint").string();
        i64 done = 0;
        if (is_checkpoint(ck)) done = load_trainer_state(ck).value("step", i64(0));
        std::fprintf(stderr, "[lr-sweep] %zu/%zu %s (%s %lld): %s\n", rows.size() + 1, total,
                     name.c_str(), wname.c_str(),
                     (long long)(a.scale == "concept" ? c.model.d_concept : c.model.d_token),
                     done >= c.train.steps ? "finished, skipped"
                     : done > 0            ? ("resuming at step " + std::to_string(done)).c_str()
                                           : "training");
        if (done < c.train.steps) {
          TrainOptions o;
          o.out_dir = dir;
          o.resume = done > 0;
          o.overwrite = done == 0;  // the sweep owns its run folders: restart a crashed one
          o.quiet = a.quiet;
          o.peak_gflops = peak;
          Trainer tr(c, open_train_data(a.data, c), o);
          tr.run();
        }
        rows.push_back({param, dir, mult, lr, last_val_loss((fs::path(dir) / "train_log.jsonl").string()),
                        a.scale == "concept" ? c.model.d_concept : c.model.d_token});
      }
  // Table, best learning rate per (param, width), plot.
  std::ofstream md(fs::path(a.out) / "lr_sweep.md"), csv(fs::path(a.out) / "lr_sweep.csv");
  DLCM_CHECK(md && csv, a.out, ": cannot write the sweep tables");
  csv << "param,mult," << wname << ",lr,val_loss\n";
  md << "| param | " << wname << " |";
  for (double lr : lrs) md << " lr " << fmt("%g", lr) << " |";
  md << " best lr |\n|---|---|";
  for (size_t i = 0; i <= lrs.size(); ++i) md << "---|";
  md << "\n";
  json jr = json::array(), best = json::object();
  std::vector<PlotPanel> panels;
  for (const std::string& param : params) {
    PlotPanel pn;
    pn.title = param == "mup" ? "µP" : "standard parametrisation";
    pn.xlabel = "base learning rate (train.lr)";
    pn.ylabel = "final validation loss";
    pn.log_x = true;
    pn.x_ticks = lrs;
    for (double mult : mults) {
      PlotSeries sr;
      sr.markers = true;
      double best_loss = INFINITY, best_lr = 0;
      i64 d = 0;
      std::string cells;
      for (auto& r : rows)
        if (r.param == param && r.mult == mult) {
          d = r.width;
          csv << r.param << "," << r.mult << "," << r.width << "," << r.lr << ","
              << fmt("%.5f", r.loss) << "\n";
          jr.push_back({{"param", r.param}, {"mult", r.mult}, {wname, r.width},
                        {"lr", r.lr}, {"val_loss", r.loss}, {"run", r.dir}});
          cells += " " + fmt("%.4f", r.loss) + " |";
          sr.x.push_back(r.lr);
          sr.y.push_back(r.loss);
          if (r.loss < best_loss) best_loss = r.loss, best_lr = r.lr;
        }
      sr.label = wname + " " + std::to_string(d);
      pn.series.push_back(sr);
      md << "| " << param << " | " << d << " |" << cells << " " << fmt("%g", best_lr) << " |\n";
      best[param][std::to_string(d)] = best_lr;
      std::printf("%-4s %s %5lld: best lr %g (val loss %.4f)\n", param.c_str(), wname.c_str(), (long long)d,
                  best_lr, best_loss);
    }
    panels.push_back(pn);
  }
  json out = {{"config", config_to_json(base)}, {"widths", mults}, {"lrs", lrs},
              {"runs", jr}, {"best_lr", best}};
  std::ofstream(fs::path(a.out) / "lr_sweep.json") << out.dump(1) << "\n";
  write_svg((fs::path(a.out) / "lr_sweep.svg").string(), panels, int(panels.size()),
            "learning-rate transfer: " + base.model.arch + ", " + std::to_string(base.train.steps) +
                " steps");
  std::fprintf(stderr, "[lr-sweep] wrote %s/lr_sweep.{md,csv,json,svg}\n", a.out.c_str());
  return 0;
}

}  // namespace dlcm
