#include "infer/sampler.h"

#include <algorithm>
#include <cmath>

namespace dlcm {

i32 sample_token(const float* logits, i64 V, const SamplerConfig& c, Rng& rng,
                 std::vector<std::pair<float, i32>>& s) {
  if (c.temperature <= 0) return i32(std::max_element(logits, logits + V) - logits);
  s.resize(V);
  for (i64 i = 0; i < V; ++i) s[i] = {logits[i] / c.temperature, i32(i)};
  i64 n = V;
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first; };
  if (c.top_k > 0 && c.top_k < V) {
    std::partial_sort(s.begin(), s.begin() + c.top_k, s.end(), by_logit);
    n = c.top_k;
  } else {
    std::sort(s.begin(), s.end(), by_logit);
  }
  // softmax over the kept candidates (sorted descending)
  const float mx = s[0].first;
  double total = 0;
  for (i64 i = 0; i < n; ++i) {
    s[i].first = std::exp(s[i].first - mx);
    total += s[i].first;
  }
  if (c.top_p < 1.0f) {
    double acc = 0;
    i64 keep = n;
    for (i64 i = 0; i < n; ++i) {
      acc += s[i].first / total;
      if (acc >= c.top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
    total = 0;
    for (i64 i = 0; i < n; ++i) total += s[i].first;
  }
  double u = rng.uniform() * total, acc = 0;
  for (i64 i = 0; i < n; ++i) {
    acc += s[i].first;
    if (u < acc) return s[i].second;
  }
  return s[n - 1].second;
}

}  // namespace dlcm
