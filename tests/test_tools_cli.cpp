// The µP, planning and scaling-law commands as a user meets them (the dlcm binary): outputs
// written, one-line errors naming the flag or file at fault. Also the SVG plot helper and
// `dlcm plot` (training curves of runs read from their train_log.jsonl).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/rng.h"
#include "models/checkpoint.h"
#include "models/config.h"
#include "models/plan.h"
#include "testing.h"
#include "tools/plot.h"
#include "tools/run_plot.h"
#include "train/train_log.h"

using namespace dlcm;
namespace fs = std::filesystem;

namespace {
using Out = test::CommandResult;
Out dlcm_cmd(const std::string& args) { return test::run_dlcm(args); }
const std::string kTiny =
    "--set vocab_size=64 --set d_token=16 --set n_heads=2 --set n_kv_heads=2 --set head_dim=8 "
    "--set d_ff=48 --set n_layers=2 --set mup.d_base=16 --set train.batch_size=2 "
    "--set train.seq_len=8 --set train.threads=1";
}  // namespace

TEST(ToolsCli, CoordCheckWritesTablesAndPlot) {
  test::TempDir tmp;
  Out r = dlcm_cmd("mup coord-check " + kTiny + " --widths 1,2 --steps 0,2 --out " + tmp.path);
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("spread of the RMS"), std::string::npos) << r.out;
  for (const char* f : {"coord_check.csv", "coord_check.json", "coord_check.svg"})
    EXPECT_TRUE(fs::exists(tmp.path + "/" + f)) << f;
  std::ifstream jf(tmp.path + "/coord_check.json");
  auto j = nlohmann::json::parse(jf);
  EXPECT_EQ(j["points"].size(), 2u * 2 * 2 * 3);  // params x widths x steps x (2 stacks + logits)
  EXPECT_TRUE(j["spread"]["mup"]["2"].contains("logits"));
  // the plot: a panel per (parametrisation, step), a marker per width of each stack
  EXPECT_EQ(test::count_of(test::read_text(tmp.path + "/coord_check.svg"), "<circle"), 2 * 2 * 3 * 2);
  // one parametrisation: its own points only (a panel that took the other's would be empty)
  r = dlcm_cmd("mup coord-check " + kTiny + " --widths 1,2 --steps 0,2 --params mup --out " + tmp.path + "/m");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(test::count_of(test::read_text(tmp.path + "/m/coord_check.svg"), "<circle"), 2 * 3 * 2);
}

TEST(ToolsCli, FlopsJsonAndPlanOutputs) {
  test::TempDir tmp;
  Out r = dlcm_cmd(std::string("flops --config ") + DLCM_SOURCE_DIR + "/configs/baseline-small.json --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_DOUBLE_EQ(j["training_flops_per_token"].get<double>(), 3 * j["forward_flops_per_token"].get<double>());
  r = dlcm_cmd(std::string("plan --match ") + DLCM_SOURCE_DIR +
               "/configs/baseline-small.json --R 4 --P 0.5 --out " + tmp.path + "/dlcm.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("dlcm / baseline forward FLOPs per token"), std::string::npos) << r.out;
  r = dlcm_cmd("flops --config " + tmp.path + "/dlcm.json --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  auto d = nlohmann::json::parse(r.out);
  EXPECT_NEAR(d["forward_flops_per_token"].get<double>() / j["forward_flops_per_token"].get<double>(), 1, 0.05);
  EXPECT_NEAR(d["backbone_param_share"].get<double>(), 0.5, 0.03);
  EXPECT_TRUE(d.contains("cross_attention"));
}

// `dlcm plan`'s options reach the search (the proposal equals the library's with the same
// tolerances, which here differs from the default tolerances' one), its header gives the
// config's seq_len unless --seq-len is given, and the head is the table's last component.
TEST(ToolsCli, PlanPassesItsOptionsAndKeepsTheHeadLast) {
  test::TempDir tmp;
  const std::string base = std::string(DLCM_SOURCE_DIR) + "/configs/baseline-small.json";
  const Config c = load_config(base);
  PlanOptions o;
  o.R = 4;
  o.P = 0.5;
  const PlanResult defaults = plan_match(c, o, base);
  o.flops_tol = 0.3;
  o.p_tol = 0.3;
  const PlanResult loose = plan_match(c, o, base);
  const auto shape = [](const ModelConfig& m) {
    return std::vector<i64>{m.d_token, m.d_ff, m.enc_layers, m.dec_layers, m.d_concept,
                            m.bb_layers, m.bb_d_ff};
  };
  ASSERT_NE(shape(loose.dlcm.model), shape(defaults.dlcm.model))
      << "pick tolerances whose proposal differs from the defaults'";
  Out r = dlcm_cmd("plan --match " + base + " --R 4 --P 0.5 --flops-tol 0.3 --p-tol 0.3 --out " +
                   tmp.path + "/dlcm.json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(shape(load_config(tmp.path + "/dlcm.json").model), shape(loose.dlcm.model)) << r.out;
  EXPECT_NE(r.out.find("tolerance +-30%"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(asked 0.5 +- 0.3)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("plan at seq_len " + std::to_string(c.train.seq_len) + ","),
            std::string::npos) << r.out;
  // the component rows: "head" last, right before "forward total"
  std::vector<std::string> rows;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);)
    if (line.find(" | ") != std::string::npos) rows.push_back(line.substr(0, line.find(' ')));
  ASSERT_GE(rows.size(), 4u) << r.out;
  EXPECT_EQ(rows[rows.size() - 3], "head") << r.out;  // then "forward total" (two words)
  EXPECT_EQ(rows[rows.size() - 2], "forward") << r.out;
  r = dlcm_cmd("plan --match " + base + " --R 4 --P 0.5 --seq-len 96");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("plan at seq_len 96,"), std::string::npos) << r.out;
}

TEST(ToolsCli, BadInputsGiveOneLineErrors) {
  test::TempDir tmp;
  std::ofstream(tmp.path + "/fit.json") << "{\"constants\": {\"E0\": 1}}";
  const std::string base = std::string(DLCM_SOURCE_DIR) + "/configs/baseline-small.json";
  struct Case {
    std::string args, expect;
  } cases[] = {
      {"mup coord-check --widths 1,x", "--widths"},
      {"mup coord-check --widths 1,1.3 --set n_heads=4 --set n_kv_heads=4", "non-integer"},
      {"plan --match " + base + " --R 8 --P 0.97 --p-tol 0.001 --flops-tol 0.001 --d-token 256 --d-concept 256",
       "no dlcm shape matches"},
      {"plan --match " + base + " --R 4 --P 0.5 --d-concept 100", "--d-concept"},
      {"scaling fit " + tmp.path + "/none", "no such checkpoint"},
      {"scaling predict --fit " + tmp.path + "/missing.json --N 1e6 --D 1e8 --R 4 --P 0.5", "cannot open the fit"},
      {"scaling predict --fit " + tmp.path + "/fit.json --N 1e6 --D 1e8 --R 4 --P 0.5", "missing number 'A_tok'"},
      {"scaling allocate --fit " + tmp.path + "/fit.json --flops 1e15 --R 4", "missing number"},
      {"mup lr-sweep --config " + base + " --data " + tmp.path + "/nodata --out " + tmp.path + "/sw --lrs 0", "--lrs"},
      // PyTorch peers of bench train are checked before any engine is built
      {"bench train --config " + base + " --torch " + tmp.path + "/no-python", "no Python interpreter"},
      {"bench train --config " + base + " --torch /usr/bin/python3:fast", "unknown setting 'fast'"},
  };
  for (auto& c : cases) {
    Out r = dlcm_cmd(c.args);
    EXPECT_NE(r.rc, 0) << c.args;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << " -> " << r.out;
    EXPECT_NE(r.out.find("dlcm: error:"), std::string::npos) << r.out;
  }
}

TEST(Plot, TicksAndSvg) {
  auto t = axis_ticks(1, 1000, true);
  EXPECT_EQ(t.front(), 1);
  EXPECT_EQ(t.back(), 1000);
  auto lin = axis_ticks(0, 1, false);
  EXPECT_EQ(lin.size(), 6u);  // 0, 0.2, ..., 1
  auto narrow = axis_ticks(3, 7, true);  // less than a decade: 3, 4, 5, 6, 7
  EXPECT_EQ(narrow.size(), 5u);
  PlotPanel p;
  p.title = "a <b> & c";
  p.log_x = p.log_y = true;
  PlotSeries s;
  s.label = "s";
  s.x = {1, 2, -1, 4};  // -1 cannot sit on a log axis: skipped
  s.y = {1, 0.5, 3, NAN};
  p.series.push_back(s);
  std::string svg = render_svg({p}, 1, "t");
  EXPECT_NE(svg.find("a &lt;b&gt; &amp; c"), std::string::npos);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  EXPECT_EQ(svg.find("inf"), std::string::npos);
  EXPECT_THROW(write_svg("/nonexistent-dir/x.svg", {p}, 1, ""), Error);
}

namespace {

// A train_log.jsonl as Trainer::run writes it: a train record every 10 steps (2048 tokens per
// step), an eval record every 20, an event line; dlcm runs also log their loss terms.
std::string fake_log(bool dlcm, double offset) {
  std::string s;
  for (int step = 10; step <= 60; step += 10) {
    nlohmann::json t = {{"step", step}, {"tokens", step * 2048}, {"loss", 8.0 - step / 20.0 + offset},
                        {"ce", 8.0 - step / 20.0}, {"lr", 1e-3 * step / 60}, {"grad_norm", 1.0},
                        {"tokens_per_s", 5000 + step}, {"mfu", 0.5}};
    if (dlcm) t.update({{"aux", 0.01 * step}, {"F", 0.25}, {"G", 0.3}, {"compression", 4.0},
                        {"compression_thresholded", 3.0 + step / 60.0}});
    s += t.dump() + "\n";
    if (step % 20 == 0) {
      nlohmann::json e = {{"step", step}, {"tokens", step * 2048}, {"val_loss", 7.5 - step / 30.0},
                          {"val_ppl", 100.0}, {"val_tokens", 4096}, {"val_bpb", 3.0 - step / 100.0 + offset},
                          {"concept_usage", {{"ce", 1.0}, {"pos_ce", {1.0, 2.0}}}}};
      if (dlcm) e["val_compression"] = 4.0 + step / 100.0;
      s += e.dump() + "\n";
    }
  }
  return s + R"({"event": "nonfinite", "step": 61, "component": "loss"})" "\n";
}

std::string run_dir(const std::string& root, const std::string& name, const std::string& log) {
  fs::create_directories(root + "/" + name);
  std::ofstream(root + "/" + name + "/train_log.jsonl") << log;
  return root + "/" + name;
}

// The panels of an SVG written by render_svg: the text of each "<g>" group.
std::vector<std::string> svg_panels(const std::string& svg) {
  std::vector<std::string> out;
  for (size_t a = svg.find("<g>\n"); a != std::string::npos; a = svg.find("<g>\n", a + 1))
    out.push_back(svg.substr(a, svg.find("</g>", a) - a));
  return out;
}

// Points of each polyline drawn in `color`.
std::vector<size_t> polyline_points(const std::string& panel, const std::string& color) {
  std::vector<size_t> out;
  const std::string key = "<polyline fill=\"none\" stroke=\"" + color + "\"";
  for (size_t a = panel.find(key); a != std::string::npos; a = panel.find(key, a + 1)) {
    const size_t p = panel.find("points=\"", a) + 8, e = panel.find('"', p);
    std::istringstream pts(panel.substr(p, e - p));
    std::string pt;
    size_t n = 0;
    while (pts >> pt) ++n;
    out.push_back(n);
  }
  return out;
}

using test::error_of;

}  // namespace

// The log reader keeps train and eval records with their numeric fields (events and nested
// objects skipped); bad input names the folder, or the file and line.
TEST(RunPlot, ReadsTrainLogsAndNamesBadInput) {
  test::TempDir tmp;
  const std::string run = run_dir(tmp.path, "run_a", fake_log(true, 0));
  TrainLog l = read_train_log(run);
  EXPECT_EQ(l.path, run + "/train_log.jsonl");
  ASSERT_EQ(l.records.size(), 6u + 3u);
  EXPECT_FALSE(l.records[0].eval);
  EXPECT_EQ(l.records[0].values.at("tokens"), 20480);
  EXPECT_TRUE(l.records[2].eval);  // after step 20's train record
  EXPECT_EQ(l.records[2].line, 3);
  EXPECT_EQ(l.records[2].values.at("val_bpb"), 3.0 - 0.2);
  EXPECT_FALSE(l.records[2].has("concept_usage"));
  EXPECT_EQ(read_train_log(run + "/train_log.jsonl").records.size(), l.records.size());  // the file itself

  EXPECT_NE(error_of([&] { read_train_log(tmp.path + "/nosuch"); }).find(tmp.path + "/nosuch: no such run folder"),
            std::string::npos);
  fs::create_directories(tmp.path + "/nolog");
  EXPECT_NE(error_of([&] { read_train_log(tmp.path + "/nolog"); }).find(tmp.path + "/nolog/train_log.jsonl: not found"),
            std::string::npos);
  run_dir(tmp.path, "empty", "\n");
  EXPECT_NE(error_of([&] { read_train_log(tmp.path + "/empty"); }).find("train_log.jsonl: empty training log"),
            std::string::npos);
  run_dir(tmp.path, "bad", "{\"step\": 1, \"tokens\": 2, \"loss\": 3}\n{\"step\": 2, \"loss\n");
  EXPECT_NE(error_of([&] { read_train_log(tmp.path + "/bad"); }).find("bad/train_log.jsonl:2: "), std::string::npos)
      << error_of([&] { read_train_log(tmp.path + "/bad"); });
  run_dir(tmp.path, "array", "[1, 2]\n");
  EXPECT_NE(error_of([&] { read_train_log(tmp.path + "/array"); }).find("array/train_log.jsonl:1: expected a JSON object"),
            std::string::npos);
  // a file over 1 GiB (sparse) is refused by its size, before any of it is read
  run_dir(tmp.path, "huge", "{\"step\": 1}\n");
  fs::resize_file(tmp.path + "/huge/train_log.jsonl", (std::uintmax_t(1) << 30) + 1);
  EXPECT_NE(error_of([&] { read_train_log(tmp.path + "/huge"); }).find("huge/train_log.jsonl: 1073741825 bytes, over the limit"),
            std::string::npos) << error_of([&] { read_train_log(tmp.path + "/huge"); });
  run_dir(tmp.path, "nostep", "{\"loss\": 3}\n");
  EXPECT_NE(error_of([&] { read_train_log(tmp.path + "/nostep"); }).find("nostep/train_log.jsonl:1: missing integer field \"step\""),
            std::string::npos);
  // no "tokens": plotting against tokens names the line and suggests --x step
  run_dir(tmp.path, "old", "{\"step\": 1, \"loss\": 3}\n");
  TrainLog old = read_train_log(tmp.path + "/old");
  EXPECT_NE(error_of([&] { build_run_plot({old}, {"old"}, RunPlotOptions{}); }).find("old/train_log.jsonl:1: no \"tokens\" field"),
            std::string::npos);
  RunPlotOptions by_step;
  by_step.x = "step";
  EXPECT_EQ(build_run_plot({old}, {"old"}, by_step).panels.size(), 1u);
}

// Two runs overlaid: one colour per run in every panel, series equal to the logged values,
// the dlcm-only panels present, a legend of the run names; explicit metrics and their errors.
TEST(RunPlot, OverlaysRunsWithOneColourEachAndALegend) {
  test::TempDir tmp;
  const std::string base = run_dir(tmp.path + "/a", "baseline", fake_log(false, 0.5));
  const std::string dl = run_dir(tmp.path + "/b", "dlcm", fake_log(true, 0));
  std::vector<TrainLog> logs = {read_train_log(base), read_train_log(dl)};
  auto labels = run_labels({base, dl + "/"});
  EXPECT_EQ(labels, (std::vector<std::string>{"baseline", "dlcm"}));
  EXPECT_EQ(run_labels({base, tmp.path + "/b/dlcm/train_log.jsonl"})[1], "dlcm");
  EXPECT_EQ(run_labels({tmp.path + "/a/x", tmp.path + "/b/x"})[0], tmp.path + "/a/x");  // same names: paths

  RunPlot p = build_run_plot(logs, labels, RunPlotOptions{});
  std::vector<std::string> titles;
  for (auto& panel : p.panels) titles.push_back(panel.title);
  EXPECT_EQ(titles, (std::vector<std::string>{"loss: training (line), validation (dots)", "validation bits per byte",
                                              "realised compression: training (line), validation (dots)",
                                              "auxiliary loss term (before its weight)", "learning rate", "throughput"}));
  EXPECT_EQ(p.panels[0].xlabel, "tokens seen (thousands)");
  // loss panel: baseline line, baseline dots, dlcm line, dlcm dots, from the records
  ASSERT_EQ(p.panels[0].series.size(), 4u);
  const PlotSeries& bl = p.panels[0].series[0];
  EXPECT_EQ(bl.color, 0);
  ASSERT_EQ(bl.y.size(), 6u);
  EXPECT_DOUBLE_EQ(bl.y[2], 8.0 - 30 / 20.0 + 0.5);
  EXPECT_DOUBLE_EQ(bl.x[2], 30 * 2048 / 1e3);
  EXPECT_EQ(p.panels[0].series[3].color, 1);
  EXPECT_EQ(p.panels[0].series[3].y.size(), 3u);
  EXPECT_DOUBLE_EQ(p.panels[0].series[3].y[0], 7.5 - 20 / 30.0);
  // compression and aux: the dlcm run only
  EXPECT_EQ(p.panels[2].series.size(), 2u);
  EXPECT_EQ(p.panels[2].series[0].color, 1);
  EXPECT_EQ(p.panels[3].series.size(), 1u);

  const std::string svg = run_plot_svg(p);
  for (auto& l : labels) EXPECT_NE(svg.find(">" + l + "</text></g>"), std::string::npos) << l;
  auto panels = svg_panels(svg);
  ASSERT_EQ(panels.size(), 6u);
  EXPECT_EQ(polyline_points(panels[0], "#1f77b4"), std::vector<size_t>{6});  // baseline: train loss
  EXPECT_EQ(polyline_points(panels[0], "#d62728"), std::vector<size_t>{6});
  EXPECT_EQ(polyline_points(panels[1], "#1f77b4"), std::vector<size_t>{3});  // val_bpb: a line through the evals
  EXPECT_TRUE(polyline_points(panels[2], "#1f77b4").empty());               // no compression for the baseline
  EXPECT_EQ(polyline_points(panels[2], "#d62728"), std::vector<size_t>{6});

  // the baseline alone: no compression or aux panel
  EXPECT_EQ(build_run_plot({logs[0]}, {"baseline"}, RunPlotOptions{}).panels.size(), 4u);
  RunPlotOptions o;
  o.metrics = {"F", "val_ppl"};
  o.x = "step";
  RunPlot q = build_run_plot(logs, labels, o);
  ASSERT_EQ(q.panels.size(), 2u);
  EXPECT_EQ(q.panels[0].series.size(), 1u);  // F: dlcm only
  EXPECT_DOUBLE_EQ(q.panels[1].series[0].x[0], 20);
  o.metrics = {"nosuch"};
  const std::string e = error_of([&] { build_run_plot(logs, labels, o); });
  EXPECT_NE(e.find("--metrics: no run logs 'nosuch' (the logs have: "), std::string::npos) << e;
  EXPECT_NE(e.find("val_bpb"), std::string::npos) << e;
  o.metrics = {"compression"};
  EXPECT_NE(error_of([&] { build_run_plot({logs[0]}, {"baseline"}, o); }).find("no run logs 'compression'"),
            std::string::npos);
}

// The command on real runs: a tiny dlcm trained by the CLI with evaluations, plotted as SVG and
// HTML beside a second log; bad output names and bad logs are one-line errors.
namespace {
// A small text corpus prepared with the byte tokenizer into dir/data (no network).
void prepare_word_corpus(const std::string& dir) {
  {
    std::ofstream f(dir + "/corpus.txt");
    const char* words[] = {"the", "concept", "model", "reads", "tokens", "and", "writes", "text"};
    Rng r(3);
    for (int d = 0; d < 120; ++d) {
      const int n = 6 + int(r.next() % 20);
      for (int w = 0; w < n; ++w) f << words[r.next() % 8] << (w + 1 < n ? " " : ".\n");
      f << "\f";
    }
  }
  Out p = dlcm_cmd("prepare --input " + dir + "/corpus.txt --out " + dir + "/data --tokenizer bytes --val-fraction 0.1");
  ASSERT_EQ(p.rc, 0) << p.out;
}

// The last val_loss line of a run folder's log.
double last_val_loss(const std::string& run) {
  double v = -1;
  std::ifstream f(run + "/train_log.jsonl");
  for (std::string l; std::getline(f, l);) {
    auto j = nlohmann::json::parse(l);
    if (j.contains("val_loss")) v = j["val_loss"].get<double>();
  }
  return v;
}
}  // namespace

TEST(RunPlot, CliPlotsTrainedRuns) {
  test::TempDir tmp;
  prepare_word_corpus(tmp.path);
  if (HasFatalFailure()) return;
  nlohmann::json cfg = {{"arch", "dlcm"},   {"vocab_size", 260}, {"d_token", 16},     {"n_heads", 2},
                        {"n_kv_heads", 1},  {"head_dim", 8},     {"d_ff", 32},        {"max_seq_len", 32},
                        {"enc_layers", 1},  {"dec_layers", 1},   {"d_concept", 24},   {"bb_layers", 1},
                        {"bb_heads", 2},    {"bb_kv_heads", 2},  {"bb_d_ff", 48},     {"x_heads", 2},
                        {"x_kv_heads", 1},  {"x_d_ff", 32}};
  cfg["train"] = {{"seq_len", 32}, {"batch_size", 2}, {"steps", 6}, {"warmup_steps", 0}, {"eval_every", 3},
                  {"eval_batches", 1}, {"ckpt_every", 0}, {"log_every", 2}, {"threads", 1}};
  std::ofstream(tmp.path + "/cfg.json") << cfg.dump();
  Out t = dlcm_cmd("train --quiet --no-final-eval --config " + tmp.path + "/cfg.json --data " + tmp.path +
                   "/data --out " + tmp.path + "/tiny_dlcm");
  ASSERT_EQ(t.rc, 0) << t.out;
  // with the final validation, --quiet still ends on its summary: the step, the loss with bits
  // per byte (the data's bytes per token are known) and where the checkpoint is
  Out f = dlcm_cmd("train --quiet --config " + tmp.path + "/cfg.json --data " + tmp.path +
                   "/data --out " + tmp.path + "/final --steps 2 --set train.eval_every=0");
  ASSERT_EQ(f.rc, 0) << f.out;
  for (const std::string& s : {std::string("[train] done: step 2, full validation loss "),
                               std::string(", bpb "),
                               "), checkpoint in " + tmp.path + "/final/checkpoint\n"})
    EXPECT_NE(f.out.find(s), std::string::npos) << s << "\n" << f.out;
  const std::string other = run_dir(tmp.path, "synthetic_baseline", fake_log(false, 0));
  Out r = dlcm_cmd("plot " + tmp.path + "/tiny_dlcm " + other + " --out " + tmp.path + "/curves.svg");
  ASSERT_EQ(r.rc, 0) << r.out;
  std::stringstream svg;
  svg << std::ifstream(tmp.path + "/curves.svg").rdbuf();
  EXPECT_EQ(svg.str().rfind("<svg", 0), 0u);
  EXPECT_NE(svg.str().find(">tiny_dlcm</text></g>"), std::string::npos);
  EXPECT_NE(svg.str().find(">synthetic_baseline</text></g>"), std::string::npos);
  auto panels = svg_panels(svg.str());
  ASSERT_EQ(panels.size(), 6u);  // every default panel has data from the trained dlcm
  // train records at steps 1, 2, 4, 6; evals at 3 and 6
  EXPECT_EQ(polyline_points(panels[0], "#1f77b4"), std::vector<size_t>{4});
  EXPECT_EQ(polyline_points(panels[1], "#1f77b4"), std::vector<size_t>{2});
  EXPECT_EQ(polyline_points(panels[2], "#1f77b4"), std::vector<size_t>{4});
  r = dlcm_cmd("plot " + tmp.path + "/tiny_dlcm --x step --metrics loss,val_bpb --title 'tiny run' --out " +
               tmp.path + "/curves.html");
  ASSERT_EQ(r.rc, 0) << r.out;
  std::stringstream html;
  html << std::ifstream(tmp.path + "/curves.html").rdbuf();
  EXPECT_EQ(html.str().rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_NE(html.str().find("<svg"), std::string::npos);
  EXPECT_NE(html.str().find("<title>tiny run</title>"), std::string::npos);
  EXPECT_NE(html.str().find("<td>tiny_dlcm</td>"), std::string::npos);
  EXPECT_EQ(svg_panels(html.str()).size(), 2u);

  r = dlcm_cmd("plot " + tmp.path + "/tiny_dlcm --out " + tmp.path + "/curves.png");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("dlcm: error: --out " + tmp.path + "/curves.png: expected a file name ending in .svg or .html"),
            std::string::npos) << r.out;
  run_dir(tmp.path, "broken", fake_log(false, 0) + "{\"step\": 70, \"loss\": }\n");
  r = dlcm_cmd("plot " + tmp.path + "/tiny_dlcm " + tmp.path + "/broken --out " + tmp.path + "/x.svg");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("dlcm: error: " + tmp.path + "/broken/train_log.jsonl:11: "), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(tmp.path + "/x.svg"));
  r = dlcm_cmd("plot " + tmp.path + "/missing --out " + tmp.path + "/x.svg");
  EXPECT_NE(r.out.find("dlcm: error: " + tmp.path + "/missing: no such run folder"), std::string::npos) << r.out;
}

// `mup lr-sweep`: one run per (parametrisation, width, learning rate), each run's final
// validation loss in the tables, the best learning rate per width the one with the lowest; run
// again, every finished run is skipped and the tables stay; with more steps each run resumes.
TEST(ToolsCli, LrSweepTrainsEveryPointPicksTheBestAndResumes) {
  test::TempDir tmp;
  prepare_word_corpus(tmp.path);
  if (HasFatalFailure()) return;
  nlohmann::json cfg = {{"arch", "baseline"}, {"vocab_size", 260}, {"d_token", 16}, {"n_heads", 2},
                        {"n_kv_heads", 2},    {"head_dim", 8},     {"d_ff", 32},    {"n_layers", 1},
                        {"max_seq_len", 32},  {"mup", {{"d_base", 16}}}};
  cfg["train"] = {{"seq_len", 16}, {"batch_size", 2}, {"steps", 3}, {"warmup_steps", 0},
                  {"eval_every", 0}, {"eval_batches", 2}, {"ckpt_every", 0}, {"log_every", 1},
                  {"threads", 1}};
  std::ofstream(tmp.path + "/cfg.json") << cfg.dump();
  const std::string sw = tmp.path + "/sw";
  const std::string cmd = "mup lr-sweep --quiet --config " + tmp.path + "/cfg.json --data " +
                          tmp.path + "/data --out " + sw + " --widths 1,2 --lrs 0.03,0.001 --params mup,sp";
  Out r = dlcm_cmd(cmd);
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(test::count_of(r.out, ": training\n"), 8) << r.out;
  for (const char* f : {"lr_sweep.md", "lr_sweep.csv", "lr_sweep.json", "lr_sweep.svg"})
    EXPECT_TRUE(fs::exists(sw + "/" + f)) << f;
  auto read_json = [&] {
    std::ifstream jf(sw + "/lr_sweep.json");
    return nlohmann::json::parse(jf);
  };
  const nlohmann::json j = read_json();
  ASSERT_EQ(j["runs"].size(), 8u) << j.dump();
  std::map<std::pair<std::string, std::string>, std::pair<double, double>> best;  // (param, d) -> (loss, lr)
  std::set<double> losses;
  for (const auto& run : j["runs"]) {
    const std::string param = run["param"];
    const double mult = run["mult"], lr = run["lr"];
    const i64 d = run["d_token"];
    EXPECT_EQ(d, i64(16 * mult)) << run.dump();
    char name[64];
    std::snprintf(name, sizeof name, "%s_w%g_lr%g", param.c_str(), mult, lr);
    EXPECT_EQ(run["run"].get<std::string>(), sw + "/" + name);
    // the table's loss is the run's own final validation loss
    EXPECT_EQ(run["val_loss"].get<double>(), last_val_loss(sw + "/" + name)) << name;
    const double loss = run["val_loss"];
    losses.insert(loss);
    auto [b, first] = best.try_emplace({param, std::to_string(d)}, loss, lr);
    if (!first && loss < b->second.first) b->second = {loss, lr};
  }
  // the runs differ (a sweep that trained one model would not), except µP and SP at the base
  // width, which are the same model
  EXPECT_EQ(losses.size(), 6u);
  for (const char* lr : {"0.03", "0.001"})
    EXPECT_EQ(last_val_loss(sw + "/mup_w1_lr" + lr), last_val_loss(sw + "/sp_w1_lr" + lr)) << lr;
  ASSERT_EQ(best.size(), 4u);
  for (const auto& [key, b] : best) {
    const auto& [param, d] = key;
    EXPECT_EQ(j["best_lr"][param][d].get<double>(), b.second) << param << " " << d;
    char line[128];
    std::snprintf(line, sizeof line, "%-4s d_token %5s: best lr %g (val loss %.4f)", param.c_str(),
                  d.c_str(), b.second, b.first);
    EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
  }
  // the Markdown table: a column per learning rate in the given order, a row per width
  const std::string md = test::read_text(sw + "/lr_sweep.md");
  EXPECT_EQ(md.rfind("| param | d_token | lr 0.03 | lr 0.001 | best lr |\n|---|---|---|---|---|\n", 0), 0u)
      << md;
  for (const auto& [key, b] : best) {
    const auto& [param, d] = key;
    std::string row = "| " + param + " | " + d + " |";
    for (const char* lr : {"0.03", "0.001"}) {
      char cell[32];
      std::snprintf(cell, sizeof cell, " %.4f |",
                    last_val_loss(sw + "/" + param + "_w" + (d == "16" ? "1" : "2") + "_lr" + lr));
      row += cell;
    }
    char tail[32];
    std::snprintf(tail, sizeof tail, " %g |\n", b.second);
    EXPECT_NE(md.find(row + tail), std::string::npos) << row + tail << "\n" << md;
  }
  // the plot: a panel per parametrisation on a log axis of the swept rates, a marker per run
  const std::string svg = test::read_text(sw + "/lr_sweep.svg");
  for (const char* t : {">µP</text>", ">standard parametrisation</text>", ">0.03</text>", ">0.001</text>",
                        ">base learning rate (train.lr) (log)</text>", ">final validation loss</text>",
                        ">d_token 32</text>"})
    EXPECT_NE(svg.find(t), std::string::npos) << t;
  EXPECT_EQ(test::count_of(svg, "<circle"), 8);
  std::ifstream csv(sw + "/lr_sweep.csv");
  std::string header;
  std::getline(csv, header);
  EXPECT_EQ(header, "param,mult,d_token,lr,val_loss");
  size_t lines = 0;
  for (std::string l; std::getline(csv, l);) lines += !l.empty();
  EXPECT_EQ(lines, 8u);
  // again: nothing trains, the same tables
  r = dlcm_cmd(cmd);
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(test::count_of(r.out, ": finished, skipped\n"), 8) << r.out;
  EXPECT_EQ(test::count_of(r.out, ": training\n"), 0) << r.out;
  EXPECT_EQ(read_json()["runs"], j["runs"]);
  // one step more: each run resumes from its checkpoint and ends with a new validation
  r = dlcm_cmd(cmd + " --steps 4");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(test::count_of(r.out, ": resuming at step 3\n"), 8) << r.out;
  const nlohmann::json k = read_json();
  ASSERT_EQ(k["runs"].size(), 8u);
  for (size_t i = 0; i < 8; ++i) {
    const std::string run = k["runs"][i]["run"];
    EXPECT_EQ(load_trainer_state(run + "/checkpoint").value("step", 0), 4) << run;
    EXPECT_EQ(k["runs"][i]["val_loss"].get<double>(), last_val_loss(run)) << run;
    EXPECT_NE(k["runs"][i]["val_loss"], j["runs"][i]["val_loss"]) << run;
  }
}
