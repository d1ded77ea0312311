// Next-token sampling (greedy, temperature, top-k, top-p from a seeded generator) and the text
// side of generation: whole UTF-8 characters only, stop strings.
#pragma once
#include <string>
#include <vector>

#include "core/common.h"
#include "core/rng.h"

namespace dlcm {

struct SamplerConfig {
  float temperature = 0.8f;  // 0 = greedy (argmax)
  i64 top_k = 0;             // 0 = no limit
  float top_p = 1.0f;        // 1 = no nucleus cut
};

// Refuses settings that would sample garbage (Error naming the flag): a temperature that is
// NaN, infinite, negative, or so small (denormal) that logits / temperature overflow; top_p
// outside [0, 1] or NaN; a negative top_k.
void validate_sampler(const SamplerConfig& c);

// Picks a token from logits [V]: greedy when temperature <= 0 (first maximum); otherwise
// softmax(logits / temperature) restricted to the top_k most likely tokens, then to the
// smallest prefix (by decreasing probability) whose mass reaches top_p, renormalised, and one
// draw of rng. The same rng state gives the same token. scratch is reused between calls.
i32 sample_token(const float* logits, i64 V, const SamplerConfig& c, Rng& rng,
                 std::vector<std::pair<float, i32>>& scratch);

// Turns the bytes of generated tokens into text that is safe to show as it arrives:
//   - only whole UTF-8 characters (a character split over byte-fallback tokens is held back
//     until complete);
//   - never a prefix of a stop string (held back until it cannot become one);
//   - generation stops at the first stop string: the text ends right before it.
class TextStreamer {
 public:
  explicit TextStreamer(std::vector<std::string> stops = {});
  // Adds the bytes of one token; returns the text that became safe to show.
  std::string push(const std::string& bytes);
  // End of generation: returns what was held back (nothing after a stop string).
  std::string finish();
  bool stopped() const { return stopped_; }
  // The whole text so far (cut before the stop string once stopped).
  const std::string& text() const { return buf_; }

 private:
  std::string take(size_t end);
  std::vector<std::string> stops_;
  std::string buf_;
  size_t shown_ = 0;
  bool stopped_ = false;
};

// Length of the longest prefix of s[0, n) that does not end inside a UTF-8 character that
// could still be completed by more bytes (invalid bytes count as whole characters).
size_t utf8_complete_prefix(const char* s, size_t n);

}  // namespace dlcm
