// The µP, planning and scaling-law commands as a user meets them (the dlcm binary): outputs
// written, one-line errors naming the flag or file at fault. Also the SVG plot helper.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "testing.h"
#include "tools/plot.h"

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
