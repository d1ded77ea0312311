#include "models/model.h"

#include <algorithm>
#include <cmath>

#include "models/baseline.h"

namespace dlcm {

void LanguageModel::logits_at(const i32* tokens, i64 B, i64 L, const i64* pos, i64 n, float* out) {
  const i64 V = cfg_.vocab_size;
  Buf all(B * L * V);
  logits(tokens, B, L, all.data());
  for (i64 i = 0; i < n; ++i) {
    DLCM_CHECK(pos[i] >= 0 && pos[i] < B * L, "logits_at: position ", pos[i], " outside [0, ", B * L, ")");
    std::copy_n(all.data() + pos[i] * V, V, out + i * V);
  }
}

std::unique_ptr<LanguageModel> make_model(const ModelConfig& cfg) {
  if (cfg.arch == "baseline") return std::make_unique<BaselineModel>(cfg);
  fail("config: arch \"", cfg.arch, "\" is not built in this version");
}

std::unique_ptr<LanguageModel> make_initialised_model(const ModelConfig& cfg, uint64_t seed) {
  auto m = make_model(cfg);
  // Standard parametrisation: every matrix N(0, init_std^2); output projections of residual
  // branches (wo, w2) scaled by 1/sqrt(2 * depth) so the residual stream does not grow with depth.
  i64 depth = cfg.is_dlcm() ? cfg.enc_layers + cfg.bb_layers + cfg.dec_layers + 1 : cfg.n_layers;
  for (auto& p : m->params().params()) {
    if (p.init_one || p.init_identity) continue;
    p.init_std = cfg.init_std;
    auto ends_with = [&](const char* s) {
      std::string t(s);
      return p.name.size() >= t.size() && p.name.compare(p.name.size() - t.size(), t.size(), t) == 0;
    };
    if (ends_with("attn.wo.weight") || ends_with("ffn.w2.weight") || ends_with("xattn.wo.weight"))
      p.init_std = cfg.init_std / std::sqrt(2.0f * float(depth));
  }
  m->params().init(seed);
  return m;
}

}  // namespace dlcm
