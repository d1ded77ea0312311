// Matched-FLOPs planning (issue 8): propose a dlcm config whose forward (inference) FLOPs per
// token match a baseline's within a tolerance while the concept backbone holds a chosen share P
// of the non-embedding parameters, at compression R.
#pragma once
#include <string>

#include "models/config.h"
#include "models/flops.h"

namespace dlcm {

struct PlanOptions {
  double R = 4;              // tokens per concept (target_R of the proposal)
  double P = 0.5;            // backbone share of non-embedding parameters
  i64 d_concept = 0;         // fixed concept width; 0 = search multiples of head_dim
  i64 d_token = 0;           // fixed token width; 0 = the baseline's, else nearby multiples
  i64 seq_len = 0;           // 0 = the baseline's train.seq_len
  double flops_tol = 0.05;   // |F_dlcm / F_base - 1| allowed
  double p_tol = 0.03;       // |P_achieved - P| allowed
};

struct PlanResult {
  Config dlcm;               // the proposal (training settings copied from the baseline)
  FlopsReport base, prop;
  double flops_ratio = 0;    // F_dlcm / F_base (forward, per token)
  double P = 0;              // achieved backbone share
  i64 candidates = 0;        // shapes examined
};

// The search (docs/mup_scaling.md): blocks keep the baseline's head_dim and GQA group (d / head_dim
// heads); d_ff and bb_d_ff start from the baseline's d_ff / d_token ratio and move in steps of
// 32 (up to 4 each way) for fine FLOPs and P control; the cross-attention uses the token heads
// and d_ff. Over d_token (the baseline's first, then neighbouring multiples of head_dim),
// d_concept (d_token .. 4 d_token), enc_layers, dec_layers, the d_ff steps, and bb_layers
// (solved from P), keep the shapes that meet both tolerances and pick the one with the smallest
// cost = |P error| / p_tol + |FLOPs error| / flops_tol + |ln(backbone width/depth ratio / the
// baseline's)| + 0.25 |enc - dec| + 0.1 (d_ff steps). Throws Error with the closest shape found
// when nothing meets both tolerances.
PlanResult plan_match(const Config& baseline, const PlanOptions& o, const std::string& source);

}  // namespace dlcm
