// FLOPs accounting (SPEC section 7): 2*m*n*k per matrix product, 4*head_dim per admitted
// (query, key) pair per head for attention. Per token, forward pass.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "models/config.h"

namespace dlcm {

struct FlopsReport {
  std::vector<std::pair<std::string, double>> model;   // per component, forward, per token
  std::vector<std::pair<std::string, double>> kernel;  // what an implementation executes, where it differs
  double total() const;
  double kernel_total() const;  // model total with kernel overrides applied
  std::vector<std::pair<std::string, i64>> params;  // parameter counts per component
};

// Forward FLOPs per token of a pre-norm block stack over sequences of `len` positions with
// causal attention (average admitted keys per query = (len+1)/2).
double block_flops_per_position(i64 d, i64 n_heads, i64 n_kv_heads, i64 head_dim, i64 d_ff,
                                double len);
// R: tokens per concept (dlcm only; target_R when R <= 0).
FlopsReport flops_report(const ModelConfig& m, i64 seq_len, double R = 0);

}  // namespace dlcm
