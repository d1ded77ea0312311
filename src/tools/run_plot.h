// Training curves of one or more runs (their train_log.jsonl, train/train_log.h) as an SVG
// figure or a self-contained HTML page: one panel per metric, every run in its own colour in
// every panel, a legend of the run names. `dlcm plot` is the shell over this.
#pragma once
#include <string>
#include <vector>

#include "tools/plot.h"
#include "train/train_log.h"

namespace dlcm {

struct RunPlotOptions {
  std::string x = "tokens";          // x axis: "tokens" (tokens seen) or "step"
  std::vector<std::string> metrics;  // empty: run_plot_default_metrics(), panels without data dropped
  std::string title;
};

// loss, val_bpb, compression, aux, lr, tokens_per_s.
const std::vector<std::string>& run_plot_default_metrics();

struct RunPlot {
  std::string title;
  std::vector<PlotPanel> panels;
  std::vector<PlotLegendItem> legend;  // one entry per run
};

// Legend names of runs: the folder names (the folder holding the log when a file is given),
// or the paths as given when two folder names are the same.
std::vector<std::string> run_labels(const std::vector<std::string>& runs);

// The panels. Named metrics: "loss" (training loss, line; validation loss of eval records,
// dots), "val_bpb", "compression" (dlcm: tokens per concept of the thresholded boundaries on
// the training batch, line; on the validation split, dots), "aux", "lr", "tokens_per_s"; any
// other numeric field of the log plots as itself. A metric asked for in options.metrics that
// no run logs is an error naming it and the fields the logs have; a record without "tokens"
// (x = tokens) is an error naming its file and line.
RunPlot build_run_plot(const std::vector<TrainLog>& logs, const std::vector<std::string>& labels,
                       const RunPlotOptions& o);

std::string run_plot_svg(const RunPlot& p);
// The SVG inside an HTML page with a table of the runs (log, steps, tokens, last values).
std::string run_plot_html(const RunPlot& p, const std::vector<TrainLog>& logs,
                          const std::vector<std::string>& labels);

}  // namespace dlcm
