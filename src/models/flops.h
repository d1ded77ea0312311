// FLOPs accounting (SPEC section 7): 2*m*n*k per matrix product, 4*head_dim per admitted
// (query, key) pair per head for attention. Per token, forward pass. Training = 3 x forward.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "models/config.h"

namespace dlcm {

struct FlopsReport {
  std::vector<std::pair<std::string, double>> model;   // per component, forward, per token
  std::vector<std::pair<std::string, double>> kernel;  // what the chosen implementation executes, where it differs
  std::vector<std::pair<std::string, i64>> params;     // parameter counts per component
  // dlcm cross-attention path, forward FLOPs per token: the model count (admitted
  // (token, concept) pairs, SPEC 7) and what each implementation executes.
  struct {
    double model = 0, compact = 0, replicate = 0;
  } xattn;
  double R = 0;  // tokens per concept used (dlcm)

  double total() const;
  double kernel_total() const;  // model total with kernel overrides applied
  double training_total() const { return 3 * total(); }
  double flops(const std::string& component) const;  // 0 when absent
  i64 param_count(const std::string& component) const;
  i64 total_params() const;
  // N of the scaling law: every parameter except the token embedding table and the output
  // projection (lm_head); norms and everything else count.
  i64 non_embedding_params() const;
  // P of the scaling law: backbone parameters / non_embedding_params() (0 for the baseline).
  double backbone_param_share() const;
  double backbone_flops_share() const;  // backbone forward FLOPs / total
};

// Average keys a query admits over a sequence of `len` positions: (len+1)/2 with full causal
// attention (window 0 or >= len); with a sliding window w < len, (w(w+1)/2 + (len-w) w) / len.
double causal_keys_per_query(double len, i64 window = 0);
// Forward FLOPs per token of one pre-norm block over sequences of `len` positions with causal
// (or sliding-window) attention, causal_keys_per_query admitted keys per query.
double block_flops_per_position(i64 d, i64 n_heads, i64 n_kv_heads, i64 head_dim, i64 d_ff,
                                double len, i64 window = 0);
// Parameters of one pre-norm block (attention, SwiGLU, two norms, optional QK-norm weights).
i64 block_params(i64 d, i64 n_heads, i64 n_kv_heads, i64 head_dim, i64 d_ff, bool qk_norm);
// R: tokens per concept (dlcm only; target_R when R <= 0).
FlopsReport flops_report(const ModelConfig& m, i64 seq_len, double R = 0);
// Forward FLOPs that a stream's prefill of P positions into an empty slot skips when it asks
// for the last position's logits only: the final block (the baseline's last layer, the DLCM's
// last decoder layer) runs its q, attention, output projection and FFN for that position alone
// (TransformerStack::forward_cached's last_rows), the P - 1 others only to their keys and
// values. Per prompt, not per token; the head's P - 1 skipped rows are not included.
double prefill_last_rows_skipped(const ModelConfig& m, i64 P);
// Forward FLOPs per token of a stream's prefill of P positions as it runs them: the head (and,
// with last_rows, the final block's tail above) once per prompt; for a DLCM, W_up, the backbone
// and the concept list's keys and values of the `closed` concepts only (the prompt's open one
// reaches them when it closes), so R_closed = P / closed (closed = 0: no concept's work; a
// batch's mean count per prompt where prompts differ).
double prefill_flops_as_run(const ModelConfig& m, i64 P, double closed, bool last_rows);

}  // namespace dlcm
