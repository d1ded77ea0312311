// µP coordinate check (SPEC 6, docs/mup_scaling.md): train copies of one model at several widths
// on one fixed batch and record the RMS of every stack's output and of the logits after a few
// steps. Under µP the curves stay flat across widths; under standard parametrisation they drift.
#pragma once
#include <string>
#include <vector>

#include "models/config.h"

namespace dlcm {

// The config at width multipliers (token_mult, concept_mult): d_token, heads, d_ff, d_scan and the
// cross-attention heads / x_d_ff scale with `token_mult`; d_concept, backbone heads and bb_d_ff with
// `concept_mult` (head_dim stays). Every scaled size must come out an integer (Error otherwise).
ModelConfig scale_width(const ModelConfig& m, double token_mult, double concept_mult);

// The model under parametrisation "mup" (mup.enabled, logit_mult = 1/s_token) or "sp" (µP off,
// init_std = mup.sigma_base so both agree at width d_base, logit_mult 1).
ModelConfig parametrised(const ModelConfig& m, const std::string& param);

struct CoordCheckOptions {
  Config base;                              // the model at multiplier 1 (train.lr is used)
  std::vector<double> mults = {1, 2, 4, 8};  // width multipliers
  bool scale_token = true, scale_concept = true;
  std::vector<i64> record_steps = {0, 1, 10};  // after this many optimizer steps
  std::vector<std::string> params = {"mup", "sp"};
  i64 seeds = 1;  // RMS averaged over this many initialisations
  // The fixed batch trained on at every step: tokens/targets [B, L] with B = train.batch_size,
  // L = train.seq_len (targets < 0 ignored).
  std::vector<i32> tokens, targets;
};

struct CoordPoint {
  std::string param;  // "mup" | "sp"
  double mult = 1;
  i64 d_token = 0, d_concept = 0;
  i64 step = 0;
  std::string name;   // stack name from LanguageModel::activation_rms(), or "logits"
  double rms = 0;
};

// Runs every (parametrisation, width, seed); points are ordered by param, mult, step, name.
// "mup" trains with the config's µP settings (mup.enabled forced on); "sp" with mup off,
// init_std = mup.sigma_base, logit_mult 1 and every learning rate = train.lr. Both use a
// constant learning rate with no warmup and no clipping (clipping would rescale the update by a
// width-dependent factor).
std::vector<CoordPoint> coord_check(const CoordCheckOptions& o);

// max / min of the RMS across widths for one (param, step, name); 0 when absent.
double coord_spread(const std::vector<CoordPoint>& pts, const std::string& param, i64 step,
                    const std::string& name);

}  // namespace dlcm
