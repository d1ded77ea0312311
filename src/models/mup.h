// Decoupled µP (SPEC 6): width multipliers, the forced logit multiplier, and the per-parameter
// initialisation, learning-rate and epsilon scales derived from each parameter's group.
#pragma once
#include "core/params.h"
#include "models/config.h"

namespace dlcm {

// s_token = d_token / d_base, s_concept = d_concept / d_base (both 1 when µP is off).
double mup_s_token(const ModelConfig& m);
double mup_s_concept(const ModelConfig& m);
// Width multiplier of a parameter group (1 for Other and when µP is off).
double mup_width_mult(const ModelConfig& m, ParamGroup g);

// Under mup.enabled, forces logit_mult = 1/s_token and logs "[mup] logit_mult forced to ..."
// on stderr when that changes the value (a config read back from a checkpoint already holds it).
void mup_resolve(ModelConfig& m);

// Sets every parameter's width_mult (s of its group) and lr_mult (the group's base learning-rate
// multiplier); AdamW then uses lr * lr_mult / width_mult and eps / width_mult.
void mup_assign(const ModelConfig& m, ParamStore& ps);

// Initial std of a parameter: µP uses sigma_base / sqrt(s) for hidden matrices and sigma_base
// for the others; standard parametrisation uses init_std. Output projections of residual
// branches (wo, w2) are further scaled by 1/sqrt(2 * depth) in both (a depth rule, constant in
// width). Norm weights (ones) and identity-initialised router projections are not affected.
float init_std_for(const ModelConfig& m, const Param& p);

}  // namespace dlcm
