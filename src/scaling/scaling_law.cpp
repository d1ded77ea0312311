#include "scaling/scaling_law.h"

#ifdef DLCM_CERES
#include <ceres/ceres.h>
#endif

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "models/checkpoint.h"
#include "models/flops.h"

namespace dlcm {
namespace fs = std::filesystem;
using nlohmann::json;

const std::array<const char*, ScalingLaw::kCount> ScalingLaw::kNames = {
    "E0", "A_tok", "t_tok", "d1", "A_con", "g", "t_con", "d2", "A_dat", "t_dat", "a"};

namespace {

// The law in fit units (N, D in millions), templated for Ceres' automatic differentiation.
template <typename T>
T law_eval(const T* v, double N, double D, double R, double P, T* terms = nullptr) {
  using std::pow;
  const T tok = v[ScalingLaw::A_tok] / pow(N * (1 - P) + v[ScalingLaw::t_tok], v[ScalingLaw::d1]);
  const T con = v[ScalingLaw::A_con] * pow(T(R), v[ScalingLaw::g]) /
                pow(N * P + v[ScalingLaw::t_con], v[ScalingLaw::d2]);
  const T dat = v[ScalingLaw::A_dat] / pow(D + v[ScalingLaw::t_dat], v[ScalingLaw::a]);
  if (terms) terms[0] = tok, terms[1] = con, terms[2] = dat;
  return v[ScalingLaw::E0] + tok + con + dat;
}

// Residual of one point: log(predicted) - log(observed).
struct LogResidual {
  double N, D, R, P, log_obs;
  template <typename T>
  bool operator()(const T* v, T* r) const {
    const T pred = law_eval(v, N, D, R, P);
    if (!(pred > T(0))) return false;  // outside the law's domain: reject the step
    r[0] = log(pred) - T(log_obs);
    return true;
  }
};

}  // namespace

double ScalingLaw::loss(double N, double D, double R, double P) const {
  return law_eval(v.data(), N / kUnitN, D / kUnitD, R, P);
}

std::array<double, 3> ScalingLaw::terms(double N, double D, double R, double P) const {
  std::array<double, 3> t{};
  law_eval(v.data(), N / kUnitN, D / kUnitD, R, P, t.data());
  return t;
}

json ScalingLaw::to_json() const {
  json j;
  for (int i = 0; i < kCount; ++i) j[kNames[i]] = v[i];
  j["units"] = {{"N", kUnitN}, {"D", kUnitD},
                {"note", "N and D enter the law in millions (parameters, tokens)"}};
  return j;
}

ScalingLaw ScalingLaw::from_json(const json& j, const std::string& src) {
  ScalingLaw law;
  const json& c = j.contains("constants") ? j.at("constants") : j;
  for (int i = 0; i < kCount; ++i) {
    DLCM_CHECK(c.contains(kNames[i]) && c.at(kNames[i]).is_number(), src, ": missing number '",
               kNames[i], "' in the fit's constants (give a file written by 'dlcm scaling fit')");
    law.v[i] = c.at(kNames[i]).get<double>();
  }
  return law;
}

const char* const kScalingFitMissing =
    "scaling fit: built without Ceres (install libceres-dev and reconfigure)";

bool scaling_fit_available() {
#ifdef DLCM_CERES
  return true;
#else
  return false;
#endif
}

ScalingFit fit_scaling_law(const std::vector<ScalingPoint>& pts, const ScalingFitOptions& o) {
#ifndef DLCM_CERES
  // The fit needs Ceres (optional: CMake option DLCM_WITH_CERES); the rest of the law does not.
  throw Error(kScalingFitMissing);
#else
  double min_loss = INFINITY, mean = 0;
  std::vector<double> ntok, ncon, dd;
  for (auto& p : pts) {
    DLCM_CHECK(std::isfinite(p.loss) && p.loss > 0 && p.N > 0 && p.D > 0 && p.R >= 1 &&
                   p.P >= 0 && p.P < 1,
               "scaling fit: bad point of run '", p.run, "' at step ", p.step, " (loss ", p.loss,
               ", N ", p.N, ", D ", p.D, ", R ", p.R, ", P ", p.P,
               "): need loss > 0, N > 0, D > 0, R >= 1, 0 <= P < 1");
    min_loss = std::min(min_loss, p.loss);
    mean += p.loss / double(pts.size());
    ntok.push_back(p.N * (1 - p.P) / kUnitN);
    if (p.P > 0) ncon.push_back(p.N * p.P / kUnitN);
    dd.push_back(p.D / kUnitD);
  }
  auto median = [](std::vector<double> x) {
    if (x.empty()) return 1.0;
    std::nth_element(x.begin(), x.begin() + x.size() / 2, x.end());
    return x[x.size() / 2];
  };
  const double mt = median(ntok), mc = median(ncon), md = median(dd);
  const double max_t = *std::max_element(ntok.begin(), ntok.end()),
               max_d = *std::max_element(dd.begin(), dd.end());
  std::vector<int> fixed_idx;
  std::vector<double> fixed_val;
  for (auto& [name, val] : o.fixed) {
    auto it = std::find_if(ScalingLaw::kNames.begin(), ScalingLaw::kNames.end(),
                           [&](const char* n) { return name == n; });
    DLCM_CHECK(it != ScalingLaw::kNames.end(), "--fix: unknown constant '", name,
               "' (expected one of E0 A_tok t_tok d1 A_con g t_con d2 A_dat t_dat a)");
    fixed_idx.push_back(int(it - ScalingLaw::kNames.begin()));
    fixed_val.push_back(val);
  }

  const size_t free_params = ScalingLaw::kCount - fixed_idx.size();
  DLCM_CHECK(pts.size() > free_params, "scaling fit: ", pts.size(), " points for ", free_params,
             " free constants; give more runs or evaluate more often (train.eval_every)");
  ScalingFit best;
  best.cost = INFINITY;
  for (double e0f : {0.5, 0.85})
    for (double x1 : {0.15, 0.35, 0.7})
      for (double x2 : {0.15, 0.35, 0.7})
        for (double xa : {0.15, 0.35, 0.7})
          for (double g0 : {0.0, 0.5}) {
            std::array<double, ScalingLaw::kCount> v{};
            v[ScalingLaw::E0] = e0f * min_loss;
            const double share = (mean - v[ScalingLaw::E0]) / 3;  // each term's initial share
            v[ScalingLaw::t_tok] = 0.01 * mt;
            v[ScalingLaw::t_con] = 0.01 * mc;
            v[ScalingLaw::t_dat] = 0.01 * md;
            v[ScalingLaw::d1] = x1;
            v[ScalingLaw::d2] = x2;
            v[ScalingLaw::a] = xa;
            v[ScalingLaw::g] = g0;
            v[ScalingLaw::A_tok] = share * std::pow(mt, x1);
            v[ScalingLaw::A_con] = share * std::pow(mc, x2);
            v[ScalingLaw::A_dat] = share * std::pow(md, xa);
            for (size_t k = 0; k < fixed_idx.size(); ++k) v[fixed_idx[k]] = fixed_val[k];

            ceres::Problem::Options po;
            po.loss_function_ownership = ceres::DO_NOT_TAKE_OWNERSHIP;
            ceres::HuberLoss huber(o.huber);
            ceres::Problem problem(po);
            for (auto& p : pts) {
              auto* cost = new ceres::AutoDiffCostFunction<LogResidual, 1, ScalingLaw::kCount>(
                  new LogResidual{p.N / kUnitN, p.D / kUnitD, p.R, p.P, std::log(p.loss)});
              problem.AddResidualBlock(cost, &huber, v.data());
            }
            double* x = v.data();
            std::array<double, ScalingLaw::kCount> lo{}, hi{};
            auto bound = [&](int i, double l, double h) { lo[i] = l, hi[i] = h; };
            bound(ScalingLaw::E0, 0, min_loss);
            for (int i : {ScalingLaw::A_tok, ScalingLaw::A_con, ScalingLaw::A_dat}) bound(i, 1e-12, 1e12);
            for (int i : {ScalingLaw::d1, ScalingLaw::d2, ScalingLaw::a}) bound(i, 0.01, 4.0);
            bound(ScalingLaw::g, -4, 4);
            bound(ScalingLaw::t_tok, 1e-9, 10 * max_t);
            bound(ScalingLaw::t_con, 1e-9, 10 * max_t);
            bound(ScalingLaw::t_dat, 1e-9, 10 * max_d);
            for (size_t k = 0; k < fixed_idx.size(); ++k) {  // a fixed value must lie inside
              lo[fixed_idx[k]] = std::min(lo[fixed_idx[k]], fixed_val[k]);
              hi[fixed_idx[k]] = std::max(hi[fixed_idx[k]], fixed_val[k]);
            }
            for (int i = 0; i < ScalingLaw::kCount; ++i) {
              problem.SetParameterLowerBound(x, i, lo[i]);
              problem.SetParameterUpperBound(x, i, hi[i]);
            }
            if (!fixed_idx.empty())
              problem.SetManifold(x, new ceres::SubsetManifold(ScalingLaw::kCount, fixed_idx));
            ceres::Solver::Options so;
            so.linear_solver_type = ceres::DENSE_QR;
            so.max_num_iterations = o.max_iterations;
            so.function_tolerance = 1e-12;
            so.gradient_tolerance = 1e-14;
            so.parameter_tolerance = 1e-12;
            so.logging_type = ceres::SILENT;
            so.minimizer_progress_to_stdout = false;
            so.num_threads = 1;
            ceres::Solver::Summary sum;
            ceres::Solve(so, &problem, &sum);
            ++best.starts;
            if (!sum.IsSolutionUsable()) continue;
            best.converged_starts += sum.termination_type == ceres::CONVERGENCE;
            if (sum.final_cost < best.cost) {
              best.cost = sum.final_cost;
              best.law.v = v;
            }
          }
  DLCM_CHECK(std::isfinite(best.cost), "scaling fit: no start converged to a usable solution");
  double ss_res = 0, ss_tot = 0;
  for (auto& p : pts) {
    double pr = best.law.loss(p.N, p.D, p.R, p.P);
    best.predicted.push_back(pr);
    ss_res += (p.loss - pr) * (p.loss - pr);
    ss_tot += (p.loss - mean) * (p.loss - mean);
  }
  best.r2 = ss_tot > 0 ? 1 - ss_res / ss_tot : 0;
  best.rmse = std::sqrt(ss_res / double(pts.size()));
  return best;
#endif
}

std::vector<ScalingPoint> load_scaling_points(const std::vector<std::string>& runs,
                                              const ScalingLoadOptions& o) {
  DLCM_CHECK(!runs.empty(), "scaling fit: no run folders given");
  DLCM_CHECK(o.metric == "val_loss" || o.metric == "ce", "--metric: expected val_loss or ce, got '",
             o.metric, "'");
  std::vector<ScalingPoint> out;
  for (const std::string& run : runs) {
    const std::string ck = resolve_checkpoint(run);
    const Config cfg = load_checkpoint_config(ck);
    std::string log = (fs::path(run) / "train_log.jsonl").string();
    if (!fs::exists(log)) log = (fs::path(ck) / "train_log.jsonl").string();
    std::ifstream f(log);
    DLCM_CHECK(f, run, ": no train_log.jsonl (expected the --out folder of 'dlcm train')");
    const FlopsReport fr = flops_report(cfg.model, cfg.train.seq_len);
    const double N = double(fr.non_embedding_params()), P = fr.backbone_param_share();
    const double R = cfg.model.is_dlcm() ? double(cfg.model.target_R) : 1.0;
    const i64 tokens_per_step = cfg.train.grad_accum * cfg.train.batch_size * cfg.train.seq_len;
    const double min_step = std::max(double(cfg.train.warmup_steps), o.min_frac * double(cfg.train.steps));
    const std::string comp_key = o.metric == "val_loss" ? "val_compression" : "compression";
    size_t before = out.size();
    std::string line;
    i64 lineno = 0;
    while (std::getline(f, line)) {
      ++lineno;
      if (line.empty()) continue;
      json j;
      try {
        j = json::parse(line);
      } catch (const json::parse_error&) {
        fail(log, ":", lineno, ": malformed JSON line (each line must be one JSON object)");
      }
      DLCM_CHECK(j.is_object(), log, ":", lineno, ": expected a JSON object");
      if (!j.contains(o.metric)) continue;
      DLCM_CHECK(j.contains("step") && j["step"].is_number_integer() && j[o.metric].is_number(),
                 log, ":", lineno, ": a '", o.metric, "' line needs integer 'step' and a number");
      ScalingPoint p;
      p.run = run;
      p.step = j["step"].get<i64>();
      if (p.step <= 0 || double(p.step) < min_step) continue;
      p.loss = j[o.metric].get<double>();
      p.D = j.contains("tokens") && j["tokens"].is_number() ? j["tokens"].get<double>()
                                                             : double(p.step * tokens_per_step);
      p.N = N;
      p.P = P;
      p.R = R;
      if (o.realized_R && cfg.model.is_dlcm()) {
        DLCM_CHECK(j.contains(comp_key) && j[comp_key].is_number(), log, ":", lineno,
                   ": --realized-R needs '", comp_key, "' on every ", o.metric, " line");
        p.R = j[comp_key].get<double>();
      }
      out.push_back(p);
    }
    DLCM_CHECK(out.size() > before, log, ": no '", o.metric, "' lines after step ", min_step,
               " (the warmup / first ", o.min_frac * 100,
               "% of the run is skipped); train longer or evaluate more often");
  }
  return out;
}

double training_flops_estimate(double N, double D, double R, double P) {
  return 6.0 * N * ((1 - P) + P / R) * D;
}

std::vector<Allocation> allocate_budget(const ScalingLaw& law, double C, double R, double p_min,
                                        double p_max, double p_step, double n_min, double n_max) {
  DLCM_CHECK(C > 0 && std::isfinite(C), "--flops: budget must be positive, got ", C);
  DLCM_CHECK(R >= 1 && std::isfinite(R), "--R must be >= 1 and finite, got ", R);
  DLCM_CHECK(p_min >= 0 && p_max < 1 && p_min <= p_max && p_step > 0,
             "allocate: need 0 <= p_min <= p_max < 1 and p_step > 0");
  // a step so small that the scan would not end in any useful time (or P += p_step would not
  // move P at all)
  const double n_p = (p_max - p_min + 1e-9) / p_step;
  DLCM_CHECK(n_p <= 1e4, "allocate: --p-step ", p_step, " gives ", n_p,
             " values of P between --p-min and --p-max; at most 10000 (raise --p-step)");
  DLCM_CHECK(n_min > 0 && std::isfinite(n_max) && n_min <= n_max,
             "allocate: need 0 < --n-min <= --n-max (or a positive --N), got ", n_min, " and ", n_max);
  std::vector<Allocation> out;
  for (double P = p_min; P <= p_max + 1e-9; P += p_step) {
    auto at = [&](double logN) {
      double N = std::exp(logN);
      double D = C / (6.0 * N * ((1 - P) + P / R));
      return Allocation{P, N, D, law.loss(N, D, R, P)};
    };
    // Dense scan over N from n_min to n_max, then golden-section refinement around the best.
    const double lo0 = std::log(n_min), hi0 = std::log(n_max);
    if (hi0 - lo0 < 1e-12) {  // N fixed
      out.push_back(at(lo0));
      continue;
    }
    const int K = 400;
    int bi = 0;
    double bl = INFINITY;
    for (int k = 0; k <= K; ++k) {
      double l = at(lo0 + (hi0 - lo0) * k / K).loss;
      if (l < bl) bl = l, bi = k;
    }
    double lo = lo0 + (hi0 - lo0) * std::max(0, bi - 1) / K,
           hi = lo0 + (hi0 - lo0) * std::min(K, bi + 1) / K;
    const double gr = (std::sqrt(5.0) - 1) / 2;
    for (int it = 0; it < 80; ++it) {
      double m1 = hi - gr * (hi - lo), m2 = lo + gr * (hi - lo);
      if (at(m1).loss < at(m2).loss) hi = m2;
      else lo = m1;
    }
    out.push_back(at((lo + hi) / 2));
  }
  return out;
}

}  // namespace dlcm
