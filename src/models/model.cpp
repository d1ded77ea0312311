#include "models/model.h"

#include <algorithm>
#include <cmath>

#include "kernels/ops.h"
#include "models/baseline.h"
#include "models/dlcm.h"
#include "models/mup.h"

namespace dlcm {

double rms(const float* x, i64 n) { return n > 0 ? std::sqrt(ops::sum_squares(x, n) / double(n)) : 0.0; }

MicroStats& MicroStats::operator+=(const MicroStats& o) {
  ce_sum += o.ce_sum;
  n_targets += o.n_targets;
  sum_b += o.sum_b;
  sum_p += o.sum_p;
  aux_rows += o.aux_rows;
  n_rows += o.n_rows;
  n_positions += o.n_positions;
  n_concepts += o.n_concepts;
  n_thresholded += o.n_thresholded;
  return *this;
}

std::array<double, MicroStats::kFields> MicroStats::to_array() const {
  return {ce_sum, double(n_targets), sum_b, sum_p, double(n_positions), double(n_concepts),
          double(n_thresholded), aux_rows, double(n_rows)};
}

MicroStats MicroStats::from_array(const std::array<double, kFields>& a) {
  MicroStats s;
  s.ce_sum = a[0];
  s.n_targets = i64(a[1]);
  s.sum_b = a[2];
  s.sum_p = a[3];
  s.n_positions = i64(a[4]);
  s.n_concepts = i64(a[5]);
  s.n_thresholded = i64(a[6]);
  s.aux_rows = a[7];
  s.n_rows = i64(a[8]);
  return s;
}

double LossTerms::value(const std::string& name, double missing) const {
  for (const auto& [k, v] : fields)
    if (k == name) return v;
  return missing;
}

void LanguageModel::logits_at(const i32* tokens, i64 B, i64 L, const i64* pos, i64 n, float* out) {
  const i64 V = cfg_.vocab_size;
  Buf all(B * L * V);
  logits(tokens, B, L, all.data());
  for (i64 i = 0; i < n; ++i) {
    DLCM_CHECK(pos[i] >= 0 && pos[i] < B * L, "logits_at: position ", pos[i], " outside [0, ", B * L, ")");
    std::copy_n(all.data() + pos[i] * V, V, out + i * V);
  }
}

i64 LanguageModel::stream_len(const StreamOptions& o) const {
  DLCM_CHECK(o.max_seqs >= 1, "stream: need at least one sequence slot, got ", o.max_seqs);
  DLCM_CHECK(o.max_len >= 0 && o.max_len <= cfg_.max_seq_len, "stream: max_len ", o.max_len,
             " outside [1, max_seq_len = ", cfg_.max_seq_len, "] (0 = max_seq_len)");
  return o.max_len > 0 ? o.max_len : cfg_.max_seq_len;
}

std::unique_ptr<LanguageModel> make_model(const ModelConfig& given) {
  ModelConfig cfg = given;
  mup_resolve(cfg);  // logit_mult = 1/s_token under µP
  check_model_size(cfg, "config");  // refuse absurd sizes before anything is allocated
  std::unique_ptr<LanguageModel> m;
  if (cfg.arch == "baseline") m = std::make_unique<BaselineModel>(cfg);
  else if (cfg.arch == "dlcm") m = std::make_unique<DlcmModel>(cfg);
  else fail("config: arch \"", cfg.arch, "\" is not built in this version");
  mup_assign(cfg, m->params());  // per-parameter lr and eps scales for AdamW
  return m;
}

std::unique_ptr<LanguageModel> make_initialised_model(const ModelConfig& cfg, uint64_t seed) {
  auto m = make_model(cfg);
  // Standard parametrisation: every matrix N(0, init_std^2); µP: sigma_base^2 / s for hidden
  // matrices, sigma_base^2 for the others (models/mup.h). Residual output projections (wo, w2)
  // are scaled by 1/sqrt(2 * depth) in both, so the residual stream does not grow with depth.
  for (auto& p : m->params().params()) {
    if (p.init_one || p.init_identity) continue;
    p.init_std = init_std_for(m->config(), p);
  }
  m->params().init(seed);
  return m;
}

}  // namespace dlcm
