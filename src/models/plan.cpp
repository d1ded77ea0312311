#include "models/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace dlcm {

namespace {

// d_ff values are searched in steps of kFfStep around the baseline's d_ff / d_token ratio.
constexpr i64 kFfStep = 32, kFfSteps = 4;

i64 round_to(double x, i64 m) { return std::max<i64>(m, i64(std::llround(x / double(m))) * m); }

}  // namespace

PlanResult plan_match(const Config& base, const PlanOptions& o, const std::string& src) {
  const ModelConfig& b = base.model;
  DLCM_CHECK(b.arch == "baseline", src, ": --match needs a baseline config, got arch \"", b.arch,
             "\"");
  DLCM_CHECK(o.R > 1, "--R must be > 1, got ", o.R);
  DLCM_CHECK(o.P > 0 && o.P < 1, "--P must be in (0, 1), got ", o.P);
  DLCM_CHECK(o.flops_tol > 0 && o.p_tol > 0, "plan: tolerances must be positive");
  const i64 hd = b.head_dim;
  DLCM_CHECK(o.d_concept == 0 || (o.d_concept > 0 && o.d_concept % hd == 0), "--d-concept ",
             o.d_concept, " must be a positive multiple of head_dim (", hd, ")");
  DLCM_CHECK(o.d_token == 0 || (o.d_token > 0 && o.d_token % hd == 0), "--d-token ", o.d_token,
             " must be a positive multiple of head_dim (", hd, ")");
  const i64 L = o.seq_len > 0 ? o.seq_len : base.train.seq_len;
  PlanResult res;
  res.base = flops_report(b, L);
  const double Fb = res.base.total();
  const double ff_ratio = double(b.d_ff) / double(b.d_token);
  const i64 group = b.n_heads / b.n_kv_heads;  // GQA group size kept everywhere it divides
  const double aspect_b = double(b.d_token) / double(b.n_layers);

  // Token widths: fixed, or the baseline's and its neighbours (closest first).
  std::vector<i64> d_tokens;
  if (o.d_token > 0) {
    d_tokens = {o.d_token};
  } else {
    i64 d0 = round_to(double(b.d_token), hd);
    d_tokens.push_back(d0);
    for (i64 k = 1; k <= 8; ++k) {
      if (d0 + k * hd <= 2 * b.d_token) d_tokens.push_back(d0 + k * hd);
      if (d0 - k * hd >= std::max(hd, b.d_token / 2)) d_tokens.push_back(d0 - k * hd);
    }
  }
  auto heads_of = [&](i64 d, i64& H, i64& Hkv) {
    H = d / hd;
    Hkv = H % group == 0 ? H / group : H;
  };
  ModelConfig best_cfg;
  double best_cost = INFINITY, best_miss = INFINITY;
  ModelConfig closest;
  double closest_F = 0, closest_P = 0;
  for (i64 d : d_tokens) {
    std::vector<i64> dcs;
    if (o.d_concept > 0) dcs = {o.d_concept};
    else
      for (i64 dc = d; dc <= 4 * d; dc += hd) dcs.push_back(dc);
    for (i64 dc : dcs) {
      ModelConfig m = b;
      m.arch = "dlcm";
      m.d_token = d;
      heads_of(d, m.n_heads, m.n_kv_heads);
      m.d_concept = dc;
      heads_of(dc, m.bb_heads, m.bb_kv_heads);
      m.d_scan = 0;
      m.target_R = float(o.R);
      const i64 dff0 = d == b.d_token ? b.d_ff : round_to(ff_ratio * d, kFfStep);
      const i64 bbff0 = round_to(ff_ratio * dc, kFfStep);
      const i64 max_tok_layers = std::max<i64>(2, 2 * b.n_layers);
      for (i64 kt = -kFfSteps; kt <= kFfSteps; ++kt)
        for (i64 kb = -kFfSteps; kb <= kFfSteps; ++kb) {
          m.d_ff = dff0 + kt * kFfStep;
          m.bb_d_ff = bbff0 + kb * kFfStep;
          if (m.d_ff < kFfStep || m.bb_d_ff < kFfStep) continue;
          m.x_heads = m.n_heads;
          m.x_kv_heads = m.n_kv_heads;
          m.x_d_ff = m.d_ff;
          const double p_layer =
              double(block_params(dc, m.bb_heads, m.bb_kv_heads, hd, m.bb_d_ff, m.qk_norm));
          for (i64 enc = 1; enc <= max_tok_layers; ++enc)
            for (i64 dec = 1; enc + dec <= max_tok_layers; ++dec) {
              m.enc_layers = enc;
              m.dec_layers = dec;
              // Backbone depth from P: bb * p_layer + norm = P/(1-P) * (everything else).
              m.bb_layers = 1;
              FlopsReport one = flops_report(m, L, o.R);
              const double rest = double(one.non_embedding_params() - one.param_count("backbone"));
              const double want = (o.P / (1 - o.P) * rest - dc) / p_layer;
              for (i64 bb : {i64(std::floor(want)), i64(std::ceil(want))}) {
                if (bb < 1 || bb > 512) continue;
                m.bb_layers = bb;
                FlopsReport r = flops_report(m, L, o.R);
                ++res.candidates;
                const double fe = r.total() / Fb - 1, pe = r.backbone_param_share() - o.P;
                const double miss = std::max(std::fabs(fe) / o.flops_tol, std::fabs(pe) / o.p_tol);
                if (miss < best_miss) {
                  best_miss = miss;
                  closest = m;
                  closest_F = r.total();
                  closest_P = r.backbone_param_share();
                }
                if (miss > 1) continue;
                const double cost = std::fabs(pe) / o.p_tol + std::fabs(fe) / o.flops_tol +
                                    std::fabs(std::log(double(dc) / double(bb) / aspect_b)) +
                                    0.25 * std::fabs(double(enc - dec)) +
                                    0.1 * double(std::abs(kt) + std::abs(kb));
                if (cost < best_cost) {
                  best_cost = cost;
                  best_cfg = m;
                }
              }
            }
        }
    }
    if (std::isfinite(best_cost)) break;  // the token width closest to the baseline's wins
  }
  if (!std::isfinite(best_cost)) {
    char buf[512];
    if (std::isfinite(best_miss))
      std::snprintf(buf, sizeof buf,
                    "; closest: d_token %lld, d_concept %lld, enc %lld, bb %lld, dec %lld with "
                    "FLOPs %.1f%% of the baseline's and P = %.3f",
                    (long long)closest.d_token, (long long)closest.d_concept,
                    (long long)closest.enc_layers, (long long)closest.bb_layers,
                    (long long)closest.dec_layers, 100 * closest_F / Fb, closest_P);
    else
      std::snprintf(buf, sizeof buf, "; no shape with at least one layer per stack fits");
    fail("plan: no dlcm shape matches the forward FLOPs/token of ", src, " (", Fb, ") within ",
         100 * o.flops_tol, "% with backbone share P = ", o.P, " (+-", o.p_tol, ") at R = ", o.R,
         buf, ". Try another P or R, give --d-concept/--d-token, or a larger baseline");
  }
  res.dlcm.model = best_cfg;
  res.dlcm.train = base.train;
  if (o.seq_len > 0) res.dlcm.train.seq_len = o.seq_len;
  validate(res.dlcm, "plan");
  res.prop = flops_report(best_cfg, L, o.R);
  res.flops_ratio = res.prop.total() / Fb;
  res.P = res.prop.backbone_param_share();
  return res;
}

}  // namespace dlcm
