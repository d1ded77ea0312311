#include "tools/run_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

namespace dlcm {
namespace fs = std::filesystem;

const std::vector<std::string>& run_plot_default_metrics() {
  static const std::vector<std::string> m = {"loss", "val_bpb", "compression", "aux", "lr", "tokens_per_s"};
  return m;
}

namespace {

// A panel: the train-record field drawn as a line, and the eval-record field drawn as dots.
struct MetricSpec {
  std::string title, ylabel, train_key, eval_key;
  bool log_y = false;
};

MetricSpec metric_spec(const std::string& m) {
  if (m == "loss") return {"loss", "nats per token", "loss", "val_loss"};
  if (m == "val_bpb") return {"validation bits per byte", "bits per byte", "", "val_bpb"};
  // log: the first steps' boundaries are rare (hundreds of tokens per concept)
  if (m == "compression")
    return {"realised compression", "tokens per concept", "compression_thresholded", "val_compression", true};
  if (m == "aux") return {"auxiliary loss term (before its weight)", "aux", "aux", ""};
  if (m == "lr") return {"learning rate", "learning rate", "lr", ""};
  if (m == "tokens_per_s") return {"throughput", "tokens per second", "tokens_per_s", ""};
  return {m, m, m, m};  // any other field, from whichever records hold it
}

std::string fmt(double v, const char* f) {
  if (!std::isfinite(v)) return "-";
  char b[48];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

// The last value of `key` in the log's records of one kind (NaN when none).
double last_value(const TrainLog& log, const std::string& key, bool eval) {
  for (auto it = log.records.rbegin(); it != log.records.rend(); ++it)
    if (it->eval == eval && it->has(key)) return it->values.at(key);
  return NAN;
}

}  // namespace

std::vector<std::string> run_labels(const std::vector<std::string>& runs) {
  std::vector<std::string> names;
  for (const std::string& r : runs) {
    fs::path p = fs::path(r).lexically_normal();
    if (!p.has_filename()) p = p.parent_path();  // a trailing slash
    if (fs::is_regular_file(p) && p.has_parent_path()) p = p.parent_path();  // the log file itself
    std::string n = p.filename().string();
    names.push_back(n.empty() || n == "." ? fs::absolute(p).lexically_normal().filename().string() : n);
  }
  std::map<std::string, int> count;
  for (auto& n : names) count[n]++;
  for (size_t i = 0; i < names.size(); ++i)
    if (count[names[i]] > 1) names[i] = runs[i];
  return names;
}

RunPlot build_run_plot(const std::vector<TrainLog>& logs, const std::vector<std::string>& labels,
                       const RunPlotOptions& o) {
  DLCM_CHECK(!logs.empty(), "plot: give at least one run folder");
  DLCM_CHECK(labels.size() == logs.size(), "internal: one label per run");
  DLCM_CHECK(o.x == "tokens" || o.x == "step", "--x: expected tokens or step, got '", o.x, "'");
  // x values, scaled to a readable unit for tokens
  double x_max = 0;
  for (const TrainLog& l : logs)
    for (const LogRecord& r : l.records) {
      DLCM_CHECK(r.has(o.x), l.path, ":", r.line, ": no \"", o.x, "\" field",
                 o.x == "tokens" ? " (a log of an older build? plot against steps with --x step)" : "");
      x_max = std::max(x_max, r.values.at(o.x));
    }
  double unit = 1;
  std::string xlabel = "step";
  if (o.x == "tokens") {
    xlabel = "tokens seen";
    for (auto [u, name] : {std::pair{1e9, "billions"}, {1e6, "millions"}, {1e3, "thousands"}})
      if (x_max >= u) {
        unit = u;
        xlabel += std::string(" (") + name + ")";
        break;
      }
  }

  const bool explicit_metrics = !o.metrics.empty();
  const std::vector<std::string>& metrics = explicit_metrics ? o.metrics : run_plot_default_metrics();
  RunPlot plot;
  plot.title = o.title;
  for (size_t i = 0; i < logs.size(); ++i) plot.legend.push_back({labels[i], int(i), false});
  for (const std::string& m : metrics) {
    const MetricSpec spec = metric_spec(m);
    PlotPanel panel;
    panel.title = spec.title;
    panel.xlabel = xlabel;
    panel.ylabel = spec.ylabel;
    panel.log_y = spec.log_y;
    bool any = false, lines = false, dots_drawn = false;
    for (size_t i = 0; i < logs.size(); ++i) {
      PlotSeries line, dots;
      line.color = dots.color = int(i);
      dots.line = false;
      dots.markers = true;
      for (const LogRecord& r : logs[i].records) {
        const std::string& key = r.eval ? spec.eval_key : spec.train_key;
        if (key.empty() || !r.has(key)) continue;
        PlotSeries& s = r.eval ? dots : line;
        s.x.push_back(r.values.at(o.x) / unit);
        s.y.push_back(r.values.at(key));
      }
      // Eval records alone (val_bpb, or a field only they hold): a line through the dots.
      if (line.x.empty()) dots.line = true;
      lines = lines || !line.x.empty();
      dots_drawn = dots_drawn || (!line.x.empty() && !dots.x.empty());
      for (PlotSeries* s : {&line, &dots})
        if (!s->x.empty()) {
          any = true;
          panel.series.push_back(std::move(*s));
        }
    }
    if (lines && dots_drawn) panel.title += ": training (line), validation (dots)";
    if (any) {
      plot.panels.push_back(std::move(panel));
      continue;
    }
    if (!explicit_metrics) continue;  // a default panel without data (the baseline's compression)
    std::set<std::string> fields;
    for (const TrainLog& l : logs)
      for (const LogRecord& r : l.records)
        for (auto& [k, v] : r.values) fields.insert(k);
    std::string have;
    for (auto& k : fields) have.append(have.empty() ? "" : ", ").append(k);
    fail("--metrics: no run logs '", m, "' (the logs have: ", have, ")");
  }
  DLCM_CHECK(!plot.panels.empty(), "plot: none of the metrics has data in these logs");
  return plot;
}

std::string run_plot_svg(const RunPlot& p) {
  return render_svg(p.panels, std::min<int>(3, p.panels.size()), p.title, p.legend);
}

std::string run_plot_html(const RunPlot& p, const std::vector<TrainLog>& logs,
                          const std::vector<std::string>& labels) {
  std::ostringstream h;
  const std::string title = p.title.empty() ? "dlcm training curves" : p.title;
  h << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" << xml_escape(title)
    << "</title>\n<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(-n+2),"
       "th:nth-child(-n+2){text-align:left}</style></head><body>\n<h1>"
    << xml_escape(title) << "</h1>\n"
    << render_svg(p.panels, std::min<int>(3, p.panels.size()), "", p.legend)  // the page has the title
    << "<h2>Runs</h2>\n<table><tr><th>run</th><th>log</th><th>last step</th><th>tokens</th>"
       "<th>training loss</th><th>validation loss</th><th>validation bits per byte</th>"
       "<th>validation compression</th></tr>\n";
  for (size_t i = 0; i < logs.size(); ++i) {
    const TrainLog& l = logs[i];
    double step = NAN, tokens = NAN;
    for (const LogRecord& r : l.records) {
      if (r.has("step")) step = r.values.at("step");
      if (r.has("tokens")) tokens = r.values.at("tokens");
    }
    h << "<tr><td>" << xml_escape(labels[i]) << "</td><td>" << xml_escape(l.path) << "</td><td>"
      << fmt(step, "%.0f") << "</td><td>" << fmt(tokens, "%.0f") << "</td><td>"
      << fmt(last_value(l, "loss", false), "%.4f") << "</td><td>" << fmt(last_value(l, "val_loss", true), "%.4f")
      << "</td><td>" << fmt(last_value(l, "val_bpb", true), "%.4f") << "</td><td>"
      << fmt(last_value(l, "val_compression", true), "%.3f") << "</td></tr>\n";
  }
  h << "</table>\n<p>Lines: training records (every <code>log_every</code> steps); dots: "
       "evaluations on the validation split (every <code>eval_every</code> steps).</p>\n</body></html>\n";
  return h.str();
}

}  // namespace dlcm
