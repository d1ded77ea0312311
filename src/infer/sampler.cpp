#include "infer/sampler.h"

#include <algorithm>
#include <cmath>

namespace dlcm {

void validate_sampler(const SamplerConfig& c) {
  // Logits are O(10..100); dividing by less than 1e-6 is greedy in all but name, and far
  // smaller values (denormals) overflow to inf, whose softmax is NaN.
  DLCM_CHECK(std::isfinite(c.temperature) && (c.temperature == 0 ||
                                              (c.temperature >= 1e-6f && c.temperature <= 100)),
             "--temperature: expected 0 (greedy) or a value in [1e-6, 100], got ", c.temperature);
  DLCM_CHECK(c.top_p >= 0 && c.top_p <= 1, "--top-p: expected a value in [0, 1], got ", c.top_p);
  DLCM_CHECK(c.top_k >= 0, "--top-k: expected a value >= 0, got ", c.top_k);
}

i32 sample_token(const float* logits, i64 V, const SamplerConfig& c, Rng& rng,
                 std::vector<std::pair<float, i32>>& s) {
  if (c.temperature <= 0) return i32(std::max_element(logits, logits + V) - logits);
  s.resize(V);
  for (i64 i = 0; i < V; ++i) s[i] = {logits[i] / c.temperature, i32(i)};
  i64 n = V;
  // Ties broken by id so that the order (and so the draw) never depends on the sort.
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
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

size_t utf8_complete_prefix(const char* s, size_t n) {
  // Look back at most 3 bytes for the lead byte of the last character.
  for (size_t back = 1; back <= std::min<size_t>(n, 4); ++back) {
    const unsigned char c = s[n - back];
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    // F5-FF, C0 and C1 lead no valid character: nothing to wait for
    const size_t need = c > 0xF4 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 1;
    return need > back ? n - back : n;  // a lead still waiting for bytes is held back
  }
  return n;  // only continuation bytes in reach: invalid, nothing to wait for
}

TextStreamer::TextStreamer(std::vector<std::string> stops) {
  for (auto& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

std::string TextStreamer::take(size_t end) {
  std::string out = buf_.substr(shown_, end - shown_);
  shown_ = end;
  return out;
}

std::string TextStreamer::push(const std::string& bytes) {
  if (stopped_) return {};
  const size_t from = shown_;  // a match cannot start in shown text (see below)
  buf_ += bytes;
  size_t first = std::string::npos;
  for (const auto& st : stops_) first = std::min(first, buf_.find(st, from));
  if (first != std::string::npos) {
    stopped_ = true;
    buf_.resize(first);
    return take(first);
  }
  // Hold back the longest tail that is a proper prefix of a stop string.
  size_t safe = buf_.size();
  for (const auto& st : stops_)
    for (size_t k = std::min(st.size() - 1, buf_.size() - shown_); k > 0; --k)
      if (buf_.compare(buf_.size() - k, k, st, 0, k) == 0) {
        safe = std::min(safe, buf_.size() - k);
        break;
      }
  safe = shown_ + utf8_complete_prefix(buf_.data() + shown_, safe - shown_);
  return take(safe);
}

std::string TextStreamer::finish() { return take(buf_.size()); }

}  // namespace dlcm
