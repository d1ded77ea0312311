#include "models/mup.h"

#include <cmath>
#include <cstdio>

namespace dlcm {

double mup_s_token(const ModelConfig& m) {
  return m.mup.enabled ? double(m.d_token) / double(m.mup.d_base) : 1.0;
}

double mup_s_concept(const ModelConfig& m) {
  return m.mup.enabled ? double(m.d_concept) / double(m.mup.d_base) : 1.0;
}

double mup_width_mult(const ModelConfig& m, ParamGroup g) {
  switch (g) {
    case ParamGroup::TokenHidden: return mup_s_token(m);
    case ParamGroup::ConceptHidden: return mup_s_concept(m);
    default: return 1.0;
  }
}

void mup_resolve(ModelConfig& m) {
  if (!m.mup.enabled) return;
  const float forced = float(1.0 / mup_s_token(m));
  if (m.logit_mult != forced) {
    std::fprintf(stderr, "[mup] logit_mult forced to %g (1/s_token = d_base/d_token = %lld/%lld)\n",
                 double(forced), (long long)m.mup.d_base, (long long)m.d_token);
    m.logit_mult = forced;
  }
}

void mup_assign(const ModelConfig& m, ParamStore& ps) {
  for (auto& p : ps.params()) {
    p.width_mult = float(mup_width_mult(m, p.group));
    p.lr_mult = !m.mup.enabled                           ? 1.0f
                : p.group == ParamGroup::TokenHidden     ? m.mup.lr_mult_token
                : p.group == ParamGroup::ConceptHidden   ? m.mup.lr_mult_concept
                                                         : m.mup.lr_mult_other;
  }
}

float init_std_for(const ModelConfig& m, const Param& p) {
  auto ends_with = [&](const char* s) {
    std::string t(s);
    return p.name.size() >= t.size() && p.name.compare(p.name.size() - t.size(), t.size(), t) == 0;
  };
  float std = m.init_std;
  if (m.mup.enabled)
    std = m.mup.sigma_base / float(std::sqrt(mup_width_mult(m, p.group)));
  const i64 depth = m.is_dlcm() ? m.enc_layers + m.bb_layers + m.dec_layers + 1 : m.n_layers;
  if (ends_with("attn.wo.weight") || ends_with("ffn.w2.weight"))
    std /= std::sqrt(2.0f * float(depth));
  return std;
}

}  // namespace dlcm
