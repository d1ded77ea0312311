// The compression-aware scaling law (SPEC 8):
//   L(N, D, R, P) = E0 + A_tok / (N (1-P) + t_tok)^d1 + A_con R^g / (N P + t_con)^d2
//                      + A_dat / (D + t_dat)^a
// N = non-embedding parameters, D = training tokens, R = tokens per concept, P = backbone share
// of N. The constants are expressed with N in millions of parameters and D in millions of
// tokens (kUnitN, kUnitD); the functions here take raw counts and convert.
// Fitted by robust nonlinear least squares (Ceres, Huber loss on log residuals) with exponents
// shared by every run, from many starting points. docs/mup_scaling.md has the details.
#pragma once
#include <array>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/common.h"

namespace dlcm {

constexpr double kUnitN = 1e6, kUnitD = 1e6;

struct ScalingLaw {
  enum Index { E0, A_tok, t_tok, d1, A_con, g, t_con, d2, A_dat, t_dat, a, kCount };
  static const std::array<const char*, kCount> kNames;
  std::array<double, kCount> v{};

  // Loss at raw N (parameters), D (tokens).
  double loss(double N, double D, double R, double P) const;
  // The three terms (token capacity, concept capacity, data) at raw N, D.
  std::array<double, 3> terms(double N, double D, double R, double P) const;
  nlohmann::json to_json() const;  // {"E0": .., ..., "units": {...}}
  static ScalingLaw from_json(const nlohmann::json& j, const std::string& source);
};

// One observation: a run's loss after D tokens.
struct ScalingPoint {
  std::string run;
  i64 step = 0;
  double N = 0, D = 0, R = 1, P = 0;  // raw counts; baseline runs: R = 1, P = 0
  double loss = 0;
};

struct ScalingFitOptions {
  double huber = 0.01;  // Huber threshold on log-loss residuals (about 1% relative error)
  // Parameters held at the given value (names as ScalingLaw::kNames), e.g. {"t_tok", 0}.
  std::vector<std::pair<std::string, double>> fixed;
  int max_iterations = 400;
};

struct ScalingFit {
  ScalingLaw law;
  double cost = 0;  // robust cost at the optimum
  double r2 = 0;    // 1 - SS_res / SS_tot on the loss
  double rmse = 0;  // root mean squared (observed - predicted)
  std::vector<double> predicted;  // per point
  int starts = 0, converged_starts = 0;
};

// Fits the law to the points; throws Error when there are too few points or the inputs are
// not finite and positive, or (scaling_fit_available() false) when built without Ceres.
ScalingFit fit_scaling_law(const std::vector<ScalingPoint>& pts, const ScalingFitOptions& o);
// Whether this build has the fit (CMake found Ceres; option DLCM_WITH_CERES).
bool scaling_fit_available();
extern const char* const kScalingFitMissing;  // the error a build without it gives

// Points from run folders (`dlcm train --out`): the config from RUN/checkpoint/config.json, the
// curve from RUN/train_log.jsonl. metric "val_loss" uses the validation lines (default),
// "ce" the training log lines. Points before max(warmup_steps, min_frac * steps) are dropped
// (warmup transients). realized_R takes R from the logged compression instead of target_R.
struct ScalingLoadOptions {
  std::string metric = "val_loss";
  double min_frac = 0.1;
  bool realized_R = false;
};
std::vector<ScalingPoint> load_scaling_points(const std::vector<std::string>& runs,
                                              const ScalingLoadOptions& o);

// The allocation of a training FLOPs budget C at compression R: minimise L over N and P with
// D = C / (6 N ((1 - P) + P / R)) (every non-embedding parameter costs 2 forward FLOPs per token
// it processes; backbone parameters see one token in R; training = 3 x forward; attention
// and the output head are left out). P from p_min to p_max in steps of p_step; N searched in
// [n_min, n_max] (equal bounds fix N: only P and D are chosen).
struct Allocation {
  double P = 0, N = 0, D = 0, loss = 0;
};
std::vector<Allocation> allocate_budget(const ScalingLaw& law, double flops, double R,
                                        double p_min = 0.05, double p_max = 0.95,
                                        double p_step = 0.01, double n_min = 1e4,
                                        double n_max = 1e13);  // best N for each P
double training_flops_estimate(double N, double D, double R, double P);

}  // namespace dlcm
