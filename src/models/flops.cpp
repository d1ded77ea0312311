#include "models/flops.h"

namespace dlcm {

double FlopsReport::total() const {
  double s = 0;
  for (auto& [k, v] : model) s += v;
  return s;
}

double FlopsReport::kernel_total() const {
  double s = 0;
  for (auto& [k, v] : model) {
    double x = v;
    for (auto& [k2, v2] : kernel)
      if (k2 == k) x = v2;
    s += x;
  }
  return s;
}

double FlopsReport::flops(const std::string& c) const {
  for (auto& [k, v] : model)
    if (k == c) return v;
  return 0;
}

i64 FlopsReport::param_count(const std::string& c) const {
  for (auto& [k, v] : params)
    if (k == c) return v;
  return 0;
}

i64 FlopsReport::total_params() const {
  i64 s = 0;
  for (auto& [k, v] : params) s += v;
  return s;
}

i64 FlopsReport::non_embedding_params() const {
  return total_params() - param_count("embedding") - param_count("head");
}

double FlopsReport::backbone_param_share() const {
  i64 n = non_embedding_params();
  return n > 0 ? double(param_count("backbone")) / double(n) : 0.0;
}

double FlopsReport::backbone_flops_share() const {
  double t = total();
  return t > 0 ? flops("backbone") / t : 0.0;
}

double block_flops_per_position(i64 d, i64 H, i64 Hkv, i64 hd, i64 dff, double len) {
  double proj = 2.0 * d * (H * hd) * 2 + 2.0 * d * (Hkv * hd) * 2;  // q, o, k, v
  double ffn = 2.0 * 3 * d * dff;
  double attn = 4.0 * hd * H * (len + 1) / 2;  // causal: average (len+1)/2 keys
  return proj + ffn + attn;
}

i64 block_params(i64 d, i64 H, i64 Hkv, i64 hd, i64 dff, bool qk) {
  return 2 * d * H * hd + 2 * d * Hkv * hd + 3 * d * dff + 2 * d + (qk ? 2 * hd : 0);
}

FlopsReport flops_report(const ModelConfig& m, i64 L, double R) {
  FlopsReport r;
  const i64 d = m.d_token, V = m.vocab_size;
  if (!m.is_dlcm()) {
    r.model.push_back({"embedding", 0});
    r.model.push_back({"layers", m.n_layers * block_flops_per_position(d, m.n_heads, m.n_kv_heads,
                                                                        m.head_dim, m.d_ff, L)});
    // baseline_extras: the DLCM's cross FFN between the halves (its mid-stack encoder.norm
    // is counted with the layers, as the final norm is)
    if (m.baseline_extras) r.model.push_back({"cross_ffn", 2.0 * 3 * d * m.x_d_ff});
    r.model.push_back({"head", 2.0 * d * V});
    // the final norm is counted with the layers, so "head" is exactly lm_head
    r.params = {{"embedding", V * d},
                {"layers", m.n_layers * block_params(d, m.n_heads, m.n_kv_heads, m.head_dim,
                                                     m.d_ff, m.qk_norm) +
                               d * (m.baseline_extras ? 2 : 1)},
                {"head", V * d}};
    if (m.baseline_extras) r.params.insert(r.params.end() - 1, {"cross_ffn", 3 * d * m.x_d_ff + d});
    return r;
  }
  if (R <= 0) R = m.target_R;
  r.R = R;
  const i64 dc = m.d_concept, ds = m.scan_dim(), hd = m.head_dim;
  const double M = L / R;  // concepts per row
  r.model.push_back({"embedding", 0});
  r.model.push_back({"encoder", m.enc_layers * block_flops_per_position(d, m.n_heads, m.n_kv_heads,
                                                                         hd, m.d_ff, L)});
  r.model.push_back({"router", m.router.kind != "projected" ? 0.0 : 2.0 * 2 * d * ds});
  // mean pooling adds are negligible; W_up runs once per concept
  r.model.push_back({"pooling", 2.0 * d * dc / R});
  r.model.push_back({"backbone", m.bb_layers *
                                     block_flops_per_position(dc, m.bb_heads, m.bb_kv_heads, hd,
                                                              m.bb_d_ff, M) /
                                     R});
  // Cross-attention: q and o per token, k and v per concept (+ null). Token t in concept j
  // admits the j + 1 list entries [z_null, zs_0 .. zs_{j-1}]: (M+1)/2 on average (model and
  // compact kernel). The replicate kernel runs full causal attention over L positions.
  const i64 xq = m.x_heads * hd, xkv = m.x_kv_heads * hd;
  double x_proj = 2.0 * d * xq * 2 + 2.0 * dc * xkv * 2 * (M + 1) / L;
  r.xattn.model = x_proj + 4.0 * hd * m.x_heads * (M + 1) / 2.0;
  r.xattn.compact = r.xattn.model;
  r.xattn.replicate = x_proj + 4.0 * hd * m.x_heads * (L + 1) / 2.0;
  r.model.push_back({"cross_attention", r.xattn.model});
  if (m.xattn_impl == "replicate") r.kernel.push_back({"cross_attention", r.xattn.replicate});
  r.model.push_back({"cross_ffn", 2.0 * 3 * d * m.x_d_ff});
  r.model.push_back({"decoder", m.dec_layers * block_flops_per_position(d, m.n_heads, m.n_kv_heads,
                                                                         hd, m.d_ff, L)});
  r.model.push_back({"head", 2.0 * d * V});
  r.params = {
      {"embedding", V * d},
      {"encoder", m.enc_layers * block_params(d, m.n_heads, m.n_kv_heads, hd, m.d_ff, m.qk_norm) + d},
      {"router", m.router.kind != "projected" ? 0 : 2 * ds * d},
      {"pooling", dc * d},
      {"backbone", m.bb_layers * block_params(dc, m.bb_heads, m.bb_kv_heads, hd, m.bb_d_ff, m.qk_norm) + dc},
      {"cross_attention", 2 * d * xq + 2 * dc * xkv + dc + d + 2 * hd},
      {"cross_ffn", 3 * d * m.x_d_ff + d},
      {"decoder", m.dec_layers * block_params(d, m.n_heads, m.n_kv_heads, hd, m.d_ff, m.qk_norm) + d},
      {"head", V * d}};
  return r;
}

}  // namespace dlcm
