// Large buffers on transparent huge pages (core/common.h's AlignedAlloc).
//
// A prefill or a training step streams every weight matrix once, through 4 KiB pages that a
// kernel with THP in "madvise" mode (Debian's default) never merges: one TLB entry per 4 KiB,
// and the hardware prefetchers stop at each page's end. Buffers of 2 MiB or more are therefore
// 2 MiB-aligned, rounded up to whole 2 MiB pages and advised MADV_HUGEPAGE (a stream's packed
// weights are one such buffer: ops::PackedWeights::reserve). Only the pages change, never
// a value.
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/common.h"

namespace dlcm {

bool huge_pages_on() {
  static const bool on = [] {
    const char* v = std::getenv("DLCM_HUGE_PAGES");
    if (v && std::strcmp(v, "0") == 0) {
      std::fprintf(stderr, "dlcm: DLCM_HUGE_PAGES=0: large buffers on 4 KiB pages\n");
      return false;
    }
    return true;
  }();
  return on;
}

void advise_huge_pages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
  ::madvise(p, bytes, MADV_HUGEPAGE);  // advice only: where THP is off nothing changes
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace dlcm
