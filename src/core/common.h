// Shared basics: errors with context, aligned float buffers, small helpers.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace dlcm {

using i64 = int64_t;
using i32 = int32_t;

// Every user-facing failure is an Error whose message names the file, field or flag at fault
// and what was expected. The CLI prints it on one line and exits non-zero.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] inline void fail(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw Error(os.str());
}

#define DLCM_CHECK(cond, ...)              \
  do {                                     \
    if (!(cond)) ::dlcm::fail(__VA_ARGS__); \
  } while (0)

// GCC 12 flags the undefined pass-through operand inside some AVX-512 intrinsics
// (_mm512_max_ps, _mm512_reduce_max_ps, the unpacks, ...) as uninitialized once they are inlined
// into code with its own target: GCC bug 105593, fixed in 13. Wrap such a function in these,
// rather than turning the warning off for a whole file or build.
#define DLCM_GCC105593_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define DLCM_GCC105593_END _Pragma("GCC diagnostic pop")

// Large buffers on transparent huge pages (core/memory.cpp): whether buffers of 2 MiB or more
// are 2 MiB-aligned, rounded up to whole 2 MiB pages and advised MADV_HUGEPAGE (default on;
// DLCM_HUGE_PAGES=0 turns it off, logged).
bool huge_pages_on();
void advise_huge_pages(void* p, size_t bytes);

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define DLCM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/asan_interface.h>
#define DLCM_ASAN 1
#endif
#endif

// 64-byte aligned allocator so that AVX-512 loads never split cache lines. An allocation is
// rounded up to whole 64-byte lines plus one; under AddressSanitizer that slack is poisoned, so
// an overrun of a buffer's n elements is reported rather than landing in the padding.
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  static constexpr size_t kHuge = size_t(2) << 20;
  // bytes allocated for n elements (and whether on huge pages)
  static size_t alloc_bytes(size_t n, bool* huge) {
    const size_t bytes = ((n * sizeof(T) + 63) / 64) * 64 + 64;
    *huge = bytes >= kHuge && huge_pages_on();
    return *huge ? (bytes + kHuge - 1) / kHuge * kHuge : bytes;
  }
  T* allocate(size_t n) {
    if (n > size_t(PTRDIFF_MAX - 2 * kHuge) / sizeof(T)) throw std::bad_alloc();
    bool huge = false;
    const size_t bytes = alloc_bytes(n, &huge);
    void* p = std::aligned_alloc(huge ? kHuge : 64, bytes);
    if (!p) throw std::bad_alloc();
    if (huge) advise_huge_pages(p, bytes);
#ifdef DLCM_ASAN
    ASAN_POISON_MEMORY_REGION(static_cast<char*>(p) + n * sizeof(T), bytes - n * sizeof(T));
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
#ifdef DLCM_ASAN
    bool huge = false;
    ASAN_UNPOISON_MEMORY_REGION(p, alloc_bytes(n, &huge));
#else
    (void)n;
#endif
    std::free(p);
  }
  template <typename U>
  bool operator==(const AlignedAlloc<U>&) const { return true; }
};

// Activation/parameter storage: allocated once at model set-up, reused every step.
using Buf = std::vector<float, AlignedAlloc<float>>;

inline void zero(Buf& b) { std::fill(b.begin(), b.end(), 0.0f); }

// Sets a process-wide setting (read by Get, written by Set) for a scope and restores the
// previous value at exit: ops::PrecisionScope, ops::Bf16UnitsScope, ops::BlockedUseScope.
template <class T, T (*Get)(), void (*Set)(T)>
class SettingScope {
 public:
  explicit SettingScope(T v) : prev_(Get()) { Set(v); }
  ~SettingScope() { Set(prev_); }
  SettingScope(const SettingScope&) = delete;
  SettingScope& operator=(const SettingScope&) = delete;

 private:
  T prev_;
};

// Index of the first NaN or infinity in x[0, n), or -1. Blocks are screened with a branch-free
// pass on the exponent bits (vectorised), so clean data costs one streaming read.
inline i64 first_nonfinite(const float* x, i64 n) {
  constexpr i64 kBlock = 4096;
  for (i64 a = 0; a < n; a += kBlock) {
    const i64 b = n - a < kBlock ? n : a + kBlock;
    uint32_t bad = 0;
    for (i64 i = a; i < b; ++i) {
      uint32_t u;
      std::memcpy(&u, x + i, 4);
      bad |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
    }
    if (bad)
      for (i64 i = a; i < b; ++i)
        if (!std::isfinite(x[i])) return i;
  }
  return -1;
}

// "1h02m", "3m05s", "42s" for progress lines ("?" when unknown).
inline std::string fmt_duration(double s) {
  char buf[32];
  if (s < 0 || !std::isfinite(s)) return "?";
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%dm%02ds", int(s / 60), int(s) % 60);
  else std::snprintf(buf, sizeof buf, "%.0fs", s);
  return buf;
}

}  // namespace dlcm
