#include "tools/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/common.h"

namespace dlcm {

namespace {

const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};


std::string num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

std::string tick_label(double v) {
  char b[32];
  double a = std::fabs(v);
  if (v == 0) return "0";
  if (a >= 1e5 || a < 1e-3) std::snprintf(b, sizeof b, "%.0e", v);
  else std::snprintf(b, sizeof b, "%g", v);
  return b;
}

// One axis: data range -> pixel range, linear or log10.
struct Axis {
  double lo = 0, hi = 1, p0 = 0, p1 = 1;
  bool log = false;
  double t(double v) const { return log ? std::log10(v) : v; }
  double map(double v) const {
    double a = t(lo), b = t(hi);
    return p0 + (t(v) - a) / (b - a) * (p1 - p0);
  }
};

// Width in pixels of a label at 11 px (about 6.2 px per character; UTF-8 continuation bytes
// do not count).
double label_width(const std::string& s) {
  double n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return 6.2 * n;
}

bool usable(double v, bool log) { return std::isfinite(v) && (!log || v > 0); }

// Data range of one coordinate over all series, padded so lines do not touch the frame.
void data_range(const PlotPanel& p, bool is_x, double& lo, double& hi) {
  const bool log = is_x ? p.log_x : p.log_y;
  lo = std::numeric_limits<double>::infinity();
  hi = -lo;
  for (auto& s : p.series)
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!usable(s.x[i], p.log_x) || !usable(s.y[i], p.log_y)) continue;
      double v = is_x ? s.x[i] : s.y[i];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  if (!is_x && !log && std::isfinite(lo))
    for (auto& s : p.series)
      if (s.bars) lo = std::min(lo, 0.0), hi = std::max(hi, 0.0);  // bars stand on 0
  if (is_x)
    for (double v : p.x_ticks)
      if (usable(v, log)) lo = std::min(lo, v), hi = std::max(hi, v);
  if (!std::isfinite(lo)) lo = log ? 1 : 0, hi = log ? 10 : 1;
  if (log) {
    double a = std::log10(lo), b = std::log10(hi), pad = std::max((b - a) * 0.05, 0.02);
    lo = std::pow(10, a - pad);
    hi = std::pow(10, b + pad);
  } else {
    double pad = std::max((hi - lo) * 0.05, hi == lo ? std::max(std::fabs(hi) * 0.1, 1e-3) : 0.0);
    lo -= pad;
    hi += pad;
  }
}

}  // namespace

std::string xml_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}

std::vector<double> axis_ticks(double lo, double hi, bool log) {
  std::vector<double> t;
  if (!(hi > lo)) return t;
  if (log) {
    const int k0 = int(std::floor(std::log10(lo))), k1 = int(std::ceil(std::log10(hi)));
    for (double m : {1.0, 2.0, 5.0})
      for (int k = k0; k <= k1; ++k) {
        double v = m * std::pow(10.0, k);
        if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) t.push_back(v);
      }
    std::sort(t.begin(), t.end());
    if (t.size() > 9) {
      std::vector<double> p;
      for (double v : t)
        if (std::fabs(std::log10(v) - std::round(std::log10(v))) < 1e-9) p.push_back(v);
      t = p;
    }
    if (t.size() < 3) {  // a narrow range: every integer multiple of the decade, else linear
      std::vector<double> f;
      for (int k = k0; k <= k1; ++k)
        for (int m = 1; m <= 9; ++m) {
          double v = m * std::pow(10.0, k);
          if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) f.push_back(v);
        }
      return f.size() >= 3 && f.size() <= 9 ? f : axis_ticks(lo, hi, false);
    }
    return t;
  }
  double raw = (hi - lo) / 5, mag = std::pow(10, std::floor(std::log10(raw))), step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step)
    t.push_back(std::fabs(v) < step * 1e-9 ? 0 : v);
  return t;
}

std::string render_svg(const std::vector<PlotPanel>& panels, int cols, const std::string& title,
                       const std::vector<PlotLegendItem>& legend) {
  DLCM_CHECK(!panels.empty(), "internal: render_svg needs at least one panel");
  cols = std::max(1, std::min<int>(cols, panels.size()));
  const int rows = int((panels.size() + cols - 1) / cols);
  const double W = 420, H = 320, title_h = title.empty() ? 10 : 40;
  const double ml = 70, mr = 15, mt = 30, mb = 50;  // panel margins
  std::ostringstream o;
  // wide enough for the title (about 7.5 px per character at 15 px)
  const double total_w = std::max(W * cols, 7.5 * double(title.size()) + 40);
  // Figure legend: entries left to right, wrapped at the figure's width.
  std::vector<std::pair<double, double>> at;  // each entry's x, y
  double lx = 20, ly = title_h + 14;
  for (const PlotLegendItem& e : legend) {
    const double w = 28 + label_width(e.label) + 18;
    if (lx > 20 && lx + w > total_w - 10) lx = 20, ly += 18;
    at.push_back({lx, ly});
    lx += w;
  }
  const double top = legend.empty() ? title_h : ly + 12;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << num(total_w) << "\" height=\""
    << num(top + H * rows) << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  if (!title.empty())
    o << "<text x=\"" << num(total_w / 2) << "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">"
      << xml_escape(title) << "</text>\n";
  for (size_t i = 0; i < legend.size(); ++i) {
    const PlotLegendItem& e = legend[i];
    const auto [x, y] = at[i];
    o << "<g class=\"legend\"><line x1=\"" << num(x) << "\" y1=\"" << num(y - 4) << "\" x2=\"" << num(x + 22)
      << "\" y2=\"" << num(y - 4) << "\" stroke=\"" << kPalette[std::max(0, e.color) % 10]
      << "\" stroke-width=\"2.5\"" << (e.dashed ? " stroke-dasharray=\"4,2\"" : "") << "/><text x=\""
      << num(x + 28) << "\" y=\"" << num(y) << "\">" << xml_escape(e.label) << "</text></g>\n";
  }
  for (size_t pi = 0; pi < panels.size(); ++pi) {
    const PlotPanel& p = panels[pi];
    const double ox = W * (pi % cols), oy = top + H * (pi / cols);
    Axis ax, ay;
    ax.log = p.log_x;
    ay.log = p.log_y;
    data_range(p, true, ax.lo, ax.hi);
    data_range(p, false, ay.lo, ay.hi);
    ax.p0 = ox + ml;
    ax.p1 = ox + W - mr;
    ay.p0 = oy + H - mb;  // y grows upwards
    ay.p1 = oy + mt;
    o << "<g>\n<text x=\"" << num((ax.p0 + ax.p1) / 2) << "\" y=\"" << num(oy + 18)
      << "\" text-anchor=\"middle\" font-size=\"13\">" << xml_escape(p.title) << "</text>\n";
    o << "<rect x=\"" << num(ax.p0) << "\" y=\"" << num(ay.p1) << "\" width=\"" << num(ax.p1 - ax.p0)
      << "\" height=\"" << num(ay.p0 - ay.p1) << "\" fill=\"none\" stroke=\"#333\"/>\n";
    std::vector<double> xt = p.x_ticks.empty() ? axis_ticks(ax.lo, ax.hi, ax.log) : p.x_ticks;
    for (double v : xt) {
      if (!usable(v, ax.log) || v < ax.lo || v > ax.hi) continue;
      double x = ax.map(v);
      o << "<line x1=\"" << num(x) << "\" y1=\"" << num(ay.p0) << "\" x2=\"" << num(x) << "\" y2=\""
        << num(ay.p1) << "\" stroke=\"#ddd\"/>\n<text x=\"" << num(x) << "\" y=\"" << num(ay.p0 + 14)
        << "\" text-anchor=\"middle\">" << tick_label(v) << "</text>\n";
    }
    for (double v : axis_ticks(ay.lo, ay.hi, ay.log)) {
      double y = ay.map(v);
      o << "<line x1=\"" << num(ax.p0) << "\" y1=\"" << num(y) << "\" x2=\"" << num(ax.p1) << "\" y2=\""
        << num(y) << "\" stroke=\"#ddd\"/>\n<text x=\"" << num(ax.p0 - 4) << "\" y=\"" << num(y + 4)
        << "\" text-anchor=\"end\">" << tick_label(v) << "</text>\n";
    }
    o << "<text x=\"" << num((ax.p0 + ax.p1) / 2) << "\" y=\"" << num(oy + H - 14)
      << "\" text-anchor=\"middle\">" << xml_escape(p.xlabel) << (p.log_x ? " (log)" : "") << "</text>\n";
    o << "<text transform=\"translate(" << num(ox + 16) << "," << num((ay.p0 + ay.p1) / 2)
      << ") rotate(-90)\" text-anchor=\"middle\">" << xml_escape(p.ylabel) << (p.log_y ? " (log)" : "")
      << "</text>\n";
    int legend_rows = 0, labels = 0;
    double leg_w = 120;  // fits the longest label
    for (auto& s : p.series)
      if (!s.label.empty()) ++labels, leg_w = std::max(leg_w, 28 + label_width(s.label));
    leg_w = std::min(leg_w, ax.p1 - ax.p0 - 8);
    std::ostringstream leg;  // drawn last, over a translucent box, so it stays readable
    for (size_t si = 0; si < p.series.size(); ++si) {
      const PlotSeries& s = p.series[si];
      const char* col = kPalette[(s.color >= 0 ? s.color : int(si)) % 10];
      std::string pts;
      std::vector<std::pair<double, double>> xy;
      for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
        if (usable(s.x[i], ax.log) && usable(s.y[i], ay.log))
          xy.push_back({ax.map(s.x[i]), ay.map(s.y[i])});
      if (s.bars && !xy.empty()) {  // 80% of the closest spacing of the points
        double w = 20;
        for (size_t i = 1; i < xy.size(); ++i)
          if (xy[i].first != xy[i - 1].first) w = std::min(w, 0.8 * std::fabs(xy[i].first - xy[i - 1].first));
        const double y0 = ay.map(ay.log ? ay.lo : std::clamp(0.0, ay.lo, ay.hi));
        for (auto& [x, y] : xy)
          o << "<rect x=\"" << num(x - w / 2) << "\" y=\"" << num(std::min(y, y0)) << "\" width=\""
            << num(w) << "\" height=\"" << num(std::fabs(y0 - y)) << "\" fill=\"" << col
            << "\" fill-opacity=\"0.75\"/>\n";
      }
      if (s.line && xy.size() > 1) {
        for (auto& [x, y] : xy) pts += num(x) + "," + num(y) + " ";
        o << "<polyline fill=\"none\" stroke=\"" << col << "\" stroke-width=\"1.6\""
          << (s.dashed ? " stroke-dasharray=\"5,3\"" : "") << " points=\"" << pts << "\"/>\n";
      }
      if (s.markers || xy.size() == 1)
        for (auto& [x, y] : xy)
          o << "<circle cx=\"" << num(x) << "\" cy=\"" << num(y) << "\" r=\"2.6\" fill=\"" << col
            << "\"/>\n";
      if (!s.label.empty()) {
        double lx = ax.p1 - leg_w, ly = ay.p1 + 12 + 13 * legend_rows++;
        leg << "<line x1=\"" << num(lx) << "\" y1=\"" << num(ly - 4) << "\" x2=\"" << num(lx + 16)
          << "\" y2=\"" << num(ly - 4) << "\" stroke=\"" << col << "\" stroke-width=\"2\""
          << (s.dashed ? " stroke-dasharray=\"4,2\"" : "") << "/>\n<text x=\"" << num(lx + 20)
          << "\" y=\"" << num(ly) << "\">" << xml_escape(s.label) << "</text>\n";
      }
    }
    if (labels > 0)
      o << "<rect x=\"" << num(ax.p1 - leg_w - 4) << "\" y=\"" << num(ay.p1 + 2) << "\" width=\"" << num(leg_w)
        << "\" height=\""
        << num(13 * labels + 4) << "\" fill=\"white\" fill-opacity=\"0.85\" stroke=\"#ccc\"/>\n"
        << leg.str();
    o << "</g>\n";
  }
  o << "</svg>\n";
  return o.str();
}

void write_svg(const std::string& path, const std::vector<PlotPanel>& panels, int cols,
               const std::string& title, const std::vector<PlotLegendItem>& legend) {
  std::ofstream f(path);
  DLCM_CHECK(f, path, ": cannot write the plot (check the output folder)");
  f << render_svg(panels, cols, title, legend);
  DLCM_CHECK(f.good(), path, ": write failed");
}

}  // namespace dlcm
