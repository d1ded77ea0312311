// Next-token sampling: greedy, temperature, top-k, top-p, from a seeded generator.
#pragma once
#include <vector>

#include "core/common.h"
#include "core/rng.h"

namespace dlcm {

struct SamplerConfig {
  float temperature = 0.8f;  // 0 = greedy (argmax)
  i64 top_k = 0;             // 0 = no limit
  float top_p = 1.0f;        // 1 = no nucleus cut
};

// Picks a token from logits [V]. scratch is reused between calls.
i32 sample_token(const float* logits, i64 V, const SamplerConfig& c, Rng& rng,
                 std::vector<std::pair<float, i32>>& scratch);

}  // namespace dlcm
