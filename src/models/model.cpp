#include "models/model.h"

#include <cmath>

#include "models/baseline.h"
#include "models/dlcm.h"

namespace dlcm {

i64 LanguageModel::stream_len(const StreamOptions& o) const {
  DLCM_CHECK(o.max_seqs >= 1, "stream: need at least one sequence slot, got ", o.max_seqs);
  DLCM_CHECK(o.max_len >= 0 && o.max_len <= cfg_.max_seq_len, "stream: max_len ", o.max_len,
             " outside [1, max_seq_len = ", cfg_.max_seq_len, "] (0 = max_seq_len)");
  return o.max_len > 0 ? o.max_len : cfg_.max_seq_len;
}

std::unique_ptr<LanguageModel> make_model(const ModelConfig& cfg) {
  if (cfg.arch == "baseline") return std::make_unique<BaselineModel>(cfg);
  if (cfg.arch == "dlcm") return std::make_unique<DlcmModel>(cfg);
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
