#include "models/flops.h"

#include <algorithm>

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

double causal_keys_per_query(double len, i64 window) {
  if (window <= 0 || double(window) >= len) return (len + 1) / 2;
  // Positions t < w see t + 1 keys, the remaining len - w see w.
  const double w = double(window);
  return (w * (w + 1) / 2 + (len - w) * w) / len;
}

double block_flops_per_position(i64 d, i64 H, i64 Hkv, i64 hd, i64 dff, double len, i64 window) {
  double proj = 2.0 * d * (H * hd) * 2 + 2.0 * d * (Hkv * hd) * 2;  // q, o, k, v
  double ffn = 2.0 * 3 * d * dff;
  double attn = 4.0 * hd * H * causal_keys_per_query(len, window);
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
                                                                         hd, m.d_ff, L,
                                                                         m.enc_window)});
  r.model.push_back({"router", m.router.kind != "projected" ? 0.0 : 2.0 * 2 * d * ds});
  // Without the concept path (control) pooling, backbone and the concept attention term do
  // not run (and their parameters are not registered).
  const bool cp = m.concept_path;
  // prefix_mean + inclusive: every token also runs one backbone prefix row (W_up of its prefix
  // mean; at concept position j it attends the j closed concepts and itself: (M+1)/2 keys on
  // average, like a concept row) and the K/V of its own concept.
  const double prefix = cp && m.concept_repr == "prefix_mean" &&
                                m.concept_visibility == "inclusive"
                            ? 1.0
                            : 0.0;
  // pooling adds (mean) or copies (first) are negligible; W_up runs once per concept
  r.model.push_back({"pooling", cp ? 2.0 * d * dc * (1.0 / R + prefix) : 0.0});
  r.model.push_back({"backbone", cp ? m.bb_layers *
                                          block_flops_per_position(dc, m.bb_heads, m.bb_kv_heads,
                                                                   hd, m.bb_d_ff, M) *
                                          (1.0 / R + prefix)
                                    : 0.0});
  // Cross-attention: q and o per token, k and v per concept (+ null). Token t in concept j
  // admits the j + 1 list entries [z_null, zs_0 .. zs_{j-1}]: (M+1)/2 on average (model and
  // compact kernel); with concept_visibility "inclusive" also its own zs_j, one more. The
  // replicate kernel runs full causal attention over L positions (inclusive: plus the
  // leading z_null slot every query sees).
  const i64 xq = m.x_heads * hd, xkv = m.x_kv_heads * hd;
  const double own = m.concept_visibility == "inclusive" ? 1.0 : 0.0;
  double x_proj = 2.0 * d * xq * 2 + 2.0 * dc * xkv * 2 * ((M + 1) / L + prefix);
  r.xattn.model = cp ? x_proj + 4.0 * hd * m.x_heads * ((M + 1) / 2.0 + own) : 0.0;
  r.xattn.compact = r.xattn.model;
  r.xattn.replicate = cp ? x_proj + 4.0 * hd * m.x_heads * ((L + 1) / 2.0 + own) : 0.0;
  r.model.push_back({"cross_attention", r.xattn.model});
  // xattn_rope widens every head to 2 hd in the kernels (docs/dlcm.md): the model's FLOPs stay
  // those of the function, the kernel does twice the score and value work.
  if (m.xattn_impl == "replicate" || m.xattn_rope) {
    const double att = (m.xattn_impl == "replicate" ? r.xattn.replicate : r.xattn.model) - x_proj;
    r.kernel.push_back({"cross_attention", cp ? x_proj + (m.xattn_rope ? 2.0 : 1.0) * att : 0.0});
  }
  r.model.push_back({"cross_ffn", 2.0 * 3 * d * m.x_d_ff});
  r.model.push_back({"decoder", m.dec_layers * block_flops_per_position(d, m.n_heads, m.n_kv_heads,
                                                                         hd, m.d_ff, L,
                                                                         m.dec_window)});
  r.model.push_back({"head", 2.0 * d * V});
  r.params = {
      {"embedding", V * d},
      {"encoder", m.enc_layers * block_params(d, m.n_heads, m.n_kv_heads, hd, m.d_ff, m.qk_norm) + d},
      {"router", m.router.kind != "projected" ? 0 : 2 * ds * d},
      {"pooling", cp ? dc * d : 0},
      {"backbone", cp ? m.bb_layers * block_params(dc, m.bb_heads, m.bb_kv_heads, hd, m.bb_d_ff, m.qk_norm) + dc : 0},
      {"cross_attention", cp ? 2 * d * xq + 2 * dc * xkv + dc + d + 2 * hd : 0},
      {"cross_ffn", 3 * d * m.x_d_ff + d},
      {"decoder", m.dec_layers * block_params(d, m.n_heads, m.n_kv_heads, hd, m.d_ff, m.qk_norm) + d},
      {"head", V * d}};
  return r;
}

double prefill_last_rows_skipped(const ModelConfig& m, i64 P) {
  const i64 final_layers = !m.is_dlcm() ? (m.baseline_extras ? m.n_layers - m.layers_pre()
                                                               : m.n_layers)
                                        : m.dec_layers;
  if (final_layers <= 0 || P <= 1) return 0.0;
  const i64 d = m.d_token, H = m.n_heads, hd = m.head_dim;
  const i64 window = m.is_dlcm() ? m.dec_window : 0;
  // query t (0-based) admits min(t + 1, window) keys; t = 0 .. P - 2 are skipped
  double keys = 0;
  for (i64 t = 0; t + 1 < P; ++t) keys += double(window > 0 ? std::min<i64>(t + 1, window) : t + 1);
  const double per_row = 2.0 * 2 * (H * hd) * d + 2.0 * 3 * d * m.d_ff;  // q, o, w1/w3/w2
  return double(P - 1) * per_row + 4.0 * hd * H * keys;
}

double prefill_flops_as_run(const ModelConfig& m, i64 P, double closed, bool last_rows) {
  const double R = !m.is_dlcm() ? 0.0 : closed > 0 ? double(P) / closed : 1e30;
  const FlopsReport fr = flops_report(m, P, R);
  return fr.total() - fr.flops("head") * double(P - 1) / double(P) -
         (last_rows ? prefill_last_rows_skipped(m, P) / double(P) : 0.0);
}

}  // namespace dlcm
