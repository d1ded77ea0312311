// `dlcm plot RUN... --out FILE.svg|FILE.html`: training curves of runs, overlaid
// (tools/run_plot.h does the work).
#include <cstdio>
#include <fstream>

#include "tools/commands.h"
#include "tools/run_plot.h"

namespace dlcm {

int cmd_plot(const PlotArgs& a) {
  DLCM_CHECK(!a.runs.empty(), "plot: give one or more run folders");
  const bool html = a.out.ends_with(".html"), svg = a.out.ends_with(".svg");
  DLCM_CHECK(html || svg, "--out ", a.out, ": expected a file name ending in .svg or .html");
  std::vector<TrainLog> logs;
  for (const std::string& r : a.runs) logs.push_back(read_train_log(r));
  const std::vector<std::string> labels = run_labels(a.runs);
  RunPlotOptions o;
  o.x = a.x;
  o.metrics = split_list(a.metrics);
  o.title = a.title;
  RunPlot p = build_run_plot(logs, labels, o);
  std::ofstream f(a.out, std::ios::binary);
  DLCM_CHECK(f, a.out, ": cannot write the plot (check --out and its folder)");
  f << (html ? run_plot_html(p, logs, labels) : run_plot_svg(p));
  f.close();
  DLCM_CHECK(f.good(), a.out, ": write failed");
  std::fprintf(stderr, "[plot] %zu run(s), %zu panel(s) -> %s\n", logs.size(), p.panels.size(), a.out.c_str());
  return 0;
}

}  // namespace dlcm
