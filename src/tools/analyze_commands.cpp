// `dlcm analyze`: the concept analysis of eval/concept_analysis.h written as OUT/analysis.json
// and a self-contained OUT/analysis.html (tables and inline SVG figures).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/prepare.h"
#include "eval/concept_analysis.h"
#include "models/model.h"
#include "data/train_data.h"
#include "eval/concept_usage.h"
#include "tools/commands.h"
#include "tools/plot.h"
#include "models/checkpoint.h"

namespace dlcm {
namespace fs = std::filesystem;

namespace {

std::string esc(const std::string& s) { return xml_escape(s); }

// A token's text with its whitespace made visible.
std::string visible(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == ' ') o += "\u2423";
    else if (c == '\n') o += "\u21b5";
    else if (c == '\t') o += "\u21e5";
    else o += c;
  }
  std::string r = o;
  repair_utf8(r);  // a byte-fallback piece alone is not valid UTF-8
  return r.empty() ? "(special)" : r;
}

std::string fmt(double v, int digits = 4) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", digits, v);
  return b;
}

PlotSeries bars(const std::string& label, std::vector<double> x, std::vector<double> y, int color) {
  PlotSeries s;
  s.label = label;
  s.x = std::move(x);
  s.y = std::move(y);
  s.line = false;
  s.bars = true;
  s.color = color;
  return s;
}

PlotSeries line(const std::string& label, std::vector<double> x, std::vector<double> y, int color,
                bool dashed = false) {
  PlotSeries s;
  s.label = label;
  s.x = std::move(x);
  s.y = std::move(y);
  s.markers = true;
  s.dashed = dashed;
  s.color = color;
  return s;
}

}  // namespace

std::string analysis_html(const AnalysisReport& r) {
  std::ostringstream h;
  h << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dlcm analyze</title>\n<style>"
       "body{font-family:sans-serif;margin:24px;max-width:1100px}table{border-collapse:collapse;"
       "margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
       "th{background:#f3f3f3}td.l{text-align:left;font-family:monospace}.note{color:#555;"
       "font-size:90%}</style></head><body>\n";
  h << "<h1>Concept analysis</h1>\n<table>"
    << "<tr><th>checkpoint</th><td class=\"l\">" << esc(r.checkpoint) << "</td></tr>"
    << "<tr><th>data</th><td class=\"l\">" << esc(r.data) << "</td></tr>"
    << "<tr><th>validation windows</th><td>" << r.windows << " x " << r.L << " tokens</td></tr>"
    << "<tr><th>tokens</th><td>" << r.tokens << " (" << r.decisions << " router decisions)</td></tr>"
    << "<tr><th>tau</th><td>" << fmt(r.tau) << "</td></tr>"
    << "<tr><th>tokens per concept</th><td>" << fmt(r.lengths.mean, 3) << "</td></tr>"
    << "<tr><th>validation loss</th><td>" << fmt(r.val_loss) << "</td></tr>";
  if (r.positions.has_baseline())
    h << "<tr><th>baseline</th><td class=\"l\">" << esc(r.baseline) << "</td></tr>"
      << "<tr><th>baseline loss (same tokens)</th><td>" << fmt(r.base_val_loss) << "</td></tr>";
  h << "</table>\n<p class=\"note\">Boundaries b = [p &ge; tau] | forced (window start, BOS). "
       "Router decisions are the positions that are not forced; alignment, the top openers and "
       "the p histogram use only those.</p>\n";

  if (r.usage) {
    const ConceptUsage& u = *r.usage;
    h << "<h2 id=\"concept-usage\">Concept usage</h2>\n<table>"
      << "<tr><th>validation loss</th><td>" << fmt(u.val_loss) << "</td></tr>"
      << "<tr><th>&Delta; loss, every concept replaced by z_null</th><td>" << fmt(u.delta_loss_null) << "</td></tr>"
      << "<tr><th>&Delta; loss, concepts shuffled across rows</th><td>" << fmt(u.delta_loss_shuffled) << "</td></tr>"
      << "<tr><th>|Wo att| / |H|</th><td>" << fmt(u.xattn_ratio) << "</td></tr>"
      << "<tr><th>targets</th><td>" << u.tokens << "</td></tr></table>\n";
  }

  // Concept lengths and p.
  {
    std::vector<double> x, y, px, py;
    for (size_t k = 1; k < r.lengths.count.size(); ++k) x.push_back(double(k)), y.push_back(double(r.lengths.count[k]));
    for (size_t i = 0; i < r.p_hist.size(); ++i)
      px.push_back((i + 0.5) / double(r.p_hist.size())), py.push_back(double(r.p_hist[i]));
    PlotPanel a{"concept lengths (mean " + fmt(r.lengths.mean, 2) + ")", "tokens in the concept (last bin: " +
                    std::to_string(r.lengths.count.size() - 1) + " or more)", "concepts", false, false, {},
                {bars("", x, y, 0)}};
    PlotPanel b{"router probability p (router decisions)", "p", "positions", false, false, {},
                {bars("", px, py, 2)}};
    h << "<h2 id=\"lengths\">Concept lengths and p</h2>\n" << render_svg({a, b}, 2, "");
  }

  // Compression against tau.
  {
    std::vector<double> t, R, rate;
    for (const TauPoint& p : r.taus) t.push_back(p.tau), R.push_back(p.tokens_per_concept), rate.push_back(p.boundary_rate);
    PlotPanel a{"realised compression", "tau", "tokens per concept", false, true, {},
                {line("", t, R, 0), line("this tau", {r.tau}, {r.lengths.mean}, 1)}};
    PlotPanel b{"share of router decisions that cut", "tau", "boundary rate", false, false, {},
                {line("", t, rate, 0)}};
    h << "<h2 id=\"tau\">Compression against tau</h2>\n" << render_svg({a, b}, 2, "");
  }

  // Alignment.
  {
    h << "<h2 id=\"alignment\">Boundary alignment</h2>\n<p class=\"note\">Concept starts against "
         "reference boundaries over the router decisions; random: the same number of boundaries "
         "placed uniformly at random (exact expectations).</p>\n<table><tr><th>reference</th>"
         "<th>positions</th><th>boundaries</th><th>reference</th><th>precision</th><th>recall</th>"
         "<th>F1</th><th>random P</th><th>random R</th><th>random F1</th></tr>\n";
    std::vector<double> x, xm, xr, f1, rf1;
    for (size_t i = 0; i < r.alignments.size(); ++i) {
      const Alignment& a = r.alignments[i];
      h << "<tr><td class=\"l\">" << esc(a.reference) << "</td><td>" << a.positions << "</td><td>"
        << a.predicted << "</td><td>" << a.actual << "</td><td>" << fmt(a.precision, 3) << "</td><td>"
        << fmt(a.recall, 3) << "</td><td>" << fmt(a.f1, 3) << "</td><td>" << fmt(a.random_precision, 3)
        << "</td><td>" << fmt(a.random_recall, 3) << "</td><td>" << fmt(a.random_f1, 3) << "</td></tr>\n";
      x.push_back(double(i));
      xm.push_back(i - 0.17), xr.push_back(i + 0.17);
      f1.push_back(a.f1), rf1.push_back(a.random_f1);
    }
    h << "</table>\n";
    PlotPanel p{"F1 of concept starts", "0 = space start, 1 = word start, 2 = after punctuation", "F1",
                false, false, x, {bars("model", xm, f1, 0), bars("random", xr, rf1, 7)}};
    h << render_svg({p}, 1, "");
  }

  // Loss by position.
  {
    const PositionLoss& pl = r.positions;
    std::vector<double> x, l, bl, d;
    for (size_t k = 0; k < pl.loss.size(); ++k) {
      x.push_back(double(k));
      l.push_back(pl.loss[k]);
      if (pl.has_baseline()) bl.push_back(pl.base_loss[k]), d.push_back(pl.loss[k] - pl.base_loss[k]);
    }
    std::vector<PlotPanel> panels;
    PlotPanel a{"loss by position in the concept", "position (last: " + std::to_string(pl.loss.size() - 1) +
                    " or later)", "mean CE (nats)", false, false, x, {line("dlcm", x, l, 0)}};
    if (pl.has_baseline()) a.series.push_back(line("baseline", x, bl, 1, true));
    panels.push_back(a);
    if (pl.has_baseline())
      panels.push_back({"dlcm minus baseline", "position", "delta CE (nats)", false, false, x,
                        {bars("", x, d, 2)}});
    h << "<h2 id=\"positions\">Loss by position inside a concept</h2>\n" << render_svg(panels, 2, "")
      << "<table><tr><th></th><th>tokens</th><th>dlcm loss</th>"
      << (pl.has_baseline() ? "<th>baseline loss</th><th>dlcm &minus; baseline</th>" : "") << "</tr>";
    auto row = [&](const char* name, i64 n, double v, double b) {
      h << "<tr><td class=\"l\">" << name << "</td><td>" << n << "</td><td>" << fmt(v) << "</td>";
      if (pl.has_baseline()) h << "<td>" << fmt(b) << "</td><td>" << fmt(v - b) << "</td>";
      h << "</tr>";
    };
    row("first concept of a window", pl.first_count, pl.first_loss, pl.first_base_loss);
    row("later concepts", pl.other_count, pl.other_loss, pl.other_base_loss);
    h << "</table>\n<p class=\"note\">Position k: the k-th token of its concept makes the "
         "prediction of the next token. Under the strict (shifted) design the tokens of a window's "
         "first concept see only z_null.</p>\n";
  }

  // Sources.
  h << "<h2 id=\"sources\">Compression per corpus source</h2>\n";
  if (!r.sources_missing.empty()) {
    h << "<p>Not available: " << esc(r.sources_missing) << "</p>\n";
  } else {
    h << "<p class=\"note\">Sources: " << esc(r.sources_origin) << ". Concepts include forced "
         "boundaries.</p>\n<table><tr><th>source</th><th>tokens</th><th>concepts</th>"
         "<th>tokens/concept</th><th>bytes/concept</th><th>loss</th></tr>\n";
    std::vector<double> x, y;
    for (size_t i = 0; i < r.sources.size(); ++i) {
      const SourceCompression& s = r.sources[i];
      h << "<tr><td class=\"l\">" << i << ": " << esc(s.name) << "</td><td>" << s.tokens << "</td><td>"
        << s.concepts << "</td><td>" << fmt(s.tokens_per_concept, 3) << "</td><td>"
        << fmt(s.bytes_per_concept, 2) << "</td><td>" << fmt(s.loss) << "</td></tr>\n";
      x.push_back(double(i));
      y.push_back(s.tokens_per_concept);
    }
    h << "</table>\n";
    if (!x.empty())
      h << render_svg({PlotPanel{"tokens per concept by source", "source (row of the table)",
                                 "tokens per concept", false, false, x, {bars("", x, y, 4)}}}, 1, "");
  }

  // Openers.
  h << "<h2 id=\"openers\">Tokens that open a concept</h2>\n<table><tr><th>id</th><th>token</th>"
       "<th>opens</th><th>occurrences</th><th>rate</th></tr>\n";
  for (const TokenOpen& t : r.openers)
    h << "<tr><td>" << t.id << "</td><td class=\"l\">" << esc(visible(t.text)) << "</td><td>" << t.opens
      << "</td><td>" << t.occurrences << "</td><td>" << fmt(t.rate, 3) << "</td></tr>\n";
  h << "</table>\n</body></html>\n";
  return h.str();
}

namespace {

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  DLCM_CHECK(f, path, ": cannot write (check --out)");
  f << text;
  DLCM_CHECK(f.good(), path, ": write failed");
}

}  // namespace

int cmd_analyze(const AnalyzeArgs& a) {
  std::string dir, base_dir;
  auto m = load_model_with_tokenizer(a.ckpt, &dir);
  DLCM_CHECK(m->config().is_dlcm(), dir, ": this is a ", m->config().arch,
             " checkpoint without concepts; analyze needs a dlcm checkpoint");
  std::unique_ptr<LanguageModel> base;
  if (!a.baseline.empty()) base = load_model_with_tokenizer(a.baseline, &base_dir);
  DataDir d = open_data_dir(a.data);
  AnalyzeOptions o;
  o.batch_size = a.batch_size;
  o.max_batches = a.batches;
  o.seq_len = a.seq_len > 0 ? a.seq_len : load_checkpoint_config(dir).train.seq_len;
  o.tau = float(a.tau);
  o.top_k = a.top;
  // The concept-usage diagnostics (eval/concept_usage.h) over the same validation windows;
  // they threshold at the checkpoint's router.tau (the model's inference rule).
  Config cfg = load_checkpoint_config(dir);
  cfg.train.seq_len = o.seq_len;
  TrainData val = open_train_data(a.data, cfg);
  o.usage = [&](LanguageModel& model, const AnalysisData&) {
    const ConceptUsageResult u = measure_concept_usage(model, val, o.batch_size, o.seq_len,
                                                       o.max_batches);
    ConceptUsage c;
    c.val_loss = u.ce;
    c.delta_loss_null = u.delta_null;
    c.delta_loss_shuffled = u.delta_shuffle;
    c.xattn_ratio = u.xattn_ratio;
    c.tokens = u.tokens;
    return c;
  };
  AnalysisReport r = analyze_checkpoint(*m, d, o, base.get());
  r.checkpoint = dir;
  r.baseline = base_dir;
  fs::create_directories(a.out);
  const std::string json_path = (fs::path(a.out) / "analysis.json").string();
  const std::string html_path = (fs::path(a.out) / "analysis.html").string();
  write_text(json_path, report_json(r).dump(1) + "\n");
  write_text(html_path, analysis_html(r));
  std::fprintf(stderr, "[analyze] %lld windows x %lld tokens, tau %.3f: %.3f tokens/concept, loss %.4f",
               (long long)r.windows, (long long)r.L, r.tau, r.lengths.mean, r.val_loss);
  if (base) std::fprintf(stderr, " (baseline %.4f)", r.base_val_loss);
  for (const Alignment& al : r.alignments)
    std::fprintf(stderr, "; %s F1 %.3f (random %.3f)", al.reference.c_str(), al.f1, al.random_f1);
  std::fprintf(stderr, "\n[analyze] wrote %s and %s\n", json_path.c_str(), html_path.c_str());
  return 0;
}

}  // namespace dlcm
