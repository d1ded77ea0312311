#include "tools/bench_common.h"

#include <cstdio>
#include <cstring>

namespace dlcm::bench {

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
