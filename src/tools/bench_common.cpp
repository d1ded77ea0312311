#include "tools/bench_common.h"

#include <time.h>

#include <cstdio>
#include <cstring>

#include "kernels/gemm.h"

namespace dlcm::bench {

double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

Peak measure_peak(double seconds, i64 n) {
  Buf a(n * n, 0.5f), b(n * n, 0.25f), c(n * n, 0.f);
  std::vector<double> w, u;
  ops::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);  // warm-up
  auto t_end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  do {
    const double c0 = cpu_seconds();
    auto t0 = std::chrono::steady_clock::now();
    ops::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
    w.push_back(2.0 * n * n * n / seconds_since(t0) / 1e9);
    u.push_back(2.0 * n * n * n / std::max(1e-9, cpu_seconds() - c0) / 1e9);
  } while (std::chrono::steady_clock::now() < t_end || w.size() < 3);
  return {median(w), median(u)};
}

Rss read_rss() {
  Rss r;
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return r;
  char line[256];
  while (std::fgets(line, sizeof line, f)) {
    long kb = 0;
    if (std::sscanf(line, "VmRSS: %ld kB", &kb) == 1) r.now_mib = kb / 1024.0;
    if (std::sscanf(line, "VmHWM: %ld kB", &kb) == 1) r.peak_mib = kb / 1024.0;
  }
  std::fclose(f);
  return r;
}

}  // namespace dlcm::bench
