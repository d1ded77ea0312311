// Counter-based random numbers: a value is a pure function of (seed, counters), so any
// step of a run can be recomputed exactly (resume, boundary sampling, data order).
#pragma once
#include <cmath>
#include <cstdint>

namespace dlcm {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Hash of a seed and up to four counters.
inline uint64_t counter_hash(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0,
                             uint64_t d = 0) {
  uint64_t h = splitmix64(seed ^ 0x6A09E667F3BCC908ull);
  h = splitmix64(h ^ a);
  h = splitmix64(h ^ (b + 0x3C6EF372FE94F82Bull));
  h = splitmix64(h ^ (c + 0xA54FF53A5F1D36F1ull));
  h = splitmix64(h ^ (d + 0x510E527FADE682D1ull));
  return h;
}

// Uniform in [0, 1) with 24 random bits (exactly representable in float).
inline float counter_uniform(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0,
                             uint64_t d = 0) {
  return (counter_hash(seed, a, b, c, d) >> 40) * (1.0f / 16777216.0f);
}

// Small sequential generator (for initialisation and sampling), state is one uint64 so it
// can be saved in trainer_state.json.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed = 0) : state(seed) {}
  uint64_t next() { return splitmix64(state++); }
  float uniform() { return (next() >> 40) * (1.0f / 16777216.0f); }
  // Standard normal by Box-Muller (one value per call; simple and deterministic).
  float normal() {
    float u1 = uniform(), u2 = uniform();
    if (u1 < 1e-12f) u1 = 1e-12f;
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.28318530717958647f * u2);
  }
};

}  // namespace dlcm
