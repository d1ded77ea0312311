#include "eval/concept_usage.h"

#include <algorithm>
#include <cstdio>

#include "kernels/gemm.h"

namespace dlcm {

ConceptUsageResult concept_usage_from_sums(const ConceptUsageSums& s) {
  ConceptUsageResult u;
  u.applicable = true;
  u.tokens = s.n_targets;
  const double n = double(std::max<i64>(s.n_targets, 1));
  u.ce = s.ce / n;
  u.ce_null = s.ce_null / n;
  u.ce_shuffle = s.ce_shuffle / n;
  u.delta_null = u.ce_null - u.ce;
  u.delta_shuffle = u.ce_shuffle - u.ce;
  u.xattn_ratio = s.h_norm > 0 ? s.xo_norm / s.h_norm : 0.0;
  u.compression = s.n_concepts > 0 ? double(s.n_positions) / double(s.n_concepts) : 0.0;
  u.pos_count = s.pos_count;
  u.pos_ce.resize(s.pos_ce.size());
  for (size_t k = 0; k < s.pos_ce.size(); ++k)
    u.pos_ce[k] = s.pos_count[k] > 0 ? s.pos_ce[k] / double(s.pos_count[k]) : 0.0;
  return u;
}

ConceptUsageResult measure_concept_usage(LanguageModel& m, const TrainData& data, i64 B,
                                         i64 L, i64 max_batches) {
  if (!data.val_count) return {};
  const i64 count = data.val_count(B, L);
  const i64 n = max_batches >= 0 ? std::min(count, max_batches) : count;
  std::vector<i32> tk(B * L), tg(B * L);
  ops::PrecisionScope fp32(ops::Precision::FP32);  // like validation
  ConceptUsageSums s;
  for (i64 i = 0; i < n; ++i) {
    data.val_batch(i, B, L, tk.data(), tg.data());
    if (!m.concept_usage(Batch{tk.data(), tg.data(), B, L, 0}, s)) return {};
  }
  ConceptUsageResult u = concept_usage_from_sums(s);
  u.batches = n;
  u.full_split = n == count;
  return u;
}

nlohmann::json concept_usage_json(const ConceptUsageResult& u) {
  return {{"ce", u.ce},
          {"ce_null", u.ce_null},
          {"ce_shuffle", u.ce_shuffle},
          {"delta_null", u.delta_null},
          {"delta_shuffle", u.delta_shuffle},
          {"xattn_ratio", u.xattn_ratio},
          {"compression", u.compression},
          {"pos_ce", u.pos_ce},
          {"pos_count", u.pos_count},
          {"tokens", u.tokens},
          {"batches", u.batches},
          {"full_split", u.full_split}};
}

std::string concept_usage_text(const ConceptUsageResult& u) {
  char buf[512];
  std::string s;
  std::snprintf(buf, sizeof buf,
                "concept usage on %lld validation tokens (%s, %lld batches): CE %.4f\n"
                "  z_null concepts:   CE %.4f (delta %+.4f)\n"
                "  shuffled concepts: CE %.4f (delta %+.4f)\n"
                "  |Wo att| / |H| = %.4f, compression %.2f tokens/concept\n"
                "  CE by position in concept:",
                (long long)u.tokens, u.full_split ? "full split" : "subset", (long long)u.batches,
                u.ce, u.ce_null, u.delta_null, u.ce_shuffle, u.delta_shuffle, u.xattn_ratio,
                u.compression);
  s = buf;
  const size_t shown = std::min<size_t>(u.pos_ce.size(), 8);
  for (size_t k = 0; k < shown; ++k) {
    std::snprintf(buf, sizeof buf, " %zu: %.3f (%lld)", k, u.pos_ce[k], (long long)u.pos_count[k]);
    s += buf;
  }
  if (shown < u.pos_ce.size()) s += " ...";
  return s + "\n";
}

}  // namespace dlcm
