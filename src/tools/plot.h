// Small self-contained SVG line plots (linear or log axes, several panels in a grid), for the
// figures that the tools write into docs/: µP coordinate checks, learning-rate sweeps,
// scaling-law fits. No dependencies; the output opens in any browser.
#pragma once
#include <string>
#include <vector>

namespace dlcm {

struct PlotSeries {
  std::string label;          // legend entry (empty: no entry)
  std::vector<double> x, y;   // points; non-finite ones (and <= 0 on a log axis) are skipped
  bool line = true;           // polyline through the points in order
  bool markers = false;       // a dot at each point
  bool dashed = false;
  bool bars = false;          // a bar from 0 (a log axis: its bottom) up to each point
  int color = -1;             // palette index; -1 = the series' position in its panel
};

struct PlotPanel {
  std::string title, xlabel, ylabel;
  bool log_x = false, log_y = false;
  std::vector<double> x_ticks;  // explicit x tick positions (empty: automatic)
  std::vector<PlotSeries> series;
};

// One entry of a figure-wide legend (a run of an overlay drawn in the same colour in every panel).
struct PlotLegendItem {
  std::string label;
  int color = 0;  // palette index
  bool dashed = false;
};

// Text escaped for SVG/HTML element content and attribute values (< > & ").
std::string xml_escape(const std::string& s);

// The SVG document: panels laid out in `cols` columns under an optional title and an optional
// figure legend (rows of entries between the title and the panels).
std::string render_svg(const std::vector<PlotPanel>& panels, int cols, const std::string& title,
                       const std::vector<PlotLegendItem>& legend = {});
// render_svg into a file; throws Error naming the path when it cannot be written.
void write_svg(const std::string& path, const std::vector<PlotPanel>& panels, int cols,
               const std::string& title, const std::vector<PlotLegendItem>& legend = {});

// Axis ticks between lo and hi (lo < hi): "nice" 1-2-5 steps on a linear axis; 1-2-5 x 10^k
// (or only powers of ten when that gives too many) on a log axis.
std::vector<double> axis_ticks(double lo, double hi, bool log);

}  // namespace dlcm
