// `dlcm scaling fit | predict | allocate` (SPEC 8, docs/mup_scaling.md).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "scaling/scaling_law.h"
#include "tools/commands.h"
#include "tools/plot.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

static std::string g4(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.4g", v);
  return b;
}

int cmd_scaling_fit(const ScalingFitArgs& a) {
  DLCM_CHECK(scaling_fit_available(), kScalingFitMissing);  // before reading any run
  ScalingLoadOptions lo;
  lo.metric = a.metric;
  lo.min_frac = a.min_frac;
  lo.realized_R = a.realized_R;
  auto pts = load_scaling_points(a.runs, lo);
  ScalingFitOptions fo;
  fo.huber = a.huber;
  for (const std::string& f : a.fix) {
    auto eq = f.find('=');
    DLCM_CHECK(eq != std::string::npos, "--fix '", f, "': expected name=value, e.g. --fix t_tok=0");
    char* end = nullptr;
    double v = std::strtod(f.c_str() + eq + 1, &end);
    DLCM_CHECK(end && *end == 0 && eq + 1 < f.size(), "--fix '", f, "': the value is not a number");
    fo.fixed.push_back({f.substr(0, eq), v});
  }
  std::fprintf(stderr, "[scaling] fitting %zu points from %zu runs (%s)\n", pts.size(),
               a.runs.size(), a.metric.c_str());
  ScalingFit fit = fit_scaling_law(pts, fo);

  // Per-run summary and residuals.
  json res = json::array();
  std::map<std::string, std::pair<double, int>> run_sse;
  std::vector<std::string> order;
  double nmin = INFINITY, nmax = 0, dmin = INFINITY, dmax = 0;
  for (size_t i = 0; i < pts.size(); ++i) {
    const ScalingPoint& p = pts[i];
    res.push_back({{"run", p.run}, {"step", p.step}, {"N", p.N}, {"D", p.D}, {"R", p.R},
                   {"P", p.P}, {"observed", p.loss}, {"predicted", fit.predicted[i]},
                   {"residual", p.loss - fit.predicted[i]}});
    if (!run_sse.count(p.run)) order.push_back(p.run);
    run_sse[p.run].first += (p.loss - fit.predicted[i]) * (p.loss - fit.predicted[i]);
    run_sse[p.run].second += 1;
    nmin = std::min(nmin, p.N), nmax = std::max(nmax, p.N);
    dmin = std::min(dmin, p.D), dmax = std::max(dmax, p.D);
  }
  json fixed = json::object();
  for (auto& [k, v] : fo.fixed) fixed[k] = v;
  json out = {{"law", "L = E0 + A_tok/(N(1-P)+t_tok)^d1 + A_con R^g/(N P+t_con)^d2 + A_dat/(D+t_dat)^a"},
              {"constants", fit.law.to_json()},
              {"r2", fit.r2},
              {"rmse", fit.rmse},
              {"robust_cost", fit.cost},
              {"huber_log_delta", a.huber},
              {"metric", a.metric},
              {"min_frac", a.min_frac},
              {"realized_R", a.realized_R},
              {"fixed", fixed},
              {"starts", fit.starts},
              {"converged_starts", fit.converged_starts},
              {"n_points", pts.size()},
              {"runs", a.runs},
              {"range", {{"N", {nmin, nmax}}, {"D", {dmin, dmax}}}},
              {"residuals", res}};
  fs::create_directories(a.out);
  const fs::path dir(a.out);
  std::ofstream(dir / "scaling_fit.json") << out.dump(1) << "\n";

  std::ofstream md(dir / "scaling_fit.md");
  DLCM_CHECK(md, a.out, ": cannot write scaling_fit.md (check --out)");
  md << "# Scaling-law fit\n\n`L = E0 + A_tok/(N(1-P)+t_tok)^d1 + A_con R^g/(N P+t_con)^d2 + "
        "A_dat/(D+t_dat)^a`, N and D in millions.\n\n"
     << pts.size() << " points (" << a.metric << ") from " << a.runs.size()
     << " runs; Huber threshold " << a.huber << " on log residuals; " << fit.starts
     << " starts.\n\n| constant | value |\n|---|---|\n";
  for (int i = 0; i < ScalingLaw::kCount; ++i)
    md << "| " << ScalingLaw::kNames[i] << " | " << g4(fit.law.v[i])
       << (fixed.contains(ScalingLaw::kNames[i]) ? " (fixed)" : "") << " |\n";
  md << "\nR^2 = " << g4(fit.r2) << ", RMSE = " << g4(fit.rmse) << "\n\n"
     << "| run | N | P | R | points | RMSE |\n|---|---|---|---|---|---|\n";
  for (auto& r : order) {
    const ScalingPoint* p = nullptr;
    for (auto& q : pts)
      if (q.run == r) p = &q;
    md << "| " << r << " | " << g4(p->N) << " | " << g4(p->P) << " | " << g4(p->R) << " | "
       << run_sse[r].second << " | " << g4(std::sqrt(run_sse[r].first / run_sse[r].second))
       << " |\n";
  }
  md << "\nResiduals (observed - predicted) per point are in scaling_fit.json.\n";

  // Plot: one panel per R, observed points and fitted curves per run.
  std::vector<double> Rs;
  for (auto& p : pts)
    if (std::find(Rs.begin(), Rs.end(), p.R) == Rs.end()) Rs.push_back(p.R);
  std::sort(Rs.begin(), Rs.end());
  if (a.realized_R) Rs = {0};  // realized R varies per point: one panel
  std::vector<PlotPanel> panels;
  for (double R : Rs) {
    PlotPanel pn;
    pn.title = a.realized_R ? "all runs (realized R)" : "R = " + g4(R);
    pn.xlabel = "training tokens D";
    pn.ylabel = a.metric;
    pn.log_x = true;
    int color = 0;
    for (auto& r : order) {
      PlotSeries obs, fitted;
      for (size_t i = 0; i < pts.size(); ++i)
        if (pts[i].run == r && (a.realized_R || pts[i].R == R)) {
          obs.x.push_back(pts[i].D);
          obs.y.push_back(pts[i].loss);
          fitted.x.push_back(pts[i].D);
          fitted.y.push_back(fit.predicted[i]);
        }
      if (obs.x.empty()) continue;
      const ScalingPoint* p = nullptr;
      for (auto& q : pts)
        if (q.run == r) p = &q;
      obs.line = false;
      obs.markers = true;
      obs.color = fitted.color = color++;
      fitted.dashed = true;
      fitted.label = "N " + g4(p->N / 1e6) + "M, P " + g4(p->P);
      pn.series.push_back(obs);
      pn.series.push_back(fitted);
    }
    panels.push_back(pn);
  }
  write_svg((dir / "scaling_fit.svg").string(), panels, std::min<int>(3, panels.size()),
            "scaling-law fit: observed (dots) and fitted (dashed), R^2 = " + g4(fit.r2));

  std::printf("constants (N, D in millions):\n");
  for (int i = 0; i < ScalingLaw::kCount; ++i)
    std::printf("  %-6s %12.5g%s\n", ScalingLaw::kNames[i], fit.law.v[i],
                fixed.contains(ScalingLaw::kNames[i]) ? " (fixed)" : "");
  std::printf("R^2 %.5f, RMSE %.5f over %zu points, %d/%d starts converged\n", fit.r2, fit.rmse,
              pts.size(), fit.converged_starts, fit.starts);
  std::fprintf(stderr, "[scaling] wrote %s/scaling_fit.{json,md,svg}\n", a.out.c_str());
  return 0;
}

static json read_fit(const std::string& path) {
  std::ifstream f(path);
  DLCM_CHECK(f, path, ": cannot open the fit (give scaling_fit.json from 'dlcm scaling fit')");
  try {
    return json::parse(f);
  } catch (const json::parse_error& e) {
    fail(path, ": invalid JSON: ", e.what());
  }
}

// A note when (N, D) lies outside the N and D ranges of the fitted points.
static void note_if_extrapolated(const json& fit, double N, double D) {
  if (!fit.contains("range")) return;
  const json& r = fit["range"];
  double n0 = r["N"][0], n1 = r["N"][1], d0 = r["D"][0], d1 = r["D"][1];
  if (N < n0 || N > n1 || D < d0 || D > d1)
    std::printf("note: outside the fitted range (N %.3g..%.3g, D %.3g..%.3g): extrapolation\n", n0,
                n1, d0, d1);
}

int cmd_scaling_predict(const ScalingPredictArgs& a) {
  json j = read_fit(a.fit);
  ScalingLaw law = ScalingLaw::from_json(j, a.fit);
  DLCM_CHECK(a.N > 0 && a.D > 0 && std::isfinite(a.N) && std::isfinite(a.D),
             "--N and --D must be positive and finite (raw counts, e.g. --N 8e6 --D 2e8), got ", a.N,
             " and ", a.D);
  DLCM_CHECK(a.R >= 1 && std::isfinite(a.R), "--R must be >= 1 and finite, got ", a.R);
  DLCM_CHECK(a.P >= 0 && a.P < 1, "--P must be in [0, 1), got ", a.P);
  auto t = law.terms(a.N, a.D, a.R, a.P);
  double L = law.loss(a.N, a.D, a.R, a.P);
  std::printf("predicted loss %.5f at N %.4g, D %.4g, R %g, P %g\n", L, a.N, a.D, a.R, a.P);
  std::printf("  E0 %.5f + token %.5f + concept %.5f + data %.5f\n", law.v[ScalingLaw::E0], t[0],
              t[1], t[2]);
  std::printf("  training FLOPs (6 N ((1-P) + P/R) D): %.4g\n",
              training_flops_estimate(a.N, a.D, a.R, a.P));
  note_if_extrapolated(j, a.N, a.D);
  return 0;
}

int cmd_scaling_allocate(const ScalingAllocateArgs& a) {
  json j = read_fit(a.fit);
  ScalingLaw law = ScalingLaw::from_json(j, a.fit);
  DLCM_CHECK(a.N == 0 || (a.N > 0 && std::isfinite(a.N)),
             "--N must be a positive number of non-embedding parameters (leave it out to search N), "
             "got ", a.N);
  const double n_min = a.N > 0 ? a.N : a.n_min, n_max = a.N > 0 ? a.N : a.n_max;
  auto all = allocate_budget(law, a.flops, a.R, a.p_min, a.p_max, a.p_step, n_min, n_max);
  auto best = *std::min_element(all.begin(), all.end(), [](const Allocation& x, const Allocation& y) {
    return x.loss < y.loss;
  });
  std::printf("budget %.4g training FLOPs at R %g (C = 6 N ((1-P) + P/R) D)", a.flops, a.R);
  if (a.N > 0) std::printf(", N fixed at %.4g", a.N);
  else std::printf(", N in [%.4g, %.4g]", n_min, n_max);
  std::printf("\n");
  std::printf("%6s %12s %12s %10s\n", "P", "N", "D", "loss");
  for (auto& x : all) {
    // print about 10 rows plus the optimum
    const int every = std::max<int>(1, int(all.size() / 10));
    const bool show = (&x - all.data()) % every == 0 || x.P == best.P;
    if (show)
      std::printf("%6.2f %12.4g %12.4g %10.5f%s\n", x.P, x.N, x.D, x.loss, x.P == best.P ? "  <- best" : "");
  }
  std::printf("best: P = %.2f, N = %.4g non-embedding parameters (backbone %.4g), D = %.4g tokens, "
              "predicted loss %.5f\n", best.P, best.N, best.N * best.P, best.D, best.loss);
  note_if_extrapolated(j, best.N, best.D);
  return 0;
}

}  // namespace dlcm
