// Small helpers shared by the `dlcm bench` subcommands: medians, wall clock, resident memory.
#pragma once
#include <algorithm>
#include <chrono>
#include <vector>

#include "core/common.h"

namespace dlcm::bench {

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Wall time of f() in seconds.
template <typename F>
double time_it(F&& f) {
  auto t0 = std::chrono::steady_clock::now();
  f();
  return seconds_since(t0);
}

// Resident set size now and its peak (high-water mark) in MiB, from /proc/self/status
// (VmRSS, VmHWM); 0 where unavailable.
struct Rss {
  double now_mib = 0, peak_mib = 0;
};
Rss read_rss();

}  // namespace dlcm::bench
